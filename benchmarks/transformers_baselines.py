"""Baselines that are Hugging Face transformers' own code, not copies of it: the rotary embedding of
Llama (``apply_rotary_pos_emb``), Llama's attention module with its eager attention, and Mixtral's
sparse MoE block, built around the weights a benchmark gives them. Without transformers (``pip
install "sphinx-kernels[test]"``) the rows that need them are skipped with the reason
(``benchmarks.peers``: the ``transformers`` peer).
"""
from __future__ import annotations

import torch


def apply_rotary_pos_emb():
    """``transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q, k, cos, sin,
    unsqueeze_dim=1)``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rotary
    return rotary


def llama_attention(q_proj: torch.nn.Linear, k_proj: torch.nn.Linear, v_proj: torch.nn.Linear,
                    o_proj: torch.nn.Linear, num_heads: int, num_kv_heads: int,
                    head_dim: int) -> torch.nn.Module:
    """transformers' ``LlamaAttention`` with eager attention, holding the given projections (the
    same modules, so the same parameters): call it with ``hidden_states [B, L, H]``,
    ``position_embeddings = (cos, sin)`` ``[B, L, D]`` and an additive ``attention_mask``
    ``[B, 1, L, L]``; it returns ``(output, attention weights)``."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention
    config = LlamaConfig(hidden_size=q_proj.in_features, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, head_dim=head_dim,
                         attention_bias=q_proj.bias is not None)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        attention = LlamaAttention(config, layer_idx=0)
    attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj = (
        q_proj, k_proj, v_proj, o_proj)
    return attention


def mixtral_moe_block(router: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                      top_k: int, experts_implementation: str = "eager") -> torch.nn.Module:
    """transformers' ``MixtralSparseMoeBlock`` (its router, softmax / top-k, and its experts: the
    eager loop over experts by default, or another of its ``experts_implementation`` values, such
    as ``"grouped_mm"``, which ``from_pretrained`` picks where it can) holding copies of the router
    ``[E, H]`` and the stacked expert weights ``w1``, ``w3`` ``[E, F, H]`` and ``w2`` ``[E, H, F]``,
    in whichever layout the installed release keeps them (one ``gate_up_proj`` from 5.0, one module
    per expert before, which knows only the eager loop). Call it with ``[B, L, H]``; it returns the
    output (and, before 5.0, the router logits)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    num_experts, ffn, hidden = w1.shape
    config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=num_experts,
                           num_experts_per_tok=top_k)
    config._experts_implementation = experts_implementation
    block = MixtralSparseMoeBlock(config).to(device=w1.device, dtype=w1.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(router)
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):
            experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=1))
            experts.down_proj.copy_(w2)
        else:
            for e, expert in enumerate(experts):
                expert.w1.weight.copy_(w1[e])
                expert.w3.weight.copy_(w3[e])
                expert.w2.weight.copy_(w2[e])
    return block


def moe_block_output(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's output for tokens ``[T, H]``, as ``[T, H]``."""
    out = block(x[None])
    return (out[0] if isinstance(out, tuple) else out)[0]
