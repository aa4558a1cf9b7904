// The compiled ops: TORCH_LIBRARY schemas and the thin tensor-taking layer over the raw kernels.
//
// These are backends, not the public API: sphinx_kernels/<family>.py validates inputs, picks a backend
// per call and wraps these in autograd-aware custom ops. The checks here only guard the kernels
// against misuse of the raw ops themselves.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#ifdef SPHINX_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstring>
#include <tuple>
#include <vector>

#include "moe/moe.h"
#include "varlen/varlen.h"

#ifndef SPHINX_KERNELS_CUDA_ARCHS
#define SPHINX_KERNELS_CUDA_ARCHS ""
#endif

namespace sphinx_kernels {
namespace {

FloatKind float_kind(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return FloatKind::kFloat16;
    case at::kBFloat16: return FloatKind::kBFloat16;
    case at::kFloat: return FloatKind::kFloat32;
    case at::kDouble: return FloatKind::kFloat64;
    default: TORCH_CHECK(false, "sphinx_kernels: expected a float16, bfloat16, float32 or float64 tensor, got ", type);
  }
}

// NaN in the element type, repeated over 16 bytes (see PoisonPattern).
PoisonPattern nan_pattern(at::ScalarType type) {
  PoisonPattern poison{};
  const uint16_t half_nan = 0x7E00, bf16_nan = 0x7FC0;
  const uint32_t float_nan = 0x7FC00000u;
  const uint64_t double_nan = 0x7FF8000000000000ull;
  for (int offset = 0; offset < 16;) {
    switch (float_kind(type)) {
      case FloatKind::kFloat16: std::memcpy(poison.bytes + offset, &half_nan, 2); offset += 2; break;
      case FloatKind::kBFloat16: std::memcpy(poison.bytes + offset, &bf16_nan, 2); offset += 2; break;
      case FloatKind::kFloat32: std::memcpy(poison.bytes + offset, &float_nan, 4); offset += 4; break;
      case FloatKind::kFloat64: std::memcpy(poison.bytes + offset, &double_nan, 8); offset += 8; break;
    }
  }
  return poison;
}

void* stream_for(const at::Tensor& t) {
#ifdef SPHINX_KERNELS_WITH_CUDA
  if (t.is_cuda()) return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#endif
  return nullptr;
}

at::Tensor gather_rows_native(at::TensorList sources, const at::Tensor& source_ids,
                              const at::Tensor& row_ids) {
  TORCH_CHECK(!sources.empty() && sources.size() <= static_cast<size_t>(kMaxGatherSources),
              "gather_rows_native: expected 1 to ", kMaxGatherSources, " sources, got ", sources.size());
  const at::Tensor& first = sources[0];
  TORCH_CHECK(source_ids.dim() == 1 && row_ids.dim() == 1 && source_ids.size(0) == row_ids.size(0),
              "gather_rows_native: source_ids and row_ids must be 1-D of one length");
  TORCH_CHECK(source_ids.scalar_type() == row_ids.scalar_type() &&
                  (source_ids.scalar_type() == at::kInt || source_ids.scalar_type() == at::kLong),
              "gather_rows_native: source_ids and row_ids must both be int32 or both int64");
  GatherSources table{};
  table.count = static_cast<int>(sources.size());
  for (size_t s = 0; s < sources.size(); ++s) {
    const at::Tensor& src = sources[s];
    TORCH_CHECK(src.dim() == 2 && src.size(1) == first.size(1) &&
                    src.scalar_type() == first.scalar_type() && src.device() == first.device() &&
                    (src.stride(1) == 1 || src.size(1) <= 1),
                "gather_rows_native: sources must be 2-D, unit-stride rows, one width, dtype and device");
    table.base[s] = src.data_ptr();
    table.row_stride_bytes[s] = src.stride(0) * src.element_size();
    table.rows[s] = src.size(0);
  }
  TORCH_CHECK(source_ids.device() == first.device() && row_ids.device() == first.device(),
              "gather_rows_native: indices must be on the sources' device");
  const at::Tensor sid = source_ids.contiguous();
  const at::Tensor rid = row_ids.contiguous();
  at::Tensor out = at::empty({sid.size(0), first.size(1)}, first.options());
  const int64_t row_bytes = first.size(1) * first.element_size();
  const bool int64_index = sid.scalar_type() == at::kLong;
  const PoisonPattern poison = nan_pattern(first.scalar_type());
  if (first.is_cuda()) {
#ifdef SPHINX_KERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(first.device());
    gather_rows_cuda(table, sid.data_ptr(), rid.data_ptr(), int64_index, sid.size(0), row_bytes,
                     poison, out.data_ptr(), stream_for(first));
#endif
  } else {
    gather_rows_cpu(table, sid.data_ptr(), rid.data_ptr(), int64_index, sid.size(0), row_bytes,
                    poison, out.data_ptr());
  }
  return out;
}

at::Tensor segment_sum_rows_native(const at::Tensor& rows, const at::Tensor& order,
                                   const at::Tensor& offsets) {
  TORCH_CHECK(rows.dim() == 2, "segment_sum_rows_native: rows must be 2-D");
  TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kLong && offsets.dim() == 1 &&
                  offsets.scalar_type() == at::kLong && offsets.size(0) >= 1,
              "segment_sum_rows_native: order and offsets must be 1-D int64, offsets non-empty");
  TORCH_CHECK(order.device() == rows.device() && offsets.device() == rows.device(),
              "segment_sum_rows_native: all tensors must be on one device");
  const at::Tensor src = rows.contiguous();
  const at::Tensor ord = order.contiguous();
  const at::Tensor off = offsets.contiguous();
  const int64_t segments = off.size(0) - 1;
  at::Tensor out = at::empty({segments, src.size(1)}, src.options());
  const FloatKind kind = float_kind(src.scalar_type());
  if (src.is_cuda()) {
#ifdef SPHINX_KERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(src.device());
    segment_sum_rows_cuda(kind, src.data_ptr(), ord.data_ptr<int64_t>(), off.data_ptr<int64_t>(),
                          segments, src.size(1), out.data_ptr(), stream_for(src));
#endif
  } else {
    segment_sum_rows_cpu(kind, src.data_ptr(), ord.data_ptr<int64_t>(), off.data_ptr<int64_t>(),
                         segments, src.size(1), out.data_ptr());
  }
  return out;
}

// Returns (tokens_per_expert, padded_offsets, position, row_to_pair), int32, as moe_routing does.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_routing_native(
    const at::Tensor& expert_ids, int64_t num_experts, int64_t block_size, int64_t num_rows) {
  TORCH_CHECK(expert_ids.dim() == 2 &&
                  (expert_ids.scalar_type() == at::kInt || expert_ids.scalar_type() == at::kLong),
              "moe_routing_native: expert_ids must be [T, k] int32 or int64");
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxRoutingExperts && block_size >= 1 &&
                  num_rows >= 0 && num_rows < (int64_t{1} << 31),
              "moe_routing_native: need 1 <= num_experts <= ", kMaxRoutingExperts,
              ", block_size >= 1 and 0 <= num_rows < 2^31");
  const at::Tensor ids = expert_ids.contiguous();
  const int64_t num_pairs = ids.numel();
  const auto options = ids.options().dtype(at::kInt);
  at::Tensor tokens_per_expert = at::empty({num_experts}, options);
  at::Tensor padded_offsets = at::empty({num_experts + 1}, options);
  at::Tensor position = at::empty({ids.size(0), ids.size(1)}, options);
  at::Tensor row_to_pair = at::empty({num_rows}, options);
  const bool int64_ids = ids.scalar_type() == at::kLong;
  if (ids.is_cuda()) {
#ifdef SPHINX_KERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(ids.device());
    at::Tensor scratch = at::empty({routing_scratch_ints(num_pairs, num_experts)}, options);
    moe_routing_cuda(ids.data_ptr(), int64_ids, num_pairs, num_experts, block_size, num_rows,
                     tokens_per_expert.data_ptr<int32_t>(), padded_offsets.data_ptr<int32_t>(),
                     position.data_ptr<int32_t>(), row_to_pair.data_ptr<int32_t>(),
                     scratch.data_ptr<int32_t>(), stream_for(ids));
#endif
  } else {
    moe_routing_cpu(ids.data_ptr(), int64_ids, num_pairs, num_experts, block_size, num_rows,
                    tokens_per_expert.data_ptr<int32_t>(), padded_offsets.data_ptr<int32_t>(),
                    position.data_ptr<int32_t>(), row_to_pair.data_ptr<int32_t>());
  }
  return {tokens_per_expert, padded_offsets, position, row_to_pair};
}

#ifdef SPHINX_KERNELS_WITH_CUDA
at::Tensor find_padding_tiles_native(const at::Tensor& images, const at::Tensor& pad,
                                     int64_t tile_h, int64_t tile_w) {
  TORCH_CHECK(images.dim() == 4 && tile_h > 0 && tile_w > 0 && images.size(2) % tile_h == 0 &&
                  images.size(3) % tile_w == 0,
              "find_padding_tiles_native: images must be [N, C, H, W] with H, W multiples of the tile");
  TORCH_CHECK(pad.scalar_type() == at::kFloat && pad.dim() == 1 && pad.size(0) == images.size(1) &&
                  pad.device() == images.device(),
              "find_padding_tiles_native: pad must be float32 [C] on the images' device");
  const ImageLayout layout{images.size(0),  images.size(1),   images.size(2) / tile_h,
                           images.size(3) / tile_w, tile_h, tile_w, images.stride(0),
                           images.stride(1), images.stride(2), images.stride(3)};
  const at::Tensor pad_values = pad.contiguous();
  at::Tensor flags = at::empty({layout.num_images, layout.tiles_h, layout.tiles_w},
                               images.options().dtype(at::kBool));
  const c10::cuda::CUDAGuard guard(images.device());
  find_padding_tiles_cuda(float_kind(images.scalar_type()), images.data_ptr(), layout,
                          pad_values.data_ptr<float>(), flags.data_ptr<bool>(), stream_for(images));
  return flags;
}
#endif

}  // namespace
}  // namespace sphinx_kernels

TORCH_LIBRARY(sphinx_kernels, m) {
  m.def("gather_rows_native(Tensor[] sources, Tensor source_ids, Tensor row_ids) -> Tensor");
  m.def("segment_sum_rows_native(Tensor rows, Tensor order, Tensor offsets) -> Tensor");
  m.def("find_padding_tiles_native(Tensor images, Tensor pad, int tile_h, int tile_w) -> Tensor");
  m.def("moe_routing_native(Tensor expert_ids, int num_experts, int block_size, int num_rows) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sphinx_kernels, CPU, m) {
  m.impl("gather_rows_native", &sphinx_kernels::gather_rows_native);
  m.impl("segment_sum_rows_native", &sphinx_kernels::segment_sum_rows_native);
  m.impl("moe_routing_native", &sphinx_kernels::moe_routing_native);
}

#ifdef SPHINX_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(sphinx_kernels, CUDA, m) {
  m.impl("gather_rows_native", &sphinx_kernels::gather_rows_native);
  m.impl("segment_sum_rows_native", &sphinx_kernels::segment_sum_rows_native);
  m.impl("find_padding_tiles_native", &sphinx_kernels::find_padding_tiles_native);
  m.impl("moe_routing_native", &sphinx_kernels::moe_routing_native);
}
#endif

// `import sphinx_kernels._C` registers the ops above; the module itself only says what was built.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "Compiled kernels of sphinx_kernels (ops: torch.ops.sphinx_kernels).",
                                   -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef SPHINX_KERNELS_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", SPHINX_KERNELS_CUDA_ARCHS) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
