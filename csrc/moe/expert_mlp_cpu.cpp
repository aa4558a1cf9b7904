// moe_expert_mlp on the CPU: per expert, its GEMMs on its rows of the block-padded batch, written
// in place into row slices of the outputs, without the reference's Python loop over experts (whose
// per-expert dispatch dominated a decode step). The forward is the reference's ATen operations at
// the same rounding points (sphinx_kernels/ops/moe_expert_mlp.py). The backward fuses the SwiGLU's
// elementwise gradient into one pass in the accumulation type, accumulates the second GEMM of the
// input gradient in place, and writes each weight gradient once instead of zero-filling it first.
#include "expert_mlp_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/silu.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace sphinx_kernels {
namespace {

// The experts' row segments of one call, checked in order: every write stays inside [0, R) and no
// two experts' rows overlap, whatever the caller passes (the op checks the plan on the CPU too).
struct ExpertRows {
  const char* op;
  const int32_t* count;
  const int32_t* offset;
  int64_t num_experts, rows;

  int64_t largest() const {
    int64_t most = 0;
    for (int64_t e = 0; e < num_experts; ++e) most = std::max<int64_t>(most, count[e]);
    return most;
  }

  // Expert e's first row, given that rows before `written` belong to earlier experts.
  int64_t start(int64_t e, int64_t written) const {
    const int64_t first = offset[e], n = count[e];
    TORCH_CHECK(n > 0 && first >= written && first + n <= rows, op, ": expert ", e, "'s rows [",
                first, ", ", first + n, ") overlap the previous expert's or leave [0, ", rows, ")");
    return first;
  }
};

ExpertRows expert_rows(const char* op, const at::Tensor& x_grouped, const at::Tensor& w1,
                       const at::Tensor& w3, const at::Tensor& w2, const at::Tensor& counts,
                       const at::Tensor& offsets) {
  TORCH_CHECK(x_grouped.dim() == 2 && w1.dim() == 3 && w3.sizes() == w1.sizes() && w2.dim() == 3,
              op, ": x_grouped must be [R, H], w1 and w3 [E, F, H], w2 [E, H, F]");
  const int64_t hidden = x_grouped.size(1), num_experts = w1.size(0), ffn = w1.size(1);
  TORCH_CHECK(w1.size(2) == hidden && w2.size(0) == num_experts && w2.size(1) == hidden &&
                  w2.size(2) == ffn,
              op, ": weight shapes do not match x_grouped [R, H] and w1 [E, F, H]");
  TORCH_CHECK(counts.scalar_type() == at::kInt && offsets.scalar_type() == at::kInt &&
                  counts.dim() == 1 && counts.size(0) == num_experts && counts.is_contiguous() &&
                  offsets.dim() == 1 && offsets.size(0) == num_experts + 1 &&
                  offsets.is_contiguous(),
              op, ": tokens_per_expert must be int32 [E] and padded_offsets int32 [E + 1]");
  return {op, counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), num_experts,
          x_grouped.size(0)};
}

void zero_rows(std::initializer_list<at::Tensor> tensors, int64_t begin, int64_t end) {
  if (end <= begin) return;
  for (const at::Tensor& t : tensors) {
    if (t.size(0) > 0) t.narrow(0, begin, end - begin).zero_();
  }
}

// Elements per parallel task of the SwiGLU gradient: each is a few multiply-adds.
constexpr int64_t kSwigluGrain = 1 << 14;

// Over `size` contiguous elements, with s = sigmoid(gate) given in `act` (ATen's vectorised
// sigmoid: a scalar exp here would cost more than all of the rest) and silu = gate * s:
//   act       = silu * up  (grad_w2's operand)
//   grad_up   = grad_act * silu
//   grad_gate = grad_act * up * s * (1 + gate * (1 - s))
// in the accumulation type, each rounded once. Non-finite inputs propagate as in the reference's
// formula (sigmoid(-inf) = 0 makes silu NaN there too).
template <typename T>
void swiglu_backward(const T* __restrict__ gate, const T* __restrict__ up,
                     const T* __restrict__ grad_act, T* __restrict__ act,
                     T* __restrict__ grad_gate, T* __restrict__ grad_up, int64_t size) {
  using Acc = at::opmath_type<T>;
  at::parallel_for(0, size, kSwigluGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Acc g = gate[i], u = up[i], d = grad_act[i], s = act[i];
      const Acc silu = g * s;
      act[i] = static_cast<T>(silu * u);
      grad_up[i] = static_cast<T>(d * silu);
      grad_gate[i] = static_cast<T>(d * u * s * (Acc(1) + g * (Acc(1) - s)));
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_expert_mlp_native(
    const at::Tensor& x_grouped, const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
    const at::Tensor& tokens_per_expert, const at::Tensor& padded_offsets, bool store_pre) {
  const at::Tensor counts = tokens_per_expert.contiguous(), offsets = padded_offsets.contiguous();
  const ExpertRows experts = expert_rows("moe_expert_mlp_native", x_grouped, w1, w3, w2, counts,
                                         offsets);
  const int64_t rows = experts.rows, hidden = x_grouped.size(1), ffn = w1.size(1);
  const auto options = x_grouped.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor y = at::empty({rows, hidden}, options);
  at::Tensor h1 = at::empty({store_pre ? rows : 0, ffn}, options);
  at::Tensor h3 = at::empty({store_pre ? rows : 0, ffn}, options);
  // Without stored pre-activations, one scratch pair sized for the largest expert serves them all.
  const int64_t most = store_pre ? 0 : experts.largest();
  at::Tensor gate_scratch = at::empty({most, ffn}, options);
  at::Tensor up_scratch = at::empty({most, ffn}, options);
  // Rows before `written` are final; the gaps between experts' rows (padding) are zeroed.
  int64_t written = 0;
  for (int64_t e = 0; e < experts.num_experts; ++e) {
    const int64_t n = experts.count[e];
    if (n == 0) continue;
    const int64_t start = experts.start(e, written);
    zero_rows({y, h1, h3}, written, start);
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
  zero_rows({y, h1, h3}, written, rows);
  return {y, h1, h3};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_expert_mlp_backward_native(
    const at::Tensor& grad_y, const at::Tensor& x_grouped, const at::Tensor& w1,
    const at::Tensor& w3, const at::Tensor& w2, const at::Tensor& tokens_per_expert,
    const at::Tensor& padded_offsets, const at::Tensor& h1, const at::Tensor& h3) {
  constexpr const char* op = "moe_expert_mlp_backward_native";
  const at::Tensor counts = tokens_per_expert.contiguous(), offsets = padded_offsets.contiguous();
  const ExpertRows experts = expert_rows(op, x_grouped, w1, w3, w2, counts, offsets);
  const int64_t rows = experts.rows, hidden = x_grouped.size(1), ffn = w1.size(1);
  TORCH_CHECK(grad_y.sizes() == x_grouped.sizes(), op, ": grad_y must have x_grouped's shape");
  TORCH_CHECK(h1.dim() == 2 && h1.size(0) == rows && h1.size(1) == ffn && h3.sizes() == h1.sizes(),
              op, ": h1 and h3 must be [R, F]");
  const auto options = x_grouped.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_x = at::empty({rows, hidden}, options);
  at::Tensor grad_w1 = at::empty(w1.sizes(), options);
  at::Tensor grad_w3 = at::empty(w3.sizes(), options);
  at::Tensor grad_w2 = at::empty(w2.sizes(), options);
  // Scratch for the largest expert: the gradient into the activation, the activation itself and
  // the gradients into the gate and up pre-activations.
  const int64_t most = experts.largest();
  at::Tensor scratch = at::empty({4, most, ffn}, options);
  int64_t written = 0;
  for (int64_t e = 0; e < experts.num_experts; ++e) {
    at::Tensor dw1 = grad_w1[e], dw3 = grad_w3[e], dw2 = grad_w2[e];
    const int64_t n = experts.count[e];
    if (n == 0) {  // an expert that received no token: its weights get a zero gradient
      dw1.zero_();
      dw3.zero_();
      dw2.zero_();
      continue;
    }
    const int64_t start = experts.start(e, written);
    zero_rows({grad_x}, written, start);
    const at::Tensor x = x_grouped.narrow(0, start, n), dy = grad_y.narrow(0, start, n);
    const at::Tensor gate = h1.narrow(0, start, n).contiguous();
    const at::Tensor up = h3.narrow(0, start, n).contiguous();
    at::Tensor grad_act = scratch[0].narrow(0, 0, n), act = scratch[1].narrow(0, 0, n);
    at::Tensor grad_gate = scratch[2].narrow(0, 0, n), grad_up = scratch[3].narrow(0, 0, n);
    at::mm_out(grad_act, dy, w2[e]);
    at::sigmoid_out(act, gate);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_grouped.scalar_type(), op, [&] {
      swiglu_backward(gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(),
                      grad_act.const_data_ptr<scalar_t>(), act.mutable_data_ptr<scalar_t>(),
                      grad_gate.mutable_data_ptr<scalar_t>(), grad_up.mutable_data_ptr<scalar_t>(),
                      n * ffn);
    });
    at::Tensor dx = grad_x.narrow(0, start, n);
    at::mm_out(dx, grad_gate, w1[e]);
    dx.addmm_(grad_up, w3[e]);
    at::mm_out(dw1, grad_gate.t(), x);
    at::mm_out(dw3, grad_up.t(), x);
    at::mm_out(dw2, dy.t(), act);
    written = start + n;
  }
  zero_rows({grad_x}, written, rows);
  return {grad_x, grad_w1, grad_w3, grad_w2};
}

}  // namespace sphinx_kernels
