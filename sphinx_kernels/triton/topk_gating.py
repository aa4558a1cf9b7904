"""Triton kernels of ``topk_gating``: the fused softmax / top-k / losses forward and its backward to
the logits. Contract: ``sphinx_kernels.ops.topk_gating``.

The router's softmax is float64 (E values per token: negligible next to the experts) and every
other sum float32; no bf16 arithmetic (which the interpreter gets wrong) and no atomics: results
are deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sphinx_kernels.triton.common import block_of, rows_per_program


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
def _apply_undefined_rule(probs, lse):
    """``topk_gating``'s rule for a row whose softmax is undefined (a NaN or +inf logit, or every
    logit -inf): its logsumexp is not finite, whatever the softmax's arithmetic made of it; its
    probabilities and logsumexp become NaN. Returns them and the rows' flags."""
    undefined = ~(tl.abs(lse) < float("inf"))
    return (tl.where(undefined[:, None], float("nan"), probs),
            tl.where(undefined, float("nan"), lse), undefined)


@triton.jit
def _topk_gating_kernel(logits_ptr, weights_ptr, ids_ptr, prob_sums_ptr, counts_ptr, z_sums_ptr,
                        num_tokens, num_experts, K: tl.constexpr, RENORMALIZE: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    t_in = t < num_tokens
    probs64, lse = _softmax_rows(logits_ptr, t, e, num_tokens, num_experts)
    probs64, lse, undefined = _apply_undefined_rule(probs64, lse)
    probs = probs64.to(tl.float32)
    # Top-k of the float32 probabilities by k rounds of argmax; a tie goes to the lowest expert id,
    # and a chosen expert is masked with -1 (below every probability) so padding columns and
    # earlier picks are never chosen again. An undefined row's candidates are all 0: experts
    # 0 .. k-1 (and no NaN reaches the argmax, which GPUs and the interpreter order differently).
    candidates = tl.where((e < num_experts)[None, :], tl.where(undefined[:, None], 0.0, probs),
                          -1.0)
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
    probs64, lse64, _ = _apply_undefined_rule(probs64, lse64)
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


# Logits a program holds on a GPU (64 tokens of 8 experts): the float64 softmax keeps a few values
# per thread in registers (70 at Mixtral's 8 experts on sm_90 and sm_80, no spills; 512 tokens
# per program took 255 and spilled about 1 KB, python -m sphinx_kernels.aot).
_GPU_ELEMENTS = 512


def _gating_grid(num_tokens: int, num_experts: int,
                 device: torch.device) -> tuple[int, int, int]:
    """(programs, tokens per program, expert block): a tile of rows per program, small on a GPU
    (registers), large under the interpreter (whose cost is per program)."""
    block_e = block_of(num_experts)
    per_program = (rows_per_program(block_e) if device.type == "cpu"
                   else max(1, _GPU_ELEMENTS // block_e))
    block_t = min(per_program, block_of(num_tokens))
    return triton.cdiv(num_tokens, block_t), block_t, block_e


def topk_gating(logits: torch.Tensor, k: int, renormalize: bool):
    """``(weights [T, k] float32, expert_ids [T, k] int32, float64 probability sums [E], int32 pair
    counts [E], float64 sum of lse^2)``: the per-block partial sums reduced in a fixed order."""
    logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    device = logits.device
    num_blocks, block_t, block_e = _gating_grid(num_tokens, num_experts, device)
    weights = torch.empty((num_tokens, k), dtype=torch.float32, device=device)
    expert_ids = torch.empty((num_tokens, k), dtype=torch.int32, device=device)
    prob_sums = torch.zeros((num_blocks, num_experts), dtype=torch.float64, device=device)
    counts = torch.zeros((num_blocks, num_experts), dtype=torch.int32, device=device)
    z_sums = torch.zeros((num_blocks,), dtype=torch.float64, device=device)
    if num_blocks > 0:
        _topk_gating_kernel[(num_blocks,)](
            logits_ptr=logits, weights_ptr=weights, ids_ptr=expert_ids, prob_sums_ptr=prob_sums,
            counts_ptr=counts, z_sums_ptr=z_sums, num_tokens=num_tokens, num_experts=num_experts,
            K=k, RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_of(k))
    return weights, expert_ids, prob_sums.sum(0), counts.sum(0, dtype=torch.int32), z_sums.sum()


def topk_gating_backward(logits, expert_ids, weights, tokens_per_expert, grad_weights, grad_lb,
                         grad_z, renormalize):
    """The logits' gradient, in their dtype."""
    logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    grad_logits = torch.empty_like(logits)
    num_blocks, block_t, block_e = _gating_grid(num_tokens, num_experts, logits.device)
    if num_blocks > 0:
        _topk_gating_backward_kernel[(num_blocks,)](
            logits_ptr=logits, ids_ptr=expert_ids.contiguous(), weights_ptr=weights.contiguous(),
            counts_ptr=tokens_per_expert.contiguous(), grad_weights_ptr=grad_weights.contiguous(),
            grad_lb_ptr=grad_lb, grad_z_ptr=grad_z, grad_logits_ptr=grad_logits,
            num_tokens=num_tokens, num_experts=num_experts, K=expert_ids.shape[1],
            RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e)
    return grad_logits
