"""``moe_expert_mlp``: every expert's SwiGLU MLP on its rows of the expert-grouped batch, as grouped
GEMMs that skip padding blocks, the gate and up projections fused with the SwiGLU; forward and
backward (optionally recomputing the activation).

Backends: ``cpp`` (``csrc/moe/expert_mlp_cpu.cpp``: forward and backward in C++, ATen's GEMMs per
expert, the SwiGLU's gradient fused into one pass), ``triton``
(``sphinx_kernels/triton/moe_expert_mlp.py``), ``reference`` (:func:`moe_expert_mlp_reference`, a
loop over experts; its backward :func:`moe_expert_mlp_backward_reference`).
"""
from __future__ import annotations

import torch

from sphinx_kernels._validation import (
    dtype_name,
    require_device,
    require_tensor,
)
from sphinx_kernels.backends import Backend, Impl, OpBackends
from sphinx_kernels.dtypes import FLOAT_DTYPES, KERNEL_DTYPES
from sphinx_kernels.kernel_op import kernel_op
from sphinx_kernels.ops.moe_routing import RoutingPlan, require_plan_rows, require_plan_segments
from sphinx_kernels.platforms import CPP, REFERENCE, TRITON, native, triton_launcher

__all__ = ["moe_expert_mlp", "moe_expert_mlp_reference", "moe_expert_mlp_backward_reference",
           "MOE_EXPERT_MLP_BACKENDS"]


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
        recompute: keep no activation for the backward (which recomputes it from ``x_grouped``):
            less memory between forward and backward, one more pair of GEMMs.
        backend: force one of ``MOE_EXPERT_MLP_BACKENDS.names``.

    Returns:
        ``[R, H]`` in ``x_grouped``'s dtype; rows holding no pair are zero. The Triton kernels are
        grouped GEMMs over row blocks that map to experts through ``plan.padded_offsets`` on the
        device (no host sync), skip blocks holding no pair, fuse the gate and up projections with
        the SwiGLU, and accumulate in float32.

    Autograd: ``x_grouped`` (zero on padding rows), ``w1``, ``w3``, ``w2``; each expert's weight
    gradient sums over that expert's rows only, in row order (deterministic, no atomics).

    Non-finite values: an expert's NaN / inf weights or rows reach that expert's rows and weight
    gradients only, on every backend; other experts' rows and the padding rows (zero) keep their
    values.
    """
    _check_moe_expert_mlp(x_grouped, w1, w3, w2, plan, recompute)
    request = MOE_EXPERT_MLP_BACKENDS.request(x_grouped.device, x_grouped.dtype)
    chosen = MOE_EXPERT_MLP_BACKENDS.select(request, backend)
    # The pre-activations are kept for a backward only: with no gradient to compute (inference,
    # evaluation) storing them would cost two [R, F] writes for nothing.
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_grouped, w1, w3, w2))
    y, _, _ = _moe_expert_mlp_op(x_grouped, w1, w3, w2, plan.tokens_per_expert,
                                 plan.padded_offsets, recompute or not needs_grad, chosen.name)
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


def moe_expert_mlp_backward_reference(grad_y, x_grouped, w1, w3, w2, tokens_per_expert,
                                      padded_offsets, h1, h3):
    """The reference's gradients ``(grad_x, grad_w1, grad_w3, grad_w2)``, expert by expert, from the
    pre-activations h1, h3 ``[R, F]``."""
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


# Impl: forward(x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, store_pre) -> (y, h1, h3),
# the pre-activations h1, h3 [R, F] ([0, F] unless store_pre); backward(grad_y, x_grouped, w1, w3,
# w2, tokens_per_expert, padded_offsets, h1, h3) -> (grad_x, grad_w1, grad_w3, grad_w2). The
# backward takes the forward's pre-activations (recomputed first when the forward kept none).
MOE_EXPERT_MLP_BACKENDS = OpBackends("moe_expert_mlp", [
    Backend(CPP, Impl(native("moe_expert_mlp_native"), native("moe_expert_mlp_backward_native")),
            FLOAT_DTYPES),
    Backend(TRITON, Impl(triton_launcher("moe_expert_mlp", "moe_expert_mlp_forward"),
                         triton_launcher("moe_expert_mlp", "moe_expert_mlp_backward")),
            KERNEL_DTYPES),
    Backend(REFERENCE, Impl(moe_expert_mlp_reference, moe_expert_mlp_backward_reference),
            FLOAT_DTYPES),
])


@kernel_op("sphinx_kernels::moe_expert_mlp")
def _moe_expert_mlp_op(x_grouped: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                       w2: torch.Tensor, tokens_per_expert: torch.Tensor,
                       padded_offsets: torch.Tensor, recompute: bool, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, h1, h3)``: the pre-activations are for the backward, ``[0, F]`` when ``recompute``."""
    return MOE_EXPERT_MLP_BACKENDS[backend].impl.forward(
        x_grouped=x_grouped, w1=w1, w3=w3, w2=w2, tokens_per_expert=tokens_per_expert,
        padded_offsets=padded_offsets, store_pre=not recompute)


@_moe_expert_mlp_op.register_fake
def _(x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, recompute, backend):
    pre_rows = 0 if recompute else x_grouped.shape[0]
    return (x_grouped.new_empty(x_grouped.shape), x_grouped.new_empty((pre_rows, w1.shape[1])),
            x_grouped.new_empty((pre_rows, w1.shape[1])))


@kernel_op("sphinx_kernels::moe_expert_mlp_backward")
def _moe_expert_mlp_backward_op(grad_y: torch.Tensor, x_grouped: torch.Tensor, w1: torch.Tensor,
                                w3: torch.Tensor, w2: torch.Tensor,
                                tokens_per_expert: torch.Tensor, padded_offsets: torch.Tensor,
                                h1: torch.Tensor, h3: torch.Tensor, backend: str
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_w1, grad_w3, grad_w2)``; ``h1``/``h3`` with no rows: recompute them."""
    impl = MOE_EXPERT_MLP_BACKENDS[backend].impl
    weights = dict(x_grouped=x_grouped, w1=w1, w3=w3, w2=w2, tokens_per_expert=tokens_per_expert,
                   padded_offsets=padded_offsets)
    if h1.shape[0] != x_grouped.shape[0]:
        _, h1, h3 = impl.forward(**weights, store_pre=True)
    return impl.backward(grad_y=grad_y, **weights, h1=h1, h3=h3)


@_moe_expert_mlp_backward_op.register_fake
def _(grad_y, x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, h1, h3, backend):
    return tuple(t.new_empty(t.shape) for t in (x_grouped, w1, w3, w2))


def _setup_context(ctx, inputs, output):
    x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, _, backend = inputs
    _, h1, h3 = output
    ctx.save_for_backward(x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, h1, h3)
    ctx.backend = backend
    ctx.mark_non_differentiable(h1, h3)
    # h1 and h3 get None in the backward, not two zero-filled [R, F] gradients (y, the only
    # differentiable output, always has one).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_h1, _grad_h3):
    x_grouped, w1, w3, w2, tokens_per_expert, padded_offsets, h1, h3 = ctx.saved_tensors
    grads = _moe_expert_mlp_backward_op(grad_y, x_grouped, w1, w3, w2, tokens_per_expert,
                                        padded_offsets, h1, h3, ctx.backend)
    return (*grads, None, None, None, None)


_moe_expert_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def _check_moe_expert_mlp(x_grouped, w1, w3, w2, plan, recompute) -> None:
    require_plan_rows("x_grouped", x_grouped, plan, rows_of="row_to_pair")
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
    require_plan_segments(plan, x_grouped.shape[0])
