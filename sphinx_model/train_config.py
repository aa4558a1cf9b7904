"""The trainer's settings: one dataclass, read from YAML and overridden from the command line.

Precedence: defaults < ``--config FILE.yaml`` < ``--preset`` / ``--data`` / ... flags and generic
``--<key> VALUE`` pairs. Keys are the field names below (``--save-every`` and ``--save_every`` are the
same key); ``model`` takes dotted sub-keys that override the preset's ``SphinxConfig``
(``--model.llm.num_layers 2``). An unknown key, in the YAML file or on the command line, is an error
that names it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from sphinx_model.config import SphinxConfig, check_value, config_from_dict, preset

__all__ = ["CLI_FLAGS", "TrainConfig", "load_train_config", "model_config"]


def _setting(default: Any, help: str, **kwargs) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help},
                     **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    # What to train
    preset: str = _setting("tiny", "model preset (sphinx_model.PRESETS)")
    model: dict = _setting({}, "overrides of the preset's SphinxConfig, e.g. {llm: {num_layers: 2}}")
    init: str | None = _setting(None, "start from a save_pretrained directory (SphinxX) or a Hugging "
                                      "Face LLM directory (the decoder only); default: random init")
    tokenizer: str | None = _setting(None, "tokenizer file or directory; default: the demo data's, "
                                           "or the init directory's")
    # Data
    data: str = _setting("demo", "a YAML mixture, one JSON/JSONL dataset, or 'demo'")
    seed: int = _setting(0, "seed of the data order and of the initialisation")
    batch_size: int = _setting(16, "samples per optimizer step, over all ranks")
    token_budget: int = _setting(2048, "rows of one packed micro-batch (at most)")
    num_workers: int = _setting(2, "DataLoader worker processes per rank (0: in the main process)")
    # Optimisation
    steps: int = _setting(300, "optimizer steps")
    lr: float = _setting(2e-3, "peak learning rate")
    min_lr_ratio: float = _setting(0.1, "the cosine schedule's floor, as a fraction of lr")
    warmup_steps: int = _setting(20, "linear warm-up steps")
    weight_decay: float = _setting(0.1, "AdamW weight decay (never on norms, biases, embeddings "
                                        "of the special vectors)")
    adam_betas: list = _setting([0.9, 0.95], "AdamW betas")
    adam_eps: float = _setting(1e-8, "AdamW epsilon")
    grad_clip: float = _setting(1.0, "clip the global gradient norm to this (0: off)")
    moe_aux_loss_weight: float = _setting(0.01, "weight of the MoE load-balancing loss")
    moe_z_loss_weight: float = _setting(0.001, "weight of the MoE router z-loss")
    max_bad_steps: int = _setting(3, "consecutive steps with a non-finite loss or gradient before "
                                     "the run stops")
    # Systems
    dtype: str = _setting("auto", "parameter/compute dtype: auto (bfloat16 on a GPU, float32 on "
                                  "the CPU), bfloat16, float32")
    activation_checkpointing: bool = _setting(False, "recompute each decoder block in the backward")
    compile: bool = _setting(False, "torch.compile each decoder block")
    cpu_threads: int = _setting(0, "intra-op threads per process when training on the CPU (0: the "
                                   "cores each process has, less its data workers, at least 1)")
    # Output
    output: str = _setting("runs/sphinx", "output directory (metrics, checkpoints, plot, final model)")
    save_every: int = _setting(0, "checkpoint every N steps (0: only at the end)")
    keep_last: int = _setting(2, "checkpoints kept (older ones are deleted)")
    log_every: int = _setting(1, "steps between progress-bar updates")
    progress: bool = _setting(True, "show a progress bar")

    def __post_init__(self) -> None:
        for name in ("batch_size", "token_budget", "steps", "keep_last", "log_every",
                     "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "warmup_steps", "save_every", "grad_clip", "weight_decay",
                     "moe_aux_loss_weight", "moe_z_loss_weight", "cpu_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, "
                             f"{self.min_lr_ratio}")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16 or float32, got {self.dtype!r}")
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must be two numbers, got {self.adam_betas}")
        model_config(self)  # the preset exists and the overrides name real fields


# Flags with a dedicated spelling in `sphinx-train --help` (every key also works as --<key> VALUE).
CLI_FLAGS = ("preset", "data", "steps", "output", "save_every")


def model_config(cfg: TrainConfig) -> SphinxConfig:
    """The preset's ``SphinxConfig`` with ``cfg.model``'s overrides applied (checked by name)."""
    base = preset(cfg.preset).to_dict()
    return config_from_dict(SphinxConfig, _merge(base, cfg.model, "model."))


def _merge(base: dict, overrides: Mapping[str, Any], path: str) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if key not in base:
            raise ValueError(f"unknown config key {path}{key}; known: {', '.join(base)}")
        if isinstance(base[key], dict) and isinstance(value, Mapping) and key not in (
                "dinov2_kwargs", "convnext_kwargs"):
            merged[key] = _merge(base[key], value, f"{path}{key}.")
        else:
            merged[key] = value
    return merged


def load_train_config(yaml_file: str | None = None,
                      overrides: Sequence[tuple[str, str]] = ()) -> TrainConfig:
    """Defaults, then the YAML file's keys, then ``(key, text)`` overrides from the command line
    (values parsed as YAML scalars, then converted to the field's type)."""
    values: dict[str, Any] = {}
    if yaml_file is not None:
        with open(yaml_file, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_file} must hold a mapping of settings, got "
                             f"{type(loaded).__name__}")
        for key, value in loaded.items():
            values[_field_name(str(key), yaml_file)] = value
    hints = typing.get_type_hints(TrainConfig)
    for raw_key, text in overrides:
        key = raw_key.replace("-", "_")
        if key.startswith("model."):
            _set_nested(values.setdefault("model", {}), key.split(".")[1:], yaml.safe_load(text))
            continue
        name = _field_name(key, "the command line")
        values[name] = _parse(text, hints[name], name)
    return TrainConfig(**{name: check_value(value, hints[name], name)
                          for name, value in values.items()})


def _field_name(key: str, where: str) -> str:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    name = key.replace("-", "_")
    if name not in names:
        raise ValueError(f"unknown config key {key!r} in {where}; known keys: {', '.join(names)}")
    return name


def _set_nested(target: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def _parse(text: str, hint: Any, name: str) -> Any:
    """A command-line value as the field's type: YAML syntax (lists, booleans, null), except that a
    float field takes ``1e-3`` (a string to PyYAML) and a string field takes ``123`` as written."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    value = yaml.safe_load(text)
    if float in options and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if str in options and value is not None and not isinstance(value, str):
        value = text
    return check_value(value, hint, name)
