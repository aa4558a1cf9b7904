"""Hugging Face drop-in benchmark: transformers' own ``LlamaForCausalLM`` trained on a batch of
mixed-length samples, attention by ``sphinx_varlen`` on the batch packed by
``DataCollatorWithFlattening`` against transformers' ``sdpa`` on the same samples padded (and
``flash_attention_2`` on the packed batch when flash-attn is installed).

    python -m benchmarks --family hf [--quick]

Workload (seeded): sample lengths uniform in 1..2048 summing to 8192 tokens (4096 with --quick),
random token ids, random weights. On a GPU the model has TinyLlama-1.1B's shape (22 layers, width
2048, 32 query heads over 4 key/value heads, FFN 5632, vocabulary 32000; 4 layers with --quick) in
bf16; on the CPU a tiny Llama in float32 (where sphinx_varlen runs its pure-PyTorch reference,
so the rows there only show the harness working). One step is the forward and the backward of the
model with transformers' own loss (the optimizer update is the same for every variant, and left
out). Reported: ms per step, tokens/s (real tokens), useful TFLOP/s (``6 * parameters * tokens``
for the matmuls, the visible attention pairs for attention; padding counts for nothing) and its
fraction of the measured matmul ceiling, and peak memory on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from benchmarks.bench_varlen import attention_lengths
from benchmarks.counts import attention_flops
from benchmarks.harness import RESULTS_DIR, run_family, time_ms
from benchmarks.peers import peer_missing
from benchmarks.rows import Row, compute_row

OURS, SDPA, FLASH = "sphinx_varlen packed", "sdpa padded", "flash_attention_2 packed"


@dataclass(frozen=True)
class HFConfig:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tokens: int    # real tokens per batch
    longest: int   # the longest sample
    dtype: torch.dtype


TINYLLAMA = HFConfig(layers=22, hidden=2048, heads=32, kv_heads=4, ffn=5632, vocab=32000,
                     tokens=8192, longest=2048, dtype=torch.bfloat16)
GPU_QUICK = replace(TINYLLAMA, layers=4, tokens=4096)
CPU = HFConfig(layers=2, hidden=128, heads=4, kv_heads=2, ffn=344, vocab=1000, tokens=1024,
               longest=256, dtype=torch.float32)
CPU_QUICK = replace(CPU, tokens=256, longest=128)


def llama(cfg: HFConfig, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.ffn,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.longest)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: TinyLlama is 4.4 GB in float32
        return LlamaForCausalLM(config).to(cfg.dtype).train()


def batches(cfg: HFConfig, device: torch.device, seed: int) -> dict:
    """The same samples packed (``DataCollatorWithFlattening``, with the sequence offsets) and
    right-padded (padding masked out, never a label)."""
    from transformers import DataCollatorWithFlattening
    lengths = attention_lengths(cfg.tokens, cfg.longest, seed)
    gen = torch.Generator().manual_seed(seed)
    samples = [torch.randint(cfg.vocab, (n,), generator=gen) for n in lengths]
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": s.tolist()} for s in samples])
    ids = torch.zeros(len(samples), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(samples):
        ids[row, :len(sample)], mask[row, :len(sample)] = sample, 1
    padded = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return {"lengths": lengths,
            "packed": {k: v.to(device) if torch.is_tensor(v) else v for k, v in packed.items()},
            "padded": {k: v.to(device) for k, v in padded.items()}}


def step_flops(model, cfg: HFConfig, lengths: list[int]) -> int:
    """Useful FLOPs of one forward and backward: the matmuls of every weight but the embedding
    table (``2 * parameters`` per token forward, twice that backward), and attention's visible
    pairs forward and backward."""
    weights = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    head_dim = cfg.hidden // cfg.heads
    attention = sum(attention_flops(lengths, num_heads=cfg.heads, head_dim=head_dim,
                                    backward=backward) for backward in (False, True))
    return 6 * weights * sum(lengths) + cfg.layers * attention


def variants(device: torch.device) -> dict[str, tuple[str, str]]:
    """Name -> (attn_implementation, batch layout) of what runs here; a missing peer is said."""
    runs = {OURS: ("sphinx_varlen", "packed"), SDPA: ("sdpa", "padded")}
    missing = peer_missing("flash_attn", device)
    if missing is None:
        runs[FLASH] = ("flash_attention_2", "packed")
    else:
        print(f"{FLASH} skipped: {missing}")
    return runs


def bench_hf(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    from sphinx_kernels.integrations import transformers as skt
    skt.register()
    if device.type == "cuda":
        cfg = GPU_QUICK if quick else TINYLLAMA
    else:
        cfg = CPU_QUICK if quick else CPU
    model = llama(cfg, device)
    sets = [batches(cfg, device, seed) for seed in range(2)]
    lengths = sets[0]["lengths"]
    shape = (f"Llama L={cfg.layers} H={cfg.hidden} heads={cfg.heads}/{cfg.kv_heads} "
             f"tokens={sum(lengths)} B={len(lengths)} (padded {len(lengths) * max(lengths)})")
    flops = sum(step_flops(model, cfg, s["lengths"]) for s in sets) / len(sets)
    dtype = str(cfg.dtype).removeprefix("torch.")
    rows = []
    for name, (implementation, layout) in variants(device).items():
        try:
            model.set_attn_implementation(implementation)
        except (ImportError, ValueError) as error:  # transformers' own check of the peer
            print(f"{name} skipped: {error}")
            continue

        def train_step(batch, layout=layout):
            model(**batch[layout]).loss.backward()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = time_ms(train_step, sets, device, warmup=2, repeats=5 if quick else 10)
        extra = {"tokens_per_s": cfg.tokens / ms * 1e3}
        if device.type == "cuda":
            extra["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(compute_row("train step fwd+bwd", shape, dtype, name, ms, int(flops),
                                size=cfg.tokens, **extra))
        model.zero_grad(set_to_none=True)
    return rows


def run(device: torch.device, quick: bool, results_dir: str = RESULTS_DIR) -> list[Row]:
    return run_family("hf", device, quick, (bench_hf,), (OURS,), (SDPA, FLASH),
                      results_dir=results_dir)
