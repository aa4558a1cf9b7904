"""Triton kernels of the packed-sequence family: the multi-source row gather and its deterministic
backward (a segment sum in a fixed order). Contracts: ``sphinx_kernels.varlen``."""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

# Elements of one row a program moves per step; rows per program fill a tile of about 4096 elements.
_MAX_BLOCK_D = 512
_TILE = 4096


# The gather moves bits, not numbers: every float dtype is viewed as the integer of its width, so the
# copy is exact by construction (and needs no bf16 arithmetic, which the interpreter gets wrong).
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


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
    # An out-of-range index that slipped past validation gives a NaN row, never an out-of-bounds read.
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


def _block_d(width: int) -> int:
    return min(triton.next_power_of_2(max(width, 1)), _MAX_BLOCK_D)


def gather_rows(sources: Sequence[torch.Tensor], source_ids: torch.Tensor,
                row_ids: torch.Tensor) -> torch.Tensor:
    dtype = sources[0].dtype
    bits = _BITS[dtype]
    num_rows, width = source_ids.shape[0], sources[0].shape[1]
    out = torch.empty((num_rows, width), dtype=bits, device=sources[0].device)
    if num_rows > 0 and width > 0:
        block_d = _block_d(width)
        block_t = max(1, _TILE // block_d)
        grid = (triton.cdiv(num_rows, block_t), triton.cdiv(width, block_d))
        nan_bits = torch.tensor(float("nan"), dtype=dtype).view(bits).item()
        _gather_rows_kernel[grid](tuple(s.view(bits) for s in sources),
                                  tuple(s.stride(0) for s in sources),
                                  tuple(s.shape[0] for s in sources), source_ids.contiguous(),
                                  row_ids.contiguous(), out, num_rows, width, nan_bits,
                                  BLOCK_T=block_t, BLOCK_D=block_d)
    return out.view(dtype)


def segment_sum_rows(rows: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    rows = rows.contiguous()
    num_segments, width = offsets.shape[0] - 1, rows.shape[1]
    out = torch.empty((num_segments, width), dtype=rows.dtype, device=rows.device)
    if num_segments == 0 or width == 0:
        return out
    block_d = _block_d(width)
    acc = tl.float64 if rows.dtype == torch.float64 else tl.float32
    _segment_sum_rows_kernel[(num_segments, triton.cdiv(width, block_d))](
        rows, order, offsets, out, width, ACC_DTYPE=acc, BLOCK_D=block_d)
    return out


@triton.jit
def _find_padding_tiles_kernel(images_ptr, pad_ptr, flags_ptr, channels, tiles_h, tiles_w,
                               tile_h, tile_w, stride_n, stride_c, stride_h, stride_w,
                               BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    tile = tl.program_id(0)
    j = tile % tiles_w
    i = (tile // tiles_w) % tiles_h
    n = (tile // (tiles_w * tiles_h)).to(tl.int64)
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_W)
    col_in = cols < tile_w
    base = (images_ptr + n * stride_n + (i * tile_h).to(tl.int64) * stride_h
            + (j * tile_w + cols).to(tl.int64)[None, :] * stride_w)
    mismatches = 0
    for c in range(channels):
        pad = tl.load(pad_ptr + c)
        for r0 in range(0, tile_h, BLOCK_R):
            r = r0 + rows
            inside = (r < tile_h)[:, None] & col_in[None, :]
            pixels = tl.load(base + c * stride_c + r.to(tl.int64)[:, None] * stride_h, mask=inside,
                             other=0).to(tl.float32)
            mismatches += tl.sum(tl.where(inside & (pixels != pad), 1, 0))
    tl.store(flags_ptr + tile, (mismatches == 0).to(tl.uint8))


def find_padding_tiles(images: torch.Tensor, pad: torch.Tensor, tile_h: int,
                       tile_w: int) -> torch.Tensor:
    num, channels, height, width = images.shape
    tiles_h, tiles_w = height // tile_h, width // tile_w
    flags = torch.empty((num, tiles_h, tiles_w), dtype=torch.uint8, device=images.device)
    if flags.numel() > 0:
        block_w = triton.next_power_of_2(tile_w)
        block_r = min(triton.next_power_of_2(tile_h), max(1, _TILE // block_w))
        _find_padding_tiles_kernel[(flags.numel(),)](
            images, pad, flags, channels, tiles_h, tiles_w, tile_h, tile_w, *images.stride(),
            BLOCK_R=block_r, BLOCK_W=block_w)
    return flags.view(torch.bool)
