"""The ``flash_attn`` backend of ``varlen_attention``: flash-attn's FlashAttention-2 (2.7 or newer),
when installed, on a GPU. It serves what ``sphinx_kernels.ops.flash_attention_2`` says, and
``deterministic=True`` (its own deterministic backward).

flash-attn's public functions differentiate by autograd, which a custom op's implementation cannot
use; this glue calls the custom ops they call underneath, ``torch.ops.flashattn.
_flash_attn_varlen_forward`` / ``_backward``. A release whose ops name the keyword arguments passed
here differently is declared missing rather than failing inside a training step.

Not a backend: xformers, whose varlen masks (``BlockDiagonal*Mask.from_seqlens``) are built from
host lists of the lengths (a sync per call) and whose lse layout depends on the kernel its
dispatcher picks; it stays a benchmark peer (``benchmarks/bench_varlen.py``).
"""
from __future__ import annotations

import importlib.util

import torch

from sphinx_kernels.backends import Backend, Impl
from sphinx_kernels.dtypes import HALF_DTYPES
from sphinx_kernels.ops.flash_attention_2 import flash_attention_2_reasons, zero_rows_past
from sphinx_kernels.platforms import Platform

__all__ = ["FLASH_ATTN", "FLASH_ATTN_BACKEND", "flash_attn_ops", "flash_attn_missing",
           "FLASH_ATTN_KEYWORDS"]

# The keyword arguments the forward and the backward below pass.
FLASH_ATTN_KEYWORDS = (
    frozenset({"dropout_p", "softmax_scale", "causal"}),
    frozenset({"dropout_p", "softmax_scale", "causal", "window_size_left", "window_size_right",
               "softcap", "alibi_slopes", "deterministic"}),
)


def flash_attn_ops():
    """flash-attn's varlen forward and backward custom ops, registered when its interface module is
    imported."""
    import flash_attn.flash_attn_interface  # noqa: F401  (registers the ops)
    ops = torch.ops.flashattn
    return ops._flash_attn_varlen_forward, ops._flash_attn_varlen_backward


def _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q, max_seqlen_k, causal,
             softmax_scale, deterministic):
    # It leaves padding rows unwritten, and declares q, k, v mutated (their version counters move)
    # though their values are kept.
    forward, _ = flash_attn_ops()
    out, lse, *_ = forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=softmax_scale, causal=causal)
    return zero_rows_past(out, cu_seqlens_q), lse


def _backward(grad, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q,
              max_seqlen_k, causal, softmax_scale, deterministic):
    _, backward = flash_attn_ops()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)  # written in place
    backward(grad.contiguous(), q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
             max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal,
             window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
             deterministic=deterministic)
    return (zero_rows_past(dq, cu_seqlens_q), zero_rows_past(dk, cu_seqlens_k),
            zero_rows_past(dv, cu_seqlens_k))


def flash_attn_missing(device: torch.device) -> str | None:
    """Why the flash-attn peer cannot run here: not installed, too old, or its ops' arguments
    renamed."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    try:
        ops = flash_attn_ops()
    except (ImportError, AttributeError, RuntimeError) as error:
        return f"flash-attn has no torch.ops.flashattn varlen ops (2.7 or newer has them): {error}"
    for op, keywords in zip(ops, FLASH_ATTN_KEYWORDS):
        lacking = keywords - {arg.name for arg in op.default._schema.arguments}
        if lacking:
            return f"flash-attn's {op.default._schema.name} has no argument(s) {sorted(lacking)}"
    return None


FLASH_ATTN = Platform("flash_attn", frozenset({"cuda"}), (8, 0), flash_attn_missing)
FLASH_ATTN_BACKEND = Backend(FLASH_ATTN, Impl(_forward, _backward), HALF_DTYPES,
                             flash_attention_2_reasons)
