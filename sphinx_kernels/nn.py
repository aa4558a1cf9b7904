"""Drop-in modules over the ops, for users' own models:

    VarlenSelfAttention   q/k/v projections, rotary, varlen flash attention, output projection (GQA)
    PatchProjector        several encoders' features -> one fused projection (+ LayerNorm)
                          -> LLM width
    MoEMLP                a dropless sparse Mixture-of-Experts SwiGLU MLP (Mixtral's
                          block_sparse_moe), with conversion from and to the Hugging Face
                          Mixtral layout

Parameter names follow the Hugging Face models they replace, so checkpoints load unchanged. Each
class is self-contained, and knows nothing of parallelism (FSDP, activation checkpointing and
compile are applied from outside).
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import nn

from sphinx_kernels.ops.apply_rotary import apply_rotary
from sphinx_kernels.ops.moe_expert_mlp import moe_expert_mlp
from sphinx_kernels.ops.moe_permute import moe_permute
from sphinx_kernels.ops.moe_routing import moe_routing
from sphinx_kernels.ops.moe_unpermute import moe_unpermute
from sphinx_kernels.ops.patch_projection import patch_projection
from sphinx_kernels.ops.topk_gating import topk_gating
from sphinx_kernels.ops.varlen_attention import varlen_attention

__all__ = ["VarlenSelfAttention", "rotary_tables", "PatchProjector", "MoEAux", "MoEMLP",
           "moe_mlp_from_mixtral", "moe_mlp_to_mixtral"]


class VarlenSelfAttention(torch.nn.Module):
    """Self-attention over packed variable-length sequences, in the Llama layout: q/k/v projections,
    rotary embedding (Hugging Face non-interleaved convention, positions reset per packed sample),
    :func:`sphinx_kernels.varlen_attention` (causal, GQA, optional bidirectional prefix), output
    projection.

    Args:
        hidden_size: model width ``H``.
        num_heads: query heads ``Hq``.
        num_kv_heads: key/value heads ``Hkv`` (a divisor of ``Hq``; GQA, MQA); default ``Hq``.
        head_dim: per-head width ``D`` (even); default ``H // Hq``.
        bias: biases on q/k/v projections (Qwen-style); the output projection never has one, like
            Llama.
        rope_theta: rotary base; ``max_position_embeddings``: rows of the rotary tables.

    Parameters (names as Llama's, so its checkpoints load unchanged): ``q_proj.weight [Hq*D, H]``,
    ``k_proj.weight [Hkv*D, H]``, ``v_proj.weight [Hkv*D, H]``, ``o_proj.weight [H, Hq*D]``. The
    rotary tables ``rotary_cos``, ``rotary_sin`` (``[P, D]`` float32) are buffers that are not
    saved; after building the module on the meta device, call :meth:`reset_rotary` once it is
    materialised.

    ``forward(x, cu_seqlens, position_ids, *, max_seqlen=None, prefix_lens=None)``: ``x`` ``[T, H]``
    packed tokens, ``cu_seqlens`` int32 ``[B + 1]``, ``position_ids`` ``[T]`` (e.g. from
    ``PackedLayout``), ``prefix_lens`` optional int32 ``[B]``; returns ``[T, H]`` in ``x``'s dtype.
    Rows past ``cu_seqlens[-1]`` come out as the output projection of zero (``0``, there is no
    bias).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, bias: bool = False, rope_theta: float = 10000.0,
                 max_position_embeddings: int = 4096, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for the rotary embedding, got {head_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        factory = {"device": device, "dtype": dtype}
        self.q_proj = torch.nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = torch.nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = torch.nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = torch.nn.Linear(num_heads * head_dim, hidden_size, bias=False, **factory)
        shape = (max_position_embeddings, head_dim)
        self.register_buffer("rotary_cos", torch.empty(shape, device=device), persistent=False)
        self.register_buffer("rotary_sin", torch.empty(shape, device=device), persistent=False)
        self.reset_rotary()

    @torch.no_grad()
    def reset_rotary(self) -> None:
        """Fills the rotary tables (float32, Hugging Face layout: each half of a row holds the
        angles)."""
        if self.rotary_cos.is_meta:
            return
        cos, sin = rotary_tables(self.rotary_cos.shape[0], self.head_dim, self.rope_theta,
                                 self.rotary_cos.device)
        self.rotary_cos.copy_(cos)
        self.rotary_sin.copy_(sin)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, position_ids: torch.Tensor, *,
                max_seqlen: int | None = None, prefix_lens: torch.Tensor | None = None
                ) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary((q, k), self.rotary_cos, self.rotary_sin, position_ids)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen_q=max_seqlen,
                               max_seqlen_k=max_seqlen, causal=True, prefix_lens=prefix_lens)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))


def rotary_tables(positions: int, head_dim: int, theta: float = 10000.0,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary tables: ``cos``, ``sin`` ``[positions, head_dim]`` float32, angle
    ``p * theta ** (-2i / head_dim)`` in column ``i`` and again in column ``i + head_dim / 2``."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    inv_freq = theta ** -exponents
    angles = torch.arange(positions, dtype=torch.float64, device=device)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=1)
    return angles.cos().float(), angles.sin().float()


class PatchProjector(nn.Module):
    """Projects several encoders' features into the LLM width with one fused op (see
    :func:`sphinx_kernels.patch_projection`): ``proj`` (an ``nn.Linear`` over the channel
    concatenation, columns in encoder order) then ``norm`` (an ``nn.LayerNorm``, unless
    ``norm=False``).

    Args:
        in_channels: channels of each encoder, e.g. ``(1536, 3072)`` for DINOv2-g and ConvNeXt-XXL.
        out_features: the LLM width ``D``.
        grid: the common token grid ``(gh, gw)`` (or one int): each view gives ``1 + gh * gw`` rows.
        norm: whether a LayerNorm follows the projection.
        bias: whether the projection has a bias.
        eps: the LayerNorm epsilon.
    """

    def __init__(self, in_channels: Sequence[int], out_features: int, grid: int | tuple[int, int],
                 norm: bool = True, bias: bool = True, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.proj = nn.Linear(sum(self.in_channels), out_features, bias=bias, device=device,
                              dtype=dtype)
        self.norm = (nn.LayerNorm(out_features, eps=eps, device=device, dtype=dtype) if norm
                     else None)

    def forward(self, features: Sequence[torch.Tensor], out: torch.Tensor | None = None,
                out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``features``: one tensor per encoder (see ``patch_projection``); with ``out`` /
        ``out_rows`` the rows are written into a copy of the packed sequence ``out``."""
        if len(features) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature tensors (in_channels), got "
                             f"{len(features)}")
        for i, (feature, channels) in enumerate(zip(features, self.in_channels)):
            have = feature.shape[-1] if feature.dim() == 3 else feature.shape[1]
            if have != channels:
                raise ValueError(f"features[{i}] has {have} channels, in_channels[{i}] is "
                                 f"{channels}")
        norm = self.norm
        return patch_projection(features, self.proj.weight, self.proj.bias, grid=self.grid,
                                norm_weight=None if norm is None else norm.weight,
                                norm_bias=None if norm is None else norm.bias,
                                eps=1e-5 if norm is None else norm.eps, out=out, out_rows=out_rows)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, grid={self.grid}"


class MoEAux(NamedTuple):
    """The router's by-products of one ``MoEMLP`` call."""

    load_balancing_loss: torch.Tensor  # [] float32, Switch-style: E * sum_e f_e * P_e
    z_loss: torch.Tensor               # [] float32: mean over tokens of logsumexp(logits)^2
    tokens_per_expert: torch.Tensor    # [E] int32 (token, slot) pairs routed to each expert


class MoEMLP(nn.Module):
    """A dropless sparse Mixture-of-Experts SwiGLU MLP (Mixtral's ``block_sparse_moe``).

    Per token: router logits ``x @ router.weight.T`` (``[E]``), softmax (float32) and top-k, gates
    renormalised over the k experts, and ``y = sum_j gate_j * expert_{e_j}(x)`` with
    ``expert_e(x) = (silu(x @ w1[e].T) * (x @ w3[e].T)) @ w2[e].T``. No token is ever dropped.

    The pipeline is ``topk_gating`` -> ``moe_routing`` (the block-padded plan) -> ``moe_permute`` ->
    ``moe_expert_mlp`` (grouped GEMMs) -> ``moe_unpermute`` (the gate-weighted sum). Expert
    parallelism would go between the plan and the expert GEMMs: an all-to-all of the permuted rows
    (and of ``tokens_per_expert``) to the ranks owning the experts, and back before the unpermute
    (see ``sphinx_kernels.moe``); this module holds all experts and has no such code.

    Parameters are plain ``nn.Parameter`` tensors (no custom storage), so FSDP2's ``fully_shard``
    shards them like any other; the ops take whatever full tensors FSDP hands back.

    Args:
        hidden: ``H``, the model width.
        ffn: ``F``, each expert's inner width.
        num_experts: ``E``.
        top_k: ``k`` experts per token, ``1 <= k <= E``.
        block_size: rows per expert GEMM block in the routing plan (each expert's segment is padded
            to a multiple); 128 suits the GPU kernels, small values suit CPU tests.
        recompute: recompute the experts' activations in the backward instead of keeping them.

    Parameters: ``router.weight`` ``[E, H]``, ``w1`` and ``w3`` ``[E, F, H]``, ``w2`` ``[E, H, F]``.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, *,
                 block_size: int = 128, recompute: bool = False, device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts] = [1, {num_experts}], got {top_k}")
        factory = {"device": device, "dtype": dtype}
        self.hidden, self.ffn, self.num_experts, self.top_k = hidden, ffn, num_experts, top_k
        self.block_size, self.recompute = block_size, recompute
        self.router = nn.Linear(hidden, num_experts, bias=False, **factory)
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn, hidden, **factory))
        self.w3 = nn.Parameter(torch.empty(num_experts, ffn, hidden, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, ffn, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised as ``nn.Linear`` would be: uniform in +-1/sqrt(fan_in)."""
        self.router.reset_parameters()
        for weight, fan_in in ((self.w1, self.hidden), (self.w3, self.hidden), (self.w2, self.ffn)):
            bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """``x`` ``[..., H]`` -> ``(y [..., H] in x's dtype, MoEAux)``."""
        if x.shape[-1] != self.hidden:
            raise ValueError(f"x must have last dimension hidden = {self.hidden}, got shape "
                             f"{tuple(x.shape)}")
        tokens = x.reshape(-1, self.hidden)
        gating = topk_gating(self.router(tokens), self.top_k)
        plan = moe_routing(gating.expert_ids, self.num_experts, block_size=self.block_size)
        grouped = moe_permute(tokens, plan)
        grouped = moe_expert_mlp(grouped, self.w1, self.w3, self.w2, plan,
                                 recompute=self.recompute)
        y = moe_unpermute(grouped, plan, gating.weights)
        if x.dim() != 2:  # a view only when needed: FSDP2 warns about modules returning views
            y = y.view(x.shape)
        return y, MoEAux(gating.load_balancing_loss, gating.z_loss,
                                       gating.tokens_per_expert)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, ffn={self.ffn}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, block_size={self.block_size}, recompute={self.recompute}")


_MIXTRAL_GATE = "block_sparse_moe.gate.weight"
_MIXTRAL_EXPERT = "block_sparse_moe.experts.{e}.{w}.weight"


def moe_mlp_from_mixtral(state_dict: Mapping[str, torch.Tensor],
                         prefix: str = "") -> dict[str, torch.Tensor]:
    """``MoEMLP`` parameters from the Hugging Face Mixtral layout.

    Reads ``{prefix}block_sparse_moe.gate.weight`` ``[E, H]`` and
    ``{prefix}block_sparse_moe.experts.{e}.w1/w2/w3.weight`` (``[F, H]``, ``[H, F]``, ``[F, H]``)
    for ``e < E``; returns ``{"router.weight", "w1", "w3", "w2"}`` for ``MoEMLP.load_state_dict``.
    The prefix is the decoder layer's, e.g. ``"model.layers.3."``.
    """
    gate_key = prefix + _MIXTRAL_GATE
    if gate_key not in state_dict:
        raise KeyError(f"{gate_key!r} not in the state dict: is prefix {prefix!r} right?")
    router = state_dict[gate_key]
    out = {"router.weight": router}
    for w in ("w1", "w3", "w2"):
        keys = [prefix + _MIXTRAL_EXPERT.format(e=e, w=w) for e in range(router.shape[0])]
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise KeyError(f"expert weights missing from the state dict: {missing[:3]}")
        out[w] = torch.stack([state_dict[k] for k in keys])
    return out


def moe_mlp_to_mixtral(state_dict: Mapping[str, torch.Tensor],
                       prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of :func:`moe_mlp_from_mixtral`: ``MoEMLP.state_dict()`` to Hugging Face Mixtral
    keys under ``prefix`` (each expert's weight a view of the stacked parameter)."""
    out = {prefix + _MIXTRAL_GATE: state_dict["router.weight"]}
    for w in ("w1", "w3", "w2"):
        for e, weight in enumerate(state_dict[w].unbind(0)):
            out[prefix + _MIXTRAL_EXPERT.format(e=e, w=w)] = weight
    return out
