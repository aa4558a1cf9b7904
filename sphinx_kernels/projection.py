"""Kernel family 2, the fused multi-encoder patch projection, as it was imported before the library
had one module per op; it lives in ``sphinx_kernels.ops.patch_projection``. Every public name of
those modules (their ``__all__``) is re-exported here."""
from sphinx_kernels.dtypes import KERNEL_DTYPES
from sphinx_kernels.ops.patch_projection import *
