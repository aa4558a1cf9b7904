// Kernels of the packed-sequence family (see sphinx_kernels/varlen.py for the op contracts).
//
// Plain C++ types only: no torch headers, so the .cu file compiles in seconds with nvcc alone and the
// kernels can be built and tested without the binding layer (csrc/registration.cpp).
#pragma once
#include <cstdint>

#include "../common.h"

namespace sphinx_kernels {

// The most source tables one gather_rows call takes: the CUDA kernel receives the table by value.
constexpr int kMaxGatherSources = 16;

// Row-major source tables of one gather: row r of source s starts at base[s] + r * row_stride_bytes[s].
struct GatherSources {
  const void* base[kMaxGatherSources];
  int64_t row_stride_bytes[kMaxGatherSources];
  int64_t rows[kMaxGatherSources];
  int count;
};

// A byte pattern repeated to fill an output row whose (source, row) index is out of range: the bits of
// NaN in the element type, so a bad index that slipped past validation shows up instead of reading or
// writing out of bounds.
struct PoisonPattern {
  uint8_t bytes[16];
};

// out[t] = sources[source_ids[t]][row_ids[t]] for t < num_rows, row_bytes bytes each; a negative
// source id gives a zero row. Index types: both int32 or both int64 (index_is_int64).
void gather_rows_cpu(const GatherSources& sources, const void* source_ids, const void* row_ids,
                     bool index_is_int64, int64_t num_rows, int64_t row_bytes,
                     const PoisonPattern& poison, void* out);
void gather_rows_cuda(const GatherSources& sources, const void* source_ids, const void* row_ids,
                      bool index_is_int64, int64_t num_rows, int64_t row_bytes,
                      const PoisonPattern& poison, void* out, void* stream);

// out[r] = sum over i in [offsets[r], offsets[r+1]) of rows[order[i]], for r < num_segments, each a
// row of width elements; accumulated in float (double for kFloat64) in ascending i, rounded once.
// The order is fixed by the inputs, so the result is bitwise reproducible: this is the deterministic
// backward of every gather. order and offsets are int64.
void segment_sum_rows_cpu(FloatKind kind, const void* rows, const int64_t* order,
                          const int64_t* offsets, int64_t num_segments, int64_t width, void* out);
void segment_sum_rows_cuda(FloatKind kind, const void* rows, const int64_t* order,
                           const int64_t* offsets, int64_t num_segments, int64_t width, void* out,
                           void* stream);

// flags[(n * tiles_h + i) * tiles_w + j] = every pixel of tile (i, j) of image n, in every channel c,
// equals pad[c] (compared as float: the pad values arrive rounded to the image dtype). images is
// [N, C, H, W] read through its element strides, H = tiles_h * tile_h, W = tiles_w * tile_w; pad holds
// C floats on the device; flags has N * tiles_h * tiles_w bytes (0 or 1).
struct ImageLayout {
  int64_t num_images, channels, tiles_h, tiles_w, tile_h, tile_w;
  int64_t stride_n, stride_c, stride_h, stride_w;
};
void find_padding_tiles_cuda(FloatKind kind, const void* images, const ImageLayout& layout,
                             const float* pad, bool* flags, void* stream);

// apply_rotary on the CPU: for each tensor part (q, then k), out[t, h, :] = x[t, h, :] * cos[p] +
// rotate_half(x[t, h, :]) * sin[p] with p = position_ids[t] (the backward rotation when transpose:
// sin -> -sin with its halves swapped), in float, rounded once. x is read through its token and
// head strides (unit stride along D); out is contiguous [T, heads, D]. A position outside
// [0, table_rows) gives a NaN row. Element types: float16, bfloat16, float32 for x and the tables.
struct RotaryTensor {
  const void* data;
  int64_t heads, stride_token, stride_head;
  void* out;
};
struct RotaryInputs {
  FloatKind kind, table_kind;
  const void* cos;
  const void* sin;
  int64_t table_rows, table_stride;
  const void* position_ids;
  bool positions_int64;
  int64_t num_tokens, head_dim;
  bool transpose;
};
void apply_rotary_cpu(const RotaryInputs& inputs, const RotaryTensor* parts, int num_parts);

// varlen_attention's forward on the CPU (mask and conventions:
// sphinx_kernels/ops/varlen_attention.py), a sequence at a time (all its heads together), a query
// row at a time: scores of its visible keys, softmax, weighted values, all in float. Meant for
// decode steps (one query row per sequence), where it reads each sequence's keys and values in
// place, with no gather, padding or mask. q, k, v are read through their token and head strides
// (unit stride along D); cu_seqlens_q / cu_seqlens_k are [num_seqs + 1] and prefix_lens [num_seqs]
// or null, all already validated. out ([total_q, heads, D], contiguous) must hold zeros and lse
// ([heads, total_q] float32) -inf: rows that see no key are left as they are.
struct VarlenAttentionInputs {
  FloatKind kind;
  const void* q;
  int64_t q_stride_token, q_stride_head;
  const void* k;
  int64_t k_stride_token, k_stride_head;
  const void* v;
  int64_t v_stride_token, v_stride_head;
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  const int32_t* prefix_lens;
  int64_t num_seqs, total_q, heads, kv_heads, head_dim;
  bool causal;
  float scale;
  void* out;
  float* lse;
};
void varlen_attention_forward_cpu(const VarlenAttentionInputs& inputs);

}  // namespace sphinx_kernels
