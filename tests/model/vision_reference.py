"""The SPHINX reference's way of running the encoders and the projection, on timm's own modules (for
parity tests of the vision tower and the model's visual rows)."""
from __future__ import annotations

import timm
import torch
from torch import nn

from sphinx_model.config import VisionConfig

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
DINO_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
DINO_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def randomised(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter drawn at random (layer scales and norms too, so no block is a near no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise * 0.3 if p.dim() > 1 else 1.0 + 0.5 * noise)
    return module


def reference_encoders(vision: VisionConfig, dinov2_state, convnext_state):
    """timm's models built as the reference builds them (open_clip's ConvNeXt trunk with its pooling
    replaced by Identity, DINOv2 at the view size), holding the given weights."""
    dinov2 = timm.create_model(vision.dinov2_model, pretrained=False, num_classes=0,
                               img_size=vision.dinov2_image_size, **vision.dinov2_kwargs).eval()
    dinov2.load_state_dict(dinov2_state)
    trunk = timm.create_model(vision.convnext_model, pretrained=False, num_classes=0,
                              **vision.convnext_kwargs).eval()
    trunk.load_state_dict(convnext_state)
    trunk.head.global_pool = nn.Identity()
    trunk.head.flatten = nn.Identity()
    return dinov2, trunk


@torch.no_grad()
def reference_features(dinov2, trunk, dinov2_pixels, convnext_pixels):
    """(DINOv2 tokens, ConvNeXt maps) as ``encode_image`` computes them: the views CLIP-normalised,
    DINOv2's input re-normalised from CLIP's statistics to ImageNet's."""
    clip_small = (dinov2_pixels / 255.0 - CLIP_MEAN) / CLIP_STD
    tokens = dinov2.forward_features(
        clip_small * (CLIP_STD / DINO_STD) + (CLIP_MEAN - DINO_MEAN) / DINO_STD)
    maps = trunk((convnext_pixels / 255.0 - CLIP_MEAN) / CLIP_STD)
    return tokens, maps


@torch.no_grad()
def reference_rows(tokens, maps, weight, bias, norm: nn.LayerNorm):
    """The reference's ``visual_proj`` rows of each view, ``[V, 1 + n*n, H]``: ConvNeXt rows (the
    map's mean as the global row, then the map in raster order) concatenated before DINOv2's (CLS,
    patches), so the Linear's columns are ConvNeXt's first: ours are DINOv2's first."""
    flat = maps.flatten(2).transpose(1, 2)
    convnext = torch.cat([flat.mean(dim=1, keepdim=True), flat], dim=1)
    features = torch.cat([convnext, tokens], dim=2)
    dinov2_channels = tokens.shape[-1]
    accessory_weight = torch.cat([weight[:, dinov2_channels:], weight[:, :dinov2_channels]], dim=1)
    return norm(features @ accessory_weight.T + bias)


def original_dinov2(state, grid):
    """timm's DINOv2 weights in the original DINOv2 checkpoint's layout, position grid ``grid``."""
    out = {}
    for k, v in state.items():
        out[k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")] = v.clone()
    width = out["pos_embed"].shape[-1]
    out["pos_embed"] = torch.randn(1, 1 + grid * grid, width)
    out["mask_token"] = torch.zeros(1, width)
    return out
