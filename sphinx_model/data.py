"""The training data pipeline: optimizer steps of packed micro-batches, exact under resume and any
number of ranks.

Each optimizer step ``k`` trains the next ``global_batch`` samples of the mixture's sample stream
(:mod:`sphinx_model.datasets`: a seeded permutation per epoch). Every rank plans the whole step the
same way (the *global plan*): the cheap work for each of the step's samples (parse, tokenise with
the chat template, read the image sizes from their headers to know which tiles are skipped,
truncate to the budget), then ``sphinx_kernels.pack_by_token_budget`` packs them into bins of at
most ``budget`` rows (the global batch is the packing window; the per-epoch permutation is the
shuffle), and the bins are dealt to the ranks, balanced by rows. Every rank gets the same number of
micro-batches (``max(1, ceil(bins / world_size))``), empty ones (no sample, padding rows only) where
it has fewer bins, so that every rank runs the same number of forward / backward passes (FSDP's
collectives need it). Only then does a rank do the heavy work, for its own bins: decode and tile
the images (DataLoader workers) and plan each micro-batch's layout with
``sphinx_kernels.plan_layout``.

The packing depends on the global batch alone, never on the world size: the union of the ranks'
micro-batches at step ``k`` is the same set of bins for any number of ranks. The data position is
``(step, first sample)`` (:class:`DataPosition`); resuming from it reproduces the batches of an
uninterrupted run exactly, at any world size, and a changed ``global_batch`` continues from the
same sample, none repeated or lost.

Loss normalisation: ``StepBatch.stats.trained_tokens`` is the rank's count of labelled rows; the
all-reduced sum over ranks is the global batch's, the normaliser of every micro-batch's loss.

Bad data never stops a run: a drawn item that cannot be trained on is skipped and counted by cause
(:data:`sphinx_model.datasets.SKIP_CAUSES`), and the first few of each cause are logged with their
file and line. A sample longer than the budget keeps its first ``budget`` rows (its text is cut at
the end) and is counted as truncated; one whose BOS and image block alone fill the budget cannot be
cut and is skipped (``image_over_budget``), as is one left without any answer token.
"""
from __future__ import annotations

import heapq
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from sphinx_kernels import (
    IGNORE_INDEX,
    ImageSpec,
    SampleSpec,
    layout_inputs,
    pack_by_token_budget,
    plan_layout,
)
from sphinx_model.batch import PackedBatch
from sphinx_model.config import SphinxConfig, VisionConfig
from sphinx_model.conversation import (
    SPHINX_TEMPLATE,
    ChatTemplate,
    InvalidConversation,
    encode_conversation,
    parse_conversation,
)
from sphinx_model.datasets import SKIP_CAUSES, Mixture, SkippedItem, image_size, load_mixture
from sphinx_model.tiling import TiledImage, tile_geometry, tile_image
from sphinx_model.tokenizer import Tokenizer

__all__ = ["DataConfig", "DataPosition", "SphinxData", "StepBatch", "StepPlan", "StepStats"]

log = logging.getLogger(__name__)
_LOGGED_PER_CAUSE = 5  # skipped items logged in detail per cause and process; the rest are counted


@dataclass
class DataConfig:
    """Settings of the data pipeline (a plain dataclass: the trainer's config embeds it)."""

    path: str = "demo"        # a YAML mixture, a JSON / JSONL dataset file, or "demo"
    root: str | None = None   # where a single file's image paths start (default: its folder)
    budget: int = 2048        # rows per micro-batch (text tokens and image rows), at most
    global_batch: int = 32    # samples drawn per optimizer step, all ranks together
    seed: int = 0             # the sample stream's permutations
    pad_multiple: int = 1     # each micro-batch's rows rounded up to a multiple of this
    pad_to_budget: bool = False  # every micro-batch exactly `budget` rows (static shapes)
    num_workers: int = 2      # DataLoader worker processes (0: in the main process)
    prefetch_factor: int = 2  # steps each worker prepares ahead

    def __post_init__(self) -> None:
        for name in ("budget", "global_batch", "pad_multiple", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.pad_to_budget and self.budget % self.pad_multiple:
            raise ValueError(f"data.budget ({self.budget}) must be a multiple of data.pad_multiple "
                             f"({self.pad_multiple}) when data.pad_to_budget is set")


@dataclass(frozen=True)
class DataPosition:
    """Where training stands in the sample stream: the next optimizer step and its first sample."""

    step: int = 0
    sample: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"step": self.step, "sample": self.sample}

    @classmethod
    def from_dict(cls, data: dict) -> DataPosition:
        return cls(int(data["step"]), int(data["sample"]))


@dataclass
class StepStats:
    """One rank's share of a step's statistics; every field adds up over ranks to the step's total
    (the global plan's own counts, skipped items found before packing and the baseline, are rank
    0's). ``to_tensor`` / ``from_tensor`` carry them through one all-reduce.

    Attributes:
        samples: samples trained. tokens: their rows (no padding). rows: rows computed, padding
            included. trained_tokens: rows with a label (the loss's token count).
        visual_rows: rows of encoded views. skip_rows: skip-token rows (one per skipped tile).
        skip_saved_rows: visual rows the skip tokens replaced:
            ``skip_rows * (tokens_per_view - 1)``.
        baseline_rows: rows the same samples would take in fixed-size batches (as many batches as
            bins, consecutive samples each) padded to their longest sample.
        truncated: samples cut to the budget. skipped: skipped items by cause.
    """

    samples: int = 0
    tokens: int = 0
    rows: int = 0
    trained_tokens: int = 0
    visual_rows: int = 0
    skip_rows: int = 0
    skip_saved_rows: int = 0
    baseline_rows: int = 0
    truncated: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_CAUSES, 0))

    @property
    def skip_saved_share(self) -> float:
        """Share of the visual rows (without skip tokens) that skip tokens saved."""
        total = self.visual_rows + self.skip_rows + self.skip_saved_rows
        return self.skip_saved_rows / total if total else 0.0

    @property
    def padding_saved_share(self) -> float:
        """Share of the fixed-size padded batches' padding that packing saved."""
        baseline = self.baseline_rows - self.tokens
        return (baseline - (self.rows - self.tokens)) / baseline if baseline > 0 else 0.0

    def to_tensor(self) -> torch.Tensor:
        """int64 ``[n]``: the counters in a fixed order (sum it over ranks)."""
        counts = [getattr(self, f.name) for f in fields(self) if f.name != "skipped"]
        return torch.tensor(counts + [self.skipped[c] for c in SKIP_CAUSES], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> StepStats:
        values = [int(v) for v in values.tolist()]
        names = [f.name for f in fields(cls) if f.name != "skipped"]
        return cls(**dict(zip(names, values)),
                   skipped=dict(zip(SKIP_CAUSES, values[len(names):])))

    def __add__(self, other: StepStats) -> StepStats:
        return StepStats.from_tensor(self.to_tensor() + other.to_tensor())


@dataclass
class StepBatch:
    """One rank's share of an optimizer step.

    Attributes:
        step: the optimizer step.
        micro_batches: the rank's micro-batches; the same number on every rank (some possibly empty:
            no sample, padding rows only, whose forward / backward still runs and adds no loss).
        sample_ids: the stream index of each micro-batch's samples, in packed order.
        stats: the rank's share of the step's statistics.
        position: where the next step starts; checkpoint it once this step is trained.
    """

    step: int
    micro_batches: list[PackedBatch]
    sample_ids: list[list[int]]
    stats: StepStats
    position: DataPosition

    def pin_memory(self) -> StepBatch:
        """Called by ``DataLoader(pin_memory=True)``."""
        self.micro_batches = [mb.pin_memory() for mb in self.micro_batches]
        return self


@dataclass
class ImageRef:
    """An image of a sample, as planned from its header: the file and its tile geometry."""

    path: Path
    rows: int
    cols: int
    skipped: list[bool]


@dataclass
class SampleInfo:
    """A sample after the cheap work: tokens (BOS first), answer mask, images, total rows."""

    sample: int
    ids: list[int]
    answer: list[bool]
    images: list[ImageRef]
    rows: int
    truncated: bool


@dataclass
class StepPlan:
    """The global plan of one step (identical on every rank).

    Attributes:
        samples: the trainable samples of the step, in stream order.
        bins: per bin, indices into ``samples`` (packing order).
        ranks: ``ranks[r]``: the bins of rank ``r`` (fewer than ``micro_batches`` where it has
            empty micro-batches).
        micro_batches: micro-batches per rank.
        skipped: items skipped by cause. baseline_rows: see :class:`StepStats`.
        end_sample: the first sample of the next step.
    """

    step: int
    samples: list[SampleInfo]
    bins: list[list[int]]
    ranks: list[list[int]]
    micro_batches: int
    skipped: Counter
    baseline_rows: int
    end_sample: int


class SphinxData(torch.utils.data.Dataset):
    """The pipeline over a mixture: ``self[step]`` is this rank's :class:`StepBatch` of ``step``.

    Build it with :meth:`from_config` (or directly), then iterate :meth:`loader`, which runs the
    heavy work in DataLoader workers::

        data = SphinxData.from_config(DataConfig(path="mix.yaml"), model_config, tokenizer,
                                      rank=rank, world_size=world, position=resumed_position)
        for batch in data.loader(steps=total_steps, pin_memory=True):
            ...   # batch.micro_batches, batch.stats, then checkpoint batch.position
    """

    def __init__(self, mixture: Mixture, tokenizer: Tokenizer, vision: VisionConfig,
                 config: DataConfig, *, template: ChatTemplate = SPHINX_TEMPLATE,
                 prefix_lm: bool = False, rank: int = 0, world_size: int = 1,
                 position: DataPosition = DataPosition()):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
        self.mixture, self.tokenizer, self.vision, self.config = mixture, tokenizer, vision, config
        self.template, self.prefix_lm = template, prefix_lm
        self.rank, self.world_size, self.position = rank, world_size, position
        self._logged: Counter = Counter()

    @classmethod
    def from_config(cls, config: DataConfig, model: SphinxConfig,
                    tokenizer: Tokenizer | None = None, **kwargs) -> SphinxData:
        """The pipeline of ``config.path`` for ``model``'s vision settings. ``config.path ==
        "demo"`` builds the demo data (:mod:`sphinx_model.demo`) and, when ``tokenizer`` is None,
        uses its tokenizer; other data need ``tokenizer``. ``kwargs``: as the constructor's."""
        if config.path == "demo":
            from sphinx_model.demo import build_demo

            demo = build_demo()
            mixture = load_mixture(demo.mixture)
            tokenizer = tokenizer or demo.load_tokenizer()
        else:
            if tokenizer is None:
                raise ValueError(f"data {config.path!r} needs a tokenizer (only the demo brings "
                                 "one)")
            mixture = load_mixture(config.path, config.root)
        return cls(mixture, tokenizer, model.vision, config, prefix_lm=model.llm.prefix_lm,
                   **kwargs)

    # --- the global plan ------------------------------------------------------------------------

    def first_sample(self, step: int) -> int:
        """The first stream sample of ``step`` (counted from :attr:`position`)."""
        if step < self.position.step:
            raise ValueError(f"step {step} is before the data position's step "
                             f"{self.position.step}")
        return self.position.sample + (step - self.position.step) * self.config.global_batch

    def plan(self, step: int) -> StepPlan:
        """The global plan of ``step``: the same on every rank (see the module docstring)."""
        first = self.first_sample(step)
        end = first + self.config.global_batch
        samples, skipped = [], Counter()
        for sample in range(first, end):
            try:
                samples.append(self._prepare(sample))
            except SkippedItem as exc:
                skipped[exc.cause] += 1
                if self.rank == 0:  # every rank finds it; rank 0 reports (and counts) it
                    self._log_skip(exc)
        lengths = [s.rows for s in samples]
        packing = pack_by_token_budget(lengths, self.config.budget)
        order, offsets = packing.order.tolist(), packing.bin_offsets.tolist()
        bins = [order[offsets[b]:offsets[b + 1]] for b in range(packing.num_bins)]
        ranks = _deal(packing.bin_tokens.tolist(), self.world_size)
        return StepPlan(step, samples, bins, ranks, max(1, *map(len, ranks)), skipped,
                        packing.baseline_padding_tokens + sum(lengths), end)

    def _prepare(self, sample: int) -> SampleInfo:
        """The cheap work for one stream sample; ``SkippedItem`` when it cannot be trained on."""
        dataset_index, index = self.mixture.lookup(sample, self.config.seed)
        dataset = self.mixture.datasets[dataset_index]
        try:
            conversation = parse_conversation(dataset.item(index))
        except InvalidConversation as exc:
            raise SkippedItem("invalid_conversation", f"{dataset.location(index)}: {exc}") from None
        images = []
        for name in conversation.images:
            path = dataset.image_path(name)
            rows, cols, skipped = tile_geometry(*image_size(path), self.vision.tiles)
            images.append(ImageRef(path, rows, cols, skipped))
        ids, answer = encode_conversation(self.tokenizer, conversation.turns, self.template,
                                          conversation.system)
        tpv = self.vision.tokens_per_view
        image_rows = sum(image_block_rows(image.skipped, tpv) for image in images)
        budget = self.config.budget
        keep = min(len(ids), budget - image_rows)
        if keep < 1:
            raise SkippedItem("image_over_budget", f"{dataset.location(index)}: BOS and the image "
                              f"block ({image_rows} rows) exceed the budget of {budget} rows")
        if not any(answer[:keep]):
            raise SkippedItem("no_answer_in_budget", f"{dataset.location(index)}: cut to the "
                              f"budget of {budget} rows, no answer token is left")
        return SampleInfo(sample, ids[:keep], answer[:keep], images, keep + image_rows,
                          keep < len(ids))

    def _log_skip(self, exc: SkippedItem) -> None:
        self._logged[exc.cause] += 1
        count = self._logged[exc.cause]
        if count <= _LOGGED_PER_CAUSE:
            more = " (further ones are counted, not logged)" if count == _LOGGED_PER_CAUSE else ""
            log.warning("skipped (%s): %s%s", exc.cause, exc, more)

    # --- this rank's micro-batches --------------------------------------------------------------

    def __getitem__(self, step: int) -> StepBatch:
        return self.step_batch(step)

    def step_batch(self, step: int) -> StepBatch:
        """This rank's share of ``step``: the global plan, then its bins' images decoded and tiled
        and their layouts planned."""
        plan = self.plan(step)
        stats = StepStats()
        if self.rank == 0:
            stats.baseline_rows = plan.baseline_rows
            stats.skipped.update(plan.skipped)
        micro_batches, sample_ids = [], []
        for b in range(plan.micro_batches):
            bin_samples = ([plan.samples[i] for i in plan.bins[plan.ranks[self.rank][b]]]
                           if b < len(plan.ranks[self.rank]) else [])
            batch, ids = self._micro_batch(bin_samples, stats)
            micro_batches.append(batch)
            sample_ids.append(ids)
        return StepBatch(step, micro_batches, sample_ids, stats,
                         DataPosition(step + 1, plan.end_sample))

    def _micro_batch(self, samples: Sequence[SampleInfo], stats: StepStats
                     ) -> tuple[PackedBatch, list[int]]:
        """Decodes and tiles the samples' images (a sample whose image fails is skipped), packs
        them, and adds the micro-batch to ``stats``."""
        kept, contents = [], []
        for sample in samples:
            try:
                contents.append((sample.ids, sample.answer,
                                 [self._tile(image) for image in sample.images]))
            except SkippedItem as exc:
                stats.skipped[exc.cause] += 1
                self._log_skip(exc)
                continue
            kept.append(sample)
        config = self.config
        batch = pack_samples(contents, self.vision, pad_multiple=config.pad_multiple,
                             length=config.budget if config.pad_to_budget else None,
                             prefix_lm=self.prefix_lm)
        layout = batch.layout
        stats.samples += batch.num_samples
        stats.tokens += batch.num_tokens
        stats.rows += layout.position_ids.shape[0]
        stats.trained_tokens += int((layout.labels != IGNORE_INDEX).sum())
        stats.visual_rows += layout.visual_rows.shape[0]
        stats.skip_rows += batch.num_skipped_tiles
        stats.skip_saved_rows += batch.num_skipped_tiles * (self.vision.tokens_per_view - 1)
        stats.truncated += sum(s.truncated for s in kept)
        return batch, [s.sample for s in kept]

    def _tile(self, image: ImageRef) -> TiledImage:
        """Decodes and tiles one image; ``SkippedItem`` when it fails or its geometry is not the one
        its header gave."""
        from PIL import Image

        try:
            with Image.open(image.path) as opened:
                tiled = tile_image(opened, self.vision)
        except FileNotFoundError:
            raise SkippedItem("missing_image", f"image {str(image.path)!r} disappeared") from None
        # Decoders raise many types (OSError, SyntaxError, zlib.error, DecompressionBombError...):
        # none may stop training, each means the image is unusable.
        except Exception as exc:  # noqa: BLE001
            raise SkippedItem("corrupt_image", f"image {str(image.path)!r} does not decode: "
                              f"{type(exc).__name__}: {exc}") from None
        if (tiled.rows, tiled.cols, tiled.skipped) != (image.rows, image.cols, image.skipped):
            raise SkippedItem("corrupt_image", f"image {str(image.path)!r} decodes to another size "
                              "than its header says")
        return tiled

    # --- the loader -----------------------------------------------------------------------------

    def loader(self, steps: int | None = None, *, pin_memory: bool = False
               ) -> torch.utils.data.DataLoader:
        """A DataLoader of this rank's :class:`StepBatch` for steps ``position.step, ...,
        steps - 1`` (``None``: without end), prepared by ``config.num_workers`` workers in order."""
        start = self.position.step
        indices = range(start, steps) if steps is not None else _count(start)
        workers = self.config.num_workers
        if workers:
            # The first call of a torch custom op imports torch._dynamo (seconds): made here once
            # so that forked workers inherit it rather than each paying for it.
            pack_by_token_budget([1], 1)
        return torch.utils.data.DataLoader(
            self, batch_size=None, sampler=indices, num_workers=workers, pin_memory=pin_memory,
            collate_fn=_identity, prefetch_factor=self.config.prefetch_factor if workers else None)


def pack_samples(samples: Sequence[tuple[Sequence[int], Sequence[bool], Sequence[TiledImage]]],
                 vision: VisionConfig, *, pad_multiple: int = 1, length: int | None = None,
                 prefix_lm: bool = False) -> PackedBatch:
    """One packed micro-batch of samples given as ``(token ids, BOS first; answer mask; tiled
    images)``, each sample's image blocks right after its BOS. ``pad_multiple`` / ``length``: as
    ``plan_layout``'s (no sample and no ``length``: ``pad_multiple`` padding rows); ``prefix_lm``:
    fill ``prefix_lens``. The chat CLI packs its prompt with it::

        ids = encode_prompt(tokenizer, turns)
        batch = pack_samples([(ids, [False] * len(ids), [tile_image(image, vision)])], vision)
    """
    tpv = vision.tokens_per_view
    specs, tiled, prefix, rows = [], [], [], []
    for ids, answer, images in samples:
        specs.append(SampleSpec(ids, answer, [ImageSpec(t.rows, t.cols, t.skipped) for t in images],
                                text_before_images=1))
        tiled.extend(images)
        block = sum(image_block_rows(t.skipped, tpv) for t in images)
        prefix.append(1 + block)
        rows.append(len(ids) + block)
    if not samples and length is None:
        length = pad_multiple
    layout = plan_layout(layout_inputs(specs), tpv, pad_multiple=pad_multiple, length=length)
    sizes = (vision.dinov2_image_size, vision.convnext_image_size)
    pixels = [torch.cat([getattr(t, name) for t in tiled]) if tiled else
              torch.zeros(0, 3, size, size, dtype=torch.uint8)
              for name, size in zip(("dinov2_pixels", "convnext_pixels"), sizes)]
    return PackedBatch(layout, pixels[0], pixels[1], max_seqlen=max(rows, default=0),
                       prefix_lens=torch.tensor(prefix, dtype=torch.int32) if prefix_lm else None,
                       num_samples=len(specs), num_tiles=sum(len(t.skipped) for t in tiled),
                       num_skipped_tiles=sum(sum(t.skipped) for t in tiled))


def image_block_rows(skipped: Sequence[bool], tokens_per_view: int) -> int:
    """Packed rows of one image's block: two markers, the global view, each tile (a skipped tile:
    one skip row)."""
    skips = sum(skipped)
    return 2 + (1 + len(skipped) - skips) * tokens_per_view + skips


def _deal(bin_rows: list[int], world_size: int) -> list[list[int]]:
    """Bins dealt to ranks: largest first, each to the rank with the fewest rows so far among those
    holding fewer than ``ceil(bins / world_size)`` (ties: the lower rank). Returns each rank's
    bins."""
    per_rank = max(1, math.ceil(len(bin_rows) / world_size))
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    heap = [(0, r) for r in range(world_size)]
    for b in sorted(range(len(bin_rows)), key=lambda b: (-bin_rows[b], b)):
        load, rank = heapq.heappop(heap)
        ranks[rank].append(b)
        if len(ranks[rank]) < per_rank:
            heapq.heappush(heap, (load + bin_rows[b], rank))
    return ranks


def _identity(batch):
    return batch


class _count:
    """``start, start + 1, ...`` as a sampler (an iterable without length)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        step = self.start
        while True:
            yield step
            step += 1
