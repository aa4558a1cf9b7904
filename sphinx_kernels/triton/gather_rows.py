"""Triton kernels of ``gather_rows``: the multi-source row gather, and its deterministic backward (a
segment sum in a fixed order). Contract: ``sphinx_kernels.ops.gather_rows``."""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from sphinx_kernels.triton.common import accumulate_type, row_block, rows_per_program

# The gather moves bits, not numbers: every float dtype is viewed as the integer of its width, so
# the copy is exact by construction (and needs no bf16 arithmetic, which the interpreter gets
# wrong).
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


# 8 warps: a 4096-element tile is 16 elements a thread (at 4 warps, ptxas spills 8 B of the
# 16-bit gather on sm_80; python -m sphinx_kernels.aot).
_GATHER_WARPS = 8


@triton.jit
def _gather_rows_kernel(sources, row_strides, source_rows, source_ids_ptr, row_ids_ptr, out_ptr,
                        num_rows, width, nan_bits, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_in = t < num_rows
    d_in = d < width
    sid = tl.load(source_ids_ptr + t, mask=t_in, other=-1)
    rid = tl.load(row_ids_ptr + t, mask=t_in, other=0).to(tl.int64)
    rows = tl.zeros([BLOCK_T, BLOCK_D], dtype=out_ptr.dtype.element_ty)
    known = sid < 0  # a negative source id is a zero row
    # One masked load per source: each row is read from its own source only, so data moves once.
    for s in tl.static_range(len(sources)):
        hit = (sid == s) & (rid >= 0) & (rid < source_rows[s])
        vals = tl.load(sources[s] + rid[:, None] * row_strides[s] + d[None, :],
                       mask=hit[:, None] & d_in[None, :], other=0)
        rows = tl.where(hit[:, None], vals, rows)
        known = known | hit
    # An out-of-range index that slipped past validation gives a NaN row, never an out-of-bounds
    # read.
    rows = tl.where(known[:, None], rows, nan_bits)
    tl.store(out_ptr + t[:, None].to(tl.int64) * width + d[None, :], rows,
             mask=t_in[:, None] & d_in[None, :])


@triton.jit
def _segment_sum_rows_kernel(rows_ptr, order_ptr, offsets_ptr, out_ptr, width,
                             ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < width
    begin = tl.load(offsets_ptr + r)
    end = tl.load(offsets_ptr + r + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
    for i in range(begin, end):  # ascending: the same order, so the same bits, on every backend
        src = tl.load(order_ptr + i)
        acc += tl.load(rows_ptr + src * width + d, mask=d_in, other=0).to(ACC_DTYPE)
    tl.store(out_ptr + r.to(tl.int64) * width + d, acc.to(out_ptr.dtype.element_ty), mask=d_in)


def gather_rows(sources: Sequence[torch.Tensor], source_ids: torch.Tensor,
                row_ids: torch.Tensor) -> torch.Tensor:
    """``[T, D]``: ``out[t] = sources[source_ids[t]][row_ids[t]]``, zero for a negative source
    id."""
    dtype = sources[0].dtype
    bits = _BITS[dtype]
    num_rows, width = source_ids.shape[0], sources[0].shape[1]
    out = torch.empty((num_rows, width), dtype=bits, device=sources[0].device)
    if num_rows > 0 and width > 0:
        block_d = row_block(width)
        block_t = rows_per_program(block_d)
        nan_bits = torch.tensor(float("nan"), dtype=dtype).view(bits).item()
        _gather_rows_kernel[(triton.cdiv(num_rows, block_t), triton.cdiv(width, block_d))](
            sources=tuple(s.view(bits) for s in sources),
            row_strides=tuple(s.stride(0) for s in sources),
            source_rows=tuple(s.shape[0] for s in sources), source_ids_ptr=source_ids.contiguous(),
            row_ids_ptr=row_ids.contiguous(), out_ptr=out, num_rows=num_rows, width=width,
            nan_bits=nan_bits, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=_GATHER_WARPS)
    return out.view(dtype)


def segment_sum_rows(rows: torch.Tensor, order: torch.Tensor,
                     offsets: torch.Tensor) -> torch.Tensor:
    """``[R, D]``: row r is the sum of ``rows[order[offsets[r]:offsets[r + 1]]]`` in that order."""
    rows = rows.contiguous()
    num_segments, width = offsets.shape[0] - 1, rows.shape[1]
    out = torch.empty((num_segments, width), dtype=rows.dtype, device=rows.device)
    if num_segments == 0 or width == 0:
        return out
    block_d = row_block(width)
    _segment_sum_rows_kernel[(num_segments, triton.cdiv(width, block_d))](
        rows_ptr=rows, order_ptr=order, offsets_ptr=offsets, out_ptr=out, width=width,
        ACC_DTYPE=accumulate_type(rows.dtype), BLOCK_D=block_d)
    return out
