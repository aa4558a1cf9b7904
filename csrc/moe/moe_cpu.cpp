// CPU kernels of the MoE routing family. Declarations and contracts: moe.h.
#include "moe.h"

#include <algorithm>
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

}  // namespace

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

}  // namespace sphinx_kernels
