"""Kernel family 3, block-sparse MoE routing, as one import (the module it was before the library
had one module per op). The ops live in ``sphinx_kernels.ops``: ``topk_gating``, ``moe_routing``,
``moe_permute``, ``moe_unpermute``, ``moe_expert_mlp``. Every public name of those modules (their
``__all__``) is re-exported here."""
from sphinx_kernels.dtypes import KERNEL_DTYPES as GATING_DTYPES
from sphinx_kernels.dtypes import KERNEL_DTYPES as MLP_DTYPES
from sphinx_kernels.ops.moe_expert_mlp import *
from sphinx_kernels.ops.moe_permute import *
from sphinx_kernels.ops.moe_routing import *
from sphinx_kernels.ops.moe_unpermute import *
from sphinx_kernels.ops.topk_gating import *
