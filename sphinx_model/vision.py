"""The frozen vision tower: DINOv2 and the CLIP ConvNeXt trunk, both built with timm.

Per view (the global view and each kept tile of :mod:`sphinx_model.tiling`), as in the SPHINX
reference (LLaMA2-Accessory ``llama_ens5_light.py``, ``encode_image``):

- DINOv2 (``vit_giant_patch14_dinov2`` at 224 px) gives its final-norm tokens, CLS then the 16x16
  patches: ``[V, 1 + n*n, C_a]`` (timm's ``forward_features``; the reference's
  ``x_norm_clstoken`` / ``x_norm_patchtokens``), input normalised with the ImageNet mean / std.
- ConvNeXt (``convnext_xxlarge``, open_clip's ``visual.trunk`` at 512 px) gives its last-stage map
  after the head's LayerNorm, without the pooling: ``[V, C_b, m, m]`` (stride 32), input
  normalised with the CLIP mean / std.

Both are returned in these native layouts: ``sphinx_kernels.patch_projection`` reads them in place,
takes the ConvNeXt global row as the mean of its map (the reference's "gap as cls token") and
resamples both to the common grid.

Weights load from local files only (:meth:`VisionTower.load_weights`): the original DINOv2 ``.pth``
(as torch.hub's ``dinov2_vitg14``), open_clip's ``visual.trunk.*`` ConvNeXt file, or timm's own
state dicts, through timm's checkpoint filters; pickles only with ``weights_only=True``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping

import timm
import torch
import torch.nn.functional as F
from timm.models import convnext as timm_convnext
from timm.models import named_apply
from timm.models import vision_transformer as timm_vit
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sphinx_model.checkpoints import safe_torch_load
from sphinx_model.config import VisionConfig
from sphinx_model.tiling import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

__all__ = ["VisionTower", "check_state_keys", "convnext_state_dict", "dinov2_state_dict",
           "load_state_file"]

# A weights file (path) or a state dict.
WeightsSource = str | os.PathLike | Mapping[str, torch.Tensor]
# timm's ConvNeXt default layer-scale init (ConvNeXtBlock keeps it in a bare parameter).
_CONVNEXT_LS_INIT = 1e-6


class VisionTower(nn.Module):
    """Both frozen encoders of ``cfg`` (a :class:`VisionConfig`): ``dinov2`` and ``convnext``, timm
    modules built with ``pretrained=False`` (nothing downloads).

    Frozen: every parameter has ``requires_grad=False``, the tower stays in eval mode whatever
    ``train()`` is asked, and the forward runs under ``torch.no_grad()``.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if not isinstance(cfg, VisionConfig):
            raise TypeError(f"cfg must be a VisionConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.dinov2 = timm.create_model(cfg.dinov2_model, pretrained=False, num_classes=0,
                                        img_size=cfg.dinov2_image_size, **cfg.dinov2_kwargs)
        self.convnext = timm.create_model(cfg.convnext_model, pretrained=False, num_classes=0,
                                          **cfg.convnext_kwargs)
        _check_encoders(self.dinov2, self.convnext, cfg)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> VisionTower:
        """Always eval: the encoders are frozen (no dropout or drop-path whatever the mode)."""
        return super().train(False)

    @property
    def dinov2_grid(self) -> int:
        """DINOv2 patches per view side (``dinov2_image_size / patch``)."""
        return self.dinov2.patch_embed.grid_size[0]

    @property
    def convnext_grid(self) -> int:
        """ConvNeXt map side per view (``convnext_image_size / 32``)."""
        return self.cfg.convnext_image_size // self.convnext.feature_info[-1]["reduction"]

    @torch.no_grad()
    def forward(self, dinov2_pixels: torch.Tensor, convnext_pixels: torch.Tensor, *,
                chunk_views: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes ``V`` views with both encoders.

        Args:
            dinov2_pixels: uint8 ``[V, 3, S1, S1]`` RGB (``S1 = cfg.dinov2_image_size``).
            convnext_pixels: uint8 ``[V, 3, S2, S2]`` RGB, the same views at
                ``cfg.convnext_image_size``.
            chunk_views: encode at most this many views at a time (bounds activation memory).

        Returns:
            ``(tokens, maps)`` in the encoders' parameter dtype, on their device: DINOv2 tokens
            ``[V, 1 + n*n, C_a]`` (CLS first) and ConvNeXt maps ``[V, C_b, m, m]``. ``V = 0`` gives
            empty tensors of those shapes without running the encoders.
        """
        views = self._check_pixels(dinov2_pixels, convnext_pixels, chunk_views)
        dtype = self.dinov2.cls_token.dtype
        if views == 0:
            n, m = self.dinov2_grid, self.convnext_grid
            return (dinov2_pixels.new_empty((0, 1 + n * n, self.cfg.dinov2_channels), dtype=dtype),
                    convnext_pixels.new_empty((0, self.cfg.convnext_channels, m, m), dtype=dtype))
        tokens, maps = [], []
        step = chunk_views or views
        for start in range(0, views, step):
            part = slice(start, start + step)
            tokens.append(self.dinov2.forward_features(
                _normalised(dinov2_pixels[part], IMAGENET_MEAN, IMAGENET_STD, dtype)))
            maps.append(self.convnext.head.norm(self.convnext.forward_features(
                _normalised(convnext_pixels[part], CLIP_MEAN, CLIP_STD, dtype))))
        if len(tokens) == 1:
            return tokens[0], maps[0]
        return torch.cat(tokens), torch.cat(maps)

    def _check_pixels(self, dinov2_pixels, convnext_pixels, chunk_views) -> int:
        for name, pixels, side in (("dinov2_pixels", dinov2_pixels, self.cfg.dinov2_image_size),
                                   ("convnext_pixels", convnext_pixels,
                                    self.cfg.convnext_image_size)):
            if not isinstance(pixels, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(pixels).__name__}")
            if pixels.dtype != torch.uint8:
                raise TypeError(f"{name} must be uint8 RGB pixels, got {pixels.dtype}")
            if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, side, side):
                raise ValueError(f"{name} must be [V, 3, {side}, {side}], got "
                                 f"{list(pixels.shape)}")
        if dinov2_pixels.shape[0] != convnext_pixels.shape[0]:
            raise ValueError(f"dinov2_pixels has {dinov2_pixels.shape[0]} views, convnext_pixels "
                             f"{convnext_pixels.shape[0]}; they must be the same views")
        if chunk_views is not None and (isinstance(chunk_views, bool)
                                        or not isinstance(chunk_views, int) or chunk_views < 1):
            raise ValueError(f"chunk_views must be a positive int or None, got {chunk_views!r}")
        return dinov2_pixels.shape[0]

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialises both encoders (after building on the meta device and materialising):
        timm's own initialisation, then the weight files of the config, when it names them."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.dinov2.init_weights()
        named_apply(timm_convnext._init_weights, self.convnext)  # what ConvNeXt.__init__ applies
        for module in self.convnext.modules():
            if isinstance(module, timm_convnext.ConvNeXtBlock) and module.gamma is not None:
                nn.init.constant_(module.gamma, _CONVNEXT_LS_INIT)
        if self.cfg.dinov2_weights or self.cfg.convnext_weights:
            self.load_weights(dinov2=self.cfg.dinov2_weights, convnext=self.cfg.convnext_weights)

    def load_weights(self, dinov2: WeightsSource | None = None,
                     convnext: WeightsSource | None = None) -> None:
        """Loads encoder weights from local files (``.safetensors``, or a pickle read with
        ``weights_only=True``) or state dicts, in any layout timm's filters accept (see
        :func:`dinov2_state_dict`, :func:`convnext_state_dict`). Missing or unexpected keys and
        shape mismatches raise ``ValueError`` naming them (that encoder is left unchanged)."""
        for name, source, convert in (("dinov2", dinov2, dinov2_state_dict),
                                      ("convnext", convnext, convnext_state_dict)):
            if source is None:
                continue
            state = load_state_file(source) if isinstance(source, (str, os.PathLike)) else source
            module = getattr(self, name)
            _load_exact(module, convert(state, module), name)

    def flops_per_view(self) -> int:
        """Forward FLOPs of both encoders on one view (counted once by torch's FlopCounterMode on a
        meta-device copy; for the trainer's MFU)."""
        return _flops_per_view(json.dumps(dataclasses.asdict(self.cfg), sort_keys=True))


def dinov2_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """A DINOv2 state dict in timm's layout for ``model`` (a timm ``VisionTransformer``).

    Accepts timm's own layout and the original DINOv2 checkpoint (``mask_token``, ``mlp.w12`` /
    ``w3``, a 37x37 position grid). The original's position grid is resampled to the model's as
    DINOv2 itself does at run time (``interpolate_pos_encoding``: float32 bicubic with its 0.1 scale
    offset, no antialias), so a 224 px model computes what the reference computes.
    """
    state = dict(state)
    pos_embed = state.get("pos_embed")
    if "mask_token" in state and pos_embed is not None and pos_embed.dim() == 3:
        state["pos_embed"] = _dinov2_pos_embed(pos_embed, model.patch_embed.grid_size)
    return timm_vit.checkpoint_filter_fn(state, model)


def convnext_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """A ConvNeXt state dict in timm's layout for ``model`` (a timm ``ConvNeXt``, no classifier).

    Accepts timm's layout (the SPHINX reference's ``openclip_convnext_xxl.*`` trunk, prefix
    stripped) and open_clip's full CLIP file (``visual.trunk.*``; its text tower and projection
    head are dropped: the tower ends at the trunk's head norm)."""
    converted = timm_convnext.checkpoint_filter_fn(dict(state), model)
    head = ("head.fc.", "head.pre_logits.")
    return {k: v for k, v in converted.items() if not k.startswith(head)}


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat state dict from a local ``.safetensors`` file or a torch pickle (read by
    ``checkpoints.safe_torch_load``: ``weights_only=True``, a pickle that carries code is refused
    with ``UnsafeCheckpointError``, a ``ValueError``). A ``{"model": ...}`` /
    ``{"state_dict": ...}`` wrapper is unwrapped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist (weights load from local "
                                "files only)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = safe_torch_load(path)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise TypeError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    return dict(state)


# ------------------------------------------------------------------------------------------------


def _check_encoders(dinov2: nn.Module, convnext: nn.Module, cfg: VisionConfig) -> None:
    """The timm modules produce what the config and the fused projection expect."""
    if getattr(dinov2, "num_prefix_tokens", None) != 1 or not hasattr(dinov2, "patch_embed"):
        raise ValueError(f"vision.dinov2_model {cfg.dinov2_model!r} must be a timm ViT with one "
                         "prefix token (CLS, no registers)")
    if dinov2.embed_dim != cfg.dinov2_channels:
        raise ValueError(f"vision.dinov2_channels is {cfg.dinov2_channels} but "
                         f"{cfg.dinov2_model!r} has width {dinov2.embed_dim}")
    if not isinstance(convnext, timm_convnext.ConvNeXt):
        raise TypeError(f"vision.convnext_model {cfg.convnext_model!r} must be a timm ConvNeXt")
    if convnext.num_features != cfg.convnext_channels:
        raise ValueError(f"vision.convnext_channels is {cfg.convnext_channels} but "
                         f"{cfg.convnext_model!r} has {convnext.num_features} channels")
    reduction = convnext.feature_info[-1]["reduction"]
    if cfg.convnext_image_size % reduction:
        raise ValueError(f"vision.convnext_image_size {cfg.convnext_image_size} must be a multiple "
                         f"of the ConvNeXt stride {reduction}")
    grids = {"DINOv2": dinov2.patch_embed.grid_size[0],
             "ConvNeXt": cfg.convnext_image_size // reduction}
    for name, side in grids.items():
        if not (side % cfg.grid == 0 or cfg.grid % side == 0):
            raise ValueError(f"vision.grid {cfg.grid}: the {name} grid per view ({side}x{side}) "
                             "must be an integer multiple or divisor of it")


def _normalised(pixels: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """uint8 RGB ``[V, 3, S, S]`` to ``(pixels / 255 - mean) / std`` in ``dtype``, computed in
    float32 with per-channel scalars (no constant tensors to move to the device)."""
    x = pixels.to(torch.float32)
    for c in range(3):
        x[:, c].mul_(1.0 / (255.0 * std[c])).sub_(mean[c] / std[c])
    return x.to(dtype)


def _dinov2_pos_embed(pos_embed: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """``[1, 1 + M*M, C]`` (CLS first) on the ``grid_size`` patch grid, as DINOv2 resamples."""
    patches = pos_embed.shape[1] - 1
    side = math.isqrt(patches)
    if side * side != patches or tuple(grid_size) == (side, side):
        return pos_embed
    grid = pos_embed[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = ((grid_size[0] + 0.1) / side, (grid_size[1] + 0.1) / side)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1])
    return torch.cat([pos_embed[:, :1].float(), grid], dim=1).to(pos_embed.dtype)


def check_state_keys(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor],
                     where: str, *, shapes: bool = True) -> None:
    """``ValueError`` naming every key of ``expected`` missing from ``found``, every unexpected key
    and (with ``shapes``) every shape mismatch; ``where`` starts the message."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{k} {list(found[k].shape)} (expected {list(expected[k].shape)})"
                  for k in expected if shapes and k in found
                  and tuple(found[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {', '.join(mismatched)}")
    if problems:
        raise ValueError(f"{where}: the weights do not fit the model: " + "; ".join(problems))


def _load_exact(module: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    """``module.load_state_dict(state)`` after :func:`check_state_keys` (nothing assigned on
    error)."""
    own = module.state_dict()
    check_state_keys(own, state, f"{name} weights")
    module.load_state_dict(state, strict=True, assign=any(t.is_meta for t in own.values()))


@functools.lru_cache(maxsize=8)
def _flops_per_view(cfg_json: str) -> int:
    cfg = VisionConfig(**json.loads(cfg_json))
    with torch.device("meta"):
        tower = VisionTower(cfg)
    pixels = [torch.empty((1, 3, s, s), dtype=torch.uint8, device="meta")
              for s in (cfg.dinov2_image_size, cfg.convnext_image_size)]
    with FlopCounterMode(display=False) as counter:
        tower(*pixels)
    return int(counter.get_total_flops())
