"""sphinx-mix: a checkpoint mixed with itself, and --beta 1, give it back bit for bit; other betas
give beta * A + (1 - beta) * B in A's dtype; different keys or shapes are refused by name; A's other
files are carried over."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import sphinx_model as sm
from sphinx_model.checkpoints import SafetensorsDir
from sphinx_model.mix import main, mix_checkpoints
from tests.model.common import TINY_DENSE, TINY_MOE


def tensors(path) -> dict[str, torch.Tensor]:
    return dict(SafetensorsDir(path).items())


def assert_bit_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert tensor.dtype == b[key].dtype, key
        assert torch.equal(tensor.view(torch.uint8), b[key].view(torch.uint8)), key


@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    """Two Hugging Face directories of one architecture (bfloat16) and one of another."""
    root = tmp_path_factory.mktemp("mix")
    for name, cfg, seed in (("a", TINY_MOE, 0), ("b", TINY_MOE, 1), ("dense", TINY_DENSE, 0)):
        torch.manual_seed(seed)
        sm.save_hf_llm(sm.LLM(cfg).to(torch.bfloat16), root / name)
    (root / "a" / "tokenizer.json").write_text("{}")
    return root


def test_self_mix_and_beta_one_return_a_bit_for_bit(llms, tmp_path):
    a = tensors(llms / "a")
    mix_checkpoints(llms / "a", llms / "a", 0.3, tmp_path / "self")
    assert_bit_equal(tensors(tmp_path / "self"), a)
    assert main([str(llms / "a"), str(llms / "b"), "--beta", "1", "--output",
                 str(tmp_path / "one")]) == 0
    assert_bit_equal(tensors(tmp_path / "one"), a)
    # A's other files come along.
    assert (tmp_path / "one" / "tokenizer.json").read_text() == "{}"
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config == json.loads((llms / "a" / "config.json").read_text())
    assert sm.load_hf_llm(tmp_path / "one").config == sm.load_hf_llm(llms / "a").config


def test_mix_is_the_weighted_sum(llms, tmp_path):
    mix_checkpoints(llms / "a", llms / "b", 0.25, tmp_path / "mixed")
    a, b, mixed = tensors(llms / "a"), tensors(llms / "b"), tensors(tmp_path / "mixed")
    for key, tensor in mixed.items():
        expected = (0.25 * a[key].double() + 0.75 * b[key].double()).to(torch.bfloat16)
        assert torch.equal(tensor, expected), key
    embed = "model.embed_tokens.weight"
    assert not torch.equal(mixed[embed], a[embed]) and not torch.equal(mixed[embed], b[embed])


def test_sphinx_checkpoint_mixes_with_itself(tmp_path):
    torch.manual_seed(0)
    sm.SphinxX(sm.preset("tiny-dense")).save_pretrained(tmp_path / "sphinx")
    mix_checkpoints(tmp_path / "sphinx", tmp_path / "sphinx", 0.5, tmp_path / "mixed")
    assert_bit_equal(tensors(tmp_path / "mixed"), tensors(tmp_path / "sphinx"))
    assert (tmp_path / "mixed" / "config.json").read_bytes() == \
        (tmp_path / "sphinx" / "config.json").read_bytes()


def test_mismatches_are_refused_by_key(llms, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"only in .*a: .*block_sparse_moe"):
        mix_checkpoints(llms / "a", llms / "dense", 0.5, tmp_path / "out")
    # Same keys, one shape differs.
    wide = tmp_path / "wide"
    wide.mkdir()
    state = load_file(llms / "a" / "model.safetensors")
    state["model.norm.weight"] = torch.ones(7, dtype=torch.bfloat16)
    save_file(state, wide / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight: shape \(32,\)"):
        mix_checkpoints(llms / "a", wide, 0.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for argv in ([str(llms / "a"), str(wide)], [str(llms / "a"), str(llms / "a"), "--beta", "2"],
                 [str(llms / "a"), str(tmp_path / "missing")]):
        assert main([*argv, "--output", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("sphinx-mix: error: ") and err.count("\n") == 1
    with pytest.raises(ValueError, match="--output"):
        mix_checkpoints(llms / "a", llms / "b", 0.5, llms / "b")
