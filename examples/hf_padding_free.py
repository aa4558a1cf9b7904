"""Padding-free training of Hugging Face models on sphinx_kernels, with transformers' own classes.

A tiny random Llama and a tiny random Mixtral are trained for a few AdamW steps on batches that
transformers' ``DataCollatorWithFlattening`` packs into one row (no padding; it passes the
sequence offsets as ``cu_seq_lens_q/k``), with ``attn_implementation="sphinx_varlen"``, and for
the Mixtral its sparse-MoE blocks on ``sphinx_kernels.nn.MoEMLP`` (its load-balancing loss
included). Beside each loss is the loss of the same model trained with transformers' sdpa on the
same samples padded, which it matches. Runs in seconds on a CPU.
"""
import copy

import torch
from transformers import (
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from sphinx_kernels.integrations import transformers as skt

VOCAB, STEPS, SAMPLES_PER_STEP = 128, 5, 4
SHAPE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
# MoEMLP's rows per expert block: 128 suits the GPU kernels, a few rows suit CPU sizes.
MOE_BLOCK = 128 if torch.cuda.is_available() else 8
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
skt.register()  # attn_implementation="sphinx_varlen"

# Samples of mixed lengths (in a real run they come from a tokenizer), something to learn: each
# counts up from a random token.
gen = torch.Generator().manual_seed(0)
steps = [[[(int(start) + i) % VOCAB for i in range(int(n))]
          for start, n in zip(torch.randint(VOCAB, (SAMPLES_PER_STEP,), generator=gen),
                              torch.randint(2, 40, (SAMPLES_PER_STEP,), generator=gen))]
         for _ in range(STEPS)]
flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True)


def padded(samples):
    """The baseline's batch: right-padded, the padding masked out and never a label."""
    longest = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(samples):
        ids[row, :len(sample)] = torch.tensor(sample)
        mask[row, :len(sample)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train(model, batches):
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for batch in batches:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


torch.manual_seed(0)
models = {
    "llama": LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "mixtral": MixtralForCausalLM(MixtralConfig(**SHAPE, num_local_experts=4, num_experts_per_tok=2,
                                                output_router_logits=True)),
}
for name, model in models.items():
    baseline = copy.deepcopy(model)
    baseline.set_attn_implementation("sdpa")
    model.set_attn_implementation("sphinx_varlen")
    if name == "mixtral":
        skt.use_sphinx_moe(model, block_size=MOE_BLOCK)
    packed = [flatten([{"input_ids": s} for s in samples]) for samples in steps]
    ours, theirs = train(model, packed), train(baseline, [padded(s) for s in steps])
    tokens = [int(b["input_ids"].numel()) for b in packed]
    padded_tokens = [len(s) * max(map(len, s)) for s in steps]
    print(f"{name}: {sum(tokens)} tokens packed, {sum(padded_tokens)} when padded")
    for step, (a, b) in enumerate(zip(ours, theirs)):
        print(f"  step {step}: loss {a:.5f} (sphinx_varlen, packed)  {b:.5f} (sdpa, padded)")
