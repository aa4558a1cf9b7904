"""Import of a whole SPHINX model from a synthetic LLaMA2-Accessory checkpoint: two model-parallel
shards holding a transformers Mixtral's weights in Accessory's layout, tiny timm encoders in the
reference's layouts (open_clip trunk, original DINOv2) and the reference's visual_proj / image
markers; every tensor lands where it belongs, exactly."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import sphinx_model as sm
from sphinx_model import accessory
from sphinx_model.accessory_sphinx import load_accessory_sphinx
from sphinx_model.checkpoints import UnsafeCheckpointError
from sphinx_model.vision import VisionTower
from tests.model.test_accessory import _accessory_state, _write_shards
from tests.model.test_checkpoints import SIZES, _hf_model
from tests.model.vision_reference import original_dinov2, randomised

P = accessory.ACCESSORY_PREFIX
VISION = sm.preset("tiny").vision
HIDDEN = SIZES["hidden_size"]
PARAMS = {"n_heads": SIZES["num_attention_heads"], "rope_theta": 1e6, "norm_eps": 1e-5}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(the Accessory state dict, the transformers-loaded LLM, the encoders' source tower)."""
    root = tmp_path_factory.mktemp("accessory")
    hf = _hf_model("mixtral")
    hf.save_pretrained(root / "hf")
    llm = sm.load_hf_llm(root / "hf")
    tower = randomised(VisionTower(VISION), seed=4)
    gen = torch.Generator().manual_seed(5)
    state = _accessory_state(llm)
    state.update({
        P + "visual_proj.0.weight": torch.randn(HIDDEN, 192 + 48, generator=gen),
        P + "visual_proj.0.bias": torch.randn(HIDDEN, generator=gen),
        P + "visual_proj.1.weight": torch.randn(HIDDEN, generator=gen),
        P + "visual_proj.1.bias": torch.randn(HIDDEN, generator=gen),
        P + "start_img": torch.rand(1, 1, HIDDEN, generator=gen),
        P + "end_img": torch.rand(1, 1, HIDDEN, generator=gen)})
    convnext = tower.convnext.state_dict()
    state.update({f"{P}openclip_convnext_xxl.{k}": v for k, v in convnext.items()})
    dinov2 = original_dinov2(tower.dinov2.state_dict(), grid=7)
    state.update({f"{P}dinov2_vitg14.{k}": v for k, v in dinov2.items()})
    return state, llm, tower, dinov2


def config(state):
    llm = accessory.accessory_llm_config(state, PARAMS)
    return sm.SphinxConfig(vision=VISION, llm=llm)


def test_import_maps_every_tensor_exactly(source, tmp_path):
    state, llm, tower, dinov2 = source
    directory = _write_shards(state, tmp_path / "sphinx", shards=2, experts=4)
    model = load_accessory_sphinx(directory, config(state))
    for key, tensor in llm.state_dict().items():
        if not key.startswith("rotary_"):
            assert torch.equal(model.llm.state_dict()[key], tensor), key
    weight = state[P + "visual_proj.0.weight"]  # ConvNeXt's 192 columns first, then DINOv2's 48
    assert torch.equal(model.projector.proj.weight[:, :48], weight[:, 192:])
    assert torch.equal(model.projector.proj.weight[:, 48:], weight[:, :192])
    assert torch.equal(model.projector.proj.bias, state[P + "visual_proj.0.bias"])
    assert torch.equal(model.projector.norm.weight, state[P + "visual_proj.1.weight"])
    assert torch.equal(model.projector.norm.bias, state[P + "visual_proj.1.bias"])
    assert torch.equal(model.image_begin, state[P + "start_img"].flatten())
    assert torch.equal(model.image_end, state[P + "end_img"].flatten())
    for key, tensor in tower.convnext.state_dict().items():
        assert torch.equal(model.vision.convnext.state_dict()[key], tensor), key
    loaded = VisionTower(VISION)
    loaded.load_weights(dinov2=dinov2)  # the original layout, its position grid resampled
    for key, tensor in loaded.dinov2.state_dict().items():
        assert torch.equal(model.vision.dinov2.state_dict()[key], tensor), key
    skip = model.skip_token  # absent from the reference: initialised
    assert skip.shape == (HIDDEN,) and bool(((skip >= 0) & (skip < 1)).all())
    assert not any(p.requires_grad for p in model.vision.parameters())
    half = load_accessory_sphinx(directory, config(state), dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())


def test_errors_name_the_key(source, tmp_path):
    state, *_ = source
    cfg = config(state)
    extra = _write_shards({**state, P + "clip.proj": torch.zeros(2)}, tmp_path / "extra",
                          experts=4)
    with pytest.raises(ValueError, match=r"unexpected keys llma\.clip\.proj"):
        load_accessory_sphinx(extra, cfg)
    missing = _write_shards({k: v for k, v in state.items() if k != P + "end_img"},
                            tmp_path / "missing", experts=4)
    with pytest.raises(ValueError, match=r"missing key 'llma\.end_img'"):
        load_accessory_sphinx(missing, cfg)
    wider = dataclasses.replace(cfg, vision=dataclasses.replace(
        VISION, dinov2_kwargs={**VISION.dinov2_kwargs, "depth": 3}))
    with pytest.raises(ValueError, match=r"missing keys: blocks\.2\."):
        load_accessory_sphinx(_write_shards(state, tmp_path / "full", experts=4), wider)


class _Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_code_in_a_shard_is_refused(source, tmp_path, capsys):
    state, *_ = source
    directory = tmp_path / "evil"
    directory.mkdir()
    torch.save({"model": {P + "start_img": _Payload()}},
               directory / "consolidated.00-of-01.model.pth")
    with pytest.raises(UnsafeCheckpointError):
        load_accessory_sphinx(directory, config(state))
    assert "this ran" not in capsys.readouterr().out
