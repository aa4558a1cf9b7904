// CPU kernel of apply_rotary. Declaration and contract: varlen.h.
#include "varlen.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>

namespace sphinx_kernels {
namespace {

// Tokens per parallel task: a token is a few heads of D elements, far too little to split.
constexpr int64_t kRotaryGrain = 64;

template <typename T, typename Table, typename Position>
void apply_rotary_cpu_impl(const RotaryInputs& in, const RotaryTensor* parts, int num_parts) {
  const Table* cos = static_cast<const Table*>(in.cos);
  const Table* sin = static_cast<const Table*>(in.sin);
  const Position* positions = static_cast<const Position*>(in.position_ids);
  const int64_t half = in.head_dim / 2;
  // The backward rotation: sin -> -sin with its halves swapped (see apply_rotary_reference).
  const float sign = in.transpose ? -1.0f : 1.0f;
  const int64_t first_sin = in.transpose ? half : 0, second_sin = in.transpose ? 0 : half;
  at::parallel_for(0, in.num_tokens, kRotaryGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = static_cast<int64_t>(positions[t]);
      const bool valid = p >= 0 && p < in.table_rows;
      const Table* c = cos + (valid ? p : 0) * in.table_stride;
      const Table* s = sin + (valid ? p : 0) * in.table_stride;
      for (int part = 0; part < num_parts; ++part) {
        const RotaryTensor& x = parts[part];
        const T* src_token = static_cast<const T*>(x.data) + t * x.stride_token;
        T* dst_token = static_cast<T*>(x.out) + t * x.heads * in.head_dim;
        for (int64_t h = 0; h < x.heads; ++h) {
          const T* src = src_token + h * x.stride_head;
          T* dst = dst_token + h * in.head_dim;
          if (!valid) {  // a position outside the table: a NaN row, never an out-of-bounds read
            for (int64_t d = 0; d < in.head_dim; ++d)
              dst[d] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
            continue;
          }
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = static_cast<float>(src[i]), x2 = static_cast<float>(src[i + half]);
            const float s1 = sign * static_cast<float>(s[first_sin + i]);
            const float s2 = sign * static_cast<float>(s[second_sin + i]);
            dst[i] = static_cast<T>(x1 * static_cast<float>(c[i]) - x2 * s1);
            dst[i + half] = static_cast<T>(x2 * static_cast<float>(c[i + half]) + x1 * s2);
          }
        }
      }
    }
  });
}

template <typename T, typename Table>
void dispatch_positions(const RotaryInputs& in, const RotaryTensor* parts, int num_parts) {
  if (in.positions_int64)
    apply_rotary_cpu_impl<T, Table, int64_t>(in, parts, num_parts);
  else
    apply_rotary_cpu_impl<T, Table, int32_t>(in, parts, num_parts);
}

template <typename T>
void dispatch_table(const RotaryInputs& in, const RotaryTensor* parts, int num_parts) {
  switch (in.table_kind) {
    case FloatKind::kFloat16: dispatch_positions<T, c10::Half>(in, parts, num_parts); break;
    case FloatKind::kBFloat16: dispatch_positions<T, c10::BFloat16>(in, parts, num_parts); break;
    case FloatKind::kFloat32: dispatch_positions<T, float>(in, parts, num_parts); break;
    case FloatKind::kFloat64: break;  // refused by the binding
  }
}

}  // namespace

void apply_rotary_cpu(const RotaryInputs& inputs, const RotaryTensor* parts, int num_parts) {
  switch (inputs.kind) {
    case FloatKind::kFloat16: dispatch_table<c10::Half>(inputs, parts, num_parts); break;
    case FloatKind::kBFloat16: dispatch_table<c10::BFloat16>(inputs, parts, num_parts); break;
    case FloatKind::kFloat32: dispatch_table<float>(inputs, parts, num_parts); break;
    case FloatKind::kFloat64: break;  // refused by the binding
  }
}

}  // namespace sphinx_kernels
