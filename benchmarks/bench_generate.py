"""Generation benchmark: ``sphinx_model.generate`` (one packed prefill, then decode steps of one row
per live sequence against the preallocated KV cache) against transformers' ``generate`` (its batch
left-padded to the longest prompt, its own KV cache, SDPA attention) on the same weights and the
same prompts.

    python -m benchmarks --family generate [--quick]

Workload (seeded): a batch of prompts of random token ids, lengths drawn log-uniformly from a range
(mixed lengths are the point: the padded batch computes every prompt at the longest one's length),
greedy decoding of a fixed number of new tokens with no EOS, so both generate exactly as many.
Weights: our ``LLM`` randomly initialised, exported with ``save_hf_llm`` and loaded by transformers'
``from_pretrained`` (the same weights, the checkpoint path users take). Reported per model:

- ``prefill``: one ``generate`` call with ``max_new_tokens=1``; tokens/s counts the prompts' real
  tokens (padding excluded) over the call's time.
- ``decode``: the time of one decode step (ms) and new tokens/s (``B`` per step): the median of the
  intervals between consecutive steps' tokens, as each generator hands them out (our
  ``stream_generate``; a streamer passed to transformers' ``generate``, called once per step), over
  the ``N - 1`` steps of every ``max_new_tokens=N`` call; ``tokens_match``: the share of prompts
  whose greedy tokens equal transformers' (a check that both compute the same thing). A step's
  median is steady where the difference of two whole calls (``N`` tokens minus the prefill) is not:
  on a shared machine one disturbed call moved that estimate by 10-30%.

TFLOP/s count the useful work only (:func:`forward_flops`: real tokens, the active experts, visible
attention pairs, logits of the rows sampled from), the same for both generators.

Targets: prefill >= 1.5x transformers' padded batch, decode tokens/s >= transformers'. CPU: the
``tiny-dense`` (Llama) and ``tiny`` (Mixtral) decoders in float32, 8 prompts of 16-512 tokens, 32
new tokens, both generators on one intra-op thread: at these sizes both are chains of small ops, and
on a shared machine a second thread makes each op wait for a busy core (measured: a [3, 128] linear
takes 2.3 ms with two threads under load, 20 us with one), which drowns the comparison in noise.
GPU: ``tinyllama-1.1b`` in bfloat16, 32 prompts of 32-1536 tokens, 128 new tokens.
"""
from __future__ import annotations

import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from benchmarks.counts import attention_flops, gemm_flops, swiglu_mlp_flops
from benchmarks.harness import RESULTS_DIR, run_family, time_ms
from benchmarks.rows import Row, compute_row
from sphinx_model import LLM, LLMConfig, preset, save_hf_llm, stream_generate

OURS, PEER = "sphinx_model.generate", "transformers generate (padded)"


@dataclass(frozen=True)
class Workload:
    model: str                   # a preset's LLM
    prompts: int
    lengths: tuple[int, int]     # prompt lengths, drawn log-uniformly
    new_tokens: int
    dtype: torch.dtype


CPU = [Workload("tiny-dense", 8, (16, 512), 32, torch.float32),
       Workload("tiny", 8, (16, 512), 32, torch.float32)]
CPU_QUICK = [Workload("tiny-dense", 4, (8, 64), 4, torch.float32)]
GPU = [Workload("tinyllama-1.1b", 32, (32, 1536), 128, torch.bfloat16)]
GPU_QUICK = [Workload("tinyllama-1.1b", 8, (32, 512), 32, torch.bfloat16)]


def prompt_ids(work: Workload, vocab: int, seed: int = 0) -> list[list[int]]:
    """``work.prompts`` lists of random token ids, BOS (1) first, lengths log-uniform."""
    rng = random.Random(seed)
    low, high = (math.log(n) for n in work.lengths)
    lengths = [int(math.exp(rng.uniform(low, high))) for _ in range(work.prompts)]
    return [[1] + [rng.randrange(3, vocab) for _ in range(n - 1)] for n in lengths]


def forward_flops(cfg: LLMConfig, lens_q: list[int], lens_k: list[int], logits_rows: int) -> int:
    """Useful FLOPs of one decoder forward: ``lens_q[b]`` new rows of sequence b attending to its
    ``lens_k[b]`` keys (the new rows last), projections, the MLP (a MoE's router and its ``top_k``
    experts per row), and the LM head on ``logits_rows`` rows."""
    rows, hidden, dim = sum(lens_q), cfg.hidden_size, cfg.dim_per_head
    layer = (gemm_flops(rows, (cfg.num_heads + 2 * cfg.num_kv_heads) * dim, hidden)
             + gemm_flops(rows, hidden, cfg.num_heads * dim)
             + attention_flops(lens_q, lens_k, num_heads=cfg.num_heads, head_dim=dim))
    if cfg.num_experts:
        layer += gemm_flops(rows, cfg.num_experts, hidden)
        layer += swiglu_mlp_flops(rows * cfg.top_k, hidden, cfg.intermediate_size)
    else:
        layer += swiglu_mlp_flops(rows, hidden, cfg.intermediate_size)
    return cfg.num_layers * layer + gemm_flops(logits_rows, cfg.vocab_size, hidden)


def build_models(work: Workload, device: torch.device, directory: str):
    """Our randomly initialised LLM and transformers' model of the same weights (through
    ``save_hf_llm`` and ``from_pretrained``)."""
    import transformers

    cfg = preset(work.model).llm
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = LLM(cfg)
    ours = ours.to(work.dtype).to_empty(device=device)
    ours.init_weights()
    save_hf_llm(ours, directory)
    peer = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=work.dtype, attn_implementation="sdpa").to(device).eval()
    peer.generation_config.eos_token_id = None  # both generate every token (greedy, no EOS stop)
    return ours, peer


def padded_batch(prompts: list[list[int]], device: torch.device):
    """Left-padded ``input_ids`` and ``attention_mask`` (decoder-only models pad on the left)."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.int64)
    mask = torch.zeros(len(prompts), longest, dtype=torch.int64)
    for b, prompt in enumerate(prompts):
        ids[b, longest - len(prompt):] = torch.tensor(prompt)
        mask[b, longest - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def peer_generate(peer, batch, new_tokens: int, stamps: list[float] | None = None
                  ) -> list[list[int]]:
    """transformers' greedy ``generate`` of ``new_tokens`` tokens; with ``stamps``, the time at
    which each step's tokens came out is appended to it (through a streamer)."""
    import transformers
    from transformers.generation.streamers import BaseStreamer

    class StepTimes(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):  # first the prompt, then each step's tokens
            if self.prompt_seen:
                stamps.append(time.perf_counter())
            self.prompt_seen = True

        def end(self):
            pass

    ids, mask = batch
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens,
                                           eos_token_id=None, pad_token_id=0, bos_token_id=1)
    with torch.inference_mode():
        out = peer.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                            streamer=None if stamps is None else StepTimes())
    return out[:, ids.shape[1]:].tolist()


def our_generate(ours, prompts, new_tokens: int, stamps: list[float] | None = None
                 ) -> list[list[int]]:
    """``sphinx_model``'s greedy generation of ``new_tokens`` tokens (every prompt runs to the
    end: no EOS); with ``stamps``, the time at which each step's first token came out."""
    out: list[list[int]] = [[] for _ in prompts]
    for step, (index, token) in enumerate(stream_generate(ours, prompts, new_tokens)):
        if stamps is not None and step % len(prompts) == 0:
            stamps.append(time.perf_counter())
        out[index].append(token)
    return out


def bench_workload(work: Workload, device: torch.device, quick: bool) -> list[Row]:
    with tempfile.TemporaryDirectory() as directory:
        ours, peer = build_models(work, device, directory)
    prompts = prompt_ids(work, ours.config.vocab_size)
    batch = padded_batch(prompts, device)
    lengths = [len(p) for p in prompts]
    real, padded = sum(lengths), len(prompts) * max(lengths)
    prefill_flops = forward_flops(ours.config, lengths, lengths, len(prompts))
    steps = work.new_tokens - 1
    step_flops = sum(forward_flops(ours.config, [1] * len(prompts), [n + s for n in lengths],
                                   len(prompts)) for s in range(1, steps + 1)) // steps
    dtype = str(work.dtype).removeprefix("torch.")
    runs = {OURS: lambda n, stamps=None: our_generate(ours, prompts, n, stamps),
            PEER: lambda n, stamps=None: peer_generate(peer, batch, n, stamps)}
    outputs = {name: run(work.new_tokens) for name, run in runs.items()}  # also the warm-up
    matching = sum(a == b for a, b in zip(outputs[OURS], outputs[PEER])) / len(prompts)
    # The two generators take turns, one call at a time, so that a change in the machine's load
    # (it is shared) falls on both; each figure is a median over its calls (prefill) or over the
    # steps of all its calls (decode).
    prefills = {name: [] for name in runs}
    intervals = {name: [] for name in runs}
    for _ in range(1 if quick else 5):
        for name, run in runs.items():
            prefills[name].append(time_ms(run, [1], device, warmup=0, repeats=1))
            stamps: list[float] = []
            run(work.new_tokens, stamps)
            intervals[name] += [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    rows = []
    for name in runs:
        prefill_ms = statistics.median(prefills[name])
        step_ms = statistics.median(intervals[name])
        rows.append(compute_row("prefill", f"{work.model} B={len(prompts)} tokens={real} (padded "
                                f"{padded})", dtype, name, prefill_ms, prefill_flops,
                                tokens_per_s=real / prefill_ms * 1e3))
        rows.append(compute_row("decode", f"{work.model} B={len(prompts)} new={work.new_tokens}",
                                dtype, name, step_ms, step_flops,
                                tokens_per_s=len(prompts) / step_ms * 1e3,
                                tokens_match=matching, threads=torch.get_num_threads()))
    for r in rows:
        print(f"{r.op} {r.shape}: {r.backend}: {r.extra['tokens_per_s']:.0f} tokens/s")
    print(f"greedy tokens equal transformers' for {matching:.0%} of the prompts")
    return rows


def bench_generate(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    if device.type == "cuda":
        return [row for work in (GPU_QUICK if quick else GPU)
                for row in bench_workload(work, device, quick)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring
    try:
        return [row for work in (CPU_QUICK if quick else CPU)
                for row in bench_workload(work, device, quick)]
    finally:
        torch.set_num_threads(threads)


def run(device: torch.device, quick: bool, results_dir: str = RESULTS_DIR) -> list[Row]:
    return run_family("generate", device, quick, (bench_generate,), (OURS,), (PEER,),
                      results_dir=results_dir)
