"""find_padding_tiles on every backend this machine can run, against a tile-by-tile loop."""
from __future__ import annotations

import re

import pytest
import torch

import sphinx_kernels
from sphinx_kernels.ops.find_padding_tiles import FIND_PADDING_TILES_BACKENDS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = FIND_PADDING_TILES_BACKENDS.available(
    FIND_PADDING_TILES_BACKENDS.request(DEVICE, torch.float32))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def padded_images(num, channels, tiles, tile, dtype, pad, seed):
    """Random images where a random half of the tiles are pure padding, and some others differ from
    the pad in exactly one pixel of one channel (the hardest tiles to get right)."""
    gen = torch.Generator().manual_seed(seed)
    (tiles_h, tiles_w), (tile_h, tile_w) = tiles, tile
    images = torch.randn(num, channels, tiles_h * tile_h, tiles_w * tile_w, generator=gen)
    pad = torch.as_tensor(pad, dtype=torch.float32).expand(channels)
    for n in range(num):
        for i in range(tiles_h):
            for j in range(tiles_w):
                kind = int(torch.randint(3, (), generator=gen))
                if kind == 0:
                    continue
                region = images[n, :, i * tile_h:(i + 1) * tile_h, j * tile_w:(j + 1) * tile_w]
                region.copy_(pad.view(-1, 1, 1).expand_as(region))
                if kind == 2:  # one pixel off, at a random place
                    c, r, q = (int(torch.randint(s, (), generator=gen)) for s in region.shape)
                    region[c, r, q] += 1.0
    return images.to(dtype).to(DEVICE)


def loop_flags(images, tile, pad):
    (tile_h, tile_w) = tile
    num, channels, height, width = images.shape
    pad = torch.as_tensor(pad, dtype=torch.float32).to(images.dtype).float().expand(channels)
    flags = torch.zeros(num, height // tile_h, width // tile_w, dtype=torch.bool)
    for n in range(num):
        for i in range(height // tile_h):
            for j in range(width // tile_w):
                region = images[n, :, i * tile_h:(i + 1) * tile_h, j * tile_w:(j + 1) * tile_w]
                flags[n, i, j] = bool((region.float().cpu() == pad.view(-1, 1, 1)).all())
    return flags.to(images.device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num,channels,tiles,tile,pad", [
    (3, 3, (2, 3), (7, 5), 0.0),
    (1, 1, (1, 1), (1, 1), -1.5),
    (2, 3, (3, 2), (16, 9), (-1.79, -1.75, -1.48)),   # per-channel normalised black
    (1, 4, (2, 2), (59, 33), 0.1),                       # 0.1 is rounded to the dtype first
    (0, 3, (2, 2), (4, 4), 0.0),
])
def test_matches_tile_loop(backend, dtype, num, channels, tiles, tile, pad, seed):
    images = padded_images(num, channels, tiles, tile, dtype, pad, seed)
    flags = sphinx_kernels.find_padding_tiles(images, tile, pad, backend=backend)
    assert flags.dtype == torch.bool and flags.shape == (num,) + tiles
    assert torch.equal(flags, loop_flags(images, tile, pad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_single_image_and_all_padding(backend):
    images = torch.full((2, 3, 8, 12), 0.25, device=DEVICE).to(memory_format=torch.channels_last)
    images[1, 2, 7, 11] = 0.0
    flags = sphinx_kernels.find_padding_tiles(images, 4, 0.25, backend=backend)
    expected = torch.ones(2, 2, 3, dtype=torch.bool, device=DEVICE)
    expected[1, 1, 2] = False
    assert torch.equal(flags, expected)
    single = sphinx_kernels.find_padding_tiles(images[0], (4, 4), torch.full((3,), 0.25,
                                               device=DEVICE), backend=backend)
    assert torch.equal(single, expected[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_pad_matches_nothing_and_negative_zero_matches_zero(backend):
    images = torch.zeros(1, 1, 4, 4, device=DEVICE)
    images[0, 0, :2] = -0.0
    assert not sphinx_kernels.find_padding_tiles(images, 2, float("nan"), backend=backend).any()
    assert sphinx_kernels.find_padding_tiles(images, 2, 0.0, backend=backend).all()


BAD_INPUTS = [
    (dict(images=torch.zeros(8, 8)), ValueError, "images must be [N, C, H, W] or [C, H, W]"),
    (dict(images=torch.zeros(1, 3, 8, 8, dtype=torch.int32)), TypeError, "images must have dtype"),
    (dict(images=[[0.0]]), TypeError, "images must be a torch.Tensor"),
    (dict(tile=3), ValueError, "tile (3, 3) must divide the image size (8, 8)"),
    (dict(tile=(0, 4)), ValueError, "tile must be a positive int"),
    (dict(tile=(4, 4, 4)), ValueError, "tile must be a positive int"),
    (dict(tile=True), TypeError,
     "tile must be a positive int or a pair of them (each below 2^31), got True"),
    (dict(tile=(True, 2)), TypeError, "tile must be a positive int or a pair of them"),
    (dict(tile=2.0), TypeError, "tile must be a positive int or a pair of them"),
    (dict(images=torch.zeros(1, 3, 0, 0), tile=2**70), ValueError, "tile must be a positive int"),
    (dict(pad_value=(0.0, 0.0)), ValueError, "pad_value must be one value or one per channel (3)"),
    (dict(pad_value="black"), TypeError, "pad_value must be a float"),
    (dict(pad_value=torch.zeros(3, device="meta")), ValueError, "pad_value is on meta"),
]


@pytest.mark.parametrize("change,error,message", BAD_INPUTS)
@pytest.mark.usefixtures("value_checks_on")
def test_bad_input_raises_naming_the_argument(change, error, message):
    args = dict(images=torch.zeros(1, 3, 8, 8), tile=4, pad_value=0.0) | change
    with pytest.raises(error, match=re.escape(message)):
        sphinx_kernels.find_padding_tiles(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    images = padded_images(2, 3, (2, 2), (4, 6), torch.float32, 0.0, seed=1)
    pad = torch.zeros(3, device=DEVICE)
    torch.library.opcheck(torch.ops.sphinx_kernels.find_padding_tiles.default,
                          (images, pad, 4, 6, backend),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compiles_with_fullgraph():
    images = padded_images(2, 3, (2, 2), (4, 4), torch.float32, 0.0, seed=2)
    compiled = torch.compile(lambda x: sphinx_kernels.find_padding_tiles(x, 4, 0.0), fullgraph=True)
    assert torch.equal(compiled(images), loop_flags(images, (4, 4), 0.0))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_sphinx_sizes(backend, dtype):
    """A batch of 16 images of 3x3 tiles of 448 px, against the reference."""
    images = padded_images(16, 3, (3, 3), (448, 448), dtype, (-1.79, -1.75, -1.48), seed=3)
    pad = (-1.79, -1.75, -1.48)
    assert torch.equal(sphinx_kernels.find_padding_tiles(images, 448, pad, backend=backend),
                       sphinx_kernels.find_padding_tiles(images, 448, pad, backend="reference"))
