"""``moe_permute``: token rows ``[T, H]`` to expert-grouped, block-padded order ``[R, H]`` (the
order of a ``moe_routing`` plan). Its backward is ``moe_unpermute`` of the gradient, and
``moe_unpermute``'s is a scaled ``moe_permute``.

Backends: ``cpp`` (``csrc/moe/moe_cpu.cpp``), ``triton`` (``sphinx_kernels/triton/moe_permute.py``),
``reference`` (:func:`moe_permute_reference`). On GPUs the Triton kernel serves.
"""
from __future__ import annotations

import torch

from sphinx_kernels.backends import Backend, Impl, OpBackends
from sphinx_kernels.dtypes import FLOAT_DTYPES, accumulate_dtype
from sphinx_kernels.kernel_op import kernel_op
from sphinx_kernels.ops.moe_routing import RoutingPlan, require_plan_rows
from sphinx_kernels.platforms import CPP, REFERENCE, TRITON, native, triton_launcher

__all__ = ["moe_permute", "moe_permute_reference", "MOE_PERMUTE_BACKENDS"]


def moe_permute(x: torch.Tensor, plan: RoutingPlan, *, backend: str | None = None) -> torch.Tensor:
    """Token rows to expert-grouped, block-padded order: ``out[plan.position[t, j]] = x[t]``.

    Args:
        x: ``[T, H]`` float16, bfloat16, float32 or float64.
        plan: ``moe_routing`` of this batch's ``[T, k]`` expert ids, on ``x``'s device.
        backend: force one of ``MOE_PERMUTE_BACKENDS.names``.

    Returns:
        ``[R, H]`` in ``x``'s dtype (``R = plan.num_padded_rows``); each token appears k times,
        padding rows are zero. Exact data movement.

    Autograd: ``grad_x = moe_unpermute(grad, plan, None)``: the sum of the token's k rows'
    gradients, in float32 (float64 for float64) in slot order; deterministic.
    """
    require_plan_rows("x", x, plan, rows_of="position")
    chosen = MOE_PERMUTE_BACKENDS.select(MOE_PERMUTE_BACKENDS.request(x.device, x.dtype), backend)
    return _moe_permute_op(x, plan.position, plan.row_to_pair, None, chosen.name)


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
        rows = (rows.to(accumulate_dtype(x.dtype)) * factor[:, None]).to(x.dtype)
    return rows


# Impl: forward(x, position, row_to_pair, scale) -> [R, H]; ``scale`` (``[T * k]`` or None)
# multiplies each pair's row: the backward of moe_unpermute.
MOE_PERMUTE_BACKENDS = OpBackends("moe_permute", [
    Backend(CPP, Impl(native("moe_permute_native")), FLOAT_DTYPES),
    Backend(TRITON, Impl(triton_launcher("moe_permute", "permute_rows")), FLOAT_DTYPES),
    Backend(REFERENCE, Impl(moe_permute_reference), FLOAT_DTYPES),
])


@kernel_op("sphinx_kernels::moe_permute")
def _moe_permute_op(x: torch.Tensor, position: torch.Tensor, row_to_pair: torch.Tensor,
                    scale: torch.Tensor | None, backend: str) -> torch.Tensor:
    return MOE_PERMUTE_BACKENDS[backend].impl.forward(x=x, position=position,
                                                      row_to_pair=row_to_pair, scale=scale)


@_moe_permute_op.register_fake
def _(x, position, row_to_pair, scale, backend):
    return x.new_empty((row_to_pair.shape[0], x.shape[1]))


def _setup_context(ctx, inputs, output):
    _, position, row_to_pair, scale, backend = inputs
    ctx.save_for_backward(position, row_to_pair, scale)
    ctx.backend = backend


def _backward(ctx, grad):
    position, row_to_pair, scale = ctx.saved_tensors
    if scale is not None and ctx.needs_input_grad[3]:
        raise NotImplementedError("moe_permute: no gradient for scale (an internal argument)")
    # moe_unpermute's custom op: the package registers every op when it is imported.
    weights = None if scale is None else scale.view(position.shape)  # [T * k] -> [T, k]
    grad_x = torch.ops.sphinx_kernels.moe_unpermute(grad, position, row_to_pair, weights,
                                                    ctx.backend)
    return grad_x, None, None, None, None


_moe_permute_op.register_autograd(_backward, setup_context=_setup_context)
