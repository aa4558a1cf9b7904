"""Triton kernels of the packed-sequence family: the multi-source row gather and its deterministic
backward (a segment sum in a fixed order), the padding-tile detector, and varlen flash attention
(forward, and a backward without atomics). Contracts: ``sphinx_kernels.varlen``."""
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


# ---------------------------------------------------------------------------------------------------
# varlen_attention: flash attention over packed sequences (forward, and a backward without atomics).
#
# Mask, per sequence b with Lq queries, Lk keys and prefix P (0 without prefix_lens): query i sits at
# key position p = i + Lk - Lq (bottom-right alignment) and sees keys j < kv_end(i), where
#     causal:      kv_end = min(Lk, max(p + 1, P)) if p >= 0 else 0
#     non-causal:  kv_end = Lk
# Every visible set is a prefix of the keys and kv_end is non-decreasing in i, which is what lets the
# forward and dQ loops stop at a block's last row's kv_end and the dK/dV loop start at the first query
# that sees its first key.

_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _seq_bounds(cu_ptr, b, total):
    """Start and length of sequence b, clamped into [0, total]: a kernel stays in bounds even on
    cu_seqlens that reached it unchecked (a GPU without SPHINX_KERNELS_CHECK_INPUTS)."""
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1), 0), total)
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + b), 0), end)
    return start, end - start


@triton.jit
def _tile_sequence(tiles_ptr, cu_q_ptr, cu_k_ptr, prefix_ptr, seq, total_q, total_k,
                   HAS_PREFIX: tl.constexpr):
    """This program's block of sequence ``seq`` (from the tile table), the sequence's query and key
    bounds, and its prefix length (0 without prefixes)."""
    block = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1)
    q_start, len_q = _seq_bounds(cu_q_ptr, seq, total_q)
    k_start, len_k = _seq_bounds(cu_k_ptr, seq, total_k)
    prefix = tl.load(prefix_ptr + seq) if HAS_PREFIX else 0
    return block, q_start, len_q, k_start, len_k, prefix


@triton.jit
def _kv_end(rows, len_q, len_k, prefix, CAUSAL: tl.constexpr):
    if CAUSAL:
        pos = rows + (len_k - len_q)
        end = tl.where(pos >= 0, tl.minimum(tl.maximum(pos + 1, prefix), len_k), 0)
    else:
        end = tl.zeros_like(rows) + len_k
    return end


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, prefix_ptr, tiles_ptr,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     total_q, total_k, num_seqs, head_dim, scale_log2,
                     GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    seq = tl.load(tiles_ptr + 2 * tl.program_id(0))
    if seq >= num_seqs:  # the tile table has a static size; the tiles past the real count are idle
        return
    block, q_start, len_q, k_start, len_k, prefix = _tile_sequence(
        tiles_ptr, cu_q_ptr, cu_k_ptr, prefix_ptr, seq, total_q, total_k, HAS_PREFIX)
    head = tl.program_id(1)
    kv_head = head // GROUP

    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    row_in = rows < len_q
    d_in = d < head_dim
    q = tl.load(q_ptr + (q_start + rows).to(tl.int64)[:, None] * stride_qt + head * stride_qh
                + d[None, :], mask=row_in[:, None] & d_in[None, :], other=0)
    kv_end = _kv_end(rows, len_q, len_k, prefix, CAUSAL)
    hi = tl.max(tl.where(row_in, kv_end, 0), axis=0)

    k_base = k_ptr + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = v_ptr + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max, in log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, hi, BLOCK_N):
        n = start + cols
        kv_mask = (n < len_k)[:, None] & d_in[None, :]
        k = tl.load(k_base + n.to(tl.int64)[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(n[None, :] < kv_end[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing visible yet keeps max -inf; exponentiate against 0 there, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n.to(tl.int64)[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # A row that sees no key (Lk = 0, or above the diagonal of a sequence with Lq > Lk): output 0,
    # lse -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    m_safe = tl.where(empty, 0.0, m_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_safe + tl.log2(l_safe)) * _LN2)
    out_rows = (q_start + rows).to(tl.int64)
    # out is a fresh contiguous [Tq, Hq, D]
    tl.store(out_ptr + out_rows[:, None] * (tl.num_programs(1) * head_dim) + head * head_dim
             + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & d_in[None, :])
    tl.store(lse_ptr + head.to(tl.int64) * total_q + out_rows, lse, mask=row_in)


@triton.jit
def _attn_bwd_delta_kernel(out_ptr, grad_ptr, delta_ptr, stride_ot, stride_oh, stride_gt, stride_gh,
                           total_q, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in float32 (padding rows: O = 0, so 0)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    mask = (rows < total_q)[:, None] & (d < head_dim)[None, :]
    rows64 = rows.to(tl.int64)
    o = tl.load(out_ptr + rows64[:, None] * stride_ot + head * stride_oh + d[None, :], mask=mask,
                other=0).to(tl.float32)
    g = tl.load(grad_ptr + rows64[:, None] * stride_gt + head * stride_gh + d[None, :], mask=mask,
                other=0).to(tl.float32)
    tl.store(delta_ptr + head.to(tl.int64) * total_q + rows64, tl.sum(o * g, axis=1),
             mask=rows < total_q)


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, grad_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          cu_q_ptr, cu_k_ptr, prefix_ptr, tiles_ptr,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_gt, stride_gh, total_q, total_k, num_seqs, head_dim, scale,
                          scale_log2, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                          HAS_PREFIX: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK, dV of one key block of one kv head: loops over the query heads of its GQA group and the
    query blocks that see it, accumulating in registers (no atomics: deterministic)."""
    seq = tl.load(tiles_ptr + 2 * tl.program_id(0))
    if seq >= num_seqs:
        return
    block, q_start, len_q, k_start, len_k, prefix = _tile_sequence(
        tiles_ptr, cu_q_ptr, cu_k_ptr, prefix_ptr, seq, total_q, total_k, HAS_PREFIX)
    kv_head = tl.program_id(1)

    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in_block = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_in = d < head_dim
    kv_mask = (keys < len_k)[:, None] & d_in[None, :]
    keys64 = (k_start + keys).to(tl.int64)
    k = tl.load(k_ptr + keys64[:, None] * stride_kt + kv_head * stride_kh + d[None, :], mask=kv_mask,
                other=0)
    v = tl.load(v_ptr + keys64[:, None] * stride_vt + kv_head * stride_vh + d[None, :], mask=kv_mask,
                other=0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # The first query that sees key block[0] (see the mask above); every later query sees it too.
    first = 0
    if CAUSAL:
        shift = len_k - len_q
        first = tl.maximum(tl.where(block * BLOCK_N < prefix, -shift, block * BLOCK_N - shift), 0)
        first = first // BLOCK_M * BLOCK_M
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for start in range(first, len_q, BLOCK_M):
            rows = start + rows_in_block
            row_in = rows < len_q
            rows64 = (q_start + rows).to(tl.int64)
            mask = row_in[:, None] & d_in[None, :]
            q = tl.load(q_ptr + rows64[:, None] * stride_qt + head * stride_qh + d[None, :],
                        mask=mask, other=0)
            do = tl.load(grad_ptr + rows64[:, None] * stride_gt + head * stride_gh + d[None, :],
                         mask=mask, other=0)
            lse = tl.load(lse_ptr + head.to(tl.int64) * total_q + rows64, mask=row_in, other=0)
            delta = tl.load(delta_ptr + head.to(tl.int64) * total_q + rows64, mask=row_in, other=0)
            kv_end = _kv_end(rows, len_q, len_k, prefix, CAUSAL)
            visible = row_in[:, None] & (keys[None, :] < kv_end[:, None])
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            # where, not a product: a row that sees nothing has lse -inf, and exp2 there is inf.
            p = tl.where(visible, tl.exp2(s - lse[:, None] * _LOG2E), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    # dk and dv are fresh contiguous [Tk, Hkv, D]
    out_offsets = keys64[:, None] * (tl.num_programs(1) * head_dim) + kv_head * head_dim + d[None, :]
    tl.store(dk_ptr + out_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offsets, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, grad_ptr, lse_ptr, delta_ptr, dq_ptr,
                        cu_q_ptr, cu_k_ptr, prefix_ptr, tiles_ptr,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_gt, stride_gh, total_q, total_k, num_seqs, head_dim, scale,
                        scale_log2, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_PREFIX: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ of one query block of one head, looping over the key blocks it sees."""
    seq = tl.load(tiles_ptr + 2 * tl.program_id(0))
    if seq >= num_seqs:
        return
    block, q_start, len_q, k_start, len_k, prefix = _tile_sequence(
        tiles_ptr, cu_q_ptr, cu_k_ptr, prefix_ptr, seq, total_q, total_k, HAS_PREFIX)
    head = tl.program_id(1)
    kv_head = head // GROUP

    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    row_in = rows < len_q
    d_in = d < head_dim
    mask = row_in[:, None] & d_in[None, :]
    rows64 = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + rows64[:, None] * stride_qt + head * stride_qh + d[None, :], mask=mask,
                other=0)
    do = tl.load(grad_ptr + rows64[:, None] * stride_gt + head * stride_gh + d[None, :], mask=mask,
                 other=0)
    lse = tl.load(lse_ptr + head.to(tl.int64) * total_q + rows64, mask=row_in, other=0)
    delta = tl.load(delta_ptr + head.to(tl.int64) * total_q + rows64, mask=row_in, other=0)
    kv_end = _kv_end(rows, len_q, len_k, prefix, CAUSAL)
    hi = tl.max(tl.where(row_in, kv_end, 0), axis=0)

    k_base = k_ptr + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = v_ptr + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, hi, BLOCK_N):
        n = start + cols
        kv_mask = (n < len_k)[:, None] & d_in[None, :]
        k = tl.load(k_base + n.to(tl.int64)[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0)
        v = tl.load(v_base + n.to(tl.int64)[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0)
        visible = row_in[:, None] & (n[None, :] < kv_end[:, None])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        p = tl.where(visible, tl.exp2(s - lse[:, None] * _LOG2E), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    # dq is a fresh contiguous [Tq, Hq, D]
    tl.store(dq_ptr + rows64[:, None] * (tl.num_programs(1) * head_dim) + head * head_dim
             + d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)


def _attention_config(head_dim: int, device: torch.device) -> dict:
    """Block sizes: forward (M, N), backward (M, N), warps and stages; one config, no autotuning (a
    sync-free op launches without benchmarking, and the interpreter cannot autotune)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type == "cpu":  # the interpreter: cost is per program, so few large blocks
        return dict(fwd=(64, 64), bwd=(64, 64), block_d=block_d, warps=4, fwd_warps=4, stages=1)
    return dict(fwd=(128, 64), bwd=(64, 64), block_d=block_d, warps=4 if block_d <= 64 else 8,
                fwd_warps=4 if block_d <= 64 else 8, stages=3 if block_d <= 128 else 2)


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs multiply in float32 ("ieee"), as PyTorch does by default, not in TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _tile_table(cu_seqlens: torch.Tensor, total: int, block: int, max_len: int,
                last_block_first: bool) -> torch.Tensor:
    """int32 ``[N, 2]``: program -> (sequence, block within it), from torch ops only (no host sync).

    ``N = min(cdiv(total, block) + B, B * cdiv(max_len, block))`` bounds the real tile count
    (``sum_b cdiv(L_b, block)``) from shapes alone; the rows past the real count hold sequence ``B``,
    which the kernels skip. Lengths are clamped exactly as the kernels' ``_seq_bounds`` clamps them.
    ``last_block_first`` lists a sequence's blocks from the last: under a causal mask the last query
    blocks see the most keys, and the GPU starts programs in order, so the long ones start first.
    """
    num_seqs = cu_seqlens.shape[0] - 1
    bound = min(triton.cdiv(total, block) + num_seqs, num_seqs * triton.cdiv(max_len, block))
    cu = cu_seqlens.long()
    ends = cu[1:].clamp(0, total)
    starts = torch.minimum(cu[:-1].clamp(min=0), ends)
    blocks = (ends - starts + block - 1) // block
    last = torch.cumsum(blocks, 0)
    pid = torch.arange(bound, device=cu.device)
    seq = torch.searchsorted(last, pid, right=True)
    seq_in = seq.clamp(max=num_seqs - 1)
    block_id = pid - (last - blocks)[seq_in]
    if last_block_first:
        block_id = blocks[seq_in] - 1 - block_id
    return torch.stack([seq, block_id], dim=1).to(torch.int32)


def varlen_attention_forward(q, k, v, cu_q, cu_k, prefix, max_q, max_k, causal, scale):
    """``(out [Tq, Hq, D], lse float32 [Hq, Tq])``; rows past ``cu_q[-1]`` are 0 and -inf."""
    total_q, heads, head_dim = q.shape
    total_k, kv_heads, _ = k.shape
    out = torch.zeros((total_q, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.full((heads, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    num_seqs = cu_q.shape[0] - 1
    if num_seqs == 0 or total_q == 0 or heads == 0 or head_dim == 0:
        return out, lse
    cfg = _attention_config(head_dim, q.device)
    block_m, block_n = cfg["fwd"]
    tiles = _tile_table(cu_q, total_q, block_m, max_q, last_block_first=True)
    if tiles.shape[0] == 0:
        return out, lse
    _attn_fwd_kernel[(tiles.shape[0], heads)](
        q, k, v, out, lse, cu_q, cu_k, cu_q if prefix is None else prefix, tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        total_q, total_k, num_seqs, head_dim, scale * 1.4426950408889634,
        GROUP=heads // kv_heads, CAUSAL=causal, HAS_PREFIX=prefix is not None,
        PRECISION=_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=cfg["block_d"],
        num_warps=cfg["fwd_warps"], num_stages=cfg["stages"])
    return out, lse


def varlen_attention_backward(grad, q, k, v, out, lse, cu_q, cu_k, prefix, max_q, max_k, causal,
                              scale):
    """``(dq, dk, dv)``, contiguous, in the inputs' dtype; zero rows where no query or key is."""
    total_q, heads, head_dim = q.shape
    total_k, kv_heads, _ = k.shape
    dq = torch.zeros((total_q, heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.zeros((total_k, kv_heads, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.zeros((total_k, kv_heads, head_dim), dtype=v.dtype, device=v.device)
    num_seqs = cu_q.shape[0] - 1
    if num_seqs == 0 or total_q == 0 or total_k == 0 or heads == 0 or head_dim == 0:
        return dq, dk, dv
    if grad.stride(2) != 1:  # e.g. the expanded gradient of a .sum()
        grad = grad.contiguous()
    cfg = _attention_config(head_dim, q.device)
    block_m, block_n = cfg["bwd"]
    block_d = cfg["block_d"]
    delta = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(total_q, block_m), heads)](
        out, grad, delta, out.stride(0), out.stride(1), grad.stride(0), grad.stride(1), total_q,
        head_dim, BLOCK_M=block_m, BLOCK_D=block_d)
    common = dict(GROUP=heads // kv_heads, CAUSAL=causal, HAS_PREFIX=prefix is not None,
                  PRECISION=_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  num_warps=cfg["warps"], num_stages=cfg["stages"])
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad.stride(0), grad.stride(1))
    sizes = (total_q, total_k, num_seqs, head_dim, scale, scale * 1.4426950408889634)
    prefix_arg = cu_q if prefix is None else prefix
    key_tiles = _tile_table(cu_k, total_k, block_n, max_k, last_block_first=False)
    if key_tiles.shape[0] > 0:
        _attn_bwd_dkdv_kernel[(key_tiles.shape[0], kv_heads)](
            q, k, v, grad, lse, delta, dk, dv, cu_q, cu_k, prefix_arg, key_tiles, *strides, *sizes,
            **common)
    query_tiles = _tile_table(cu_q, total_q, block_m, max_q, last_block_first=True)
    if query_tiles.shape[0] > 0:
        _attn_bwd_dq_kernel[(query_tiles.shape[0], heads)](
            q, k, v, grad, lse, delta, dq, cu_q, cu_k, prefix_arg, query_tiles, *strides, *sizes,
            **common)
    return dq, dk, dv
