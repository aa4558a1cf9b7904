"""What the MoE op tests draw: router logits, top-k-like expert ids, routing plans."""
from __future__ import annotations

import torch

import sphinx_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter's bf16 arithmetic is wrong (docs/environment.md): bf16 is checked by the GPU
# tests.
DTYPES = [torch.float32, torch.float16]
MIXTRAL = {"num_tokens": 8192, "num_experts": 8, "k": 2, "hidden": 4096}


def random_logits(num_tokens, num_experts, dtype, gen, requires_grad=False):
    logits = torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64) * 2
    return logits.to(dtype).to(DEVICE).requires_grad_(requires_grad)


def random_expert_ids(num_tokens, num_experts, k, gen, skew=False):
    """Distinct experts per token, like top-k; ``skew`` leaves the upper half of experts idle."""
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if skew:
        scores[:, num_experts // 2:] -= 2  # never among the top k while k <= E // 2
    return scores.topk(k, dim=1).indices.int().to(DEVICE)


def make_plan(num_tokens, num_experts, k, block_size, gen, backend="reference", skew=False):
    expert_ids = random_expert_ids(num_tokens, num_experts, k, gen, skew)
    return sphinx_kernels.moe_routing(expert_ids, num_experts, block_size=block_size,
                                      backend=backend)
