"""The ``torch_flash`` backend of ``varlen_attention``: the FlashAttention-2 kernels bundled with
torch (``torch.ops.aten._flash_attention_forward`` / ``_backward``, what
``torch.nn.attention.varlen.varlen_attn`` calls), on a GPU. It serves causal and non-causal masks
with host-int sequence bounds (see ``sphinx_kernels.ops.flash_attention_2``), but not
``deterministic=True``: its backward accumulates dQ with atomic adds.
"""
from __future__ import annotations

import torch

from sphinx_kernels.backends import Backend, Impl
from sphinx_kernels.dtypes import HALF_DTYPES
from sphinx_kernels.ops.flash_attention_2 import flash_attention_2_reasons, zero_rows_past
from sphinx_kernels.platforms import Platform

__all__ = ["TORCH_FLASH", "TORCH_FLASH_BACKEND", "torch_flash_reasons"]


def _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q, max_seqlen_k, causal,
             softmax_scale, deterministic):
    # Its lse is +inf for rows without keys.
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, causal, False,
        scale=softmax_scale)
    return zero_rows_past(out, cu_seqlens_q), lse


def _backward(grad, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q,
              max_seqlen_k, causal, softmax_scale, deterministic):
    # Without dropout the backward never reads the RNG state: empty stand-ins of the right dtypes.
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, 0.0, causal, seed, offset, scale=softmax_scale)
    return (zero_rows_past(dq, cu_seqlens_q), zero_rows_past(dk, cu_seqlens_k),
            zero_rows_past(dv, cu_seqlens_k))


def _missing(device: torch.device) -> str | None:
    available = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)
    if not hasattr(torch.ops.aten, "_flash_attention_forward") or not available():
        return "this torch build has no FlashAttention kernels"
    return None


def torch_flash_reasons(request) -> list[str]:
    """Why ``torch_flash`` cannot serve a ``VarlenAttentionRequest``."""
    reasons = flash_attention_2_reasons(request)
    if request.deterministic:
        reasons.append("deterministic=True: its backward accumulates dQ with atomic adds")
    return reasons


TORCH_FLASH = Platform("torch_flash", frozenset({"cuda"}), (8, 0), _missing)
TORCH_FLASH_BACKEND = Backend(TORCH_FLASH, Impl(_forward, _backward), HALF_DTYPES,
                              torch_flash_reasons)
