"""Triton kernel of ``apply_rotary``: rotary position embedding of packed tokens, q and k in one
launch (and the same kernel, transposed, for the backward). Contract:
``sphinx_kernels.ops.apply_rotary``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sphinx_kernels.triton.common import TILE_ELEMENTS, block_of


@triton.jit
def _rotate_tile(x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, head_block, num_tokens, num_heads,
                 table_rows, stride_xt, stride_xh, stride_ct, stride_st, half,
                 TRANSPOSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    t_in = t < num_tokens
    d_in = d < half
    pos = tl.load(pos_ptr + t, mask=t_in, other=0).to(tl.int64)
    # A position outside the table that slipped past validation gives NaN rows, never a wild read.
    valid = t_in & (pos >= 0) & (pos < table_rows)
    table_mask = valid[:, None] & d_in[None, :]
    c_off = pos[:, None] * stride_ct + d[None, :]
    s_off = pos[:, None] * stride_st + d[None, :]
    c1 = tl.load(cos_ptr + c_off, mask=table_mask, other=float("nan")).to(tl.float32)
    c2 = tl.load(cos_ptr + c_off + half, mask=table_mask, other=float("nan")).to(tl.float32)
    s1 = tl.load(sin_ptr + s_off, mask=table_mask, other=float("nan")).to(tl.float32)
    s2 = tl.load(sin_ptr + s_off + half, mask=table_mask, other=float("nan")).to(tl.float32)
    # Forward: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (x * cos + rotate_half(x) * sin). Its
    # transpose (the backward) is the same with sin's halves swapped and negated: y1 = x1 c1 + x2
    # s2, ...
    if TRANSPOSE:
        sa = -s2
        sb = -s1
    else:
        sa = s1
        sb = s2
    c1, c2 = c1[:, None, :], c2[:, None, :]
    sa, sb = sa[:, None, :], sb[:, None, :]
    t64 = t.to(tl.int64)[:, None, None]
    h64 = h.to(tl.int64)[None, :, None]
    mask = t_in[:, None, None] & (h < num_heads)[None, :, None] & d_in[None, None, :]
    x_off = t64 * stride_xt + h64 * stride_xh + d[None, None, :]
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + half, mask=mask, other=0).to(tl.float32)
    y1 = x1 * c1 - x2 * sa
    y2 = x2 * c2 + x1 * sb
    # The output is contiguous [T, H, D].
    o_off = (t64 * num_heads + h64) * (2 * half) + d[None, None, :]
    tl.store(out_ptr + o_off, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + o_off + half, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr, num_tokens,
                   q_heads, k_heads, table_rows, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_ct, stride_st, half, TRANSPOSE: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # Grid axis 1 runs over q's head blocks, then k's: one launch rotates both.
    head_block = tl.program_id(1)
    q_blocks = tl.cdiv(q_heads, BLOCK_H)
    if head_block < q_blocks:
        _rotate_tile(q_ptr, q_out_ptr, cos_ptr, sin_ptr, pos_ptr, head_block, num_tokens, q_heads,
                     table_rows, stride_qt, stride_qh, stride_ct, stride_st, half, TRANSPOSE,
                     BLOCK_T, BLOCK_H, BLOCK_HALF)
    else:
        _rotate_tile(k_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr, head_block - q_blocks, num_tokens,
                     k_heads, table_rows, stride_kt, stride_kh, stride_ct, stride_st, half,
                     TRANSPOSE, BLOCK_T, BLOCK_H, BLOCK_HALF)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 position_ids: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``(q_out, k_out)``; each program rotates a tile of about ``TILE_ELEMENTS``
    elements of each half of the head dim."""
    num_tokens, q_heads, dim = q.shape
    k_heads = k.shape[1]
    q_out = torch.empty((num_tokens, q_heads, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((num_tokens, k_heads, dim), dtype=k.dtype, device=k.device)
    half = dim // 2
    if num_tokens == 0 or half == 0 or q_heads + k_heads == 0:
        return q_out, k_out
    block_half = block_of(half)
    # One head block for both tensors, sized to the one with fewer heads: with GQA's 32 query and
    # 8 key heads, blocks of 8 fill every lane of both (blocks of 32 left 3/4 of k's masked).
    fewest = min(h for h in (q_heads, k_heads) if h > 0)
    block_h = min(block_of(fewest), max(1, TILE_ELEMENTS // block_half))
    block_t = max(1, TILE_ELEMENTS // (block_half * block_h))
    grid = (triton.cdiv(num_tokens, block_t),
            triton.cdiv(q_heads, block_h) + triton.cdiv(k_heads, block_h))
    _rotary_kernel[grid](
        q_ptr=q, k_ptr=k, q_out_ptr=q_out, k_out_ptr=k_out, cos_ptr=cos, sin_ptr=sin,
        pos_ptr=position_ids.contiguous(), num_tokens=num_tokens, q_heads=q_heads,
        k_heads=k_heads, table_rows=cos.shape[0], stride_qt=q.stride(0), stride_qh=q.stride(1),
        stride_kt=k.stride(0), stride_kh=k.stride(1), stride_ct=cos.stride(0),
        stride_st=sin.stride(0), half=half, TRANSPOSE=transpose, BLOCK_T=block_t,
        BLOCK_H=block_h, BLOCK_HALF=block_half)
    return q_out, k_out
