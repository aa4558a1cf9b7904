"""Kernel family 1: packed variable-length sequences with skip tokens.

Ops:
    gather_rows: output row t is ``sources[source_ids[t]][row_ids[t]]``; assembles packed input
        embeddings (token-embedding rows, projected visual rows, learnable skip / begin / end vectors)
        in one pass. Backends: cuda, cpp, triton, reference.
    find_padding_tiles: which tiles of pre-padded images are entirely padding (their sub-images are
        then never encoded: one skip token stands in). Backends: cuda, triton, reference.

Each op has a pure-PyTorch reference beside it (``*_reference``), which the tests compare against.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sphinx_kernels._validation import (INDEX_DTYPES, dtype_name, require_device, require_tensor,
                                        should_check_values)
from sphinx_kernels.backends import (CPP, CUDA, FLOAT_DTYPES, REFERENCE, TRITON, Backend,
                                     OpBackends, Request, native_extension)

__all__ = ["gather_rows", "gather_rows_reference", "GATHER_ROWS_BACKENDS", "MAX_GATHER_SOURCES",
           "find_padding_tiles", "find_padding_tiles_reference", "FIND_PADDING_TILES_BACKENDS"]

# The CUDA kernel takes its table of sources by value (csrc/varlen/varlen.h: kMaxGatherSources).
MAX_GATHER_SOURCES = 16


# ---------------------------------------------------------------------------------------------------
# gather_rows


def gather_rows(sources: Sequence[torch.Tensor], source_ids: torch.Tensor, row_ids: torch.Tensor,
                *, backend: str | None = None) -> torch.Tensor:
    """Gathers rows from several tables into one tensor: ``out[t] = sources[source_ids[t]][row_ids[t]]``.

    Args:
        sources: 1 to 16 tensors ``[N_s, D]``, one float dtype (float16, bfloat16, float32, float64),
            one device and one width ``D``; rows must have unit stride along ``D`` (any row stride,
            expanded rows included). ``N_s`` may be 0.
        source_ids: ``[T]`` int32 or int64: the source of each output row; a negative id gives a row
            of zeros (padding).
        row_ids: ``[T]``, the dtype of ``source_ids``: the row within that source, in ``[0, N_s)``.
        backend: force one of ``GATHER_ROWS_BACKENDS.names`` (else chosen per call; see
            ``sphinx_kernels.backends``).

    Returns:
        ``[T, D]`` in the sources' dtype, on their device. The forward is exact data movement.

    Autograd: every source that requires grad receives the sum of the output gradients of the rows
    read from it (an embedding row used by many tokens accumulates all of them), in float32 (float64
    for float64 sources), in ascending ``t``: deterministic, and the same bits on every kernel backend.

    Index values are validated on the CPU; on a GPU only with ``SPHINX_KERNELS_CHECK_INPUTS=1`` (a host
    sync), and an out-of-range index that reaches a kernel gives a NaN row, never an out-of-bounds
    access.
    """
    _check_gather_rows(sources, source_ids, row_ids)
    chosen = GATHER_ROWS_BACKENDS.select(Request(sources[0].device, sources[0].dtype), backend)
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


def _gather_rows_backward_reference(grad: torch.Tensor, source_ids: torch.Tensor,
                                    row_ids: torch.Tensor, source_rows: list[int],
                                    needs_grad: list[bool]) -> torch.Tensor:
    """The gradient rows of every source that needs one, concatenated: ``[sum N_s needed, D]``."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
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


def _gather_rows_plan(source_ids: torch.Tensor, row_ids: torch.Tensor, source_rows: list[int],
                      needs_grad: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's fixed summation order, with torch ops and no host sync.

    Every output row t read from a source that needs a gradient goes to gradient row
    ``base[s] + row_ids[t]`` of the concatenated gradient; sorting t stably by that key gives ``order``
    and the segment of each gradient row in it, ``offsets`` (``[R + 1]``).
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
    def backward(grad, source_ids, row_ids, source_rows, needs_grad):
        order, offsets = _gather_rows_plan(source_ids, row_ids, source_rows, needs_grad)
        return segment_sum(grad.contiguous(), order, offsets)
    return backward


def _native_ops():
    native_extension()  # importing _C registers torch.ops.sphinx_kernels.*_native
    return torch.ops.sphinx_kernels


def _triton_kernels():
    from sphinx_kernels.triton import varlen
    return varlen


def _native_gather_rows(sources, source_ids, row_ids):
    return _native_ops().gather_rows_native(sources, source_ids, row_ids)


def _native_segment_sum(rows, order, offsets):
    return _native_ops().segment_sum_rows_native(rows, order, offsets)


def _triton_gather_rows(sources, source_ids, row_ids):
    return _triton_kernels().gather_rows(sources, source_ids, row_ids)


def _triton_segment_sum(rows, order, offsets):
    return _triton_kernels().segment_sum_rows(rows, order, offsets)


# impl: (forward, backward). Every backend serves every input that passes validation.
_NATIVE_IMPL = (_native_gather_rows, _planned_backward(_native_segment_sum))
GATHER_ROWS_BACKENDS = OpBackends("gather_rows", [
    Backend(CUDA, _NATIVE_IMPL, FLOAT_DTYPES),
    Backend(CPP, _NATIVE_IMPL, FLOAT_DTYPES),
    Backend(TRITON, (_triton_gather_rows, _planned_backward(_triton_segment_sum)), FLOAT_DTYPES),
    Backend(REFERENCE, (gather_rows_reference, _gather_rows_backward_reference), FLOAT_DTYPES),
])


@torch.library.custom_op("sphinx_kernels::gather_rows", mutates_args=())
def _gather_rows_op(sources: list[torch.Tensor], source_ids: torch.Tensor, row_ids: torch.Tensor,
                    backend: str) -> torch.Tensor:
    forward, _ = GATHER_ROWS_BACKENDS[backend].impl
    return forward(sources, source_ids, row_ids)


@_gather_rows_op.register_fake
def _(sources, source_ids, row_ids, backend):
    return sources[0].new_empty((source_ids.shape[0], sources[0].shape[1]))


@torch.library.custom_op("sphinx_kernels::gather_rows_backward", mutates_args=())
def _gather_rows_backward_op(grad: torch.Tensor, source_ids: torch.Tensor, row_ids: torch.Tensor,
                             source_rows: list[int], needs_grad: list[bool],
                             backend: str) -> torch.Tensor:
    _, backward = GATHER_ROWS_BACKENDS[backend].impl
    return backward(grad, source_ids, row_ids, source_rows, needs_grad)


@_gather_rows_backward_op.register_fake
def _(grad, source_ids, row_ids, source_rows, needs_grad, backend):
    total = sum(n for n, need in zip(source_rows, needs_grad) if need)
    return grad.new_empty((total, grad.shape[1]))


def _gather_rows_setup_context(ctx, inputs, output):
    sources, source_ids, row_ids, backend = inputs
    ctx.save_for_backward(source_ids, row_ids)
    ctx.source_rows = [s.shape[0] for s in sources]
    ctx.needs_grad = [s.requires_grad for s in sources]
    ctx.backend = backend


def _gather_rows_backward(ctx, grad):
    source_ids, row_ids = ctx.saved_tensors
    sizes = [n for n, need in zip(ctx.source_rows, ctx.needs_grad) if need]
    if not sizes:
        return None, None, None, None
    stacked = _gather_rows_backward_op(grad, source_ids, row_ids, ctx.source_rows, ctx.needs_grad,
                                       ctx.backend)
    parts = iter(stacked.split(sizes))
    return [next(parts) if need else None for need in ctx.needs_grad], None, None, None


_gather_rows_op.register_autograd(_gather_rows_backward, setup_context=_gather_rows_setup_context)


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
        if src.shape[1] > 1 and src.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along its last dimension (stride "
                             f"{tuple(src.stride())}); pass .contiguous() explicitly")
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


# ---------------------------------------------------------------------------------------------------
# find_padding_tiles

IMAGE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def find_padding_tiles(images: torch.Tensor, tile: int | tuple[int, int],
                       pad_value: float | Sequence[float] | torch.Tensor = 0.0, *,
                       backend: str | None = None) -> torch.Tensor:
    """Which tiles of pre-padded images are pure padding: every pixel, in every channel, equals the pad.

    Args:
        images: ``[N, C, H, W]`` (or ``[C, H, W]``) float16, bfloat16 or float32, any strides
            (channels-last included).
        tile: the tile size, ``t`` or ``(th, tw)``; ``H`` and ``W`` must be multiples of it.
        pad_value: the pad, one value for all channels or one per channel (a sequence or a ``[C]``
            tensor), e.g. the normalised value of the padding colour. It is rounded to the images'
            dtype before the exact comparison. A NaN pad matches nothing.
        backend: force one of ``FIND_PADDING_TILES_BACKENDS.names``.

    Returns:
        bool ``[N, H // th, W // tw]`` (``[H // th, W // tw]`` for a single image), tiles in raster
        order: True where the tile is entirely padding.
    """
    require_tensor("images", images)
    if images.dim() not in (3, 4):
        raise ValueError(f"images must be [N, C, H, W] or [C, H, W], got shape {tuple(images.shape)}")
    single = images.dim() == 3
    images = images[None] if single else images
    tile_h, tile_w, pad = _check_find_padding_tiles(images, tile, pad_value)
    chosen = FIND_PADDING_TILES_BACKENDS.select(Request(images.device, images.dtype), backend)
    flags = _find_padding_tiles_op(images.detach(), pad, tile_h, tile_w, chosen.name)
    return flags[0] if single else flags


def find_padding_tiles_reference(images: torch.Tensor, pad: torch.Tensor, tile_h: int,
                                 tile_w: int) -> torch.Tensor:
    """Pure-PyTorch ``find_padding_tiles`` on ``[N, C, H, W]`` with ``pad`` float32 ``[C]``."""
    num, channels, height, width = images.shape
    equal = images.float() == pad.view(1, channels, 1, 1)
    tiles = equal.view(num, channels, height // tile_h, tile_h, width // tile_w, tile_w)
    return tiles.all(dim=5).all(dim=3).all(dim=1)


def _native_find_padding_tiles(images, pad, tile_h, tile_w):
    return _native_ops().find_padding_tiles_native(images, pad, tile_h, tile_w)


def _triton_find_padding_tiles(images, pad, tile_h, tile_w):
    return _triton_kernels().find_padding_tiles(images, pad, tile_h, tile_w)


# No C++ CPU kernel: on the CPU the reference is one vectorised comparison, and data loading (where
# pre-padded images are checked) runs there only when the GPU is busy elsewhere.
FIND_PADDING_TILES_BACKENDS = OpBackends("find_padding_tiles", [
    Backend(CUDA, _native_find_padding_tiles, IMAGE_DTYPES),
    Backend(TRITON, _triton_find_padding_tiles, IMAGE_DTYPES),
    Backend(REFERENCE, find_padding_tiles_reference, IMAGE_DTYPES),
])


@torch.library.custom_op("sphinx_kernels::find_padding_tiles", mutates_args=())
def _find_padding_tiles_op(images: torch.Tensor, pad: torch.Tensor, tile_h: int, tile_w: int,
                           backend: str) -> torch.Tensor:
    return FIND_PADDING_TILES_BACKENDS[backend].impl(images, pad, tile_h, tile_w)


@_find_padding_tiles_op.register_fake
def _(images, pad, tile_h, tile_w, backend):
    num, _, height, width = images.shape
    return images.new_empty((num, height // tile_h, width // tile_w), dtype=torch.bool)


def _check_find_padding_tiles(images, tile, pad_value) -> tuple[int, int, torch.Tensor]:
    """Validates the call; returns the tile size and the pad as float32 ``[C]`` on the images' device."""
    require_tensor("images", images, dims=4, dtypes=IMAGE_DTYPES)
    sizes = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if len(sizes) != 2 or not all(isinstance(t, int) and t > 0 for t in sizes):
        raise ValueError(f"tile must be a positive int or a pair of them, got {tile!r}")
    tile_h, tile_w = sizes
    _, channels, height, width = images.shape
    if height % tile_h or width % tile_w:
        raise ValueError(f"tile {sizes} must divide the image size {(height, width)}; pad the "
                         "images to a multiple of the tile first")
    if isinstance(pad_value, torch.Tensor):
        require_device("pad_value", pad_value, images.device, "images")
        pad = pad_value
    else:
        try:
            pad = torch.tensor(pad_value, dtype=torch.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(f"pad_value must be a float, a sequence of floats or a tensor, got "
                            f"{pad_value!r}") from error
    if pad.dim() > 1 or (pad.dim() == 1 and pad.shape[0] != channels):
        raise ValueError(f"pad_value must be one value or one per channel ({channels}), got shape "
                         f"{tuple(pad.shape)}")
    # Rounded to the images' dtype first: the comparison is exact in that dtype.
    pad = pad.to(images.dtype).to(torch.float32).expand(channels).contiguous()
    return tile_h, tile_w, pad.to(images.device, non_blocking=True)
