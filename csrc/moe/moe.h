// Kernels of the MoE routing family (see sphinx_kernels/moe.py for the op contracts).
//
// Plain C++ types only: no torch headers, so the .cu file compiles with nvcc alone and the kernels can
// be built and tested without the binding layer (csrc/registration.cpp).
#pragma once
#include <cstdint>

#include "../common.h"

namespace sphinx_kernels {

// Pairs one CUDA block of the routing kernels handles: the histogram and the scatter split the
// num_pairs = T * k flattened (token, slot) pairs into chunks of this many, and the scatter ranks the
// pairs of one chunk in order, so the plan is stable without a sort.
constexpr int64_t kRoutingChunk = 1024;
// The CUDA kernels keep one int32 per expert in shared memory (sphinx_kernels/moe.py checks it).
constexpr int64_t kMaxRoutingExperts = 8192;

// The routing plan of num_pairs expert ids (int32 or int64, flattened [T, k] in (token, slot) order):
//   tokens_per_expert[e]  pairs with expert id e                                   [num_experts]
//   padded_offsets[e]     sum over e' < e of tokens_per_expert[e'] rounded up to
//                         a multiple of block_size                                 [num_experts + 1]
//   position[i]           padded_offsets[id_i] + (pairs j < i with id_j == id_i),
//                         or -1 for an id outside [0, num_experts)                 [num_pairs]
//   row_to_pair[r]        the pair i with position[i] == r, else -1                [num_rows]
// All outputs are int32. num_rows is the static bound padded_rows_bound(num_pairs, num_experts,
// block_size); a position at or past it (impossible for valid ids) is not written either. The CUDA
// version needs scratch of routing_scratch_ints(num_pairs, num_experts) int32 and runs without a host
// synchronisation.
void moe_routing_cpu(const void* expert_ids, bool ids_are_int64, int64_t num_pairs,
                     int64_t num_experts, int64_t block_size, int64_t num_rows,
                     int32_t* tokens_per_expert, int32_t* padded_offsets, int32_t* position,
                     int32_t* row_to_pair);

inline int64_t routing_scratch_ints(int64_t num_pairs, int64_t num_experts) {
  return (num_pairs + kRoutingChunk - 1) / kRoutingChunk * num_experts;
}

void moe_routing_cuda(const void* expert_ids, bool ids_are_int64, int64_t num_pairs,
                      int64_t num_experts, int64_t block_size, int64_t num_rows,
                      int32_t* tokens_per_expert, int32_t* padded_offsets, int32_t* position,
                      int32_t* row_to_pair, int32_t* scratch, void* stream);

// Row permutations between token order [T, width] and expert-grouped order [R, width] (CPU; the
// Triton kernels serve GPUs). Acc is float, double for kFloat64; scale and weights arrive in Acc.
//   permute:   out[r] = x[row_to_pair[r] / k] (* scale[row_to_pair[r]], rounded once), zero rows for
//              row_to_pair[r] < 0 or >= T * k. Exact data movement without a scale.
//   unpermute: out[t] = sum over slots j in order of weights[t * k + j] (1 if null) *
//              y[position[t * k + j]], accumulated in Acc, rounded once; rows outside [0, R) add 0.
//   pair_dots: dots[t * k + j] = sum over d of grad[t, d] * y[position[t * k + j], d], summed in double
//              and stored as Acc.
void moe_permute_cpu(FloatKind kind, const void* x, int64_t num_tokens, int64_t k,
                     const int32_t* row_to_pair, int64_t num_rows, int64_t width,
                     const void* scale, void* out);
void moe_unpermute_cpu(FloatKind kind, const void* y, int64_t num_rows, const int32_t* position,
                       int64_t num_tokens, int64_t k, int64_t width, const void* weights,
                       void* out);
void moe_pair_dots_cpu(FloatKind kind, const void* grad, const void* y, int64_t num_rows,
                       const int32_t* position, int64_t num_tokens, int64_t k, int64_t width,
                       void* dots);

// The MoE router on logits [T, E] (element (t, e) at logits[t * stride_t + e * stride_e]): softmax
// in double, the k experts of largest float32-rounded probability in descending order (ties to the
// lower id), their gates (renormalised to sum 1, or the probabilities) rounded to float32, the
// pair counts per expert, and the two losses as sphinx_kernels.ops.topk_gating defines them, summed
// in double in a fixed order and rounded once. A row with a NaN or +inf logit, or only -inf ones,
// goes to experts 0 .. k-1 with NaN gates, and both losses are NaN. Needs 1 <= k <= E.
//   weights [T, k] float, expert_ids [T, k] int32, tokens_per_expert [E] int32, losses: one float.
void topk_gating_cpu(FloatKind kind, const void* logits, int64_t num_tokens, int64_t num_experts,
                     int64_t stride_t, int64_t stride_e, int64_t k, bool renormalize,
                     float* weights, int32_t* expert_ids, int32_t* tokens_per_expert,
                     float* load_balancing_loss, float* z_loss);

}  // namespace sphinx_kernels
