"""Triton kernels of ``moe_expert_mlp``: grouped GEMMs over the plan's expert-grouped rows.
Contract: ``sphinx_kernels.ops.moe_expert_mlp``.

A row tile ``[m0, m0 + BLOCK_M)`` meets the experts whose segments overlap it, found from
``padded_offsets`` on the device (no host sync): one expert when BLOCK_M divides the plan's block
size (the GPU default), a few when the block size is smaller. Per expert the tile multiplies only
the rows that hold that expert's pairs, into an accumulator of its own kept on those rows only: the
tile's other rows (other experts', padding) load zeros, and zero times an inf or NaN weight is NaN,
so an expert's non-finite weights never reach another expert's rows or a padding row. A tile with
no valid row does no multiply at all (padding blocks are never computed, only zero-filled).
Weight gradients loop over one expert's rows in order: deterministic, no atomics, no split-K.

One kernel per product: forward ``_gate_up_kernel`` (``act = silu(x W1^T) * (x W3^T)``, both GEMMs
sharing the loads of x) and ``_down_proj_kernel`` (``y = act W2^T``); backward
``_swiglu_backward_kernel`` (``d act = dy W2`` with the SwiGLU backward in its epilogue),
``_input_grad_kernel`` (``dx = dh1 W1 + dh3 W3``), ``_weight_grad_kernel`` (``dW2 = dy^T act``) and
``_weight_grad_pair_kernel`` (``dW1 = dh1^T x``, ``dW3 = dh3^T x``, sharing the loads of x).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sphinx_kernels.triton.common import block_of, contiguous, dot_precision, swizzled_tile

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the row-tiled kernels by element size
# (float32: IEEE dots); kernels that hold two tiles of accumulators take half of BLOCK_N on a GPU.
_GPU_TILES = {2: (128, 128, 64, 8, 3), 4: (64, 64, 32, 4, 3)}
# 16-bit on sm_80 (A100): K blocks of 32 and 4 stages. At 64 the gate/up kernel holds 255
# registers there, and with an accumulator per expert (the non-finite isolation of the hardening
# branch) it spills 168 B and the down projection 44 B; at 32 neither does
# (python -m sphinx_kernels.aot).
_SM80_16BIT_TILES = (128, 128, 32, 8, 4)
# The interpreter's cost is per program: few, large tiles.
_INTERPRETER_TILES = (64, 128, 128, 1, 1)
_GROUP_M = 8


@triton.jit
def _tile_experts(offsets_ptr, m0, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """``[first, stop)``: the experts whose segments overlap rows ``[m0, m0 + BLOCK_M)``."""
    e = tl.arange(0, BLOCK_E)
    e_in = e < num_experts
    starts = tl.load(offsets_ptr + e, mask=e_in, other=2147483647)
    ends = tl.load(offsets_ptr + 1 + e, mask=e_in, other=2147483647)
    first = tl.sum((ends <= m0).to(tl.int32), axis=0)
    stop = tl.sum((starts < m0 + BLOCK_M).to(tl.int32), axis=0)
    return first, stop


@triton.jit
def _expert_rows(offsets_ptr, counts_ptr, e, rows, num_rows):
    """Which of ``rows`` hold expert ``e``'s pairs, and whether any does."""
    start = tl.load(offsets_ptr + e)
    end = start + tl.load(counts_ptr + e)
    valid = (rows >= start) & (rows < end) & (rows >= 0) & (rows < num_rows)
    return valid, tl.sum(valid.to(tl.int32), axis=0) > 0


@triton.jit
def _weight_tile(w_ptr, e, n, k, width, depth, stride_e, stride_n, stride_k):
    """``W[e][n, k]`` as a ``[BLOCK_K, BLOCK_N]`` tile (the right operand of ``rows @ W[e].T``)."""
    # int64 expert offset (E * F * H may pass 2^31); the loop's e is a plain int in the interpreter.
    base = (tl.full([], 0, tl.int64) + e) * stride_e
    return tl.load(w_ptr + base + n[None, :] * stride_n + k[:, None] * stride_k,
                   mask=(n < width)[None, :] & (k < depth)[:, None], other=0)


@triton.jit
def _expert_product(a_ptr, w_ptr, acc, e, rm, rn, valid, width, depth, stride_e, stride_n,
                    stride_k, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + A[rows of e] @ W[e].T`` over the whole K loop, ``A`` ``[R, depth]`` row-major and
    ``W[e][n, k]`` at ``e * stride_e + n * stride_n + k * stride_k`` (so either weight layout)."""
    for k0 in range(0, depth, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * depth + rk[None, :],
                    mask=valid[:, None] & (rk < depth)[None, :], other=0)
        w = _weight_tile(w_ptr, e, rn, rk, width, depth, stride_e, stride_n, stride_k)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _grouped_product(a_ptr, w_ptr, offsets_ptr, counts_ptr, m0, rm, rn, num_rows, width, depth,
                     num_experts, stride_e, stride_n, stride_k, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_E: tl.constexpr):
    """float32 ``[BLOCK_M, BLOCK_N]``: ``A[r] @ W[e].T`` for the rows r of each expert e of the
    tile, zero on rows of no pair."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first, stop = _tile_experts(offsets_ptr, m0, num_experts, BLOCK_M, BLOCK_E)
    for e in range(first, stop):
        valid, any_valid = _expert_rows(offsets_ptr, counts_ptr, e, rm, num_rows)
        if any_valid:
            part = _expert_product(a_ptr, w_ptr, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), e,
                                   rm, rn, valid, width, depth, stride_e, stride_n, stride_k,
                                   PRECISION, BLOCK_K)
            acc = tl.where(valid[:, None], part, acc)  # the expert's rows only (module docstring)
    return acc


@triton.jit
def _gate_up_kernel(x_ptr, w1_ptr, w3_ptr, offsets_ptr, counts_ptr, act_ptr, h1_ptr, h3_ptr,
                    num_rows, hidden, ffn, num_experts, STORE_PRE: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr):
    """``act = silu(x @ w1[e].T) * (x @ w3[e].T)`` on ``[R, F]`` tiles, both GEMMs sharing the loads
    of x; ``h1``, ``h3`` (the two pre-activations) stored too when STORE_PRE."""
    m0, n0 = swizzled_tile(num_rows, ffn, BLOCK_M, BLOCK_N, GROUP_M)
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first, stop = _tile_experts(offsets_ptr, m0, num_experts, BLOCK_M, BLOCK_E)
    for e in range(first, stop):
        valid, any_valid = _expert_rows(offsets_ptr, counts_ptr, e, rm, num_rows)
        if any_valid:
            part1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            part3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, hidden, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + rm[:, None].to(tl.int64) * hidden + rk[None, :],
                            mask=valid[:, None] & (rk < hidden)[None, :], other=0)
                w1 = _weight_tile(w1_ptr, e, rn, rk, ffn, hidden, ffn * hidden, hidden, 1)
                w3 = _weight_tile(w3_ptr, e, rn, rk, ffn, hidden, ffn * hidden, hidden, 1)
                part1 = tl.dot(x, w1, part1, input_precision=PRECISION)
                part3 = tl.dot(x, w3, part3, input_precision=PRECISION)
            # The expert's rows only (module docstring).
            acc1 = tl.where(valid[:, None], part1, acc1)
            acc3 = tl.where(valid[:, None], part3, acc3)
    act = acc1 * tl.sigmoid(acc1) * acc3  # rows of no pair: 0 * 0
    out = rm[:, None].to(tl.int64) * ffn + rn[None, :]
    mask = (rm < num_rows)[:, None] & (rn < ffn)[None, :]
    tl.store(act_ptr + out, act.to(act_ptr.dtype.element_ty), mask=mask)
    if STORE_PRE:
        tl.store(h1_ptr + out, acc1.to(h1_ptr.dtype.element_ty), mask=mask)
        tl.store(h3_ptr + out, acc3.to(h3_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _down_proj_kernel(act_ptr, w2_ptr, offsets_ptr, counts_ptr, y_ptr, num_rows, hidden, ffn,
                      num_experts, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """``y = act @ w2[e].T`` on ``[R, H]`` tiles (w2 ``[E, H, F]``)."""
    m0, n0 = swizzled_tile(num_rows, hidden, BLOCK_M, BLOCK_N, GROUP_M)
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    acc = _grouped_product(act_ptr, w2_ptr, offsets_ptr, counts_ptr, m0, rm, rn, num_rows, hidden,
                           ffn, num_experts, hidden * ffn, ffn, 1, PRECISION, BLOCK_M, BLOCK_N,
                           BLOCK_K, BLOCK_E)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * hidden + rn[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=(rm < num_rows)[:, None] & (rn < hidden)[None, :])


@triton.jit
def _swiglu_backward_kernel(dy_ptr, w2_ptr, offsets_ptr, counts_ptr, h1_ptr, h3_ptr, dh1_ptr,
                            dh3_ptr, act_ptr, num_rows, hidden, ffn, num_experts,
                            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr):
    """``d act = dy @ w2[e]`` on ``[R, F]`` tiles, turned in the epilogue, with the stored
    pre-activations h1, h3, into ``dh1``, ``dh3`` and the activation itself (for ``dW2``)."""
    m0, n0 = swizzled_tile(num_rows, ffn, BLOCK_M, BLOCK_N, GROUP_M)
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    # W[e][n, k] = w2[e, k, n], n over F and k over H.
    grad_act = _grouped_product(dy_ptr, w2_ptr, offsets_ptr, counts_ptr, m0, rm, rn, num_rows, ffn,
                                hidden, num_experts, hidden * ffn, 1, ffn, PRECISION, BLOCK_M,
                                BLOCK_N, BLOCK_K, BLOCK_E)
    out = rm[:, None].to(tl.int64) * ffn + rn[None, :]
    mask = (rm < num_rows)[:, None] & (rn < ffn)[None, :]
    # act = silu(h1) * h3: d h3 = d act * silu(h1), d h1 = d act * h3 * silu'(h1) with
    # silu'(h) = sigmoid(h) * (1 + h * (1 - sigmoid(h))). Padding rows hold h1 = h3 = 0 and
    # d act = 0, so all three are 0 there.
    h1 = tl.load(h1_ptr + out, mask=mask, other=0).to(tl.float32)
    h3 = tl.load(h3_ptr + out, mask=mask, other=0).to(tl.float32)
    sig = tl.sigmoid(h1)
    silu = h1 * sig
    tl.store(dh3_ptr + out, (grad_act * silu).to(dh3_ptr.dtype.element_ty), mask=mask)
    tl.store(act_ptr + out, (silu * h3).to(act_ptr.dtype.element_ty), mask=mask)
    grad_h1 = grad_act * h3 * sig * (1 + h1 * (1 - sig))
    tl.store(dh1_ptr + out, grad_h1.to(dh1_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _input_grad_kernel(dh1_ptr, w1_ptr, dh3_ptr, w3_ptr, offsets_ptr, counts_ptr, dx_ptr, num_rows,
                       hidden, ffn, num_experts, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                       GROUP_M: tl.constexpr):
    """``dx = dh1 @ w1[e] + dh3 @ w3[e]`` on ``[R, H]`` tiles."""
    m0, n0 = swizzled_tile(num_rows, hidden, BLOCK_M, BLOCK_N, GROUP_M)
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first, stop = _tile_experts(offsets_ptr, m0, num_experts, BLOCK_M, BLOCK_E)
    for e in range(first, stop):
        valid, any_valid = _expert_rows(offsets_ptr, counts_ptr, e, rm, num_rows)
        if any_valid:
            # W[e][n, k] = w[e, k, n], n over H and k over F.
            part = _expert_product(dh1_ptr, w1_ptr, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                                   e, rm, rn, valid, hidden, ffn, ffn * hidden, 1, hidden,
                                   PRECISION, BLOCK_K)
            part = _expert_product(dh3_ptr, w3_ptr, part, e, rm, rn, valid, hidden, ffn,
                                   ffn * hidden, 1, hidden, PRECISION, BLOCK_K)
            acc = tl.where(valid[:, None], part, acc)  # the expert's rows only (module docstring)
    tl.store(dx_ptr + rm[:, None].to(tl.int64) * hidden + rn[None, :],
             acc.to(dx_ptr.dtype.element_ty),
             mask=(rm < num_rows)[:, None] & (rn < hidden)[None, :])


@triton.jit
def _weight_grad_tile(offsets_ptr, counts_ptr, num_rows, rows_p, cols_q, BLOCK_P: tl.constexpr,
                      BLOCK_Q: tl.constexpr):
    """This program's expert, its ``[P, Q]`` output tile and the expert's row range ``[start, end)``
    (clamped into the rows)."""
    tiles_q = tl.cdiv(cols_q, BLOCK_Q)
    rp = (tl.program_id(0) // tiles_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = (tl.program_id(0) % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    e = tl.program_id(1)
    start = tl.maximum(tl.load(offsets_ptr + e), 0)
    end = tl.minimum(tl.load(offsets_ptr + e) + tl.load(counts_ptr + e), num_rows)
    return e, rp, rq, start, end


@triton.jit
def _rows_block(ptr, r, r_in, cols, num_cols):
    """Rows ``r`` (``r_in`` of them valid), columns ``cols`` of a row-major ``[R, num_cols]``."""
    return tl.load(ptr + r[:, None].to(tl.int64) * num_cols + cols[None, :],
                   mask=r_in[:, None] & (cols < num_cols)[None, :], other=0)


@triton.jit
def _store_weight_grad(out_ptr, acc, e, rp, rq, rows_p, cols_q):
    out = e.to(tl.int64) * rows_p * cols_q + rp[:, None] * cols_q + rq[None, :]
    tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty),
             mask=(rp < rows_p)[:, None] & (rq < cols_q)[None, :])


@triton.jit
def _b_block(b_ptr, r0, end, rq, cols_q, BLOCK_R: tl.constexpr):
    """The rows ``r0 .. r0 + BLOCK_R`` (those below ``end`` valid) and their tile of B."""
    r = r0 + tl.arange(0, BLOCK_R)
    r_in = r < end
    return r, r_in, _rows_block(b_ptr, r, r_in, rq, cols_q)


@triton.jit
def _accumulate_at_b(acc, a_ptr, b, r, r_in, rp, rows_p, PRECISION: tl.constexpr):
    """``acc + A[r, rp].T @ b``."""
    return tl.dot(tl.trans(_rows_block(a_ptr, r, r_in, rp, rows_p)), b, acc,
                  input_precision=PRECISION)


@triton.jit
def _weight_grad_kernel(a_ptr, b_ptr, out_ptr, offsets_ptr, counts_ptr, num_rows, rows_p, cols_q,
                        PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    """``out[e] = A_e.T @ B_e`` (``[P, Q]``) over expert e's rows only, in row order, with A
    ``[R, P]`` and B ``[R, Q]``."""
    e, rp, rq, start, end = _weight_grad_tile(offsets_ptr, counts_ptr, num_rows, rows_p, cols_q,
                                              BLOCK_P, BLOCK_Q)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r, r_in, b = _b_block(b_ptr, r0, end, rq, cols_q, BLOCK_R)
        acc = _accumulate_at_b(acc, a_ptr, b, r, r_in, rp, rows_p, PRECISION)
    _store_weight_grad(out_ptr, acc, e, rp, rq, rows_p, cols_q)


@triton.jit
def _weight_grad_pair_kernel(a_ptr, a2_ptr, b_ptr, out_ptr, out2_ptr, offsets_ptr, counts_ptr,
                             num_rows, rows_p, cols_q, PRECISION: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    """``out[e] = A_e.T @ B_e`` and ``out2[e] = A2_e.T @ B_e`` sharing the loads of B."""
    e, rp, rq, start, end = _weight_grad_tile(offsets_ptr, counts_ptr, num_rows, rows_p, cols_q,
                                              BLOCK_P, BLOCK_Q)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r, r_in, b = _b_block(b_ptr, r0, end, rq, cols_q, BLOCK_R)
        acc = _accumulate_at_b(acc, a_ptr, b, r, r_in, rp, rows_p, PRECISION)
        acc2 = _accumulate_at_b(acc2, a2_ptr, b, r, r_in, rp, rows_p, PRECISION)
    _store_weight_grad(out_ptr, acc, e, rp, rq, rows_p, cols_q)
    _store_weight_grad(out2_ptr, acc2, e, rp, rq, rows_p, cols_q)


# ----------------------------------------------------------------------------------------------
# Launchers


def _tiles(dtype: torch.dtype, device: torch.device, accumulators: int = 1):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of a kernel holding ``accumulators``
    output tiles."""
    if device.type == "cpu":
        return _INTERPRETER_TILES
    tiles = _GPU_TILES[dtype.itemsize]
    if dtype.itemsize == 2 and torch.cuda.get_device_capability(device) < (9, 0):
        tiles = _SM80_16BIT_TILES
    block_m, block_n, block_k, warps, stages = tiles
    return block_m, block_n // accumulators, block_k, warps, stages


def _launch_row_tiled(kernel, output_columns: int, *, dtype: torch.dtype, device: torch.device,
                      accumulators: int = 1, **arguments) -> None:
    """Launches a row-tiled kernel over its ``[num_rows, output_columns]`` output with this dtype's
    tiles."""
    block_m, block_n, block_k, warps, stages = _tiles(dtype, device, accumulators)
    grid = (triton.cdiv(arguments["num_rows"], block_m) * triton.cdiv(output_columns, block_n),)
    if grid[0] == 0:
        return
    kernel[grid](**arguments, PRECISION=dot_precision(dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_K=block_k, GROUP_M=_GROUP_M, num_warps=warps, num_stages=stages)


def _launch_weight_grad(kernel, rows_p: int, cols_q: int, num_experts: int, *, dtype, device,
                        accumulators: int = 1, **arguments) -> None:
    """Launches a per-expert weight-gradient kernel over ``[E, P, Q]`` outputs."""
    block_p, block_q, block_r, warps, stages = _tiles(dtype, device, accumulators)
    grid = (triton.cdiv(rows_p, block_p) * triton.cdiv(cols_q, block_q), num_experts)
    if rows_p * cols_q * num_experts == 0:
        return
    kernel[grid](**arguments, rows_p=rows_p, cols_q=cols_q, PRECISION=dot_precision(dtype),
                 BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_R=block_r, num_warps=warps,
                 num_stages=stages)


def moe_expert_mlp_forward(x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, store_pre):
    """``(y [R, H], h1 [R, F], h3 [R, F])``, h1 and h3 empty unless ``store_pre``."""
    x, w1, w3, w2, tokens_per_expert, padded_offsets = contiguous(x_grouped, w1, w3, w2,
                                                                  tokens_per_expert, padded_offsets)
    (num_rows, hidden), ffn, num_experts = x.shape, w1.shape[1], w1.shape[0]
    act = torch.empty((num_rows, ffn), dtype=x.dtype, device=x.device)
    y = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    h1, h3 = (torch.empty((num_rows if store_pre else 0, ffn), dtype=x.dtype, device=x.device)
              for _ in "13")
    plan = dict(offsets_ptr=padded_offsets, counts_ptr=tokens_per_expert, num_rows=num_rows,
                hidden=hidden, ffn=ffn, num_experts=num_experts, BLOCK_E=block_of(num_experts),
                dtype=x.dtype, device=x.device)
    _launch_row_tiled(_gate_up_kernel, ffn, x_ptr=x, w1_ptr=w1, w3_ptr=w3, act_ptr=act,
                      h1_ptr=h1 if store_pre else act, h3_ptr=h3 if store_pre else act,
                      STORE_PRE=store_pre, accumulators=2, **plan)
    _launch_row_tiled(_down_proj_kernel, hidden, act_ptr=act, w2_ptr=w2, y_ptr=y, **plan)
    return y, h1, h3


def moe_expert_mlp_backward(grad_y, x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, h1,
                            h3):
    """``(dx, dw1, dw3, dw2)`` from the pre-activations h1, h3 ``[R, F]`` of the forward."""
    grad_y, x, w1, w3, w2, tokens_per_expert, padded_offsets = contiguous(
        grad_y, x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets)
    (num_rows, hidden), ffn, num_experts = x.shape, w1.shape[1], w1.shape[0]
    dh1, dh3, act = (torch.empty((num_rows, ffn), dtype=x.dtype, device=x.device) for _ in "123")
    grad_x = torch.empty_like(x)
    plan = dict(offsets_ptr=padded_offsets, counts_ptr=tokens_per_expert, num_rows=num_rows,
                dtype=x.dtype, device=x.device)
    row_tiled = dict(plan, hidden=hidden, ffn=ffn, num_experts=num_experts,
                     BLOCK_E=block_of(num_experts))
    _launch_row_tiled(_swiglu_backward_kernel, ffn, dy_ptr=grad_y, w2_ptr=w2,
                      h1_ptr=h1.contiguous(), h3_ptr=h3.contiguous(), dh1_ptr=dh1, dh3_ptr=dh3,
                      act_ptr=act, accumulators=2, **row_tiled)
    _launch_row_tiled(_input_grad_kernel, hidden, dh1_ptr=dh1, w1_ptr=w1, dh3_ptr=dh3,
                      w3_ptr=w3, dx_ptr=grad_x, accumulators=2, **row_tiled)
    grad_w1, grad_w3, grad_w2 = (torch.empty_like(w) for w in (w1, w3, w2))
    _launch_weight_grad(_weight_grad_pair_kernel, ffn, hidden, num_experts, a_ptr=dh1, a2_ptr=dh3,
                        b_ptr=x, out_ptr=grad_w1, out2_ptr=grad_w3, accumulators=2, **plan)
    _launch_weight_grad(_weight_grad_kernel, hidden, ffn, num_experts, a_ptr=grad_y, b_ptr=act,
                        out_ptr=grad_w2, **plan)
    return grad_x, grad_w1, grad_w3, grad_w2
