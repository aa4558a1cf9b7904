"""Kernel family 1, packed sequences, as one import (the module it was before the library had one
module per op). The ops live in ``sphinx_kernels.ops``: ``gather_rows``, ``find_padding_tiles``,
``varlen_attention`` (with its peers' glue ``torch_flash`` and ``flash_attn``). Every public name
of those modules (their ``__all__``) is re-exported here."""
from sphinx_kernels.dtypes import HALF_DTYPES as FLASH_DTYPES
from sphinx_kernels.dtypes import KERNEL_DTYPES as ATTENTION_DTYPES
from sphinx_kernels.dtypes import KERNEL_DTYPES as IMAGE_DTYPES
from sphinx_kernels.ops.find_padding_tiles import *
from sphinx_kernels.ops.flash_attn import FLASH_ATTN
from sphinx_kernels.ops.gather_rows import *
from sphinx_kernels.ops.torch_flash import TORCH_FLASH
from sphinx_kernels.ops.varlen_attention import *
