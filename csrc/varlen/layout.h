// CPU kernels of packed-layout planning (see sphinx_kernels/layout.py for the op contracts).
//
// Plain C++ types only (no torch headers): the binding layer in csrc/registration.cpp allocates and
// checks tensors, these take raw pointers. Inputs, counts and offsets are int64; the per-row outputs
// are int32 like cu_seqlens (a batch holds fewer than 2^31 rows, token ids are below 2^31), except
// the labels, int64 as torch's cross-entropy requires.
#pragma once
#include <cstdint>

namespace sphinx_kernels {

// The fixed source numbering of a packed row (sphinx_kernels.layout.SOURCE_*).
constexpr int32_t kSourceText = 0, kSourceVisual = 1, kSourceSkip = 2, kSourceImageBegin = 3,
                  kSourceImageEnd = 4, kSourcePadding = -1;
constexpr int64_t kIgnoreIndex = -100;

// One batch, columnar: B samples, I images, N text tokens, S tile flags (sphinx_kernels.LayoutInputs).
struct LayoutBatch {
  const int64_t* text_ids;           // [N]
  const int64_t* text_lens;          // [B], >= 0
  const bool* answer_mask;           // [N]
  const int64_t* images_per_sample;  // [B], >= 0
  const int64_t* tile_grids;         // [I, 2]: rows, cols >= 1
  const bool* skipped_tiles;         // [S], raster order per image
  const int64_t* text_before_images;  // [B]: leading text tokens placed before the images, <= text_lens
  int64_t num_samples, num_images, tokens_per_view;
};

// Where every sample starts, from the first pass: [B + 1] arrays (prefix sums, entry 0 is 0) and the
// first tile flag of every image ([I + 1]).
struct LayoutOffsets {
  int64_t* sample_rows;    // packed rows
  int64_t* sample_views;   // kept views (global views and kept tiles)
  int64_t* sample_images;  // images
  int64_t* sample_text;    // text tokens
  int64_t* image_tiles;    // [I + 1] tile flags
};

// [T] per-row outputs, then [V * tokens_per_view] visual rows and [V] view starts.
struct LayoutOutputs {
  int32_t* position_ids;
  int32_t* source_ids;
  int32_t* row_ids;
  int64_t* labels;
  int32_t* visual_rows;
  int32_t* view_starts;
};

// Prefix sums of the counts: sample_images, sample_text and image_tiles (reads no flags). The batch
// must hold sample_text[B] tokens, sample_images[B] images and image_tiles[I] tile flags: the caller
// checks those against its tensors before the passes that read through these offsets.
void plan_layout_counts_cpu(const LayoutBatch& batch, const LayoutOffsets& offsets);

// First pass, parallel over samples: sample_rows and sample_views. The batch's packed rows are
// sample_rows[B], its kept views sample_views[B].
void plan_layout_offsets_cpu(const LayoutBatch& batch, const LayoutOffsets& offsets);

// Second pass, parallel over samples: fills rows [0, total) of every output (rows past
// sample_rows[B] are padding), total >= sample_rows[B].
void plan_layout_fill_cpu(const LayoutBatch& batch, const LayoutOffsets& offsets, int64_t total,
                          const LayoutOutputs& out);

// First-fit decreasing: places samples longest first (ties: lower index first) into the lowest bin
// with room for them among bins of `budget` tokens; every length must be in [0, budget]. Writes the
// bin of every sample and the placement order ([n] each); returns the number of bins. O(n log n): a
// max-tree over the free space of the n bins that could ever open.
int64_t first_fit_decreasing_cpu(const int64_t* lengths, int64_t n, int64_t budget,
                                 int64_t* bin_ids, int64_t* placement);

// Groups the placement order by bin (a stable counting sort): order [n], bin_offsets [num_bins + 1],
// bin_tokens [num_bins].
void group_bins_cpu(const int64_t* lengths, const int64_t* bin_ids, const int64_t* placement,
                    int64_t n, int64_t num_bins, int64_t* order, int64_t* bin_offsets,
                    int64_t* bin_tokens);

}  // namespace sphinx_kernels
