"""Triton kernel of ``moe_permute``: token rows to expert-grouped, block-padded rows, one tile of
grouped rows per program (each reads its token's row; padding rows are written zero), optionally
scaled per pair (``moe_unpermute``'s backward). Contract: ``sphinx_kernels.ops.moe_permute``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sphinx_kernels.triton.common import (
    accumulate_type,
    contiguous,
    row_grid,
    row_tile,
    store_tile,
)


@triton.jit
def _permute_rows_kernel(x_ptr, row_to_pair_ptr, scale_ptr, out_ptr, num_rows, num_pairs, width,
                         K: tl.constexpr, HAS_SCALE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r, d, r_in, d_in = row_tile(num_rows, width, BLOCK_R, BLOCK_H)
    pair = tl.load(row_to_pair_ptr + r, mask=r_in, other=-1)
    placed = (pair >= 0) & (pair < num_pairs)  # padding rows (-1) are zero
    token = tl.where(placed, pair // K, 0).to(tl.int64)
    rows = tl.load(x_ptr + token[:, None] * width + d[None, :],
                   mask=placed[:, None] & d_in[None, :], other=0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + pair, mask=placed, other=0).to(ACC_DTYPE)
        rows = rows.to(ACC_DTYPE) * scale[:, None]
    store_tile(out_ptr, rows, r, d, r_in, d_in, width)


def permute_rows(x, position, row_to_pair, scale):
    """``[R, H]``: row r holds ``x[row_to_pair[r] // k]`` (times ``scale[row_to_pair[r]]`` when
    given), zero for a padding row."""
    x = x.contiguous()
    row_to_pair, scale = contiguous(row_to_pair, scale)
    num_rows, width = row_to_pair.shape[0], x.shape[1]
    out = torch.empty((num_rows, width), dtype=x.dtype, device=x.device)
    if num_rows == 0 or width == 0:
        return out
    block_r, block_h, width_blocks = row_grid(num_rows, width)
    _permute_rows_kernel[(triton.cdiv(num_rows, block_r), width_blocks)](
        x_ptr=x, row_to_pair_ptr=row_to_pair,
        scale_ptr=scale if scale is not None else row_to_pair, out_ptr=out, num_rows=num_rows,
        num_pairs=position.numel(), width=width, K=max(position.shape[1], 1),
        HAS_SCALE=scale is not None, ACC_DTYPE=accumulate_type(x.dtype), BLOCK_R=block_r,
        BLOCK_H=block_h)
    return out
