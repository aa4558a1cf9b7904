// Helpers shared by the binding files (registration.cpp, attention_ops.cpp): the tensor-taking layer
// over the plain-C++ kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include "common.h"

namespace sphinx_kernels {

inline FloatKind float_kind(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return FloatKind::kFloat16;
    case at::kBFloat16: return FloatKind::kBFloat16;
    case at::kFloat: return FloatKind::kFloat32;
    case at::kDouble: return FloatKind::kFloat64;
    default: TORCH_CHECK(false, "sphinx_kernels: expected a float16, bfloat16, float32 or float64 tensor, got ", type);
  }
}

}  // namespace sphinx_kernels
