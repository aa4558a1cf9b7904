"""Import of LLaMA2-Accessory checkpoints (the format of the released SPHINX family): the
model-parallel shards merged into one state dict, and its LLM half mapped to
:class:`~sphinx_model.LLM` names.

A checkpoint directory holds ``consolidated.{i:02d}-of-{n:02d}.model.pth`` for ``i < n``: each rank's
state dict (possibly under a ``"model"`` entry), keys prefixed ``llma.``, read with
``torch.load(weights_only=True)`` (a pickle carrying code is refused, never run). Each tensor is
merged as the Accessory layers split it (``accessory/model/LLM/llama_ens5_light.py``,
``mixtral_sparse_ens5.py``, ``accessory/util/tensor_parallel.py``):

    ColumnParallelLinear  cat on dim 0   layers.{i}.attention.wq/wk/wv, feed_forward.w1/w3, output
    RowParallelLinear     cat on dim 1   layers.{i}.attention.wo, feed_forward.w2
    ParallelEmbedding     cat on dim 1   tok_embeddings
    sparse MoE experts    per expert     layers.{i}.feed_forward.w1/w2/w3 ``[E * F/n, H]`` of a layer
                          on dim 1       that has ``feed_forward.gate`` (viewed ``[E, F/n, H]``)
    anything else         replicated     norms, the router, visual_proj, start_img, the encoders ...

The LLM half maps to ours (``tok_embeddings`` -> ``embed_tokens``, ``attention.wq/wk/wv/wo`` ->
``self_attn.q/k/v/o_proj``, ``feed_forward.w1/w3/w2`` -> ``mlp.gate/up/down_proj`` or the MoE's
``mlp.w1/w3/w2`` (``w2`` stored ``[E * F, H]``, ours ``[E, H, F]``), ``feed_forward.gate`` ->
``mlp.router``, ``attention_norm`` / ``ffn_norm`` -> ``input_layernorm`` /
``post_attention_layernorm``, ``norm``, ``output`` -> ``lm_head``). Accessory rotates interleaved
pairs (Meta's complex form), we rotate half-split pairs (Hugging Face's), so the rows of each q and k
head are permuted: ours row ``c * D/2 + i`` is Accessory's row ``2 i + c``, which makes every attention
score identical. The other keys (the multimodal model's) are left to the caller:
:func:`accessory_llm_keys` names the ones this module reads.
"""
from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from sphinx_model.checkpoints import (
    CheckpointReader,
    check_llm_weights,
    empty_llm,
    llm_parameter_shapes,
    load_llm_weights,
    safe_torch_load,
)
from sphinx_model.config import LLMConfig
from sphinx_model.llm import LLM

__all__ = ["ACCESSORY_PREFIX", "accessory_llm_config", "accessory_llm_keys",
           "accessory_llm_state_dict", "accessory_shard_files", "load_accessory_llm",
           "load_accessory_shards"]

ACCESSORY_PREFIX = "llma."  # the key prefix of Accessory's MetaModel (its Transformer is .llma)
_SHARD = re.compile(r"^consolidated\.(\d{2})-of-(\d{2})\.model\.pth$")
_COLUMN = re.compile(r"layers\.\d+\.(attention\.w[qkv]|feed_forward\.w[13])\.weight|output\.weight")
_ROW = re.compile(r"layers\.\d+\.(attention\.wo|feed_forward\.w2)\.weight|tok_embeddings\.weight")
_EXPERT = re.compile(r"layers\.(\d+)\.feed_forward\.w[123]\.weight")


def accessory_shard_files(path: str | Path) -> list[Path]:
    """The ``consolidated.NN-of-MM.model.pth`` files of a directory in rank order; ``ValueError``
    when none are there, their counts disagree or a rank is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    ranks: dict[int, Path] = {}
    totals = set()
    for file in path.iterdir():
        match = _SHARD.match(file.name)
        if match:
            ranks[int(match[1])] = file
            totals.add(int(match[2]))
    if not ranks:
        raise ValueError(f"{path}: no consolidated.NN-of-MM.model.pth files (a LLaMA2-Accessory "
                         "checkpoint directory)")
    if len(totals) != 1:
        raise ValueError(f"{path}: shard files of different counts {sorted(totals)}")
    total = totals.pop()
    missing = [f"consolidated.{i:02d}-of-{total:02d}.model.pth" for i in range(total)
               if i not in ranks]
    if missing or len(ranks) != total:
        raise ValueError(f"{path}: missing shards {missing} of {total}")
    return [ranks[i] for i in range(total)]


def _shard_state(loaded: Any, file: Path) -> dict[str, torch.Tensor]:
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict):
        raise TypeError(f"{file}: expected a state dict, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{file}: {key!r} is a {type(value).__name__}, not a tensor")
    return state


def load_accessory_shards(path: str | Path, prefix: str = ACCESSORY_PREFIX
                          ) -> dict[str, torch.Tensor]:
    """Every tensor of an Accessory checkpoint directory, the model-parallel shards merged (rules in
    the module docstring), under the original key names (``llma.layers.0.attention.wq.weight``,
    ``llma.visual_proj.0.weight``, ...). Files are memory-mapped and loaded with
    ``weights_only=True`` (``UnsafeCheckpointError`` for a pickle carrying code). A key missing from
    some shard is an error naming it; replicated tensors that differ between shards keep shard 0's
    with a warning (as Accessory does)."""
    files = accessory_shard_files(path)
    shards = [_shard_state(safe_torch_load(file), file) for file in files]
    for file, shard in zip(files[1:], shards[1:]):
        for key in shards[0].keys() ^ shard.keys():
            where = files[0] if key not in shards[0] else file
            raise ValueError(f"{where} lacks {key!r}, which other shards have")
    experts = {match[1]: shards[0][key].shape[0] for key in shards[0]
               if (match := re.fullmatch(re.escape(prefix) + r"layers\.(\d+)\.feed_forward\.gate"
                                         r"\.weight", key))}
    merged, unequal = {}, []
    for key in shards[0]:
        parts = [shard[key] for shard in shards]
        name = key[len(prefix):] if key.startswith(prefix) else None
        expert_layer = _EXPERT.fullmatch(name) if name else None
        if len(parts) == 1:
            merged[key] = parts[0]
        elif expert_layer and expert_layer[1] in experts:
            count = experts[expert_layer[1]]
            merged[key] = torch.cat([p.view(count, -1, p.shape[-1]) for p in parts], dim=1) \
                .view(-1, parts[0].shape[-1])
        elif name and _COLUMN.fullmatch(name):
            merged[key] = torch.cat(parts, dim=0)
        elif name and _ROW.fullmatch(name):
            merged[key] = torch.cat(parts, dim=1)
        else:
            if any(not torch.equal(parts[0], p) for p in parts[1:]):
                unequal.append(key)
            merged[key] = parts[0]
    if unequal:
        warnings.warn(f"{path}: replicated tensors differ between shards, shard 0's kept: "
                      f"{unequal[:5]}", stacklevel=2)
    return merged


def accessory_llm_config(merged: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                         prefix: str = ACCESSORY_PREFIX) -> LLMConfig:
    """The :class:`LLMConfig` of a merged Accessory state dict: sizes from the tensors' shapes, and
    from ``params`` (the checkpoint's ``config.json``, Accessory's ``ModelArgs`` fields) ``n_heads``
    (required), ``norm_eps`` (1e-5), ``rope_theta`` (Accessory's defaults: 1e6 for the sparse MoE,
    else 1e4), ``max_seq_len`` (2048; the rotary table holds twice that, as Accessory's),
    ``moe.num_experts_per_tok`` (2). A ``rope_scaling`` is refused."""
    reader = CheckpointReader(merged, "accessory checkpoint")
    if "n_heads" not in params:
        raise ValueError("params: n_heads is required (the head count is not in the tensors' "
                         "shapes)")
    if params.get("rope_scaling") is not None:
        raise ValueError(f"params: rope_scaling = {params['rope_scaling']} is not supported")
    vocab, hidden = reader[prefix + "tok_embeddings.weight"].shape
    layers = sum(1 for key in merged
                 if re.fullmatch(re.escape(prefix) + r"layers\.\d+\.attention\.wq\.weight", key))
    heads = params["n_heads"]
    head_dim = hidden // heads
    kv_heads = reader[prefix + "layers.0.attention.wk.weight"].shape[0] // head_dim
    gate = prefix + "layers.0.feed_forward.gate.weight"
    experts = reader[gate].shape[0] if gate in merged else 0
    ffn = reader[prefix + "layers.0.feed_forward.w1.weight"].shape[0] // max(experts, 1)
    return LLMConfig(
        arch="mixtral" if experts else "llama", vocab_size=vocab, hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, intermediate_size=ffn,
        num_experts=experts, top_k=dict(params.get("moe") or {}).get("num_experts_per_tok", 2),
        rope_theta=float(params.get("rope_theta", 1e6 if experts else 1e4)),
        rms_norm_eps=float(params.get("norm_eps", 1e-5)),
        max_position_embeddings=2 * params.get("max_seq_len", 2048))


def _accessory_names(cfg: LLMConfig, prefix: str) -> Iterator[tuple[str, str]]:
    """(Accessory key, our key) of every LLM tensor, in model order."""
    yield prefix + "tok_embeddings.weight", "embed_tokens.weight"
    for i in range(cfg.num_layers):
        src, dst = f"{prefix}layers.{i}.", f"layers.{i}."
        for ours, theirs in zip("qkvo", ("wq", "wk", "wv", "wo")):
            yield src + f"attention.{theirs}.weight", dst + f"self_attn.{ours}_proj.weight"
        if cfg.num_experts:
            yield src + "feed_forward.gate.weight", dst + "mlp.router.weight"
            for w in ("w1", "w3", "w2"):
                yield src + f"feed_forward.{w}.weight", dst + f"mlp.{w}"
        else:
            for theirs, ours in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                yield src + f"feed_forward.{theirs}.weight", dst + f"mlp.{ours}.weight"
        yield src + "attention_norm.weight", dst + "input_layernorm.weight"
        yield src + "ffn_norm.weight", dst + "post_attention_layernorm.weight"
    yield prefix + "norm.weight", "norm.weight"
    yield prefix + "output.weight", "lm_head.weight"


def accessory_llm_keys(cfg: LLMConfig, prefix: str = ACCESSORY_PREFIX) -> list[str]:
    """The Accessory keys the LLM half consists of (what :func:`accessory_llm_state_dict` reads), so
    a caller mapping the rest can tell its leftovers."""
    return [theirs for theirs, _ in _accessory_names(cfg, prefix)]


def _interleaved_to_half(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k projection rows of each head from interleaved rotary pairs to half-split pairs."""
    rows, hidden = weight.shape
    return weight.view(heads, rows // heads // 2, 2, hidden).transpose(1, 2).reshape(rows, hidden)


def _accessory_triples(merged: Mapping[str, torch.Tensor], cfg: LLMConfig, prefix: str):
    reader = CheckpointReader(merged, "accessory checkpoint")
    experts, ffn, hidden = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
    for theirs, ours in _accessory_names(cfg, prefix):
        tensor = reader[theirs]
        if ours.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_heads if ours.endswith("q_proj.weight") else cfg.num_kv_heads
            if tensor.shape[0] != heads * cfg.dim_per_head:
                raise ValueError(f"{theirs}: shape {tuple(tensor.shape)}, expected "
                                 f"({heads * cfg.dim_per_head}, {hidden}) (the config's heads)")
            tensor = _interleaved_to_half(tensor, heads)
        elif experts and ours.endswith(("mlp.w1", "mlp.w3", "mlp.w2")):
            if tuple(tensor.shape) != (experts * ffn, hidden):
                raise ValueError(f"{theirs}: shape {tuple(tensor.shape)}, expected "
                                 f"({experts * ffn}, {hidden}) (experts x ffn, hidden)")
            tensor = tensor.view(experts, ffn, hidden)
            if ours.endswith("mlp.w2"):
                tensor = tensor.transpose(1, 2)
        yield ours, tensor, theirs
    layer_keys = re.compile(re.escape(prefix) + r"(layers\.\d+\.|tok_embeddings\.|norm\.|output\.)")
    unexpected = sorted(k for k in merged if layer_keys.match(k) and k not in reader.used)
    if unexpected:
        raise ValueError(f"accessory checkpoint: unexpected LLM keys {unexpected[:5]}")


def accessory_llm_state_dict(merged: Mapping[str, torch.Tensor], cfg: LLMConfig,
                             prefix: str = ACCESSORY_PREFIX) -> dict[str, torch.Tensor]:
    """The LLM half of a merged Accessory state dict (:func:`load_accessory_shards`) under
    :class:`~sphinx_model.LLM` names, ready for ``LLM(cfg).load_state_dict`` (tensors may be views of
    ``merged``). Missing keys, LLM keys this layout does not have (under ``{prefix}layers.``), wrong
    shapes and non-float dtypes are errors naming the Accessory key; the other keys are ignored."""
    return dict(check_llm_weights(llm_parameter_shapes(cfg),
                                  _accessory_triples(merged, cfg, prefix)))


def load_accessory_llm(path: str | Path, params: Mapping[str, Any] | None = None,
                       dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                       prefix: str = ACCESSORY_PREFIX) -> LLM:
    """The text-only LLM of an Accessory checkpoint directory. ``params``: its ``ModelArgs`` (None:
    read ``config.json`` in the directory); ``dtype`` None: the checkpoint's; ``device`` None: CPU."""
    if params is None:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: no config.json; pass params (n_heads, ...)")
        params = json.loads(config_file.read_text())
    merged = load_accessory_shards(path, prefix)
    cfg = accessory_llm_config(merged, params, prefix)
    llm = empty_llm(cfg, dtype or merged[prefix + "tok_embeddings.weight"].dtype, device)
    load_llm_weights(llm, _accessory_triples(merged, cfg, prefix))
    return llm
