// CPU kernels of packed-layout planning. Declarations and contracts: layout.h.
#include "layout.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace sphinx_kernels {
namespace {

// Samples per parallel task: a sample is a few thousand rows, so small chunks balance well.
constexpr int64_t kSampleGrain = 16;

int64_t tiles_of(const LayoutBatch& batch, int64_t image) {
  return batch.tile_grids[2 * image] * batch.tile_grids[2 * image + 1];
}

}  // namespace

void plan_layout_counts_cpu(const LayoutBatch& batch, const LayoutOffsets& off) {
  off.image_tiles[0] = 0;
  for (int64_t i = 0; i < batch.num_images; ++i) {
    off.image_tiles[i + 1] = off.image_tiles[i] + tiles_of(batch, i);
  }
  off.sample_images[0] = off.sample_text[0] = 0;
  for (int64_t b = 0; b < batch.num_samples; ++b) {
    off.sample_images[b + 1] = off.sample_images[b] + batch.images_per_sample[b];
    off.sample_text[b + 1] = off.sample_text[b] + batch.text_lens[b];
  }
}

void plan_layout_offsets_cpu(const LayoutBatch& batch, const LayoutOffsets& off) {
  const int64_t num_samples = batch.num_samples, tpv = batch.tokens_per_view;
  // Rows and kept views of each sample (reading its tile flags), then the prefix sums.
  at::parallel_for(0, num_samples, kSampleGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t rows = batch.text_lens[b], views = 0;
      for (int64_t i = off.sample_images[b]; i < off.sample_images[b + 1]; ++i) {
        int64_t kept = 1;  // the global view
        for (int64_t f = off.image_tiles[i]; f < off.image_tiles[i + 1]; ++f) {
          kept += !batch.skipped_tiles[f];
        }
        const int64_t skipped = tiles_of(batch, i) + 1 - kept;
        rows += 2 + kept * tpv + skipped;  // begin and end markers, views, one row per skipped tile
        views += kept;
      }
      off.sample_rows[b + 1] = rows;
      off.sample_views[b + 1] = views;
    }
  });
  off.sample_rows[0] = off.sample_views[0] = 0;
  for (int64_t b = 0; b < num_samples; ++b) {
    off.sample_rows[b + 1] += off.sample_rows[b];
    off.sample_views[b + 1] += off.sample_views[b];
  }
}

void plan_layout_fill_cpu(const LayoutBatch& batch, const LayoutOffsets& off, int64_t total,
                          const LayoutOutputs& out) {
  const int64_t tpv = batch.tokens_per_view;
  at::parallel_for(0, batch.num_samples, kSampleGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = off.sample_rows[b];
      int64_t row = first, view = off.sample_views[b];
      // Runs of rows with one source are written one loop per output array: plain stores the
      // compiler vectorises (the outputs are GBs for 10^5 samples, so the fill must run at memory
      // speed). Positions and source of the `count` rows from `row`:
      auto put_positions_and_source = [&](int32_t source, int64_t count) {
        for (int64_t k = 0; k < count; ++k)
          out.position_ids[row + k] = static_cast<int32_t>(row - first + k);
        std::fill_n(out.source_ids + row, count, source);
      };
      // A run that predicts nothing, its row ids stepping by id_step from first_id.
      auto put_run = [&](int32_t source, int64_t count, int64_t first_id, int64_t id_step) {
        put_positions_and_source(source, count);
        for (int64_t k = 0; k < count; ++k)
          out.row_ids[row + k] = static_cast<int32_t>(first_id + id_step * k);
        std::fill_n(out.labels + row, count, kIgnoreIndex);
        row += count;
      };
      auto put_view = [&] {
        out.view_starts[view] = static_cast<int32_t>(row);
        for (int64_t j = 0; j < tpv; ++j)
          out.visual_rows[view * tpv + j] = static_cast<int32_t>(row + j);
        put_run(kSourceVisual, tpv, view * tpv, 1);
        ++view;
      };
      // A run of `count` text tokens from the sample's token `k0`. The row before the run predicts
      // its first token when that is an answer token and the row is this sample's (row > first:
      // nothing crosses into the previous sample); the run's last row predicts nothing (a later
      // text run, if any, sets it as the row before that run).
      const int64_t g0 = off.sample_text[b];
      auto put_text = [&](int64_t k0, int64_t count) {
        const int64_t* ids = batch.text_ids + g0 + k0;
        const bool* answer = batch.answer_mask + g0 + k0;
        if (count > 0 && row > first && answer[0]) out.labels[row - 1] = ids[0];
        put_positions_and_source(kSourceText, count);
        for (int64_t k = 0; k < count; ++k) out.row_ids[row + k] = static_cast<int32_t>(ids[k]);
        for (int64_t k = 0; k + 1 < count; ++k)
          out.labels[row + k] = answer[k + 1] ? ids[k + 1] : kIgnoreIndex;
        if (count > 0) out.labels[row + count - 1] = kIgnoreIndex;
        row += count;
      };
      const int64_t head = batch.text_before_images[b];
      put_text(0, head);
      for (int64_t i = off.sample_images[b]; i < off.sample_images[b + 1]; ++i) {
        put_run(kSourceImageBegin, 1, 0, 0);
        put_view();  // the global view
        for (int64_t f = off.image_tiles[i]; f < off.image_tiles[i + 1]; ++f) {
          if (batch.skipped_tiles[f]) {
            put_run(kSourceSkip, 1, 0, 0);
          } else {
            put_view();
          }
        }
        put_run(kSourceImageEnd, 1, 0, 0);
      }
      put_text(head, batch.text_lens[b] - head);
    }
  });
  const int64_t used = off.sample_rows[batch.num_samples];
  std::fill(out.position_ids + used, out.position_ids + total, 0);
  std::fill(out.source_ids + used, out.source_ids + total, kSourcePadding);
  std::fill(out.row_ids + used, out.row_ids + total, 0);
  std::fill(out.labels + used, out.labels + total, kIgnoreIndex);
}

int64_t first_fit_decreasing_cpu(const int64_t* lengths, int64_t n, int64_t budget,
                                 int64_t* bin_ids, int64_t* placement) {
  std::iota(placement, placement + n, int64_t{0});
  std::stable_sort(placement, placement + n,
                   [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  int64_t size = 1;
  while (size < n) size *= 2;
  // free_space[size + k]: free tokens of bin k (all n bins that could ever open start empty; leaves
  // past n can never fit); free_space[node]: the most of any bin below node.
  std::vector<int64_t> free_space(2 * size, -1);
  std::fill(free_space.begin() + size, free_space.begin() + size + n, budget);
  for (int64_t node = size - 1; node > 0; --node)
    free_space[node] = std::max(free_space[2 * node], free_space[2 * node + 1]);
  int64_t num_bins = 0;
  for (int64_t p = 0; p < n; ++p) {
    const int64_t sample = placement[p], need = lengths[sample];
    int64_t node = 1;
    while (node < size) node = free_space[2 * node] >= need ? 2 * node : 2 * node + 1;  // leftmost fit
    bin_ids[sample] = node - size;
    num_bins = std::max(num_bins, node - size + 1);
    free_space[node] -= need;
    for (node /= 2; node > 0; node /= 2)
      free_space[node] = std::max(free_space[2 * node], free_space[2 * node + 1]);
  }
  return num_bins;
}

void group_bins_cpu(const int64_t* lengths, const int64_t* bin_ids, const int64_t* placement,
                    int64_t n, int64_t num_bins, int64_t* order, int64_t* bin_offsets,
                    int64_t* bin_tokens) {
  std::fill(bin_offsets, bin_offsets + num_bins + 1, int64_t{0});
  std::fill(bin_tokens, bin_tokens + num_bins, int64_t{0});
  for (int64_t s = 0; s < n; ++s) {
    ++bin_offsets[bin_ids[s] + 1];
    bin_tokens[bin_ids[s]] += lengths[s];
  }
  for (int64_t k = 0; k < num_bins; ++k) bin_offsets[k + 1] += bin_offsets[k];
  std::vector<int64_t> next(bin_offsets, bin_offsets + num_bins);
  for (int64_t p = 0; p < n; ++p) order[next[bin_ids[placement[p]]]++] = placement[p];
}

}  // namespace sphinx_kernels
