// Types shared by the kernels of every family. Plain C++ only (see the family headers for why).
#pragma once

namespace sphinx_kernels {

// The element type of a float tensor, as the kernels dispatch on it.
enum class FloatKind { kFloat16, kBFloat16, kFloat32, kFloat64 };

}  // namespace sphinx_kernels
