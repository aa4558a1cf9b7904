"""Triton kernels of the MoE routing family: fused softmax/top-k gating (forward and backward), the
routing plan (histogram, prefix sum, scatter) and the row permutations between token order and
expert-grouped, block-padded order. Contracts: ``sphinx_kernels.moe``.

Every kernel upcasts to float32 (float64 for float64 data; the router's softmax is float64) before
any arithmetic, so none does bf16 arithmetic (which the interpreter gets wrong), and none uses
atomics: results are deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements one program holds in registers: tokens per program fill a tile of about this many.
_TILE = 4096
_MAX_BLOCK_H = 512


def _block_of(size: int) -> int:
    return triton.next_power_of_2(max(size, 1))


def _rows_per_program(width_block: int) -> int:
    return max(1, _TILE // width_block)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------------------------------
# topk_gating


@triton.jit
def _softmax_rows(logits_ptr, t, e, num_tokens, num_experts):
    """float64 probabilities ``[BLOCK_T, BLOCK_E]`` (0 outside the valid block) and logsumexp
    ``[BLOCK_T]`` of a block of logit rows.

    The router's softmax is evaluated in float64 and rounded to float32 once by the callers: it is E
    values per token (negligible next to the experts), and it makes the gates and the losses, which
    sum T * E probabilities, correctly rounded rather than a few ulp off (the fast float32 exp is
    ex2.approx on GPUs, numpy's under the interpreter).
    """
    valid = (t < num_tokens)[:, None] & (e < num_experts)[None, :]
    x = tl.load(logits_ptr + t[:, None].to(tl.int64) * num_experts + e[None, :], mask=valid,
                other=float("-inf")).to(tl.float64)
    row_max = tl.max(x, axis=1)
    row_max = tl.where(t < num_tokens, row_max, 0.0)  # rows past the end: no inf - inf
    exp = tl.where(valid, tl.exp(x - row_max[:, None]), 0.0)
    total = tl.sum(exp, axis=1)
    total = tl.where(t < num_tokens, total, 1.0)
    return exp / total[:, None], row_max + tl.log(total)


@triton.jit
def _topk_gating_kernel(logits_ptr, weights_ptr, ids_ptr, prob_sums_ptr, counts_ptr, z_sums_ptr,
                        num_tokens, num_experts, K: tl.constexpr, RENORMALIZE: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    t_in = t < num_tokens
    probs64, lse = _softmax_rows(logits_ptr, t, e, num_tokens, num_experts)
    probs = probs64.to(tl.float32)
    # Top-k of the float32 probabilities by k rounds of argmax; a tie goes to the lowest expert id,
    # and a chosen expert is masked with -1 (below every probability) so padding columns and
    # earlier picks are never chosen again.
    candidates = tl.where((e < num_experts)[None, :], probs, -1.0)
    slot = tl.arange(0, BLOCK_K)
    chosen = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    gates = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float64)
    expert_ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(candidates, axis=1)
        expert = tl.min(tl.where(candidates == best[:, None], e[None, :], BLOCK_E), axis=1)
        hit = e[None, :] == expert[:, None]
        candidates = tl.where(hit, -1.0, candidates)
        chosen += hit.to(tl.int32)
        gate = tl.sum(tl.where(hit, probs64, 0.0), axis=1)
        gates = tl.where(slot[None, :] == j, gate[:, None], gates)
        expert_ids = tl.where(slot[None, :] == j, expert[:, None], expert_ids)
    if RENORMALIZE:
        gates = gates / tl.where(t_in, tl.sum(gates, axis=1), 1.0)[:, None]
    out = t[:, None] * K + slot[None, :]
    out_mask = t_in[:, None] & (slot < K)[None, :]
    tl.store(weights_ptr + out, gates.to(tl.float32), mask=out_mask)
    tl.store(ids_ptr + out, expert_ids, mask=out_mask)
    # Per-block float64 partial sums of the losses, reduced in a fixed order outside (no atomics);
    # the two scalar losses are rounded to float32 once, at the end.
    e_in = e < num_experts
    chosen = tl.where(t_in[:, None], chosen, 0)
    tl.store(prob_sums_ptr + block * num_experts + e, tl.sum(probs64, axis=0), mask=e_in)
    tl.store(counts_ptr + block * num_experts + e, tl.sum(chosen, axis=0), mask=e_in)
    tl.store(z_sums_ptr + block, tl.sum(tl.where(t_in, lse * lse, 0.0), axis=0))


@triton.jit
def _topk_gating_backward_kernel(logits_ptr, ids_ptr, weights_ptr, counts_ptr, grad_weights_ptr,
                                 grad_lb_ptr, grad_z_ptr, grad_logits_ptr, num_tokens, num_experts,
                                 K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                                 BLOCK_E: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    t_in = t < num_tokens
    e_in = e < num_experts
    probs64, lse64 = _softmax_rows(logits_ptr, t, e, num_tokens, num_experts)
    probs, lse = probs64.to(tl.float32), lse64.to(tl.float32)
    # d(loss)/d(probs): the chosen weights' gradients (through the renormalisation), plus the
    # load-balancing term E * count_e / (T * k * T) for every token's probability of expert e.
    chosen_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    weighted_grad = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(K):
        expert = tl.load(ids_ptr + t * K + j, mask=t_in, other=-1)
        chosen_sum += tl.sum(tl.where(e[None, :] == expert[:, None], probs, 0.0), axis=1)
        g = tl.load(grad_weights_ptr + t * K + j, mask=t_in, other=0.0)
        w = tl.load(weights_ptr + t * K + j, mask=t_in, other=0.0)
        weighted_grad += g * w
    chosen_sum = tl.where(t_in, chosen_sum, 1.0)
    tokens = num_tokens * 1.0  # a float (num_tokens == 1 arrives as a constexpr)
    counts = tl.load(counts_ptr + e, mask=e_in, other=0).to(tl.float32)
    lb_scale = tl.load(grad_lb_ptr) * num_experts / (tokens * tokens * K)
    grad_probs = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32) + (lb_scale * counts)[None, :]
    for j in tl.static_range(K):
        expert = tl.load(ids_ptr + t * K + j, mask=t_in, other=-1)
        g = tl.load(grad_weights_ptr + t * K + j, mask=t_in, other=0.0)
        if RENORMALIZE:
            g = (g - weighted_grad) / chosen_sum
        grad_probs += tl.where(e[None, :] == expert[:, None], g[:, None], 0.0)
    # Softmax backward, plus the z-loss: d(mean lse^2)/d(logits) = 2 * lse / T * probs.
    z_scale = 2.0 * tl.load(grad_z_ptr) / tokens
    inner = tl.sum(grad_probs * probs, axis=1)
    grad = probs * (grad_probs - inner[:, None] + z_scale * lse[:, None])
    tl.store(grad_logits_ptr + t[:, None].to(tl.int64) * num_experts + e[None, :],
             grad.to(grad_logits_ptr.dtype.element_ty), mask=t_in[:, None] & e_in[None, :])


def _gating_grid(num_tokens: int, num_experts: int) -> tuple[int, int, int]:
    block_e = _block_of(num_experts)
    block_t = min(_rows_per_program(block_e), _block_of(num_tokens))
    return triton.cdiv(num_tokens, block_t), block_t, block_e


def topk_gating(logits: torch.Tensor, k: int, renormalize: bool):
    logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    num_blocks, block_t, block_e = _gating_grid(num_tokens, num_experts)
    device = logits.device
    weights = torch.empty((num_tokens, k), dtype=torch.float32, device=device)
    expert_ids = torch.empty((num_tokens, k), dtype=torch.int32, device=device)
    prob_sums = torch.zeros((num_blocks, num_experts), dtype=torch.float64, device=device)
    counts = torch.zeros((num_blocks, num_experts), dtype=torch.int32, device=device)
    z_sums = torch.zeros((num_blocks,), dtype=torch.float64, device=device)
    if num_blocks > 0:
        _topk_gating_kernel[(num_blocks,)](logits, weights, expert_ids, prob_sums, counts, z_sums,
                                           num_tokens, num_experts, K=k, RENORMALIZE=renormalize,
                                           BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=_block_of(k))
    return weights, expert_ids, prob_sums.sum(0), counts.sum(0, dtype=torch.int32), z_sums.sum()


def topk_gating_backward(logits, expert_ids, weights, tokens_per_expert, grad_weights, grad_lb,
                         grad_z, renormalize):
    logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    grad_logits = torch.empty_like(logits)
    num_blocks, block_t, block_e = _gating_grid(num_tokens, num_experts)
    if num_blocks > 0:
        _topk_gating_backward_kernel[(num_blocks,)](
            logits, expert_ids.contiguous(), weights.contiguous(), tokens_per_expert,
            grad_weights.contiguous(), grad_lb, grad_z, grad_logits, num_tokens, num_experts,
            K=expert_ids.shape[1], RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e)
    return grad_logits


# ---------------------------------------------------------------------------------------------------
# moe_routing: a per-block histogram, a prefix sum over blocks and experts, a stable scatter.


@triton.jit
def _expert_one_hot(expert_ids_ptr, i, e, num_pairs):
    expert = tl.load(expert_ids_ptr + i, mask=i < num_pairs, other=-1)
    return (expert[:, None] == e[None, :]).to(tl.int32), expert


@triton.jit
def _block_histogram_kernel(expert_ids_ptr, block_counts_ptr, num_pairs, num_experts,
                            BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    block = tl.program_id(0)
    i = block * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_E)
    one_hot, _ = _expert_one_hot(expert_ids_ptr, i, e, num_pairs)
    tl.store(block_counts_ptr + block * num_experts + e, tl.sum(one_hot, axis=0),
             mask=e < num_experts)


@triton.jit
def _scatter_positions_kernel(expert_ids_ptr, block_starts_ptr, position_ptr, row_to_pair_ptr,
                              num_pairs, num_experts, num_rows, BLOCK_N: tl.constexpr,
                              BLOCK_E: tl.constexpr):
    block = tl.program_id(0)
    i = block * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_E)
    one_hot, expert = _expert_one_hot(expert_ids_ptr, i, e, num_pairs)
    # Rank of each pair among the earlier pairs of its expert in this block: stable by construction.
    rank = tl.sum((tl.cumsum(one_hot, axis=0) - 1) * one_hot, axis=1)
    start = tl.load(block_starts_ptr + block * num_experts + expert,
                    mask=(expert >= 0) & (expert < num_experts), other=num_rows)
    position = start + rank
    # An expert id that slipped past validation is placed nowhere: position -1, no write.
    placed = (expert >= 0) & (expert < num_experts) & (position < num_rows)
    tl.store(position_ptr + i, tl.where(placed, position, -1), mask=i < num_pairs)
    tl.store(row_to_pair_ptr + position, i, mask=placed & (i < num_pairs))


def moe_routing(expert_ids: torch.Tensor, num_experts: int, padded_offsets_of, num_rows: int):
    """``padded_offsets_of(tokens_per_expert)`` gives the ``[E + 1]`` block-padded segment starts
    (shared with the reference, so both pad identically)."""
    flat = expert_ids.contiguous().view(-1)
    num_pairs = flat.shape[0]
    device = flat.device
    block_e = _block_of(num_experts)
    block_n = min(_rows_per_program(block_e) * 4, _block_of(num_pairs))
    num_blocks = triton.cdiv(num_pairs, block_n)
    block_counts = torch.zeros((num_blocks, num_experts), dtype=torch.int32, device=device)
    position = torch.empty(num_pairs, dtype=torch.int32, device=device)
    row_to_pair = torch.full((num_rows,), -1, dtype=torch.int32, device=device)
    if num_blocks > 0:
        _block_histogram_kernel[(num_blocks,)](flat, block_counts, num_pairs, num_experts,
                                               BLOCK_N=block_n, BLOCK_E=block_e)
    tokens_per_expert = block_counts.sum(0, dtype=torch.int32)
    padded_offsets = padded_offsets_of(tokens_per_expert)
    # Where block b's pairs of expert e start: the expert's segment plus the earlier blocks' counts.
    earlier_blocks = torch.cumsum(block_counts, 0, dtype=torch.int32) - block_counts
    block_starts = (padded_offsets[:-1][None, :] + earlier_blocks).contiguous()
    if num_blocks > 0:
        _scatter_positions_kernel[(num_blocks,)](flat, block_starts, position, row_to_pair,
                                                 num_pairs, num_experts, num_rows,
                                                 BLOCK_N=block_n, BLOCK_E=block_e)
    return tokens_per_expert, padded_offsets, position.view(expert_ids.shape), row_to_pair


# ---------------------------------------------------------------------------------------------------
# moe_permute / moe_unpermute: row gathers between token order [T, H] and grouped order [R, H].


@triton.jit
def _row_tile(num_rows, width, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's tile of a ``[num_rows, width]`` row-major grid: row and column indices and
    their in-bounds masks."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    return r, d, r < num_rows, d < width


@triton.jit
def _store_tile(out_ptr, values, r, d, r_in, d_in, width):
    tl.store(out_ptr + r[:, None].to(tl.int64) * width + d[None, :],
             values.to(out_ptr.dtype.element_ty), mask=r_in[:, None] & d_in[None, :])


@triton.jit
def _permute_rows_kernel(x_ptr, row_to_pair_ptr, scale_ptr, out_ptr, num_rows, num_pairs, width,
                         K: tl.constexpr, HAS_SCALE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r, d, r_in, d_in = _row_tile(num_rows, width, BLOCK_R, BLOCK_H)
    pair = tl.load(row_to_pair_ptr + r, mask=r_in, other=-1)
    placed = (pair >= 0) & (pair < num_pairs)  # padding rows (-1) are zero
    token = tl.where(placed, pair // K, 0).to(tl.int64)
    rows = tl.load(x_ptr + token[:, None] * width + d[None, :], mask=placed[:, None] & d_in[None, :],
                   other=0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + pair, mask=placed, other=0).to(ACC_DTYPE)
        rows = rows.to(ACC_DTYPE) * scale[:, None]
    _store_tile(out_ptr, rows, r, d, r_in, d_in, width)


@triton.jit
def _unpermute_rows_kernel(y_ptr, position_ptr, weights_ptr, out_ptr, num_tokens, num_rows, width,
                           K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    t, d, t_in, d_in = _row_tile(num_tokens, width, BLOCK_T, BLOCK_H)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=ACC_DTYPE)
    for j in tl.static_range(K):  # slot order: the same summation order as the reference
        row = tl.load(position_ptr + t * K + j, mask=t_in, other=-1)
        placed = (row >= 0) & (row < num_rows)
        y = tl.load(y_ptr + row[:, None].to(tl.int64) * width + d[None, :],
                    mask=placed[:, None] & d_in[None, :], other=0).to(ACC_DTYPE)
        if HAS_WEIGHTS:
            y *= tl.load(weights_ptr + t * K + j, mask=t_in, other=0).to(ACC_DTYPE)[:, None]
        acc += y
    _store_tile(out_ptr, acc, t, d, t_in, d_in, width)


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


def _row_grid(num_rows: int, width: int) -> tuple[int, int, int]:
    block_h = min(_block_of(width), _MAX_BLOCK_H)
    block_rows = min(_rows_per_program(block_h), _block_of(num_rows))
    return block_rows, block_h, triton.cdiv(width, block_h)


def permute_rows(x, position, row_to_pair, scale):
    x = x.contiguous()
    num_rows, width = row_to_pair.shape[0], x.shape[1]
    out = torch.empty((num_rows, width), dtype=x.dtype, device=x.device)
    if num_rows == 0 or width == 0:
        return out
    block_r, block_h, width_blocks = _row_grid(num_rows, width)
    _permute_rows_kernel[(triton.cdiv(num_rows, block_r), width_blocks)](
        x, row_to_pair, scale if scale is not None else row_to_pair, out, num_rows,
        position.numel(), width, K=max(position.shape[1], 1), HAS_SCALE=scale is not None,
        ACC_DTYPE=_acc_dtype(x.dtype), BLOCK_R=block_r, BLOCK_H=block_h)
    return out


def unpermute_rows(y, position, row_to_pair, weights):
    y = y.contiguous()
    (num_tokens, k), width = position.shape, y.shape[1]
    out = torch.empty((num_tokens, width), dtype=y.dtype, device=y.device)
    if num_tokens == 0 or width == 0:
        return out
    block_t, block_h, width_blocks = _row_grid(num_tokens, width)
    _unpermute_rows_kernel[(triton.cdiv(num_tokens, block_t), width_blocks)](
        y, position.contiguous(), weights.contiguous() if weights is not None else position, out,
        num_tokens, y.shape[0], width, K=k, HAS_WEIGHTS=weights is not None,
        ACC_DTYPE=_acc_dtype(y.dtype), BLOCK_T=block_t, BLOCK_H=block_h)
    return out


def pair_dots(grad, y, position, dtype):
    num_tokens, k = position.shape
    out = torch.empty((num_tokens, k), dtype=dtype, device=grad.device)
    if num_tokens == 0 or k == 0:
        return out
    block_t, block_h, _ = _row_grid(num_tokens, grad.shape[1])
    _pair_dots_kernel[(triton.cdiv(num_tokens, block_t), k)](
        grad.contiguous(), y.contiguous(), position.contiguous(), out, num_tokens, y.shape[0],
        grad.shape[1], K=k, ACC_DTYPE=_acc_dtype(y.dtype), BLOCK_T=block_t, BLOCK_H=block_h)
    return out


# ---------------------------------------------------------------------------------------------------
# moe_expert_mlp: grouped GEMMs over the plan's expert-grouped rows.
#
# A row tile [m0, m0 + BLOCK_M) meets the experts whose segments overlap it, found from padded_offsets
# on the device (no host sync): one expert when BLOCK_M divides the plan's block size (the GPU
# default), a few when the block size is smaller. Per expert the tile multiplies only the rows that
# hold that expert's pairs, so rows of other experts and padding rows add exact zeros, and a tile with
# no valid row does no multiply at all (padding blocks are never computed, only zero-filled). Weight
# gradients loop over one expert's rows in order: deterministic, no atomics, no split-K.

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the row-tiled kernels; the fused gate/up and
# SwiGLU-backward kernels hold two tiles of accumulators, hence a narrower BLOCK_N there.
_GPU_TILES = {2: (128, 128, 64, 8, 3), 4: (64, 64, 32, 4, 3)}  # by element size (fp32: IEEE dots)
# The interpreter's cost is per program: few, large tiles.
_INTERPRETER_TILES = (64, 128, 128, 1, 1)
_GROUP_M = 8


@triton.jit
def _swizzled_tile(num_rows, width, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   GROUP_M: tl.constexpr):
    """First row and column of this program's output tile, in groups of GROUP_M row tiles that share
    weight tiles in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(num_rows, BLOCK_M)
    tiles_n = tl.cdiv(width, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


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
def _gate_up_kernel(x_ptr, w1_ptr, w3_ptr, offsets_ptr, counts_ptr, act_ptr, h1_ptr, h3_ptr,
                    num_rows, hidden, ffn, num_experts, STORE_PRE: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr):
    """``act = silu(x @ w1[e].T) * (x @ w3[e].T)`` on ``[R, F]`` tiles, both GEMMs sharing the loads
    of x; ``h1``, ``h3`` (the two pre-activations) stored too when STORE_PRE."""
    m0, n0 = _swizzled_tile(num_rows, ffn, BLOCK_M, BLOCK_N, GROUP_M)
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first, stop = _tile_experts(offsets_ptr, m0, num_experts, BLOCK_M, BLOCK_E)
    for e in range(first, stop):
        valid, any_valid = _expert_rows(offsets_ptr, counts_ptr, e, rm, num_rows)
        if any_valid:
            for k0 in range(0, hidden, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + rm[:, None].to(tl.int64) * hidden + rk[None, :],
                            mask=valid[:, None] & (rk < hidden)[None, :], other=0)
                w1 = _weight_tile(w1_ptr, e, rn, rk, ffn, hidden, ffn * hidden, hidden, 1)
                w3 = _weight_tile(w3_ptr, e, rn, rk, ffn, hidden, ffn * hidden, hidden, 1)
                acc1 = tl.dot(x, w1, acc1, input_precision=PRECISION)
                acc3 = tl.dot(x, w3, acc3, input_precision=PRECISION)
    act = acc1 * tl.sigmoid(acc1) * acc3  # rows of no pair: 0 * 0
    out = rm[:, None].to(tl.int64) * ffn + rn[None, :]
    mask = (rm < num_rows)[:, None] & (rn < ffn)[None, :]
    tl.store(act_ptr + out, act.to(act_ptr.dtype.element_ty), mask=mask)
    if STORE_PRE:
        tl.store(h1_ptr + out, acc1.to(h1_ptr.dtype.element_ty), mask=mask)
        tl.store(h3_ptr + out, acc3.to(h3_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_gemm_kernel(a_ptr, w_ptr, a2_ptr, w2_ptr, out_ptr, offsets_ptr, counts_ptr,
                         h1_ptr, h3_ptr, dh3_ptr, act_ptr, num_rows, width, depth, num_experts,
                         stride_e, stride_n, stride_k, TWO: tl.constexpr,
                         SWIGLU_BACKWARD: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr):
    """``out[r] = A[r] @ W[e].T (+ A2[r] @ W2[e].T when TWO)`` for the rows r of expert e, with
    ``W[e][n, k]`` at ``e * stride_e + n * stride_n + k * stride_k`` (so either weight layout), A
    ``[R, depth]``, out ``[R, width]``; zero on rows of no pair.

    SWIGLU_BACKWARD: the product is the gradient of the activation, and the epilogue turns it, with
    the stored pre-activations h1, h3 ``[R, width]``, into ``out = d h1``, ``dh3`` and the
    activation itself (for the gradient of the down projection)."""
    m0, n0 = _swizzled_tile(num_rows, width, BLOCK_M, BLOCK_N, GROUP_M)
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first, stop = _tile_experts(offsets_ptr, m0, num_experts, BLOCK_M, BLOCK_E)
    for e in range(first, stop):
        valid, any_valid = _expert_rows(offsets_ptr, counts_ptr, e, rm, num_rows)
        if any_valid:
            for k0 in range(0, depth, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                a_off = rm[:, None].to(tl.int64) * depth + rk[None, :]
                a_mask = valid[:, None] & (rk < depth)[None, :]
                a = tl.load(a_ptr + a_off, mask=a_mask, other=0)
                w = _weight_tile(w_ptr, e, rn, rk, width, depth, stride_e, stride_n, stride_k)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
                if TWO:
                    a2 = tl.load(a2_ptr + a_off, mask=a_mask, other=0)
                    w2 = _weight_tile(w2_ptr, e, rn, rk, width, depth, stride_e, stride_n, stride_k)
                    acc = tl.dot(a2, w2, acc, input_precision=PRECISION)
    out = rm[:, None].to(tl.int64) * width + rn[None, :]
    mask = (rm < num_rows)[:, None] & (rn < width)[None, :]
    if SWIGLU_BACKWARD:
        # act = silu(h1) * h3: d h3 = d act * silu(h1), d h1 = d act * h3 * silu'(h1) with
        # silu'(h) = sigmoid(h) * (1 + h * (1 - sigmoid(h))). Padding rows hold h1 = h3 = 0 and
        # d act = 0, so all three are 0 there.
        h1 = tl.load(h1_ptr + out, mask=mask, other=0).to(tl.float32)
        h3 = tl.load(h3_ptr + out, mask=mask, other=0).to(tl.float32)
        sig = tl.sigmoid(h1)
        silu = h1 * sig
        tl.store(dh3_ptr + out, (acc * silu).to(dh3_ptr.dtype.element_ty), mask=mask)
        tl.store(act_ptr + out, (silu * h3).to(act_ptr.dtype.element_ty), mask=mask)
        acc = acc * h3 * sig * (1 + h1 * (1 - sig))
    tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expert_weight_grad_kernel(a_ptr, a2_ptr, b_ptr, out_ptr, out2_ptr, offsets_ptr, counts_ptr,
                               num_rows, rows_p, cols_q, TWO: tl.constexpr,
                               PRECISION: tl.constexpr, BLOCK_P: tl.constexpr,
                               BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    """``out[e] = A_e.T @ B_e`` (``[P, Q]``) over expert e's rows only, in row order (and
    ``out2[e] = A2_e.T @ B_e`` when TWO), with A, A2 ``[R, P]`` and B ``[R, Q]``."""
    tiles_q = tl.cdiv(cols_q, BLOCK_Q)
    rp = (tl.program_id(0) // tiles_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = (tl.program_id(0) % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    e = tl.program_id(1)
    start = tl.maximum(tl.load(offsets_ptr + e), 0)
    end = tl.minimum(tl.load(offsets_ptr + e) + tl.load(counts_ptr + e), num_rows)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_in = r < end
        b = tl.load(b_ptr + r[:, None].to(tl.int64) * cols_q + rq[None, :],
                    mask=r_in[:, None] & (rq < cols_q)[None, :], other=0)
        a_off = r[:, None].to(tl.int64) * rows_p + rp[None, :]
        a_mask = r_in[:, None] & (rp < rows_p)[None, :]
        a = tl.load(a_ptr + a_off, mask=a_mask, other=0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        if TWO:
            a2 = tl.load(a2_ptr + a_off, mask=a_mask, other=0)
            acc2 = tl.dot(tl.trans(a2), b, acc2, input_precision=PRECISION)
    out = e.to(tl.int64) * rows_p * cols_q + rp[:, None] * cols_q + rq[None, :]
    mask = (rp < rows_p)[:, None] & (rq < cols_q)[None, :]
    tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if TWO:
        tl.store(out2_ptr + out, acc2.to(out2_ptr.dtype.element_ty), mask=mask)


def _tiles(dtype: torch.dtype, device: torch.device):
    if device.type == "cpu":
        return _INTERPRETER_TILES
    return _GPU_TILES[2 if dtype in (torch.float16, torch.bfloat16) else 4]


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs: IEEE products, as torch.matmul gives by default (no TF32).
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_tiled(kernel, num_rows, width, *args, narrow=False, **meta):
    """Launches a row-tiled kernel over ``[num_rows, width]`` outputs with this dtype's tiles."""
    dtype, device = meta.pop("dtype"), meta.pop("device")
    block_m, block_n, block_k, warps, stages = _tiles(dtype, device)
    if narrow and device.type != "cpu":
        block_n //= 2  # two accumulators per program
    grid = (triton.cdiv(num_rows, block_m) * triton.cdiv(width, block_n),)
    if grid[0] == 0:
        return
    kernel[grid](*args, PRECISION=_precision(dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_K=block_k, GROUP_M=_GROUP_M, num_warps=warps, num_stages=stages, **meta)


def _weight_grad(a, a2, b, counts, offsets):
    """Per-expert ``A_e.T @ B_e`` (and ``A2_e.T @ B_e``): ``[E, P, Q]`` in A's dtype."""
    num_experts, (num_rows, rows_p), cols_q = counts.shape[0], a.shape, b.shape[1]
    out = torch.empty((num_experts, rows_p, cols_q), dtype=a.dtype, device=a.device)
    out2 = torch.empty_like(out) if a2 is not None else None
    block_p, block_q, block_r, warps, stages = _tiles(a.dtype, a.device)
    if a.device.type != "cpu" and a2 is not None:
        block_q //= 2
    grid = (triton.cdiv(rows_p, block_p) * triton.cdiv(cols_q, block_q), num_experts)
    if out.numel():
        _expert_weight_grad_kernel[grid](
            a, a2 if a2 is not None else a, b, out, out2 if a2 is not None else out, offsets,
            counts, num_rows, rows_p, cols_q, TWO=a2 is not None, PRECISION=_precision(a.dtype),
            BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_R=block_r, num_warps=warps, num_stages=stages)
    return out, out2


def moe_expert_mlp(x, w1, w3, w2, tokens_per_expert, padded_offsets, store_pre):
    """Forward: ``(y [R, H], h1 [R, F], h3 [R, F])``, h1 and h3 empty unless ``store_pre``."""
    x, w1, w3, w2 = (t.contiguous() for t in (x, w1, w3, w2))
    (num_rows, hidden), ffn, num_experts = x.shape, w1.shape[1], w1.shape[0]
    act = torch.empty((num_rows, ffn), dtype=x.dtype, device=x.device)
    pre_rows = num_rows if store_pre else 0
    h1, h3 = (torch.empty((pre_rows, ffn), dtype=x.dtype, device=x.device) for _ in "13")
    common = dict(BLOCK_E=_block_of(num_experts), dtype=x.dtype, device=x.device)
    _row_tiled(_gate_up_kernel, num_rows, ffn, x, w1, w3, padded_offsets, tokens_per_expert, act,
               h1 if store_pre else act, h3 if store_pre else act, num_rows, hidden, ffn,
               num_experts, narrow=True, STORE_PRE=store_pre, **common)
    y = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    # y = act @ w2[e].T: W[e][n, k] = w2[e, n, k] with n over H, k over F.
    _row_tiled(_grouped_gemm_kernel, num_rows, hidden, act, w2, act, w2, y, padded_offsets,
               tokens_per_expert, act, act, act, act, num_rows, hidden, ffn, num_experts,
               hidden * ffn, ffn, 1, TWO=False, SWIGLU_BACKWARD=False, **common)
    return y, h1, h3


def moe_expert_mlp_backward(grad_y, x, w1, w3, w2, tokens_per_expert, padded_offsets, h1, h3):
    """``(dx, dw1, dw3, dw2)`` from the pre-activations h1, h3 ``[R, F]`` of the forward."""
    grad_y, x, w1, w3, w2 = (t.contiguous() for t in (grad_y, x, w1, w3, w2))
    (num_rows, hidden), ffn, num_experts = x.shape, w1.shape[1], w1.shape[0]
    common = dict(BLOCK_E=_block_of(num_experts), dtype=x.dtype, device=x.device)
    dh1, dh3, act = (torch.empty((num_rows, ffn), dtype=x.dtype, device=x.device) for _ in "123")
    # d act = dy @ w2[e]: W[e][n, k] = w2[e, k, n] with n over F, k over H.
    _row_tiled(_grouped_gemm_kernel, num_rows, ffn, grad_y, w2, grad_y, w2, dh1, padded_offsets,
               tokens_per_expert, h1.contiguous(), h3.contiguous(), dh3, act, num_rows, ffn,
               hidden, num_experts, hidden * ffn, 1, ffn, TWO=False, SWIGLU_BACKWARD=True,
               narrow=True, **common)
    # dx = dh1 @ w1[e] + dh3 @ w3[e]: W[e][n, k] = w[e, k, n] with n over H, k over F.
    grad_x = torch.empty_like(x)
    _row_tiled(_grouped_gemm_kernel, num_rows, hidden, dh1, w1, dh3, w3, grad_x, padded_offsets,
               tokens_per_expert, dh1, dh1, dh1, dh1, num_rows, hidden, ffn, num_experts,
               ffn * hidden, 1, hidden, TWO=True, SWIGLU_BACKWARD=False, narrow=True, **common)
    grad_w1, grad_w3 = _weight_grad(dh1, dh3, x, tokens_per_expert, padded_offsets)
    grad_w2, _ = _weight_grad(grad_y, None, act, tokens_per_expert, padded_offsets)
    return grad_x, grad_w1, grad_w3, grad_w2
