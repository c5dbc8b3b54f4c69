// The element-wise passes of linear and feed_forward on CUDA around the cuBLASLt GEMMs
// (cuda/cublaslt_gemm.h): ReLU + Philox dropout of the hidden activation in the forward, the
// ReLU/dropout gate of the gradient in the backward. Same element numbering and keep rule as the
// CPU GEMM epilogue (common/dropout.h), so one seed gives one mask on both devices.
#pragma once
#include <ATen/core/Tensor.h>

#include "../common/dropout.h"

namespace aiayn::cuda {

// In place on a contiguous h: h[e] = keep(e) ? act(h[e]) * d.scale : 0, act = ReLU when relu (NaN
// stays NaN, as on the CPU) else identity; e is the flat element number, so hidden element (t, j)
// of a (tokens, d_ff) h is Philox element t * d_ff + j. Without dropout (d.enabled false), only act.
void relu_dropout_(const at::Tensor& h, bool relu, const DropoutParams& d);

// out = g * [gate > 0] * scale element-wise over contiguous tensors of one numel (out may be g):
// the backward of ReLU and dropout read off the forward's output.
void relu_gate(const at::Tensor& out, const at::Tensor& g, const at::Tensor& gate, double scale);

}  // namespace aiayn::cuda
