// The compiled CPU ops of the attention path: apply_rotary_native and varlen_attention_native, the
// cpp backends of apply_rotary and varlen_attention (sphinx_kernels/ops/*.py validate the calls and
// pick the backend; the checks here only guard the kernels against misuse of the raw ops).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "binding.h"
#include "varlen/varlen.h"

namespace sphinx_kernels {
namespace {

bool is_kernel_float(at::ScalarType type) {
  return type == at::kHalf || type == at::kBFloat16 || type == at::kFloat;
}

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 3 && is_kernel_float(t.scalar_type()) &&
                  (t.stride(2) == 1 || t.size(2) <= 1),
              op, ": ", name, " must be a [T, H, D] float16/bfloat16/float32 CPU tensor with unit "
              "stride along D");
}

// A 1-D int32 CPU tensor of `size` entries, contiguous (a copy when it is a strided view).
at::Tensor int32_values(const at::Tensor& t, const char* op, const char* name, int64_t size) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == 1 &&
                  t.size(0) == size,
              op, ": ", name, " must be an int32 CPU tensor of ", size, " entries");
  return t.contiguous();
}

// Offsets [0, ..., <= total] and non-decreasing: the kernel reads rows through them unchecked.
void check_offsets(const int32_t* offsets, int64_t count, int64_t total, const char* name) {
  TORCH_CHECK(offsets[0] == 0, "varlen_attention_native: ", name, "[0] must be 0");
  for (int64_t b = 0; b < count; ++b)
    TORCH_CHECK(offsets[b + 1] >= offsets[b], "varlen_attention_native: ", name,
                " must be non-decreasing");
  TORCH_CHECK(offsets[count] <= total, "varlen_attention_native: ", name, " exceeds the rows");
}

std::tuple<at::Tensor, at::Tensor> apply_rotary_native(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& cos, const at::Tensor& sin,
                                                       const at::Tensor& position_ids,
                                                       bool transpose) {
  constexpr const char* op = "apply_rotary_native";
  check_rows(q, op, "q");
  check_rows(k, op, "k");
  const int64_t tokens = q.size(0), dim = q.size(2);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && k.size(0) == tokens && k.size(2) == dim &&
                  dim % 2 == 0,
              op, ": q and k must share dtype, T and an even D");
  TORCH_CHECK(cos.device().is_cpu() && cos.dim() == 2 && cos.size(1) == dim &&
                  is_kernel_float(cos.scalar_type()) && cos.stride(1) == 1 &&
                  sin.sizes() == cos.sizes() && sin.strides() == cos.strides() &&
                  sin.scalar_type() == cos.scalar_type() && sin.device().is_cpu(),
              op, ": cos and sin must be [P, D] CPU tables of one dtype and layout, unit stride "
              "along D");
  TORCH_CHECK(position_ids.device().is_cpu() && position_ids.dim() == 1 &&
                  position_ids.size(0) == tokens &&
                  (position_ids.scalar_type() == at::kInt || position_ids.scalar_type() == at::kLong),
              op, ": position_ids must be [T] int32 or int64 on the CPU");
  const at::Tensor positions = position_ids.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  const RotaryInputs inputs{float_kind(q.scalar_type()),
                            float_kind(cos.scalar_type()),
                            cos.data_ptr(),
                            sin.data_ptr(),
                            cos.size(0),
                            cos.stride(0),
                            positions.data_ptr(),
                            positions.scalar_type() == at::kLong,
                            tokens,
                            dim,
                            transpose};
  const RotaryTensor parts[2] = {
      {q.data_ptr(), q.size(1), q.stride(0), q.stride(1), q_out.data_ptr()},
      {k.data_ptr(), k.size(1), k.stride(0), k.stride(1), k_out.data_ptr()}};
  apply_rotary_cpu(inputs, parts, 2);
  return {q_out, k_out};
}

// (out [Tq, Hq, D], lse float32 [Hq, Tq]), as varlen_attention's backends return them. The bounds
// and the deterministic flag are the op's common arguments: the kernel needs neither (it reads
// every row through the offsets, and has no backward).
std::tuple<at::Tensor, at::Tensor> varlen_attention_native(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& prefix_lens,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double softmax_scale,
    bool deterministic) {
  constexpr const char* op = "varlen_attention_native";
  check_rows(q, op, "q");
  check_rows(k, op, "k");
  check_rows(v, op, "v");
  const int64_t heads = q.size(1), kv_heads = k.size(1), dim = q.size(2);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  k.size(2) == dim && v.sizes() == k.sizes() && kv_heads > 0 &&
                  heads % kv_heads == 0,
              op, ": k and v must be [Tk, Hkv, D] of q's dtype and D, Hkv dividing q's heads");
  TORCH_CHECK(std::isfinite(softmax_scale), op, ": softmax_scale must be finite");
  const int64_t num_seqs = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK(num_seqs >= 0, op, ": cu_seqlens_q must have B + 1 >= 1 entries");
  const at::Tensor offsets_q = int32_values(cu_seqlens_q, op, "cu_seqlens_q", num_seqs + 1);
  const at::Tensor offsets_k = int32_values(cu_seqlens_k, op, "cu_seqlens_k", num_seqs + 1);
  const int32_t* cu_q = offsets_q.data_ptr<int32_t>();
  const int32_t* cu_k = offsets_k.data_ptr<int32_t>();
  check_offsets(cu_q, num_seqs, q.size(0), "cu_seqlens_q");
  check_offsets(cu_k, num_seqs, k.size(0), "cu_seqlens_k");
  at::Tensor prefix_values;
  const int32_t* prefix = nullptr;
  if (prefix_lens.has_value()) {
    prefix_values = int32_values(*prefix_lens, op, "prefix_lens", num_seqs);
    prefix = prefix_values.data_ptr<int32_t>();
    for (int64_t b = 0; b < num_seqs; ++b)
      TORCH_CHECK(prefix[b] >= 0 && prefix[b] <= cu_k[b + 1] - cu_k[b], op,
                  ": prefix_lens[b] must be in [0, the key length of sequence b]");
  }
  at::Tensor out = at::zeros(q.sizes(), q.options());
  at::Tensor lse = at::full({heads, q.size(0)}, -std::numeric_limits<float>::infinity(),
                            q.options().dtype(at::kFloat));
  const VarlenAttentionInputs inputs{float_kind(q.scalar_type()),
                                     q.data_ptr(), q.stride(0), q.stride(1),
                                     k.data_ptr(), k.stride(0), k.stride(1),
                                     v.data_ptr(), v.stride(0), v.stride(1),
                                     cu_q, cu_k, prefix,
                                     num_seqs, q.size(0), heads, kv_heads, dim,
                                     causal, static_cast<float>(softmax_scale),
                                     out.data_ptr(), lse.data_ptr<float>()};
  varlen_attention_forward_cpu(inputs);
  return {out, lse};
}

}  // namespace
}  // namespace sphinx_kernels

TORCH_LIBRARY_FRAGMENT(sphinx_kernels, m) {
  m.def("apply_rotary_native(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor position_ids, "
        "bool transpose) -> (Tensor, Tensor)");
  m.def("varlen_attention_native(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, Tensor? prefix_lens, int max_seqlen_q, int max_seqlen_k, bool causal, "
        "float softmax_scale, bool deterministic) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sphinx_kernels, CPU, m) {
  m.impl("apply_rotary_native", &sphinx_kernels::apply_rotary_native);
  m.impl("varlen_attention_native", &sphinx_kernels::varlen_attention_native);
}
