"""Shared helpers of the model tests: tiny decoder configs and packing of token lists."""
from __future__ import annotations

import dataclasses

import torch

from sphinx_model import LLMConfig

TINY_DENSE = LLMConfig(arch="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, intermediate_size=48, max_position_embeddings=128,
                       rope_theta=1e4, rms_norm_eps=1e-6)
TINY_MOE = dataclasses.replace(TINY_DENSE, arch="mixtral", num_experts=4, top_k=2,
                               moe_block_size=4)


def pack(samples: list[torch.Tensor], padding: int = 0, pad_value=0):
    """Samples back to back (plus ``padding`` rows) and their int32 ``cu_seqlens``."""
    lengths = torch.tensor([0] + [len(s) for s in samples])
    rows = [*samples, torch.full((padding, *samples[0].shape[1:]), pad_value,
                                 dtype=samples[0].dtype)]
    return torch.cat(rows), lengths.cumsum(0).to(torch.int32)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
