"""Packed-layout planning (the CPU data preparation of kernel family 1) as one import, the module it
was before the library had one module per op: ``sphinx_kernels.ops.plan_layout`` and
``sphinx_kernels.ops.pack_by_token_budget``. Every public name of those modules (their
``__all__``) is re-exported here."""
from sphinx_kernels.ops.pack_by_token_budget import *
from sphinx_kernels.ops.plan_layout import *
