"""SphinxX on packed batches mixing samples without images, with one image and with several of
different aspect ratios: forward and backward, the packed rows against the tiling geometry, visual
rows against timm's own encoders run as the reference runs them, packed equals per-sample."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import sphinx_model as sm
from sphinx_kernels import ImageSpec, SampleSpec, layout_inputs, plan_layout
from sphinx_model.tiling import tile_geometry, tile_image
from tests.model.vision_reference import (
    randomised,
    reference_encoders,
    reference_features,
    reference_rows,
)

TPV = sm.preset("tiny").vision.tokens_per_view  # 1 + 4 * 4 rows per view


# The ops' pure-PyTorch backends: these tests are about the model's wiring (the kernels have their
# own tests), and the Triton interpreter is 20-50x slower.
pytestmark = pytest.mark.usefixtures("reference_kernels")


def photo(width: int, height: int, seed: int) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.frombytes("RGB", (width, height), bytes(pixels.flatten().tolist()))


# (text token ids, answer flags, images as (width, height, seed)): no image; one wide image (its
# lower tiles skipped); a tall and a square image (the tall one's right tiles skipped).
SAMPLES = [
    ([1, 11, 12, 13, 14, 15], [False, False, True, True, True, True], []),
    ([1, 21, 22, 23], [False, True, True, True], [(96, 30, 1)]),
    ([1, 31, 32, 33, 34], [False, False, False, True, True], [(20, 70, 2), (40, 40, 3)]),
]


def packed_batch(cfg, samples, pad_multiple: int = 1) -> sm.PackedBatch:
    """A PackedBatch built as the data pipeline builds one: tile_image per image, plan_layout."""
    specs, dinov2, convnext = [], [], []
    for text, answer, sizes in samples:
        images = []
        for width, height, seed in sizes:
            tiled = tile_image(photo(width, height, seed), cfg.vision)
            images.append(ImageSpec(tiled.rows, tiled.cols, tiled.skipped))
            dinov2.append(tiled.dinov2_pixels)
            convnext.append(tiled.convnext_pixels)
        # The image block right after BOS, as the SPHINX reference places it.
        specs.append(SampleSpec(text=text, answer=answer, images=images, text_before_images=1))
    layout = plan_layout(layout_inputs(specs), cfg.vision.tokens_per_view,
                         pad_multiple=pad_multiple)
    s1, s2 = cfg.vision.dinov2_image_size, cfg.vision.convnext_image_size
    lengths = layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]
    return sm.PackedBatch(
        layout,
        torch.cat(dinov2) if dinov2 else torch.zeros(0, 3, s1, s1, dtype=torch.uint8),
        torch.cat(convnext) if convnext else torch.zeros(0, 3, s2, s2, dtype=torch.uint8),
        max_seqlen=int(lengths.max()), num_samples=len(samples))


@pytest.fixture(scope="module", params=["tiny", "tiny-dense"])
def model(request):
    torch.manual_seed(0)
    model = sm.SphinxX(sm.preset(request.param))
    randomised(model.vision, seed=1)
    return model


def image_blocks(embeds, model, sample_rows):
    """Parses one sample's packed rows into its image blocks: for each image, the list of segments
    ``("view", rows)`` / ``("skip", row)`` between its begin and end markers."""
    rows = embeds[sample_rows]
    begin, end, skip = model.image_begin, model.image_end, model.skip_token

    def is_row(vector):
        return (rows == vector).all(dim=1)

    starts = torch.nonzero(is_row(begin)).flatten().tolist()
    blocks = []
    for start in starts:
        t, segments = start + 1, []
        while not bool(is_row(end)[t]):
            if bool(is_row(skip)[t]):
                segments.append(("skip", t))
                t += 1
            else:
                segments.append(("view", rows[t:t + TPV]))
                t += TPV
        blocks.append(segments)
    return blocks


def test_forward_backward(model):
    batch = packed_batch(model.config, SAMPLES)
    model.zero_grad()
    out = model(batch, load_balancing_weight=0.01, z_loss_weight=0.001)
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    assert int(out.num_trained_tokens) == batch.num_trained_tokens == 4 + 3 + 2  # answer tokens
    out.loss.backward()
    for name in ("projector.proj.weight", "projector.norm.weight", "skip_token", "image_begin",
                 "image_end", "llm.embed_tokens.weight", "llm.layers.0.self_attn.q_proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and bool(grad.abs().sum() > 0), name
    assert all(p.grad is None for p in model.vision.parameters())
    if model.config.llm.num_experts:
        assert out.tokens_per_expert.shape == (model.config.llm.num_layers,
                                              model.config.llm.num_experts)
        torch.testing.assert_close(
            out.loss, out.lm_loss + 0.01 * out.load_balancing_loss + 0.001 * out.z_loss)
    else:
        assert out.load_balancing_loss is None and out.loss is out.lm_loss


def test_packed_rows_follow_the_tiling(model):
    batch = packed_batch(model.config, SAMPLES, pad_multiple=16)
    with torch.no_grad():
        embeds = model.embed(batch)
    cu = batch.layout.cu_seqlens.tolist()
    assert int(cu[-1]) < embeds.shape[0] and not embeds[cu[-1]:].any()  # padding rows are zero
    views_seen = 0
    for index, (text, _, sizes) in enumerate(SAMPLES):
        blocks = image_blocks(embeds, model, slice(cu[index], cu[index + 1]))
        assert len(blocks) == len(sizes)
        if sizes:  # BOS, then the first image's begin marker
            assert torch.equal(embeds[cu[index] + 1], model.image_begin)
        for (width, height, _), segments in zip(sizes, blocks, strict=True):
            _, _, skipped = tile_geometry(width, height, model.config.vision.tiles)
            # The global view, then one segment per tile in raster order: a skip row exactly where
            # the geometry says the tile holds no pixel.
            assert [kind for kind, _ in segments] == ["view"] + [
                "skip" if s else "view" for s in skipped]
            kept = [rows for kind, rows in segments if kind == "view"]
            pixels = (batch.dinov2_pixels[views_seen:views_seen + len(kept)],
                      batch.convnext_pixels[views_seen:views_seen + len(kept)])
            with torch.no_grad():
                alone = model.visual_rows(*pixels).view(len(kept), TPV, -1)
            for rows, want in zip(kept, alone, strict=True):
                torch.testing.assert_close(rows, want, rtol=1e-6, atol=1e-6)
            views_seen += len(kept)
        # BOS first, the rest of the text after the images, token for token.
        table = model.llm.embed_tokens.weight
        assert torch.equal(embeds[cu[index]], table[text[0]])
        text_rows = embeds[cu[index + 1] - len(text) + 1:cu[index + 1]]
        assert torch.equal(text_rows, table[torch.tensor(text[1:])])
    assert views_seen == batch.num_views
    # Visual rows: (global + kept tiles) x TPV per image, as the geometry predicts.
    predicted = sum(1 + tile_geometry(w, h, 2)[2].count(False) for *_, sizes in SAMPLES
                    for w, h, _ in sizes)
    assert batch.layout.visual_rows.shape[0] == predicted * TPV
    skips = int((embeds == model.skip_token).all(dim=1).sum())
    assert skips == sum(tile_geometry(w, h, 2)[2].count(True) for *_, sizes in SAMPLES
                        for w, h, _ in sizes) == 4


def test_visual_rows_equal_timm_run_as_the_reference(model):
    """The rows of a kept tile in the packed sequence equal the reference's: timm's encoders on
    that tile, ConvNeXt's mean as its global row, channels concatenated ConvNeXt first, the Linear
    and LayerNorm."""
    cfg = model.config
    tiled = tile_image(photo(*SAMPLES[1][2][0]), cfg.vision)  # tiles 0 and 1 kept
    batch = packed_batch(cfg, SAMPLES)
    with torch.no_grad():
        embeds = model.embed(batch)
    segments = image_blocks(embeds, model, slice(*batch.layout.cu_seqlens[1:3].tolist()))[0]
    encoders = reference_encoders(cfg.vision, model.vision.dinov2.state_dict(),
                                  model.vision.convnext.state_dict())
    features = reference_features(*encoders, tiled.dinov2_pixels, tiled.convnext_pixels)
    proj = model.projector
    want = reference_rows(*features, proj.proj.weight, proj.proj.bias, proj.norm)
    views = [rows for kind, rows in segments if kind == "view"]
    assert len(views) == 3
    for view, (rows, expected) in enumerate(zip(views, want, strict=True)):
        torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5, msg=f"view {view}")


def test_packed_logits_equal_each_sample_alone(model):
    with torch.no_grad():
        packed = model.logits(packed_batch(model.config, SAMPLES))
        cu = packed_batch(model.config, SAMPLES).layout.cu_seqlens.tolist()
        for index, sample in enumerate(SAMPLES):
            alone = model.logits(packed_batch(model.config, [sample]))
            torch.testing.assert_close(packed[cu[index]:cu[index + 1]], alone, rtol=1e-5,
                                       atol=1e-5)


def test_bad_batches_name_the_problem(model):
    batch = packed_batch(model.config, SAMPLES)
    with pytest.raises(TypeError, match="batch"):
        model.embed(batch.layout)
    short = sm.PackedBatch(batch.layout, batch.dinov2_pixels[:-1], batch.convnext_pixels[:-1],
                           batch.max_seqlen)
    with pytest.raises(ValueError, match="visual rows"):
        model.embed(short)
