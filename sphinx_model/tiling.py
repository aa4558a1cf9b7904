"""Any-resolution tiling of one image into the views both encoders see (runs in DataLoader workers).

The image (EXIF orientation applied, converted to RGB) is resized with its aspect ratio kept so
that its longer side fills a canvas of ``tiles x tiles`` square tiles, placed at the top-left, and
the rest of the canvas is the padding colour (the CLIP mean, as SPHINX pads). Views, in order: the
global view (the whole canvas, one tile's size), then every tile that holds an image pixel, in
raster order. A tile holding none is *skipped*: it is never encoded, and one learnable skip token
stands in for it.

Which tiles are skipped is a property of the geometry alone (:func:`tile_geometry`), the same at
every encoder resolution: the resized image extent is rounded per resolution but kept inside the
columns and rows the exact geometry says it reaches. Each view is produced at both encoders'
resolutions (``vision.dinov2_image_size`` and ``vision.convnext_image_size``) from the original
image, Pillow bicubic, as uint8 RGB.

Pillow and torch only: no model, no CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import ExifTags, Image, ImageOps

from sphinx_model.config import VisionConfig

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAD_COLOR",
    "TiledImage",
    "tile_geometry",
    "tile_image",
    "to_rgb",
    "upright_size",
]

# Per-channel RGB statistics in [0, 1] of the encoders' pretraining (ConvNeXt: OpenAI CLIP's,
# DINOv2: ImageNet's); the vision tower normalises with them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The padding colour: the CLIP mean in uint8, truncated as the SPHINX reference's PadToSquare does.
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
# EXIF orientations that turn the stored image a quarter (its upright width is its stored height).
_QUARTER_TURNS = (5, 6, 7, 8)


@dataclass
class TiledImage:
    """The views of one image.

    Attributes:
        rows, cols: the tile grid (``vision.tiles x vision.tiles``).
        skipped: ``rows * cols`` flags in raster order; True where the tile holds no image pixel.
        dinov2_pixels: uint8 ``[n_kept_views, 3, S1, S1]`` RGB (``S1 = vision.dinov2_image_size``):
            the global view first, then the kept tiles in raster order.
        convnext_pixels: uint8 ``[n_kept_views, 3, S2, S2]`` (``S2 = vision.convnext_image_size``),
            the same views.
    """

    rows: int
    cols: int
    skipped: list[bool]
    dinov2_pixels: torch.Tensor
    convnext_pixels: torch.Tensor

    @property
    def num_views(self) -> int:
        """Kept views: the global view plus the tiles that are not skipped."""
        return 1 + self.skipped.count(False)


def tile_geometry(width: int, height: int, tiles: int) -> tuple[int, int, list[bool]]:
    """The tile grid of a ``width x height`` image on a ``tiles x tiles`` canvas.

    The longer side spans all ``tiles`` tiles; the shorter spans ``ceil(tiles * short / long)``
    of them (at least one). Returns ``(rows, cols, skipped)``: ``rows == cols == tiles`` and
    ``skipped``, ``rows * cols`` flags in raster order, True where the tile holds no image pixel.
    """
    _require_size("width", width)
    _require_size("height", height)
    _require_size("tiles", tiles)
    longest = max(width, height)
    kept_rows, kept_cols = _kept(height, longest, tiles), _kept(width, longest, tiles)
    skipped = [r >= kept_rows or c >= kept_cols for r in range(tiles) for c in range(tiles)]
    return tiles, tiles, skipped


def tile_image(image: Image.Image, vision: VisionConfig) -> TiledImage:
    """The global view and the kept tiles of ``image`` at both encoders' resolutions.

    ``image``: any Pillow image (EXIF orientation is applied; palette, grayscale, 16-bit, CMYK and
    images with alpha are converted to RGB, transparent pixels becoming the padding colour). A JPEG
    not yet loaded (as ``Image.open`` returns it) is decoded at the smallest DCT scale that still
    covers the largest view (``Image.draft``: several times faster for a large photo; it changes
    ``image`` in place). The geometry is always that of the upright full-size image
    (:func:`upright_size`), so ``tile_geometry`` on a file's header size predicts it.
    ``vision``: the tiling (``tiles``) and the two view sizes.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if not isinstance(vision, VisionConfig):
        raise TypeError(f"vision must be a VisionConfig, got {type(vision).__name__}")
    width, height = upright_size(image)
    tiles = vision.tiles
    rows, cols, skipped = tile_geometry(width, height, tiles)
    kept_tiles = [divmod(i, cols) for i, skip in enumerate(skipped) if not skip]
    sides = {"dinov2": vision.dinov2_image_size, "convnext": vision.convnext_image_size}
    for name, side in sides.items():
        _require_size(f"vision.{name}_image_size", side)
    # A large photo is resized once to the biggest extent needed and the other views come from that
    # (a second bicubic pass from a larger image: visually the same, 2-3x faster on a 12 MP photo).
    largest = max((_extent(width, height, canvas * side, tiles)
                   for side in sides.values() for canvas in (1, tiles)), key=lambda e: e[0] * e[1])
    stored = largest if image.size == (width, height) else largest[::-1]
    image.draft(None, stored)  # a no-op unless an unloaded JPEG
    rgb = to_rgb(image)
    if largest[0] * largest[1] < rgb.width * rgb.height:
        rgb = rgb.resize(largest, Image.Resampling.BICUBIC, reducing_gap=3.0)
    views = {}
    for name, side in sides.items():
        canvas = _on_canvas(rgb, _extent(width, height, tiles * side, tiles), tiles * side)
        tile_views = [canvas.crop((c * side, r * side, (c + 1) * side, (r + 1) * side))
                      for r, c in kept_tiles]
        global_view = _on_canvas(rgb, _extent(width, height, side, tiles), side)
        views[name] = _planar([global_view, *tile_views])
    return TiledImage(rows, cols, skipped, views["dinov2"], views["convnext"])


def upright_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of ``image`` once its EXIF orientation is applied, from its header (no
    decoding). ``ValueError`` for an image without pixels."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"image must have at least one pixel, got size {width}x{height}")
    turned = image.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS
    return (height, width) if turned else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` upright (EXIF orientation applied) in mode RGB, fully loaded.

    Alpha (RGBA, LA, palette with transparency) is composited over the padding colour; 16-bit
    grayscale is scaled to 8 bits, 32-bit integer and float grayscale too when they exceed 255.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    upright_size(image)
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):  # 16-bit grayscale: scaled to 8 bits rather than clipped
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    elif image.mode in ("I", "F"):  # 32-bit grayscale, range unknown: scaled when over 8 bits
        high = image.getextrema()[1]
        image = image.point(lambda v: v * (255 / high)) if high > 255 else image
        image = image.convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*PAD_COLOR, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _extent(width: int, height: int, size: int, tiles: int) -> tuple[int, int]:
    """The resized ``(width, height)`` of the image on a square canvas of ``size`` pixels.

    Along each axis: the exact scaled length rounded, clamped so that it reaches exactly the tiles
    :func:`tile_geometry` keeps when the canvas is cut into ``tiles x tiles`` (rounding leaves no
    kept tile without pixels and gives no skipped tile any). The global view's canvas is one tile's
    size, its clamp the same fractions.
    """
    longest = max(width, height)
    extent = []
    for length in (width, height):
        kept = _kept(length, longest, tiles)
        scaled = (2 * length * size + longest) // (2 * longest)  # round(length * size / longest)
        low = ((kept - 1) * size) // tiles + 1
        high = max(low, (kept * size) // tiles)
        extent.append(min(max(scaled, low), high))
    return extent[0], extent[1]


def _on_canvas(rgb: Image.Image, extent: tuple[int, int], size: int) -> Image.Image:
    """``rgb`` resized to ``extent``, pasted at the top-left of a ``size`` square of padding."""
    canvas = Image.new("RGB", (size, size), PAD_COLOR)
    resized = rgb if extent == rgb.size else rgb.resize(extent, Image.Resampling.BICUBIC,
                                                        reducing_gap=3.0)
    canvas.paste(resized, (0, 0))
    return canvas


def _planar(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of one size as uint8 ``[N, 3, H, W]``, contiguous: Pillow's band planes joined
    into one buffer (one copy; a torch permute of interleaved uint8 pixels is several times
    slower)."""
    width, height = images[0].size
    planes = bytearray().join(band.tobytes() for image in images for band in image.split())
    return torch.frombuffer(planes, dtype=torch.uint8).view(len(images), 3, height, width)


def _kept(length: int, longest: int, tiles: int) -> int:
    """Tiles along an axis of ``length`` pixels when the ``longest`` side spans ``tiles``."""
    return max(1, -(-tiles * length // longest))


def _require_size(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
