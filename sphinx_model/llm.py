"""The SPHINX-X decoder: Llama / Mistral / InternLM2 (dense SwiGLU) and Mixtral (sparse MoE) blocks
over packed variable-length batches, on the sphinx_kernels ops.

A batch is ``B`` samples packed back to back in ``T`` rows (no padding between them), described by
``cu_seqlens`` (int32 ``[B + 1]``); rows past ``cu_seqlens[-1]`` are padding. Every block is

    x = x + self_attn(input_layernorm(x))       rotary (positions reset per sample), GQA,
                                                 sphinx_kernels.varlen_attention (causal; an
                                                 optional bidirectional prefix per sample)
    x = x + mlp(post_attention_layernorm(x))     SwiGLU, or sphinx_kernels.nn.MoEMLP when
                                                 cfg.num_experts > 0

then a final RMSNorm and the LM head. Parameter names are Hugging Face Llama's without the
``model.`` prefix (``embed_tokens``, ``layers.{i}.self_attn.{q,k,v,o}_proj``,
``layers.{i}.mlp.{gate,up,down}_proj`` or the MoE's ``layers.{i}.mlp.{router.weight,w1,w3,w2}``,
``layers.{i}.input_layernorm``, ``layers.{i}.post_attention_layernorm``, ``norm``, ``lm_head``);
``sphinx_model.checkpoints`` converts from and to the Hugging Face and InternLM2 layouts.

Entry points (see :class:`LLM`): ``llm(input_ids, cu_seqlens)`` gives logits; the multimodal model
and the trainer call ``hidden_states`` on their own input embeddings, then ``loss`` (chunked: the
float32 ``[T, vocab]`` logits never exist) or ``logits``. Generation passes a :class:`KVCache`.

The model code holds no parallelism, activation checkpointing or compile (``sphinx_model.parallel``
applies them from outside), and builds on the meta device: ``with torch.device("meta"): LLM(cfg)``,
then ``to_empty(device=...)`` and :meth:`LLM.init_weights`.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sphinx_kernels import apply_rotary, varlen_attention
from sphinx_kernels._validation import require_index_range, require_tensor
from sphinx_kernels.nn import MoEMLP, rotary_tables
from sphinx_model.config import LLMConfig, validate_llm
from sphinx_model.loss import linear_cross_entropy

__all__ = ["INIT_STD", "LLM", "DecoderLayer", "KVCache", "MoELosses", "RMSNorm", "SelfAttention",
           "SimpleKVCache", "SwiGLUMLP", "packed_position_ids"]

INIT_STD = 0.02  # normal init of every weight matrix (Hugging Face's initializer_range default)


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``, normalised in float32 and rounded to ``x``'s dtype
    before the weight is applied (as Hugging Face Llama does). ``weight`` ``[H]``."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused rms_norm on the float32 copy: the same value as x * rsqrt(mean(x^2) + eps)
        # written out (bitwise on the CPU), one op instead of five, which a decode step notices.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class SwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: ``gate_proj``, ``up_proj`` ``[F, H]``,
    ``down_proj`` ``[H, F]``, no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class KVCache(Protocol):
    """What :class:`SelfAttention` needs of a key/value cache, so that a decode step runs through
    the same layer code as training (the generation module provides a preallocated implementation;
    :class:`SimpleKVCache` is the plain one).

    A forward with a cache covers the same ``B`` sequences every call; call ``n`` brings each
    sequence b's new rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` (0 new rows is legal: that sequence
    idles).
    """

    def cached_lengths(self) -> torch.Tensor | None:
        """int32 or int64 ``[B]`` on the model's device: rows each sequence already has in the cache
        (before this forward's rows), so the new rows sit at positions ``cached + 0, 1, ...``; None
        while the cache is empty. Read once per forward, before any layer calls :meth:`update`."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
        """Stores layer ``layer``'s new rows ``k``, ``v`` (``[T, Hkv, D]``, rotary already applied
        to ``k``; rows past ``cu_seqlens[-1]`` are padding, not stored) after each sequence's cached
        rows, and returns ``(keys, values, cu_seqlens_k, max_seqlen_k)``: ``[Tk, Hkv, D]`` rows of
        every sequence's cached and new keys / values, packed with int32 ``cu_seqlens_k``
        ``[B + 1]``, the new rows last in each sequence (``varlen_attention`` aligns queries to the
        end of their keys), and an upper bound of the key lengths (a host int) or None."""


class SimpleKVCache:
    """A :class:`KVCache` that keeps, per layer, every sequence's keys and values packed in one
    tensor and re-packs it on each update (a concatenation: each step copies the whole cache, and
    reads ``cu_seqlens`` back to the host). For tests and short generations;
    ``sphinx_model.generate`` has the preallocated one."""

    def __init__(self) -> None:
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor, list[int]]] = {}

    def cached_lengths(self) -> torch.Tensor | None:
        if 0 not in self._layers:
            return None
        keys, _, lengths = self._layers[0]
        return torch.tensor(lengths, dtype=torch.int32, device=keys.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
        bounds = cu_seqlens.tolist()
        new_lengths = [end - start for start, end in itertools.pairwise(bounds)]
        if layer in self._layers:
            old_k, old_v, old_lengths = self._layers[layer]
            if len(old_lengths) != len(new_lengths):
                raise ValueError(f"cu_seqlens describes {len(new_lengths)} sequences but the cache "
                                 f"holds {len(old_lengths)}")
        else:
            old_k, old_v, old_lengths = k[:0], v[:0], [0] * len(new_lengths)
        old_k, old_v = old_k.split(old_lengths), old_v.split(old_lengths)
        used = bounds[-1]
        new_k, new_v = k[:used].split(new_lengths), v[:used].split(new_lengths)
        keys = torch.cat([k[:0], *(t for pair in zip(old_k, new_k) for t in pair)])
        values = torch.cat([v[:0], *(t for pair in zip(old_v, new_v) for t in pair)])
        lengths = [a + b for a, b in zip(old_lengths, new_lengths)]
        self._layers[layer] = (keys, values, lengths)
        cu_k = torch.tensor([0] + lengths, dtype=torch.int32, device=k.device).cumsum(0)
        return keys, values, cu_k.to(torch.int32), max(lengths, default=0)


class SelfAttention(nn.Module):
    """Llama attention over packed sequences: q/k/v projections, rotary (Hugging Face half-split
    convention) by ``sphinx_kernels.apply_rotary``, ``sphinx_kernels.varlen_attention`` (causal,
    GQA, optional bidirectional prefix), output projection. ``q_proj`` ``[Hq*D, H]``, ``k_proj`` and
    ``v_proj`` ``[Hkv*D, H]``, ``o_proj`` ``[H, Hq*D]``, no biases.

    Unlike ``sphinx_kernels.nn.VarlenSelfAttention`` (same parameter names), it holds no rotary
    tables: the model passes its one shared pair, and it takes an optional :class:`KVCache`.
    """

    def __init__(self, cfg: LLMConfig, layer_index: int):
        super().__init__()
        hidden, dim = cfg.hidden_size, cfg.dim_per_head
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, dim
        self.q_proj = nn.Linear(hidden, cfg.num_heads * dim, bias=False)
        self.k_proj = nn.Linear(hidden, cfg.num_kv_heads * dim, bias=False)
        self.v_proj = nn.Linear(hidden, cfg.num_kv_heads * dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, position_ids: torch.Tensor,
                rotary_cos: torch.Tensor, rotary_sin: torch.Tensor, *,
                max_seqlen: int | None = None, prefix_lens: torch.Tensor | None = None,
                kv_cache: KVCache | None = None
                ) -> torch.Tensor:
        """``x`` ``[T, H]`` -> ``[T, H]``; see :meth:`LLM.hidden_states` for the other arguments."""
        rows = x.shape[0]
        q = self.q_proj(x).view(rows, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(rows, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(rows, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary((q, k), rotary_cos, rotary_sin, position_ids)
        if kv_cache is None:
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen_q=max_seqlen,
                                   max_seqlen_k=max_seqlen, causal=True, prefix_lens=prefix_lens)
        else:
            keys, values, cu_seqlens_k, max_seqlen_k = kv_cache.update(self.layer_index, k, v,
                                                                       cu_seqlens)
            out = varlen_attention(q, keys, values, cu_seqlens, cu_seqlens_k, max_seqlen,
                                   max_seqlen_k, causal=True, prefix_lens=prefix_lens)
        return self.o_proj(out.view(rows, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """One pre-norm block: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``
    (:class:`SwiGLUMLP`, or ``sphinx_kernels.nn.MoEMLP`` when ``cfg.num_experts > 0``)."""

    def __init__(self, cfg: LLMConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.num_experts:
            self.mlp = MoEMLP(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k,
                              block_size=cfg.moe_block_size)
        else:
            self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, position_ids: torch.Tensor,
                rotary_cos: torch.Tensor, rotary_sin: torch.Tensor, *,
                max_seqlen: int | None = None, prefix_lens: torch.Tensor | None = None,
                kv_cache: KVCache | None = None):
        """``x`` ``[T, H]`` -> ``(x [T, H], MoEAux or None)``."""
        x = x + self.self_attn(self.input_layernorm(x), cu_seqlens, position_ids, rotary_cos,
                               rotary_sin, max_seqlen=max_seqlen, prefix_lens=prefix_lens,
                               kv_cache=kv_cache)
        out = self.mlp(self.post_attention_layernorm(x))
        if isinstance(out, tuple):  # MoEMLP: (y, MoEAux)
            return x + out[0], out[1]
        return x + out, None


class MoELosses(NamedTuple):
    """The routers' by-products of one forward, for the trainer to weight and log."""

    load_balancing_loss: torch.Tensor  # [] float32: mean over the MoE layers of each layer's
    #                                    Switch loss E * sum_e f_e * P_e (1.0 when perfectly
    #                                    balanced)
    z_loss: torch.Tensor               # [] float32: mean over the layers of
    #                                    mean_t logsumexp(logits)^2
    tokens_per_expert: torch.Tensor    # [L, E] int32: (token, slot) pairs routed to each expert


def packed_position_ids(cu_seqlens: torch.Tensor, num_rows: int,
                        offsets: torch.Tensor | None = None) -> torch.Tensor:
    """int32 ``[num_rows]``: each row's position within its sample (0, 1, ... from each
    ``cu_seqlens[b]``), plus ``offsets[b]`` (rows already in a KV cache) when given; padding rows
    (past ``cu_seqlens[-1]``) get 0. Computed on ``cu_seqlens``'s device without a host sync."""
    cu_seqlens = cu_seqlens.to(torch.int32)
    rows = torch.arange(num_rows, dtype=torch.int32, device=cu_seqlens.device)
    sample = torch.searchsorted(cu_seqlens[1:], rows, right=True)  # B for padding rows
    positions = rows - cu_seqlens[sample]
    num_samples = cu_seqlens.shape[0] - 1
    if offsets is not None and num_samples:
        positions = positions + offsets.to(torch.int32)[sample.clamp(max=num_samples - 1)]
    return positions.masked_fill(sample >= num_samples, 0)


class LLM(nn.Module):
    """A Llama-family decoder (see the module docstring) for a :class:`~sphinx_model.LLMConfig`.

    Submodules: ``embed_tokens`` (``nn.Embedding [V, H]``), ``layers`` (:class:`DecoderLayer` each),
    ``norm`` (:class:`RMSNorm`), ``lm_head`` (``nn.Linear [V, H]``, the embedding's weight when
    ``cfg.tie_word_embeddings``, kept tied through ``to`` / ``to_empty``). Buffers ``rotary_cos``,
    ``rotary_sin`` ``[max_position_embeddings, D]`` float32 (non-persistent): one rotary table
    shared by every layer.

    Calls (``T`` packed rows, ``cu_seqlens`` int32 ``[B + 1]`` as in ``sphinx_kernels``):

    - ``llm(input_ids, cu_seqlens, position_ids=None, *, max_seqlen=None, prefix_lens=None,
      kv_cache=None)``: ``input_ids`` int64 ``[T]`` -> logits ``[T, V]`` in the model's dtype.
    - :meth:`hidden_states` on input embeddings ``[T, H]`` ->
      ``(hidden [T, H], MoELosses or None)``.
    - :meth:`logits` (hidden -> ``[T, V]``) and :meth:`loss` (chunked cross-entropy at labelled
      rows).

    Building on the meta device allocates nothing; after ``to_empty(device=...)`` call
    :meth:`init_weights` (random init and rotary tables) or load a state dict and call
    :meth:`init_rotary` (the tables are not saved).
    """

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        validate_llm(cfg, "cfg")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        table = (cfg.max_position_embeddings, cfg.dim_per_head)
        self.register_buffer("rotary_cos", torch.empty(table, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("rotary_sin", torch.empty(table, dtype=torch.float32),
                             persistent=False)
        self.init_weights()

    def _apply(self, fn, recurse=True):
        # Moving off the meta device (to_empty) replaces every Parameter object, which would untie
        # lm_head from the embedding: tie again after any such conversion.
        super()._apply(fn, recurse)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        return self

    @torch.no_grad()
    def init_weights(self, std: float = INIT_STD) -> None:
        """(Re)initialises every parameter in place (weight matrices and embeddings normal(0, std),
        norms 1) and fills the rotary tables; allocates nothing, so it runs after ``to_empty`` on
        whatever (possibly sharded) storage the parameters have. On the meta device it is a
        no-op."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, MoEMLP):
                for weight in (module.w1, module.w3, module.w2):
                    nn.init.normal_(weight, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.init_rotary()

    @torch.no_grad()
    def init_rotary(self) -> None:
        """Fills ``rotary_cos`` / ``rotary_sin`` (Hugging Face layout, angles computed in float64
        and rounded once to the buffers' dtype)."""
        cos, sin = rotary_tables(self.config.max_position_embeddings, self.config.dim_per_head,
                                 self.config.rope_theta, self.rotary_cos.device)
        self.rotary_cos.copy_(cos)
        self.rotary_sin.copy_(sin)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                position_ids: torch.Tensor | None = None, *, max_seqlen: int | None = None,
                prefix_lens: torch.Tensor | None = None, kv_cache: KVCache | None = None
                ) -> torch.Tensor:
        """Logits ``[T, V]`` of packed token ids ``input_ids`` (int32/int64 ``[T]``)."""
        require_tensor("input_ids", input_ids, dims=1, dtypes=(torch.int64, torch.int32))
        require_index_range("input_ids", input_ids, self.config.vocab_size, "vocab_size")
        hidden, _ = self.hidden_states(self.embed_tokens(input_ids), cu_seqlens, position_ids,
                                       max_seqlen=max_seqlen, prefix_lens=prefix_lens,
                                       kv_cache=kv_cache)
        return self.logits(hidden)

    def hidden_states(self, inputs_embeds: torch.Tensor, cu_seqlens: torch.Tensor,
                      position_ids: torch.Tensor | None = None, *, max_seqlen: int | None = None,
                      prefix_lens: torch.Tensor | None = None, kv_cache: KVCache | None = None
                      ) -> tuple[torch.Tensor, MoELosses | None]:
        """Runs the blocks and the final norm over packed input embeddings.

        Args:
            inputs_embeds: ``[T, H]`` (text embeddings from ``embed_tokens``, or the multimodal
                model's assembled rows), the model's dtype.
            cu_seqlens: int32 ``[B + 1]`` sample boundaries (zero-length samples are legal).
            position_ids: int32/int64 ``[T]`` rotary positions (``< max_position_embeddings``);
                None: 0, 1, ... from each sample's start (after its cached rows with ``kv_cache``),
                derived on the device without a host sync.
            max_seqlen: an upper bound of the sample lengths (a host int), or None.
            prefix_lens: int32 ``[B]``: the first ``prefix_lens[b]`` rows of sample b (counted in
                key positions, so with a cache they include cached rows) attend to each other
                bidirectionally (the image block, prefix-LM); None: causal everywhere.
            kv_cache: a :class:`KVCache`; each layer stores its new keys / values there and attends
                over the cached ones too (generation).

        Returns:
            ``(hidden [T, H], moe)``: hidden states after the final norm, rows past
            ``cu_seqlens[-1]`` zero; ``moe`` a :class:`MoELosses` (None for a dense model). Padding
            rows are routed like the others (they are dropped only by the loss), so keep padding
            short.
        """
        require_tensor("inputs_embeds", inputs_embeds, dims=2)
        require_tensor("cu_seqlens", cu_seqlens, dims=1, dtypes=(torch.int32,))
        if inputs_embeds.shape[1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be [T, hidden_size = {self.config.hidden_size}], "
                             f"got {tuple(inputs_embeds.shape)}")
        rows = inputs_embeds.shape[0]
        if position_ids is None:
            offsets = kv_cache.cached_lengths() if kv_cache is not None else None
            position_ids = packed_position_ids(cu_seqlens, rows, offsets)
        x, aux = inputs_embeds, []
        for layer in self.layers:
            x, layer_aux = layer(x, cu_seqlens, position_ids, self.rotary_cos, self.rotary_sin,
                                 max_seqlen=max_seqlen, prefix_lens=prefix_lens, kv_cache=kv_cache)
            if layer_aux is not None:
                aux.append(layer_aux)
        x = self.norm(x)
        padding = torch.arange(rows, device=x.device) >= cu_seqlens[-1]
        x = x.masked_fill(padding[:, None], 0)
        if not aux:
            return x, None
        return x, MoELosses(torch.stack([a.load_balancing_loss for a in aux]).mean(),
                            torch.stack([a.z_loss for a in aux]).mean(),
                            torch.stack([a.tokens_per_expert for a in aux]))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` hidden states -> ``[..., V]`` logits in their dtype. For training use
        :meth:`loss`, which never holds all the logits."""
        return self.lm_head(hidden)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor,
             num_trained_tokens: int | torch.Tensor, *, chunk_rows: int | None = None
             ) -> torch.Tensor:
        """Next-token cross-entropy, summed over the labelled rows and divided by
        ``num_trained_tokens``: a float32 scalar.

        Args:
            hidden: ``[T, H]`` from :meth:`hidden_states`.
            labels: int64 ``[T]``: the target token of each row (``PackedLayout.labels``, already
                shifted: row t's label is the token at t + 1), ``-100`` where nothing is trained.
            num_trained_tokens: the normaliser, e.g. the labelled rows of the whole global batch
                (all ranks, all micro-batches), so that summing the micro-batches' losses gives the
                global mean; an int > 0 or a tensor (no host sync).
            chunk_rows: labelled rows per logits chunk (see
                :func:`sphinx_model.loss.linear_cross_entropy`).

        Only labelled rows are projected, a chunk at a time, with the gradients computed in the same
        pass, so memory stays bounded in the forward and the backward. Reads ``lm_head.weight``
        directly: under FSDP2 register this method with ``register_fsdp_forward_method``. Finding
        the labelled rows costs one host sync.
        """
        if isinstance(num_trained_tokens, int) and num_trained_tokens < 1:
            raise ValueError(f"num_trained_tokens must be >= 1, got {num_trained_tokens}")
        total = linear_cross_entropy(hidden, self.lm_head.weight, labels, chunk_rows=chunk_rows)
        return total / num_trained_tokens

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"arch={cfg.arch}, layers={cfg.num_layers}, hidden={cfg.hidden_size}, "
                f"heads={cfg.num_heads}/{cfg.num_kv_heads}, experts={cfg.num_experts}")
