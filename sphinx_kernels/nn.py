"""Drop-in modules over the ops, for users' own models:

    VarlenSelfAttention   q/k/v projections, rotary, varlen flash attention, output projection (GQA)

Parameter names follow the Hugging Face models they replace, so checkpoints load unchanged. The modules
know nothing of parallelism (FSDP, activation checkpointing and compile are applied from outside).
"""
from __future__ import annotations

import torch

from sphinx_kernels.rotary import apply_rotary
from sphinx_kernels.varlen import varlen_attention

__all__ = ["VarlenSelfAttention", "rotary_tables"]


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
        bias: biases on q/k/v projections (Qwen-style); the output projection never has one, like Llama.
        rope_theta: rotary base; ``max_position_embeddings``: rows of the rotary tables.

    Parameters (names as Llama's, so its checkpoints load unchanged): ``q_proj.weight [Hq*D, H]``,
    ``k_proj.weight [Hkv*D, H]``, ``v_proj.weight [Hkv*D, H]``, ``o_proj.weight [H, Hq*D]``. The rotary
    tables ``rotary_cos``, ``rotary_sin`` (``[P, D]`` float32) are buffers that are not saved; after
    building the module on the meta device, call :meth:`reset_rotary` once it is materialised.

    ``forward(x, cu_seqlens, position_ids, *, max_seqlen=None, prefix_lens=None)``: ``x`` ``[T, H]``
    packed tokens, ``cu_seqlens`` int32 ``[B + 1]``, ``position_ids`` ``[T]`` (e.g. from
    ``PackedLayout``), ``prefix_lens`` optional int32 ``[B]``; returns ``[T, H]`` in ``x``'s dtype.
    Rows past ``cu_seqlens[-1]`` come out as the output projection of zero (``0``, there is no bias).
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
        """Fills the rotary tables (float32, Hugging Face layout: each half of a row holds the angles)."""
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
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                               causal=True, prefix_lens=prefix_lens)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))


def rotary_tables(positions: int, head_dim: int, theta: float = 10000.0,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary tables: ``cos``, ``sin`` ``[positions, head_dim]`` float32, angle
    ``p * theta ** (-2i / head_dim)`` in column ``i`` and again in column ``i + head_dim / 2``."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(positions, dtype=torch.float64, device=device)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=1)
    return angles.cos().float(), angles.sin().float()
