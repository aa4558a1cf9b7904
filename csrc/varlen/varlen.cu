// CUDA kernels of the packed-sequence family. Declarations and contracts: varlen.h.
// Only CUDA headers here (no torch): nvcc compiles this file in seconds.
#include "varlen.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>
#include <string>

namespace sphinx_kernels {
namespace {

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(kernel) + ": " + cudaGetErrorString(err));
  }
}

// Vec is the widest unit (16, 8, 4, 2 or 1 bytes) that divides the row size, every base pointer and
// every row stride, so each thread moves whole aligned vectors and the copy is type-agnostic.
template <typename Vec, typename Index>
__global__ void gather_rows_kernel(GatherSources src, const Index* __restrict__ source_ids,
                                   const Index* __restrict__ row_ids, int64_t num_rows,
                                   int64_t vecs_per_row, PoisonPattern poison,
                                   Vec* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= num_rows) return;
  const int64_t s = source_ids[t];
  const int64_t r = row_ids[t];
  Vec* dst = out + t * vecs_per_row;
  if (s >= 0 && s < src.count && r >= 0 && r < src.rows[s]) {
    const Vec* row = reinterpret_cast<const Vec*>(static_cast<const char*>(src.base[s]) +
                                                  r * src.row_stride_bytes[s]);
    for (int64_t v = threadIdx.x; v < vecs_per_row; v += blockDim.x) dst[v] = row[v];
  } else {
    Vec fill;
    if (s < 0) {
      memset(&fill, 0, sizeof(Vec));
    } else {
      memcpy(&fill, poison.bytes, sizeof(Vec));  // the pattern repeats every element, and
    }                                            // sizeof(Vec) is a multiple of the element size
    for (int64_t v = threadIdx.x; v < vecs_per_row; v += blockDim.x) dst[v] = fill;
  }
}

template <typename Vec, typename Index>
void launch_gather_rows(const GatherSources& src, const Index* source_ids, const Index* row_ids,
                        int64_t num_rows, int64_t row_bytes, const PoisonPattern& poison,
                        void* out, cudaStream_t stream) {
  const int64_t vecs_per_row = row_bytes / static_cast<int64_t>(sizeof(Vec));
  // A block of 256 threads: as many lanes per row as the row has vectors (32 at least, 256 at
  // most), the rest of the block on further rows.
  int lanes = 32;
  while (lanes < 256 && lanes < vecs_per_row) lanes *= 2;
  const dim3 block(lanes, 256 / lanes);
  const dim3 grid(static_cast<unsigned>((num_rows + block.y - 1) / block.y));
  gather_rows_kernel<Vec, Index><<<grid, block, 0, stream>>>(
      src, source_ids, row_ids, num_rows, vecs_per_row, poison, static_cast<Vec*>(out));
  check_launch("gather_rows_kernel");
}

template <typename Index>
void dispatch_gather_rows(const GatherSources& src, const void* source_ids, const void* row_ids,
                          int64_t num_rows, int64_t row_bytes, const PoisonPattern& poison,
                          void* out, cudaStream_t stream) {
  uint64_t alignment = static_cast<uint64_t>(row_bytes) | reinterpret_cast<uintptr_t>(out);
  for (int s = 0; s < src.count; ++s) {
    alignment |= reinterpret_cast<uintptr_t>(src.base[s]) |
                 static_cast<uint64_t>(src.row_stride_bytes[s]);
  }
  const auto* sid = static_cast<const Index*>(source_ids);
  const auto* rid = static_cast<const Index*>(row_ids);
  if (alignment % 16 == 0) {
    launch_gather_rows<uint4>(src, sid, rid, num_rows, row_bytes, poison, out, stream);
  } else if (alignment % 8 == 0) {
    launch_gather_rows<uint2>(src, sid, rid, num_rows, row_bytes, poison, out, stream);
  } else if (alignment % 4 == 0) {
    launch_gather_rows<uint32_t>(src, sid, rid, num_rows, row_bytes, poison, out, stream);
  } else if (alignment % 2 == 0) {
    launch_gather_rows<uint16_t>(src, sid, rid, num_rows, row_bytes, poison, out, stream);
  } else {
    launch_gather_rows<uint8_t>(src, sid, rid, num_rows, row_bytes, poison, out, stream);
  }
}

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

// Rounds the accumulator back to the stored type (round to nearest even, as the CPU kernel does).
template <typename T, typename Acc> __device__ __forceinline__ T from_acc(Acc x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}

// One block per segment; each thread owns columns and adds the segment's rows in ascending order.
template <typename T, typename Acc>
__global__ void segment_sum_rows_kernel(const T* __restrict__ rows,
                                        const int64_t* __restrict__ order,
                                        const int64_t* __restrict__ offsets, int64_t width,
                                        T* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const int64_t begin = offsets[r];
  const int64_t end = offsets[r + 1];
  for (int64_t d = threadIdx.x; d < width; d += blockDim.x) {
    Acc acc = 0;
    for (int64_t i = begin; i < end; ++i) acc += to_acc(rows[order[i] * width + d]);
    out[r * width + d] = from_acc<T, Acc>(acc);
  }
}

template <typename T, typename Acc>
void launch_segment_sum_rows(const void* rows, const int64_t* order, const int64_t* offsets,
                             int64_t num_segments, int64_t width, void* out,
                             cudaStream_t stream) {
  if (num_segments == 0) return;
  const int threads = width >= 256 ? 256 : (width >= 64 ? 64 : 32);
  segment_sum_rows_kernel<T, Acc><<<static_cast<unsigned>(num_segments), threads, 0, stream>>>(
      static_cast<const T*>(rows), order, offsets, width, static_cast<T*>(out));
  check_launch("segment_sum_rows_kernel");
}

// One block per tile: every thread checks a strided share of its pixels, then the block votes.
template <typename T>
__global__ void find_padding_tiles_kernel(const T* __restrict__ images, ImageLayout layout,
                                          const float* __restrict__ pad, bool* __restrict__ flags) {
  const int64_t tile = blockIdx.x;
  const int64_t j = tile % layout.tiles_w;
  const int64_t i = (tile / layout.tiles_w) % layout.tiles_h;
  const int64_t n = tile / (layout.tiles_w * layout.tiles_h);
  const int64_t pixels = layout.tile_h * layout.tile_w;
  const T* base = images + n * layout.stride_n + i * layout.tile_h * layout.stride_h +
                  j * layout.tile_w * layout.stride_w;
  int all_pad = 1;
  for (int64_t c = 0; c < layout.channels && all_pad; ++c) {
    const float value = pad[c];
    const T* plane = base + c * layout.stride_c;
    for (int64_t p = threadIdx.x; p < pixels; p += blockDim.x) {
      const int64_t r = p / layout.tile_w, col = p % layout.tile_w;
      if (to_acc(plane[r * layout.stride_h + col * layout.stride_w]) != value) {
        all_pad = 0;
        break;
      }
    }
  }
  all_pad = __syncthreads_and(all_pad);
  if (threadIdx.x == 0) flags[tile] = all_pad != 0;
}

template <typename T>
void launch_find_padding_tiles(const void* images, const ImageLayout& layout, const float* pad,
                               bool* flags, cudaStream_t stream) {
  const int64_t tiles = layout.num_images * layout.tiles_h * layout.tiles_w;
  if (tiles == 0) return;
  find_padding_tiles_kernel<T><<<static_cast<unsigned>(tiles), 256, 0, stream>>>(
      static_cast<const T*>(images), layout, pad, flags);
  check_launch("find_padding_tiles_kernel");
}

}  // namespace

void find_padding_tiles_cuda(FloatKind kind, const void* images, const ImageLayout& layout,
                             const float* pad, bool* flags, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (kind) {
    case FloatKind::kFloat16: launch_find_padding_tiles<__half>(images, layout, pad, flags, s); break;
    case FloatKind::kBFloat16:
      launch_find_padding_tiles<__nv_bfloat16>(images, layout, pad, flags, s);
      break;
    case FloatKind::kFloat32: launch_find_padding_tiles<float>(images, layout, pad, flags, s); break;
    case FloatKind::kFloat64: launch_find_padding_tiles<double>(images, layout, pad, flags, s); break;
  }
}

void gather_rows_cuda(const GatherSources& sources, const void* source_ids, const void* row_ids,
                      bool index_is_int64, int64_t num_rows, int64_t row_bytes,
                      const PoisonPattern& poison, void* out, void* stream) {
  if (num_rows == 0 || row_bytes == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  if (index_is_int64) {
    dispatch_gather_rows<int64_t>(sources, source_ids, row_ids, num_rows, row_bytes, poison, out, s);
  } else {
    dispatch_gather_rows<int32_t>(sources, source_ids, row_ids, num_rows, row_bytes, poison, out, s);
  }
}

void segment_sum_rows_cuda(FloatKind kind, const void* rows, const int64_t* order,
                           const int64_t* offsets, int64_t num_segments, int64_t width, void* out,
                           void* stream) {
  if (width == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (kind) {
    case FloatKind::kFloat16:
      launch_segment_sum_rows<__half, float>(rows, order, offsets, num_segments, width, out, s);
      break;
    case FloatKind::kBFloat16:
      launch_segment_sum_rows<__nv_bfloat16, float>(rows, order, offsets, num_segments, width, out,
                                                    s);
      break;
    case FloatKind::kFloat32:
      launch_segment_sum_rows<float, float>(rows, order, offsets, num_segments, width, out, s);
      break;
    case FloatKind::kFloat64:
      launch_segment_sum_rows<double, double>(rows, order, offsets, num_segments, width, out, s);
      break;
  }
}

}  // namespace sphinx_kernels
