"""Drop-in ``nn.Module``s over the ops: parameters are named as the PyTorch modules they replace, so
checkpoints load unchanged."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sphinx_kernels.projection import patch_projection


class PatchProjector(nn.Module):
    """Projects several encoders' features into the LLM width with one fused op (see
    :func:`sphinx_kernels.patch_projection`): ``proj`` (an ``nn.Linear`` over the channel
    concatenation, columns in encoder order) then ``norm`` (an ``nn.LayerNorm``, unless ``norm=False``).

    Args:
        in_channels: channels of each encoder, e.g. ``(1536, 3072)`` for DINOv2-g and ConvNeXt-XXL.
        out_features: the LLM width ``D``.
        grid: the common token grid ``(gh, gw)`` (or one int): each view gives ``1 + gh * gw`` rows.
        norm: whether a LayerNorm follows the projection.
        bias: whether the projection has a bias.
        eps: the LayerNorm epsilon.
    """

    def __init__(self, in_channels: Sequence[int], out_features: int, grid: int | tuple[int, int],
                 norm: bool = True, bias: bool = True, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.proj = nn.Linear(sum(self.in_channels), out_features, bias=bias, device=device,
                              dtype=dtype)
        self.norm = (nn.LayerNorm(out_features, eps=eps, device=device, dtype=dtype) if norm
                     else None)

    def forward(self, features: Sequence[torch.Tensor], out: torch.Tensor | None = None,
                out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``features``: one tensor per encoder (see ``patch_projection``); with ``out`` / ``out_rows``
        the rows are written into a copy of the packed sequence ``out``."""
        if len(features) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature tensors (in_channels), got "
                             f"{len(features)}")
        for i, (feature, channels) in enumerate(zip(features, self.in_channels)):
            have = feature.shape[-1] if feature.dim() == 3 else feature.shape[1]
            if have != channels:
                raise ValueError(f"features[{i}] has {have} channels, in_channels[{i}] is {channels}")
        norm = self.norm
        return patch_projection(features, self.proj.weight, self.proj.bias, grid=self.grid,
                                norm_weight=None if norm is None else norm.weight,
                                norm_bias=None if norm is None else norm.bias,
                                eps=1e-5 if norm is None else norm.eps, out=out, out_rows=out_rows)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, grid={self.grid}"
