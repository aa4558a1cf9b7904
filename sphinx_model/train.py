"""The one-stage SPHINX-X trainer (CLI ``sphinx-train``, or ``python -m sphinx_model.train``).

Everything but the frozen vision encoders trains at once on packed micro-batches
(:mod:`sphinx_model.data`). One optimizer step trains one global batch of samples, packed into
micro-batches of at most ``token_budget`` rows and dealt to the ranks; the loss of every micro-batch is
its summed cross-entropy divided by the labelled rows of the whole global batch (all micro-batches, all
ranks: one all-reduce of a count per step), and FSDP sums the gradients, so neither packing, nor
accumulation, nor the world size changes the gradient. The MoE routers' losses are weighted per
micro-batch by its share of the step's rows.

A step whose loss or gradient norm is not finite is skipped (no update) and counted; ``max_bad_steps``
of them in a row stop the run with an error, the last checkpoint untouched. Checkpoints
(:mod:`sphinx_model.train_checkpoint`) hold the model, optimizer, scheduler, data position and RNG
states; ``--resume`` continues from the newest complete one, at any world size. Outputs under
``output``: ``metrics.jsonl`` (one line per step), ``checkpoints/step-N/``, ``loss.png``, and
``final/`` (``SphinxX.save_pretrained`` plus the tokenizer: what ``sphinx-chat --checkpoint`` takes).

Multi-process: ``torchrun --nproc-per-node N -m sphinx_model.train ...`` (Gloo on the CPU, NCCL on
GPUs; :mod:`sphinx_model.parallel` applies activation checkpointing, compile and FSDP2).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sphinx_model.checkpoints import atomic_directory
from sphinx_model.config import SphinxConfig
from sphinx_model.data import DataConfig, DataPosition, SphinxData, StepBatch, StepStats
from sphinx_model.datasets import SKIP_CAUSES
from sphinx_model.parallel import (
    Distributed,
    all_reduce_sum,
    init_distributed,
    parallelize,
    shutdown,
)
from sphinx_model.sphinx import CONFIG_FILE, SphinxX
from sphinx_model.tokenizer import Tokenizer, load_tokenizer
from sphinx_model.train_checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sphinx_model.train_config import CLI_FLAGS, TrainConfig, load_train_config, model_config
from sphinx_model.train_metrics import MetricsLog, decoder_flops, peak_flops, plot_loss

__all__ = ["TrainResult", "TrainingDiverged", "main", "train"]

log = logging.getLogger("sphinx_model.train")


class TrainingDiverged(RuntimeError):
    """``max_bad_steps`` steps in a row had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    """What a finished run returns: the per-step metrics and where things were written."""

    metrics: list[dict] = field(default_factory=list)
    final_dir: Path | None = None
    skipped: dict[str, int] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------------
# Building the model, the optimizer and the data


def _compute_dtype(cfg: TrainConfig, env: Distributed) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if env.device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def _cpu_threads(cfg: TrainConfig, env: Distributed) -> int:
    """Intra-op threads for a CPU run: ``cfg.cpu_threads``, or this process's share of the cores
    less its data workers. More threads than cores left make the BLAS threads and the workers
    preempt each other: on 2 cores with 2 workers, 2 threads ran 30 demo steps in 140 s, 1 in 33 s."""
    if cfg.cpu_threads:
        return cfg.cpu_threads
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // local_processes - cfg.num_workers)


def _initial_model(cfg: TrainConfig, model_cfg: SphinxConfig) -> SphinxX:
    """The float32 model the run starts from, on the CPU: ``cfg.init``'s weights, or a random
    initialisation seeded by ``cfg.seed`` (the same on every rank and at every world size)."""
    torch.manual_seed(cfg.seed)
    init = Path(cfg.init) if cfg.init else None
    if init is not None and _is_sphinx_dir(init):
        return SphinxX.from_pretrained(init, dtype=torch.float32, device="cpu")
    model = SphinxX(model_cfg)
    if init is not None:  # a Hugging Face LLM directory: the decoder's weights
        from sphinx_model.checkpoints import load_hf_llm

        model.llm.load_state_dict(load_hf_llm(init, dtype=torch.float32).state_dict())
    return model


def _is_sphinx_dir(path: Path) -> bool:
    """Whether ``path`` holds a ``SphinxX.save_pretrained`` model (else: a Hugging Face LLM)."""
    if not (path / CONFIG_FILE).is_file():
        return False
    with open(path / CONFIG_FILE, encoding="utf-8") as f:
        return {"vision", "llm"} <= set(json.load(f))


def _resolve_model_config(cfg: TrainConfig) -> SphinxConfig:
    """The preset with ``cfg.model``'s overrides, or the config saved with ``cfg.init``."""
    if cfg.init:
        init = Path(cfg.init)
        if not init.is_dir():
            raise FileNotFoundError(f"init {cfg.init!r} is not a directory")
        if _is_sphinx_dir(init):
            return SphinxConfig.load(init / CONFIG_FILE)
        from sphinx_model.checkpoints import llm_config_from_hf

        base = model_config(cfg)
        with open(init / "config.json", encoding="utf-8") as f:
            return dataclasses.replace(base, llm=llm_config_from_hf(json.load(f)))
    return model_config(cfg)


def build_model(cfg: TrainConfig, model_cfg: SphinxConfig, env: Distributed) -> SphinxX:
    """The model, parallelized (activation checkpointing, compile, FSDP2) on ``env.device``, holding
    the run's initial weights on every rank."""
    dtype = _compute_dtype(cfg, env)
    options = dict(param_dtype=dtype, activation_checkpointing=cfg.activation_checkpointing,
                   compile=cfg.compile)
    if not env.initialized:
        model = _initial_model(cfg, model_cfg).to(env.device)
        if env.device.type == "cuda":
            model.vision.to(dtype)  # frozen: kept in the compute dtype, no float32 copy needed
        return parallelize(model, env, **options)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("meta"):
        model = SphinxX(model_cfg)
    parallelize(model, env, **options)
    model.to_empty(device=env.device)
    # Rank 0 builds the initial weights once; every rank receives its shards of them.
    state = _initial_model(cfg, model_cfg).state_dict() if env.is_main else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                broadcast_from_rank0=True))
    model.llm.init_rotary()
    return model


def build_optimizer(cfg: TrainConfig, model: nn.Module):
    """AdamW over the trainable parameters (no weight decay on vectors: norms, biases and the
    special skip / image-marker vectors) and the warm-up + cosine schedule."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _tokenizer(cfg: TrainConfig) -> Tokenizer | None:
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.init and any((Path(cfg.init) / name).is_file()
                        for name in ("tokenizer.model", "tokenizer.json")):
        return load_tokenizer(cfg.init)
    return None  # the demo data brings its own; other data raise in SphinxData.from_config


# -------------------------------------------------------------------------------------------------
# One optimizer step


def train_step(model: SphinxX, batch: StepBatch, optimizer, cfg: TrainConfig, env: Distributed
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of this rank's micro-batches of one step, gradients left in ``.grad``.
    Returns the global ``(loss, lm_loss)`` summed over micro-batches and ranks (float64 CPU)."""
    totals = all_reduce_sum(torch.tensor([batch.stats.trained_tokens, batch.stats.rows],
                                         dtype=torch.int64), env)
    trained, rows = max(int(totals[0]), 1), max(int(totals[1]), 1)
    normaliser = torch.tensor(trained, device=env.device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=env.device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if env.device.type == "cuda" and not env.initialized
                and _compute_dtype(cfg, env) == torch.bfloat16 else _no_autocast())
    for micro in batch.micro_batches:
        micro = micro.to(env.device, non_blocking=True)
        share = micro.layout.position_ids.shape[0] / rows
        with autocast:
            out = model(micro, num_trained_tokens=normaliser,
                        load_balancing_weight=cfg.moe_aux_loss_weight * share,
                        z_loss_weight=cfg.moe_z_loss_weight * share)
        out.loss.backward()
        loss_sum += torch.stack([out.loss.detach(), out.lm_loss.detach()]).double()
    return all_reduce_sum(loss_sum.cpu(), env), trained


class _no_autocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clips the global gradient norm to ``max_norm`` (0: measure only) and returns it (inf or NaN
    when a gradient is not finite)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"),
                                          foreach=True)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


# -------------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig, *, resume: bool = False, env: Distributed | None = None) -> TrainResult:
    """Trains ``cfg`` (resuming from the newest checkpoint under ``cfg.output`` when ``resume``)."""
    env = env or init_distributed()
    if env.device.type == "cpu":
        torch.set_num_threads(_cpu_threads(cfg, env))
    output = Path(cfg.output)
    model_cfg = _resolve_model_config(cfg)
    tokenizer = _tokenizer(cfg)
    model = build_model(cfg, model_cfg, env)
    optimizer, scheduler = build_optimizer(cfg, model)
    position, skipped, truncated, bad_streak, start = DataPosition(), dict.fromkeys(
        SKIP_CAUSES + ("nonfinite_step",), 0), 0, 0, 0
    checkpoint = latest_checkpoint(output / "checkpoints") if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no complete checkpoint under %s; starting from step 0", output)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, env)
        scheduler.load_state_dict(state["scheduler"])
        # The checkpoint holds the optimizer's tensors, not its hyper-parameters: the learning rate
        # of the step being resumed comes from the restored schedule.
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        position = DataPosition.from_dict(state["data"])
        skipped.update(state["skipped"])
        truncated, bad_streak, start = state["truncated"], state["bad_streak"], state["step"]
        if env.is_main:
            print(f"sphinx-train: resuming from {checkpoint} (step {start})", flush=True)
    data = SphinxData.from_config(
        DataConfig(path=cfg.data, budget=cfg.token_budget, global_batch=cfg.batch_size,
                   seed=cfg.seed, num_workers=cfg.num_workers),
        model_cfg, tokenizer, rank=env.rank, world_size=env.world_size, position=position)
    metrics = MetricsLog(output / "metrics.jsonl", resume_after=start if checkpoint else None) \
        if env.is_main else None
    peak = peak_flops(env.device)
    vision_flops = model.vision.flops_per_view()
    progress = _progress(cfg, start, env)
    records: list[dict] = []
    step_end = time.perf_counter()
    for batch in data.loader(cfg.steps, pin_memory=env.device.type == "cuda"):
        step = batch.step
        waited = time.perf_counter() - step_end
        model.train()
        (loss, lm_loss), trained = train_step(model, batch, optimizer, cfg, env)
        grad_norm = _grad_norm(model, cfg.grad_clip)
        finite = math.isfinite(float(loss)) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            bad_streak = 0
        else:
            bad_streak += 1
            skipped["nonfinite_step"] += 1
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        stats = StepStats.from_tensor(all_reduce_sum(batch.stats.to_tensor(), env))
        for cause, count in stats.skipped.items():
            skipped[cause] += count
        truncated += stats.truncated
        step_end, seconds = time.perf_counter(), time.perf_counter() - step_end + waited
        record = _record(step + 1, loss, lm_loss, trained, grad_norm, scheduler, stats, skipped,
                         truncated, seconds, waited, model_cfg, vision_flops, peak, batch, env)
        records.append(record)
        if metrics is not None:
            metrics.write(record)
        if progress is not None:
            progress.update(1)
            if (step + 1) % cfg.log_every == 0:
                progress.set_postfix_str(_postfix(record), refresh=False)
        if bad_streak >= cfg.max_bad_steps:
            raise TrainingDiverged(
                f"{bad_streak} steps in a row had a non-finite loss or gradient (last: step "
                f"{step + 1}, loss {float(loss)}, gradient norm {grad_norm}); stopping. The last "
                f"checkpoint under {output / 'checkpoints'} is intact: lower the learning rate or "
                "check the data, then --resume")
        last = step + 1 == cfg.steps
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last:
            save_checkpoint(output / "checkpoints", step + 1, model, optimizer,
                            {"data": batch.position.to_dict(), "scheduler": scheduler.state_dict(),
                             "skipped": skipped, "truncated": truncated,
                             "bad_streak": bad_streak, "config": dataclasses.asdict(cfg)},
                            env, cfg.keep_last)
    if progress is not None:
        progress.close()
    final_dir = export_final(model, model_cfg, data.tokenizer, output / "final", env)
    result = TrainResult(records, final_dir, skipped)
    if env.is_main:
        plot_loss(MetricsLog.read(output / "metrics.jsonl"), output / "loss.png")
        _summary(result, truncated, output)
    return result


def export_final(model: SphinxX, model_cfg: SphinxConfig, tokenizer: Tokenizer, path: Path,
                 env: Distributed) -> Path | None:
    """``SphinxX.save_pretrained`` of the trained model into ``path`` with the tokenizer's file
    beside it (rank 0 writes; a sharded model's full state is gathered first)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if not env.is_main:
        return None
    with torch.device("meta"):
        final = SphinxX(model_cfg)
    final.assign_state({k: v.detach().to("cpu", torch.float32) for k, v in state.items()}, "cpu")
    with atomic_directory(path) as tmp:
        final.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


# -------------------------------------------------------------------------------------------------
# Reporting


def _record(step: int, loss: torch.Tensor, lm_loss: torch.Tensor, trained: int, grad_norm: float,
            scheduler, stats: StepStats, skipped: dict[str, int], truncated: int, seconds: float,
            waited: float, model_cfg: SphinxConfig, vision_flops: float, peak: float | None,
            batch: StepBatch, env: Distributed) -> dict:
    """The ``metrics.jsonl`` line of one step (global numbers: summed over ranks)."""
    pairs = sum(_causal_pairs(mb) for mb in batch.micro_batches)
    flops = all_reduce_sum(torch.tensor([
        decoder_flops(model_cfg.llm, sum(mb.layout.position_ids.shape[0]
                                         for mb in batch.micro_batches), pairs, 0)
        + vision_flops * sum(mb.num_views for mb in batch.micro_batches)], dtype=torch.float64),
        env).item() + decoder_flops(model_cfg.llm, 0, 0, trained)
    return {
        "step": step, "loss": float(loss), "lm_loss": float(lm_loss), "lr": scheduler.get_last_lr()[0],
        "tokens": trained, "rows": stats.rows, "samples": stats.samples,
        "tokens_per_s": trained / seconds, "rows_per_s": stats.rows / seconds,
        "mfu": flops / seconds / (peak * env.world_size) if peak else None,
        "grad_norm": grad_norm, "step_s": seconds, "data_wait_share": waited / seconds,
        "skip_saved_share": stats.skip_saved_share, "padding_saved_share": stats.padding_saved_share,
        "skipped": dict(skipped), "truncated": truncated,
    }


def _causal_pairs(micro) -> int:
    lengths = (micro.layout.cu_seqlens[1:] - micro.layout.cu_seqlens[:-1]).long()
    return int((lengths * (lengths + 1) // 2).sum())


def _postfix(record: dict) -> str:
    parts = [f"loss {record['loss']:.3f}", f"{record['tokens_per_s']:.0f} tok/s"]
    if record["mfu"] is not None:
        parts.append(f"MFU {100 * record['mfu']:.0f}%")
    parts += [f"skip-saved {100 * record['skip_saved_share']:.0f}%",
              f"pad-saved {100 * record['padding_saved_share']:.0f}%",
              f"data-wait {100 * record['data_wait_share']:.0f}%"]
    return ", ".join(parts)


def _progress(cfg: TrainConfig, start: int, env: Distributed):
    if not (cfg.progress and env.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="sphinx-train", unit="step", dynamic_ncols=True)


def _summary(result: TrainResult, truncated: int, output: Path) -> None:
    records = result.metrics
    if records:
        first, last = records[0], records[-1]
        print(f"sphinx-train: steps {first['step']}-{last['step']}: loss {first['loss']:.3f} -> "
              f"{last['loss']:.3f}; {sum(r['tokens'] for r in records)} trained tokens", flush=True)
    bad = {cause: n for cause, n in result.skipped.items() if n}
    print("sphinx-train: skipped " + (", ".join(f"{n} {cause}" for cause, n in bad.items())
                                      if bad else "nothing")
          + f"; truncated {truncated} samples", flush=True)
    print(f"sphinx-train: wrote {output / 'metrics.jsonl'}, {output / 'loss.png'}, "
          f"{output / 'checkpoints'}, {result.final_dir}", flush=True)


# -------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """``sphinx-train`` arguments: the named flags, then any ``--<key> VALUE`` pairs."""
    defaults = TrainConfig()
    keys = "\n".join(f"  --{f.name.replace('_', '-'):26s} {f.metadata.get('help', '')} "
                     f"(default: {getattr(defaults, f.name)!r})"
                     for f in dataclasses.fields(TrainConfig))
    parser = argparse.ArgumentParser(
        prog="sphinx-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train SPHINX-X in one stage on packed, variable-length multimodal batches.",
        epilog="Every setting (YAML key) can also be given as --<key> VALUE; model settings as "
               "--model.<section>.<field> VALUE (e.g. --model.llm.num_layers 2):\n" + keys)
    parser.add_argument("--config", help="a YAML file of settings (keys as below)")
    parser.add_argument("--preset", help="model preset (tiny, tiny-dense, tinyllama-1.1b, ...)")
    parser.add_argument("--data", help="a YAML mixture, a JSON/JSONL dataset, or 'demo'")
    parser.add_argument("--steps", help="optimizer steps")
    parser.add_argument("--output", help="output directory")
    parser.add_argument("--save-every", help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint under the output")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args, rest = parser.parse_known_args(argv)
    overrides = [(name, getattr(args, name)) for name in CLI_FLAGS
                 if getattr(args, name) is not None]
    if len(rest) % 2 or any(not key.startswith("--") for key in rest[::2]):
        parser.error(f"expected --<key> VALUE pairs after the flags, got {' '.join(rest)}")
    overrides += [(key[2:], value) for key, value in zip(rest[::2], rest[1::2])]
    try:
        cfg = load_train_config(args.config, overrides)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.error(str(exc))
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg, args = parse_args(argv)
    env = init_distributed(args.device)
    try:
        train(cfg, resume=args.resume, env=env)
    except TrainingDiverged as exc:
        print(f"sphinx-train: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
