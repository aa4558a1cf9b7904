// Kernels of the MoE routing family (see sphinx_kernels/moe.py for the op contracts).
//
// Plain C++ types only: no torch headers, so the .cu file compiles with nvcc alone and the kernels can
// be built and tested without the binding layer (csrc/registration.cpp).
#pragma once
#include <cstdint>

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

}  // namespace sphinx_kernels
