"""Kernel family 1: packed variable-length sequences with skip tokens.

Ops:
    gather_rows: output row t is ``sources[source_ids[t]][row_ids[t]]``; assembles packed input
        embeddings (token-embedding rows, projected visual rows, learnable skip / begin / end vectors)
        in one pass. Backends: cuda, cpp, triton, reference.
    find_padding_tiles: which tiles of pre-padded images are entirely padding (their sub-images are
        then never encoded: one skip token stands in). Backends: cuda, triton, reference.
    varlen_attention: flash attention over packed sequences (causal bottom-right, GQA, prefix-LM),
        forward and backward. Backends: triton, torch_flash, flash_attn, reference.

Each op has a pure-PyTorch reference beside it (``*_reference``), which the tests compare against.
"""
from __future__ import annotations

import importlib.util
from typing import Sequence

import torch

from sphinx_kernels._validation import (INDEX_DTYPES, dtype_name, require_device, require_tensor,
                                        should_check_values)
from sphinx_kernels.backends import (CPP, CUDA, FLOAT_DTYPES, REFERENCE, TRITON, Backend,
                                     OpBackends, Platform, Request, native_ops)

__all__ = ["gather_rows", "gather_rows_reference", "GATHER_ROWS_BACKENDS", "MAX_GATHER_SOURCES",
           "find_padding_tiles", "find_padding_tiles_reference", "FIND_PADDING_TILES_BACKENDS",
           "varlen_attention", "varlen_attention_reference", "VARLEN_ATTENTION_BACKENDS"]

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


def _triton_kernels():
    from sphinx_kernels.triton import varlen
    return varlen


def _native_gather_rows(sources, source_ids, row_ids):
    return native_ops().gather_rows_native(sources, source_ids, row_ids)


def _native_segment_sum(rows, order, offsets):
    return native_ops().segment_sum_rows_native(rows, order, offsets)


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
    return native_ops().find_padding_tiles_native(images, pad, tile_h, tile_w)


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


# ---------------------------------------------------------------------------------------------------
# varlen_attention

ATTENTION_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
FLASH_DTYPES = frozenset({torch.float16, torch.bfloat16})
MAX_ATTENTION_HEAD_DIM = 256


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
                     max_seqlen_k: int | None = None, *, causal: bool = True,
                     softmax_scale: float | None = None, prefix_lens: torch.Tensor | None = None,
                     deterministic: bool = False, backend: str | None = None) -> torch.Tensor:
    """Attention over packed variable-length sequences: each sequence attends only to itself.

    Args:
        q: ``[Tq, Hq, D]`` float16, bfloat16 or float32 (float64: reference backend only).
        k, v: ``[Tk, Hkv, D]``, the dtype and device of ``q``; ``Hq`` a multiple of ``Hkv`` (GQA; MQA
            with ``Hkv = 1``). ``D`` from 1 to 256 (Triton pads the block to a power of 2, at least
            16). Any strides with unit stride along ``D``: q, k, v may be views of one fused
            ``[T, (Hq + 2 Hkv) D]`` projection, e.g. ``qkv.view(T, -1, D).split([Hq, Hkv, Hkv], 1)``.
        cu_seqlens_q: int32 ``[B + 1]``: sequence b owns the query rows from ``cu_seqlens_q[b]`` to
            ``cu_seqlens_q[b + 1]``; ``cu_seqlens_q[0] == 0``, non-decreasing,
            ``cu_seqlens_q[-1] <= Tq``. Zero-length sequences are legal; rows past
            ``cu_seqlens_q[-1]`` are padding.
        cu_seqlens_k: int32 ``[B + 1]`` for the key rows, the same rules against ``Tk``; None: the
            same as ``cu_seqlens_q`` (self-attention, ``Tk == Tq`` required).
        max_seqlen_q, max_seqlen_k: optional upper bounds of the sequence lengths (host ints). They
            only shrink the launch grid; None uses a bound known from shapes (no host sync). A
            bound below a real length is a contract violation (rows are then left out, never read or
            written out of bounds). The FlashAttention-2 peers (torch_flash, flash_attn), which
            need host ints, serve only calls that pass both.
        causal: mask keys after each query's position (bottom-right aligned, below).
        softmax_scale: scale of ``q @ k^T`` before the softmax; None: ``D ** -0.5``.
        prefix_lens: optional int32 ``[B]`` (causal only): the first ``prefix_lens[b]`` key positions
            of sequence b are a bidirectional prefix (prefix-LM: an image and its prompt).
            ``0 <= prefix_lens[b] <= Lk_b``.
        deterministic: require a bitwise-repeatable backward. The Triton kernels are always
            deterministic (no atomics anywhere); flash_attn runs its deterministic backward; the
            flag excludes torch_flash, whose backward is not.
        backend: force one of ``VARLEN_ATTENTION_BACKENDS.names`` (else chosen per call).

    Returns:
        ``[Tq, Hq, D]`` in ``q``'s dtype, contiguous. Padding rows are 0, and so is every row that
        sees no key.

    Mask: query i of sequence b (``Lq`` queries, ``Lk`` keys, prefix ``P``, 0 without ``prefix_lens``)
    sits at key position ``p = i + Lk - Lq``: queries are aligned to the END of their keys, as for
    new tokens attending to a KV cache (flash-attn's convention). It sees key j iff
    ``p >= 0 and (j <= p or j < P)`` when causal, every key of its sequence otherwise. A row with
    ``p < 0`` (more queries than keys) sees nothing and outputs 0::

        Lq = 2, Lk = 5:      Lq = 5, Lk = 2:      Lq = Lk = 5, P = 3:
          1 1 1 1 0            0 0                  1 1 1 0 0
          1 1 1 1 1            0 0                  1 1 1 0 0
                               0 0                  1 1 1 0 0
                               1 0                  1 1 1 1 0
                               1 1                  1 1 1 1 1

    With ``cu_seqlens_k`` the prefix counts key positions: a cached prompt of ``P`` tokens stays
    bidirectional while the new queries (all at ``p >= P`` in generation) attend causally.

    Autograd: gradients for q, k, v in their dtypes; padding rows of q (past ``cu_seqlens_q[-1]``)
    and k, v rows past ``cu_seqlens_k[-1]`` get exactly 0. Kernels accumulate in float32 and save the
    float32 log-sum-exp for the backward; memory is linear in T (no score matrix).

    Index values (cu_seqlens, prefix_lens, the bounds) are validated on the CPU; on a GPU only with
    ``SPHINX_KERNELS_CHECK_INPUTS=1`` (a host sync).
    """
    same_keys = cu_seqlens_k is None
    cu_k = cu_seqlens_q if same_keys else cu_seqlens_k
    _check_varlen_attention(q, k, v, cu_seqlens_q, cu_k, same_keys, max_seqlen_q, max_seqlen_k,
                            causal, softmax_scale, prefix_lens)
    if same_keys and max_seqlen_k is None:
        max_seqlen_k = max_seqlen_q
    head_dim = q.shape[2]
    scale = float(softmax_scale) if softmax_scale is not None else head_dim ** -0.5
    request = Request(q.device, q.dtype, {
        "head_dim": head_dim, "causal": causal, "prefix": prefix_lens is not None,
        "max_seqlen": max_seqlen_q is not None and max_seqlen_k is not None,
        "deterministic": deterministic})
    chosen = VARLEN_ATTENTION_BACKENDS.select(request, backend)
    bound_q = q.shape[0] if max_seqlen_q is None else min(max_seqlen_q, q.shape[0])
    bound_k = k.shape[0] if max_seqlen_k is None else min(max_seqlen_k, k.shape[0])
    out, _ = _varlen_attention_op(q, k, v, cu_seqlens_q, cu_k, prefix_lens, bound_q, bound_k, causal,
                                  scale, deterministic, chosen.name)
    return out


def _visible_keys(len_q: int, len_k: int, prefix: int, causal: bool,
                  device: torch.device) -> torch.Tensor:
    """bool ``[Lq, Lk]``: the mask of ``varlen_attention``'s docstring for one sequence."""
    if not causal:
        return torch.ones((len_q, len_k), dtype=torch.bool, device=device)
    pos = torch.arange(len_q, device=device)[:, None] + (len_k - len_q)
    keys = torch.arange(len_k, device=device)[None, :]
    return (pos >= 0) & ((keys <= pos) | (keys < prefix))


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None = None,
                               *, causal: bool = True, softmax_scale: float | None = None,
                               prefix_lens: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch ``varlen_attention``: per sequence, ``scaled_dot_product_attention`` in the inputs'
    dtype with an explicit boolean mask; differentiable by autograd; the tests' oracle in float64.

    Returns ``(out [Tq, Hq, D], lse [Hq, Tq])``, lse in float32 (float64 for float64 inputs), -inf
    for rows that see no key and for padding rows. Reads the offsets on the host (a sync on a GPU).
    """
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    total_q, heads, head_dim = q.shape
    group = heads // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    offsets_q, offsets_k = cu_seqlens_q.tolist(), cu_k.tolist()
    prefixes = prefix_lens.tolist() if prefix_lens is not None else [0] * (len(offsets_q) - 1)
    outs, lses = [], []
    for b, prefix in enumerate(prefixes):
        q0, q1, k0, k1 = offsets_q[b], offsets_q[b + 1], offsets_k[b], offsets_k[b + 1]
        qb = q[q0:q1].transpose(0, 1)                                       # [Hq, Lq, D]
        kb = k[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)       # [Hq, Lk, D]
        vb = v[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)
        mask = _visible_keys(q1 - q0, k1 - k0, prefix, causal, q.device)
        sees = mask.any(dim=1)
        # A row that sees nothing attends to everything (finite, so no NaN reaches autograd) and is
        # then replaced by 0; torch.where passes it no gradient.
        ob = torch.nn.functional.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask | ~sees[:, None], scale=scale) if k1 > k0 else qb * 0
        outs.append(torch.where(sees[None, :, None], ob, 0).transpose(0, 1))
        scores = (qb.detach().to(lse_dtype) @ kb.detach().to(lse_dtype).transpose(1, 2)) * scale
        lses.append(torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=2)
                    if k1 > k0 else scores.new_full((heads, q1 - q0), float("-inf")))
    padding = total_q - offsets_q[-1]
    out = torch.cat(outs + [q.new_zeros((padding, heads, v.shape[2]))])
    lse = torch.cat(lses + [q.new_full((heads, padding), float("-inf"), dtype=lse_dtype)], dim=1)
    return out, lse


def _reference_attention(q, k, v, cu_q, cu_k, prefix, max_q, max_k, causal, scale, deterministic):
    with torch.no_grad():
        out, lse = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=causal,
                                              softmax_scale=scale, prefix_lens=prefix)
    return out, lse.float()


def _reference_attention_backward(grad, q, k, v, out, lse, cu_q, cu_k, prefix, max_q, max_k, causal,
                                  scale, deterministic):
    """The attention backward written out per sequence (a custom op's impl runs below autograd, so it
    cannot differentiate the forward): P = softmax(S), dV = P^T dO,
    dS = P * (dO V^T - rowsum(dO V^T * P)), dQ = scale dS K, dK = scale dS^T Q. In float32 for
    float16 and bfloat16 inputs: these formulas in half precision lose more than PyTorch's own SDPA
    backward does."""
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        grad, q, k, v = (t.float() for t in (grad, q, k, v))
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    kv_heads, group, head_dim = k.shape[1], q.shape[1] // k.shape[1], q.shape[2]
    offsets_q, offsets_k = cu_q.tolist(), cu_k.tolist()
    prefixes = prefix.tolist() if prefix is not None else [0] * (len(offsets_q) - 1)
    for b, prefix_len in enumerate(prefixes):
        q0, q1, k0, k1 = offsets_q[b], offsets_q[b + 1], offsets_k[b], offsets_k[b + 1]
        qb, gb = q[q0:q1].transpose(0, 1), grad[q0:q1].transpose(0, 1)     # [Hq, Lq, D]
        kb = k[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)       # [Hq, Lk, D]
        vb = v[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)
        mask = _visible_keys(q1 - q0, k1 - k0, prefix_len, causal, q.device)
        scores = (qb @ kb.transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))
        probs = torch.where(mask, torch.softmax(scores, dim=-1), 0)  # a row with no key: 0, not NaN
        grad_probs = gb @ vb.transpose(1, 2)
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
        dq[q0:q1] = (grad_scores @ kb * scale).transpose(0, 1)
        per_head_dk = grad_scores.transpose(1, 2) @ qb * scale
        per_head_dv = probs.transpose(1, 2) @ gb
        dk[k0:k1] = per_head_dk.view(kv_heads, group, k1 - k0, head_dim).sum(1).transpose(0, 1)
        dv[k0:k1] = per_head_dv.view(kv_heads, group, k1 - k0, head_dim).sum(1).transpose(0, 1)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def _triton_attention(q, k, v, cu_q, cu_k, prefix, max_q, max_k, causal, scale, deterministic):
    return _triton_kernels().varlen_attention_forward(q, k, v, cu_q, cu_k, prefix, max_q, max_k,
                                                      causal, scale)


def _triton_attention_backward(grad, q, k, v, out, lse, cu_q, cu_k, prefix, max_q, max_k, causal,
                               scale, deterministic):
    return _triton_kernels().varlen_attention_backward(grad, q, k, v, out, lse, cu_q, cu_k, prefix,
                                                       max_q, max_k, causal, scale)


def _zero_rows_past(x: torch.Tensor, cu_seqlens: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``x`` with the rows (along ``dim``) past ``cu_seqlens[-1]`` set to 0, without a host sync."""
    rows = torch.arange(x.shape[dim], device=x.device)
    keep = (rows < cu_seqlens[-1]).view([-1 if i == dim else 1 for i in range(x.dim())])
    return torch.where(keep, x, 0)


def _torch_flash_attention(q, k, v, cu_q, cu_k, prefix, max_q, max_k, causal, scale, deterministic):
    # FlashAttention-2 bundled with torch: bottom-right causal alignment, GQA by head count. Its
    # lse (float32 [Hq, Tq], +inf for rows without keys) feeds its own backward only.
    out, lse, *_ = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0,
                                                           causal, False, scale=scale)
    return _zero_rows_past(out, cu_q), lse


def _torch_flash_attention_backward(grad, q, k, v, out, lse, cu_q, cu_k, prefix, max_q, max_k,
                                    causal, scale, deterministic):
    # Without dropout the backward never reads the RNG state: empty stand-ins of the right dtypes.
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, seed, offset,
        scale=scale)
    return _zero_rows_past(dq, cu_q), _zero_rows_past(dk, cu_k), _zero_rows_past(dv, cu_k)


def _torch_flash_missing(device: torch.device) -> str | None:
    available = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)
    if not hasattr(torch.ops.aten, "_flash_attention_forward") or not available():
        return "this torch build has no FlashAttention kernels"
    return None


TORCH_FLASH = Platform("torch_flash", frozenset({"cuda"}), (8, 0), _torch_flash_missing)


def _flash_attn_ops():
    """flash-attn's varlen forward and backward: custom ops that flash-attn 2.7 and newer registers as
    ``torch.ops.flashattn.*`` when its interface module is imported. Their public API differentiates
    by autograd, which a custom op's impl cannot use; these two are what it calls underneath."""
    import flash_attn.flash_attn_interface  # noqa: F401  (registers the ops)
    ops = torch.ops.flashattn
    return ops._flash_attn_varlen_forward, ops._flash_attn_varlen_backward


def _flash_attn_attention(q, k, v, cu_q, cu_k, prefix, max_q, max_k, causal, scale, deterministic):
    # flash-attn's FlashAttention-2: bottom-right causal alignment and GQA by head count, as here;
    # its lse is float32 [Hq, Tq] and feeds its own backward only. It leaves padding rows unwritten.
    # It declares q, k, v mutated (their version counters move) though their values are kept.
    forward, _ = _flash_attn_ops()
    out, lse, *_ = forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale,
                           causal=causal)
    return _zero_rows_past(out, cu_q), lse


def _flash_attn_attention_backward(grad, q, k, v, out, lse, cu_q, cu_k, prefix, max_q, max_k,
                                   causal, scale, deterministic):
    _, backward = _flash_attn_ops()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)  # written in place
    backward(grad.contiguous(), q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k,
             dropout_p=0.0, softmax_scale=scale, causal=causal, window_size_left=-1,
             window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=deterministic)
    return _zero_rows_past(dq, cu_q), _zero_rows_past(dk, cu_k), _zero_rows_past(dv, cu_k)


# The keyword arguments the two calls above pass: a release whose ops name them differently is
# declared unsupported here rather than failing inside a training step.
_FLASH_ATTN_KEYWORDS = (
    {"dropout_p", "softmax_scale", "causal"},
    {"dropout_p", "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap",
     "alibi_slopes", "deterministic"},
)


def _flash_attn_missing(device: torch.device) -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    try:
        ops = _flash_attn_ops()
    except (ImportError, AttributeError, RuntimeError) as error:
        return f"flash-attn has no torch.ops.flashattn varlen ops (2.7 or newer has them): {error}"
    for op, keywords in zip(ops, _FLASH_ATTN_KEYWORDS):
        lacking = keywords - {arg.name for arg in op.default._schema.arguments}
        if lacking:
            return f"flash-attn's {op.default._schema.name} has no argument(s) {sorted(lacking)}"
    return None


FLASH_ATTN = Platform("flash_attn", frozenset({"cuda"}), (8, 0), _flash_attn_missing)


# The checks read features with permissive defaults: `python -m sphinx_kernels.info` probes a backend
# with device and dtype only.
def _head_dim_reasons(request: Request, limit: int, multiple: int = 1) -> list[str]:
    head_dim = request.features.get("head_dim", multiple)
    if head_dim > limit or head_dim % multiple:
        rule = f" and a multiple of {multiple}" if multiple > 1 else ""
        return [f"head dim {head_dim} must be at most {limit}{rule}"]
    return []


def _triton_attention_reasons(request: Request) -> list[str]:
    return _head_dim_reasons(request, MAX_ATTENTION_HEAD_DIM)


def _flash_attn_reasons(request: Request) -> list[str]:
    """What both FlashAttention-2 peers (torch's bundled copy, flash-attn) cannot serve."""
    reasons = _head_dim_reasons(request, 256, 8)
    if request.features.get("prefix", False):
        reasons.append("no prefix-LM mask (prefix_lens)")
    if not request.features.get("max_seqlen", True):
        reasons.append("needs max_seqlen_q and max_seqlen_k as host ints (not given; computing "
                       "them would be a host sync)")
    return reasons


def _torch_flash_reasons(request: Request) -> list[str]:
    reasons = _flash_attn_reasons(request)
    if request.features.get("deterministic", False):
        reasons.append("deterministic=True: its backward accumulates dQ with atomic adds")
    return reasons


# impl: (forward, backward). flash-attn serves deterministic=True (its own deterministic backward).
# Not a backend: xformers, whose varlen masks (BlockDiagonal*Mask.from_seqlens) are built from host
# lists of the lengths (a sync per call) and whose lse layout depends on the kernel its dispatcher
# picks; it stays a benchmark peer (benchmarks/bench_varlen.py).
VARLEN_ATTENTION_BACKENDS = OpBackends("varlen_attention", [
    Backend(TRITON, (_triton_attention, _triton_attention_backward), ATTENTION_DTYPES,
            _triton_attention_reasons),
    Backend(TORCH_FLASH, (_torch_flash_attention, _torch_flash_attention_backward), FLASH_DTYPES,
            _torch_flash_reasons),
    Backend(FLASH_ATTN, (_flash_attn_attention, _flash_attn_attention_backward), FLASH_DTYPES,
            _flash_attn_reasons),
    Backend(REFERENCE, (_reference_attention, _reference_attention_backward), FLOAT_DTYPES),
])


@torch.library.custom_op("sphinx_kernels::varlen_attention", mutates_args=())
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, prefix_lens: torch.Tensor | None,
                         max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float,
                         deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    forward, _ = VARLEN_ATTENTION_BACKENDS[backend].impl
    out, lse = forward(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q, max_seqlen_k,
                       causal, softmax_scale, deterministic)
    return out.contiguous(), lse.contiguous()


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q, max_seqlen_k, causal,
      softmax_scale, deterministic, backend):
    total_q, heads, _ = q.shape
    return (q.new_empty((total_q, heads, v.shape[2])),
            q.new_empty((heads, total_q), dtype=torch.float32))


@torch.library.custom_op("sphinx_kernels::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                  cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                                  prefix_lens: torch.Tensor | None, max_seqlen_q: int,
                                  max_seqlen_k: int, causal: bool, softmax_scale: float,
                                  deterministic: bool, backend: str
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, backward = VARLEN_ATTENTION_BACKENDS[backend].impl
    grads = backward(grad, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q,
                     max_seqlen_k, causal, softmax_scale, deterministic)
    return tuple(g.contiguous() for g in grads)


@_varlen_attention_backward_op.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q, max_seqlen_k,
      causal, softmax_scale, deterministic, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _varlen_attention_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, prefix, max_q, max_k, causal, scale, deterministic, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, prefix)
    ctx.arguments = (max_q, max_k, causal, scale, deterministic, backend)


def _varlen_attention_backward(ctx, grad, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k, prefix = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_backward_op(grad, q, k, v, out, lse, cu_q, cu_k, prefix,
                                               *ctx.arguments)
    return (dq, dk, dv) + (None,) * 9


_varlen_attention_op.register_autograd(_varlen_attention_backward,
                                       setup_context=_varlen_attention_setup_context)


def _check_varlen_attention(q, k, v, cu_q, cu_k, same_keys, max_seqlen_q, max_seqlen_k, causal,
                            softmax_scale, prefix_lens) -> None:
    require_tensor("q", q, dims=3, dtypes=FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        require_tensor(name, t, dims=3)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {dtype_name(t.dtype)} but q has {dtype_name(q.dtype)}; "
                            "q, k and v must share one dtype")
        require_device(name, t, q.device, "q")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    total_q, heads, head_dim = q.shape
    total_k, kv_heads, k_dim = k.shape
    if k_dim != head_dim:
        raise ValueError(f"k and v must have q's head dim {head_dim}, got {k_dim}")
    if not 1 <= head_dim <= MAX_ATTENTION_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[2]) must be 1 to {MAX_ATTENTION_HEAD_DIM}, got {head_dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q's heads ({heads}) must be a positive multiple of k's and v's heads "
                         f"({kv_heads})")
    if same_keys and total_k != total_q:
        raise ValueError(f"without cu_seqlens_k, k and v must have q's {total_q} rows, got {total_k}; "
                         "pass cu_seqlens_k for keys laid out differently")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if head_dim > 1 and t.stride(2) != 1:
            raise ValueError(f"{name} must have unit stride along its last dimension (strides "
                             f"{tuple(t.stride())}); pass .contiguous() explicitly")
    names = ("cu_seqlens_q",) if same_keys else ("cu_seqlens_q", "cu_seqlens_k")
    for name, cu in zip(names, (cu_q, cu_k)):
        require_tensor(name, cu, dims=1, dtypes=(torch.int32,))
        require_device(name, cu, q.device, "q")
        if cu.shape[0] == 0:
            raise ValueError(f"{name} must have B + 1 >= 1 entries, got none")
    if cu_k.shape != cu_q.shape:
        raise ValueError(f"cu_seqlens_k has {cu_k.shape[0]} entries but cu_seqlens_q has "
                         f"{cu_q.shape[0]}; both must be [B + 1]")
    num_seqs = cu_q.shape[0] - 1
    if prefix_lens is not None:
        if not causal:
            raise ValueError("prefix_lens applies to causal attention only; pass causal=True or "
                             "drop prefix_lens (non-causal attention already sees every key)")
        require_tensor("prefix_lens", prefix_lens, dims=1, dtypes=(torch.int32,))
        require_device("prefix_lens", prefix_lens, q.device, "q")
        if prefix_lens.shape[0] != num_seqs:
            raise ValueError(f"prefix_lens must be [B] = [{num_seqs}], got {tuple(prefix_lens.shape)}")
    for name, bound in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 0):
            raise TypeError(f"{name} must be None or an int >= 0, got {bound!r}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool)
                                      or not isinstance(softmax_scale, (int, float))):
        raise TypeError(f"softmax_scale must be None or a float, got {softmax_scale!r}")
    extra = () if prefix_lens is None else (prefix_lens,)
    if should_check_values(cu_q, cu_k, *extra):
        lengths = {}
        for name, cu, total in (("cu_seqlens_q", cu_q, total_q), ("cu_seqlens_k", cu_k, total_k)):
            if int(cu[0]) != 0:
                raise ValueError(f"{name}[0] must be 0, got {int(cu[0])}")
            steps = cu[1:] - cu[:-1]
            if bool((steps < 0).any()):
                b = int((steps < 0).nonzero()[0, 0])
                raise ValueError(f"{name} must be non-decreasing; {name}[{b + 1}] = {int(cu[b + 1])} "
                                 f"< {name}[{b}] = {int(cu[b])}")
            if int(cu[-1]) > total:
                raise ValueError(f"{name}[-1] = {int(cu[-1])} exceeds the {total} rows of "
                                 f"{'q' if name == 'cu_seqlens_q' else 'k and v'}")
            lengths[name] = steps
        for name, key, bound in (("max_seqlen_q", "cu_seqlens_q", max_seqlen_q),
                                 ("max_seqlen_k", "cu_seqlens_k", max_seqlen_k)):
            longest = int(lengths[key].max()) if num_seqs else 0
            if bound is not None and bound < longest:
                raise ValueError(f"{name} = {bound} is below the longest sequence ({longest}); it "
                                 "must be an upper bound")
        if prefix_lens is not None:
            bad = (prefix_lens < 0) | (prefix_lens > lengths["cu_seqlens_k"])
            if bool(bad.any()):
                b = int(bad.nonzero()[0, 0])
                raise ValueError(f"prefix_lens[{b}] = {int(prefix_lens[b])} must be in [0, "
                                 f"{int(lengths['cu_seqlens_k'][b])}] (the key length of sequence "
                                 f"{b})")
