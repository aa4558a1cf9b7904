"""Training checkpoints: model and optimizer through ``torch.distributed.checkpoint``, the rest as JSON.

A checkpoint is a directory ``<output>/checkpoints/step-N/`` holding

- ``shard-*.safetensors``: every rank's shards of the model and optimizer state, written by DCP's
  safetensors storage (each shard records its offsets in its header). Loading reads the slices each
  rank needs, so a checkpoint written by 2 ranks loads on 1 and the other way round. No pickle is
  written or read (DCP's default storage keeps its metadata as a pickle; this one keeps it in JSON);
- ``trainer_state.json``: the step, the data position, the scheduler's state, every rank's RNG states
  and the configuration, written last.

It is written to ``checkpoints/.tmp-step-N/`` and renamed to ``step-N`` once complete, so a run killed
in the middle of a write leaves the previous checkpoints as they were; ``latest_checkpoint`` only
considers renamed directories that hold ``trainer_state.json``. The newest ``keep_last`` are kept.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sphinx_model.parallel import Distributed, barrier

__all__ = [
    "TRAINER_STATE",
    "checkpoint_dirs",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """The complete checkpoints under ``root`` (``step-N`` directories holding the trainer state),
    oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def _flat_state(model: nn.Module, optimizer: torch.optim.Optimizer):
    """DCP state dicts of the model and optimizer (keyed by parameter names, so independent of the
    world size) and one flat ``{key: tensor}`` view of them for the safetensors storage."""
    model_state, optim_state = get_state_dict(model, optimizer)
    flat = {f"model/{k}": v for k, v in model_state.items()}
    for name, entries in optim_state["state"].items():
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name}.{key} is a {type(value).__name__}, not a "
                                "tensor; the checkpoint stores tensors only")
            flat[f"optim/{name}/{key}"] = value
    return model_state, optim_state, flat


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any], env: Distributed,
                    keep_last: int) -> Path:
    """Writes ``root/step-<step>`` atomically (every rank calls this); ``state``: the JSON-able
    trainer state (this adds the RNG states). Returns the checkpoint directory."""
    root = Path(root)
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a write that was cut off earlier
    barrier(env)
    _, _, flat = _flat_state(model, optimizer)
    with _single_process_quiet():
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    rng = _rng_states(env)
    if env.is_main:
        _write_json(tmp / TRAINER_STATE, {**state, "step": step, "world_size": env.world_size,
                                         "rng": rng})
        if final.exists():  # the same step written again (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    env: Distributed) -> dict[str, Any]:
    """Loads a checkpoint written at any world size into the (already parallelized) ``model`` and
    ``optimizer``; restores this rank's RNG states; returns the trainer state."""
    path = Path(path)
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
    with open(state_file, encoding="utf-8") as f:
        state = json.load(f)
    model_state, optim_state, flat = _flat_state(model, optimizer)
    with _single_process_quiet():
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path)))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    saved = state.get("rng", [])
    if saved:
        _set_rng_state(saved[env.rank % len(saved)])
    return state


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group that it assumes one process: so do we."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_states(env: Distributed) -> list[dict[str, Any]]:
    """Every rank's RNG states (torch CPU and CUDA, Python, NumPy), JSON-able, in rank order."""
    mine = {"torch": _b64(torch.get_rng_state()),
            "cuda": _b64(torch.cuda.get_rng_state()) if env.device.type == "cuda" else None,
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": _numpy_state()}
    if not env.initialized:
        return [mine]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def _set_rng_state(saved: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(saved["torch"]))
    if saved.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(saved["cuda"]))
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
