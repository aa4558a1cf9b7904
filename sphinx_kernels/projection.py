"""Kernel family 2, the fused multi-encoder patch projection, as it was imported before the library
had one module per op; it lives in ``sphinx_kernels.ops.patch_projection``."""
from sphinx_kernels.dtypes import KERNEL_DTYPES
from sphinx_kernels.ops.patch_projection import (
                                                 PATCH_PROJECTION_BACKENDS,
                                                 FeatureLayout,
                                                 feature_layouts,
                                                 patch_projection,
                                                 patch_projection_reference,
)

__all__ = ["patch_projection", "patch_projection_reference", "feature_layouts", "FeatureLayout",
           "PATCH_PROJECTION_BACKENDS", "KERNEL_DTYPES"]
