"""Kernel family 3, block-sparse MoE routing, as one import (the module it was before the library
had one module per op). The ops live in ``sphinx_kernels.ops``: ``topk_gating``, ``moe_routing``,
``moe_permute``, ``moe_unpermute``, ``moe_expert_mlp``."""
from sphinx_kernels.dtypes import KERNEL_DTYPES as GATING_DTYPES
from sphinx_kernels.dtypes import KERNEL_DTYPES as MLP_DTYPES
from sphinx_kernels.ops.moe_expert_mlp import (
                                               MOE_EXPERT_MLP_BACKENDS,
                                               moe_expert_mlp,
                                               moe_expert_mlp_reference,
)
from sphinx_kernels.ops.moe_permute import MOE_PERMUTE_BACKENDS, moe_permute, moe_permute_reference
from sphinx_kernels.ops.moe_routing import (
                                               MAX_NATIVE_ROUTING_EXPERTS,
                                               MOE_ROUTING_BACKENDS,
                                               RoutingPlan,
                                               moe_routing,
                                               moe_routing_reference,
                                               padded_rows_bound,
)
from sphinx_kernels.ops.moe_unpermute import (
                                               MOE_UNPERMUTE_BACKENDS,
                                               moe_unpermute,
                                               moe_unpermute_reference,
)
from sphinx_kernels.ops.topk_gating import (
                                               TOPK_GATING_BACKENDS,
                                               Gating,
                                               topk_gating,
                                               topk_gating_reference,
)

__all__ = ["Gating", "RoutingPlan", "topk_gating", "topk_gating_reference", "moe_routing",
           "moe_routing_reference", "moe_permute", "moe_permute_reference", "moe_unpermute",
           "moe_unpermute_reference", "padded_rows_bound", "TOPK_GATING_BACKENDS",
           "MOE_ROUTING_BACKENDS", "MOE_PERMUTE_BACKENDS", "MOE_UNPERMUTE_BACKENDS",
           "moe_expert_mlp", "moe_expert_mlp_reference", "MOE_EXPERT_MLP_BACKENDS",
           "MAX_NATIVE_ROUTING_EXPERTS", "GATING_DTYPES", "MLP_DTYPES"]
