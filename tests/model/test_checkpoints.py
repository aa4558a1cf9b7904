"""Hugging Face checkpoints: tiny random transformers Llama (GQA) and Mixtral load through
load_hf_llm and give transformers' logits; save_hf_llm's output loads back into transformers; sharded
files; InternLM2's layout; errors that name the key; atomic writes."""
import json
import shutil
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import sphinx_model as sm
from sphinx_model import checkpoints
from tests.model.common import pack, relative_error

SIZES = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def _hf_model(kind):
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES))
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **SIZES, num_local_experts=4, num_experts_per_tok=2))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{kind: (transformers model, its save_pretrained directory)}."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in ("llama", "mixtral"):
        model = _hf_model(kind)
        model.save_pretrained(root / kind)
        out[kind] = (model, root / kind)
    return out


def _hf_logits(model, sample):
    with torch.no_grad():
        return model(sample[None]).logits[0]


def _prompts(lengths=(5, 1, 9, 3), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SIZES["vocab_size"], (n,), generator=generator) for n in lengths]


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_packed_logits_equal_transformers_and_the_export_loads_back(kind, hf_dirs, tmp_path):
    model, path = hf_dirs[kind]
    llm = sm.load_hf_llm(path)
    assert llm.config.arch == kind and llm.config.num_kv_heads == 2
    prompts = _prompts()
    ids, cu = pack(prompts)
    with torch.no_grad():
        logits = llm(ids, cu)
    for b, prompt in enumerate(prompts):
        assert relative_error(logits[cu[b]:cu[b + 1]], _hf_logits(model, prompt)) <= 1e-5

    sm.save_hf_llm(llm, tmp_path / "export")
    reloaded = type(model).from_pretrained(tmp_path / "export").eval()
    assert torch.equal(_hf_logits(reloaded, prompts[2]), _hf_logits(model, prompts[2]))


def _assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_sharded_files_load_and_save(hf_dirs, tmp_path, reference_kernels):
    model, path = hf_dirs["mixtral"]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    llm = sm.load_hf_llm(tmp_path / "sharded")
    _assert_same_weights(llm, sm.load_hf_llm(path))

    sm.save_hf_llm(llm, tmp_path / "ours", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]
    _assert_same_weights(transformers.MixtralForCausalLM.from_pretrained(tmp_path / "ours"), model)


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="transformers 5.x's fused expert layout")
def test_transformers_fused_expert_layout_loads(hf_dirs, tmp_path):
    model, path = hf_dirs["mixtral"]
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(
        tmp_path / "fused" / "model.safetensors")
    _assert_same_weights(sm.load_hf_llm(tmp_path / "fused"), sm.load_hf_llm(path))


def _rope_theta(config):
    """transformers 5.x keeps it in rope_parameters, 4.x in rope_theta."""
    return (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or config.rope_theta


def _write_internlm2(llama, directory):
    """``llama``'s weights in InternLM2's published layout and config.json field names."""
    cfg, state = llama.config, llama.state_dict()
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    groups = heads // kv_heads
    tensors = {"model.tok_embeddings.weight": state["model.embed_tokens.weight"],
               "model.norm.weight": state["model.norm.weight"], "output.weight": state["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, attn, mlp = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        q = state[attn + "q_proj.weight"].view(kv_heads, groups, dim, -1)
        k = state[attn + "k_proj.weight"].view(kv_heads, 1, dim, -1)
        v = state[attn + "v_proj.weight"].view(kv_heads, 1, dim, -1)
        tensors[p + "attention.wqkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, cfg.hidden_size)
        tensors[p + "attention.wo.weight"] = state[attn + "o_proj.weight"]
        tensors[p + "feed_forward.w1.weight"] = state[mlp + "gate_proj.weight"]
        tensors[p + "feed_forward.w3.weight"] = state[mlp + "up_proj.weight"]
        tensors[p + "feed_forward.w2.weight"] = state[mlp + "down_proj.weight"]
        tensors[p + "attention_norm.weight"] = state[p + "input_layernorm.weight"]
        tensors[p + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
              "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
              "bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
              "hidden_act": "silu", "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size,
              "max_position_embeddings": cfg.max_position_embeddings,
              "num_attention_heads": heads, "num_hidden_layers": cfg.num_hidden_layers,
              "num_key_value_heads": kv_heads, "rms_norm_eps": cfg.rms_norm_eps,
              "rope_scaling": {"type": "dynamic", "factor": 2.0},
              "rope_theta": _rope_theta(cfg), "tie_word_embeddings": False,
              "torch_dtype": "float32", "vocab_size": cfg.vocab_size, "attn_implementation": "eager"}
    (directory / "config.json").write_text(json.dumps(config))


def test_internlm2_layout_gives_the_llamas_logits(hf_dirs, tmp_path, reference_kernels):
    model, _ = hf_dirs["llama"]
    _write_internlm2(model, tmp_path / "internlm2")
    llm = sm.load_hf_llm(tmp_path / "internlm2")
    assert llm.config.arch == "internlm2"
    prompts = _prompts((6, 2, 8), seed=1)
    ids, cu = pack(prompts)
    with torch.no_grad():
        logits = llm(ids, cu)
    for b, prompt in enumerate(prompts):
        assert relative_error(logits[cu[b]:cu[b + 1]], _hf_logits(model, prompt)) <= 1e-5


def _edited_copy(source, target, edit=None, config=None):
    shutil.copytree(source, target)
    if edit is not None:
        tensors = load_file(target / "model.safetensors")
        edit(tensors)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        hf = json.loads((target / "config.json").read_text())
        hf.update(config)
        (target / "config.json").write_text(json.dumps(hf))
    return target


def test_bad_checkpoints_are_errors_naming_the_key(hf_dirs, tmp_path):
    _, path = hf_dirs["mixtral"]
    expert = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    cases = {
        "missing": (lambda t: t.pop(expert), None, ValueError, expert),
        "unexpected": (lambda t: t.update(extra=torch.zeros(1)), None, ValueError, "'extra'"),
        "shape": (None, {"intermediate_size": 40}, ValueError, "experts.0.w1.weight|mlp.w1"),
        "dtype": (lambda t: t.update({"model.norm.weight": torch.zeros(32, dtype=torch.int32)}),
                  None, TypeError, "model.norm.weight"),
        "rope": (None, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, ValueError,
                 "yarn"),
        "model_type": (None, {"model_type": "gpt2"}, ValueError, "model_type"),
    }
    for name, (edit, config, error, match) in cases.items():
        broken = _edited_copy(path, tmp_path / name, edit, config)
        with pytest.raises(error, match=match):
            sm.load_hf_llm(broken)
    pickled = _edited_copy(path, tmp_path / "bin")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        sm.load_hf_llm(pickled)


def test_mistral_sliding_window_caps_the_positions():
    hf = {"model_type": "mistral", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "sliding_window": 64, "max_position_embeddings": 128, "rope_theta": 1e6}
    with pytest.warns(UserWarning, match="sliding_window"):
        cfg = checkpoints.llm_config_from_hf(hf)
    assert (cfg.arch, cfg.max_position_embeddings, cfg.rope_theta) == ("llama", 64, 1e6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoints.llm_config_from_hf({**hf, "sliding_window": None}).num_kv_heads == 2


def test_load_dtype_and_atomic_save(hf_dirs, tmp_path, monkeypatch):
    _, path = hf_dirs["llama"]
    llm = sm.load_hf_llm(path, dtype=torch.float16)
    assert {p.dtype for p in llm.parameters()} == {torch.float16}
    target = tmp_path / "export"
    sm.save_hf_llm(llm, target)
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "float16"
    before = (target / "model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        sm.save_hf_llm(sm.load_hf_llm(path), target)
    assert (target / "model.safetensors").read_bytes() == before  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left behind


def test_tied_embeddings_load_and_save(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES,
                                                                   tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "hf")
    llm = sm.load_hf_llm(tmp_path / "hf")
    assert llm.config.tie_word_embeddings and llm.lm_head.weight is llm.embed_tokens.weight
    assert torch.equal(llm.lm_head.weight, model.lm_head.weight)
    sm.save_hf_llm(llm, tmp_path / "ours")
    assert "lm_head.weight" not in load_file(tmp_path / "ours" / "model.safetensors")
    _assert_same_weights(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours"), model)
    with torch.device("meta"):
        meta = sm.LLM(llm.config)
    meta.to_empty(device="cpu")
    assert meta.lm_head.weight is meta.embed_tokens.weight
