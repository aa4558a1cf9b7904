// CUDA kernels of the MoE routing family. Declarations and contracts: moe.h.
// Only CUDA headers here (no torch): nvcc compiles this file in seconds.
//
// The routing plan in three launches and no host synchronisation: a per-chunk histogram, one block
// that turns the chunk counts into each chunk's first row per expert (a prefix sum over chunks and
// over the experts' block-padded segments), and a scatter in which one warp walks its chunk in pair
// order, so pairs of one expert keep their order (stable) without any sort.
#include "moe.h"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace sphinx_kernels {
namespace {

constexpr int kHistogramThreads = 256;
constexpr int kOffsetsThreads = 256;

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(kernel) + ": " + cudaGetErrorString(err));
  }
}

// chunk_counts[c * E + e] = pairs of chunk c with id e. Integer atomics: the counts are exact and the
// same on every run.
template <typename Index>
__global__ void routing_histogram_kernel(const Index* __restrict__ ids, int64_t num_pairs,
                                         int num_experts, int32_t* __restrict__ chunk_counts) {
  extern __shared__ int32_t counts[];
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kRoutingChunk;
  const int64_t end = min(begin + kRoutingChunk, num_pairs);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t e = ids[i];
    if (e >= 0 && e < num_experts) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    chunk_counts[static_cast<int64_t>(blockIdx.x) * num_experts + e] = counts[e];
  }
}

// One block: tokens_per_expert and padded_offsets from the chunk counts, which become (in place) the
// first row of each chunk's pairs of each expert.
__global__ void routing_offsets_kernel(int32_t* __restrict__ chunk_starts, int64_t num_chunks,
                                       int num_experts, int64_t block_size,
                                       int32_t* __restrict__ tokens_per_expert,
                                       int32_t* __restrict__ padded_offsets) {
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int32_t total = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      int32_t& slot = chunk_starts[c * num_experts + e];
      const int32_t count = slot;
      slot = total;  // pairs of expert e in the chunks before c
      total += count;
    }
    tokens_per_expert[e] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // E is small (tens): a serial scan is cheaper than a block scan here
    int64_t offset = 0;
    padded_offsets[0] = 0;
    for (int e = 0; e < num_experts; ++e) {
      offset += (tokens_per_expert[e] + block_size - 1) / block_size * block_size;
      padded_offsets[e + 1] = static_cast<int32_t>(offset);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    const int32_t start = padded_offsets[e];
    for (int64_t c = 0; c < num_chunks; ++c) chunk_starts[c * num_experts + e] += start;
  }
}

// One warp per chunk, 32 pairs per step in pair order: lanes with the same expert find each other
// with __match_any_sync, rank themselves by lane, and the lowest of them advances the expert's next
// row. row_to_pair is -1 beforehand (memset), so only placed pairs are written.
template <typename Index>
__global__ void routing_scatter_kernel(const Index* __restrict__ ids, int64_t num_pairs,
                                       int num_experts, int64_t num_rows,
                                       const int32_t* __restrict__ chunk_starts,
                                       int32_t* __restrict__ position,
                                       int32_t* __restrict__ row_to_pair) {
  extern __shared__ int32_t next_row[];
  const int64_t chunk = blockIdx.x;
  const int lane = threadIdx.x;
  for (int e = lane; e < num_experts; e += 32) next_row[e] = chunk_starts[chunk * num_experts + e];
  __syncwarp();
  const unsigned lower_lanes = (1u << lane) - 1u;
  const int64_t begin = chunk * kRoutingChunk;
  const int64_t end = min(begin + kRoutingChunk, num_pairs);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t i = base + lane;
    const int64_t e = i < end ? static_cast<int64_t>(ids[i]) : -1;
    const bool valid = i < end && e >= 0 && e < num_experts;
    // Lanes past the end and lanes with a bad id each form their own groups, never joining an expert.
    const int key = valid ? static_cast<int>(e) : -1 - (i < end ? 0 : 1);
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    int64_t row = -1;
    if (valid) row = next_row[e] + __popc(peers & lower_lanes);
    __syncwarp();
    if (valid && (peers & lower_lanes) == 0) next_row[e] += __popc(peers);
    __syncwarp();
    if (i < end) {
      const bool placed = row >= 0 && row < num_rows;
      position[i] = placed ? static_cast<int32_t>(row) : -1;
      if (placed) row_to_pair[row] = static_cast<int32_t>(i);
    }
  }
}

template <typename Index>
void launch_routing(const Index* ids, int64_t num_pairs, int num_experts, int64_t block_size,
                    int64_t num_rows, int32_t* tokens_per_expert, int32_t* padded_offsets,
                    int32_t* position, int32_t* row_to_pair, int32_t* scratch,
                    cudaStream_t stream) {
  const int64_t num_chunks = (num_pairs + kRoutingChunk - 1) / kRoutingChunk;
  const size_t shared = static_cast<size_t>(num_experts) * sizeof(int32_t);
  if (num_rows > 0) {  // all bits set: -1, "no pair", for every row the scatter leaves alone
    const cudaError_t err = cudaMemsetAsync(row_to_pair, 0xFF, num_rows * sizeof(int32_t), stream);
    if (err != cudaSuccess) {
      throw std::runtime_error(std::string("moe_routing memset: ") + cudaGetErrorString(err));
    }
  }
  if (num_chunks > 0) {
    routing_histogram_kernel<Index><<<static_cast<unsigned>(num_chunks), kHistogramThreads, shared,
                                      stream>>>(ids, num_pairs, num_experts, scratch);
    check_launch("routing_histogram_kernel");
  }
  routing_offsets_kernel<<<1, kOffsetsThreads, 0, stream>>>(scratch, num_chunks, num_experts,
                                                            block_size, tokens_per_expert,
                                                            padded_offsets);
  check_launch("routing_offsets_kernel");
  if (num_chunks > 0) {
    routing_scatter_kernel<Index><<<static_cast<unsigned>(num_chunks), 32, shared, stream>>>(
        ids, num_pairs, num_experts, num_rows, scratch, position, row_to_pair);
    check_launch("routing_scatter_kernel");
  }
}

}  // namespace

void moe_routing_cuda(const void* expert_ids, bool ids_are_int64, int64_t num_pairs,
                      int64_t num_experts, int64_t block_size, int64_t num_rows,
                      int32_t* tokens_per_expert, int32_t* padded_offsets, int32_t* position,
                      int32_t* row_to_pair, int32_t* scratch, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int experts = static_cast<int>(num_experts);
  if (ids_are_int64) {
    launch_routing(static_cast<const int64_t*>(expert_ids), num_pairs, experts, block_size,
                   num_rows, tokens_per_expert, padded_offsets, position, row_to_pair, scratch, s);
  } else {
    launch_routing(static_cast<const int32_t*>(expert_ids), num_pairs, experts, block_size,
                   num_rows, tokens_per_expert, padded_offsets, position, row_to_pair, scratch, s);
  }
}

}  // namespace sphinx_kernels
