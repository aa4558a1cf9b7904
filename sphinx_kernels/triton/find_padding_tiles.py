"""Triton kernel of ``find_padding_tiles``: one program per tile compares every pixel of every
channel with the pad. Contract: ``sphinx_kernels.ops.find_padding_tiles``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sphinx_kernels.triton.common import block_of, rows_per_program


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
    """bool ``[N, H // tile_h, W // tile_w]`` for ``[N, C, H, W]`` images and a float32 ``[C]``
    pad."""
    num, channels, height, width = images.shape
    tiles_h, tiles_w = height // tile_h, width // tile_w
    flags = torch.empty((num, tiles_h, tiles_w), dtype=torch.uint8, device=images.device)
    if flags.numel() > 0:
        block_w = block_of(tile_w)
        stride_n, stride_c, stride_h, stride_w = images.stride()
        _find_padding_tiles_kernel[(flags.numel(),)](
            images_ptr=images, pad_ptr=pad.contiguous(), flags_ptr=flags, channels=channels,
            tiles_h=tiles_h, tiles_w=tiles_w, tile_h=tile_h, tile_w=tile_w, stride_n=stride_n,
            stride_c=stride_c, stride_h=stride_h, stride_w=stride_w,
            BLOCK_R=min(block_of(tile_h), rows_per_program(block_w)), BLOCK_W=block_w)
    return flags.view(torch.bool)
