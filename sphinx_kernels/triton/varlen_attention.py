"""Triton kernels of ``varlen_attention``: flash attention over packed sequences, the forward and a
backward without atomics (dK/dV per key block, dQ per query block). Contract:
``sphinx_kernels.ops.varlen_attention``.

Mask, per sequence b with Lq queries, Lk keys and prefix P (0 without prefix_lens): query i sits at
key position p = i + Lk - Lq (bottom-right alignment) and sees keys j < kv_end(i), where
    causal:      kv_end = min(Lk, max(p + 1, P)) if p >= 0 else 0
    non-causal:  kv_end = Lk
Every visible set is a prefix of the keys and kv_end is non-decreasing in i, which is what lets the
forward and dQ loops stop at a block's last row's kv_end and the dK/dV loop start at the first query
that sees its first key.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sphinx_kernels.triton.common import LN2, LOG2E, contiguous, dot_precision, gpu_capability


@triton.jit
def _seq_bounds(cu_ptr, b, total):
    """Start and length of sequence b, clamped into [0, total]: a kernel stays in bounds even on
    cu_seqlens that reached it unchecked (a GPU without SPHINX_KERNELS_CHECK_INPUTS)."""
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1), 0), total)
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + b), 0), end)
    return start, end - start


@triton.jit
def _program_tile(tiles_ptr, cu_q_ptr, cu_k_ptr, prefix_ptr, num_seqs, total_q, total_k,
                  HAS_PREFIX: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile (from the tile table): the ``BLOCK`` positions of its block within its
    sequence, the sequence's query and key bounds, and its prefix length (0 without prefixes).

    The table has a static size; the tiles past the real count name sequence ``num_seqs`` and get
    an empty sequence (every mask false, every loop empty), so they store nothing."""
    seq = tl.load(tiles_ptr + 2 * tl.program_id(0))
    idle = seq >= num_seqs
    seq = tl.minimum(seq, num_seqs - 1)  # keeps an idle program's loads in bounds
    # An idle tile's block number is arbitrary (negative, even): block 0 of an empty sequence.
    block = tl.where(idle, 0, tl.load(tiles_ptr + 2 * tl.program_id(0) + 1))
    q_start, len_q = _seq_bounds(cu_q_ptr, seq, total_q)
    k_start, len_k = _seq_bounds(cu_k_ptr, seq, total_k)
    prefix = tl.load(prefix_ptr + seq) if HAS_PREFIX else 0
    return (block * BLOCK + tl.arange(0, BLOCK), q_start, tl.where(idle, 0, len_q), k_start,
            tl.where(idle, 0, len_k), prefix)


@triton.jit
def _load_rows(base, rows64, stride_t, d, mask):
    """Rows ``rows64`` (int64) of a ``[T, D]`` view starting at ``base`` (one head of a
    ``[T, H, D]`` tensor) with token stride ``stride_t``, ``d`` the columns; 0 outside ``mask``."""
    return tl.load(base + rows64[:, None] * stride_t + d[None, :], mask=mask, other=0)


@triton.jit
def _load_row_stats(lse_ptr, delta_ptr, head, total_q, rows64, row_in):
    """The forward's log-sum-exp and the backward's delta of rows ``rows64`` of one head (both
    float32 ``[H, Tq]``)."""
    offsets = head.to(tl.int64) * total_q + rows64
    lse = tl.load(lse_ptr + offsets, mask=row_in, other=0)
    delta = tl.load(delta_ptr + offsets, mask=row_in, other=0)
    return lse, delta


@triton.jit
def _kv_end(rows, len_q, len_k, prefix, CAUSAL: tl.constexpr):
    if CAUSAL:
        pos = rows + (len_k - len_q)
        end = tl.where(pos >= 0, tl.minimum(tl.maximum(pos + 1, prefix), len_k), 0)
    else:
        end = tl.zeros_like(rows) + len_k
    return end


@triton.jit
def _query_block(tiles_ptr, cu_q_ptr, cu_k_ptr, prefix_ptr, k_ptr, v_ptr, stride_kt, stride_kh,
                 stride_vt, stride_vh, num_seqs, total_q, total_k, head_dim,
                 GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a program over one query block of one head (the forward's, dQ's) starts from: its
    head, the columns ``d``, whether each row is in the sequence, the rows' int64 positions in the
    packed tensor, their ``[BLOCK_M, BLOCK_D]`` mask, each row's visible key count ``kv_end`` and
    the block's largest, the sequence's key count, and its kv head's K and V at the sequence's
    first key."""
    rows, q_start, len_q, k_start, len_k, prefix = _program_tile(
        tiles_ptr, cu_q_ptr, cu_k_ptr, prefix_ptr, num_seqs, total_q, total_k, HAS_PREFIX, BLOCK_M)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    row_in = rows < len_q
    kv_end = _kv_end(rows, len_q, len_k, prefix, CAUSAL)
    kv_head = head // GROUP
    return (head, d, row_in, (q_start + rows).to(tl.int64),
            row_in[:, None] & (d < head_dim)[None, :], kv_end,
            tl.max(tl.where(row_in, kv_end, 0), axis=0), len_k,
            k_ptr + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh,
            v_ptr + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh)


@triton.jit
def _key_block(k_base, v_base, start, len_k, stride_kt, stride_vt, d, head_dim,
               BLOCK_N: tl.constexpr):
    """Keys ``start .. start + BLOCK_N`` of a query block's loop: their positions, K and V."""
    n = start + tl.arange(0, BLOCK_N)
    mask = (n < len_k)[:, None] & (d < head_dim)[None, :]
    k = _load_rows(k_base, n.to(tl.int64), stride_kt, d, mask)
    v = _load_rows(v_base, n.to(tl.int64), stride_vt, d, mask)
    return n, k, v


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, prefix_ptr,
                     tiles_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     total_q, total_k, num_seqs, head_dim, scale, GROUP: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    head, d, row_in, rows64, mask, kv_end, hi, len_k, k_base, v_base = _query_block(
        tiles_ptr, cu_q_ptr, cu_k_ptr, prefix_ptr, k_ptr, v_ptr, stride_kt, stride_kh, stride_vt,
        stride_vh, num_seqs, total_q, total_k, head_dim, GROUP, CAUSAL, HAS_PREFIX, BLOCK_M,
        BLOCK_D)
    q = _load_rows(q_ptr + head * stride_qh, rows64, stride_qt, d, mask)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max, in log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, hi, BLOCK_N):
        n, k, v = _key_block(k_base, v_base, start, len_k, stride_kt, stride_vt, d, head_dim,
                             BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * LOG2E)
        s = tl.where(n[None, :] < kv_end[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing visible yet keeps max -inf; exponentiate against 0 there, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # A row that sees no key (Lk = 0, or above the diagonal of a sequence with Lq > Lk): output 0,
    # lse -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    m_safe = tl.where(empty, 0.0, m_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_safe + tl.log2(l_safe)) * LN2)
    # out is a fresh contiguous [Tq, Hq, D]
    tl.store(out_ptr + rows64[:, None] * (tl.num_programs(1) * head_dim) + head * head_dim
             + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + head.to(tl.int64) * total_q + rows64, lse, mask=row_in)


@triton.jit
def _attn_bwd_delta_kernel(out_ptr, grad_ptr, delta_ptr, stride_ot, stride_oh, stride_gt, stride_gh,
                           total_q, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in float32 (padding rows: O = 0, so 0)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    mask = (rows < total_q)[:, None] & (d < head_dim)[None, :]
    rows64 = rows.to(tl.int64)
    o = _load_rows(out_ptr + head * stride_oh, rows64, stride_ot, d, mask).to(tl.float32)
    g = _load_rows(grad_ptr + head * stride_gh, rows64, stride_gt, d, mask).to(tl.float32)
    tl.store(delta_ptr + head.to(tl.int64) * total_q + rows64, tl.sum(o * g, axis=1),
             mask=rows < total_q)


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, grad_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          cu_q_ptr, cu_k_ptr, prefix_ptr, tiles_ptr, stride_qt, stride_qh,
                          stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh, total_q,
                          total_k, num_seqs, head_dim, scale, GROUP: tl.constexpr,
                          CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK, dV of one key block of one kv head: loops over the query heads of its GQA group and the
    query blocks that see it, accumulating in registers (no atomics: deterministic)."""
    keys, q_start, len_q, k_start, len_k, prefix = _program_tile(
        tiles_ptr, cu_q_ptr, cu_k_ptr, prefix_ptr, num_seqs, total_q, total_k, HAS_PREFIX, BLOCK_N)
    kv_head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_in = d < head_dim
    kv_mask = (keys < len_k)[:, None] & d_in[None, :]
    keys64 = (k_start + keys).to(tl.int64)
    k = _load_rows(k_ptr + kv_head * stride_kh, keys64, stride_kt, d, kv_mask)
    v = _load_rows(v_ptr + kv_head * stride_vh, keys64, stride_vt, d, kv_mask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # The first query that sees the block's first key (see the mask above); every later query sees
    # it too.
    first = 0
    if CAUSAL:
        shift = len_k - len_q
        key0 = tl.min(keys, axis=0)  # the block's first key
        first = tl.maximum(tl.where(key0 < prefix, -shift, key0 - shift), 0)
        first = first // BLOCK_M * BLOCK_M
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for start in range(first, len_q, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_in = rows < len_q
            rows64 = (q_start + rows).to(tl.int64)
            mask = row_in[:, None] & d_in[None, :]
            q = _load_rows(q_ptr + head * stride_qh, rows64, stride_qt, d, mask)
            do = _load_rows(grad_ptr + head * stride_gh, rows64, stride_gt, d, mask)
            lse, delta = _load_row_stats(lse_ptr, delta_ptr, head, total_q, rows64, row_in)
            kv_end = _kv_end(rows, len_q, len_k, prefix, CAUSAL)
            visible = row_in[:, None] & (keys[None, :] < kv_end[:, None])
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * LOG2E)
            # where, not a product: a row that sees nothing has lse -inf, and exp2 there is inf.
            p = tl.where(visible, tl.exp2(s - lse[:, None] * LOG2E), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    # dk and dv are fresh contiguous [Tk, Hkv, D]
    out_offsets = (keys64[:, None] * (tl.num_programs(1) * head_dim) + kv_head * head_dim
                   + d[None, :])
    tl.store(dk_ptr + out_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offsets, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, grad_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr,
                        cu_k_ptr, prefix_ptr, tiles_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                        stride_vt, stride_vh, stride_gt, stride_gh, total_q, total_k, num_seqs,
                        head_dim, scale, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_PREFIX: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ of one query block of one head, looping over the key blocks it sees."""
    head, d, row_in, rows64, mask, kv_end, hi, len_k, k_base, v_base = _query_block(
        tiles_ptr, cu_q_ptr, cu_k_ptr, prefix_ptr, k_ptr, v_ptr, stride_kt, stride_kh, stride_vt,
        stride_vh, num_seqs, total_q, total_k, head_dim, GROUP, CAUSAL, HAS_PREFIX, BLOCK_M,
        BLOCK_D)
    q = _load_rows(q_ptr + head * stride_qh, rows64, stride_qt, d, mask)
    do = _load_rows(grad_ptr + head * stride_gh, rows64, stride_gt, d, mask)
    lse, delta = _load_row_stats(lse_ptr, delta_ptr, head, total_q, rows64, row_in)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, hi, BLOCK_N):
        n, k, v = _key_block(k_base, v_base, start, len_k, stride_kt, stride_vt, d, head_dim,
                             BLOCK_N)
        visible = row_in[:, None] & (n[None, :] < kv_end[:, None])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * LOG2E)
        p = tl.where(visible, tl.exp2(s - lse[:, None] * LOG2E), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    # dq is a fresh contiguous [Tq, Hq, D]
    tl.store(dq_ptr + rows64[:, None] * (tl.num_programs(1) * head_dim) + head * head_dim
             + d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)


class _Tiles(NamedTuple):
    """One attention kernel's launch configuration."""

    block_m: int   # query rows per block
    block_n: int   # key rows per block
    warps: int
    stages: int    # software-pipelining stages of the inner loop's loads

    def launch_options(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.warps,
                    num_stages=self.stages)


def _block_d(head_dim: int) -> int:
    """The head-dim block: the power of two at or above it, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def _attention_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The tiles of the forward (``fwd``) and of the backward's dK/dV (``dkdv``) and dQ (``dq``)
    kernels, by head dim, dtype and GPU generation; one config, no autotuning (a sync-free op
    launches without benchmarking, and the interpreter cannot autotune).

    Checked by ``python -m sphinx_kernels.aot`` (docs/launchability.md): every tile fits shared
    memory on sm_90 and sm_80, no 16-bit one spills registers, and every 16-bit dot runs on the
    tensor cores (wgmma on sm_90 wherever a spill-free wgmma tiling exists). 16-bit up to head dim
    128 on sm_90: wgmma takes 64 query rows per warp group, so dK/dV keeps 64 and pipelines 2
    stages (3 spill). On sm_80: dK/dV takes 32 query rows and 8 warps (64 rows spill at every
    stage count), the forward 8 warps (4 spill) and 64 rows above head dim 64. Head dim 256: both
    GPUs take the tiles below (every 64-row tiling of the backward spills on sm_90, so it runs on
    mma.sync there). float32 (IEEE products on the FMA units, operands in registers): 32x32 tiles
    and 8 warps, 1 stage above head dim 64 (the 16-bit tiles need up to 229888 B of shared memory
    in float32, over an A100's, and spill tens of KB)."""
    if device.type == "cpu":  # the interpreter: cost is per program, so few large blocks
        tiles = _Tiles(64, 64, 4, 1)
        return dict(fwd=tiles, dkdv=tiles, dq=tiles)
    if dtype == torch.float32:
        tiles = _Tiles(32, 32, 8, 1 if head_dim > 64 else 2)
        return dict(fwd=tiles, dkdv=tiles, dq=tiles)
    if head_dim > 128:
        return dict(fwd=_Tiles(64, 32, 8, 2), dkdv=_Tiles(32, 64, 8, 1), dq=_Tiles(32, 64, 8, 1))
    wide = head_dim > 64
    warps = 8 if wide else 4
    if gpu_capability(device) >= (9, 0):
        return dict(fwd=_Tiles(128, 64, warps, 3), dkdv=_Tiles(64, 64, warps, 2),
                    dq=_Tiles(64, 64, warps, 3))
    return dict(fwd=_Tiles(64 if wide else 128, 64, 8, 3), dkdv=_Tiles(32, 64, 8, 2),
                dq=_Tiles(64, 64, warps, 3))


def tile_table(cu_seqlens: torch.Tensor, total: int, block: int, max_len: int,
               last_block_first: bool) -> torch.Tensor:
    """int32 ``[N, 2]``: program -> (sequence, block within it), from torch ops only (no host sync).

    ``N = min(cdiv(total, block) + B, B * cdiv(max_len, block))`` bounds the real tile count
    (``sum_b cdiv(L_b, block)``) from shapes alone; the rows past the real count hold sequence
    ``B``, which the kernels skip. Lengths are clamped exactly as the kernels' ``_seq_bounds``
    clamps them. ``last_block_first`` lists a sequence's blocks from the last: under a causal mask
    the last query blocks see the most keys, and the GPU starts programs in order, so the long ones
    start first.
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


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q,
                             max_seqlen_k, causal, softmax_scale, deterministic=True):
    """``(out [Tq, Hq, D], lse float32 [Hq, Tq])``; rows past ``cu_seqlens_q[-1]`` are 0 and -inf.
    ``deterministic`` asks nothing of these kernels: they use no atomics, so they always are."""
    cu_seqlens_q, cu_seqlens_k, prefix_lens = contiguous(cu_seqlens_q, cu_seqlens_k, prefix_lens)
    total_q, heads, head_dim = q.shape
    total_k, kv_heads, _ = k.shape
    out = torch.zeros((total_q, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.full((heads, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    num_seqs = cu_seqlens_q.shape[0] - 1
    if num_seqs == 0 or total_q == 0 or heads == 0 or head_dim == 0:
        return out, lse
    cfg = _attention_config(head_dim, q.dtype, q.device)["fwd"]
    tiles = tile_table(cu_seqlens_q, total_q, cfg.block_m, max_seqlen_q, last_block_first=True)
    if tiles.shape[0] == 0:
        return out, lse
    _attn_fwd_kernel[(tiles.shape[0], heads)](
        q_ptr=q, k_ptr=k, v_ptr=v, out_ptr=out, lse_ptr=lse, cu_q_ptr=cu_seqlens_q,
        cu_k_ptr=cu_seqlens_k, prefix_ptr=cu_seqlens_q if prefix_lens is None else prefix_lens,
        tiles_ptr=tiles, **_strides(q=q, k=k, v=v), total_q=total_q, total_k=total_k,
        num_seqs=num_seqs, head_dim=head_dim, scale=softmax_scale, GROUP=heads // kv_heads,
        CAUSAL=causal, HAS_PREFIX=prefix_lens is not None, PRECISION=dot_precision(q.dtype),
        BLOCK_D=_block_d(head_dim), **cfg.launch_options())
    return out, lse


def _strides(**tensors: torch.Tensor) -> dict[str, int]:
    """``stride_<x>t``, ``stride_<x>h``: the token and head strides of each ``[T, H, D]`` tensor."""
    return {f"stride_{name}{axis}": t.stride(i) for name, t in tensors.items()
            for i, axis in enumerate("th")}


def varlen_attention_backward(grad, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix_lens,
                              max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                              deterministic=True):
    """``(dq, dk, dv)``, contiguous, in the inputs' dtype; zero rows where no query or key is."""
    cu_seqlens_q, cu_seqlens_k, prefix_lens = contiguous(cu_seqlens_q, cu_seqlens_k, prefix_lens)
    total_q, heads, head_dim = q.shape
    total_k, kv_heads, _ = k.shape
    dq = torch.zeros((total_q, heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.zeros((total_k, kv_heads, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.zeros((total_k, kv_heads, head_dim), dtype=v.dtype, device=v.device)
    num_seqs = cu_seqlens_q.shape[0] - 1
    if num_seqs == 0 or total_q == 0 or total_k == 0 or heads == 0 or head_dim == 0:
        return dq, dk, dv
    if grad.stride(2) != 1:  # e.g. the expanded gradient of a .sum()
        grad = grad.contiguous()
    cfg = _attention_config(head_dim, q.dtype, q.device)
    block_d = _block_d(head_dim)
    delta = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    delta_rows = cfg["dq"].block_m
    _attn_bwd_delta_kernel[(triton.cdiv(total_q, delta_rows), heads)](
        out_ptr=out, grad_ptr=grad, delta_ptr=delta, **_strides(o=out, g=grad), total_q=total_q,
        head_dim=head_dim, BLOCK_M=delta_rows, BLOCK_D=block_d)
    common = dict(q_ptr=q, k_ptr=k, v_ptr=v, grad_ptr=grad, lse_ptr=lse, delta_ptr=delta,
                  cu_q_ptr=cu_seqlens_q, cu_k_ptr=cu_seqlens_k,
                  prefix_ptr=cu_seqlens_q if prefix_lens is None else prefix_lens,
                  **_strides(q=q, k=k, v=v, g=grad), total_q=total_q, total_k=total_k,
                  num_seqs=num_seqs, head_dim=head_dim, scale=softmax_scale,
                  GROUP=heads // kv_heads, CAUSAL=causal, HAS_PREFIX=prefix_lens is not None,
                  PRECISION=dot_precision(q.dtype), BLOCK_D=block_d)
    key_tiles = tile_table(cu_seqlens_k, total_k, cfg["dkdv"].block_n, max_seqlen_k,
                           last_block_first=False)
    if key_tiles.shape[0] > 0:
        _attn_bwd_dkdv_kernel[(key_tiles.shape[0], kv_heads)](
            dk_ptr=dk, dv_ptr=dv, tiles_ptr=key_tiles, **common, **cfg["dkdv"].launch_options())
    query_tiles = tile_table(cu_seqlens_q, total_q, cfg["dq"].block_m, max_seqlen_q,
                             last_block_first=True)
    if query_tiles.shape[0] > 0:
        _attn_bwd_dq_kernel[(query_tiles.shape[0], heads)](
            dq_ptr=dq, tiles_ptr=query_tiles, **common, **cfg["dq"].launch_options())
    return dq, dk, dv
