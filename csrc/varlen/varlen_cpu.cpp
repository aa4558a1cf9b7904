// CPU kernels of the packed-sequence family. Declarations and contracts: varlen.h.
#include "varlen.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <vector>

namespace sphinx_kernels {
namespace {

// Rows per parallel task: a row copy is short, so hand each thread a good stretch of them.
constexpr int64_t kGatherGrain = 256;

template <typename Index>
void gather_rows_cpu_impl(const GatherSources& src, const Index* source_ids, const Index* row_ids,
                          int64_t num_rows, int64_t row_bytes, const PoisonPattern& poison,
                          char* out) {
  at::parallel_for(0, num_rows, kGatherGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      char* dst = out + t * row_bytes;
      const int64_t s = source_ids[t];
      const int64_t r = row_ids[t];
      if (s < 0) {
        std::memset(dst, 0, row_bytes);
      } else if (s < src.count && r >= 0 && r < src.rows[s]) {
        std::memcpy(dst, static_cast<const char*>(src.base[s]) + r * src.row_stride_bytes[s],
                    row_bytes);
      } else {
        for (int64_t b = 0; b < row_bytes; ++b) dst[b] = poison.bytes[b % 16];
      }
    }
  });
}

template <typename T, typename Acc>
void segment_sum_rows_cpu_impl(const T* rows, const int64_t* order, const int64_t* offsets,
                               int64_t num_segments, int64_t width, T* out) {
  at::parallel_for(0, num_segments, 64, [&](int64_t begin, int64_t end) {
    std::vector<Acc> acc(width);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t i = offsets[r]; i < offsets[r + 1]; ++i) {
        const T* row = rows + order[i] * width;
        for (int64_t d = 0; d < width; ++d) acc[d] += static_cast<Acc>(row[d]);
      }
      T* dst = out + r * width;
      for (int64_t d = 0; d < width; ++d) dst[d] = static_cast<T>(acc[d]);
    }
  });
}

}  // namespace

void gather_rows_cpu(const GatherSources& sources, const void* source_ids, const void* row_ids,
                     bool index_is_int64, int64_t num_rows, int64_t row_bytes,
                     const PoisonPattern& poison, void* out) {
  if (index_is_int64) {
    gather_rows_cpu_impl(sources, static_cast<const int64_t*>(source_ids),
                         static_cast<const int64_t*>(row_ids), num_rows, row_bytes, poison,
                         static_cast<char*>(out));
  } else {
    gather_rows_cpu_impl(sources, static_cast<const int32_t*>(source_ids),
                         static_cast<const int32_t*>(row_ids), num_rows, row_bytes, poison,
                         static_cast<char*>(out));
  }
}

void segment_sum_rows_cpu(FloatKind kind, const void* rows, const int64_t* order,
                          const int64_t* offsets, int64_t num_segments, int64_t width, void* out) {
  switch (kind) {
    case FloatKind::kFloat16:
      segment_sum_rows_cpu_impl<c10::Half, float>(static_cast<const c10::Half*>(rows), order,
                                                  offsets, num_segments, width,
                                                  static_cast<c10::Half*>(out));
      break;
    case FloatKind::kBFloat16:
      segment_sum_rows_cpu_impl<c10::BFloat16, float>(static_cast<const c10::BFloat16*>(rows),
                                                      order, offsets, num_segments, width,
                                                      static_cast<c10::BFloat16*>(out));
      break;
    case FloatKind::kFloat32:
      segment_sum_rows_cpu_impl<float, float>(static_cast<const float*>(rows), order, offsets,
                                              num_segments, width, static_cast<float*>(out));
      break;
    case FloatKind::kFloat64:
      segment_sum_rows_cpu_impl<double, double>(static_cast<const double*>(rows), order, offsets,
                                                num_segments, width, static_cast<double*>(out));
      break;
  }
}

}  // namespace sphinx_kernels
