"""``plan_layout``: from columnar per-sample descriptions (text tokens, answer mask, images with
their tile grids and skipped tiles), the packed layout of one batch: ``cu_seqlens``, position ids,
the (source, row) of every packed row for ``gather_rows``, shifted next-token labels, and the packed
destination of every projected visual row.

Backends: ``cpp`` (``csrc/varlen/layout_cpu.cpp``), ``reference`` (:func:`plan_layout_reference`).
It runs on the CPU (it prepares a batch in the data loader); the outputs move to the GPU with one
copy each.

Packed order of one sample: its first ``text_before_images`` text tokens (e.g. BOS, where the SPHINX
reference puts the image block), then for each of its images a begin-image marker, the global view's
``tokens_per_view`` visual rows, its tiles in raster order (each either its ``tokens_per_view``
visual rows or one skip row when skipped), an end-image marker; then the rest of the sample's text
tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from sphinx_kernels._validation import INDEX_DTYPES, INT32_MAX, require_int, require_tensor
from sphinx_kernels.backends import Backend, Impl, OpBackends
from sphinx_kernels.kernel_op import kernel_op
from sphinx_kernels.platforms import CPP, CPU_REFERENCE, native

__all__ = ["SOURCE_TEXT", "SOURCE_VISUAL", "SOURCE_SKIP", "SOURCE_IMAGE_BEGIN", "SOURCE_IMAGE_END",
           "SOURCE_PADDING", "IGNORE_INDEX", "ImageSpec", "SampleSpec", "LayoutInputs",
           "PackedLayout", "plan_layout", "plan_layout_reference", "layout_inputs",
           "PLAN_LAYOUT_BACKENDS"]

# The fixed source numbering of PackedLayout.source_ids: the order of the tables handed to
# gather_rows([embedding_table, visual_rows, skip[None], begin[None], end[None]], ...).
SOURCE_TEXT = 0          # the token-embedding table; row = token id
SOURCE_VISUAL = 1        # the projected visual rows; row = index into them (sample, image, view)
SOURCE_SKIP = 2          # the learnable skip vector (a [1, D] table); row = 0
SOURCE_IMAGE_BEGIN = 3   # the begin-image marker (a [1, D] table); row = 0
SOURCE_IMAGE_END = 4     # the end-image marker (a [1, D] table); row = 0
SOURCE_PADDING = -1      # a padding row: gather_rows gives zeros
IGNORE_INDEX = -100      # the label of a row that predicts nothing (torch's cross-entropy default)


# ----------------------------------------------------------------------------------------------
# Inputs: columnar tensors, and a readable per-sample builder for tests and the data pipeline


class LayoutInputs(NamedTuple):
    """One batch of ``B`` samples with ``I`` images in total, columnar (no per-sample objects).

    Sample ``b`` owns the next ``text_lens[b]`` entries of ``text_ids`` and ``answer_mask`` and the
    next ``images_per_sample[b]`` rows of ``tile_grids``; image ``i`` owns the next
    ``rows_i * cols_i`` entries of ``skipped_tiles``, its tiles in raster order (all concatenated in
    sample order). The first ``text_before_images[b]`` of the sample's text tokens go before its
    images (None: none).
    """

    text_ids: torch.Tensor           # [N] int64 (or int32): token ids, >= 0, samples concatenated
    text_lens: torch.Tensor          # [B] int: text tokens per sample, >= 0
    answer_mask: torch.Tensor        # [N] bool: True where the token is in an answer (trained on)
    images_per_sample: torch.Tensor  # [B] int: images per sample, >= 0
    tile_grids: torch.Tensor         # [I, 2] int: (rows, cols) of sub-image tiles, each >= 1
    skipped_tiles: torch.Tensor      # [sum rows * cols] bool: True where the tile is all padding
    text_before_images: torch.Tensor | None = None  # [B] int in [0, text_lens[b]], or None: all 0


@dataclass
class ImageSpec:
    """One image: a ``rows x cols`` grid of sub-image tiles (and the global view, always there)."""

    rows: int
    cols: int
    skipped: Sequence[bool] | None = None  # rows * cols flags in raster order; None: none skipped


@dataclass
class SampleSpec:
    """One sample: its text tokens with the answer mask, and its images, placed after the first
    ``text_before_images`` text tokens (0: before all the text)."""

    text: Sequence[int] = ()
    answer: Sequence[bool] | None = None  # one flag per text token; None: nothing is an answer
    images: Sequence[ImageSpec] = field(default_factory=list)
    text_before_images: int = 0


def layout_inputs(samples: Sequence[SampleSpec]) -> LayoutInputs:
    """The columnar :class:`LayoutInputs` of a list of per-sample descriptions."""
    text, answer, lens, per_sample, grids, skipped, before = [], [], [], [], [], [], []
    for b, sample in enumerate(samples):
        mask = [False] * len(sample.text) if sample.answer is None else list(sample.answer)
        if len(mask) != len(sample.text):
            raise ValueError(f"samples[{b}].answer has {len(mask)} flags for {len(sample.text)} "
                             "text tokens; they must match")
        text.extend(sample.text)
        answer.extend(mask)
        lens.append(len(sample.text))
        before.append(sample.text_before_images)
        per_sample.append(len(sample.images))
        for j, image in enumerate(sample.images):
            tiles = image.rows * image.cols
            flags = [False] * max(tiles, 0) if image.skipped is None else list(image.skipped)
            if len(flags) != tiles:
                raise ValueError(f"samples[{b}].images[{j}].skipped has {len(flags)} flags for a "
                                 f"{image.rows}x{image.cols} grid; they must match")
            grids.append((image.rows, image.cols))
            skipped.extend(flags)
    long = torch.int64
    return LayoutInputs(torch.tensor(text, dtype=long), torch.tensor(lens, dtype=long),
                        torch.tensor(answer, dtype=torch.bool),
                        torch.tensor(per_sample, dtype=long),
                        torch.tensor(grids, dtype=long).view(-1, 2),
                        torch.tensor(skipped, dtype=torch.bool), torch.tensor(before, dtype=long))


# ----------------------------------------------------------------------------------------------
# plan_layout


class PackedLayout(NamedTuple):
    """The packed layout of one batch of ``B`` samples in ``T`` rows (padding rows included).

    Feed it to ``gather_rows([embedding_table, visual_rows, skip, begin, end], source_ids,
    row_ids)`` with the tables in the order of the ``SOURCE_*`` constants (``skip``, ``begin``,
    ``end`` as ``[1, D]``), and let the projection write its rows to ``visual_rows`` directly.

    Row indices are int32 like ``cu_seqlens`` (a batch holds fewer than 2^31 rows): they are most of
    what the planner writes, and every op that takes them accepts int32. The labels are int64, the
    dtype torch's cross-entropy requires.
    """

    cu_seqlens: torch.Tensor    # [B + 1] int32: sample b owns rows cu_seqlens[b]:cu_seqlens[b + 1]
    position_ids: torch.Tensor  # [T] int32: 0, 1, ... within each sample; 0 on padding rows
    source_ids: torch.Tensor    # [T] int32: SOURCE_* of each row (padding: SOURCE_PADDING)
    row_ids: torch.Tensor       # [T] int32: row within that source (0 for skip, markers, padding)
    labels: torch.Tensor        # [T] int64: token of row t + 1 if it is an answer token of the same
                                #   sample, else IGNORE_INDEX (the last row of a sample: always)
    visual_rows: torch.Tensor   # [V * tokens_per_view] int32: packed row of each projected row
    view_starts: torch.Tensor   # [V] int32: first packed row of each kept view (global, kept tiles)

    @property
    def num_kept_views(self) -> int:
        return self.view_starts.shape[0]

    @property
    def num_skipped_tiles(self) -> int:
        return int((self.source_ids == SOURCE_SKIP).sum())


def plan_layout(inputs: LayoutInputs, tokens_per_view: int, *, pad_multiple: int = 1,
                length: int | None = None, backend: str | None = None) -> PackedLayout:
    """Plans the packed layout of one batch (see the module docstring for the row order).

    Args:
        inputs: :class:`LayoutInputs` on the CPU (``layout_inputs`` builds them from a list of
            :class:`SampleSpec`); count tensors int32 or int64, masks bool.
        tokens_per_view: visual tokens of one view (global or tile) after projection, >= 1.
        pad_multiple: round the packed length ``T`` up to a multiple of this (e.g. 8), >= 1.
        length: a fixed row budget: ``T`` is exactly ``length`` (a multiple of ``pad_multiple``);
            ValueError when the samples need more rows.

    Sizes: a batch packs into fewer than 2^31 rows (int32 ``cu_seqlens``), so every count, tile
    grid side, image's tile count and size argument must be below 2^31; larger ones raise
    ValueError naming the argument (checked without int64 wrap-around, before any backend).
        backend: force one of ``PLAN_LAYOUT_BACKENDS.names``.

    Returns:
        :class:`PackedLayout` of CPU tensors. Padding rows (past ``cu_seqlens[B]``) have source
        ``SOURCE_PADDING``, row 0, label ``IGNORE_INDEX``, position 0. Visual rows are numbered in
        sample, image, view order (global view first, then kept tiles in raster order), each view's
        ``tokens_per_view`` rows consecutive, so ``visual_rows`` is increasing and equals
        ``view_starts[:, None] + arange(tokens_per_view)`` flattened.

    All input values are validated (ValueError naming the argument) before any backend runs. Data
    only: no autograd, and not for ``torch.compile`` (the output sizes come from the input values;
    this runs in the data loader).
    """
    args, total = _check_plan_layout(inputs, tokens_per_view, pad_multiple, length)
    request = PLAN_LAYOUT_BACKENDS.request("cpu", torch.int64)
    chosen = PLAN_LAYOUT_BACKENDS.select(request, backend)
    return PackedLayout(*_plan_layout_op(*args, tokens_per_view, total, chosen.name))


def plan_layout_reference(text_ids, text_lens, answer_mask, images_per_sample, tile_grids,
                          skipped_tiles, text_before_images, tokens_per_view: int, total: int
                          ) -> tuple[torch.Tensor, ...]:
    """Pure-PyTorch ``plan_layout`` on validated int64 / bool inputs, vectorised over segments.

    The packed sequence is a run of segments (text head, begin marker, view, skip row, end marker,
    text tail), one after another in sample order; each gets its source, length and first row id,
    and ``repeat_interleave`` expands them to rows. ``total``: the rows to return (padding
    included).
    """
    num_samples, num_images = text_lens.shape[0], tile_grids.shape[0]
    tpv = tokens_per_view
    tiles = tile_grids[:, 0] * tile_grids[:, 1]
    # The segments of image i, in its own order: begin, global view, its tiles, end.
    image_segs = tiles + 3
    image_first = _exclusive_cumsum(image_segs)
    num_image_segs = int(image_segs.sum())
    tile_image = torch.repeat_interleave(torch.arange(num_images), tiles)
    tile_rank = torch.arange(tiles.sum()) - _exclusive_cumsum(tiles)[tile_image]
    kind = torch.empty(num_image_segs, dtype=torch.int64)
    kind[image_first] = SOURCE_IMAGE_BEGIN
    kind[image_first + 1] = SOURCE_VISUAL
    kind[image_first[tile_image] + 2 + tile_rank] = torch.where(skipped_tiles, SOURCE_SKIP,
                                                                SOURCE_VISUAL)
    kind[image_first + image_segs - 1] = SOURCE_IMAGE_END
    # Each sample's segments: its text head, its images' segments, its text tail. Image segment j of
    # sample s lands in slot j + 2 s + 1 (two text segments per earlier sample, one head before it).
    image_sample = torch.repeat_interleave(torch.arange(num_samples), images_per_sample)
    seg_sample = torch.repeat_interleave(image_sample, image_segs)
    image_segs_of_sample = torch.zeros(num_samples, dtype=torch.int64).index_add_(0, image_sample,
                                                                            image_segs)
    head_slot = _exclusive_cumsum(image_segs_of_sample) + 2 * torch.arange(num_samples)
    tail_slot = head_slot + image_segs_of_sample + 1
    seg_kind = torch.empty(num_image_segs + 2 * num_samples, dtype=torch.int64)
    image_slot = torch.arange(num_image_segs) + 2 * seg_sample + 1
    seg_kind[image_slot] = kind
    seg_kind[head_slot] = SOURCE_TEXT
    seg_kind[tail_slot] = SOURCE_TEXT
    seg_len = torch.ones_like(seg_kind)
    seg_len[seg_kind == SOURCE_VISUAL] = tpv
    seg_len[head_slot] = text_before_images
    seg_len[tail_slot] = text_lens - text_before_images
    # First row id of each segment: the view index * tpv for views, the text offset for text.
    is_view = seg_kind == SOURCE_VISUAL
    seg_base = torch.zeros_like(seg_kind)
    seg_base[is_view] = torch.arange(int(is_view.sum())) * tpv
    seg_base[head_slot] = _exclusive_cumsum(text_lens)
    seg_base[tail_slot] = _exclusive_cumsum(text_lens) + text_before_images
    seg_start = _exclusive_cumsum(seg_len)

    used = int(seg_len.sum())
    row_seg = torch.repeat_interleave(torch.arange(seg_kind.shape[0]), seg_len)
    within = torch.arange(used) - seg_start[row_seg]
    source = seg_kind[row_seg]
    steps = (source == SOURCE_VISUAL) | (source == SOURCE_TEXT)
    index = seg_base[row_seg] + torch.where(steps, within, 0)  # into text_ids for text rows
    is_text = source == SOURCE_TEXT
    # Other rows read a sentinel past the text (so that a batch without text needs no special case).
    text_index = torch.where(is_text, index, text_ids.shape[0])
    rows = torch.where(is_text, torch.cat([text_ids, text_ids.new_zeros(1)])[text_index], index)

    sample_len = torch.zeros(num_samples, dtype=torch.int64)
    sample_len.index_add_(0, torch.repeat_interleave(torch.arange(num_samples),
                                                     image_segs_of_sample + 2), seg_len)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(sample_len, 0), (1, 0))
    row_sample = torch.repeat_interleave(torch.arange(num_samples), sample_len)
    positions = torch.arange(used) - cu_seqlens[row_sample]
    # Row t predicts row t + 1 when that row is an answer text token of the same sample.
    answer = torch.cat([answer_mask, answer_mask.new_zeros(1)])[text_index]
    predicts = answer[1:] & (row_sample[1:] == row_sample[:-1])
    labels = torch.full((used,), IGNORE_INDEX, dtype=torch.int64)
    labels[:-1] = torch.where(predicts, rows[1:], IGNORE_INDEX)

    view_starts = seg_start[is_view]
    visual_rows = (view_starts[:, None] + torch.arange(tpv)).reshape(-1)
    pad = total - used
    def rows32(t):
        return t.to(torch.int32)
    return (rows32(cu_seqlens), rows32(_pad(positions, pad, 0)),
            rows32(_pad(source, pad, SOURCE_PADDING)), rows32(_pad(rows, pad, 0)),
            _pad(labels, pad, IGNORE_INDEX), rows32(visual_rows), rows32(view_starts))


def _exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(values, 0) - values


def _pad(values: torch.Tensor, count: int, fill: int) -> torch.Tensor:
    return torch.cat([values, values.new_full((count,), fill)]) if count else values


# Impl: forward(text_ids, text_lens, answer_mask, images_per_sample, tile_grids, skipped_tiles,
# text_before_images, tokens_per_view, total) on validated, contiguous int64 (masks: bool) inputs ->
# the PackedLayout fields in order.
PLAN_LAYOUT_BACKENDS = OpBackends("plan_layout", [
    Backend(CPP, Impl(native("plan_layout_native")), frozenset({torch.int64})),
    Backend(CPU_REFERENCE, Impl(plan_layout_reference), frozenset({torch.int64})),
])


@kernel_op("sphinx_kernels::plan_layout")
def _plan_layout_op(text_ids: torch.Tensor, text_lens: torch.Tensor, answer_mask: torch.Tensor,
                    images_per_sample: torch.Tensor, tile_grids: torch.Tensor,
                    skipped_tiles: torch.Tensor, text_before_images: torch.Tensor,
                    tokens_per_view: int, total: int, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor]:
    return tuple(PLAN_LAYOUT_BACKENDS[backend].impl.forward(
        text_ids=text_ids, text_lens=text_lens, answer_mask=answer_mask,
        images_per_sample=images_per_sample, tile_grids=tile_grids, skipped_tiles=skipped_tiles,
        text_before_images=text_before_images, tokens_per_view=tokens_per_view, total=total))


@_plan_layout_op.register_fake
def _(text_ids, text_lens, answer_mask, images_per_sample, tile_grids, skipped_tiles,
      text_before_images, tokens_per_view, total, backend):
    # The number of kept views depends on the values (the packed length is ``total``).
    views = torch.library.get_ctx().new_dynamic_size()
    def new(*shape, dtype=torch.int32):
        return text_lens.new_empty(shape, dtype=dtype)

    return (new(text_lens.shape[0] + 1), new(total), new(total), new(total),
            new(total, dtype=torch.int64), new(views * tokens_per_view), new(views))


def _require_counts(name: str, values: torch.Tensor, minimum: int, what: str = "") -> None:
    """Every entry of ``values`` in ``[minimum, 2^31)``: the sums of such counts fit int64 (fewer
    than 2^32 of them)."""
    if not values.numel():
        return
    if values.numel() >= 2**32:
        raise ValueError(f"{name} has {values.numel()} entries; a batch holds fewer than 2^32")
    # (min and max: two reductions, faster than one aminmax on the small tensors of a batch)
    low, high = int(values.min()), int(values.max())
    held = f" hold {what}" if what else " be"
    if low < minimum:
        raise ValueError(f"{name} must{held} >= {minimum}, got {low}")
    if high > INT32_MAX:
        raise ValueError(f"{name} must{held} < 2^31 (a batch packs fewer than 2^31 rows), got "
                         f"{high}")


def _check_plan_layout(inputs, tokens_per_view, pad_multiple, length):
    """Validates everything the kernels rely on; returns the backend arguments and the padded length
    ``T``."""
    if not isinstance(inputs, LayoutInputs):
        raise TypeError(f"inputs must be LayoutInputs (see layout_inputs), got "
                        f"{type(inputs).__name__}")
    require_int("tokens_per_view", tokens_per_view, minimum=1, maximum=INT32_MAX)
    require_int("pad_multiple", pad_multiple, minimum=1, maximum=INT32_MAX)
    if length is not None and (not isinstance(length, int) or isinstance(length, bool)):
        raise TypeError(f"length must be an int or None, got {type(length).__name__}")
    if length is not None and (length < 0 or length % pad_multiple):
        raise ValueError(f"length must be >= 0 and a multiple of pad_multiple = {pad_multiple}, "
                         f"got {length}")
    if length is not None and length > INT32_MAX:
        raise ValueError(f"length must be < 2^31 (int32 cu_seqlens), got {length}")
    names = ("text_ids", "text_lens", "answer_mask", "images_per_sample", "tile_grids",
             "skipped_tiles", "text_before_images")
    dims = (1, 1, 1, 1, 2, 1, 1)
    for name, value, dim in zip(names, inputs, dims):
        if value is None and name == "text_before_images":
            continue
        dtypes = (torch.bool,) if name in ("answer_mask", "skipped_tiles") else INDEX_DTYPES
        require_tensor(f"inputs.{name}", value, dims=dim, dtypes=dtypes)
        if value.device.type != "cpu":
            raise ValueError(f"inputs.{name} must be on the CPU (layout planning is data "
                             f"preparation), got {value.device}")
    if inputs.text_before_images is None:
        inputs = inputs._replace(text_before_images=torch.zeros_like(inputs.text_lens))
    text_ids, text_lens, images_per_sample, tile_grids, text_before_images = (
        inputs[i].to(torch.int64).contiguous() for i in (0, 1, 3, 4, 6))
    answer_mask, skipped_tiles = inputs.answer_mask.contiguous(), inputs.skipped_tiles.contiguous()
    for name, value in (("images_per_sample", images_per_sample),
                        ("text_before_images", text_before_images)):
        if value.shape != text_lens.shape:
            raise ValueError(f"inputs.{name} has shape {tuple(value.shape)} but inputs.text_lens "
                             f"has {tuple(text_lens.shape)}; both must be [B]")
    # Counts are bounded before they are summed: each below 2^31, so no int64 sum of them wraps.
    for name, value in (("text_lens", text_lens), ("images_per_sample", images_per_sample),
                        ("text_before_images", text_before_images)):
        _require_counts(f"inputs.{name}", value, minimum=0)
    if text_lens.numel() and bool((text_before_images > text_lens).any()):
        b = int(torch.nonzero(text_before_images > text_lens)[0, 0])
        raise ValueError(f"inputs.text_before_images[{b}] = {int(text_before_images[b])} exceeds "
                         f"inputs.text_lens[{b}] = {int(text_lens[b])}")
    if text_ids.numel():
        low, high = (int(v) for v in torch.aminmax(text_ids))
        if low < 0 or high >= 2**31:
            raise ValueError(f"inputs.text_ids must be in [0, 2^31) (row ids are int32), got "
                             f"{low if low < 0 else high}")
    num_text = int(text_lens.sum())
    if text_ids.shape[0] != num_text:
        raise ValueError(f"inputs.text_ids has {text_ids.shape[0]} tokens but inputs.text_lens "
                         f"sums to {num_text}; they must match")
    if answer_mask.shape != text_ids.shape:
        raise ValueError(f"inputs.answer_mask has {answer_mask.shape[0]} flags but inputs.text_ids "
                         f"has {text_ids.shape[0]} tokens; they must match")
    num_images = int(images_per_sample.sum())
    if tile_grids.shape != (num_images, 2):
        raise ValueError(f"inputs.tile_grids must be [I, 2] with I = sum(images_per_sample) = "
                         f"{num_images}, got shape {tuple(tile_grids.shape)}")
    _require_counts("inputs.tile_grids", tile_grids, minimum=1, what="rows, cols")
    tiles = tile_grids[:, 0] * tile_grids[:, 1]  # each below 2^62: no wrap
    if num_images and int(tiles.max()) > INT32_MAX:
        i = int(tiles.argmax())
        raise ValueError(f"inputs.tile_grids[{i}] = {tuple(tile_grids[i].tolist())} holds "
                         f"{int(tiles[i])} tiles; an image holds fewer than 2^31")
    num_tiles = int(tiles.sum())
    if skipped_tiles.shape[0] != num_tiles:
        raise ValueError(f"inputs.skipped_tiles has {skipped_tiles.shape[0]} flags but tile_grids "
                         f"hold {num_tiles} tiles (sum of rows * cols); they must match")
    num_skipped = int(skipped_tiles.sum())
    kept_views = num_images + num_tiles - num_skipped
    used = num_text + 2 * num_images + num_skipped + kept_views * tokens_per_view
    padded = -(-used // pad_multiple) * pad_multiple
    if length is not None and used > length:
        raise ValueError(f"the samples need {used} packed rows, more than length = {length}")
    total = length if length is not None else padded
    if total >= 2**31:
        raise ValueError(f"the batch packs into {total} rows; int32 cu_seqlens address fewer than "
                         "2^31: split it")
    args = (text_ids, text_lens, answer_mask, images_per_sample, tile_grids, skipped_tiles,
            text_before_images)
    return args, total
