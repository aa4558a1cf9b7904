"""``moe_unpermute``: expert-grouped rows ``[R, H]`` back to token order ``[T, H]``, the
gate-weighted sum over each token's k slots. Its backward is a scaled ``moe_permute`` of the
gradient (for the rows) and ``moe_pair_dots`` (for the weights).

Backends: ``cpp`` (``csrc/moe/moe_cpu.cpp``), ``triton``
(``sphinx_kernels/triton/moe_unpermute.py``), ``reference`` (:func:`moe_unpermute_reference`,
:func:`moe_pair_dots_reference`).
"""
from __future__ import annotations

import torch

from sphinx_kernels._validation import require_device, require_tensor
from sphinx_kernels.backends import Backend, Impl, OpBackends
from sphinx_kernels.dtypes import FLOAT_DTYPES, accumulate_dtype
from sphinx_kernels.kernel_op import kernel_op
from sphinx_kernels.ops.moe_routing import RoutingPlan, require_plan_rows
from sphinx_kernels.platforms import CPP, REFERENCE, TRITON, native_ops, triton_launcher

__all__ = ["moe_unpermute", "moe_unpermute_reference", "moe_pair_dots_reference",
           "MOE_UNPERMUTE_BACKENDS"]


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
    require_plan_rows("y_grouped", y_grouped, plan, rows_of="row_to_pair")
    if weights is not None:
        require_tensor("weights", weights, dims=2, dtypes=FLOAT_DTYPES)
        require_device("weights", weights, y_grouped.device, "y_grouped")
        if weights.shape != plan.position.shape:
            raise ValueError(f"weights has shape {tuple(weights.shape)} but plan.position has "
                             f"{tuple(plan.position.shape)}; they must match ([T, k])")
    request = MOE_UNPERMUTE_BACKENDS.request(y_grouped.device, y_grouped.dtype)
    chosen = MOE_UNPERMUTE_BACKENDS.select(request, backend)
    return _moe_unpermute_op(y_grouped, plan.position, plan.row_to_pair, weights, chosen.name)


def moe_unpermute_reference(y_grouped: torch.Tensor, position: torch.Tensor,
                            row_to_pair: torch.Tensor, weights: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Pure-PyTorch unpermute: one index_select per slot, accumulated in slot order."""
    acc = accumulate_dtype(y_grouped.dtype)
    out = y_grouped.new_zeros((position.shape[0], y_grouped.shape[1]), dtype=acc)
    for j in range(position.shape[1]):
        rows = y_grouped.index_select(0, position[:, j].long()).to(acc)
        out += rows if weights is None else rows * weights[:, j:j + 1].to(acc)
    return out.to(y_grouped.dtype)


def moe_pair_dots_reference(grad, y_grouped, position, dtype):
    """``[T, k]`` in ``dtype``: the dot product of ``grad[t]`` and row ``position[t, j]`` of
    ``y_grouped``, accumulated in float32 (float64 for float64): the weights' gradient."""
    acc = accumulate_dtype(y_grouped.dtype)
    rows = y_grouped.index_select(0, position.reshape(-1).long()).to(acc)
    rows = rows.view(*position.shape, y_grouped.shape[1])
    return (rows * grad.to(acc)[:, None, :]).sum(-1).to(dtype)


def _native_forward(y_grouped, position, row_to_pair, weights):
    return native_ops().moe_unpermute_native(y=y_grouped, position=position, weights=weights)


def _native_pair_dots(grad, y_grouped, position, dtype):
    return native_ops().moe_pair_dots_native(grad=grad, y=y_grouped, position=position).to(dtype)


# Impl: forward(y_grouped, position, row_to_pair, weights) -> [T, H]; extra "pair_dots"(grad,
# y_grouped, position, dtype) -> [T, k], the weights' gradient.
MOE_UNPERMUTE_BACKENDS = OpBackends("moe_unpermute", [
    Backend(CPP, Impl(_native_forward, extras={"pair_dots": _native_pair_dots}), FLOAT_DTYPES),
    Backend(TRITON, Impl(triton_launcher("moe_unpermute", "unpermute_rows"),
                         extras={"pair_dots": triton_launcher("moe_unpermute", "pair_dots")}),
            FLOAT_DTYPES),
    Backend(REFERENCE, Impl(moe_unpermute_reference, extras={"pair_dots": moe_pair_dots_reference}),
            FLOAT_DTYPES),
])


@kernel_op("sphinx_kernels::moe_unpermute")
def _moe_unpermute_op(y_grouped: torch.Tensor, position: torch.Tensor, row_to_pair: torch.Tensor,
                      weights: torch.Tensor | None, backend: str) -> torch.Tensor:
    return MOE_UNPERMUTE_BACKENDS[backend].impl.forward(
        y_grouped=y_grouped, position=position, row_to_pair=row_to_pair, weights=weights)


@_moe_unpermute_op.register_fake
def _(y_grouped, position, row_to_pair, weights, backend):
    return y_grouped.new_empty((position.shape[0], y_grouped.shape[1]))


@kernel_op("sphinx_kernels::moe_pair_dots")
def _moe_pair_dots_op(grad: torch.Tensor, y_grouped: torch.Tensor, position: torch.Tensor,
                      dtype: torch.dtype, backend: str) -> torch.Tensor:
    return MOE_UNPERMUTE_BACKENDS[backend].impl.extra("pair_dots")(
        grad=grad, y_grouped=y_grouped, position=position, dtype=dtype)


@_moe_pair_dots_op.register_fake
def _(grad, y_grouped, position, dtype, backend):
    return grad.new_empty(position.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    y_grouped, position, row_to_pair, weights, backend = inputs
    ctx.save_for_backward(y_grouped, position, row_to_pair, weights)
    ctx.backend = backend


def _backward(ctx, grad):
    y_grouped, position, row_to_pair, weights = ctx.saved_tensors
    grad_y = grad_weights = None
    if ctx.needs_input_grad[0]:
        scale = None if weights is None else weights.reshape(-1)
        grad_y = torch.ops.sphinx_kernels.moe_permute(grad, position, row_to_pair, scale,
                                                      ctx.backend)
    if ctx.needs_input_grad[3]:
        grad_weights = _moe_pair_dots_op(grad, y_grouped, position, weights.dtype, ctx.backend)
    return grad_y, None, None, grad_weights, None


_moe_unpermute_op.register_autograd(_backward, setup_context=_setup_context)
