"""``topk_gating``: the MoE router. Softmax in float32, top-k, renormalisation, and the router's
auxiliary losses (Switch load balancing, z-loss) from one pass over the logits, with the backward to
the logits.

Backends: ``cpp`` (``csrc/moe/moe_cpu.cpp``: the forward; its backward is the reference's),
``triton`` (``sphinx_kernels/triton/topk_gating.py``), ``reference`` (:func:`topk_gating_reference`,
its backward :func:`topk_gating_backward_reference`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from sphinx_kernels._validation import (
    mark_index_range_checked,
    require_tensor,
    should_check_values,
)
from sphinx_kernels.backends import Backend, Impl, OpBackends
from sphinx_kernels.dtypes import KERNEL_DTYPES, accumulate_dtype
from sphinx_kernels.kernel_op import kernel_op
from sphinx_kernels.platforms import CPP, REFERENCE, TRITON, native, triton_launcher, triton_module

__all__ = ["Gating", "topk_gating", "topk_gating_reference", "topk_gating_backward_reference",
           "TOPK_GATING_BACKENDS"]


class Gating(NamedTuple):
    """What ``topk_gating`` returns for logits ``[T, E]`` and ``k`` experts per token."""

    weights: torch.Tensor            # [T, k] float32: the chosen experts' gates, by descending prob
    expert_ids: torch.Tensor         # [T, k] int32: the chosen experts, in [0, E)
    load_balancing_loss: torch.Tensor  # [] float32
    z_loss: torch.Tensor             # [] float32
    tokens_per_expert: torch.Tensor  # [E] int32: (token, slot) pairs routed to each expert



def topk_gating(logits: torch.Tensor, k: int, *, renormalize: bool = True,
                backend: str | None = None) -> Gating:
    """Softmax router with top-k choice and its auxiliary losses, in one pass over ``logits``.

    Args:
        logits: ``[T, E]`` float16, bfloat16 or float32 router logits (any strides); ``T`` may be 0.
        k: experts per token, ``1 <= k <= E``.
        renormalize: scale each token's k gates to sum to 1 (Mixtral); else they are the
            probabilities themselves.
        backend: force one of ``TOPK_GATING_BACKENDS.names``.

    Returns:
        :class:`Gating`. Probabilities are ``softmax(logits)`` in float32 (at least: the Triton
        kernel evaluates them in float64 and rounds once); the k experts of a token are its k
        largest probabilities in descending order, a tie going to the lower expert id.
        ``load_balancing_loss = E * sum_e f_e * P_e`` with ``f_e`` the fraction of the ``T * k``
        pairs routed to ``e`` and ``P_e`` the mean probability of ``e`` over tokens;
        ``z_loss = mean_t logsumexp(logits[t])^2``. Both are 0 for ``T == 0``.

    Autograd: ``weights``, ``load_balancing_loss`` and ``z_loss`` are differentiable w.r.t.
    ``logits`` (the choice of experts and the counts are not); the gradient has the logits' dtype.

    Non-finite logits, the same rule on every backend: a row whose softmax is undefined (a NaN or
    +inf logit, or every logit -inf: its logsumexp is not finite) has NaN probabilities and is
    routed to experts ``0 .. k-1`` (in range, counted in ``tokens_per_expert``) with NaN gates, so
    its tokens' expert outputs, both losses and that row's gradient turn NaN: a training step's
    loss is NaN, which the trainer's non-finite check skips. Rows with some -inf logits and a
    finite one are ordinary (those experts have probability 0). Other rows are unaffected.
    """
    _check_topk_gating(logits, k, renormalize)
    request = TOPK_GATING_BACKENDS.request(logits.device, logits.dtype)
    chosen = TOPK_GATING_BACKENDS.select(request, backend)
    gating = Gating(*_topk_gating_op(logits, k, renormalize, chosen.name))
    if should_check_values(gating.expert_ids):
        # In [0, E) by construction: moe_routing's range check need not read them back.
        mark_index_range_checked(gating.expert_ids, logits.shape[1])
    return gating


def _gating_losses(prob_sums: torch.Tensor, counts: torch.Tensor, lse_square_sum: torch.Tensor,
                   num_tokens: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two losses from per-expert probability sums, per-expert pair counts and sum_t lse_t^2."""
    tokens = max(num_tokens, 1)  # T == 0: every sum is 0, and so is each loss
    # E * sum_e (count_e / (T k)) * (prob_sum_e / T), as one dot product.
    load_balancing = (counts.to(prob_sums.dtype) @ prob_sums) * (counts.shape[0]
                                                                 / (tokens * tokens * k))
    return load_balancing, lse_square_sum / tokens


def _softmax_with_rule(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, lse)`` of logits ``x`` ``[T, E]``: the softmax and logsumexp per row, both NaN on
    a row whose softmax is undefined (its logsumexp is not finite): ``topk_gating``'s rule. torch's
    softmax subtracts the row's maximum, which makes every probability of such a row NaN (a NaN, or
    inf - inf); its logsumexp, +-inf for a +inf or an all -inf row, is set to NaN here."""
    lse = torch.logsumexp(x, dim=-1)
    # lse - lse is 0 where lse is finite and NaN where it is not (one cheap op, no where/scalar).
    return torch.softmax(x, dim=-1), lse + (lse - lse)


def topk_gating_reference(logits: torch.Tensor, k: int, renormalize: bool = True) -> Gating:
    """Pure-PyTorch ``topk_gating``, differentiable by autograd. float64 logits are computed (and
    returned) in float64: the tests' oracle."""
    x = logits.to(accumulate_dtype(logits.dtype))
    probs, lse = _softmax_with_rule(x)
    # A stable descending sort keeps equal probabilities in ascending expert order: lower id first.
    # It orders NaN above every number, so an undefined row (all NaN) gets experts 0 .. k-1.
    expert_ids = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(1, expert_ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    counts = torch.bincount(expert_ids.reshape(-1), minlength=logits.shape[1])
    losses = _gating_losses(probs.sum(0), counts, lse @ lse, logits.shape[0], k)
    return Gating(weights, expert_ids.int(), *losses, counts.int())


def topk_gating_backward_reference(logits, expert_ids, weights, tokens_per_expert, grad_weights,
                                   grad_lb, grad_z, renormalize):
    """The gradient of the logits for the gradients of the weights and of the two losses, written
    out (a custom op's implementation runs below autograd)."""
    acc = accumulate_dtype(logits.dtype)
    x = logits.to(acc)
    probs, lse = _softmax_with_rule(x)
    lse = lse[:, None]
    (num_tokens, num_experts), k = logits.shape, expert_ids.shape[1]
    tokens = max(num_tokens, 1)
    ids = expert_ids.long()
    grad_chosen = grad_weights.to(acc)
    if renormalize:  # w_j = p_j / S: d/dp_j = (g_j - sum_l g_l w_l) / S
        chosen_sum = probs.gather(1, ids).sum(1, keepdim=True)
        grad_chosen = (grad_chosen - (grad_chosen * weights).sum(1, keepdim=True)) / chosen_sum
    lb_scale = grad_lb.to(acc) * num_experts / (tokens * tokens * k)
    grad_probs = (lb_scale * tokens_per_expert.to(acc)).expand(num_tokens, num_experts)
    grad_probs = grad_probs.scatter_add(1, ids, grad_chosen)
    inner = (grad_probs * probs).sum(1, keepdim=True)
    z_scale = 2 * grad_z.to(acc) / tokens
    return (probs * (grad_probs - inner + z_scale * lse)).to(logits.dtype)


def _reference_forward(logits, k, renormalize):
    return tuple(topk_gating_reference(logits, k, renormalize))


def _triton_forward(logits, k, renormalize):
    # The kernel's partial sums are float64; the losses are rounded to float32 once, at the end.
    kernels = triton_module("topk_gating")
    weights, expert_ids, prob_sums, counts, lse_square_sum = kernels.topk_gating(logits, k,
                                                                                 renormalize)
    losses = _gating_losses(prob_sums, counts, lse_square_sum, logits.shape[0], k)
    return weights, expert_ids, *(loss.float() for loss in losses), counts


# Impl: forward(logits, k, renormalize) -> the Gating fields in order; backward(logits, expert_ids,
# weights, tokens_per_expert, grad_weights, grad_lb, grad_z, renormalize) -> the logits' gradient.
# Every backend serves every input that passes validation.
TOPK_GATING_BACKENDS = OpBackends("topk_gating", [
    # The backward is E values per token, a few vector ops over [T, E]: the reference serves.
    Backend(CPP, Impl(native("topk_gating_native"), topk_gating_backward_reference),
            KERNEL_DTYPES),
    Backend(TRITON, Impl(_triton_forward, triton_launcher("topk_gating", "topk_gating_backward")),
            KERNEL_DTYPES),
    Backend(REFERENCE, Impl(_reference_forward, topk_gating_backward_reference), KERNEL_DTYPES),
])


@kernel_op("sphinx_kernels::topk_gating")
def _topk_gating_op(logits: torch.Tensor, k: int, renormalize: bool, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    outputs = TOPK_GATING_BACKENDS[backend].impl.forward(logits=logits, k=k,
                                                         renormalize=renormalize)
    return tuple(t.contiguous() for t in outputs)


@_topk_gating_op.register_fake
def _(logits, k, renormalize, backend):
    num_tokens, num_experts = logits.shape
    scalar = logits.new_empty((), dtype=torch.float32)
    return (logits.new_empty((num_tokens, k), dtype=torch.float32),
            logits.new_empty((num_tokens, k), dtype=torch.int32), scalar, scalar.clone(),
            logits.new_empty((num_experts,), dtype=torch.int32))


@kernel_op("sphinx_kernels::topk_gating_backward")
def _topk_gating_backward_op(logits: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                             tokens_per_expert: torch.Tensor, grad_weights: torch.Tensor,
                             grad_lb: torch.Tensor, grad_z: torch.Tensor, renormalize: bool,
                             backend: str) -> torch.Tensor:
    return TOPK_GATING_BACKENDS[backend].impl.backward(
        logits=logits, expert_ids=expert_ids, weights=weights, tokens_per_expert=tokens_per_expert,
        grad_weights=grad_weights, grad_lb=grad_lb, grad_z=grad_z, renormalize=renormalize)


@_topk_gating_backward_op.register_fake
def _(logits, expert_ids, weights, tokens_per_expert, grad_weights, grad_lb, grad_z, renormalize,
      backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, _, renormalize, backend = inputs
    weights, expert_ids, _, _, tokens_per_expert = output
    ctx.save_for_backward(logits, expert_ids, weights, tokens_per_expert)
    ctx.renormalize = renormalize
    ctx.backend = backend
    ctx.mark_non_differentiable(expert_ids, tokens_per_expert)
    # Outputs the loss did not reach get None in the backward, not zero-filled gradients: the
    # ids and counts always, the weights or a loss term when unused (read as zero there).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_weights, _grad_ids, grad_lb, grad_z, _grad_counts):
    logits, expert_ids, weights, tokens_per_expert = ctx.saved_tensors
    # An output that was not used in the loss gets no gradient: it contributes zero.
    grad_weights = torch.zeros_like(weights) if grad_weights is None else grad_weights.float()
    grad_lb, grad_z = (torch.zeros((), device=logits.device) if g is None else g.float()
                       for g in (grad_lb, grad_z))
    grad = _topk_gating_backward_op(logits, expert_ids, weights, tokens_per_expert, grad_weights,
                                    grad_lb, grad_z, ctx.renormalize, ctx.backend)
    return grad, None, None, None


_topk_gating_op.register_autograd(_backward, setup_context=_setup_context)


def _check_topk_gating(logits, k, renormalize) -> None:
    require_tensor("logits", logits, dims=2, dtypes=KERNEL_DTYPES)
    num_experts = logits.shape[1]
    if num_experts < 1:
        raise ValueError(f"logits must have at least one expert column, got shape "
                         f"{tuple(logits.shape)}")
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, E] = [1, {num_experts}] (E from logits), got {k}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
