"""``gather_rows``: ``out[t] = sources[source_ids[t]][row_ids[t]]``, the one-pass assembly of packed
input embeddings (token-embedding rows, projected visual rows, learnable skip / begin / end
vectors).

Backends: ``cuda`` and ``cpp`` (``csrc/varlen/``), ``triton``
(``sphinx_kernels/triton/gather_rows.py``), ``reference`` (:func:`gather_rows_reference`). The
backward sums each source row's output gradients in ascending ``t`` on every backend: a fixed order
planned with torch ops (no host sync), then a segment sum by the backend's kernel.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sphinx_kernels._validation import (
    INDEX_DTYPES,
    dtype_name,
    require_device,
    require_tensor,
    require_unit_stride,
    should_check_values,
)
from sphinx_kernels.backends import Backend, Impl, OpBackends
from sphinx_kernels.dtypes import FLOAT_DTYPES, accumulate_dtype
from sphinx_kernels.kernel_op import kernel_op
from sphinx_kernels.platforms import CPP, CUDA, REFERENCE, TRITON, native, triton_launcher

__all__ = ["gather_rows", "gather_rows_reference", "gather_rows_backward_reference",
           "GATHER_ROWS_BACKENDS", "MAX_GATHER_SOURCES"]

# The CUDA kernel takes its table of sources by value (csrc/varlen/varlen.h: kMaxGatherSources).
MAX_GATHER_SOURCES = 16


def gather_rows(sources: Sequence[torch.Tensor], source_ids: torch.Tensor, row_ids: torch.Tensor,
                *, backend: str | None = None) -> torch.Tensor:
    """Gathers rows from several tables: ``out[t] = sources[source_ids[t]][row_ids[t]]``.

    Args:
        sources: 1 to 16 tensors ``[N_s, D]``, one float dtype (float16, bfloat16, float32,
            float64), one device and one width ``D``; rows must have unit stride along ``D`` (any
            row stride, expanded rows included). ``N_s`` may be 0.
        source_ids: ``[T]`` int32 or int64: the source of each output row; a negative id gives a row
            of zeros (padding).
        row_ids: ``[T]``, the dtype of ``source_ids``: the row within that source, in ``[0, N_s)``.
        backend: force one of ``GATHER_ROWS_BACKENDS.names`` (else chosen per call; see
            ``sphinx_kernels.backends``).

    Returns:
        ``[T, D]`` in the sources' dtype, on their device. The forward is exact data movement.

    Autograd: every source that requires grad receives the sum of the output gradients of the rows
    read from it (an embedding row used by many tokens accumulates all of them), in float32 (float64
    for float64 sources), in ascending ``t``: deterministic, and the same bits on every kernel
    backend.

    Index values are validated on the CPU; on a GPU only with ``SPHINX_KERNELS_CHECK_INPUTS=1`` (a
    host sync), and an out-of-range index that reaches a kernel gives a NaN row, never an
    out-of-bounds access.
    """
    _check_gather_rows(sources, source_ids, row_ids)
    request = GATHER_ROWS_BACKENDS.request(sources[0].device, sources[0].dtype)
    chosen = GATHER_ROWS_BACKENDS.select(request, backend)
    return _gather_rows_op(list(sources), source_ids, row_ids, chosen.name)


def gather_rows_reference(sources: Sequence[torch.Tensor], source_ids: torch.Tensor,
                          row_ids: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ``gather_rows`` (one index_select per source), the oracle of the tests."""
    out = sources[0].new_zeros((source_ids.shape[0], sources[0].shape[1]))
    known = source_ids < 0
    for s, src in enumerate(sources):
        hit = (source_ids == s) & (row_ids >= 0) & (row_ids < src.shape[0])
        if src.shape[0] > 0:
            rows = src.index_select(0, torch.where(hit, row_ids, 0))
            out = torch.where(hit[:, None], rows, out)
        known = known | hit
    return torch.where(known[:, None], out, float("nan"))


def gather_rows_backward_reference(grad: torch.Tensor, source_ids: torch.Tensor,
                                   row_ids: torch.Tensor, source_rows: list[int],
                                   needs_grad: list[bool]) -> torch.Tensor:
    """The gradient rows of every source that needs one, concatenated: ``[sum N_s needed, D]``."""
    acc = accumulate_dtype(grad.dtype)
    parts = []
    for s, (n, need) in enumerate(zip(source_rows, needs_grad)):
        if not need:
            continue
        hit = (source_ids == s) & (row_ids >= 0) & (row_ids < n)
        dest = torch.where(hit, row_ids.long(), n)  # row n collects everything read elsewhere
        part = grad.new_zeros((n + 1, grad.shape[1]), dtype=acc)
        part.index_put_((dest,), grad.to(acc), accumulate=True)
        parts.append(part[:n].to(grad.dtype))
    return torch.cat(parts)


def _summation_order(source_ids: torch.Tensor, row_ids: torch.Tensor, source_rows: list[int],
                     needs_grad: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's fixed summation order, with torch ops and no host sync.

    Every output row t read from a source that needs a gradient goes to gradient row
    ``base[s] + row_ids[t]`` of the concatenated gradient; sorting t stably by that key gives
    ``order`` and the segment of each gradient row in it, ``offsets`` (``[R + 1]``).
    """
    total = sum(n for n, need in zip(source_rows, needs_grad) if need)
    key = torch.full(source_ids.shape, total, dtype=torch.int64, device=source_ids.device)
    base = 0
    for s, (n, need) in enumerate(zip(source_rows, needs_grad)):
        if need:
            hit = (source_ids == s) & (row_ids >= 0) & (row_ids < n)
            key = torch.where(hit, row_ids.long() + base, key)
            base += n
    sorted_key, order = torch.sort(key, stable=True)
    offsets = torch.searchsorted(sorted_key, torch.arange(total + 1, device=key.device))
    return order, offsets


def _planned_backward(segment_sum):
    """The backward of a kernel backend: the fixed order, then its segment-sum kernel."""
    def backward(grad, source_ids, row_ids, source_rows, needs_grad):
        order, offsets = _summation_order(source_ids, row_ids, source_rows, needs_grad)
        return segment_sum(rows=grad.contiguous(), order=order, offsets=offsets)
    return backward


# Impl: forward(sources, source_ids, row_ids) -> [T, D];
# backward(grad, source_ids, row_ids, source_rows, needs_grad) -> the needed gradients,
# concatenated. Every backend serves every input that passes validation.
_NATIVE = Impl(native("gather_rows_native"), _planned_backward(native("segment_sum_rows_native")))
GATHER_ROWS_BACKENDS = OpBackends("gather_rows", [
    Backend(CUDA, _NATIVE, FLOAT_DTYPES),
    Backend(CPP, _NATIVE, FLOAT_DTYPES),
    Backend(TRITON, Impl(triton_launcher("gather_rows", "gather_rows"),
                         _planned_backward(triton_launcher("gather_rows", "segment_sum_rows"))),
            FLOAT_DTYPES),
    Backend(REFERENCE, Impl(gather_rows_reference, gather_rows_backward_reference), FLOAT_DTYPES),
])


@kernel_op("sphinx_kernels::gather_rows")
def _gather_rows_op(sources: list[torch.Tensor], source_ids: torch.Tensor, row_ids: torch.Tensor,
                    backend: str) -> torch.Tensor:
    return GATHER_ROWS_BACKENDS[backend].impl.forward(sources=sources, source_ids=source_ids,
                                                      row_ids=row_ids)


@_gather_rows_op.register_fake
def _(sources, source_ids, row_ids, backend):
    return sources[0].new_empty((source_ids.shape[0], sources[0].shape[1]))


@kernel_op("sphinx_kernels::gather_rows_backward")
def _gather_rows_backward_op(grad: torch.Tensor, source_ids: torch.Tensor, row_ids: torch.Tensor,
                             source_rows: list[int], needs_grad: list[bool],
                             backend: str) -> torch.Tensor:
    return GATHER_ROWS_BACKENDS[backend].impl.backward(
        grad=grad, source_ids=source_ids, row_ids=row_ids, source_rows=source_rows,
        needs_grad=needs_grad)


@_gather_rows_backward_op.register_fake
def _(grad, source_ids, row_ids, source_rows, needs_grad, backend):
    total = sum(n for n, need in zip(source_rows, needs_grad) if need)
    return grad.new_empty((total, grad.shape[1]))


def _setup_context(ctx, inputs, output):
    sources, source_ids, row_ids, backend = inputs
    ctx.save_for_backward(source_ids, row_ids)
    ctx.source_rows = [s.shape[0] for s in sources]
    ctx.needs_grad = [s.requires_grad for s in sources]
    ctx.backend = backend


def _backward(ctx, grad):
    source_ids, row_ids = ctx.saved_tensors
    sizes = [n for n, need in zip(ctx.source_rows, ctx.needs_grad) if need]
    if not sizes:
        return None, None, None, None
    stacked = _gather_rows_backward_op(grad, source_ids, row_ids, ctx.source_rows, ctx.needs_grad,
                                       ctx.backend)
    parts = iter(stacked.split(sizes))
    return [next(parts) if need else None for need in ctx.needs_grad], None, None, None


_gather_rows_op.register_autograd(_backward, setup_context=_setup_context)


def _check_gather_rows(sources, source_ids, row_ids) -> None:
    if not isinstance(sources, (list, tuple)):
        raise TypeError(f"sources must be a list or tuple of tensors, got {type(sources).__name__}")
    if not 1 <= len(sources) <= MAX_GATHER_SOURCES:
        raise ValueError(f"sources must hold 1 to {MAX_GATHER_SOURCES} tensors, got {len(sources)}")
    first = require_tensor("sources[0]", sources[0], dims=2, dtypes=FLOAT_DTYPES)
    for s, src in enumerate(sources):
        name = f"sources[{s}]"
        require_tensor(name, src, dims=2)
        if src.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {dtype_name(src.dtype)}, sources[0] has "
                            f"{dtype_name(first.dtype)}; all sources must share one dtype")
        require_device(name, src, first.device, "sources[0]")
        if src.shape[1] != first.shape[1]:
            raise ValueError(f"{name} has width {src.shape[1]}, sources[0] has {first.shape[1]}; "
                             "all sources must have one width")
        require_unit_stride(name, src)
    require_tensor("source_ids", source_ids, dims=1, dtypes=INDEX_DTYPES)
    require_tensor("row_ids", row_ids, dims=1, dtypes=INDEX_DTYPES)
    if row_ids.dtype != source_ids.dtype:
        raise TypeError(f"row_ids has dtype {dtype_name(row_ids.dtype)} but source_ids has "
                        f"{dtype_name(source_ids.dtype)}; they must match")
    if row_ids.shape != source_ids.shape:
        raise ValueError(f"row_ids has shape {tuple(row_ids.shape)} but source_ids has "
                         f"{tuple(source_ids.shape)}; they must match")
    require_device("source_ids", source_ids, first.device, "sources[0]")
    require_device("row_ids", row_ids, first.device, "sources[0]")
    if should_check_values(source_ids, row_ids):
        if source_ids.numel() and int(source_ids.max()) >= len(sources):
            raise ValueError(f"source_ids must be < len(sources) = {len(sources)}, "
                             f"got {int(source_ids.max())}")
        rows = torch.tensor([s.shape[0] for s in sources] + [1], device=source_ids.device)
        limit = rows[torch.where(source_ids < 0, len(sources), source_ids.long())]
        bad = (source_ids >= 0) & ((row_ids < 0) | (row_ids >= limit))
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            raise ValueError(f"row_ids[{t}] = {int(row_ids[t])} is out of range for "
                             f"sources[{int(source_ids[t])}] with {int(limit[t])} rows")
