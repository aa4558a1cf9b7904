"""sphinx-kernels: CUDA and Triton kernels for training multimodal LLMs of the SPHINX-X family.

Public ops (each a ``torch.library`` custom op with autograd, usable under ``torch.compile``):

    gather_rows(sources, source_ids, row_ids)   assemble packed rows from several tables
    find_padding_tiles(images, tile, pad_value)  which tiles of pre-padded images are pure padding
    patch_projection(features, weight, bias, grid=)  several encoders resampled to one grid, one
                                                 Linear (+ LayerNorm), rows into a packed sequence
    topk_gating(logits, k)                      MoE router: softmax, top-k, auxiliary losses
    moe_routing(expert_ids, num_experts)        routing plan: per-expert block-padded row order
    moe_permute(x, plan)                        token rows to expert-grouped order
    moe_unpermute(y_grouped, plan, weights)     expert rows back to tokens, gate-weighted

Every op takes ``backend=`` to force an implementation; ``python -m sphinx_kernels.info`` shows which
backends are available here. Importing the package touches neither CUDA nor the compiled extension.
"""
from sphinx_kernels.backends import BackendUnavailableError
from sphinx_kernels.moe import (Gating, RoutingPlan, moe_permute, moe_routing, moe_unpermute,
                                topk_gating)
from sphinx_kernels.projection import patch_projection
from sphinx_kernels.varlen import find_padding_tiles, gather_rows

__version__ = "0.1.0"
__all__ = ["BackendUnavailableError", "Gating", "RoutingPlan", "find_padding_tiles", "gather_rows",
           "moe_permute", "moe_routing", "moe_unpermute", "patch_projection", "topk_gating"]
