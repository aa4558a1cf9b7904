"""Packed-layout planning (the CPU data preparation of kernel family 1) as one import, the module it
was before the library had one module per op: ``sphinx_kernels.ops.plan_layout`` and
``sphinx_kernels.ops.pack_by_token_budget``."""
from sphinx_kernels.ops.pack_by_token_budget import (
                                                     PACK_BY_TOKEN_BUDGET_BACKENDS,
                                                     Packing,
                                                     pack_by_token_budget,
                                                     pack_by_token_budget_reference,
)
from sphinx_kernels.ops.plan_layout import (
                                                     IGNORE_INDEX,
                                                     PLAN_LAYOUT_BACKENDS,
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
                                                     plan_layout_reference,
)

__all__ = ["SOURCE_TEXT", "SOURCE_VISUAL", "SOURCE_SKIP", "SOURCE_IMAGE_BEGIN", "SOURCE_IMAGE_END",
           "SOURCE_PADDING", "IGNORE_INDEX", "ImageSpec", "SampleSpec", "LayoutInputs",
           "PackedLayout", "plan_layout", "plan_layout_reference", "layout_inputs",
           "PLAN_LAYOUT_BACKENDS", "Packing", "pack_by_token_budget",
           "pack_by_token_budget_reference", "PACK_BY_TOKEN_BUDGET_BACKENDS"]
