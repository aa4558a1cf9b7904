"""``apply_rotary`` as it was imported before the library had one module per op; it lives in
``sphinx_kernels.ops.apply_rotary``."""
from sphinx_kernels.dtypes import KERNEL_DTYPES as ROTARY_DTYPES
from sphinx_kernels.ops.apply_rotary import (
                                             APPLY_ROTARY_BACKENDS,
                                             apply_rotary,
                                             apply_rotary_reference,
)

__all__ = ["apply_rotary", "apply_rotary_reference", "APPLY_ROTARY_BACKENDS", "ROTARY_DTYPES"]
