// moe_expert_mlp on the CPU, on tensors: its GEMMs are ATen's (BLAS), so unlike the raw kernels of
// moe.h this takes and returns tensors (contract: sphinx_kernels/ops/moe_expert_mlp.py).
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace sphinx_kernels {

// (y [R, H], h1 [P, F], h3 [P, F]) with P = R when store_pre, else 0: for each expert e with rows,
// the rows r in [padded_offsets[e], padded_offsets[e] + tokens_per_expert[e]) of x_grouped [R, H]
// give h1 = x @ w1[e]^T, h3 = x @ w3[e]^T and y = (silu(h1) * h3) @ w2[e]^T, every step rounded to
// the data's dtype as the reference rounds it; all other rows of y, h1, h3 are zero. w1, w3:
// [E, F, H]; w2: [E, H, F]; tokens_per_expert [E], padded_offsets [E + 1] int32. Any strides.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_expert_mlp_native(
    const at::Tensor& x_grouped, const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
    const at::Tensor& tokens_per_expert, const at::Tensor& padded_offsets, bool store_pre);

// (grad_x [R, H], grad_w1 [E, F, H], grad_w3 [E, F, H], grad_w2 [E, H, F]), contiguous, in the
// data's dtype: the gradients of moe_expert_mlp_native's y given grad_y [R, H] and the forward's
// pre-activations h1, h3 [R, F]. Rows of grad_x outside the experts' rows are zero, as are the
// weight gradients of experts with no rows; rows of grad_y, h1 and h3 there are never read. The
// SwiGLU's elementwise gradient takes sigmoid(h1) from ATen in the data's dtype, computes the rest
// in float (double for double) and rounds each result once. Any strides.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_expert_mlp_backward_native(
    const at::Tensor& grad_y, const at::Tensor& x_grouped, const at::Tensor& w1,
    const at::Tensor& w3, const at::Tensor& w2, const at::Tensor& tokens_per_expert,
    const at::Tensor& padded_offsets, const at::Tensor& h1, const at::Tensor& h3);

}  // namespace sphinx_kernels
