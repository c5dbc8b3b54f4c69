// CPU entry points of linear: out = act(x W^T + b), act = identity or ReLU, on the GEMM of
// gemm/gemm.h (bias and ReLU in the epilogue). The backward gates grad_out with [out > 0] while
// packing it, and sums it into grad_b in the same pass.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/feed_forward_args.h"
#include "gemm/gemm.h"
#include "kernels.h"

namespace aiayn::cpu {

at::Tensor linear_fwd_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, bool relu) {
  check_linear_args(x, w, b, {at::kFloat, at::kBFloat16, at::kDouble});
  const int64_t K = x.size(-1), N = w.size(0);
  at::Tensor out = at::empty(with_last(x, N), x.options());
  const int64_t tokens = leading_elements(x);
  if (tokens == 0 || N == 0) return out;
  const at::Tensor bias = gemm_bias(b, x.scalar_type());
  const at::Tensor x2 = gemm_rows(x, K);
  GemmArgs g{};
  g.dtype = gemm_dtype(x);
  g.M = tokens;
  g.N = N;
  g.K = K;
  g.a = x2.data_ptr();
  g.a_rs = gemm_row_stride(x2);
  g.a_cs = 1;
  g.a_gate_scale = 1.0f;
  g.c_gate_scale = 1.0f;
  g.bias = bias.defined() ? bias.data_ptr() : nullptr;
  g.relu = relu;
  g.c = out.data_ptr();
  g.c_rs = N;
  gemm_run_weight_t(g, gemm_weight(w));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& w,
                                                              const std::optional<at::Tensor>& out, bool relu) {
  check_linear_bwd_args(grad_out, x, w, out, relu, {at::kFloat, at::kBFloat16, at::kDouble});
  const int64_t K = x.size(-1), N = w.size(0);
  const int64_t tokens = leading_elements(x);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor db = at::zeros({N}, x.options().dtype(acc));
  if (tokens == 0 || N == 0) return {at::zeros(x.sizes(), x.options()), at::zeros({N, K}, x.options()), db.to(x.scalar_type())};
  // Both GEMMs below store every element of their C: no zero fill needed.
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw = at::empty({N, K}, x.options());
  const at::Tensor g2 = grad_out.reshape({tokens, N}).contiguous();
  const at::Tensor o2 = relu ? out->reshape({tokens, N}).contiguous() : at::Tensor();
  const at::Tensor x2 = gemm_rows(x, K);
  GemmArgs g{};
  g.dtype = gemm_dtype(x);
  g.a_gate = relu ? o2.data_ptr() : nullptr;
  g.a_gate_scale = 1.0f;
  g.c_gate_scale = 1.0f;
  // dx = (grad_out * [out > 0]) W.
  g.M = tokens;
  g.N = K;
  g.K = N;
  g.a = g2.data_ptr();
  g.a_rs = N;
  g.a_cs = 1;
  g.c = dx.data_ptr();
  g.c_rs = K;
  const GemmArgs g_dx = g;
  at::Tensor pack_w = gemm_pack_weight(gemm_weight(w), /*transpose=*/false);
  // dW = (grad_out * [out > 0])^T x, db = its row sums.
  g.M = N;
  g.N = K;
  g.K = tokens;
  g.a_rs = 1;
  g.a_cs = N;
  g.a_row_sums = db.data_ptr();
  g.c = dw.data_ptr();
  g.c_rs = K;
  gemm_run_many({{g_dx, pack_w}, {g, gemm_pack_b(gemm_dtype(x), tokens, K, x2.data_ptr(), gemm_row_stride(x2), 1)}});
  return {dx, dw, db.to(x.scalar_type())};
}

TORCH_LIBRARY_IMPL(aiayn, CPU, m) {
  m.impl("linear_fwd", &linear_fwd_cpu);
  m.impl("linear_bwd", &linear_bwd_cpu);
}

}  // namespace aiayn::cpu
