"""Kernel family 3: block-sparse Mixture-of-Experts routing (dropless).

Ops:
    topk_gating: softmax in float32, top-k, renormalisation, and the router's auxiliary losses
        (Switch load balancing, z-loss) from one pass over the logits. Backends: triton, reference.
    moe_routing: the routing plan: tokens per expert, block-padded expert segments and each
        (token, slot) pair's row in expert-grouped order, from a histogram, a prefix sum and a
        scatter (no sort, no host sync, static shapes). Backends: cuda, cpp, triton, reference.
    moe_permute / moe_unpermute: token order ``[T, H]`` to expert-grouped block-padded order
        ``[R, H]`` and back (the weighted sum over each token's k slots); each is the other's
        backward. Backends: cpp, triton, reference.
    moe_expert_mlp: every expert's SwiGLU MLP on its grouped rows: grouped GEMMs that skip padding
        blocks, gate and up projections fused with the SwiGLU; forward and backward (optionally
        recomputing the activation). Backends: triton, reference.

Expert parallelism: the plan and the permutation are where it would enter. With experts sharded
over ranks, the grouped rows of ``moe_permute`` are exchanged by an all-to-all (each rank sending
``padded_offsets``-delimited segments to the rank owning those experts, after exchanging
``tokens_per_expert``), ``moe_expert_mlp`` runs on the local experts' rows with a local plan, and
the reverse all-to-all precedes ``moe_unpermute``. Nothing here assumes all experts are local
beyond the shapes the caller passes.

Each op has a pure-PyTorch reference beside it (``*_reference``), which the tests compare against.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from sphinx_kernels._validation import (INDEX_DTYPES, dtype_name, require_device,
                                        require_index_range, require_tensor, should_check_values)
from sphinx_kernels.backends import (CPP, CUDA, FLOAT_DTYPES, REFERENCE, TRITON, Backend,
                                     OpBackends, Request, native_ops)

__all__ = ["Gating", "RoutingPlan", "topk_gating", "topk_gating_reference", "moe_routing",
           "moe_routing_reference", "moe_permute", "moe_permute_reference", "moe_unpermute",
           "moe_unpermute_reference", "padded_rows_bound", "TOPK_GATING_BACKENDS",
           "MOE_ROUTING_BACKENDS", "MOE_PERMUTE_BACKENDS", "MOE_UNPERMUTE_BACKENDS",
           "moe_expert_mlp", "moe_expert_mlp_reference", "MOE_EXPERT_MLP_BACKENDS"]

GATING_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


class Gating(NamedTuple):
    """What ``topk_gating`` returns for logits ``[T, E]`` and ``k`` experts per token."""

    weights: torch.Tensor            # [T, k] float32: the chosen experts' gates, by descending prob
    expert_ids: torch.Tensor         # [T, k] int32: the chosen experts, in [0, E)
    load_balancing_loss: torch.Tensor  # [] float32
    z_loss: torch.Tensor             # [] float32
    tokens_per_expert: torch.Tensor  # [E] int32: (token, slot) pairs routed to each expert


class RoutingPlan(NamedTuple):
    """Where every (token, slot) pair goes in expert-grouped, block-padded order (int32 tensors).

    Expert ``e`` owns rows ``padded_offsets[e]:padded_offsets[e + 1]``: its
    ``tokens_per_expert[e]`` pairs in (token, slot) order, then zero rows up to a multiple of the block
    size. Rows past ``padded_offsets[E]`` (up to the static bound ``R``) are padding too.
    """

    tokens_per_expert: torch.Tensor  # [E]
    padded_offsets: torch.Tensor     # [E + 1], padded_offsets[0] == 0, multiples of block_size
    position: torch.Tensor           # [T, k]: row of pair (t, j), in [0, R)
    row_to_pair: torch.Tensor        # [R]: pair t * k + j held by the row, -1 for a padding row

    @property
    def num_padded_rows(self) -> int:
        """``R``, the static number of grouped rows (an upper bound of ``padded_offsets[E]``)."""
        return self.row_to_pair.shape[0]


def padded_rows_bound(num_pairs: int, num_experts: int, block_size: int) -> int:
    """``R``: the largest multiple of ``block_size`` that every routing of ``num_pairs`` pairs to
    ``num_experts`` experts may need (each expert wastes at most ``block_size - 1`` rows), known from
    shapes alone so that no op needs a host sync."""
    return (num_pairs + num_experts * (block_size - 1)) // block_size * block_size


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton_kernels():
    from sphinx_kernels.triton import moe
    return moe


# ---------------------------------------------------------------------------------------------------
# topk_gating


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
        ``load_balancing_loss = E * sum_e f_e * P_e`` with ``f_e`` the fraction of the ``T * k`` pairs
        routed to ``e`` and ``P_e`` the mean probability of ``e`` over tokens;
        ``z_loss = mean_t logsumexp(logits[t])^2``. Both are 0 for ``T == 0``.

    Autograd: ``weights``, ``load_balancing_loss`` and ``z_loss`` are differentiable w.r.t. ``logits``
    (the choice of experts and the counts are not); the gradient has the logits' dtype.
    """
    _check_topk_gating(logits, k, renormalize)
    chosen = TOPK_GATING_BACKENDS.select(Request(logits.device, logits.dtype), backend)
    return Gating(*_topk_gating_op(logits, k, renormalize, chosen.name))


def _gating_losses(prob_sums: torch.Tensor, counts: torch.Tensor, lse_square_sum: torch.Tensor,
                   num_tokens: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two losses from per-expert probability sums, per-expert pair counts and sum_t lse_t^2."""
    tokens = max(num_tokens, 1)  # T == 0: every sum is 0, and so is each loss
    fraction = counts.to(prob_sums.dtype) / (tokens * k)
    load_balancing = counts.shape[0] * (fraction * prob_sums / tokens).sum()
    return load_balancing, lse_square_sum / tokens


def topk_gating_reference(logits: torch.Tensor, k: int, renormalize: bool = True) -> Gating:
    """Pure-PyTorch ``topk_gating``, differentiable by autograd. float64 logits are computed (and
    returned) in float64: the tests' oracle."""
    x = logits.to(_acc_dtype(logits.dtype))
    probs = torch.softmax(x, dim=-1)
    # A stable descending sort keeps equal probabilities in ascending expert order: lower id first.
    expert_ids = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(1, expert_ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    counts = torch.bincount(expert_ids.reshape(-1), minlength=logits.shape[1])
    lse = torch.logsumexp(x, dim=-1)
    losses = _gating_losses(probs.sum(0), counts, (lse * lse).sum(), logits.shape[0], k)
    return Gating(weights, expert_ids.int(), *losses, counts.int())


def _topk_gating_backward_reference(logits, expert_ids, weights, tokens_per_expert, grad_weights,
                                    grad_lb, grad_z, renormalize):
    acc = _acc_dtype(logits.dtype)
    x = logits.to(acc)
    probs = torch.softmax(x, dim=-1)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
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


def _reference_topk_gating(logits, k, renormalize):
    return tuple(topk_gating_reference(logits, k, renormalize))


def _triton_topk_gating(logits, k, renormalize):
    # The kernel's partial sums are float64; the losses are rounded to float32 once, at the end.
    weights, expert_ids, prob_sums, counts, lse_square_sum = _triton_kernels().topk_gating(
        logits, k, renormalize)
    losses = _gating_losses(prob_sums, counts, lse_square_sum, logits.shape[0], k)
    return weights, expert_ids, *(loss.float() for loss in losses), counts


def _triton_topk_gating_backward(*args):
    return _triton_kernels().topk_gating_backward(*args)


# impl: (forward, backward). Every backend serves every input that passes validation.
TOPK_GATING_BACKENDS = OpBackends("topk_gating", [
    Backend(TRITON, (_triton_topk_gating, _triton_topk_gating_backward), GATING_DTYPES),
    Backend(REFERENCE, (_reference_topk_gating, _topk_gating_backward_reference), GATING_DTYPES),
])


@torch.library.custom_op("sphinx_kernels::topk_gating", mutates_args=())
def _topk_gating_op(logits: torch.Tensor, k: int, renormalize: bool, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    forward, _ = TOPK_GATING_BACKENDS[backend].impl
    return tuple(t.contiguous() for t in forward(logits, k, renormalize))


@_topk_gating_op.register_fake
def _(logits, k, renormalize, backend):
    num_tokens, num_experts = logits.shape
    scalar = logits.new_empty((), dtype=torch.float32)
    return (logits.new_empty((num_tokens, k), dtype=torch.float32),
            logits.new_empty((num_tokens, k), dtype=torch.int32), scalar, scalar.clone(),
            logits.new_empty((num_experts,), dtype=torch.int32))


@torch.library.custom_op("sphinx_kernels::topk_gating_backward", mutates_args=())
def _topk_gating_backward_op(logits: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                             tokens_per_expert: torch.Tensor, grad_weights: torch.Tensor,
                             grad_lb: torch.Tensor, grad_z: torch.Tensor, renormalize: bool,
                             backend: str) -> torch.Tensor:
    _, backward = TOPK_GATING_BACKENDS[backend].impl
    return backward(logits, expert_ids, weights, tokens_per_expert, grad_weights, grad_lb, grad_z,
                    renormalize)


@_topk_gating_backward_op.register_fake
def _(logits, expert_ids, weights, tokens_per_expert, grad_weights, grad_lb, grad_z, renormalize,
      backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _topk_gating_setup_context(ctx, inputs, output):
    logits, _, renormalize, backend = inputs
    weights, expert_ids, _, _, tokens_per_expert = output
    ctx.save_for_backward(logits, expert_ids, weights, tokens_per_expert)
    ctx.renormalize = renormalize
    ctx.backend = backend
    ctx.mark_non_differentiable(expert_ids, tokens_per_expert)


def _topk_gating_backward(ctx, grad_weights, _grad_ids, grad_lb, grad_z, _grad_counts):
    logits, expert_ids, weights, tokens_per_expert = ctx.saved_tensors
    # An output that was not used in the loss gets no gradient: it contributes zero.
    grad_weights = torch.zeros_like(weights) if grad_weights is None else grad_weights.float()
    grad_lb, grad_z = (torch.zeros((), device=logits.device) if g is None else g.float()
                       for g in (grad_lb, grad_z))
    grad = _topk_gating_backward_op(logits, expert_ids, weights, tokens_per_expert, grad_weights,
                                    grad_lb, grad_z, ctx.renormalize, ctx.backend)
    return grad, None, None, None


_topk_gating_op.register_autograd(_topk_gating_backward, setup_context=_topk_gating_setup_context)


def _check_topk_gating(logits, k, renormalize) -> None:
    require_tensor("logits", logits, dims=2, dtypes=sorted(GATING_DTYPES, key=str))
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


# ---------------------------------------------------------------------------------------------------
# moe_routing


def moe_routing(expert_ids: torch.Tensor, num_experts: int, *, block_size: int = 128,
                backend: str | None = None) -> RoutingPlan:
    """The routing plan of top-k choices: a histogram, a prefix sum and a scatter (no global sort).

    Args:
        expert_ids: ``[T, k]`` int32 or int64 expert of each (token, slot) pair, in
            ``[0, num_experts)`` (``Gating.expert_ids``); ``T`` may be 0.
        num_experts: ``E >= 1``.
        block_size: rows of one expert GEMM block: each expert's segment is padded to a multiple.
        backend: force one of ``MOE_ROUTING_BACKENDS.names``.

    Returns:
        :class:`RoutingPlan` of int32 tensors on ``expert_ids``'s device, with
        ``R = padded_rows_bound(T * k, E, block_size)`` grouped rows: static shapes, no host sync.
        Pairs of one expert keep (token, slot) order (stable); experts with no pair own no rows.
        Data only: no autograd.

    Expert ids are validated on the CPU; on a GPU only with ``SPHINX_KERNELS_CHECK_INPUTS=1``, and a
    pair with an out-of-range id that reaches a kernel is placed nowhere (position -1).
    """
    _check_moe_routing(expert_ids, num_experts, block_size)
    request = Request(expert_ids.device, expert_ids.dtype, {"num_experts": num_experts})
    chosen = MOE_ROUTING_BACKENDS.select(request, backend)
    return RoutingPlan(*_moe_routing_op(expert_ids, num_experts, block_size, chosen.name))


def _padded_offsets(tokens_per_expert: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[E + 1]`` int32 starts of the experts' segments, each padded to a multiple of block_size."""
    padded = (tokens_per_expert + block_size - 1) // block_size * block_size
    return torch.nn.functional.pad(torch.cumsum(padded, 0, dtype=torch.int32), (1, 0))


def moe_routing_reference(expert_ids: torch.Tensor, num_experts: int,
                          block_size: int = 128) -> RoutingPlan:
    """Pure-PyTorch ``moe_routing``: a one-hot running count gives each pair's stable rank."""
    flat = expert_ids.reshape(-1).long()
    one_hot = torch.nn.functional.one_hot(flat, num_experts)
    tokens_per_expert = one_hot.sum(0, dtype=torch.int32)
    padded_offsets = _padded_offsets(tokens_per_expert, block_size)
    rank = (one_hot.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)
    position = padded_offsets[:-1].long()[flat] + rank
    num_rows = padded_rows_bound(flat.shape[0], num_experts, block_size)
    row_to_pair = torch.full((num_rows,), -1, dtype=torch.int32, device=flat.device)
    row_to_pair[position] = torch.arange(flat.shape[0], dtype=torch.int32, device=flat.device)
    return RoutingPlan(tokens_per_expert, padded_offsets, position.int().view(expert_ids.shape),
                       row_to_pair)


def _triton_moe_routing(expert_ids, num_experts, block_size):
    num_rows = padded_rows_bound(expert_ids.numel(), num_experts, block_size)
    return _triton_kernels().moe_routing(
        expert_ids, num_experts, lambda counts: _padded_offsets(counts, block_size), num_rows)


def _native_moe_routing(expert_ids, num_experts, block_size):
    num_rows = padded_rows_bound(expert_ids.numel(), num_experts, block_size)
    return native_ops().moe_routing_native(expert_ids, num_experts, block_size, num_rows)


# The compiled kernels keep a counter per expert in shared memory (csrc/moe/moe.h).
MAX_NATIVE_ROUTING_EXPERTS = 8192


def _native_routing_check(request: Request) -> list[str]:
    experts = request.features.get("num_experts", 1)
    if experts > MAX_NATIVE_ROUTING_EXPERTS:
        return [f"num_experts {experts} > {MAX_NATIVE_ROUTING_EXPERTS}"]
    return []


MOE_ROUTING_BACKENDS = OpBackends("moe_routing", [
    Backend(CUDA, _native_moe_routing, frozenset(INDEX_DTYPES), _native_routing_check),
    Backend(CPP, _native_moe_routing, frozenset(INDEX_DTYPES), _native_routing_check),
    Backend(TRITON, _triton_moe_routing, frozenset(INDEX_DTYPES)),
    Backend(REFERENCE, lambda *args: tuple(moe_routing_reference(*args)), frozenset(INDEX_DTYPES)),
])


@torch.library.custom_op("sphinx_kernels::moe_routing", mutates_args=())
def _moe_routing_op(expert_ids: torch.Tensor, num_experts: int, block_size: int, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return MOE_ROUTING_BACKENDS[backend].impl(expert_ids, num_experts, block_size)


@_moe_routing_op.register_fake
def _(expert_ids, num_experts, block_size, backend):
    num_rows = padded_rows_bound(expert_ids.numel(), num_experts, block_size)
    new = lambda *shape: expert_ids.new_empty(shape, dtype=torch.int32)
    return new(num_experts), new(num_experts + 1), new(*expert_ids.shape), new(num_rows)


def _check_moe_routing(expert_ids, num_experts, block_size) -> None:
    require_tensor("expert_ids", expert_ids, dims=2, dtypes=INDEX_DTYPES)
    for name, value in (("num_experts", num_experts), ("block_size", block_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if expert_ids.shape[1] < 1:
        raise ValueError(f"expert_ids must be [T, k] with k >= 1, got shape {tuple(expert_ids.shape)}")
    if padded_rows_bound(expert_ids.numel(), num_experts, block_size) >= 2**31:
        raise ValueError("expert_ids, num_experts and block_size need more than 2^31 grouped rows; "
                         "int32 row indices cannot address them")
    require_index_range("expert_ids", expert_ids, num_experts, "num_experts")


# ---------------------------------------------------------------------------------------------------
# moe_permute / moe_unpermute


def moe_permute(x: torch.Tensor, plan: RoutingPlan, *, backend: str | None = None) -> torch.Tensor:
    """Token rows to expert-grouped, block-padded order: ``out[plan.position[t, j]] = x[t]``.

    Args:
        x: ``[T, H]`` float16, bfloat16, float32 or float64.
        plan: ``moe_routing`` of this batch's ``[T, k]`` expert ids, on ``x``'s device.
        backend: force one of ``MOE_PERMUTE_BACKENDS.names``.

    Returns:
        ``[R, H]`` in ``x``'s dtype (``R = plan.num_padded_rows``); each token appears k times, padding
        rows are zero. Exact data movement.

    Autograd: ``grad_x = moe_unpermute(grad, plan, None)``: the sum of the token's k rows' gradients,
    in float32 (float64 for float64) in slot order; deterministic.
    """
    _check_rows("x", x, plan, rows_of="position")
    chosen = MOE_PERMUTE_BACKENDS.select(Request(x.device, x.dtype), backend)
    return _moe_permute_op(x, plan.position, plan.row_to_pair, None, chosen.name)


def moe_unpermute(y_grouped: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor | None, *,
                  backend: str | None = None) -> torch.Tensor:
    """Expert-grouped rows back to token order, weighted:
    ``out[t] = sum_j weights[t, j] * y_grouped[plan.position[t, j]]``.

    Args:
        y_grouped: ``[R, H]`` float16, bfloat16, float32 or float64 (``R = plan.num_padded_rows``);
            padding rows are never read.
        plan: the ``moe_routing`` plan that grouped the rows.
        weights: ``[T, k]`` float gates (``Gating.weights``), or None for unit weights.
        backend: force one of ``MOE_UNPERMUTE_BACKENDS.names``.

    Returns:
        ``[T, H]`` in ``y_grouped``'s dtype, summed in float32 (float64 for float64) in slot order.

    Autograd: ``grad_y_grouped`` is ``moe_permute`` of the gradient, each row scaled by its pair's
    weight (padding rows zero); ``grad_weights[t, j]`` is the float32 dot product of ``grad[t]`` and
    row ``position[t, j]``, in ``weights``' dtype. Deterministic (no atomics).
    """
    _check_rows("y_grouped", y_grouped, plan, rows_of="row_to_pair")
    if weights is not None:
        require_tensor("weights", weights, dims=2, dtypes=sorted(FLOAT_DTYPES, key=str))
        require_device("weights", weights, y_grouped.device, "y_grouped")
        if weights.shape != plan.position.shape:
            raise ValueError(f"weights has shape {tuple(weights.shape)} but plan.position has "
                             f"{tuple(plan.position.shape)}; they must match ([T, k])")
    chosen = MOE_UNPERMUTE_BACKENDS.select(Request(y_grouped.device, y_grouped.dtype), backend)
    return _moe_unpermute_op(y_grouped, plan.position, plan.row_to_pair, weights, chosen.name)


def moe_permute_reference(x: torch.Tensor, position: torch.Tensor, row_to_pair: torch.Tensor,
                          scale: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch permute; ``scale`` ``[T * k]`` multiplies each pair's row (in float32)."""
    num_tokens, k = position.shape
    placed = row_to_pair >= 0
    pair = torch.where(placed, row_to_pair, 0).long()
    # A zero row after the last token stands in for x[token] at padding rows (and for T == 0).
    rows = torch.nn.functional.pad(x, (0, 0, 0, 1)).index_select(
        0, torch.where(placed, pair // k, num_tokens))
    if scale is not None:
        factor = torch.nn.functional.pad(scale.reshape(-1), (0, 1))[torch.where(placed, pair, -1)]
        rows = (rows.to(_acc_dtype(x.dtype)) * factor[:, None]).to(x.dtype)
    return rows


def moe_unpermute_reference(y_grouped: torch.Tensor, position: torch.Tensor,
                            row_to_pair: torch.Tensor, weights: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Pure-PyTorch unpermute: one index_select per slot, accumulated in slot order."""
    acc = _acc_dtype(y_grouped.dtype)
    out = y_grouped.new_zeros((position.shape[0], y_grouped.shape[1]), dtype=acc)
    for j in range(position.shape[1]):
        rows = y_grouped.index_select(0, position[:, j].long()).to(acc)
        out += rows if weights is None else rows * weights[:, j:j + 1].to(acc)
    return out.to(y_grouped.dtype)


def _pair_dots_reference(grad, y_grouped, position, dtype):
    acc = _acc_dtype(y_grouped.dtype)
    rows = y_grouped.index_select(0, position.reshape(-1).long()).to(acc)
    rows = rows.view(*position.shape, y_grouped.shape[1])
    return (rows * grad.to(acc)[:, None, :]).sum(-1).to(dtype)


def _triton_permute(*args):
    return _triton_kernels().permute_rows(*args)


def _triton_unpermute(*args):
    return _triton_kernels().unpermute_rows(*args)


def _triton_pair_dots(*args):
    return _triton_kernels().pair_dots(*args)


def _native_permute(x, position, row_to_pair, scale):
    return native_ops().moe_permute_native(x, position, row_to_pair, scale)


def _native_unpermute(y_grouped, position, row_to_pair, weights):
    return native_ops().moe_unpermute_native(y_grouped, position, weights)


def _native_pair_dots(grad, y_grouped, position, dtype):
    return native_ops().moe_pair_dots_native(grad, y_grouped, position).to(dtype)


# cpp: CPU loops over rows (csrc/moe/moe_cpu.cpp); on GPUs the Triton kernels serve.
MOE_PERMUTE_BACKENDS = OpBackends("moe_permute", [
    Backend(CPP, _native_permute, FLOAT_DTYPES),
    Backend(TRITON, _triton_permute, FLOAT_DTYPES),
    Backend(REFERENCE, moe_permute_reference, FLOAT_DTYPES),
])
# impl: (unpermute, dot products of the weights' backward).
MOE_UNPERMUTE_BACKENDS = OpBackends("moe_unpermute", [
    Backend(CPP, (_native_unpermute, _native_pair_dots), FLOAT_DTYPES),
    Backend(TRITON, (_triton_unpermute, _triton_pair_dots), FLOAT_DTYPES),
    Backend(REFERENCE, (moe_unpermute_reference, _pair_dots_reference), FLOAT_DTYPES),
])


@torch.library.custom_op("sphinx_kernels::moe_permute", mutates_args=())
def _moe_permute_op(x: torch.Tensor, position: torch.Tensor, row_to_pair: torch.Tensor,
                    scale: torch.Tensor | None, backend: str) -> torch.Tensor:
    return MOE_PERMUTE_BACKENDS[backend].impl(x, position, row_to_pair, scale)


@_moe_permute_op.register_fake
def _(x, position, row_to_pair, scale, backend):
    return x.new_empty((row_to_pair.shape[0], x.shape[1]))


@torch.library.custom_op("sphinx_kernels::moe_unpermute", mutates_args=())
def _moe_unpermute_op(y_grouped: torch.Tensor, position: torch.Tensor, row_to_pair: torch.Tensor,
                      weights: torch.Tensor | None, backend: str) -> torch.Tensor:
    unpermute, _ = MOE_UNPERMUTE_BACKENDS[backend].impl
    return unpermute(y_grouped, position, row_to_pair, weights)


@_moe_unpermute_op.register_fake
def _(y_grouped, position, row_to_pair, weights, backend):
    return y_grouped.new_empty((position.shape[0], y_grouped.shape[1]))


@torch.library.custom_op("sphinx_kernels::moe_pair_dots", mutates_args=())
def _moe_pair_dots_op(grad: torch.Tensor, y_grouped: torch.Tensor, position: torch.Tensor,
                      dtype: torch.dtype, backend: str) -> torch.Tensor:
    _, pair_dots = MOE_UNPERMUTE_BACKENDS[backend].impl
    return pair_dots(grad, y_grouped, position, dtype)


@_moe_pair_dots_op.register_fake
def _(grad, y_grouped, position, dtype, backend):
    return grad.new_empty(position.shape, dtype=dtype)


def _moe_permute_setup_context(ctx, inputs, output):
    _, position, row_to_pair, scale, backend = inputs
    ctx.save_for_backward(position, row_to_pair, scale)
    ctx.backend = backend


def _moe_permute_backward(ctx, grad):
    position, row_to_pair, scale = ctx.saved_tensors
    if scale is not None and ctx.needs_input_grad[3]:
        raise NotImplementedError("moe_permute: no gradient for scale (an internal argument)")
    grad_x = _moe_unpermute_op(grad, position, row_to_pair, scale, ctx.backend)
    return grad_x, None, None, None, None


def _moe_unpermute_setup_context(ctx, inputs, output):
    y_grouped, position, row_to_pair, weights, backend = inputs
    ctx.save_for_backward(y_grouped, position, row_to_pair, weights)
    ctx.backend = backend


def _moe_unpermute_backward(ctx, grad):
    y_grouped, position, row_to_pair, weights = ctx.saved_tensors
    grad_y = grad_weights = None
    if ctx.needs_input_grad[0]:
        scale = None if weights is None else weights.reshape(-1)
        grad_y = _moe_permute_op(grad, position, row_to_pair, scale, ctx.backend)
    if ctx.needs_input_grad[3]:
        grad_weights = _moe_pair_dots_op(grad, y_grouped, position, weights.dtype, ctx.backend)
    return grad_y, None, None, grad_weights, None


_moe_permute_op.register_autograd(_moe_permute_backward, setup_context=_moe_permute_setup_context)
_moe_unpermute_op.register_autograd(_moe_unpermute_backward,
                                    setup_context=_moe_unpermute_setup_context)


def _check_rows(name: str, rows, plan, *, rows_of: str) -> None:
    """``rows`` ``[N, H]`` float on the plan's device, ``N`` matching ``plan.<rows_of>``'s first dim."""
    require_tensor(name, rows, dims=2, dtypes=sorted(FLOAT_DTYPES, key=str))
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan (from moe_routing), got {type(plan).__name__}")
    for field, dims in (("position", 2), ("row_to_pair", 1)):
        require_tensor(f"plan.{field}", getattr(plan, field), dims=dims, dtypes=(torch.int32,))
        require_device(f"plan.{field}", getattr(plan, field), rows.device, name)
    expected = getattr(plan, rows_of).shape[0]
    if rows.shape[0] != expected:
        raise ValueError(f"{name} has {rows.shape[0]} rows but plan.{rows_of} has {expected}; "
                         "the plan must come from this batch")
    require_index_range("plan.position", plan.position, plan.row_to_pair.shape[0], "R",
                        "R = plan.row_to_pair rows")


# ---------------------------------------------------------------------------------------------------
# moe_expert_mlp

MLP_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def moe_expert_mlp(x_grouped: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   plan: RoutingPlan, *, recompute: bool = False,
                   backend: str | None = None) -> torch.Tensor:
    """Every expert's SwiGLU MLP on its rows of the expert-grouped batch:
    ``y[r] = (silu(x[r] @ w1[e].T) * (x[r] @ w3[e].T)) @ w2[e].T`` for the rows r of expert e.

    Args:
        x_grouped: ``[R, H]`` float16, bfloat16, float32 or float64 rows in the plan's order
            (``moe_permute``), ``R = plan.num_padded_rows``; padding rows are never read.
        w1, w3: ``[E, F, H]`` gate and up projections, stacked per expert (``nn.Linear(H, F)``
            weights), ``x_grouped``'s dtype and device.
        w2: ``[E, H, F]`` down projections.
        plan: the ``moe_routing`` plan of this batch, ``E = plan.tokens_per_expert.shape[0]``.
        recompute: keep no activation for the backward (which recomputes it from ``x_grouped``): less
            memory between forward and backward, one more pair of GEMMs.
        backend: force one of ``MOE_EXPERT_MLP_BACKENDS.names``.

    Returns:
        ``[R, H]`` in ``x_grouped``'s dtype; rows holding no pair are zero. The Triton kernels are
        grouped GEMMs over row blocks that map to experts through ``plan.padded_offsets`` on the
        device (no host sync), skip blocks holding no pair, fuse the gate and up projections with
        the SwiGLU, and accumulate in float32.

    Autograd: ``x_grouped`` (zero on padding rows), ``w1``, ``w3``, ``w2``; each expert's weight
    gradient sums over that expert's rows only, in row order (deterministic, no atomics).
    """
    _check_moe_expert_mlp(x_grouped, w1, w3, w2, plan, recompute)
    chosen = MOE_EXPERT_MLP_BACKENDS.select(Request(x_grouped.device, x_grouped.dtype), backend)
    y, _, _ = _moe_expert_mlp_op(x_grouped, w1, w3, w2, plan.tokens_per_expert,
                                 plan.padded_offsets, recompute, chosen.name)
    return y


def _expert_segments(tokens_per_expert, padded_offsets):
    """(expert, first row, end row) of each expert with pairs: host values, for the reference."""
    return [(e, start, start + count) for e, (start, count)
            in enumerate(zip(padded_offsets.tolist(), tokens_per_expert.tolist())) if count]


def moe_expert_mlp_reference(x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets,
                             store_pre=True):
    """Pure-PyTorch ``moe_expert_mlp``, a loop over experts in the inputs' dtype (the Hugging Face
    way): ``(y, h1, h3)`` with the pre-activations ``h1 = x @ w1[e].T``, ``h3`` ``[R, F]`` (empty
    unless ``store_pre``)."""
    y = x_grouped.new_zeros(x_grouped.shape)
    pre_rows = x_grouped.shape[0] if store_pre else 0
    h1, h3 = (x_grouped.new_zeros((pre_rows, w1.shape[1])) for _ in "13")
    for e, start, end in _expert_segments(tokens_per_expert, padded_offsets):
        x = x_grouped[start:end]
        gate, up = x @ w1[e].T, x @ w3[e].T
        y[start:end] = (torch.nn.functional.silu(gate) * up) @ w2[e].T
        if store_pre:
            h1[start:end], h3[start:end] = gate, up
    return y, h1, h3


def _moe_expert_mlp_backward_reference(grad_y, x_grouped, w1, w3, w2, tokens_per_expert,
                                       padded_offsets, h1, h3):
    """The reference's gradients, expert by expert, from the pre-activations h1, h3 ``[R, F]``."""
    grads = [x_grouped.new_zeros(x_grouped.shape)] + [torch.zeros_like(w) for w in (w1, w3, w2)]
    grad_x, grad_w1, grad_w3, grad_w2 = grads
    for e, start, end in _expert_segments(tokens_per_expert, padded_offsets):
        x, dy = x_grouped[start:end], grad_y[start:end]
        gate, up = h1[start:end], h3[start:end]
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_act = dy @ w2[e]
        grad_up = grad_act * silu
        grad_gate = grad_act * up * sig * (1 + gate * (1 - sig))
        grad_x[start:end] = grad_gate @ w1[e] + grad_up @ w3[e]
        grad_w1[e], grad_w3[e] = grad_gate.T @ x, grad_up.T @ x
        grad_w2[e] = dy.T @ (silu * up)
    return tuple(grads)


def _triton_moe_expert_mlp(*args):
    return _triton_kernels().moe_expert_mlp(*args)


def _triton_moe_expert_mlp_backward(*args):
    return _triton_kernels().moe_expert_mlp_backward(*args)


# impl: (forward, backward). The backward takes the forward's pre-activations (recomputed first when
# the forward kept none).
MOE_EXPERT_MLP_BACKENDS = OpBackends("moe_expert_mlp", [
    Backend(TRITON, (_triton_moe_expert_mlp, _triton_moe_expert_mlp_backward), MLP_DTYPES),
    Backend(REFERENCE, (moe_expert_mlp_reference, _moe_expert_mlp_backward_reference),
            FLOAT_DTYPES),
])


@torch.library.custom_op("sphinx_kernels::moe_expert_mlp", mutates_args=())
def _moe_expert_mlp_op(x_grouped: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                       w2: torch.Tensor, tokens_per_expert: torch.Tensor,
                       padded_offsets: torch.Tensor, recompute: bool, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, h1, h3)``: the pre-activations are for the backward, ``[0, F]`` when ``recompute``."""
    forward, _ = MOE_EXPERT_MLP_BACKENDS[backend].impl
    return forward(x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, not recompute)


@_moe_expert_mlp_op.register_fake
def _(x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, recompute, backend):
    pre_rows = 0 if recompute else x_grouped.shape[0]
    return (x_grouped.new_empty(x_grouped.shape), x_grouped.new_empty((pre_rows, w1.shape[1])),
            x_grouped.new_empty((pre_rows, w1.shape[1])))


@torch.library.custom_op("sphinx_kernels::moe_expert_mlp_backward", mutates_args=())
def _moe_expert_mlp_backward_op(grad_y: torch.Tensor, x_grouped: torch.Tensor, w1: torch.Tensor,
                                w3: torch.Tensor, w2: torch.Tensor,
                                tokens_per_expert: torch.Tensor, padded_offsets: torch.Tensor,
                                h1: torch.Tensor, h3: torch.Tensor, backend: str
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_w1, grad_w3, grad_w2)``; ``h1``/``h3`` with no rows: recompute them."""
    forward, backward = MOE_EXPERT_MLP_BACKENDS[backend].impl
    if h1.shape[0] != x_grouped.shape[0]:
        _, h1, h3 = forward(x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, True)
    return backward(grad_y, x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, h1, h3)


@_moe_expert_mlp_backward_op.register_fake
def _(grad_y, x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, h1, h3, backend):
    return tuple(t.new_empty(t.shape) for t in (x_grouped, w1, w3, w2))


def _moe_expert_mlp_setup_context(ctx, inputs, output):
    x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, _, backend = inputs
    _, h1, h3 = output
    ctx.save_for_backward(x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, h1, h3)
    ctx.backend = backend
    ctx.mark_non_differentiable(h1, h3)


def _moe_expert_mlp_backward(ctx, grad_y, _grad_h1, _grad_h3):
    x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, h1, h3 = ctx.saved_tensors
    grads = _moe_expert_mlp_backward_op(grad_y, x_grouped, w1, w3, w2, tokens_per_expert,
                                        padded_offsets, h1, h3, ctx.backend)
    return (*grads, None, None, None, None)


_moe_expert_mlp_op.register_autograd(_moe_expert_mlp_backward,
                                     setup_context=_moe_expert_mlp_setup_context)


def _check_moe_expert_mlp(x_grouped, w1, w3, w2, plan, recompute) -> None:
    _check_rows("x_grouped", x_grouped, plan, rows_of="row_to_pair")
    for name, field, dims in (("plan.tokens_per_expert", plan.tokens_per_expert, 1),
                              ("plan.padded_offsets", plan.padded_offsets, 1)):
        require_tensor(name, field, dims=dims, dtypes=(torch.int32,))
        require_device(name, field, x_grouped.device, "x_grouped")
    num_experts, hidden = plan.tokens_per_expert.shape[0], x_grouped.shape[1]
    if plan.padded_offsets.shape[0] != num_experts + 1:
        raise ValueError(f"plan.padded_offsets has {plan.padded_offsets.shape[0]} entries but "
                         f"plan.tokens_per_expert has {num_experts}; expected E + 1")
    for name, weight in (("w1", w1), ("w3", w3), ("w2", w2)):
        require_tensor(name, weight, dims=3)
        if weight.dtype != x_grouped.dtype:
            raise TypeError(f"{name} has dtype {dtype_name(weight.dtype)} but x_grouped has "
                            f"{dtype_name(x_grouped.dtype)}; they must match")
        require_device(name, weight, x_grouped.device, "x_grouped")
    ffn = w1.shape[1]
    for name, weight, expected in (("w1", w1, (num_experts, ffn, hidden)),
                                   ("w3", w3, (num_experts, ffn, hidden)),
                                   ("w2", w2, (num_experts, hidden, ffn))):
        if tuple(weight.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(weight.shape)}, expected {expected} "
                             f"([E, F, H] for w1/w3, [E, H, F] for w2, with E = {num_experts} from "
                             f"the plan, H = {hidden} from x_grouped, F = {ffn} from w1)")
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    offsets = plan.padded_offsets
    if should_check_values(offsets):
        bad = ((offsets[1:] - offsets[:-1] < plan.tokens_per_expert).any() or int(offsets[0]) != 0
               or int(offsets[-1]) > x_grouped.shape[0])
        if bad:
            raise ValueError("plan.padded_offsets must start at 0, leave each expert room for its "
                             f"tokens_per_expert and end at most at R = {x_grouped.shape[0]}; "
                             "the plan must come from moe_routing")
