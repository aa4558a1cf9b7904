"""SphinxX checkpoints: save_pretrained / from_pretrained round trips bit-exactly (one file or
shards, tied embeddings, a dtype cast), errors name the keys; building on the meta device."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import sphinx_model as sm
from tests.model.vision_reference import randomised


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomised(sm.SphinxX(sm.preset("tiny")), seed=3)  # every tensor distinct from init


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_round_trip_is_bit_exact(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json",
                                                                     "model.safetensors"]
    loaded = sm.SphinxX.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert_same_state(model, loaded)
    assert torch.equal(loaded.llm.rotary_cos, model.llm.rotary_cos)  # rebuilt, not saved
    assert not loaded.vision.training
    assert not any(p.requires_grad for p in loaded.vision.parameters())
    # Saving again over it replaces it; no temporary directory is left behind.
    loaded.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_sharded_and_cast(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_bytes=4 << 20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_same_state(model, sm.SphinxX.from_pretrained(tmp_path))
    half = sm.SphinxX.from_pretrained(tmp_path, dtype=torch.float16)
    for key, tensor in half.state_dict().items():
        assert tensor.dtype == torch.float16, key
        assert torch.equal(tensor, model.state_dict()[key].half()), key


def test_tied_embeddings(tmp_path):
    cfg = sm.preset("tiny-dense")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, tie_word_embeddings=True))
    model = sm.SphinxX(cfg)
    model.save_pretrained(tmp_path)
    assert "llm.lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    loaded = sm.SphinxX.from_pretrained(tmp_path)
    assert loaded.llm.lm_head.weight is loaded.llm.embed_tokens.weight
    assert_same_state(model, loaded)


def test_errors_name_the_key(model, tmp_path):
    model.save_pretrained(tmp_path)
    file = str(tmp_path / "model.safetensors")
    state = load_file(file)
    save_file({k: v for k, v in state.items() if k != "skip_token"}, file)
    with pytest.raises(ValueError, match="missing keys: skip_token"):
        sm.SphinxX.from_pretrained(tmp_path)
    save_file({**state, "projector.extra": torch.zeros(1)}, file)
    with pytest.raises(ValueError, match=r"unexpected keys: projector\.extra"):
        sm.SphinxX.from_pretrained(tmp_path)
    save_file({**state, "image_end": torch.zeros(3)}, file)
    with pytest.raises(ValueError, match=r"image_end has shape \(3,\)"):
        sm.SphinxX.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        sm.SphinxX.from_pretrained(tmp_path / "nowhere")


def test_meta_build_then_init_weights():
    with torch.device("meta"):
        model = sm.SphinxX(sm.preset("tiny"))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    for name, tensor in model.state_dict().items():
        assert bool(torch.isfinite(tensor).all()), name
    assert bool(model.projector.norm.weight.eq(1).all()) and bool(model.skip_token.ne(0).all())
    assert torch.equal(model.llm.rotary_cos[0], torch.ones_like(model.llm.rotary_cos[0]))
