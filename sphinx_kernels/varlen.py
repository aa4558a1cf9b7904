"""Kernel family 1, packed sequences, as one import (the module it was before the library had one
module per op). The ops live in ``sphinx_kernels.ops``: ``gather_rows``, ``find_padding_tiles``,
``varlen_attention`` (with its peers' glue ``torch_flash`` and ``flash_attn``)."""
from sphinx_kernels.dtypes import HALF_DTYPES as FLASH_DTYPES
from sphinx_kernels.dtypes import KERNEL_DTYPES as ATTENTION_DTYPES
from sphinx_kernels.dtypes import KERNEL_DTYPES as IMAGE_DTYPES
from sphinx_kernels.ops.find_padding_tiles import (
                                                   FIND_PADDING_TILES_BACKENDS,
                                                   find_padding_tiles,
                                                   find_padding_tiles_reference,
)
from sphinx_kernels.ops.flash_attn import FLASH_ATTN
from sphinx_kernels.ops.gather_rows import (
                                                   GATHER_ROWS_BACKENDS,
                                                   MAX_GATHER_SOURCES,
                                                   gather_rows,
                                                   gather_rows_reference,
)
from sphinx_kernels.ops.torch_flash import TORCH_FLASH
from sphinx_kernels.ops.varlen_attention import (
                                                   MAX_ATTENTION_HEAD_DIM,
                                                   VARLEN_ATTENTION_BACKENDS,
                                                   varlen_attention,
                                                   varlen_attention_reference,
)

__all__ = ["gather_rows", "gather_rows_reference", "GATHER_ROWS_BACKENDS", "MAX_GATHER_SOURCES",
           "find_padding_tiles", "find_padding_tiles_reference", "FIND_PADDING_TILES_BACKENDS",
           "varlen_attention", "varlen_attention_reference", "VARLEN_ATTENTION_BACKENDS",
           "MAX_ATTENTION_HEAD_DIM", "TORCH_FLASH", "FLASH_ATTN", "ATTENTION_DTYPES",
           "FLASH_DTYPES", "IMAGE_DTYPES"]
