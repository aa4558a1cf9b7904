"""SPHINX-X configurations: a plain dataclass tree (vision, projector, llm) and the named presets.

``SphinxConfig`` round-trips through JSON (``to_dict`` / ``from_dict``); an unknown key is an error that
names it with its path (``llm.hiden_size``). Override fields with ``dataclasses.replace``::

    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=2))

Presets (``PRESETS``): ``tiny`` (a Mixtral-style MoE decoder and small timm encoders, for CPU training
in minutes), ``tiny-dense`` (its Llama-style twin), and the real sizes ``tinyllama-1.1b``,
``internlm2-7b``, ``llama2-13b``, ``mixtral-8x7b`` with DINOv2 ViT-g/14 and CLIP ConvNeXt-XXLarge.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["VisionConfig", "ProjectorConfig", "LLMConfig", "SphinxConfig", "PRESETS", "preset",
           "config_from_dict", "check_value", "validate_llm", "LLM_ARCHS"]

LLM_ARCHS = ("llama", "mixtral", "internlm2")  # the decoder families (and checkpoint layouts) we load


@dataclass
class VisionConfig:
    """The two frozen timm encoders and the any-resolution tiling.

    Each image is resized (aspect kept) onto a ``tiles x tiles`` canvas of square tiles, placed at the
    top-left and padded with the mean colour. Views: the whole canvas (global view) and every tile that
    holds an image pixel, in raster order; a tile without one is skipped (never encoded, one skip token).
    Every view is encoded by both encoders, each at its own resolution, and both are resampled to a
    ``grid x grid`` token grid (``1 + grid**2`` rows per view: a global row, then the grid).
    """

    dinov2_model: str = "vit_giant_patch14_dinov2"  # timm name: tokens [V, 1 + n*n, dinov2_channels]
    dinov2_kwargs: dict[str, Any] = field(default_factory=dict)  # timm create_model overrides
    dinov2_image_size: int = 224                      # pixels per view side for DINOv2
    dinov2_channels: int = 1536
    convnext_model: str = "convnext_xxlarge"         # timm name: maps [V, convnext_channels, m, m]
    convnext_kwargs: dict[str, Any] = field(default_factory=dict)
    convnext_image_size: int = 512                    # pixels per view side for ConvNeXt (stride 32)
    convnext_channels: int = 3072
    grid: int = 16                                    # token grid per view side
    tiles: int = 2                                    # canvas of tiles x tiles sub-images
    dinov2_weights: str | None = None                 # local checkpoint files (never downloaded)
    convnext_weights: str | None = None

    @property
    def tokens_per_view(self) -> int:
        return 1 + self.grid * self.grid


@dataclass
class ProjectorConfig:
    """The fused projection of the channel-concatenated encoder rows into the LLM width."""

    norm: bool = True      # a LayerNorm after the Linear, as the SPHINX reference's visual_proj
    bias: bool = True
    eps: float = 1e-5


@dataclass
class LLMConfig:
    """A Llama-family decoder: Llama / Mistral (dense), Mixtral (``num_experts > 0``), InternLM2."""

    arch: str = "llama"                  # one of LLM_ARCHS: the checkpoint layout it loads and saves
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None          # None: hidden_size // num_heads
    intermediate_size: int = 11008       # the SwiGLU width (per expert when num_experts > 0)
    num_experts: int = 0                 # 0: dense SwiGLU MLP; else a dropless MoE (sphinx_kernels)
    top_k: int = 2
    moe_block_size: int = 128            # rows per expert GEMM block of the routing plan
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    prefix_lm: bool = False              # the image block attends bidirectionally (prefix-LM)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


@dataclass
class SphinxConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SphinxConfig":
        return config_from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "SphinxConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SphinxConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())


def config_from_dict(cls: type, data: Mapping[str, Any], path: str = ""):
    """Builds dataclass ``cls`` from ``data``, recursing into nested dataclass fields. Unknown keys and
    values of the wrong type raise ``ValueError`` / ``TypeError`` naming the key's dotted path; missing
    keys take their defaults."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{path or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{path}{k}" for k in unknown)
        raise ValueError(f"unknown config key {names}; {cls.__name__} has: {', '.join(fields)}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = config_from_dict(hint, value, f"{path}{name}.")
        else:
            values[name] = check_value(value, hint, f"{path}{name}")
    return cls(**values)


def check_value(value: Any, hint: Any, path: str) -> Any:
    """``value`` if it matches the simple type ``hint`` (int accepted for float), else a TypeError
    naming the key ``path``."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, dict, list) and isinstance(value, base):
            return base(value) if base in (dict, list) else value
    raise TypeError(f"config key {path} must be {hint}, got {value!r}")


def validate(cfg: SphinxConfig) -> None:
    """Consistency checks of a whole config; ``ValueError`` naming the field."""
    validate_llm(cfg.llm)
    vision = cfg.vision
    positive = {"vision.grid": vision.grid, "vision.tiles": vision.tiles,
                "vision.dinov2_image_size": vision.dinov2_image_size,
                "vision.convnext_image_size": vision.convnext_image_size,
                "vision.dinov2_channels": vision.dinov2_channels,
                "vision.convnext_channels": vision.convnext_channels}
    _require_positive(positive)


def validate_llm(llm: LLMConfig, name: str = "llm") -> None:
    """Consistency checks of a decoder config alone (``sphinx_model.LLM`` runs them too);
    ``ValueError`` naming the field as ``{name}.field``."""
    if llm.arch not in LLM_ARCHS:
        raise ValueError(f"{name}.arch must be one of {LLM_ARCHS}, got {llm.arch!r}")
    _require_positive({f"{name}.{field}": getattr(llm, field) for field in (
        "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
        "moe_block_size", "max_position_embeddings")})
    if llm.num_heads % llm.num_kv_heads:
        raise ValueError(f"{name}.num_heads ({llm.num_heads}) must be a multiple of "
                         f"{name}.num_kv_heads ({llm.num_kv_heads})")
    if llm.head_dim is None and llm.hidden_size % llm.num_heads:
        raise ValueError(f"{name}.hidden_size ({llm.hidden_size}) is not a multiple of "
                         f"{name}.num_heads ({llm.num_heads}); set {name}.head_dim")
    if llm.dim_per_head < 1 or llm.dim_per_head % 2:
        raise ValueError(f"the head dim must be even for rotary, got {llm.dim_per_head}")
    if llm.num_experts < 0 or (llm.num_experts and not 1 <= llm.top_k <= llm.num_experts):
        raise ValueError(f"{name}.top_k must be in [1, {name}.num_experts = {llm.num_experts}], "
                         f"got {llm.top_k}")
    if (llm.arch == "mixtral") != (llm.num_experts > 0):
        raise ValueError(f"{name}.arch {llm.arch!r} with {name}.num_experts = {llm.num_experts}: "
                         "mixtral is the sparse-MoE family and needs num_experts > 0, the others "
                         "need 0")


def _require_positive(values: Mapping[str, int]) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


# ---------------------------------------------------------------------------------------------------
# Presets

_REAL_VISION: dict = {}  # the VisionConfig defaults are the real encoders

# Small timm configurations of the same two architectures: DINOv2 at 56 px (4x4 patches of 14 px) and
# ConvNeXt at 128 px (a 4x4 map at stride 32), both already on the 4x4 token grid.
_TINY_VISION = dict(
    dinov2_kwargs={"embed_dim": 48, "depth": 2, "num_heads": 2},
    dinov2_image_size=56, dinov2_channels=48,
    convnext_kwargs={"depths": [1, 1, 1, 1], "dims": [24, 48, 96, 192]},
    convnext_image_size=128, convnext_channels=192,
    grid=4, tiles=2)

_TINY_LLM = dict(arch="mixtral", vocab_size=32000, hidden_size=128, num_layers=4, num_heads=4,
                 num_kv_heads=2, intermediate_size=256, num_experts=4, top_k=2, moe_block_size=16,
                 rope_theta=1e4, max_position_embeddings=4096)

_PRESETS: dict[str, tuple[dict, dict]] = {
    "tiny": (_TINY_VISION, _TINY_LLM),
    "tiny-dense": (_TINY_VISION, {**_TINY_LLM, "arch": "llama", "num_experts": 0,
                                  "intermediate_size": 512}),
    "tinyllama-1.1b": (_REAL_VISION, dict(
        arch="llama", vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
        num_kv_heads=4, intermediate_size=5632, rope_theta=1e4, max_position_embeddings=2048)),
    "internlm2-7b": (_REAL_VISION, dict(
        arch="internlm2", vocab_size=92544, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, intermediate_size=14336, rope_theta=1e6, max_position_embeddings=32768)),
    "llama2-13b": (_REAL_VISION, dict(
        arch="llama", vocab_size=32000, hidden_size=5120, num_layers=40, num_heads=40,
        num_kv_heads=40, intermediate_size=13824, rope_theta=1e4, max_position_embeddings=4096)),
    "mixtral-8x7b": (_REAL_VISION, dict(
        arch="mixtral", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, intermediate_size=14336, num_experts=8, top_k=2, rope_theta=1e6,
        max_position_embeddings=32768)),
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)


def preset(name: str) -> SphinxConfig:
    """A fresh ``SphinxConfig`` of the named preset (one of ``PRESETS``)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    vision, llm = _PRESETS[name]
    return SphinxConfig.from_dict({"vision": vision, "projector": {}, "llm": llm})
