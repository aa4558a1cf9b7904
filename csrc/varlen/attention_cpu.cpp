// CPU kernel of varlen_attention's forward, written for decode steps. Declaration and contract:
// varlen.h.
#include "varlen.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace sphinx_kernels {
namespace {

// A float dot product in eight independent partial sums: a single running sum is one long chain of
// dependent additions that the compiler may not reorder (no -ffast-math), so it would neither
// vectorize nor pipeline.
inline float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int u = 0; u < 8; ++u) part[u] += a[d + u] * b[d + u];
  float tail = 0.0f;
  for (; d < n; ++d) tail += a[d] * b[d];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7])) +
         tail;
}

// One token's rows of every kv head as floats, [kv_heads, D] contiguous: read in place when they are
// float and already so laid out, else copied (and converted) into the scratch rows.
template <typename T>
inline const float* kv_row(const T* token, int64_t stride_head, int64_t kv_heads, int64_t dim,
                           float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride_head == dim) return token;
  }
  for (int64_t g = 0; g < kv_heads; ++g)
    for (int64_t d = 0; d < dim; ++d)
      scratch[g * dim + d] = static_cast<float>(token[g * stride_head + d]);
  return scratch;
}

// Keys of sequence row i (0-based among the sequence's len_q query rows) under the mask of
// varlen_attention's docstring: a prefix [0, n) of the sequence's keys.
inline int64_t visible_keys(int64_t i, int64_t len_q, int64_t len_k, int64_t prefix, bool causal) {
  if (!causal) return len_k;
  const int64_t position = i + len_k - len_q;
  if (position < 0) return 0;
  return std::min(len_k, std::max(position + 1, prefix));
}

template <typename T>
void varlen_attention_forward_cpu_impl(const VarlenAttentionInputs& in) {
  const int64_t heads = in.heads, group = in.heads / in.kv_heads, dim = in.head_dim;
  const T* q = static_cast<const T*>(in.q);
  const T* k = static_cast<const T*>(in.k);
  const T* v = static_cast<const T*>(in.v);
  T* out = static_cast<T*>(in.out);
  // One task per sequence, every head at once: each key and value row (all kv heads, contiguous)
  // is read once per query row, front to back, and each pass below is a plain loop over
  // independent elements (no running max or sum carried from key to key).
  at::parallel_for(0, in.num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> queries(heads * dim), acc(heads * dim), row(in.kv_heads * dim), scores,
        sums(heads);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t q0 = in.cu_seqlens_q[b], len_q = in.cu_seqlens_q[b + 1] - q0;
      const int64_t k0 = in.cu_seqlens_k[b], len_k = in.cu_seqlens_k[b + 1] - k0;
      const int64_t prefix = in.prefix_lens ? in.prefix_lens[b] : 0;
      for (int64_t i = 0; i < len_q; ++i) {
        const int64_t n = visible_keys(i, len_q, len_k, prefix, in.causal);
        if (n == 0) continue;  // the row stays 0 with a -inf log-sum-exp (set by the caller)
        const int64_t t = q0 + i;
        scores.resize(heads * n);
        for (int64_t h = 0; h < heads; ++h) {
          const T* src = q + t * in.q_stride_token + h * in.q_stride_head;
          for (int64_t d = 0; d < dim; ++d) queries[h * dim + d] = static_cast<float>(src[d]);
        }
        for (int64_t key = 0; key < n; ++key) {
          const float* kr = kv_row(k + (k0 + key) * in.k_stride_token, in.k_stride_head,
                                   in.kv_heads, dim, row.data());
          for (int64_t h = 0; h < heads; ++h)
            scores[h * n + key] = dot(queries.data() + h * dim, kr + (h / group) * dim, dim) *
                                  in.scale;
        }
        for (int64_t h = 0; h < heads; ++h) {
          float* p = scores.data() + h * n;
          const float max = *std::max_element(p, p + n);
          float sum = 0.0f;
          for (int64_t key = 0; key < n; ++key) sum += (p[key] = std::exp(p[key] - max));
          sums[h] = sum;
          in.lse[h * in.total_q + t] = max + std::log(sum);
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t key = 0; key < n; ++key) {
          const float* vr = kv_row(v + (k0 + key) * in.v_stride_token, in.v_stride_head,
                                   in.kv_heads, dim, row.data());
          for (int64_t h = 0; h < heads; ++h) {
            const float p = scores[h * n + key];
            const float* value = vr + (h / group) * dim;
            float* a = acc.data() + h * dim;
            for (int64_t d = 0; d < dim; ++d) a[d] += p * value[d];
          }
        }
        for (int64_t h = 0; h < heads; ++h) {
          const float inverse = 1.0f / sums[h];
          T* dst = out + (t * heads + h) * dim;
          for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(acc[h * dim + d] * inverse);
        }
      }
    }
  });
}

}  // namespace

void varlen_attention_forward_cpu(const VarlenAttentionInputs& inputs) {
  switch (inputs.kind) {
    case FloatKind::kFloat16: varlen_attention_forward_cpu_impl<c10::Half>(inputs); break;
    case FloatKind::kBFloat16: varlen_attention_forward_cpu_impl<c10::BFloat16>(inputs); break;
    case FloatKind::kFloat32: varlen_attention_forward_cpu_impl<float>(inputs); break;
    case FloatKind::kFloat64: break;  // refused by the binding
  }
}

}  // namespace sphinx_kernels
