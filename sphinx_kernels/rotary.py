"""``apply_rotary`` as it was imported before the library had one module per op; it lives in
``sphinx_kernels.ops.apply_rotary``. Every public name of those modules (their ``__all__``) is
re-exported here."""
from sphinx_kernels.dtypes import KERNEL_DTYPES as ROTARY_DTYPES
from sphinx_kernels.ops.apply_rotary import *
