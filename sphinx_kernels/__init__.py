"""sphinx-kernels: CUDA and Triton kernels for training multimodal LLMs of the SPHINX-X family.

Public ops (each a ``torch.library`` custom op with autograd, usable under ``torch.compile``):

    gather_rows(sources, source_ids, row_ids)   assemble packed rows from several tables
    find_padding_tiles(images, tile, pad_value)  which tiles of pre-padded images are pure padding
    varlen_attention(q, k, v, cu_seqlens_q, ...) flash attention over packed sequences (GQA, causal
                                                 bottom-right, prefix-LM)
    apply_rotary(x or (q, k), cos, sin, pos)    rotary embedding of packed tokens (HF layout)
    patch_projection(features, weight, bias, grid=)  several encoders resampled to one grid, one
                                                 Linear (+ LayerNorm), rows into a packed sequence
    topk_gating(logits, k)                      MoE router: softmax, top-k, auxiliary losses
    moe_routing(expert_ids, num_experts)        routing plan: per-expert block-padded row order
    moe_permute(x, plan)                        token rows to expert-grouped order
    moe_unpermute(y_grouped, plan, weights)     expert rows back to tokens, gate-weighted
    moe_expert_mlp(x_grouped, w1, w3, w2, plan) every expert's SwiGLU MLP as grouped GEMMs

CPU-side batch preparation (torch.library ops too, on CPU tensors; no autograd):

    plan_layout(inputs, tokens_per_view)        packed layout of a batch: cu_seqlens, positions,
                                                gather_rows sources/rows, labels, visual rows
    pack_by_token_budget(lengths, budget)       first-fit-decreasing packing into token budgets

Modules (``sphinx_kernels.nn``), drop-in layers over these ops:

    VarlenSelfAttention(hidden, heads, kv_heads)  Llama attention on packed tokens (q/k/v/o_proj)
    PatchProjector(in_channels, out_features, grid)  fused multi-encoder projection + LayerNorm
    MoEMLP(hidden, ffn, num_experts, top_k)       Mixtral-style dropless sparse MoE layer

Every op takes ``backend=`` to force an implementation; ``python -m sphinx_kernels.info`` shows
which backends are available here. Importing the package touches neither CUDA nor the compiled
extension.
"""
from sphinx_kernels import nn
from sphinx_kernels.backends import BackendUnavailableError
from sphinx_kernels.ops.apply_rotary import apply_rotary
from sphinx_kernels.ops.find_padding_tiles import find_padding_tiles
from sphinx_kernels.ops.gather_rows import gather_rows
from sphinx_kernels.ops.moe_expert_mlp import moe_expert_mlp
from sphinx_kernels.ops.moe_permute import moe_permute
from sphinx_kernels.ops.moe_routing import RoutingPlan, moe_routing
from sphinx_kernels.ops.moe_unpermute import moe_unpermute
from sphinx_kernels.ops.pack_by_token_budget import Packing, pack_by_token_budget
from sphinx_kernels.ops.patch_projection import patch_projection
from sphinx_kernels.ops.plan_layout import (
    IGNORE_INDEX,
    SOURCE_IMAGE_BEGIN,
    SOURCE_IMAGE_END,
    SOURCE_PADDING,
    SOURCE_SKIP,
    SOURCE_TEXT,
    SOURCE_VISUAL,
    ImageSpec,
    LayoutInputs,
    PackedLayout,
    SampleSpec,
    layout_inputs,
    plan_layout,
)
from sphinx_kernels.ops.topk_gating import Gating, topk_gating
from sphinx_kernels.ops.varlen_attention import varlen_attention

__version__ = "0.1.0"
__all__ = ["nn", "BackendUnavailableError",
           # family 1: packed sequences
           "gather_rows", "find_padding_tiles", "varlen_attention", "apply_rotary",
           "IGNORE_INDEX", "SOURCE_IMAGE_BEGIN", "SOURCE_IMAGE_END", "SOURCE_PADDING",
           "SOURCE_SKIP", "SOURCE_TEXT", "SOURCE_VISUAL", "ImageSpec", "LayoutInputs",
           "PackedLayout", "Packing", "SampleSpec", "layout_inputs", "pack_by_token_budget",
           "plan_layout",
           # family 2: patch projection
           "patch_projection",
           # family 3: mixture of experts
           "Gating", "RoutingPlan", "topk_gating", "moe_routing", "moe_permute", "moe_unpermute",
           "moe_expert_mlp"]
