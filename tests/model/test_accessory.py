"""LLaMA2-Accessory import: model-parallel shards built from transformers models' weights, split as
Accessory's parallel layers split them, merge back exactly and map onto the LLM; the rotary
permutation keeps every attention score; code in a pickle is refused and never run; missing keys
are named."""
import os
import re

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import sphinx_model as sm
from sphinx_model import accessory
from sphinx_model.checkpoints import UnsafeCheckpointError
from tests.model.common import TINY_DENSE
from tests.model.test_checkpoints import SIZES, _hf_model

P = accessory.ACCESSORY_PREFIX
COLUMN = r"layers\.\d+\.(attention\.w[qkv]|feed_forward\.w[13])\.weight|output\.weight"
ROW = r"layers\.\d+\.(attention\.wo|feed_forward\.w2)\.weight|tok_embeddings\.weight"


def _interleave(weight, heads):
    """Hugging Face half-split q/k rows -> Meta / Accessory interleaved rows (row 2i + c of a head
    is half-split row c * D/2 + i)."""
    rows, hidden = weight.shape
    return weight.view(heads, 2, rows // heads // 2, hidden).transpose(1, 2).reshape(rows, hidden)


def _accessory_state(llm):
    """An LLM's weights under Accessory's names and layouts, plus two of the multimodal model's keys
    (left alone by the LLM import)."""
    cfg, state = llm.config, llm.state_dict()
    out = {P + "tok_embeddings.weight": state["embed_tokens.weight"],
           P + "norm.weight": state["norm.weight"], P + "output.weight": state["lm_head.weight"],
           P + "visual_proj.0.weight": torch.randn(cfg.hidden_size, 8),
           P + "start_img": torch.randn(1, 1, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"{P}layers.{i}."
        heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads}
        for ours, theirs in zip("qkvo", ("wq", "wk", "wv", "wo")):
            weight = state[src + f"self_attn.{ours}_proj.weight"]
            out[dst + f"attention.{theirs}.weight"] = (_interleave(weight, heads[ours])
                                                       if ours in heads else weight)
        out[dst + "attention_norm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = state[src + "post_attention_layernorm.weight"]
        if cfg.num_experts:  # Accessory keeps each [E, F, H] stack flat, w2 in x @ w2 form
            out[dst + "feed_forward.gate.weight"] = state[src + "mlp.router.weight"]
            for name in ("w1", "w3", "w2"):
                w = state[src + f"mlp.{name}"]
                w = w.transpose(1, 2) if name == "w2" else w
                out[dst + f"feed_forward.{name}.weight"] = w.reshape(-1, cfg.hidden_size)
        else:
            for theirs, ours in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[dst + f"feed_forward.{theirs}.weight"] = state[src + f"mlp.{ours}.weight"]
    return out


def _write_shards(state, directory, shards=2, experts=0):
    """Splits as fairscale's ColumnParallelLinear (dim 0), RowParallelLinear / ParallelEmbedding
    (dim 1) and Accessory's sparse MoE (each expert's rows) do; saves each rank's file."""
    directory.mkdir()
    parts = [{} for _ in range(shards)]
    for key, tensor in state.items():
        name = key[len(P):]
        if experts and re.fullmatch(r"layers\.\d+\.feed_forward\.w[123]\.weight", name):
            pieces = [p.reshape(-1, tensor.shape[1])
                      for p in tensor.view(experts, -1, tensor.shape[1]).chunk(shards, dim=1)]
        elif re.fullmatch(COLUMN, name):
            pieces = tensor.chunk(shards, dim=0)
        elif re.fullmatch(ROW, name):
            pieces = tensor.chunk(shards, dim=1)
        else:
            pieces = [tensor] * shards
        for part, piece in zip(parts, pieces):
            part[key] = piece.clone()
    for rank, part in enumerate(parts):  # rank 1 in torch's legacy format (not memory-mappable)
        torch.save({"model": part}, directory / f"consolidated.{rank:02d}-of-{shards:02d}.model.pth",
                   _use_new_zipfile_serialization=rank != 1)
    return directory


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_shards_merge_exactly_and_map_onto_the_llm(kind, tmp_path):
    model = _hf_model(kind)
    model.save_pretrained(tmp_path / "hf")
    llm = sm.load_hf_llm(tmp_path / "hf")  # transformers' weights, under our names
    expected = llm.state_dict()
    state = _accessory_state(llm)
    experts = llm.config.num_experts
    directory = _write_shards(state, tmp_path / "accessory", experts=experts)

    merged = accessory.load_accessory_shards(directory)
    assert merged.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(merged[key], tensor), key

    params = {"n_heads": SIZES["num_attention_heads"], "norm_eps": llm.config.rms_norm_eps,
              "rope_theta": llm.config.rope_theta}
    cfg = accessory.accessory_llm_config(merged, params)
    assert (cfg.arch, cfg.num_kv_heads, cfg.intermediate_size, cfg.num_experts) == \
        (kind, 2, SIZES["intermediate_size"], experts)
    ours = accessory.accessory_llm_state_dict(merged, cfg)
    assert ours.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(ours[key], tensor), key
    assert set(state) - set(accessory.accessory_llm_keys(cfg)) == {
        P + "visual_proj.0.weight", P + "start_img"}
    llm = accessory.load_accessory_llm(directory, params)
    for key, tensor in expected.items():
        assert torch.equal(llm.state_dict()[key], tensor), key


def test_rotary_permutation_keeps_every_attention_score():
    """Accessory's interleaved (complex) rotary on its q/k rows and transformers' half-split rotary
    on ours give the same scores q . k for every head pair and position pair."""
    torch.manual_seed(0)
    heads, dim, hidden, rows, theta = 2, 8, 16, 5, 1e4
    w = torch.randn(heads * dim, hidden, dtype=torch.float64)
    x = torch.randn(rows, hidden, dtype=torch.float64)
    theirs = (x @ _interleave(w, heads).T).view(rows, heads, dim // 2, 2)
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(rows, dtype=torch.float64), freqs)
    rotated = torch.view_as_real(torch.view_as_complex(theirs) * torch.polar(
        torch.ones_like(angles), angles)[:, None]).flatten(2)
    ours = (x @ w.T).view(rows, heads, dim).transpose(0, 1)[None]
    cos, sin = torch.cat([angles, angles], 1).cos(), torch.cat([angles, angles], 1).sin()
    ours, _ = apply_rotary_pos_emb(ours, ours, cos[None], sin[None])
    torch.testing.assert_close(torch.einsum("qhd,khd->hqk", rotated, rotated),
                               torch.einsum("hqd,hkd->hqk", ours[0], ours[0]))


class _Payload:
    """Unpickling this would create a directory: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_code_in_a_pickle_is_refused_and_never_run(tmp_path):
    directory = _write_shards(_accessory_state(sm.LLM(TINY_DENSE)), tmp_path / "accessory")
    shard = directory / "consolidated.01-of-02.model.pth"
    marker = tmp_path / "payload-ran"
    torch.save({"model": {"x": torch.zeros(1)}, "hook": _Payload(marker)}, shard)
    with pytest.raises(UnsafeCheckpointError, match="consolidated.01-of-02"):
        accessory.load_accessory_shards(directory)
    assert not marker.exists()


def test_missing_keys_and_shards_are_named(tmp_path):
    state = _accessory_state(sm.LLM(TINY_DENSE))
    params = {"n_heads": SIZES["num_attention_heads"]}
    gone = P + "layers.1.ffn_norm.weight"
    merged = accessory.load_accessory_shards(_write_shards(
        {k: v for k, v in state.items() if k != gone}, tmp_path / "a"))
    with pytest.raises(ValueError, match=re.escape(gone)):
        accessory.accessory_llm_state_dict(merged, accessory.accessory_llm_config(merged, params))
    with pytest.raises(ValueError, match="unexpected LLM keys.*layers.0.attention.extra"):
        accessory.accessory_llm_state_dict(
            {**state, P + "layers.0.attention.extra": torch.zeros(1)},
            accessory.accessory_llm_config(state, params))

    directory = _write_shards(state, tmp_path / "b")
    torch.save({"model": {k: v for k, v in state.items() if k != gone}},
               directory / "consolidated.01-of-02.model.pth")
    with pytest.raises(ValueError, match=re.escape(gone)):
        accessory.load_accessory_shards(directory)
    (directory / "consolidated.01-of-02.model.pth").unlink()
    with pytest.raises(ValueError, match="consolidated.01-of-02.model.pth"):
        accessory.load_accessory_shards(directory)
