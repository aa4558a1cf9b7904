"""Triton kernels of ``patch_projection``: the projection GEMM with the resampling of every encoder
fused into its loads, the LayerNorm epilogue that scatters rows into the packed sequence, and the
backward (LayerNorm, grad-weight and grad-features GEMMs reading and writing through the
resampling). Contract: ``sphinx_kernels.ops.patch_projection``.

Every encoder arrives here as a ``[V, C, H, W]`` view of its own storage (a token layout is viewed
that way without a copy) plus a ``[V, C]`` global row (the CLS token's view, or the map mean). The
virtual input row ``m = v * T + t`` (``T = 1 + gh * gw``) of the GEMM is the global row for
``t == 0`` and grid cell ``t - 1`` (raster order) otherwise; a cell reads the ``POOL_H x POOL_W``
window at ``((i // REPEAT_H) * POOL_H, (j // REPEAT_W) * POOL_W)`` and averages it in float32, so
pooling (``POOL > 1``) and nearest repetition (``REPEAT > 1``) are the same index arithmetic.
Resampled values are rounded to the input dtype before ``tl.dot`` (tensor cores take 16-bit
operands); every accumulation is float32 (float64 for the LayerNorm parameters' gradients, sums over
every row). No arithmetic is done in bf16, so the interpreter runs these kernels on CPU tensors in
float16 / float32.

What is fused and what is not:
  forward: resampling + concatenation + GEMM + bias in one kernel; LayerNorm + scatter to
      ``out_rows`` in a second (one pass over the pre-norm rows, which the backward needs anyway).
      Without a norm the GEMM scatters straight into ``out``. The map mean of an encoder without a
      CLS token is a torch reduction (one read of that map, ``[V, C]`` out).
  backward: LayerNorm backward (reads the output gradient at ``out_rows``) in one kernel, its
      weight/bias partial sums reduced by torch; grad-weight GEMM per encoder reading the resampled
      features; grad-features GEMM per encoder whose rows are the encoder's own pixels, its
      A-operand the transposed resampling of ``grad_y`` (pool: spread / factor, repeat: sum),
      stored through the feature's strides: no atomics, deterministic. The global rows' gradient
      (``[V, D] x [D, C]``: the CLS gradient, or spread / (H * W) over a mean's pixels in the
      grad-features epilogue) and the bias gradient (a column sum) are torch ops; without a norm and
      with ``out_rows`` the gradient rows are gathered by torch first.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from sphinx_kernels.ops.patch_projection import FeatureLayout, feature_layouts
from sphinx_kernels.platforms import triton_interpreted
from sphinx_kernels.triton.common import (
    block_of,
    contiguous,
    dot_precision,
    rows_per_program,
    swizzled_tile,
)

# Row tiles of the projection GEMM that share each weight column tile while it is in L2.
GROUP_M = 8


def _gemm_blocks(m: int, n: int, k: int, dtype: torch.dtype,
                 max_block_k: int = 64) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of a GEMM over an ``[m, n]`` output with
    depth ``k`` in ``dtype``, each block shrunk to its size (at least 16 for ``tl.dot``).

    The interpreter's cost is per program: the largest blocks, 1 stage. On a GPU (checked by
    ``python -m sphinx_kernels.aot``, docs/launchability.md, for sm_90 and sm_80): 16-bit operands
    take 128x128 tiles, K blocks of at most ``max_block_k``, 8 warps and 3 stages; the callers
    halve the K block where the resampled operand costs more (every load of a pooling window is
    buffered per stage). float32 (IEEE products on the FMA units, operands in registers) takes
    64x64x32 tiles and 2 stages: its 128x128x64 tiles needed 229376 B of shared memory (425984 B
    pooled), over an A100's and, pooled, an H100's."""
    def fit(size: int, cap: int) -> int:
        return max(16, min(cap, block_of(size)))
    if triton_interpreted():
        return fit(m, 128), fit(n, 128), fit(k, 64), 4, 1
    if dtype == torch.float32:
        return fit(m, 64), fit(n, 64), fit(k, 32), 8, 2
    return fit(m, 128), fit(n, 128), fit(k, max_block_k), 8, 3


@triton.jit
def _resampled_tile(map_ptr, glob_ptr, m, c, num_rows, channels, tokens_per_view, grid_w,
                    s_v, s_c, s_h, s_w, g_v, g_c, POOL_H: tl.constexpr, POOL_W: tl.constexpr,
                    REPEAT_H: tl.constexpr, REPEAT_W: tl.constexpr):
    """float32 values of virtual input rows ``m`` and channels ``c`` of one encoder (0 outside the
    valid block), for 2-D index arrays ``m`` and ``c`` that broadcast against each other."""
    v = (m // tokens_per_view).to(tl.int64)
    t = m % tokens_per_view
    inside = (m < num_rows) & (c < channels)
    is_glob = t == 0
    cell = tl.maximum(t - 1, 0)
    y0 = (cell // grid_w // REPEAT_H) * POOL_H
    x0 = (cell % grid_w // REPEAT_W) * POOL_W
    base = (map_ptr + v * s_v + y0.to(tl.int64) * s_h + x0.to(tl.int64) * s_w
            + c.to(tl.int64) * s_c)
    patch = inside & ~is_glob
    acc = tl.zeros(patch.shape, dtype=tl.float32)
    for dy in tl.static_range(POOL_H):
        for dx in tl.static_range(POOL_W):
            acc += tl.load(base + (dy * s_h + dx * s_w), mask=patch, other=0).to(tl.float32)
    if POOL_H * POOL_W > 1:
        acc = acc * (1.0 / (POOL_H * POOL_W))
    glob = tl.load(glob_ptr + v * g_v + c.to(tl.int64) * g_c, mask=inside & is_glob,
                   other=0).to(tl.float32)
    return tl.where(is_glob, glob, acc)


@triton.jit
def _resampled_rows(map_ptr, glob_ptr, m, c, num_rows, channels, tokens_per_view, grid_w,
                    s_v, s_c, s_h, s_w, g_v, g_c, POOL_H: tl.constexpr, POOL_W: tl.constexpr,
                    REPEAT_H: tl.constexpr, REPEAT_W: tl.constexpr, ROWS_FASTEST: tl.constexpr):
    """float32 ``[BLOCK_M, BLOCK_C]``: rows ``m`` ``[BLOCK_M]``, channels ``c`` ``[BLOCK_C]``.

    A 2-D load's threads run along its last axis. Tokens (and channels-last maps) hold channels
    contiguously: the tile is loaded as ``[M, C]``. A ``[V, C, H, W]`` map holds a row of pixels
    contiguously (``ROWS_FASTEST``): the tile is loaded as ``[C, M]``, neighbouring threads reading
    neighbouring cells, and transposed in registers."""
    if ROWS_FASTEST:
        return tl.trans(_resampled_tile(map_ptr, glob_ptr, m[None, :], c[:, None], num_rows,
                                        channels, tokens_per_view, grid_w, s_v, s_c, s_h, s_w,
                                        g_v, g_c, POOL_H, POOL_W, REPEAT_H, REPEAT_W))
    return _resampled_tile(map_ptr, glob_ptr, m[:, None], c[None, :], num_rows, channels,
                           tokens_per_view, grid_w, s_v, s_c, s_h, s_w, g_v, g_c, POOL_H, POOL_W,
                           REPEAT_H, REPEAT_W)


@triton.jit
def _destination(rows_ptr, m, m_in, out_rows, HAS_ROWS: tl.constexpr):
    """int64 rows of the output that rows ``m`` go to (``out_rows[m]``, or ``m`` itself), and which
    are inside the ``out_rows`` rows of the output: an index that reached the kernel unchecked (a
    GPU without SPHINX_KERNELS_CHECK_INPUTS) is dropped, never written out of bounds."""
    if HAS_ROWS:
        dest = tl.load(rows_ptr + m, mask=m_in, other=0).to(tl.int64)
    else:
        dest = m.to(tl.int64)
    return dest, m_in & (dest >= 0) & (dest < out_rows)


@triton.jit
def _patch_projection_kernel(maps, globs, map_strides, glob_strides, channels,
                             FACTORS: tl.constexpr, weight_ptr, w_sn, w_sk, bias_ptr, out_ptr,
                             out_stride, out_rows, rows_ptr, num_rows, width, tokens_per_view,
                             grid_w,
                             HAS_BIAS: tl.constexpr, HAS_ROWS: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    m0, n0 = swizzled_tile(num_rows, width, BLOCK_M, BLOCK_N, GROUP_M)
    m = m0 + tl.arange(0, BLOCK_M)
    n = n0 + tl.arange(0, BLOCK_N)
    n_in = n < width
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_base = 0
    # The multi-input K loop: encoder 0's channels, then encoder 1's, ... (the virtual
    # concatenation).
    for e in tl.static_range(len(maps)):
        ms = map_strides[e]
        gs = glob_strides[e]
        for c0 in range(0, channels[e], BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)
            a = _resampled_rows(maps[e], globs[e], m, c, num_rows, channels[e], tokens_per_view,
                                grid_w, ms[0], ms[1], ms[2], ms[3], gs[0], gs[1],
                                FACTORS[e][0], FACTORS[e][1], FACTORS[e][2], FACTORS[e][3],
                                FACTORS[e][4])
            b = tl.load(weight_ptr + n.to(tl.int64)[None, :] * w_sn
                        + (k_base + c).to(tl.int64)[:, None] * w_sk,
                        mask=(c < channels[e])[:, None] & n_in[None, :], other=0)
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
        k_base += channels[e]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_in, other=0).to(tl.float32)[None, :]
    dest, dest_in = _destination(rows_ptr, m, m < num_rows, out_rows, HAS_ROWS)
    tl.store(out_ptr + dest[:, None] * out_stride + n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=dest_in[:, None] & n_in[None, :])


@triton.jit
def _layer_norm_kernel(y_ptr, w_ptr, b_ptr, out_ptr, out_stride, out_rows, rows_ptr, mean_ptr,
                       rstd_ptr, num_rows, width, eps, HAS_BIAS: tl.constexpr,
                       HAS_ROWS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    m_in = m < num_rows
    d_in = d < width
    inside = m_in[:, None] & d_in[None, :]
    x = tl.load(y_ptr + m.to(tl.int64)[:, None] * width + d[None, :], mask=inside,
                other=0).to(tl.float32)
    mean = tl.sum(x, axis=1) / width
    centred = tl.where(inside, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / width + eps)
    out = centred * rstd[:, None] * tl.load(w_ptr + d, mask=d_in, other=0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + d, mask=d_in, other=0).to(tl.float32)[None, :]
    dest, dest_in = _destination(rows_ptr, m, m_in, out_rows, HAS_ROWS)
    tl.store(out_ptr + dest[:, None] * out_stride + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=dest_in[:, None] & d_in[None, :])
    tl.store(mean_ptr + m, mean, mask=m_in)
    tl.store(rstd_ptr + m, rstd, mask=m_in)


@triton.jit
def _layer_norm_backward_kernel(grad_ptr, grad_stride, grad_rows, rows_ptr, y_ptr, w_ptr, mean_ptr,
                                rstd_ptr, dy_ptr, dw_part_ptr, db_part_ptr, num_rows, width,
                                rows_per_program, HAS_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    d_in = d < width
    w = tl.load(w_ptr + d, mask=d_in, other=0).to(tl.float32)
    # The norm parameters' gradients sum M rows: float64 partial sums (M * D adds, negligible next
    # to the GEMMs) make them correctly rounded rather than a few ulp off.
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float64)
    db_acc = tl.zeros([BLOCK_D], dtype=tl.float64)
    first = pid * rows_per_program
    for r in range(first, tl.minimum(first + rows_per_program, num_rows)):
        row = tl.cast(r, tl.int64)  # 64-bit offsets: a packed sequence may pass 2^31 elements
        if HAS_ROWS:  # (an out-of-range row, unchecked on a GPU, reads a zero gradient)
            src = tl.load(rows_ptr + row).to(tl.int64)
        else:
            src = row
        g = tl.load(grad_ptr + src * grad_stride + d, mask=d_in & (src >= 0) & (src < grad_rows),
                    other=0).to(tl.float32)
        x = tl.load(y_ptr + row * width + d, mask=d_in, other=0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r)
        xhat = tl.where(d_in, (x - tl.load(mean_ptr + r)) * rstd, 0.0)
        wg = w * g
        c1 = tl.sum(xhat * wg, axis=0) / width
        c2 = tl.sum(wg, axis=0) / width
        dx = (wg - (xhat * c1 + c2)) * rstd
        tl.store(dy_ptr + row * width + d, dx.to(dy_ptr.dtype.element_ty), mask=d_in)
        dw_acc += (g * xhat).to(tl.float64)
        db_acc += g.to(tl.float64)
    tl.store(dw_part_ptr + pid * width + d, dw_acc, mask=d_in)
    tl.store(db_part_ptr + pid * width + d, db_acc, mask=d_in)


@triton.jit
def _grad_weight_kernel(dy_ptr, map_ptr, glob_ptr, s_v, s_c, s_h, s_w, g_v, g_c, channels,
                        num_rows, width, tokens_per_view, grid_w, dw_ptr, dw_sn, dw_sk, k_base,
                        POOL_H: tl.constexpr, POOL_W: tl.constexpr, REPEAT_H: tl.constexpr,
                        REPEAT_W: tl.constexpr, ROWS_FASTEST: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """``dW[:, k_base:k_base + C] = grad_y^T @ X_e``: the K loop walks the output rows, reading the
    encoder's resampled features exactly as the forward does."""
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d_in = d < width
    acc = tl.zeros([BLOCK_D, BLOCK_C], dtype=tl.float32)
    for m0 in range(0, num_rows, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        a = tl.load(dy_ptr + m.to(tl.int64)[None, :] * width + d[:, None],
                    mask=d_in[:, None] & (m < num_rows)[None, :], other=0)
        b = _resampled_rows(map_ptr, glob_ptr, m, c, num_rows, channels, tokens_per_view, grid_w,
                            s_v, s_c, s_h, s_w, g_v, g_c, POOL_H, POOL_W, REPEAT_H, REPEAT_W,
                            ROWS_FASTEST)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(dw_ptr + d.to(tl.int64)[:, None] * dw_sn + (k_base + c).to(tl.int64)[None, :] * dw_sk,
             acc.to(dw_ptr.dtype.element_ty), mask=d_in[:, None] & (c < channels)[None, :])


@triton.jit
def _grad_features_kernel(dy_ptr, weight_ptr, w_sn, w_sk, k_base, gmap_ptr, gs_v, gs_c, gs_h, gs_w,
                          glob_grad_ptr, num_views, height, src_w, channels, width,
                          tokens_per_view, grid_w, inv_area, MEAN: tl.constexpr,
                          POOL_H: tl.constexpr, POOL_W: tl.constexpr, REPEAT_H: tl.constexpr,
                          REPEAT_W: tl.constexpr, PIXELS_FASTEST: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """One encoder's gradient at its ``V * H * W`` pixels: the product of each pixel's
    transposed-resampled ``grad_y`` row and ``W_e``, plus (``MEAN``: the global row was the mean of
    the pixels) ``inv_area`` times its view's global-row gradient ``[V, C]``; stored through the
    feature's strides."""
    area = height * src_w
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_in = r < num_views * area
    c_in = c < channels
    v = (r // area).to(tl.int64)
    p = r % area
    y = p // src_w
    x = p % src_w
    # The grid cells whose value this pixel feeds: its pooling window's cell, or its REPEAT_H x
    # REPEAT_W nearest-repeated cells.
    first_row = v * tokens_per_view + 1 + (
        (y // POOL_H) * REPEAT_H * grid_w + (x // POOL_W) * REPEAT_W).to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for d0 in range(0, width, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        inside = r_in[:, None] & (d < width)[None, :]
        spread = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for di in tl.static_range(REPEAT_H):
            for dj in tl.static_range(REPEAT_W):
                row = first_row + (di * grid_w + dj)
                spread += tl.load(dy_ptr + row[:, None] * width + d[None, :], mask=inside,
                                  other=0).to(tl.float32)
        if POOL_H * POOL_W > 1:
            spread = spread * (1.0 / (POOL_H * POOL_W))
        b = tl.load(weight_ptr + d.to(tl.int64)[:, None] * w_sn
                    + (k_base + c).to(tl.int64)[None, :] * w_sk,
                    mask=(d < width)[:, None] & c_in[None, :], other=0)
        acc = tl.dot(spread.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    if MEAN:
        acc += tl.load(glob_grad_ptr + v[:, None] * channels + c[None, :],
                       mask=r_in[:, None] & c_in[None, :], other=0).to(tl.float32) * inv_area
    value = acc.to(gmap_ptr.dtype.element_ty)
    pixel_off = v * gs_v + y.to(tl.int64) * gs_h + x.to(tl.int64) * gs_w
    c_off = c.to(tl.int64) * gs_c
    if PIXELS_FASTEST:  # a [V, C, H, W] gradient: store as [C, pixels], threads along pixels
        tl.store(gmap_ptr + pixel_off[None, :] + c_off[:, None], tl.trans(value),
                 mask=c_in[:, None] & r_in[None, :])
    else:
        tl.store(gmap_ptr + pixel_off[:, None] + c_off[None, :], value,
                 mask=r_in[:, None] & c_in[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers. ``maps``: the encoders' [V, C, H, W] views; ``globs``: their [V, C] global rows;
# ``factors``: (POOL_H, POOL_W, REPEAT_H, REPEAT_W) per encoder.


def _rows_fastest(map_: torch.Tensor) -> bool:
    """Whether a ``[V, C, H, W]`` view is best read with threads along pixels (channels not
    contiguous, as in a conv map) rather than along channels (tokens, channels-last maps)."""
    return map_.stride(1) != 1


def _project(maps: Sequence[torch.Tensor], globs: Sequence[torch.Tensor],
             factors: Sequence[tuple[int, int, int, int]], weight: torch.Tensor,
             bias: torch.Tensor | None, out: torch.Tensor, rows: torch.Tensor | None,
             grid_w: int, tokens_per_view: int) -> None:
    """Writes ``concat(resampled) @ weight.T + bias`` into ``out[rows]`` (``out[:M]`` without
    rows)."""
    num_rows = maps[0].shape[0] * tokens_per_view
    width = weight.shape[0]
    if num_rows == 0 or width == 0:
        return
    # A pooled encoder's 2x2 window is four loads per step, each buffered per stage: K blocks of
    # 32 keep the 16-bit tiles within sm_90's and sm_80's shared memory (64 needed 245760 B).
    pooled = any(f[0] * f[1] > 1 for f in factors)
    block_m, block_n, block_k, warps, stages = _gemm_blocks(
        num_rows, width, max(m.shape[1] for m in maps), weight.dtype, 32 if pooled else 64)
    _patch_projection_kernel[(triton.cdiv(num_rows, block_m) * triton.cdiv(width, block_n),)](
        maps=tuple(maps), globs=tuple(globs), map_strides=tuple(tuple(m.stride()) for m in maps),
        glob_strides=tuple(tuple(g.stride()) for g in globs),
        channels=tuple(m.shape[1] for m in maps),
        FACTORS=tuple((*f, _rows_fastest(m)) for f, m in zip(factors, maps)), weight_ptr=weight,
        w_sn=weight.stride(0), w_sk=weight.stride(1),
        bias_ptr=bias if bias is not None else weight, out_ptr=out, out_stride=out.stride(0),
        out_rows=out.shape[0], rows_ptr=rows if rows is not None else out, num_rows=num_rows,
        width=width,
        tokens_per_view=tokens_per_view, grid_w=grid_w, HAS_BIAS=bias is not None,
        HAS_ROWS=rows is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=GROUP_M, DOT_PRECISION=dot_precision(weight.dtype), num_warps=warps,
        num_stages=stages)


def _norm_blocks(width: int) -> tuple[int, int]:
    """(BLOCK_D, rows per program) of the LayerNorm kernels: one row per program on a GPU, a tile of
    rows under the interpreter (whose cost is per program)."""
    block_d = block_of(width)
    return block_d, rows_per_program(block_d) if triton_interpreted() else 1


def _layer_norm(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                out: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of the ``[M, D]`` rows of ``y`` into ``out[rows]``; returns float32 mean and
    rstd."""
    num_rows, width = y.shape
    mean = torch.empty(num_rows, dtype=torch.float32, device=y.device)
    rstd = torch.empty_like(mean)
    if num_rows > 0:
        block_d, per_program = _norm_blocks(width)
        _layer_norm_kernel[(triton.cdiv(num_rows, per_program),)](
            y_ptr=y, w_ptr=weight, b_ptr=bias if bias is not None else weight, out_ptr=out,
            out_stride=out.stride(0), out_rows=out.shape[0],
            rows_ptr=rows if rows is not None else y, mean_ptr=mean,
            rstd_ptr=rstd, num_rows=num_rows, width=width, eps=eps, HAS_BIAS=bias is not None,
            HAS_ROWS=rows is not None, ROWS=per_program, BLOCK_D=block_d,
            num_warps=8 if block_d >= 2048 else 4)
    return mean, rstd


def _layer_norm_backward(grad: torch.Tensor, rows: torch.Tensor | None, y: torch.Tensor,
                         weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad of the pre-norm rows ``[M, D]`` in y's dtype, float64 grads of the norm weight and
    bias)."""
    num_rows, width = y.shape
    dy = torch.empty_like(y)
    programs = max(1, min(num_rows, 4 * _multiprocessors(y.device)))
    dw_part = torch.zeros((programs, width), dtype=torch.float64, device=y.device)
    db_part = torch.zeros_like(dw_part)
    if num_rows > 0:
        block_d, _ = _norm_blocks(width)
        _layer_norm_backward_kernel[(programs,)](
            grad_ptr=grad, grad_stride=grad.stride(0), grad_rows=grad.shape[0],
            rows_ptr=rows if rows is not None else grad,
            y_ptr=y, w_ptr=weight, mean_ptr=mean, rstd_ptr=rstd, dy_ptr=dy, dw_part_ptr=dw_part,
            db_part_ptr=db_part, num_rows=num_rows, width=width,
            rows_per_program=triton.cdiv(num_rows, programs), HAS_ROWS=rows is not None,
            BLOCK_D=block_d, num_warps=8 if block_d >= 2048 else 4)
    return dy, dw_part.sum(0), db_part.sum(0)


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _grad_weight(dy: torch.Tensor, map_: torch.Tensor, glob: torch.Tensor,
                 factors: tuple[int, int, int, int], grid_w: int, tokens_per_view: int,
                 dw: torch.Tensor, k_base: int) -> None:
    """Writes ``dy^T @ resampled(map_, glob)`` into ``dw[:, k_base:k_base + C]``."""
    num_rows, width = dy.shape
    channels = map_.shape[1]
    # The K loop runs over rows, the resampled features being its B operand: blocks of 32 rows (at
    # 64, 16-bit NCHW maps spill on sm_80, and pooled ones exceed its shared memory).
    block_d, block_c, block_m, warps, stages = _gemm_blocks(width, channels, num_rows, dy.dtype,
                                                            32)
    if num_rows == 0:
        dw[:, k_base:k_base + channels] = 0
        return
    s_v, s_c, s_h, s_w = map_.stride()
    g_v, g_c = glob.stride()
    pool_h, pool_w, repeat_h, repeat_w = factors
    _grad_weight_kernel[(triton.cdiv(width, block_d), triton.cdiv(channels, block_c))](
        dy_ptr=dy, map_ptr=map_, glob_ptr=glob, s_v=s_v, s_c=s_c, s_h=s_h, s_w=s_w, g_v=g_v,
        g_c=g_c, channels=channels, num_rows=num_rows, width=width,
        tokens_per_view=tokens_per_view, grid_w=grid_w, dw_ptr=dw, dw_sn=dw.stride(0),
        dw_sk=dw.stride(1), k_base=k_base, POOL_H=pool_h, POOL_W=pool_w, REPEAT_H=repeat_h,
        REPEAT_W=repeat_w, ROWS_FASTEST=_rows_fastest(map_), BLOCK_D=block_d, BLOCK_C=block_c,
        BLOCK_M=block_m, DOT_PRECISION=dot_precision(dy.dtype), num_warps=warps,
        num_stages=stages)


def _grad_features(dy: torch.Tensor, weight: torch.Tensor, k_base: int, grad_map: torch.Tensor,
                   grad_cls: torch.Tensor | None, factors: tuple[int, int, int, int], grid_w: int,
                   tokens_per_view: int) -> None:
    """Writes one encoder's gradient through its views: ``grad_map`` ``[V, C, H, W]`` and, for an
    encoder with a CLS token, ``grad_cls`` ``[V, C]``.

    The global rows' gradient ``grad_y[global rows] @ W_e`` is a small ``[V, D] x [D, C]`` torch
    matmul: it is the CLS gradient, or, spread over the pixels of a mean, a term the kernel adds in
    its epilogue (kept out of the K loop, where it would add a load per step and a rounding)."""
    num_views, channels, height, src_w = grad_map.shape
    width = dy.shape[1]
    glob_grad = (dy.view(num_views, tokens_per_view, width)[:, 0, :]
                 @ weight[:, k_base:k_base + channels])
    if grad_cls is not None:
        grad_cls.copy_(glob_grad)
    pixels = num_views * height * src_w
    if pixels == 0:
        return
    pool_h, pool_w, repeat_h, repeat_w = factors
    # A repeated encoder's pixel sums a REPEAT_H x REPEAT_W window of grad_y rows per step, each
    # load buffered per stage: K blocks of 32 (at 64, 163840 B of shared memory, 3 KB under
    # sm_80's).
    block_r, block_c, block_d, warps, stages = _gemm_blocks(
        pixels, channels, width, dy.dtype, 32 if repeat_h * repeat_w > 1 else 64)
    gs_v, gs_c, gs_h, gs_w = grad_map.stride()
    _grad_features_kernel[(triton.cdiv(pixels, block_r), triton.cdiv(channels, block_c))](
        dy_ptr=dy, weight_ptr=weight, w_sn=weight.stride(0), w_sk=weight.stride(1),
        k_base=k_base, gmap_ptr=grad_map, gs_v=gs_v, gs_c=gs_c, gs_h=gs_h, gs_w=gs_w,
        glob_grad_ptr=glob_grad.contiguous(), num_views=num_views, height=height, src_w=src_w,
        channels=channels, width=width, tokens_per_view=tokens_per_view, grid_w=grid_w,
        inv_area=1.0 / (height * src_w), MEAN=grad_cls is None, POOL_H=pool_h, POOL_W=pool_w,
        REPEAT_H=repeat_h, REPEAT_W=repeat_w, PIXELS_FASTEST=_rows_fastest(grad_map),
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(dy.dtype), num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------------------------
# The op's forward and backward: the launchers above, encoder by encoder.


def _global_rows(features: Sequence[torch.Tensor],
                 layouts: Sequence[FeatureLayout]) -> list[torch.Tensor]:
    """Each encoder's ``[V, C]`` global rows: its CLS view, else the mean of its grid (rounded once
    to the features' dtype, as the reference's mean)."""
    return [layout.cls_view(f) if layout.global_tokens else
            torch.mean(layout.map_view(f), dim=(2, 3), dtype=torch.float32).to(f.dtype)
            for f, layout in zip(features, layouts)]


def patch_projection_forward(features, weight, bias, norm_weight, norm_bias, out, out_rows, grid_h,
                             grid_w, eps):
    """``(result, pre-norm rows [M, D] or [0, D], float32 mean and rstd [M] or [0])``."""
    bias, norm_weight, norm_bias, out_rows = contiguous(bias, norm_weight, norm_bias, out_rows)
    layouts = feature_layouts(features, (grid_h, grid_w))
    tokens_per_view = 1 + grid_h * grid_w
    num_rows, width = features[0].shape[0] * tokens_per_view, weight.shape[0]
    if out is not None:
        result = torch.empty_like(out, memory_format=torch.contiguous_format).copy_(out)
    else:
        result = weight.new_empty((num_rows, width))
    maps = [layout.map_view(f) for f, layout in zip(features, layouts)]
    globs = _global_rows(features, layouts)
    factors = [layout.factors for layout in layouts]
    if norm_weight is None:
        _project(maps, globs, factors, weight, bias, result, out_rows, grid_w, tokens_per_view)
        empty = weight.new_empty((0,), dtype=torch.float32)
        return result, weight.new_empty((0, width)), empty, empty.clone()
    pre_norm = weight.new_empty((num_rows, width))
    _project(maps, globs, factors, weight, bias, pre_norm, None, grid_w, tokens_per_view)
    mean, rstd = _layer_norm(pre_norm, norm_weight, norm_bias, eps, result, out_rows)
    return result, pre_norm, mean, rstd


def patch_projection_backward(grad, features, weight, bias, norm_weight, norm_bias, out_rows,
                              pre_norm, mean, rstd, grid_h, grid_w, eps, needs):
    """The gradients of the inputs flagged in ``needs`` (per feature, then weight, bias, norm
    weight, norm bias), in that order."""
    norm_weight, out_rows = contiguous(norm_weight, out_rows)
    layouts = feature_layouts(features, (grid_h, grid_w))
    tokens_per_view = 1 + grid_h * grid_w
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    norm_grads = []
    if norm_weight is not None:
        dy, grad_norm_weight, grad_norm_bias = _layer_norm_backward(grad, out_rows, pre_norm,
                                                                    norm_weight, mean, rstd)
        norm_grads = [grad_norm_weight.to(norm_weight.dtype),
                      None if norm_bias is None else grad_norm_bias.to(norm_weight.dtype)]
    else:
        dy = (grad if out_rows is None else grad.index_select(0, out_rows)).contiguous()
    grads = []
    k_base = 0
    for feature, layout, need in zip(features, layouts, needs):
        if need:
            grad_feature = torch.empty(feature.shape, dtype=feature.dtype, device=feature.device)
            _grad_features(dy, weight, k_base, layout.map_view(grad_feature),
                           layout.cls_view(grad_feature), layout.factors, grid_w, tokens_per_view)
            grads.append(grad_feature)
        k_base += layout.channels
    need_weight, need_bias, need_norm_weight, need_norm_bias = needs[len(features):]
    if need_weight:
        grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
        k_base = 0
        for feature, layout, glob in zip(features, layouts, _global_rows(features, layouts)):
            _grad_weight(dy, layout.map_view(feature), glob, layout.factors, grid_w,
                         tokens_per_view, grad_weight, k_base)
            k_base += layout.channels
        grads.append(grad_weight)
    if need_bias:
        grads.append(dy.sum(0, dtype=torch.float64).to(bias.dtype))
    if need_norm_weight:
        grads.append(norm_grads[0])
    if need_norm_bias:
        grads.append(norm_grads[1])
    return grads
