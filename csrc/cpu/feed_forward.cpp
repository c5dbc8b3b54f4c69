// CPU entry points of feed_forward: FFN(x) = dropout(max(0, x W1^T + b1)) W2^T + b2, the paper's
// position-wise feed-forward network (§3.3) with dropout on the hidden activation (as in
// tensor2tensor). Two GEMMs (gemm/gemm.h) with bias, ReLU and Philox dropout in the first one's
// epilogue; the backward is four GEMMs whose ReLU/dropout mask is read off the saved hidden
// activation (hidden > 0 <=> the unit was active and kept), so no mask is stored at all.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/dropout.h"
#include "../common/feed_forward_args.h"
#include "gemm/gemm.h"
#include "kernels.h"

namespace aiayn::cpu {
namespace {

GemmArgs gemm_args(const at::Tensor& like, int64_t M, int64_t N, int64_t K) {
  GemmArgs g{};
  g.dtype = gemm_dtype(like);
  g.M = M;
  g.N = N;
  g.K = K;
  g.a_gate_scale = 1.0f;
  g.c_gate_scale = 1.0f;
  return g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> feed_forward_fwd_cpu(const at::Tensor& x, const at::Tensor& w1,
                                                        const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                        const std::optional<at::Tensor>& b2, double p,
                                                        const at::Tensor& seed) {
  check_feed_forward_args(x, w1, b1, w2, b2, p, {at::kFloat, at::kBFloat16, at::kDouble});
  const int64_t d_model = x.size(-1), d_ff = w1.size(0);
  at::Tensor hidden = at::empty(with_last(x, d_ff), x.options());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t tokens = leading_elements(x);
  // No bit-mask here: the backward reads its gate off hidden's sign.
  at::Tensor relu_mask = at::empty({0}, x.options().dtype(at::kByte));
  if (tokens == 0) return {out, hidden, relu_mask};
  const at::Tensor x2 = gemm_rows(x, d_model);
  const at::Tensor w1c = gemm_weight(w1), w2c = gemm_weight(w2);
  const at::Tensor bias1 = gemm_bias(b1, x.scalar_type()), bias2 = gemm_bias(b2, x.scalar_type());

  GemmArgs g1 = gemm_args(x, tokens, d_ff, d_model);
  g1.a = x2.data_ptr();
  g1.a_rs = gemm_row_stride(x2);
  g1.a_cs = 1;
  g1.bias = bias1.defined() ? bias1.data_ptr() : nullptr;
  g1.relu = true;
  g1.dropout = make_dropout_params(p, p > 0.0 ? read_seed(kFeedForward, seed) : 0, 0);
  g1.dropout_scale = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
  g1.c = hidden.data_ptr();
  g1.c_rs = d_ff;
  gemm_run_weight_t(g1, w1c);

  GemmArgs g2 = gemm_args(x, tokens, d_model, d_ff);
  g2.a = hidden.data_ptr();
  g2.a_rs = d_ff;
  g2.a_cs = 1;
  g2.bias = bias2.defined() ? bias2.data_ptr() : nullptr;
  g2.c = out.data_ptr();
  g2.c_rs = d_model;
  gemm_run_weight_t(g2, w2c);
  return {out, hidden, relu_mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feed_forward_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& hidden, double p, const std::optional<at::Tensor>& relu_mask) {
  check_feed_forward_bwd_args(grad_out, x, w1, w2, hidden, p, {at::kFloat, at::kBFloat16, at::kDouble});
  check_relu_mask(relu_mask, x, w1.size(0));  // checked, not needed: hidden > 0 is the same gate
  const int64_t d_model = x.size(-1), d_ff = w1.size(0);
  const int64_t tokens = leading_elements(x);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw1 = at::empty({d_ff, d_model}, x.options());
  at::Tensor dw2 = at::empty({d_model, d_ff}, x.options());
  at::Tensor db1 = at::zeros({d_ff}, x.options().dtype(acc));
  at::Tensor db2 = at::zeros({d_model}, x.options().dtype(acc));
  if (tokens == 0) {
    dw1.zero_();
    dw2.zero_();
    return {dx, dw1, db1.to(x.scalar_type()), dw2, db2.to(x.scalar_type())};
  }
  const at::Tensor dy = gemm_rows(grad_out, d_model), x2 = gemm_rows(x, d_model), h = gemm_rows(hidden, d_ff);
  const at::Tensor w1c = gemm_weight(w1), w2c = gemm_weight(w2);
  const double scale = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);

  // dh = (dy W2) * [hidden > 0] * scale: the ReLU and dropout backward, in the GEMM's epilogue.
  at::Tensor dh = at::empty({tokens, d_ff}, x.options());
  GemmArgs g = gemm_args(x, tokens, d_ff, d_model);
  g.a = dy.data_ptr();
  g.a_rs = gemm_row_stride(dy);
  g.a_cs = 1;
  g.c_gate = h.data_ptr();
  g.c_gate_rs = gemm_row_stride(h);
  g.c_gate_scale = scale;
  g.c = dh.data_ptr();
  g.c_rs = d_ff;
  gemm_run_all(g, gemm_pack_weight(w2c, /*transpose=*/false));

  // dx = dh W1.
  g = gemm_args(x, tokens, d_model, d_ff);
  g.a = dh.data_ptr();
  g.a_rs = d_ff;
  g.a_cs = 1;
  g.c = dx.data_ptr();
  g.c_rs = d_model;
  GemmArgs g_dx = g;
  at::Tensor pack_w1 = gemm_pack_weight(w1c, /*transpose=*/false);

  // dW1 = dh^T x, db1 = column sums of dh (row sums of the packed A).
  g = gemm_args(x, d_ff, d_model, tokens);
  g.a = dh.data_ptr();
  g.a_rs = 1;
  g.a_cs = d_ff;
  g.a_row_sums = db1.data_ptr();
  g.c = dw1.data_ptr();
  g.c_rs = d_model;
  GemmArgs g_dw1 = g;
  at::Tensor pack_x = gemm_pack_b(gemm_dtype(x), tokens, d_model, x2.data_ptr(), gemm_row_stride(x2), 1);

  // dW2 = dy^T hidden, db2 = column sums of dy.
  g = gemm_args(x, d_model, d_ff, tokens);
  g.a = dy.data_ptr();
  g.a_rs = 1;
  g.a_cs = gemm_row_stride(dy);
  g.a_row_sums = db2.data_ptr();
  g.c = dw2.data_ptr();
  g.c_rs = d_ff;
  // The three are independent: one parallel region.
  gemm_run_many({{g_dx, pack_w1},
                 {g_dw1, pack_x},
                 {g, gemm_pack_b(gemm_dtype(x), tokens, d_ff, h.data_ptr(), gemm_row_stride(h), 1)}});

  return {dx, dw1, db1.to(x.scalar_type()), dw2, db2.to(x.scalar_type())};
}

TORCH_LIBRARY_IMPL(aiayn, CPU, m) {
  m.impl("feed_forward_fwd", &feed_forward_fwd_cpu);
  m.impl("feed_forward_bwd", &feed_forward_bwd_cpu);
}

}  // namespace aiayn::cpu
