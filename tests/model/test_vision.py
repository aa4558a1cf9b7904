"""The frozen vision tower against timm's own encoders (as the SPHINX reference runs them), weight
loading in the original DINOv2 and open_clip layouts, refusal of unsafe files, FLOPs."""
from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import sphinx_model as sm
from sphinx_model.vision import VisionTower, load_state_file
from tests.model.vision_reference import (
    original_dinov2,
    randomised,
    reference_encoders,
    reference_features,
)

VISION = sm.preset("tiny").vision


@pytest.fixture(scope="module")
def tower():
    return randomised(VisionTower(VISION), seed=0)


def test_features_equal_timm_forward_as_the_reference_runs_it(tower):
    gen = torch.Generator().manual_seed(1)
    views = 3
    d_pix = torch.randint(0, 256, (views, 3, 56, 56), generator=gen, dtype=torch.uint8)
    c_pix = torch.randint(0, 256, (views, 3, 128, 128), generator=gen, dtype=torch.uint8)
    tokens, maps = tower(d_pix, c_pix)
    encoders = reference_encoders(VISION, tower.dinov2.state_dict(), tower.convnext.state_dict())
    want_tokens, want_maps = reference_features(*encoders, d_pix, c_pix)
    assert tokens.shape == (views, 1 + 4 * 4, 48) and maps.shape == (views, 192, 4, 4)
    torch.testing.assert_close(tokens, want_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps, want_maps, rtol=1e-5, atol=1e-5)
    # Chunks of views give the same features.
    chunked = tower(d_pix, c_pix, chunk_views=2)
    torch.testing.assert_close(chunked[0], tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[1], maps, rtol=1e-5, atol=1e-5)


def test_frozen(tower):
    tower.train()
    assert not tower.training and not tower.dinov2.training and not tower.convnext.training
    assert not any(p.requires_grad for p in tower.parameters())
    with torch.enable_grad():
        tokens, maps = tower(torch.zeros(1, 3, 56, 56, dtype=torch.uint8),
                             torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    assert not tokens.requires_grad and not maps.requires_grad
    empty = tower(torch.zeros(0, 3, 56, 56, dtype=torch.uint8),
                  torch.zeros(0, 3, 128, 128, dtype=torch.uint8))
    assert empty[0].shape == (0, 17, 48) and empty[1].shape == (0, 192, 4, 4)


def test_bad_pixels_name_the_argument(tower):
    good_d, good_c = (torch.zeros(1, 3, 56, 56, dtype=torch.uint8),
                      torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    with pytest.raises(TypeError, match="dinov2_pixels"):
        tower(good_d.float(), good_c)
    with pytest.raises(ValueError, match="convnext_pixels"):
        tower(good_d, good_c[..., :64])
    with pytest.raises(ValueError, match="views"):
        tower(good_d, torch.cat([good_c, good_c]))
    with pytest.raises(ValueError, match="chunk_views"):
        tower(good_d, good_c, chunk_views=0)


def test_loads_original_dinov2_and_open_clip_files(tmp_path):
    source = randomised(VisionTower(VISION), seed=2)
    tower = VisionTower(VISION)
    dinov2 = original_dinov2(source.dinov2.state_dict(), grid=9)
    open_clip = {f"visual.trunk.{k}": v for k, v in source.convnext.state_dict().items()}
    open_clip.update({"visual.head.proj.weight": torch.randn(32, 192),  # CLIP's head, text tower
                      "text.token_embedding.weight": torch.randn(10, 32),
                      "logit_scale": torch.ones(())})
    torch.save(dinov2, tmp_path / "dinov2_vitg14.pth")
    save_file(open_clip, str(tmp_path / "open_clip.safetensors"))
    tower.load_weights(dinov2=tmp_path / "dinov2_vitg14.pth",
                       convnext=tmp_path / "open_clip.safetensors")
    for k, v in source.convnext.state_dict().items():
        assert torch.equal(tower.convnext.state_dict()[k], v), k
    loaded = tower.dinov2.state_dict()
    for k, v in source.dinov2.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(loaded[k], v), k
    # DINOv2 resamples its 9x9 position grid at run time (interpolate_pos_encoding: bicubic by the
    # scale factor (4 + 0.1) / 9, no antialias); the tower holds that resampled grid.
    grid = dinov2["pos_embed"][:, 1:].reshape(1, 9, 9, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(4.1 / 9, 4.1 / 9), mode="bicubic")
    want = torch.cat([dinov2["pos_embed"][:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    assert torch.equal(loaded["pos_embed"], want)
    # Through the config's paths at init_weights, too.
    cfg = dataclasses.replace(VISION, dinov2_weights=str(tmp_path / "dinov2_vitg14.pth"))
    with torch.device("meta"):
        meta = VisionTower(cfg)
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert torch.equal(meta.dinov2.state_dict()["pos_embed"], want)


def test_weight_errors_name_the_keys(tmp_path):
    tower = VisionTower(VISION)
    state = tower.convnext.state_dict()
    missing = {k: v for k, v in state.items() if k != "stem.0.weight"}
    with pytest.raises(ValueError, match=r"missing keys: stem\.0\.weight"):
        tower.load_weights(convnext=missing)
    with pytest.raises(ValueError, match=r"unexpected keys: extra\.bias"):
        tower.load_weights(convnext={**state, "extra.bias": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"stem\.0\.bias \[3\]"):
        tower.load_weights(convnext={**state, "stem.0.bias": torch.zeros(3)})
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        tower.load_weights(dinov2=tmp_path / "nowhere.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_pickled_code_is_refused(tmp_path, capsys):
    legacy, zipped = tmp_path / "legacy.pth", tmp_path / "zipped.pth"
    with open(legacy, "wb") as f:
        pickle.dump({"w": _Payload()}, f, protocol=2)
    torch.save({"w": torch.zeros(2), "x": _Payload()}, zipped)
    for path in (legacy, zipped):
        with pytest.raises(ValueError, match="refused to load"):
            load_state_file(path)
    assert "this ran" not in capsys.readouterr().out
    torch.save({"model": {"w": torch.ones(2)}}, zipped)
    assert torch.equal(load_state_file(zipped)["w"], torch.ones(2))


def test_flops_per_view():
    tiny = VisionTower(VISION).flops_per_view()
    assert isinstance(tiny, int) and tiny > 0
    # The real encoders: DINOv2-g/14 at 224 px ~ 2 * 257 tokens * 1.1e9 weights + attention
    # ~ 0.6e12, ConvNeXt-XXL at 512 px ~ 4x its 0.4e12 at 256 px: ~2.2e12 per view.
    real = VisionTower.flops_per_view.__get__(
        type("Tower", (), {"cfg": sm.preset("tinyllama-1.1b").vision})())()
    assert 2.0e12 < real < 2.4e12
