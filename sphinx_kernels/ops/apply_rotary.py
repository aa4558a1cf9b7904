"""``apply_rotary``: ``x * cos[pos] + rotate_half(x) * sin[pos]`` on packed ``[T, H, D]`` tokens
(Llama / Hugging Face non-interleaved convention), positions per token so that they reset per packed
sample; q and k in one launch.

Backends: ``cpp`` (``csrc/varlen/rotary_cpu.cpp``), ``triton``
(``sphinx_kernels/triton/apply_rotary.py``), ``reference``
(:func:`apply_rotary_reference`). The backward is the same op with the transposed rotation.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sphinx_kernels._validation import (
    INDEX_DTYPES,
    dtype_name,
    require_device,
    require_index_range,
    require_tensor,
    require_unit_stride,
)
from sphinx_kernels.backends import Backend, Impl, OpBackends
from sphinx_kernels.dtypes import KERNEL_DTYPES, accumulate_dtype
from sphinx_kernels.kernel_op import kernel_op
from sphinx_kernels.platforms import CPP, REFERENCE, TRITON, native, triton_launcher

__all__ = ["apply_rotary", "apply_rotary_reference", "APPLY_ROTARY_BACKENDS"]


def apply_rotary(x: torch.Tensor | Sequence[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                 position_ids: torch.Tensor, *, backend: str | None = None):
    """Rotates packed query / key heads by their positions' angles:
    ``out = x * cos[pos] + rotate_half(x) * sin[pos]``, ``rotate_half(x) = cat(-x[..., D/2:],
    x[..., :D/2])``.

    Args:
        x: ``[T, H, D]`` float16, bfloat16 or float32 with unit stride along ``D`` (any token and
            head strides, e.g. q and k as views of a fused qkv projection), ``D`` even; or a pair
            ``(q, k)`` of such tensors with one ``T``, ``D``, dtype and device and any head counts
            (GQA), rotated in one launch.
        cos, sin: ``[P, D]`` tables in the Hugging Face layout (each half of a row holds the angles'
            cosines / sines; both halves are read, so any table gives exactly the formula above),
            float16, bfloat16 or float32, unit stride along ``D``, on ``x``'s device. They get no
            gradient: passing a table that requires grad raises ValueError (detach it, or compute
            the rotation with PyTorch ops if the angles are learned).
        position_ids: ``[T]`` int32 or int64 row of each token in the tables (``PackedLayout.
            position_ids``: 0, 1, ... within each packed sample), in ``[0, P)``.
        backend: force one of ``APPLY_ROTARY_BACKENDS.names``.

    Returns:
        A new contiguous ``[T, H, D]`` tensor in ``x``'s dtype, or the pair ``(q_out, k_out)``.
        Computed in float32, rounded once.

    Autograd: the gradient of ``x`` is the transposed rotation of the output gradient (``sin`` ->
    ``-sin`` with its halves swapped; for Hugging Face tables, whose halves are equal, simply
    ``-sin``), by the same kernel.

    Positions are validated on the CPU; on a GPU only with ``SPHINX_KERNELS_CHECK_INPUTS=1`` (a host
    sync), and a position outside the table that reaches a kernel gives a NaN row, never an
    out-of-bounds read.
    """
    pair = isinstance(x, (tuple, list))
    if pair:
        if len(x) != 2:
            raise ValueError(f"x must be one tensor or a pair (q, k), got {len(x)} tensors")
        q, k = (require_tensor(f"x[{i}]", t) for i, t in enumerate(x))
    else:
        q, k = x, None
    _check_apply_rotary(q, k, cos, sin, position_ids)
    if k is None:  # one tensor: k is an empty stand-in, so one op serves both forms
        k = q.new_empty((q.shape[0], 0, q.shape[2]))
    chosen = APPLY_ROTARY_BACKENDS.select(APPLY_ROTARY_BACKENDS.request(q.device, q.dtype), backend)
    q_out, k_out = _apply_rotary_op(q, k, cos, sin, position_ids, False, chosen.name)
    return (q_out, k_out) if pair else q_out


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           position_ids: torch.Tensor, transpose: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch ``apply_rotary`` of q and k (the Hugging Face formula), in float32 (float64 for
    float64 inputs), rounded once to the inputs' dtype; ``transpose`` applies the backward
    rotation. q and k are rotated as one ``[T, Hq + Hkv, D]`` tensor: half the operations, which
    is most of the cost at decode sizes."""
    acc = accumulate_dtype(q.dtype)
    c = cos.index_select(0, position_ids).to(acc).unsqueeze(1)
    s = sin.index_select(0, position_ids).to(acc).unsqueeze(1)
    half = cos.shape[1] // 2
    if transpose:  # sin -> -sin with its halves swapped
        s = torch.cat([-s[..., half:], -s[..., :half]], dim=-1)
    x = torch.cat([q, k], dim=1).to(acc)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    out = (x * c).add_(rotated.mul_(s)).to(q.dtype)
    # Copies: the op's outputs may not share memory.
    q_out, k_out = (part.clone(memory_format=torch.contiguous_format)
                    for part in out.split([q.shape[1], k.shape[1]], dim=1))
    return q_out, k_out


# Impl: forward(q, k, cos, sin, position_ids, transpose) -> (q_out, k_out), contiguous.
APPLY_ROTARY_BACKENDS = OpBackends("apply_rotary", [
    Backend(CPP, Impl(native("apply_rotary_native")), KERNEL_DTYPES),
    Backend(TRITON, Impl(triton_launcher("apply_rotary", "apply_rotary")), KERNEL_DTYPES),
    Backend(REFERENCE, Impl(apply_rotary_reference), KERNEL_DTYPES),
])


@kernel_op("sphinx_kernels::apply_rotary")
def _apply_rotary_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     position_ids: torch.Tensor, transpose: bool, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = APPLY_ROTARY_BACKENDS[backend].impl.forward(
        q=q, k=k, cos=cos, sin=sin, position_ids=position_ids, transpose=transpose)
    return q_out.contiguous(), k_out.contiguous()


@_apply_rotary_op.register_fake
def _(q, k, cos, sin, position_ids, transpose, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, position_ids, transpose, backend = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.transpose = transpose
    ctx.backend = backend


def _backward(ctx, grad_q, grad_k):
    cos, sin, position_ids = ctx.saved_tensors
    # The kernels need unit stride along D; an incoming gradient may be expanded.
    grad_q, grad_k = (g if g.stride(2) == 1 else g.contiguous() for g in (grad_q, grad_k))
    grad_q, grad_k = _apply_rotary_op(grad_q, grad_k, cos, sin, position_ids, not ctx.transpose,
                                      ctx.backend)
    return grad_q, grad_k, None, None, None, None, None


_apply_rotary_op.register_autograd(_backward, setup_context=_setup_context)


def _check_rotated(name: str, x, dtypes) -> torch.Tensor:
    require_tensor(name, x, dims=3, dtypes=dtypes)
    dim = x.shape[2]
    if dim == 0 or dim % 2:
        raise ValueError(f"{name} must have an even head dim D >= 2, got shape {tuple(x.shape)}")
    require_unit_stride(name, x, "D")
    return x


def _check_apply_rotary(q, k, cos, sin, position_ids) -> None:
    q_name = "x" if k is None else "x[0]"
    _check_rotated(q_name, q, KERNEL_DTYPES)
    num_tokens, _, dim = q.shape
    if k is not None:
        _check_rotated("x[1]", k, (q.dtype,))
        require_device("x[1]", k, q.device, "x[0]")
        if (k.shape[0], k.shape[2]) != (num_tokens, dim):
            raise ValueError(f"x[1] has shape {tuple(k.shape)} but x[0] has {tuple(q.shape)}; "
                             "q and k must share T and D")
    for name, table in (("cos", cos), ("sin", sin)):
        require_tensor(name, table, dims=2, dtypes=KERNEL_DTYPES)
        require_device(name, table, q.device, q_name)
        if table.shape[1] != dim:
            raise ValueError(f"{name} must be [P, D] with D = {dim} (from {q_name}), got shape "
                             f"{tuple(table.shape)}")
        require_unit_stride(name, table, "D")
        if table.requires_grad:
            raise ValueError(f"{name} requires grad, but apply_rotary gives the tables no "
                             f"gradient; pass {name}.detach()")
    if sin.shape != cos.shape or sin.dtype != cos.dtype:
        raise ValueError(f"sin ({tuple(sin.shape)}, {dtype_name(sin.dtype)}) must match cos "
                         f"({tuple(cos.shape)}, {dtype_name(cos.dtype)})")
    require_tensor("position_ids", position_ids, dims=1, dtypes=INDEX_DTYPES)
    require_device("position_ids", position_ids, q.device, q_name)
    if position_ids.shape[0] != num_tokens:
        raise ValueError(f"position_ids has {position_ids.shape[0]} entries but {q_name} has "
                         f"T = {num_tokens} tokens; they must match")
    require_index_range("position_ids", position_ids, cos.shape[0], "P", "P from cos")
