"""The dtype sets every op declares and checks, and the accumulation rule they share.

    FLOAT_DTYPES    float16, bfloat16, float32, float64: what the pure-PyTorch references take
    KERNEL_DTYPES   float16, bfloat16, float32: what the Triton kernels take (float64 has no tensor
                    cores and no use in training)
    HALF_DTYPES     float16, bfloat16: what the FlashAttention-2 peers take
    INDEX_DTYPES    int32, int64: index and count tensors

Kernels accumulate in :func:`accumulate_dtype` of their inputs: float32, or float64 for float64.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})
INDEX_DTYPES = frozenset({torch.int32, torch.int64})


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``: how messages and benchmark rows name a dtype."""
    return str(dtype).removeprefix("torch.")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums over ``dtype`` values are carried in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
