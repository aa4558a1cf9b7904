"""``find_padding_tiles``: which tiles of pre-padded images are entirely padding (their sub-images
are then never encoded: one skip token stands in).

Backends: ``cuda`` (``csrc/varlen/``), ``triton`` (``sphinx_kernels/triton/find_padding_tiles.py``),
``reference`` (:func:`find_padding_tiles_reference`). No C++ CPU kernel: on the CPU the reference is
one vectorised comparison, and data loading (where pre-padded images are checked) runs there only
when the GPU is busy elsewhere. Data only: no autograd.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sphinx_kernels._validation import INT32_MAX, require_device, require_tensor
from sphinx_kernels.backends import Backend, Impl, OpBackends
from sphinx_kernels.dtypes import KERNEL_DTYPES
from sphinx_kernels.kernel_op import kernel_op
from sphinx_kernels.platforms import CUDA, REFERENCE, TRITON, native, triton_launcher

__all__ = ["find_padding_tiles", "find_padding_tiles_reference", "FIND_PADDING_TILES_BACKENDS"]


def find_padding_tiles(images: torch.Tensor, tile: int | tuple[int, int],
                       pad_value: float | Sequence[float] | torch.Tensor = 0.0, *,
                       backend: str | None = None) -> torch.Tensor:
    """Which tiles of pre-padded images are pure padding: every pixel, in every channel, equals the
    pad.

    Args:
        images: ``[N, C, H, W]`` (or ``[C, H, W]``) float16, bfloat16 or float32, any strides
            (channels-last included).
        tile: the tile size, ``t`` or ``(th, tw)``, positive ints below 2^31; ``H`` and ``W`` must
            be multiples of it.
        pad_value: the pad, one value for all channels or one per channel (a sequence or a ``[C]``
            tensor), e.g. the normalised value of the padding colour. It is rounded to the images'
            dtype before the exact comparison. A NaN pad matches nothing.
        backend: force one of ``FIND_PADDING_TILES_BACKENDS.names``.

    Returns:
        bool ``[N, H // th, W // tw]`` (``[H // th, W // tw]`` for a single image), tiles in raster
        order: True where the tile is entirely padding.
    """
    require_tensor("images", images)
    if images.dim() not in (3, 4):
        raise ValueError(f"images must be [N, C, H, W] or [C, H, W], got shape "
                         f"{tuple(images.shape)}")
    single = images.dim() == 3
    images = images[None] if single else images
    tile_h, tile_w, pad = _check_find_padding_tiles(images, tile, pad_value)
    request = FIND_PADDING_TILES_BACKENDS.request(images.device, images.dtype)
    chosen = FIND_PADDING_TILES_BACKENDS.select(request, backend)
    flags = _find_padding_tiles_op(images.detach(), pad, tile_h, tile_w, chosen.name)
    return flags[0] if single else flags


def find_padding_tiles_reference(images: torch.Tensor, pad: torch.Tensor, tile_h: int,
                                 tile_w: int) -> torch.Tensor:
    """Pure-PyTorch ``find_padding_tiles`` on ``[N, C, H, W]`` with ``pad`` float32 ``[C]``."""
    num, channels, height, width = images.shape
    equal = images.float() == pad.view(1, channels, 1, 1)
    tiles = equal.view(num, channels, height // tile_h, tile_h, width // tile_w, tile_w)
    return tiles.all(dim=5).all(dim=3).all(dim=1)


# Impl: forward(images, pad, tile_h, tile_w) -> bool [N, H // tile_h, W // tile_w].
FIND_PADDING_TILES_BACKENDS = OpBackends("find_padding_tiles", [
    Backend(CUDA, Impl(native("find_padding_tiles_native")), KERNEL_DTYPES),
    Backend(TRITON, Impl(triton_launcher("find_padding_tiles", "find_padding_tiles")),
            KERNEL_DTYPES),
    Backend(REFERENCE, Impl(find_padding_tiles_reference), KERNEL_DTYPES),
])


@kernel_op("sphinx_kernels::find_padding_tiles")
def _find_padding_tiles_op(images: torch.Tensor, pad: torch.Tensor, tile_h: int, tile_w: int,
                           backend: str) -> torch.Tensor:
    return FIND_PADDING_TILES_BACKENDS[backend].impl.forward(images=images, pad=pad, tile_h=tile_h,
                                                             tile_w=tile_w)


@_find_padding_tiles_op.register_fake
def _(images, pad, tile_h, tile_w, backend):
    num, _, height, width = images.shape
    return images.new_empty((num, height // tile_h, width // tile_w), dtype=torch.bool)


def _check_find_padding_tiles(images, tile, pad_value) -> tuple[int, int, torch.Tensor]:
    """Validates the call; returns the tile size and the pad as float32 ``[C]`` on the images'
    device."""
    require_tensor("images", images, dims=4, dtypes=KERNEL_DTYPES)
    sizes = (tile, tile) if isinstance(tile, int) else tile
    message = f"tile must be a positive int or a pair of them (each below 2^31), got {tile!r}"
    if not isinstance(sizes, (tuple, list)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in sizes):
        raise TypeError(message)
    if len(sizes) != 2 or not all(0 < t <= INT32_MAX for t in sizes):
        raise ValueError(message)
    tile_h, tile_w = sizes
    _, channels, height, width = images.shape
    if height % tile_h or width % tile_w:
        raise ValueError(f"tile {sizes} must divide the image size {(height, width)}; pad the "
                         "images to a multiple of the tile first")
    if isinstance(pad_value, torch.Tensor):
        require_device("pad_value", pad_value, images.device, "images")
        pad = pad_value
    else:
        try:
            pad = torch.tensor(pad_value, dtype=torch.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(f"pad_value must be a float, a sequence of floats or a tensor, got "
                            f"{pad_value!r}") from error
    if pad.dim() > 1 or (pad.dim() == 1 and pad.shape[0] != channels):
        raise ValueError(f"pad_value must be one value or one per channel ({channels}), got shape "
                         f"{tuple(pad.shape)}")
    # Rounded to the images' dtype first: the comparison is exact in that dtype.
    pad = pad.to(images.dtype).to(torch.float32).expand(channels).contiguous()
    return tile_h, tile_w, pad.to(images.device, non_blocking=True)
