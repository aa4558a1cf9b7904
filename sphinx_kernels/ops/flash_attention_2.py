"""What the two FlashAttention-2 peers of ``varlen_attention`` share (torch's bundled copy,
``sphinx_kernels.ops.torch_flash``, and flash-attn's, ``sphinx_kernels.ops.flash_attn``): the calls
they can serve, and the padding rows they leave unwritten.

Both align a causal mask bottom-right and take GQA by head count, as ``varlen_attention`` does;
their log-sum-exp (float32 ``[Hq, Tq]``) feeds their own backward only.
"""
from __future__ import annotations

import torch

__all__ = ["MAX_HEAD_DIM", "HEAD_DIM_MULTIPLE", "flash_attention_2_reasons", "zero_rows_past"]

MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8


def flash_attention_2_reasons(request) -> list[str]:
    """Why a FlashAttention-2 peer cannot serve a ``VarlenAttentionRequest``: head dims, no
    prefix-LM mask, and the host-int sequence bounds it needs."""
    reasons = []
    if request.head_dim > MAX_HEAD_DIM or request.head_dim % HEAD_DIM_MULTIPLE:
        reasons.append(f"head dim {request.head_dim} must be at most {MAX_HEAD_DIM} and a multiple "
                       f"of {HEAD_DIM_MULTIPLE}")
    if request.prefix:
        reasons.append("no prefix-LM mask (prefix_lens)")
    if not request.max_seqlen:
        reasons.append("needs max_seqlen_q and max_seqlen_k as host ints (not given; computing "
                       "them would be a host sync)")
    return reasons


def zero_rows_past(x: torch.Tensor, cu_seqlens: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``x`` with the rows (along ``dim``) past ``cu_seqlens[-1]`` set to 0, without a host sync."""
    rows = torch.arange(x.shape[dim], device=x.device)
    keep = (rows < cu_seqlens[-1]).view([-1 if i == dim else 1 for i in range(x.dim())])
    return torch.where(keep, x, 0)
