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

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "binding.h"
#include "moe/expert_mlp_cpu.h"
#include "moe/moe.h"
#include "varlen/layout.h"
#include "varlen/varlen.h"

#ifndef SPHINX_KERNELS_CUDA_ARCHS
#define SPHINX_KERNELS_CUDA_ARCHS ""
#endif

namespace sphinx_kernels {
namespace {

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

// A tensor about to be written once from start to end. Fresh memory costs a page fault per
// 4 KiB page on its first write, which dominates a one-pass fill: asking for transparent huge pages
// (Linux, THP in "madvise" mode) makes that one fault per 2 MiB. On the 2-core CI machine a fresh
// 1.1 GB fill went from 0.34-0.80 s to 0.09 s, against 0.06 s for memory already touched. Only the
// advice changes; the tensor is an ordinary one from torch's allocator (GPU memory: no advice).
at::Tensor empty_to_fill(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#ifdef __linux__
  if (!t.is_cpu()) return t;
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + t.nbytes()) & ~(kHugePage - 1);
  // Advice only: where the kernel refuses (no THP), the fill runs on ordinary pages.
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return t;
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
  at::Tensor out = empty_to_fill({sid.size(0), first.size(1)}, first.options());
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

// --- packed-layout planning (CPU only) ------------------------------------------------------------

const int64_t* long_data(const at::Tensor& t, const char* op, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == dims &&
                  t.is_contiguous(),
              op, ": ", name, " must be a contiguous ", dims, "-D int64 CPU tensor");
  return t.data_ptr<int64_t>();
}

const bool* bool_data(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBool && t.dim() == 1 && t.is_contiguous(),
              op, ": ", name, " must be a contiguous 1-D bool CPU tensor");
  return t.data_ptr<bool>();
}

at::Tensor long_empty(int64_t size) { return at::empty({size}, at::TensorOptions().dtype(at::kLong)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
plan_layout_native(const at::Tensor& text_ids, const at::Tensor& text_lens,
                   const at::Tensor& answer_mask, const at::Tensor& images_per_sample,
                   const at::Tensor& tile_grids, const at::Tensor& skipped_tiles,
                   const at::Tensor& text_before_images, int64_t tokens_per_view, int64_t total) {
  constexpr const char* op = "plan_layout_native";
  LayoutBatch batch{long_data(text_ids, op, "text_ids", 1), long_data(text_lens, op, "text_lens", 1),
                    bool_data(answer_mask, op, "answer_mask"),
                    long_data(images_per_sample, op, "images_per_sample", 1),
                    long_data(tile_grids, op, "tile_grids", 2),
                    bool_data(skipped_tiles, op, "skipped_tiles"),
                    long_data(text_before_images, op, "text_before_images", 1), text_lens.size(0),
                    tile_grids.size(0), tokens_per_view};
  TORCH_CHECK(images_per_sample.size(0) == batch.num_samples &&
                  text_before_images.size(0) == batch.num_samples && tile_grids.size(1) == 2 &&
                  answer_mask.size(0) == text_ids.size(0) && tokens_per_view >= 1,
              op, ": inconsistent shapes");
  // Counts are read before the offsets they build are checked: guard their signs here.
  for (int64_t b = 0; b < batch.num_samples; ++b)
    TORCH_CHECK(batch.text_lens[b] >= 0 && batch.images_per_sample[b] >= 0 &&
                    batch.text_before_images[b] >= 0 &&
                    batch.text_before_images[b] <= batch.text_lens[b],
                op, ": negative count, or text_before_images past the sample's text");
  for (int64_t k = 0; k < 2 * batch.num_images; ++k)
    TORCH_CHECK(batch.tile_grids[k] >= 1, op, ": tile grids must be >= 1");
  const int64_t num_samples = batch.num_samples;
  std::vector<int64_t> rows(num_samples + 1), views(num_samples + 1), images(num_samples + 1),
      text(num_samples + 1), tiles(batch.num_images + 1);
  const LayoutOffsets offsets{rows.data(), views.data(), images.data(), text.data(), tiles.data()};
  plan_layout_counts_cpu(batch, offsets);
  // The passes below read the concatenated inputs through these offsets.
  TORCH_CHECK(images[num_samples] == batch.num_images && text[num_samples] == text_ids.size(0) &&
                  tiles[batch.num_images] == skipped_tiles.size(0),
              op, ": counts do not match the concatenated inputs");
  plan_layout_offsets_cpu(batch, offsets);
  TORCH_CHECK(total >= rows[num_samples] && total < (int64_t{1} << 31), op, ": total ", total,
              " must be in [", rows[num_samples], " packed rows, 2^31) for int32 cu_seqlens");
  at::Tensor cu_seqlens = at::empty({num_samples + 1}, at::TensorOptions().dtype(at::kInt));
  int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b <= num_samples; ++b) cu[b] = static_cast<int32_t>(rows[b]);
  const auto int32_options = at::TensorOptions().dtype(at::kInt);
  at::Tensor position_ids = empty_to_fill({total}, int32_options),
             source_ids = empty_to_fill({total}, int32_options),
             row_ids = empty_to_fill({total}, int32_options),
             labels = empty_to_fill({total}, at::TensorOptions().dtype(at::kLong)),
             visual_rows = empty_to_fill({views[num_samples] * tokens_per_view}, int32_options),
             view_starts = empty_to_fill({views[num_samples]}, int32_options);
  plan_layout_fill_cpu(batch, offsets, total,
                       LayoutOutputs{position_ids.data_ptr<int32_t>(), source_ids.data_ptr<int32_t>(),
                                     row_ids.data_ptr<int32_t>(), labels.data_ptr<int64_t>(),
                                     visual_rows.data_ptr<int32_t>(), view_starts.data_ptr<int32_t>()});
  return {cu_seqlens, position_ids, source_ids, row_ids, labels, visual_rows, view_starts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_by_token_budget_native(
    const at::Tensor& lengths, int64_t budget) {
  constexpr const char* op = "pack_by_token_budget_native";
  const int64_t* len = long_data(lengths, op, "lengths", 1);
  const int64_t n = lengths.size(0);
  for (int64_t s = 0; s < n; ++s)
    TORCH_CHECK(len[s] >= 0 && len[s] <= budget, op, ": lengths must be in [0, budget]");
  at::Tensor bin_ids = long_empty(n), placement = long_empty(n);
  const int64_t num_bins = first_fit_decreasing_cpu(len, n, budget, bin_ids.data_ptr<int64_t>(),
                                                    placement.data_ptr<int64_t>());
  at::Tensor order = long_empty(n), bin_offsets = long_empty(num_bins + 1),
             bin_tokens = long_empty(num_bins);
  group_bins_cpu(len, bin_ids.data_ptr<int64_t>(), placement.data_ptr<int64_t>(), n, num_bins,
                 order.data_ptr<int64_t>(), bin_offsets.data_ptr<int64_t>(),
                 bin_tokens.data_ptr<int64_t>());
  return {bin_ids, order, bin_offsets, bin_tokens};
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

at::ScalarType acc_type(at::ScalarType type) { return type == at::kDouble ? at::kDouble : at::kFloat; }

void check_plan_tensor(const at::Tensor& t, const char* op, const char* name, int64_t dims,
                       const at::Tensor& data) {
  TORCH_CHECK(t.dim() == dims && t.scalar_type() == at::kInt && t.device() == data.device(), op,
              ": ", name, " must be ", dims, "-D int32 on the data's device");
}

// Grouped rows [R, H] from token rows [T, H] (see moe.h); scale [T * k] or None.
at::Tensor moe_permute_native(const at::Tensor& x, const at::Tensor& position,
                              const at::Tensor& row_to_pair, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.dim() == 2, "moe_permute_native: x must be 2-D");
  check_plan_tensor(position, "moe_permute_native", "position", 2, x);
  check_plan_tensor(row_to_pair, "moe_permute_native", "row_to_pair", 1, x);
  TORCH_CHECK(position.size(0) == x.size(0), "moe_permute_native: position must be [T, k]");
  const at::Tensor src = x.contiguous();
  const at::Tensor rows = row_to_pair.contiguous();
  at::Tensor factor;
  if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == position.numel(), "moe_permute_native: scale must hold T * k values");
    factor = scale->to(acc_type(x.scalar_type())).contiguous();
  }
  at::Tensor out = at::empty({rows.size(0), src.size(1)}, src.options());
  moe_permute_cpu(float_kind(src.scalar_type()), src.data_ptr(), src.size(0), position.size(1),
                  rows.data_ptr<int32_t>(), rows.size(0), src.size(1),
                  factor.defined() ? factor.data_ptr() : nullptr, out.data_ptr());
  return out;
}

// Token rows [T, H] from grouped rows [R, H], weighted by weights [T, k] or None (see moe.h).
at::Tensor moe_unpermute_native(const at::Tensor& y, const at::Tensor& position,
                                const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(y.dim() == 2, "moe_unpermute_native: y must be 2-D");
  check_plan_tensor(position, "moe_unpermute_native", "position", 2, y);
  const at::Tensor src = y.contiguous();
  const at::Tensor pos = position.contiguous();
  at::Tensor w;
  if (weights.has_value()) {
    TORCH_CHECK(weights->numel() == pos.numel(), "moe_unpermute_native: weights must be [T, k]");
    w = weights->to(acc_type(y.scalar_type())).contiguous();
  }
  at::Tensor out = at::empty({pos.size(0), src.size(1)}, src.options());
  moe_unpermute_cpu(float_kind(src.scalar_type()), src.data_ptr(), src.size(0),
                    pos.data_ptr<int32_t>(), pos.size(0), pos.size(1), src.size(1),
                    w.defined() ? w.data_ptr() : nullptr, out.data_ptr());
  return out;
}

// dots [T, k] (float32, float64 for float64 data) of grad [T, H] with rows y[position] (see moe.h).
at::Tensor moe_pair_dots_native(const at::Tensor& grad, const at::Tensor& y,
                                const at::Tensor& position) {
  TORCH_CHECK(grad.dim() == 2 && y.dim() == 2 && grad.size(1) == y.size(1) &&
                  grad.scalar_type() == y.scalar_type() && grad.device() == y.device(),
              "moe_pair_dots_native: grad and y must be 2-D of one width, dtype and device");
  check_plan_tensor(position, "moe_pair_dots_native", "position", 2, y);
  TORCH_CHECK(position.size(0) == grad.size(0), "moe_pair_dots_native: position must be [T, k]");
  const at::Tensor g = grad.contiguous();
  const at::Tensor src = y.contiguous();
  const at::Tensor pos = position.contiguous();
  at::Tensor dots = at::empty({pos.size(0), pos.size(1)}, g.options().dtype(acc_type(g.scalar_type())));
  moe_pair_dots_cpu(float_kind(src.scalar_type()), g.data_ptr(), src.data_ptr(), src.size(0),
                    pos.data_ptr<int32_t>(), pos.size(0), pos.size(1), src.size(1),
                    dots.data_ptr());
  return dots;
}

// (weights, expert_ids, load_balancing_loss, z_loss, tokens_per_expert), as topk_gating returns.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_gating_native(
    const at::Tensor& logits, int64_t k, bool renormalize) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1 && k >= 1 && k <= logits.size(1),
              "topk_gating_native: logits must be [T, E] with E >= 1, and 1 <= k <= E");
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  const auto float_options = logits.options().dtype(at::kFloat);
  const auto int_options = logits.options().dtype(at::kInt);
  at::Tensor weights = at::empty({num_tokens, k}, float_options);
  at::Tensor expert_ids = at::empty({num_tokens, k}, int_options);
  at::Tensor load_balancing_loss = at::empty({}, float_options);
  at::Tensor z_loss = at::empty({}, float_options);
  at::Tensor tokens_per_expert = at::empty({num_experts}, int_options);
  topk_gating_cpu(float_kind(logits.scalar_type()), logits.data_ptr(), num_tokens, num_experts,
                  logits.stride(0), logits.stride(1), k, renormalize, weights.data_ptr<float>(),
                  expert_ids.data_ptr<int32_t>(), tokens_per_expert.data_ptr<int32_t>(),
                  load_balancing_loss.data_ptr<float>(), z_loss.data_ptr<float>());
  return {weights, expert_ids, load_balancing_loss, z_loss, tokens_per_expert};
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
  m.def("plan_layout_native(Tensor text_ids, Tensor text_lens, Tensor answer_mask, "
        "Tensor images_per_sample, Tensor tile_grids, Tensor skipped_tiles, "
        "Tensor text_before_images, int tokens_per_view, int total) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("pack_by_token_budget_native(Tensor lengths, int budget) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_routing_native(Tensor expert_ids, int num_experts, int block_size, int num_rows) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_permute_native(Tensor x, Tensor position, Tensor row_to_pair, Tensor? scale) -> Tensor");
  m.def("moe_unpermute_native(Tensor y, Tensor position, Tensor? weights) -> Tensor");
  m.def("moe_pair_dots_native(Tensor grad, Tensor y, Tensor position) -> Tensor");
  m.def("topk_gating_native(Tensor logits, int k, bool renormalize) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_expert_mlp_native(Tensor x_grouped, Tensor w1, Tensor w3, Tensor w2, "
        "Tensor tokens_per_expert, Tensor padded_offsets, bool store_pre) -> (Tensor, Tensor, Tensor)");
  m.def("moe_expert_mlp_backward_native(Tensor grad_y, Tensor x_grouped, Tensor w1, Tensor w3, "
        "Tensor w2, Tensor tokens_per_expert, Tensor padded_offsets, Tensor h1, Tensor h3) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sphinx_kernels, CPU, m) {
  m.impl("gather_rows_native", &sphinx_kernels::gather_rows_native);
  m.impl("segment_sum_rows_native", &sphinx_kernels::segment_sum_rows_native);
  m.impl("plan_layout_native", &sphinx_kernels::plan_layout_native);
  m.impl("pack_by_token_budget_native", &sphinx_kernels::pack_by_token_budget_native);
  m.impl("moe_routing_native", &sphinx_kernels::moe_routing_native);
  m.impl("moe_permute_native", &sphinx_kernels::moe_permute_native);
  m.impl("moe_unpermute_native", &sphinx_kernels::moe_unpermute_native);
  m.impl("moe_pair_dots_native", &sphinx_kernels::moe_pair_dots_native);
  m.impl("topk_gating_native", &sphinx_kernels::topk_gating_native);
  m.impl("moe_expert_mlp_native", &sphinx_kernels::moe_expert_mlp_native);
  m.impl("moe_expert_mlp_backward_native", &sphinx_kernels::moe_expert_mlp_backward_native);
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
