// CUDA entry points of feed_forward: FFN(x) = dropout(max(0, x W1^T + b1)) W2^T + b2, the paper's
// position-wise feed-forward network (§3.3) with dropout on the hidden activation. Same checks,
// Philox mask and results as cpu/feed_forward.cpp, plus float16.
//
// Forward: GEMM1 on cuBLASLt with the RELU_AUX_BIAS epilogue: hidden = max(0, x W1^T + b1) and the
// ReLU bit-mask (common/relu_mask.h) in one call. With dropout, one pass of ours over hidden and
// the mask (cuda/relu_dropout.h): hidden = keep ? hidden / (1 - p) : 0 with the CPU's Philox
// numbering, and mask &= keep, so that the mask is the whole backward gate. GEMM2 with the bias
// epilogue. Returns (out, hidden, mask); hidden is kept for dW2.
// Backward: dh = (1 / (1 - p)) * (dY W2) * mask in one GEMM with the DRELU_BGRAD epilogue (the scale
// as alpha), which also writes db1 = column sums of dh; dX = dh W1, dW1 = dh^T X, and dW2 = dY^T
// hidden whose BGRADB epilogue gives db2. Without a mask (None: a hidden from elsewhere) the gate
// is hidden > 0 in a pass of ours and db1 comes from dW1's BGRADB, as on the CPU.
// Every GEMM falls back (cuda/cublaslt_gemm.h) to torch's matmul plus our passes, whose results
// agree; NaN differs: cuBLASLt's ReLU epilogue maps NaN to 0, the fallback and the CPU keep NaN.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/checks.h"
#include "../common/dropout.h"
#include "../common/feed_forward_args.h"
#include "../common/relu_mask.h"
#include "cublaslt_gemm.h"
#include "linear_rows.h"
#include "relu_dropout.h"

namespace aiayn::cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> feed_forward_fwd_cuda(const at::Tensor& x, const at::Tensor& w1,
                                                                     const std::optional<at::Tensor>& b1,
                                                                     const at::Tensor& w2,
                                                                     const std::optional<at::Tensor>& b2, double p,
                                                                     const at::Tensor& seed) {
  check_feed_forward_args(x, w1, b1, w2, b2, p, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(x.is_cuda(), kFeedForward, ": argument 'x' must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t d_model = x.size(-1), d_ff = w1.size(0), tokens = leading_elements(x);
  at::Tensor hidden = at::empty(with_last(x, d_ff), x.options());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor relu_mask = at::empty(with_last(x, relu_mask_row_bytes(d_ff)), x.options().dtype(at::kByte));
  if (tokens == 0) return {out, hidden, relu_mask};
  const DropoutParams dropout = make_dropout_params(p, p > 0.0 ? read_seed(kFeedForward, seed) : 0, 0);
  const at::Tensor h2 = hidden.view({tokens, d_ff});
  const at::Tensor mask2 = relu_mask.view({tokens, relu_mask_row_bytes(d_ff)});

  GemmCall g1;
  g1.a = token_rows(x, tokens, d_model);
  g1.b = w1;
  g1.b_trans = true;
  g1.c = h2;
  set_bias(g1, b1);
  g1.epilogue = GemmEpilogue::kReluAux;
  g1.relu_mask = mask2;
  gemm(g1);
  if (dropout.enabled) relu_mask_dropout_(h2, mask2, /*from_aux=*/true, dropout);

  GemmCall g2;
  g2.a = h2;
  g2.b = w2;
  g2.b_trans = true;
  g2.c = out.view({tokens, d_model});
  set_bias(g2, b2);
  gemm(g2);
  return {out, hidden, relu_mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feed_forward_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& hidden, double p, const std::optional<at::Tensor>& relu_mask) {
  check_feed_forward_bwd_args(grad_out, x, w1, w2, hidden, p, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(x.is_cuda(), kFeedForward, ": argument 'x' must be a CUDA tensor, got ", x.device());
  const bool has_mask = check_relu_mask(relu_mask, x, w1.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t d_model = x.size(-1), d_ff = w1.size(0), tokens = leading_elements(x);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw1 = at::empty({d_ff, d_model}, x.options());
  at::Tensor db1 = at::empty({d_ff}, x.options());
  at::Tensor dw2 = at::empty({d_model, d_ff}, x.options());
  at::Tensor db2 = at::empty({d_model}, x.options());
  if (tokens == 0) {
    for (at::Tensor* t : {&dw1, &db1, &dw2, &db2}) t->zero_();
    return {dx, dw1, db1, dw2, db2};
  }
  const at::Tensor dy = token_rows(grad_out, tokens, d_model), x2 = token_rows(x, tokens, d_model);
  const at::Tensor h = hidden.reshape({tokens, d_ff}).contiguous();
  const double scale = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);

  // dh = (scale * dY W2) * gate: the dropout scale as the GEMM's alpha; the gate (ReLU and dropout
  // at once) in the DRELU_BGRAD epilogue from the forward's bit-mask, which also sums db1; without
  // a mask, in place from hidden's sign.
  const at::Tensor dh = at::empty({tokens, d_ff}, x.options());
  GemmCall g;
  g.a = dy;
  g.b = w2;
  g.c = dh;
  g.alpha = scale;
  if (has_mask) {
    g.epilogue = GemmEpilogue::kDReluBiasGrad;
    g.relu_mask = relu_mask->reshape({tokens, relu_mask_row_bytes(d_ff)}).contiguous();
    g.bias_grad = db1;
  }
  gemm(g);
  if (!has_mask) relu_gate(dh, dh, h, 1.0);

  // dX = dh W1; dW1 = dh^T X (with db1 where the first GEMM did not give it); dW2 = dY^T hidden, db2.
  gemm_input_grad(dh, w1, dx.view({tokens, d_model}));
  gemm_weight_grad(dh, x2, dw1, has_mask ? at::Tensor() : db1);
  gemm_weight_grad(dy, h, dw2, db2);
  return {dx, dw1, db1, dw2, db2};
}

TORCH_LIBRARY_IMPL(aiayn, CUDA, m) {
  m.impl("feed_forward_fwd", &feed_forward_fwd_cuda);
  m.impl("feed_forward_bwd", &feed_forward_bwd_cuda);
}

}  // namespace aiayn::cuda
