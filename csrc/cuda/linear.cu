// CUDA entry points of linear: out = act(x W^T + b), act = identity or ReLU (the building block of
// the paper's feed-forward network, §3.3). Same checks and results as cpu/linear.cpp, plus
// float16. The GEMMs run on cuBLASLt with the bias add and ReLU (forward: BIAS or RELU_BIAS) and
// the bias gradient (backward: BGRADB) fused into their epilogues (cuda/cublaslt_gemm.h). The
// backward's ReLU gate is a pass of ours reading the output's sign (cuda/relu_dropout.h): no GEMM of
// linear's backward produces the gated gradient (grad_out comes from the caller), so cuBLASLt's
// DRELU epilogue has nothing to attach to and a bit-mask would have no reader (feed_forward, whose
// backward GEMM dY W2 does produce it, uses one). cuBLASLt's ReLU maps NaN to 0; the fallback keeps
// NaN as the CPU does.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/checks.h"
#include "../common/feed_forward_args.h"
#include "cublaslt_gemm.h"
#include "linear_rows.h"
#include "relu_dropout.h"

namespace aiayn::cuda {

at::Tensor linear_fwd_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, bool relu) {
  check_linear_args(x, w, b, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(x.is_cuda(), kLinear, ": argument 'x' must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1), N = w.size(0), tokens = leading_elements(x);
  at::Tensor out = at::empty(with_last(x, N), x.options());
  if (tokens == 0 || N == 0) return out;
  const at::Tensor out2 = out.view({tokens, N});
  GemmCall g;
  g.a = token_rows(x, tokens, K);
  g.b = w;
  g.b_trans = true;
  g.c = out2;
  set_bias(g, b);
  if (relu) g.epilogue = GemmEpilogue::kRelu;
  gemm(g);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                               const at::Tensor& w,
                                                               const std::optional<at::Tensor>& out, bool relu) {
  check_linear_bwd_args(grad_out, x, w, out, relu, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(x.is_cuda(), kLinear, ": argument 'x' must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1), N = w.size(0), tokens = leading_elements(x);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw = at::empty({N, K}, x.options());
  at::Tensor db = at::empty({N}, x.options());
  if (tokens == 0 || N == 0) {
    dx.zero_();
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  at::Tensor g2 = grad_out.reshape({tokens, N}).contiguous();
  if (relu) {
    // grad_out * [out > 0] into a new buffer (grad_out belongs to the caller).
    at::Tensor gated = at::empty({tokens, N}, x.options());
    relu_gate(gated, g2, out->reshape({tokens, N}).contiguous(), 1.0);
    g2 = gated;
  }
  gemm_input_grad(g2, w, dx.view({tokens, K}));
  gemm_weight_grad(g2, token_rows(x, tokens, K), dw, db);
  return {dx, dw, db};
}

TORCH_LIBRARY_IMPL(aiayn, CUDA, m) {
  m.impl("linear_fwd", &linear_fwd_cuda);
  m.impl("linear_bwd", &linear_bwd_cuda);
}

}  // namespace aiayn::cuda
