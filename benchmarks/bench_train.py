"""End-to-end training benchmark: our trainer's step (``sphinx_model.train.train_step`` on
``SphinxX`` with ``SphinxData`` micro-batches) on a SPHINX-X-shaped workload, against the padded
baseline a user of the reference runs, and with each of our optimisations switched off in turn.

    python -m benchmarks --family train [--quick]

Workload (fixed, seeded): the demo data (``sphinx_model.demo``: photographs and crops of several
aspect ratios, so that skip tokens occur, each with short dialogues, mixed with text-only
dialogues), drawn by ``SphinxData`` as the trainer draws it: ``global_batch`` samples per optimizer
step, packed into micro-batches of at most ``budget`` rows. Two steps are timed in rotation. One
timed step is the forward and backward of all micro-batches of one optimizer step, gradients
cleared after; the optimizer update is the same for every variant and left out.

Variants, all on the same samples with the same weights:

- ``sphinx``: the trainer as it runs: packed micro-batches, skip tokens, the sphinx_kernels ops.
- ``sphinx packing off``: fixed-size micro-batches of consecutive samples, as many as the packed
  ones, every sample padded to the longest of its micro-batch by padding rows at the end of its own
  sequence (masked from the loss; attention and the MLP compute them, as in a padded batch).
- ``sphinx skip tokens off``: every tile encoded (a skipped tile is a tile of padding colour, which
  is what it holds), packed under the same budget.
- ``sphinx kernels off``: every sphinx_kernels op on its ``reference`` backend
  (``SPHINX_KERNELS_BACKEND=reference``).
- ``sphinx full-logit loss``: the loss over every row's logits (as transformers computes it), not
  only over the labelled rows' in chunks (``sphinx_model.loss``).
- ``hf padded``: the padded baseline (:mod:`benchmarks.train_baseline`): transformers' own decoder
  with sdpa attention and the eager loop over experts, holding our weights, on the fixed-size
  micro-batches of ``packing off`` with every tile encoded, the projector as the eager chain, inputs
  assembled per sample with ``torch.cat``, and transformers' own loss over the full logits.

Reported per variant: ms per step (the median over rounds in which the variants run in turn, so
that a change in load touches them alike; on the CPU, the process's CPU time, see
:func:`time_in_turn`); tokens/s, where the tokens are the same for every variant: the
samples' rows as ``sphinx`` packs them (text tokens and visual rows, skip tokens included, no
padding); labelled tokens/s and samples/s likewise; useful TFLOP/s from FLOPs counted once for the
workload (``sphinx``'s rows, attention pairs, labelled rows and encoded views, as the trainer counts
them), so padding and re-encoded tiles count as waste, with MFU against the dense bf16 peak on a
GPU; peak memory of one step above the resident weights (a GPU: ``torch.cuda.max_memory_allocated``;
the CPU: the process's peak RSS growth, the high-water mark reset through ``/proc/self/clear_refs``
after returning freed memory with ``malloc_trim``, Linux only; coarse, about +-10%); what it
computes per step (decoder rows with padding, encoded views, micro-batches); the speed-up over
``hf padded``.

Sizes: the CPU runs the ``tiny`` and ``tiny-dense`` presets in float32 on one thread
(``torch.set_num_threads(1)``: the CPU numbers are single-core); a GPU ``tinyllama-1.1b`` in
bfloat16 (random weights, real encoder sizes) with 16k-row micro-batches.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import itertools
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from benchmarks.counts import attention_pairs
from benchmarks.harness import RESULTS_DIR, peak_memory_mb, run_family, time_ms
from benchmarks.rows import Row, compute_row
from benchmarks.train_baseline import PaddedBaseline, Sample
from sphinx_kernels import pack_by_token_budget
from sphinx_kernels.backends import ENV_BACKEND
from sphinx_model import (
    DataConfig,
    DataPosition,
    PackedBatch,
    SphinxConfig,
    SphinxData,
    SphinxX,
    StepBatch,
    StepStats,
    TiledImage,
    VisionConfig,
    pack_samples,
    preset,
    tile_image,
)
from sphinx_model.data import image_block_rows
from sphinx_model.loss import linear_cross_entropy_reference
from sphinx_model.parallel import Distributed
from sphinx_model.tiling import PAD_COLOR
from sphinx_model.train import train_step
from sphinx_model.train_config import TrainConfig
from sphinx_model.train_metrics import decoder_flops, peak_flops

OURS, PACKING_OFF, SKIP_OFF, KERNELS_OFF, FULL_LOGITS = (
    "sphinx", "sphinx packing off", "sphinx skip tokens off", "sphinx kernels off",
    "sphinx full-logit loss")
BASELINE = "hf padded"
SUBJECTS = (OURS, PACKING_OFF, SKIP_OFF, KERNELS_OFF, FULL_LOGITS)
VARIANTS = (*SUBJECTS, BASELINE)


@dataclass(frozen=True)
class TrainBenchConfig:
    preset: str
    dtype: torch.dtype
    budget: int          # rows per packed micro-batch, at most
    global_batch: int    # samples per optimizer step
    steps: int = 2       # distinct steps, timed in rotation
    warmup: int = 1
    repeats: int = 5
    num_layers: int | None = None  # fewer decoder layers than the preset (quick GPU runs)

    def model_config(self) -> SphinxConfig:
        cfg = preset(self.preset)
        if self.num_layers is not None:
            cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm,
                                                                   num_layers=self.num_layers))
        return cfg


CPU = (TrainBenchConfig("tiny", torch.float32, budget=1024, global_batch=32),
       TrainBenchConfig("tiny-dense", torch.float32, budget=1024, global_batch=32))
CPU_QUICK = (TrainBenchConfig("tiny", torch.float32, budget=512, global_batch=8, steps=1,
                              repeats=1),)
GPU = (TrainBenchConfig("tinyllama-1.1b", torch.bfloat16, budget=16384, global_batch=48,
                        warmup=2),)
GPU_QUICK = (TrainBenchConfig("tinyllama-1.1b", torch.bfloat16, budget=8192, global_batch=16,
                              steps=1, warmup=2, repeats=3, num_layers=4),)


# -------------------------------------------------------------------------------------------------
# The workload and each variant's micro-batches


def every_tile(tiled: TiledImage, vision: VisionConfig) -> TiledImage:
    """``tiled`` with no tile skipped: each skipped tile becomes a view of the padding colour (what
    the canvas holds there: tiling pastes no image pixel into a skipped tile)."""
    views = {}
    for name, side in (("dinov2_pixels", vision.dinov2_image_size),
                       ("convnext_pixels", vision.convnext_image_size)):
        kept = iter(getattr(tiled, name))
        padding = torch.tensor(PAD_COLOR, dtype=torch.uint8).view(3, 1, 1).expand(3, side, side)
        views[name] = torch.stack([next(kept)] + [padding if skip else next(kept)
                                                  for skip in tiled.skipped])
    return TiledImage(tiled.rows, tiled.cols, [False] * len(tiled.skipped), **views)


def sample_rows(sample: Sample, vision: VisionConfig) -> int:
    ids, _, images = sample
    return len(ids) + sum(image_block_rows(t.skipped, vision.tokens_per_view) for t in images)


def packed_batches(samples: Sequence[Sample], vision: VisionConfig, budget: int
                   ) -> list[PackedBatch]:
    """The samples packed into micro-batches of at most ``budget`` rows, as the pipeline packs."""
    packing = pack_by_token_budget([sample_rows(s, vision) for s in samples], budget)
    order, offsets = packing.order.tolist(), packing.bin_offsets.tolist()
    return [pack_samples([samples[i] for i in order[start:end]], vision)
            for start, end in itertools.pairwise(offsets)]


def fixed_size_chunks(samples: Sequence[Sample], count: int) -> list[list[Sample]]:
    """At most ``count`` micro-batches of ``ceil(len(samples) / count)`` consecutive samples (the
    last one possibly fewer): a fixed batch size giving as many micro-batches as packing does."""
    size = math.ceil(len(samples) / count)
    return [list(samples[i:i + size]) for i in range(0, len(samples), size)]


def padded_batches(samples: Sequence[Sample], vision: VisionConfig, count: int, pad_id: int
                   ) -> list[PackedBatch]:
    """Fixed-size micro-batches in which every sample is padded to the longest of its micro-batch
    by ``pad_id`` rows at the end of its own sequence, never an answer."""
    batches = []
    for chunk in fixed_size_chunks(samples, count):
        longest = max(sample_rows(s, vision) for s in chunk)
        padded = []
        for sample in chunk:
            ids, answer, images = sample
            pad = longest - sample_rows(sample, vision)
            padded.append((list(ids) + [pad_id] * pad, list(answer) + [False] * pad, images))
        batches.append(pack_samples(padded, vision))
    return batches


def as_step(micro_batches: list[PackedBatch], device: torch.device) -> StepBatch:
    """A ``StepBatch`` of ``micro_batches`` (moved to ``device``) for ``train_step``."""
    stats = StepStats(samples=sum(mb.num_samples for mb in micro_batches),
                      tokens=sum(mb.num_tokens for mb in micro_batches),
                      rows=sum(mb.layout.position_ids.shape[0] for mb in micro_batches),
                      trained_tokens=sum(mb.num_trained_tokens for mb in micro_batches))
    return StepBatch(0, [mb.to(device) for mb in micro_batches], [[] for _ in micro_batches],
                     stats, DataPosition())


@dataclass
class Workload:
    """One optimizer step's samples and every variant's batches of them.

    Attributes:
        ours: the pipeline's own batch (``SphinxData.step_batch``), on the device.
        packing_off, skip_off: the batches of those two variants, on the device.
        baseline_samples: the samples (every tile) of each of the padded baseline's micro-batches,
            which :meth:`PaddedBaseline.batch` turns into its inputs.
    """

    ours: StepBatch
    packing_off: StepBatch
    skip_off: StepBatch
    baseline_samples: list[list[Sample]]

    @property
    def samples(self) -> int:
        return self.ours.stats.samples

    @property
    def tokens(self) -> int:
        """The samples' rows as ``sphinx`` packs them: the numerator of every variant's tokens/s."""
        return self.ours.stats.tokens

    @property
    def trained_tokens(self) -> int:
        return self.ours.stats.trained_tokens


def build_workload(data: SphinxData, step: int, device: torch.device) -> Workload:
    """Step ``step`` of ``data``: the pipeline's batch, and the same samples for each variant."""
    from PIL import Image

    vision = data.vision
    ours = data.step_batch(step)
    plan = data.plan(step)
    samples, full = [], []
    for info in plan.samples:
        tiles = []
        for ref in info.images:
            with Image.open(ref.path) as image:
                tiles.append(tile_image(image, vision))
        samples.append((info.ids, info.answer, tiles))
        full.append((info.ids, info.answer, [every_tile(t, vision) for t in tiles]))
    count = len(plan.bins)
    pad_id = data.tokenizer.eos_id
    return Workload(ours=as_step(ours.micro_batches, device),
                    packing_off=as_step(padded_batches(samples, vision, count, pad_id), device),
                    skip_off=as_step(packed_batches(full, vision, data.config.budget), device),
                    baseline_samples=fixed_size_chunks(full, count))


def useful_flops(model: SphinxX, step: StepBatch) -> float:
    """Training FLOPs of the workload of ``step`` (``sphinx``'s own batch), counted as the trainer
    counts them: the decoder over the samples' rows and causal pairs, the LM head at labelled rows,
    the frozen encoders forward on each encoded view."""
    lengths = [int(n) for mb in step.micro_batches
               for n in (mb.layout.cu_seqlens[1:] - mb.layout.cu_seqlens[:-1]).tolist()]
    views = sum(mb.num_views for mb in step.micro_batches)
    return (decoder_flops(model.config.llm, sum(lengths), attention_pairs(lengths, causal=True),
                          step.stats.trained_tokens)
            + model.vision.flops_per_view() * views)


# -------------------------------------------------------------------------------------------------
# Measurement


@contextlib.contextmanager
def reference_kernels():
    """Every sphinx_kernels op on its pure-PyTorch reference backend inside the block."""
    before = os.environ.get(ENV_BACKEND)
    os.environ[ENV_BACKEND] = "reference"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV_BACKEND]
        else:
            os.environ[ENV_BACKEND] = before


def time_in_turn(steps: dict[str, tuple[Callable[[object], object], list]], device: torch.device,
                 *, warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of one call of each variant, the variants called in turn each round (so
    a change in the machine's load touches all of them alike), each on the next of its inputs.

    A GPU call is timed by CUDA events; a CPU call by the CPU time of the process, which on a
    one-thread run is the call's time on an idle core: a shared machine's wall clock also counts the
    time other processes hold the core."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for turn in range(warmup + repeats):
        for name, (fn, inputs) in steps.items():
            args = inputs[turn % len(inputs)]
            if device.type == "cuda":
                ms = time_ms(fn, [args], device, warmup=0, repeats=1)
            else:
                begin = time.process_time()
                fn(args)
                ms = (time.process_time() - begin) * 1e3
            if turn >= warmup:
                samples[name].append(ms)
    return {name: statistics.median(values) for name, values in samples.items()}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def peak_rss_growth_mib(fn: Callable[[object], object], args: object) -> float | None:
    """MiB the process's resident set grows to at most during ``fn(args)`` (Linux; else None):
    freed memory is returned to the system first (``malloc_trim``) and the high-water mark reset."""
    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
    except (OSError, AttributeError):
        return None
    fn(args)
    return (_status_kib("VmHWM") - before) / 1024


def peak_memory_mib(fn: Callable[[object], object], args: object, device: torch.device
                    ) -> float | None:
    """Peak memory of one ``fn(args)`` above what was allocated before it: the CUDA allocator's on
    a GPU, the peak RSS growth on the CPU."""
    if device.type != "cuda":
        return peak_rss_growth_mib(fn, args)
    return peak_memory_mb(fn, args, device)


def build_model(cfg: SphinxConfig, dtype: torch.dtype, device: torch.device) -> SphinxX:
    """A seeded random ``SphinxX`` initialised on ``device`` in ``dtype`` (the rotary tables stay
    float32, as the trainer keeps them)."""
    with torch.device("meta"):
        model = SphinxX(cfg)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    model.to(dtype)
    llm = model.llm
    llm.rotary_cos, llm.rotary_sin = llm.rotary_cos.float(), llm.rotary_sin.float()
    llm.init_rotary()
    return model.train()


def variant_steps(model: SphinxX, baseline: PaddedBaseline, workloads: Sequence[Workload],
                  device: torch.device) -> dict[str, tuple[Callable[[object], object], list]]:
    """Variant name -> (one training step's function, its inputs per workload)."""
    train_cfg = TrainConfig(dtype=str(model.llm.embed_tokens.weight.dtype).removeprefix("torch."))
    env = Distributed(device=device)

    def ours(step: StepBatch):
        losses, _ = train_step(model, step, None, train_cfg, env)
        model.zero_grad(set_to_none=True)
        return losses

    def kernels_off(step: StepBatch):
        with reference_kernels():
            return ours(step)

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                and train_cfg.dtype == "bfloat16" else contextlib.nullcontext())

    def full_logit_loss(step: StepBatch):
        """``train_step`` with the loss over every row's logits (the plain computation), not only
        over the labelled rows'."""
        trained, rows = step.stats.trained_tokens, step.stats.rows
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for micro in step.micro_batches:
            with autocast:
                hidden, moe = model.hidden_states(micro)
                lm_loss = linear_cross_entropy_reference(hidden, model.llm.lm_head.weight,
                                                         micro.layout.labels) / trained
                loss = lm_loss
                if moe is not None:
                    share = micro.layout.position_ids.shape[0] / rows
                    loss = loss + share * (train_cfg.moe_aux_loss_weight * moe.load_balancing_loss
                                           + train_cfg.moe_z_loss_weight * moe.z_loss)
            loss.backward()
            total += torch.stack([loss.detach(), lm_loss.detach()]).double()
        model.zero_grad(set_to_none=True)
        return total.cpu()

    def padded(work: tuple[list, int]):
        batches, trained = work
        total = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batches:
            with autocast:
                loss = baseline.loss(batch, trained)
            loss.backward()
            total += loss.detach().double()
        baseline.zero_grad()
        model.zero_grad(set_to_none=True)
        return total.cpu()

    baseline_inputs = [([baseline.batch(chunk, device) for chunk in w.baseline_samples],
                        w.trained_tokens) for w in workloads]
    return {OURS: (ours, [w.ours for w in workloads]),
            PACKING_OFF: (ours, [w.packing_off for w in workloads]),
            SKIP_OFF: (ours, [w.skip_off for w in workloads]),
            KERNELS_OFF: (kernels_off, [w.ours for w in workloads]),
            FULL_LOGITS: (full_logit_loss, [w.ours for w in workloads]),
            BASELINE: (padded, baseline_inputs)}


def _computed(name: str, work: Workload, baseline_inputs) -> dict[str, int]:
    """What variant ``name`` computes per step: decoder rows (padding included), encoded views,
    micro-batches."""
    if name == BASELINE:
        batches, _ = baseline_inputs
        return {"rows": sum(int(b.attention_mask.numel()) for b in batches),
                "views": sum(b.num_views for b in batches), "micro_batches": len(batches)}
    step = {PACKING_OFF: work.packing_off, SKIP_OFF: work.skip_off}.get(name, work.ours)
    return {"rows": step.stats.rows, "views": sum(mb.num_views for mb in step.micro_batches),
            "micro_batches": len(step.micro_batches)}


def bench_preset(bench: TrainBenchConfig, device: torch.device) -> list[Row]:
    cfg = bench.model_config()
    data = SphinxData.from_config(DataConfig(path="demo", budget=bench.budget,
                                             global_batch=bench.global_batch, num_workers=0), cfg)
    workloads = [build_workload(data, step, device) for step in range(bench.steps)]
    model = build_model(cfg, bench.dtype, device)
    baseline = PaddedBaseline(model, device)
    steps = variant_steps(model, baseline, workloads, device)
    n = len(workloads)
    flops = sum(useful_flops(model, w.ours) for w in workloads) / n
    tokens = sum(w.tokens for w in workloads) / n
    first = workloads[0]
    skipped = sum(mb.num_skipped_tiles for mb in first.ours.micro_batches)
    tiles = sum(mb.num_tiles for mb in first.ours.micro_batches)
    shape = (f"{bench.preset}{'' if bench.num_layers is None else f' L={bench.num_layers}'}: "
             f"{first.samples} samples, {first.tokens} tokens")
    dtype = str(bench.dtype).removeprefix("torch.")
    peak = peak_flops(device)
    times = time_in_turn(steps, device, warmup=bench.warmup, repeats=bench.repeats)
    rows = []
    for name in VARIANTS:
        fn, inputs = steps[name]
        ms = times[name]
        memory = peak_memory_mib(fn, inputs[0], device)
        seconds = ms / 1e3
        rows.append(compute_row(
            "train step fwd+bwd", shape, dtype, name, ms, int(flops),
            tokens_per_s=tokens / seconds,
            labelled_tokens_per_s=sum(w.trained_tokens for w in workloads) / n / seconds,
            samples_per_s=sum(w.samples for w in workloads) / n / seconds,
            mfu=flops / seconds / peak if peak else None, peak_memory_mib=memory,
            **_computed(name, first, inputs[0]), budget=bench.budget,
            skipped_tiles=f"{skipped}/{tiles}"))
        print(f"{bench.preset} {name}: {ms:.1f} ms, {tokens / seconds:.0f} tokens/s"
              + (f", peak memory {memory:.0f} MiB" if memory is not None else ""), flush=True)
    return rows


def bench_train(device: torch.device, quick: bool, ceiling_gbps: float | None) -> list[Row]:
    if device.type == "cuda":
        presets = GPU_QUICK if quick else GPU
    else:
        presets = CPU_QUICK if quick else CPU
    return [row for bench in presets for row in bench_preset(bench, device)]


def run(device: torch.device, quick: bool, results_dir: str = RESULTS_DIR) -> list[Row]:
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # shared 2-core machines: one thread gives stable numbers
    try:
        return run_family("train", device, quick, (bench_train,),
                          SUBJECTS, (BASELINE,),
                          results_dir=results_dir)
    finally:
        torch.set_num_threads(threads)
