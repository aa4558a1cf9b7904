"""Checkpoints of the decoder: Hugging Face directories in and out, and the safe file helpers every
checkpoint path of the package uses.

Hugging Face LLM directories (``config.json`` plus ``model.safetensors``, or shards listed by
``model.safetensors.index.json``) load with :func:`load_hf_llm`, converted at load:

    Llama, Mistral      model.embed_tokens, model.layers.{i}.self_attn.{q,k,v,o}_proj,
                        model.layers.{i}.mlp.{gate,up,down}_proj, input_layernorm,
                        post_attention_layernorm, model.norm, lm_head (absent when tied)
    Mixtral             as Llama, the MLP being model.layers.{i}.block_sparse_moe.gate and
                        ...block_sparse_moe.experts.{e}.w1/w2/w3 (the files' layout, also written by
                        transformers 5.x), or transformers 5.x's fused in-memory layout
                        ...mlp.gate, ...mlp.experts.gate_up_proj [E, 2F, H], ...mlp.experts.down_proj
    InternLM2           model.tok_embeddings, model.layers.{i}.attention.wqkv (fused, grouped: per
                        kv head h the rows of its G = Hq / Hkv query heads, then its key, then its
                        value head, each D rows), attention.wo, feed_forward.w1 (gate) / w3 (up) /
                        w2 (down), attention_norm, ffn_norm, model.norm, output

:func:`save_hf_llm` writes the Llama or Mixtral layout (an InternLM2 model is written as Llama: the two
compute the same function) with a ``config.json`` that transformers' ``from_pretrained`` reads.
Missing or unexpected keys, a wrong shape or a non-floating dtype are ``ValueError`` / ``TypeError``
naming the key. Hugging Face weights are read from safetensors only; :func:`safe_torch_load` is the
one place the package reads a pickle-based ``.pth`` file (``weights_only=True``: code in the pickle is
refused, never run). Every
checkpoint is written into a temporary directory beside its target and renamed into place
(:func:`atomic_directory`).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sphinx_kernels.nn import moe_mlp_from_mixtral, moe_mlp_to_mixtral
from sphinx_model.config import LLMConfig, validate_llm
from sphinx_model.llm import LLM

__all__ = ["MAX_SHARD_BYTES", "CheckpointReader", "SafetensorsDir", "UnsafeCheckpointError",
           "atomic_directory", "check_llm_weights", "empty_llm", "hf_llm_state_dict",
           "llm_config_from_hf", "llm_config_to_hf", "llm_parameter_shapes", "load_hf_llm",
           "load_llm_weights", "safe_torch_load", "save_hf_llm", "write_safetensors"]

MAX_SHARD_BYTES = 5 << 30        # safetensors files written by save_hf_llm hold at most this
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# Safe files

class UnsafeCheckpointError(ValueError):
    """A pickle-based checkpoint holds something other than tensors and plain containers."""


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, memory-mapped when the file allows it.
    A pickle that would construct any object other than tensors and plain containers (for example
    one that calls a function) raises :class:`UnsafeCheckpointError`; its payload is never run."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: its pickle holds objects other than tensors (loading with "
            f"weights_only=True, nothing in it was run). Details: {error}") from None


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary directory beside ``path``; when the block succeeds it replaces
    ``path`` (an existing directory there is moved aside, then deleted), when it fails it is deleted.
    Readers of ``path`` never see a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class SafetensorsDir(Mapping[str, torch.Tensor]):
    """The tensors of a directory holding ``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``, read lazily (one tensor per ``[key]``, on the CPU)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / SAFE_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.path / SAFE_WEIGHTS).is_file():
            files, weight_map = [SAFE_WEIGHTS], None
        else:
            found = ", ".join(sorted(p.name for p in self.path.iterdir())) if self.path.is_dir() \
                else "not a directory"
            raise FileNotFoundError(f"{self.path}: no {SAFE_WEIGHTS} or {SAFE_INDEX} (found: "
                                    f"{found}); pickle-based .bin / .pth weights are not read, "
                                    "convert them to safetensors first")
        self._handles, self._file_of = {}, {}
        for name in files:
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"{self.path / name}: listed in {SAFE_INDEX} but missing")
            handle = safe_open(str(self.path / name), framework="pt")
            self._handles[name] = handle
            self._file_of.update(dict.fromkeys(handle.keys(), name))
        if weight_map is not None:
            for key, name in weight_map.items():
                if self._file_of.get(key) != name:
                    raise ValueError(f"{self.path}: {SAFE_INDEX} puts {key!r} in {name}, which does "
                                     "not hold it")

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._file_of[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def dtype_of(self, key: str) -> torch.dtype | None:
        """The stored dtype of ``key`` without reading it (None for non-float dtypes)."""
        return _DTYPES.get(self._handles[self._file_of[key]].get_slice(key).get_dtype())


def write_safetensors(tensors: Mapping[str, torch.Tensor], directory: str | os.PathLike,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Writes ``tensors`` into ``directory`` as ``model.safetensors``, or, past ``max_shard_bytes``,
    as ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` (the Hugging
    Face layout). Tensors may be views or live on a GPU: each is copied to the CPU as it is written."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    directory = Path(directory)
    names = ([SAFE_WEIGHTS] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        # clone: safetensors refuses tensors that share storage (stacked experts' views)
        save_file({k: t.detach().to("cpu", copy=True).contiguous() for k, t in shard.items()},
                  str(directory / name), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# config.json

_HF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "mixtral", "internlm2": "internlm2"}
# transformers' defaults where a config.json leaves a field out
_HF_DEFAULTS = {
    "llama": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "mistral": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32},
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32},
    "internlm2": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
}


def llm_config_from_hf(hf: Mapping[str, Any]) -> LLMConfig:
    """An :class:`LLMConfig` from a Hugging Face ``config.json`` (``model_type`` llama, mistral,
    mixtral or internlm2; transformers 4.x or 5.x field names).

    Refused with a ``ValueError`` naming the field: another activation than silu, biases
    (``attention_bias``, ``mlp_bias``, InternLM2's ``bias``), rotary scaling other than ``dynamic``
    (dynamic NTK changes nothing within ``max_position_embeddings``, the most our tables hold), a
    quantization config. A Mistral ``sliding_window`` shorter than ``max_position_embeddings`` caps
    the positions at the window (within it, windowed and full attention agree), with a warning.
    """
    model_type = hf.get("model_type")
    if model_type not in _HF_ARCH:
        raise ValueError(f"config.json: model_type must be one of {sorted(_HF_ARCH)}, got "
                         f"{model_type!r}")
    defaults = _HF_DEFAULTS[model_type]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    for field in ("attention_bias", "mlp_bias", "bias"):
        if hf.get(field):
            raise ValueError(f"config.json: {field} = true is not supported (no biases)")
    if hf.get("quantization_config"):
        raise ValueError("config.json: quantization_config: quantized weights are not supported")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ("default", "dynamic"):
        raise ValueError(f"config.json: rope scaling {rope_type!r} is not supported (default, "
                         "dynamic)")
    max_positions = hf.get("max_position_embeddings", defaults["max_position_embeddings"])
    window = hf.get("sliding_window")
    if window is not None and window < max_positions:
        warnings.warn(f"config.json: sliding_window = {window} < max_position_embeddings = "
                      f"{max_positions}; positions are capped at the window", stacklevel=2)
        max_positions = window
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id", 2)
    return LLMConfig(
        arch=_HF_ARCH[model_type], vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"],
        num_experts=hf.get("num_local_experts", 0) if model_type == "mixtral" else 0,
        top_k=hf.get("num_experts_per_tok", 2),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))),
        rms_norm_eps=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id", 1),
        eos_token_id=eos[0] if isinstance(eos, list) else eos)


def llm_config_to_hf(cfg: LLMConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` in the Llama (dense) or Mixtral (MoE) layout; the fields of both
    transformers 4.x (``rope_theta``, ``torch_dtype``) and 5.x read it."""
    moe = cfg.num_experts > 0
    hf: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if moe else "LlamaForCausalLM"],
        "model_type": "mixtral" if moe else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if moe:
        hf.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                  sliding_window=None)
    else:
        hf.update(attention_bias=False, mlp_bias=False)
    return hf


# ---------------------------------------------------------------------------------------------------
# State dicts

class CheckpointReader(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors that remembers which keys were read, so that the rest can be reported
    as unexpected; a missing key or a non-float tensor is an error naming it."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], where: str):
        self.tensors, self.where, self.used = tensors, where, set()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ValueError(f"{self.where}: missing key {key!r}")
        self.used.add(key)
        tensor = self.tensors[key]
        if not tensor.is_floating_point():
            raise TypeError(f"{self.where}: {key!r} has dtype {tensor.dtype}, expected a "
                            "floating-point tensor")
        return tensor

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def check_all_used(self, ignored_suffixes: tuple[str, ...] = ()) -> None:
        unused = sorted(k for k in self.tensors if k not in self.used
                        and not k.endswith(ignored_suffixes))
        if unused:
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            raise ValueError(f"{self.where}: unexpected keys {unused[:5]}{more}")


def hf_llm_state_dict(tensors: Mapping[str, torch.Tensor], cfg: LLMConfig,
                      where: str = "checkpoint") -> Iterator[tuple[str, torch.Tensor, str]]:
    """Converts a Hugging Face checkpoint's tensors (Llama / Mistral / Mixtral / InternLM2 layout, as
    ``cfg.arch`` says) to :class:`~sphinx_model.LLM` names, lazily: yields ``(our key, tensor, source
    key)``, reading one source tensor (one layer's experts) at a time. Unexpected keys raise once all
    are read (``rotary_emb.inv_freq`` buffers of old checkpoints are ignored)."""
    reader = CheckpointReader(tensors, where)
    internlm = cfg.arch == "internlm2"
    embed, final_norm, head = (("model.tok_embeddings.weight", "model.norm.weight", "output.weight")
                               if internlm else
                               ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"))
    yield "embed_tokens.weight", reader[embed], embed
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        if internlm:
            key = src + "attention.wqkv.weight"
            for name, tensor in zip("qkv", _split_internlm2_wqkv(reader[key], cfg, key)):
                yield dst + f"self_attn.{name}_proj.weight", tensor, key
            pairs = [("attention.wo", "self_attn.o_proj"), ("attention_norm", "input_layernorm"),
                     ("ffn_norm", "post_attention_layernorm"), ("feed_forward.w1", "mlp.gate_proj"),
                     ("feed_forward.w3", "mlp.up_proj"), ("feed_forward.w2", "mlp.down_proj")]
        else:
            pairs = [(f"self_attn.{n}_proj", f"self_attn.{n}_proj") for n in "qkvo"]
            pairs += [(n, n) for n in ("input_layernorm", "post_attention_layernorm")]
            if cfg.num_experts:
                yield from _mixtral_experts(reader, src, dst)
            else:
                pairs += [(f"mlp.{n}_proj", f"mlp.{n}_proj") for n in ("gate", "up", "down")]
        for source, ours in pairs:
            yield dst + ours + ".weight", reader[src + source + ".weight"], src + source + ".weight"
    yield "norm.weight", reader[final_norm], final_norm
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", reader[head], head
    elif head in reader:  # some tied checkpoints still carry the head: the embedding is used
        reader.used.add(head)
    reader.check_all_used(ignored_suffixes=("rotary_emb.inv_freq",))


def _split_internlm2_wqkv(wqkv: torch.Tensor, cfg: LLMConfig, key: str):
    """q ``[Hq*D, H]``, k, v ``[Hkv*D, H]`` from InternLM2's grouped ``wqkv`` rows
    ``[Hkv, G + 2, D, H]`` (G = Hq / Hkv: query head ``h * G + g`` is group h's row g)."""
    kv_heads, dim = cfg.num_kv_heads, cfg.dim_per_head
    groups = cfg.num_heads // kv_heads
    shape = ((cfg.num_heads + 2 * kv_heads) * dim, cfg.hidden_size)
    if tuple(wqkv.shape) != shape:
        raise ValueError(f"{key}: shape {tuple(wqkv.shape)}, expected {shape} (the config's heads)")
    grouped = wqkv.view(kv_heads, groups + 2, dim, cfg.hidden_size)
    return (grouped[:, :groups].reshape(-1, cfg.hidden_size),
            grouped[:, groups].reshape(-1, cfg.hidden_size),
            grouped[:, groups + 1].reshape(-1, cfg.hidden_size))


def _mixtral_experts(reader: CheckpointReader, src: str, dst: str):
    """One layer's MoE weights from the per-expert file layout or transformers 5.x's fused one."""
    if src + "mlp.gate.weight" in reader:  # fused: gate_up_proj [E, 2F, H], down_proj [E, H, F]
        gate_up_key, down_key = src + "mlp.experts.gate_up_proj", src + "mlp.experts.down_proj"
        w1, w3 = reader[gate_up_key].chunk(2, dim=1)
        yield dst + "mlp.router.weight", reader[src + "mlp.gate.weight"], src + "mlp.gate.weight"
        yield dst + "mlp.w1", w1, gate_up_key
        yield dst + "mlp.w3", w3, gate_up_key
        yield dst + "mlp.w2", reader[down_key], down_key
        return
    try:
        experts = moe_mlp_from_mixtral(reader, prefix=src)
    except KeyError as error:  # the gate or some experts are missing: the message names them
        raise ValueError(f"{reader.where}: {error.args[0]}") from None
    for name, tensor in experts.items():
        yield dst + "mlp." + name, tensor, f"{src}block_sparse_moe ({name})"


def check_llm_weights(shapes: Mapping[str, torch.Size],
                      converted: Iterable[tuple[str, torch.Tensor, str]]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Passes ``(our key, tensor)`` on from ``(our key, tensor, source key)`` triples after checking
    them against ``shapes`` (our key -> parameter shape): every key known, given once, with its exact
    shape, and, once exhausted, none left out. Errors name both keys."""
    seen = set()
    for key, tensor, source in converted:
        if key not in shapes:
            raise ValueError(f"{source}: maps to {key!r}, which the model does not have")
        if key in seen:
            raise ValueError(f"{source}: {key!r} given twice")
        if tuple(tensor.shape) != tuple(shapes[key]):
            raise ValueError(f"{source}: shape {tuple(tensor.shape)} does not fit {key!r} "
                             f"{tuple(shapes[key])} (is the config right?)")
        seen.add(key)
        yield key, tensor
    missing = sorted(set(shapes) - seen)
    if missing:
        raise ValueError(f"no weights for {missing[:5]}")


def llm_parameter_shapes(cfg: LLMConfig) -> dict[str, torch.Size]:
    """The parameter shapes of ``LLM(cfg)`` (built on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        return {key: param.shape for key, param in LLM(cfg).named_parameters()}


def load_llm_weights(llm: LLM, converted: Iterable[tuple[str, torch.Tensor, str]]) -> None:
    """Copies ``(our key, tensor, source key)`` triples (from :func:`hf_llm_state_dict` or
    ``sphinx_model.accessory``) into ``llm``'s parameters one at a time (cast to their dtype, on
    their device; checked by :func:`check_llm_weights`), then fills the rotary tables."""
    params = dict(llm.named_parameters())
    with torch.no_grad():
        for key, tensor in check_llm_weights({k: p.shape for k, p in params.items()}, converted):
            params[key].copy_(tensor)
    llm.init_rotary()


def empty_llm(cfg: LLMConfig, dtype: torch.dtype, device: torch.device | str | None) -> LLM:
    """``LLM(cfg)`` with uninitialised ``dtype`` parameters on ``device`` (the CPU by default), built
    on the meta device and materialised once, for a checkpoint to fill."""
    with torch.device("meta"):
        llm = LLM(cfg)
    return llm.to(dtype).to_empty(device=device or "cpu")


def load_hf_llm(path: str | os.PathLike, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> LLM:
    """An :class:`~sphinx_model.LLM` from a Hugging Face directory (``config.json`` and safetensors,
    one file or sharded with ``model.safetensors.index.json``; the layouts in the module docstring).

    Args:
        path: the directory.
        dtype: the parameters' dtype; None: the checkpoint's (that of its embedding).
        device: where the model is built; None: the CPU. The model is created on the meta device and
            materialised once, tensors are read one at a time.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json (is {path} a Hugging Face model "
                                "directory?)")
    cfg = llm_config_from_hf(json.loads(config_file.read_text()))
    tensors = SafetensorsDir(path)
    if dtype is None:
        embed = "model.tok_embeddings.weight" if cfg.arch == "internlm2" else \
            "model.embed_tokens.weight"
        dtype = (tensors.dtype_of(embed) if embed in tensors else None) or torch.float32
    llm = empty_llm(cfg, dtype, device)
    load_llm_weights(llm, hf_llm_state_dict(tensors, cfg, where=str(path)))
    return llm


def save_hf_llm(llm: LLM, path: str | os.PathLike, *,
                max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Writes ``llm`` as a Hugging Face directory that transformers' ``from_pretrained`` loads:
    ``config.json`` (:func:`llm_config_to_hf`) and safetensors in the Llama or Mixtral file layout
    (per-expert ``block_sparse_moe`` keys, which transformers 4.x and 5.x both read), sharded past
    ``max_shard_bytes``. Written to a temporary directory, then renamed onto ``path`` (replacing what
    was there). The parameters must be plain tensors: gather a sharded model's weights first."""
    cfg = llm.config
    validate_llm(cfg, "llm.config")
    state = llm.state_dict()
    for key, tensor in state.items():
        if type(tensor) is not torch.Tensor:
            raise TypeError(f"llm.{key} is a {type(tensor).__name__}, not a plain tensor: gather the "
                            "full state dict of a sharded model before saving")
    hf: dict[str, torch.Tensor] = {"model.embed_tokens.weight": state["embed_tokens.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "input_layernorm", "post_attention_layernorm"):
            hf[dst + name + ".weight"] = state[src + name + ".weight"]
        if cfg.num_experts:
            moe = {k.removeprefix(src + "mlp."): v for k, v in state.items()
                   if k.startswith(src + "mlp.")}
            hf.update(moe_mlp_to_mixtral(moe, prefix=dst))
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                hf[dst + f"mlp.{name}.weight"] = state[src + f"mlp.{name}.weight"]
    hf["model.norm.weight"] = state["norm.weight"]
    if not cfg.tie_word_embeddings:
        hf["lm_head.weight"] = state["lm_head.weight"]
    dtype = state["embed_tokens.weight"].dtype
    with atomic_directory(path) as tmp:
        write_safetensors(hf, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(llm_config_to_hf(cfg, dtype), indent=2) + "\n")
