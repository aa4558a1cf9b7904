// moe_expert_mlp on the CPU: per expert, its three GEMMs on its rows of the block-padded batch,
// written in place into row slices of the outputs. The same ATen operations as the reference
// (sphinx_kernels/ops/moe_expert_mlp.py) at the same rounding points, without its Python loop, whose
// per-expert dispatch dominated a decode step.
#include "expert_mlp_cpu.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/silu.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace sphinx_kernels {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_expert_mlp_native(
    const at::Tensor& x_grouped, const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
    const at::Tensor& tokens_per_expert, const at::Tensor& padded_offsets, bool store_pre) {
  constexpr const char* op = "moe_expert_mlp_native";
  TORCH_CHECK(x_grouped.dim() == 2 && w1.dim() == 3 && w3.sizes() == w1.sizes() && w2.dim() == 3,
              op, ": x_grouped must be [R, H], w1 and w3 [E, F, H], w2 [E, H, F]");
  const int64_t rows = x_grouped.size(0), hidden = x_grouped.size(1);
  const int64_t num_experts = w1.size(0), ffn = w1.size(1);
  TORCH_CHECK(w1.size(2) == hidden && w2.size(0) == num_experts && w2.size(1) == hidden &&
                  w2.size(2) == ffn,
              op, ": weight shapes do not match x_grouped [R, H] and w1 [E, F, H]");
  TORCH_CHECK(tokens_per_expert.scalar_type() == at::kInt && padded_offsets.scalar_type() == at::kInt &&
                  tokens_per_expert.dim() == 1 && tokens_per_expert.size(0) == num_experts &&
                  padded_offsets.dim() == 1 && padded_offsets.size(0) == num_experts + 1,
              op, ": tokens_per_expert must be int32 [E] and padded_offsets int32 [E + 1]");
  const at::Tensor counts = tokens_per_expert.contiguous(), offsets = padded_offsets.contiguous();
  const int32_t* count = counts.data_ptr<int32_t>();
  const int32_t* offset = offsets.data_ptr<int32_t>();
  const auto options = x_grouped.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor y = at::empty({rows, hidden}, options);
  at::Tensor h1 = at::empty({store_pre ? rows : 0, ffn}, options);
  at::Tensor h3 = at::empty({store_pre ? rows : 0, ffn}, options);
  // Without stored pre-activations, one scratch pair sized for the largest expert serves them all.
  int64_t most = 0;
  for (int64_t e = 0; e < num_experts; ++e) most = std::max<int64_t>(most, count[e]);
  at::Tensor gate_scratch, up_scratch;
  if (!store_pre && most > 0) {
    gate_scratch = at::empty({most, ffn}, options);
    up_scratch = at::empty({most, ffn}, options);
  }
  // Rows before `written` are final; the gaps between experts' rows (padding) are zeroed.
  int64_t written = 0;
  auto zero_rows = [&](int64_t end) {
    if (end <= written) return;
    y.narrow(0, written, end - written).zero_();
    if (store_pre) {
      h1.narrow(0, written, end - written).zero_();
      h3.narrow(0, written, end - written).zero_();
    }
  };
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t start = offset[e], n = count[e];
    if (n == 0) continue;
    // Segments in ascending order, inside [0, R): what a moe_routing plan gives (the op checks it
    // on the CPU; this keeps every write in bounds whatever the caller passes).
    TORCH_CHECK(n > 0 && start >= written && start + n <= rows, op,
                ": expert ", e, "'s rows [", start, ", ", start + n,
                ") overlap the previous expert's or leave [0, ", rows, ")");
    zero_rows(start);
    const at::Tensor x = x_grouped.narrow(0, start, n);
    at::Tensor gate = store_pre ? h1.narrow(0, start, n) : gate_scratch.narrow(0, 0, n);
    at::Tensor up = store_pre ? h3.narrow(0, start, n) : up_scratch.narrow(0, 0, n);
    at::mm_out(gate, x, w1[e].t());
    at::mm_out(up, x, w3[e].t());
    at::Tensor act = at::silu(gate);
    act.mul_(up);
    at::Tensor out = y.narrow(0, start, n);
    at::mm_out(out, act, w2[e].t());
    written = start + n;
  }
  zero_rows(rows);
  return {y, h1, h3};
}

}  // namespace sphinx_kernels
