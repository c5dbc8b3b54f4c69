// The element-wise passes of linear and feed_forward on CUDA around the cuBLASLt GEMMs
// (cuda/cublaslt_gemm.h): ReLU + Philox dropout of the hidden activation in the forward, the
// ReLU/dropout gate of the gradient in the backward. Same element numbering and keep rule as the
// CPU GEMM epilogue (common/dropout.h), so one seed gives one mask on both devices. The ReLU
// bit-mask passes keep the layout of common/relu_mask.h (cuBLASLt's RELU_AUX / DRELU epilogues).
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

// Over a contiguous (rows, cols) h and its contiguous uint8 bit-mask (rows, relu_mask_row_bytes(cols)):
//   from_aux false: h = max(0, h) (NaN stays NaN, as on the CPU), bit = [h > 0] -- the fallback of
//                   the RELU_AUX epilogue;
//   from_aux true:  h is already max(0, .) and the bits are cuBLASLt's (RELU_AUX); they are read.
// Then dropout (when d.enabled): bit &= keep, h = keep ? h * d.scale : 0, keep of element (r, c)
// being Philox element r * cols + c. The row's padding bits are written 0.
void relu_mask_dropout_(const at::Tensor& h, const at::Tensor& mask, bool from_aux, const DropoutParams& d);

// g = bit ? g : 0 in place over a contiguous (rows, cols) g and its bit-mask (the fallback of the
// DRELU epilogue).
void relu_mask_gate_(const at::Tensor& g, const at::Tensor& mask);

}  // namespace aiayn::cuda
