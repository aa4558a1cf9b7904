"""Triton kernels of ``moe_unpermute``: grouped rows back to tokens, the weighted sum over each
token's k slots in slot order (the reference's order), and the per-pair dot products of its
weights' backward. Contract: ``sphinx_kernels.ops.moe_unpermute``. No atomics: deterministic."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sphinx_kernels.triton.common import accumulate_type, row_grid, row_tile, store_tile


@triton.jit
def _unpermute_rows_kernel(y_ptr, position_ptr, weights_ptr, out_ptr, num_tokens, num_rows, width,
                           K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    t, d, t_in, d_in = row_tile(num_tokens, width, BLOCK_T, BLOCK_H)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=ACC_DTYPE)
    for j in tl.static_range(K):  # slot order: the same summation order as the reference
        row = tl.load(position_ptr + t * K + j, mask=t_in, other=-1)
        placed = (row >= 0) & (row < num_rows)
        y = tl.load(y_ptr + row[:, None].to(tl.int64) * width + d[None, :],
                    mask=placed[:, None] & d_in[None, :], other=0).to(ACC_DTYPE)
        if HAS_WEIGHTS:
            y *= tl.load(weights_ptr + t * K + j, mask=t_in, other=0).to(ACC_DTYPE)[:, None]
        acc += y
    store_tile(out_ptr, acc, t, d, t_in, d_in, width)


@triton.jit
def _pair_dots_kernel(grad_ptr, y_ptr, position_ptr, out_ptr, num_tokens, num_rows, width,
                      K: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_H: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.program_id(1)
    t_in = t < num_tokens
    row = tl.load(position_ptr + t * K + j, mask=t_in, other=-1)
    placed = (row >= 0) & (row < num_rows)
    acc = tl.zeros([BLOCK_T], dtype=ACC_DTYPE)
    for start in range(0, width, BLOCK_H):
        d = start + tl.arange(0, BLOCK_H)
        d_in = d < width
        g = tl.load(grad_ptr + t[:, None].to(tl.int64) * width + d[None, :],
                    mask=t_in[:, None] & d_in[None, :], other=0).to(ACC_DTYPE)
        y = tl.load(y_ptr + row[:, None].to(tl.int64) * width + d[None, :],
                    mask=placed[:, None] & d_in[None, :], other=0).to(ACC_DTYPE)
        acc += tl.sum(g * y, axis=1)
    tl.store(out_ptr + t * K + j, acc.to(out_ptr.dtype.element_ty), mask=t_in)


def unpermute_rows(y_grouped, position, row_to_pair, weights):
    """``[T, H]``: ``sum_j weights[t, j] * y_grouped[position[t, j]]`` (unit weights when None)."""
    y = y_grouped.contiguous()
    (num_tokens, k), width = position.shape, y.shape[1]
    out = torch.empty((num_tokens, width), dtype=y.dtype, device=y.device)
    if num_tokens == 0 or width == 0:
        return out
    block_t, block_h, width_blocks = row_grid(num_tokens, width)
    _unpermute_rows_kernel[(triton.cdiv(num_tokens, block_t), width_blocks)](
        y_ptr=y, position_ptr=position.contiguous(),
        weights_ptr=weights.contiguous() if weights is not None else position, out_ptr=out,
        num_tokens=num_tokens, num_rows=y.shape[0], width=width, K=k,
        HAS_WEIGHTS=weights is not None, ACC_DTYPE=accumulate_type(y.dtype), BLOCK_T=block_t,
        BLOCK_H=block_h)
    return out


def pair_dots(grad, y_grouped, position, dtype):
    """``[T, k]`` in ``dtype``: ``grad[t] . y_grouped[position[t, j]]``."""
    num_tokens, k = position.shape
    out = torch.empty((num_tokens, k), dtype=dtype, device=grad.device)
    if num_tokens == 0 or k == 0:
        return out
    block_t, block_h, _ = row_grid(num_tokens, grad.shape[1])
    _pair_dots_kernel[(triton.cdiv(num_tokens, block_t), k)](
        grad_ptr=grad.contiguous(), y_ptr=y_grouped.contiguous(),
        position_ptr=position.contiguous(), out_ptr=out, num_tokens=num_tokens,
        num_rows=y_grouped.shape[0], width=grad.shape[1], K=k,
        ACC_DTYPE=accumulate_type(y_grouped.dtype), BLOCK_T=block_t, BLOCK_H=block_h)
    return out
