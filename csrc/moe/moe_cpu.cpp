// CPU kernels of the MoE routing family. Declarations and contracts: moe.h.
#include "moe.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace sphinx_kernels {
namespace {

// One pass each: a histogram, a prefix sum over the experts, and a scatter in pair order with a
// running count per expert (stable by construction). The plan is a few bytes per pair; a serial
// loop is memory-bound already and keeps the order trivially deterministic.
template <typename Index>
void moe_routing_cpu_impl(const Index* ids, int64_t num_pairs, int64_t num_experts,
                          int64_t block_size, int64_t num_rows, int32_t* tokens_per_expert,
                          int32_t* padded_offsets, int32_t* position, int32_t* row_to_pair) {
  auto valid = [&](int64_t e) { return e >= 0 && e < num_experts; };
  std::fill(tokens_per_expert, tokens_per_expert + num_experts, 0);
  for (int64_t i = 0; i < num_pairs; ++i) {
    if (valid(ids[i])) ++tokens_per_expert[ids[i]];
  }
  padded_offsets[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t padded = (tokens_per_expert[e] + block_size - 1) / block_size * block_size;
    padded_offsets[e + 1] = static_cast<int32_t>(padded_offsets[e] + padded);
  }
  std::fill(row_to_pair, row_to_pair + num_rows, -1);
  std::vector<int64_t> next(padded_offsets, padded_offsets + num_experts);
  for (int64_t i = 0; i < num_pairs; ++i) {
    const int64_t e = ids[i];
    const int64_t row = valid(e) ? next[e]++ : -1;
    const bool placed = row >= 0 && row < num_rows;
    position[i] = placed ? static_cast<int32_t>(row) : -1;
    if (placed) row_to_pair[row] = static_cast<int32_t>(i);
  }
}

// Rows per parallel task: each is a short copy or sum, so hand each thread a good stretch of them.
constexpr int64_t kRowGrain = 64;

template <typename T, typename Acc>
void permute_impl(const T* x, int64_t num_tokens, int64_t k, const int32_t* row_to_pair,
                  int64_t num_rows, int64_t width, const Acc* scale, T* out) {
  at::parallel_for(0, num_rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t pair = row_to_pair[r];
      T* dst = out + r * width;
      if (pair < 0 || pair >= num_tokens * k) {
        std::memset(static_cast<void*>(dst), 0, width * sizeof(T));
      } else if (scale == nullptr) {
        std::memcpy(dst, x + pair / k * width, width * sizeof(T));
      } else {
        const T* src = x + pair / k * width;
        for (int64_t d = 0; d < width; ++d) dst[d] = static_cast<T>(static_cast<Acc>(src[d]) * scale[pair]);
      }
    }
  });
}

template <typename T, typename Acc>
void unpermute_impl(const T* y, int64_t num_rows, const int32_t* position, int64_t num_tokens,
                    int64_t k, int64_t width, const Acc* weights, T* out) {
  at::parallel_for(0, num_tokens, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> acc(width);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t j = 0; j < k; ++j) {  // slot order: the reference's summation order
        const int64_t row = position[t * k + j];
        if (row < 0 || row >= num_rows) continue;
        const T* src = y + row * width;
        const Acc w = weights == nullptr ? Acc(1) : weights[t * k + j];
        for (int64_t d = 0; d < width; ++d) acc[d] += static_cast<Acc>(src[d]) * w;
      }
      T* dst = out + t * width;
      for (int64_t d = 0; d < width; ++d) dst[d] = static_cast<T>(acc[d]);
    }
  });
}

template <typename T, typename Acc>
void pair_dots_impl(const T* grad, const T* y, int64_t num_rows, const int32_t* position,
                    int64_t num_tokens, int64_t k, int64_t width, Acc* dots) {
  at::parallel_for(0, num_tokens * k, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = position[i];
      // In double, rounded once: a float sum in order loses up to `width` roundings, more than the
      // tree sums of the Triton kernel and of PyTorch.
      double sum = 0;
      if (row >= 0 && row < num_rows) {
        const T* g = grad + i / k * width;
        const T* src = y + row * width;
        for (int64_t d = 0; d < width; ++d)
          sum += static_cast<double>(g[d]) * static_cast<double>(src[d]);
      }
      dots[i] = static_cast<Acc>(sum);
    }
  });
}

// Tokens per task of the gating pass. Its partial sums are per chunk of this many tokens and reduced
// in chunk order, so the losses do not depend on the number of threads.
constexpr int64_t kGatingChunk = 256;

// The top-k of one row: softmax in double (E values per token: negligible next to the experts; the
// gates and the losses come out correctly rounded), the choice made on the probabilities rounded
// to float32 (the reference's), ties to the lower expert id. Writes the row's probs [E] and its k
// weights and expert_ids (candidates: scratch [E]); returns the logsumexp, NaN for a row whose
// softmax is undefined (then probs are NaN and the row goes to experts 0 .. k-1).
template <typename T>
double gating_row(const T* row, int64_t stride_e, int64_t num_experts, int64_t k,
                  bool renormalize, double* probs, float* candidates, float* weights,
                  int32_t* expert_ids) {
  double row_max = -std::numeric_limits<double>::infinity();
  bool has_nan = false;
  for (int64_t e = 0; e < num_experts; ++e) {
    probs[e] = static_cast<double>(row[e * stride_e]);
    has_nan |= std::isnan(probs[e]);
    row_max = std::max(row_max, probs[e]);
  }
  // Undefined: a NaN, a +inf, or every logit -inf. Otherwise the sum below is in [1, E].
  const bool undefined = has_nan || !std::isfinite(row_max);
  double lse = std::numeric_limits<double>::quiet_NaN();
  if (undefined) {
    std::fill(probs, probs + num_experts, lse);
  } else {
    double total = 0;
    for (int64_t e = 0; e < num_experts; ++e) total += probs[e] = std::exp(probs[e] - row_max);
    for (int64_t e = 0; e < num_experts; ++e) probs[e] /= total;
    lse = row_max + std::log(total);
  }
  // k rounds of argmax (k is a few): the first maximum is the lowest id, and a chosen expert's
  // candidate becomes -1, below every probability.
  for (int64_t e = 0; e < num_experts; ++e)
    candidates[e] = undefined ? 0.0f : static_cast<float>(probs[e]);
  double chosen_sum = 0;
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = 0;
    for (int64_t e = 1; e < num_experts; ++e)
      if (candidates[e] > candidates[best]) best = e;
    candidates[best] = -1.0f;
    expert_ids[j] = static_cast<int32_t>(best);
    chosen_sum += probs[best];
  }
  for (int64_t j = 0; j < k; ++j) {
    const double gate = probs[expert_ids[j]];
    weights[j] = static_cast<float>(renormalize ? gate / chosen_sum : gate);
  }
  return lse;
}

template <typename T>
void topk_gating_impl(const T* logits, int64_t num_tokens, int64_t num_experts, int64_t stride_t,
                      int64_t stride_e, int64_t k, bool renormalize, float* weights,
                      int32_t* expert_ids, int32_t* tokens_per_expert, float* load_balancing_loss,
                      float* z_loss) {
  const int64_t num_chunks = (num_tokens + kGatingChunk - 1) / kGatingChunk;
  std::vector<double> prob_sums(num_chunks * num_experts, 0.0), z_sums(num_chunks, 0.0);
  std::vector<int64_t> counts(num_chunks * num_experts, 0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> probs(num_experts);
    std::vector<float> candidates(num_experts);
    for (int64_t c = begin; c < end; ++c) {
      double* prob_sum = prob_sums.data() + c * num_experts;
      int64_t* count = counts.data() + c * num_experts;
      for (int64_t t = c * kGatingChunk; t < std::min(num_tokens, (c + 1) * kGatingChunk); ++t) {
        const double lse = gating_row(logits + t * stride_t, stride_e, num_experts, k,
                                      renormalize, probs.data(), candidates.data(),
                                      weights + t * k, expert_ids + t * k);
        for (int64_t j = 0; j < k; ++j) ++count[expert_ids[t * k + j]];
        for (int64_t e = 0; e < num_experts; ++e) prob_sum[e] += probs[e];
        z_sums[c] += lse * lse;
      }
    }
  });
  // E * sum_e (count_e / (T k)) * (prob_sum_e / T) and mean lse^2, in double, rounded once; both
  // 0 for T == 0.
  const double tokens = static_cast<double>(std::max<int64_t>(num_tokens, 1));
  double balance = 0, z_sum = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    int64_t count = 0;
    double prob_sum = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      count += counts[c * num_experts + e];
      prob_sum += prob_sums[c * num_experts + e];
    }
    tokens_per_expert[e] = static_cast<int32_t>(count);
    balance += static_cast<double>(count) * prob_sum;
  }
  for (int64_t c = 0; c < num_chunks; ++c) z_sum += z_sums[c];
  *load_balancing_loss = static_cast<float>(balance * (num_experts / (tokens * tokens * k)));
  *z_loss = static_cast<float>(z_sum / tokens);
}

// Calls f(T{}, Acc{}) with the element type of kind and its accumulator type.
template <typename F>
void dispatch_float(FloatKind kind, F&& f) {
  switch (kind) {
    case FloatKind::kFloat16: f(c10::Half{}, float{}); break;
    case FloatKind::kBFloat16: f(c10::BFloat16{}, float{}); break;
    case FloatKind::kFloat32: f(float{}, float{}); break;
    case FloatKind::kFloat64: f(double{}, double{}); break;
  }
}

}  // namespace

void moe_permute_cpu(FloatKind kind, const void* x, int64_t num_tokens, int64_t k,
                     const int32_t* row_to_pair, int64_t num_rows, int64_t width,
                     const void* scale, void* out) {
  dispatch_float(kind, [&](auto t, auto acc) {
    using T = decltype(t);
    using Acc = decltype(acc);
    permute_impl(static_cast<const T*>(x), num_tokens, k, row_to_pair, num_rows, width,
                 static_cast<const Acc*>(scale), static_cast<T*>(out));
  });
}

void moe_unpermute_cpu(FloatKind kind, const void* y, int64_t num_rows, const int32_t* position,
                       int64_t num_tokens, int64_t k, int64_t width, const void* weights,
                       void* out) {
  dispatch_float(kind, [&](auto t, auto acc) {
    using T = decltype(t);
    using Acc = decltype(acc);
    unpermute_impl(static_cast<const T*>(y), num_rows, position, num_tokens, k, width,
                   static_cast<const Acc*>(weights), static_cast<T*>(out));
  });
}

void moe_pair_dots_cpu(FloatKind kind, const void* grad, const void* y, int64_t num_rows,
                       const int32_t* position, int64_t num_tokens, int64_t k, int64_t width,
                       void* dots) {
  dispatch_float(kind, [&](auto t, auto acc) {
    using T = decltype(t);
    using Acc = decltype(acc);
    pair_dots_impl(static_cast<const T*>(grad), static_cast<const T*>(y), num_rows, position,
                   num_tokens, k, width, static_cast<Acc*>(dots));
  });
}

void moe_routing_cpu(const void* expert_ids, bool ids_are_int64, int64_t num_pairs,
                     int64_t num_experts, int64_t block_size, int64_t num_rows,
                     int32_t* tokens_per_expert, int32_t* padded_offsets, int32_t* position,
                     int32_t* row_to_pair) {
  if (ids_are_int64) {
    moe_routing_cpu_impl(static_cast<const int64_t*>(expert_ids), num_pairs, num_experts,
                         block_size, num_rows, tokens_per_expert, padded_offsets, position,
                         row_to_pair);
  } else {
    moe_routing_cpu_impl(static_cast<const int32_t*>(expert_ids), num_pairs, num_experts,
                         block_size, num_rows, tokens_per_expert, padded_offsets, position,
                         row_to_pair);
  }
}

void topk_gating_cpu(FloatKind kind, const void* logits, int64_t num_tokens, int64_t num_experts,
                     int64_t stride_t, int64_t stride_e, int64_t k, bool renormalize,
                     float* weights, int32_t* expert_ids, int32_t* tokens_per_expert,
                     float* load_balancing_loss, float* z_loss) {
  dispatch_float(kind, [&](auto t, auto) {
    using T = decltype(t);
    topk_gating_impl(static_cast<const T*>(logits), num_tokens, num_experts, stride_t, stride_e, k,
                     renormalize, weights, expert_ids, tokens_per_expert, load_balancing_loss,
                     z_loss);
  });
}

}  // namespace sphinx_kernels
