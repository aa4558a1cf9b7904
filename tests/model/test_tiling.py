"""Any-resolution tiling: geometry over many aspect ratios, pixels of kept and skipped tiles, views,
EXIF orientation and image modes, errors."""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

import sphinx_model as sm
from sphinx_model.tiling import PAD_COLOR, tile_geometry, tile_image

COLOR = (250, 10, 200)  # far from the padding colour in every channel
PAD = torch.tensor(PAD_COLOR, dtype=torch.uint8).view(3, 1, 1)
TINY = sm.preset("tiny").vision


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 10_000), height=st.integers(1, 10_000), tiles=st.integers(1, 5))
def test_geometry_keeps_the_tiles_the_scaled_image_reaches(width, height, tiles):
    rows, cols, skipped = tile_geometry(width, height, tiles)
    assert (rows, cols) == (tiles, tiles) and len(skipped) == tiles * tiles
    longest = max(width, height)
    for r in range(tiles):
        for c in range(tiles):
            # Tile (r, c) spans [c, c + 1) x [r, r + 1) in tile units, the image
            # [0, tiles * w / long) x [0, tiles * h / long).
            holds_image = c * longest < tiles * width and r * longest < tiles * height
            assert skipped[r * cols + c] == (not holds_image), (r, c)
    # The longer side spans every tile.
    along_longer = skipped[:tiles] if width >= height else skipped[::tiles]
    assert along_longer == [False] * tiles


def blocks(view, parts):
    """``view`` [3, S, S] cut into parts x parts blocks (raster order), the global view's tiles."""
    side = view.shape[-1]
    edges = [round(i * side / parts) for i in range(parts + 1)]
    return [view[:, edges[r]:edges[r + 1], edges[c]:edges[c + 1]]
            for r in range(parts) for c in range(parts)]


def is_pad(region):
    return bool((region == PAD).all())


def image_mask(region):
    """True where a pixel is the image's colour (a solid image resizes to itself exactly)."""
    color = torch.tensor(COLOR, dtype=torch.uint8).view(3, 1, 1)
    is_image, is_padding = (region == color).all(0), (region == PAD).all(0)
    assert bool((is_image | is_padding).all()), "a pixel is neither image nor padding"
    return is_image


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 700), height=st.integers(1, 700), tiles=st.integers(1, 3))
@example(width=1000, height=501, tiles=2)  # rounding alone would leave the lower tiles empty
@example(width=999, height=2000, tiles=2)
def test_kept_tiles_hold_image_pixels_and_skipped_ones_only_padding(width, height, tiles):
    vision = dataclasses.replace(TINY, tiles=tiles, dinov2_image_size=14 * 3,
                                 convnext_image_size=32 * 2)
    tiled = tile_image(Image.new("RGB", (width, height), COLOR), vision)
    _, _, skipped = tile_geometry(width, height, tiles)
    assert tiled.skipped == skipped and (tiled.rows, tiled.cols) == (tiles, tiles)
    kept = skipped.count(False)
    assert tiled.num_views == 1 + kept
    for pixels, side in ((tiled.dinov2_pixels, vision.dinov2_image_size),
                         (tiled.convnext_pixels, vision.convnext_image_size)):
        assert pixels.dtype == torch.uint8 and pixels.shape == (1 + kept, 3, side, side)
        assert pixels.is_contiguous()
        # Reassemble the canvas from the kept tiles (padding where skipped) and check the image is
        # one top-left rectangle that reaches exactly the kept tiles.
        canvas = PAD.expand(3, tiles * side, tiles * side).clone()
        views = iter(pixels[1:])
        for index, skip in enumerate(skipped):
            if not skip:
                r, c = divmod(index, tiles)
                tile = next(views)
                assert image_mask(tile).any(), f"kept tile {index} holds no image pixel"
                canvas[:, r * side:(r + 1) * side, c * side:(c + 1) * side] = tile
        mask = image_mask(canvas)
        extent_h, extent_w = int(mask[:, 0].sum()), int(mask[0].sum())
        assert bool(mask[:extent_h, :extent_w].all()) and int(mask.sum()) == extent_h * extent_w
        cols_kept = sum(not s for s in skipped[:tiles])
        rows_kept = sum(not skipped[r * tiles] for r in range(tiles))
        assert -(-extent_w // side) == cols_kept and -(-extent_h // side) == rows_kept
        # The global view: the image at the top-left, within the kept tiles' share of the view.
        global_mask = image_mask(pixels[0])
        assert bool(global_mask[0, 0])
        for index, region in enumerate(blocks(pixels[0], tiles)):
            if skipped[index]:
                assert is_pad(region), f"global view: skipped tile {index} holds image pixels"


def test_views_are_pillow_bicubic_crops_of_the_canvas():
    """A square photo fills the canvas: each tile is the crop of Pillow's own bicubic resize."""
    gen = torch.Generator().manual_seed(0)
    hwc = torch.randint(0, 256, (90, 90, 3), generator=gen, dtype=torch.uint8)
    photo = Image.frombytes("RGB", (90, 90), bytes(hwc.flatten().tolist()))
    tiled = tile_image(photo, TINY)
    assert tiled.skipped == [False] * 4
    for pixels, side in ((tiled.dinov2_pixels, TINY.dinov2_image_size),
                         (tiled.convnext_pixels, TINY.convnext_image_size)):
        full = photo.resize((2 * side, 2 * side), Image.Resampling.BICUBIC)
        expected = [photo.resize((side, side), Image.Resampling.BICUBIC)] + [
            full.crop((c * side, r * side, (c + 1) * side, (r + 1) * side))
            for r in range(2) for c in range(2)]
        for view, image in zip(pixels, expected, strict=True):
            chw = torch.tensor(list(image.tobytes()), dtype=torch.uint8).view(side, side, 3)
            assert torch.equal(view, chw.permute(2, 0, 1))


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), COLOR)  # stored landscape, shown portrait (rotated 90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    tiled = tile_image(Image.open(io.BytesIO(buffer.getvalue())), TINY)
    assert tiled.skipped == tile_geometry(20, 60, 2)[2] == [False, True, False, True]


def jpeg(size, orientation=None):
    """A smooth photo-like JPEG file's bytes (optionally with an EXIF orientation)."""
    width, height = size
    ramp = torch.linspace(0, 1, width)[None, :] * torch.linspace(0.2, 1, height)[:, None]
    hwc = torch.stack([ramp * 250, (1 - ramp) * 200, ramp.sqrt() * 180], dim=-1).to(torch.uint8)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.frombytes("RGB", size, bytes(hwc.flatten().tolist())).save(
        buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [None, 6])
def test_large_jpeg_is_drafted_with_the_header_geometry(orientation):
    data = jpeg((1500, 500), orientation)
    lazy, full = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(data))
    full.load()  # loaded: decoded at full size, no draft
    fast, slow = tile_image(lazy, TINY), tile_image(full, TINY)
    assert lazy.size[0] < 1500  # decoded at a reduced DCT scale
    upright = (500, 1500) if orientation else (1500, 500)
    assert fast.skipped == slow.skipped == tile_geometry(*upright, 2)[2]
    for a, b in ((fast.dinov2_pixels, slow.dinov2_pixels),
                 (fast.convnext_pixels, slow.convnext_pixels)):
        assert a.shape == b.shape
        assert (a.float() - b.float()).abs().mean() < 2.0  # the same picture, resampled otherwise


@pytest.mark.parametrize("mode, fill, expected", [
    ("L", 200, (200, 200, 200)),
    ("1", 1, (255, 255, 255)),
    ("I;16", 25700, (100, 100, 100)),  # 16 bits scaled to 8
    ("I", 100, (100, 100, 100)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ("RGBA", (10, 20, 30, 0), PAD_COLOR),   # transparent pixels become padding
    ("LA", (90, 0), PAD_COLOR),
])
def test_modes_become_rgb(mode, fill, expected):
    tiled = tile_image(Image.new(mode, (30, 30), fill), TINY)
    assert tiled.dinov2_pixels.shape[0] == 5
    want = torch.tensor(expected, dtype=torch.uint8).view(3, 1, 1)
    assert bool((tiled.convnext_pixels == want).all())


def test_palette_images_with_and_without_transparency():
    palette = Image.new("P", (30, 30), 1)
    palette.putpalette([0, 0, 0, *COLOR] + [0] * 762)
    assert bool((tile_image(palette, TINY).dinov2_pixels[0] == torch.tensor(COLOR).view(3, 1, 1))
                .all())
    palette.info["transparency"] = 1
    assert bool((tile_image(palette, TINY).dinov2_pixels == PAD).all())


def test_extreme_images():
    for size, skipped in (((1, 1), [False] * 4), ((20_000, 1), [False, False, True, True]),
                          ((1, 20_000), [False, True, False, True])):
        tiled = tile_image(Image.new("RGB", size, COLOR), TINY)
        assert tiled.skipped == skipped
        assert tiled.dinov2_pixels.shape[0] == tiled.convnext_pixels.shape[0] == 1 + skipped.count(
            False)


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="image"):
        tile_image(torch.zeros(3, 8, 8), TINY)
    with pytest.raises(TypeError, match="vision"):
        tile_image(Image.new("RGB", (8, 8)), sm.preset("tiny"))
    with pytest.raises(ValueError, match="image"):
        tile_image(Image.new("RGB", (0, 8)), TINY)
    with pytest.raises(ValueError, match="width"):
        tile_geometry(0, 8, 2)
    with pytest.raises(ValueError, match="tiles"):
        tile_geometry(8, 8, 0)
    with pytest.raises(TypeError, match="height"):
        tile_geometry(8, 8.0, 2)
    with pytest.raises(ValueError, match=r"vision\.convnext_image_size"):
        tile_image(Image.new("RGB", (8, 8)), dataclasses.replace(TINY, convnext_image_size=0))
