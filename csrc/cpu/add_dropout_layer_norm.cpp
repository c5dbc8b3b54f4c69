// CPU entry points of add_dropout_layer_norm: LayerNorm(residual + dropout(x)), the paper's
// sub-layer connection (§3.1, §5.4). Checks the arguments, lays the tensors out as rows, and runs
// the ISA kernel (add_dropout_layer_norm_kernel.h) over row chunks with at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/dropout.h"
#include "../common/tensor_layout.h"
#include "../common/add_dropout_layer_norm_args.h"
#include "kernel_dtype.h"
#include "kernels.h"

namespace aiayn::cpu {
namespace {

// weight / bias in the accumulation type (they are `cols` long: the copy is negligible).
at::Tensor affine_param(const std::optional<at::Tensor>& p, const char* name, int64_t cols,
                        const at::Tensor& x, double fill) {
  const auto opts = x.options().dtype(acc_type(x));
  if (!p.has_value() || !p->defined()) return fill == 0.0 ? at::zeros({cols}, opts) : at::ones({cols}, opts);
  return p->to(acc_type(x)).contiguous();
}

// Rows per task: enough work per task to amortise the scheduling, at most one task per thread.
int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_dropout_layer_norm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double p, double eps, const at::Tensor& seed) {
  check_add_dropout_layer_norm_args(x, residual, weight, bias, p, eps,
                                    {at::kFloat, at::kBFloat16, at::kDouble});
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  at::Tensor out, mean, rstd;  // plain variables: lambdas below capture them (C++17)
  std::tie(out, mean, rstd) = add_dropout_layer_norm_outputs(x, rows);
  if (rows == 0 || cols == 0) return {out, mean, rstd};

  const at::Tensor x2 = as_rows(x, cols), r2 = as_rows(residual, cols);
  const at::Tensor w = affine_param(weight, "weight", cols, x, 1.0);
  const at::Tensor b = affine_param(bias, "bias", cols, x, 0.0);
  AddDropoutLayerNormFwd a{};
  a.dtype = kernel_dtype(x);
  a.rows = rows;
  a.cols = cols;
  a.x = x2.data_ptr();
  a.residual = r2.data_ptr();
  a.x_stride = row_stride(x2);
  a.residual_stride = row_stride(r2);
  a.weight = w.data_ptr();
  a.bias = b.data_ptr();
  a.out = out.data_ptr();
  a.mean = mean.data_ptr();
  a.rstd = rstd.data_ptr();
  a.eps = eps;
  a.dropout = make_dropout_params(p, p > 0.0 ? read_seed(kAddDropoutLayerNorm, seed) : 0, 0);
  const KernelTable& k = kernels();
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    k.add_dropout_layer_norm_fwd(a, begin, end);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_dropout_layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& residual,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    double p, const at::Tensor& seed) {
  check_add_dropout_layer_norm_args(x, residual, weight, std::nullopt, p, 0.0,
                                    {at::kFloat, at::kBFloat16, at::kDouble});
  const int64_t rows = check_add_dropout_layer_norm_bwd_args(grad_out, x, mean, rstd);
  const int64_t cols = x.size(-1);
  const auto acc = acc_type(x);
  at::Tensor gx = at::empty(x.sizes(), x.options());
  at::Tensor gr = at::empty(x.sizes(), x.options());
  const auto wdtype = weight.has_value() && weight->defined() ? weight->scalar_type() : acc;
  if (rows == 0 || cols == 0) {
    at::Tensor z = at::zeros({cols}, x.options().dtype(wdtype));
    return {gx, gr, z, z.clone()};
  }
  const at::Tensor g2 = as_rows(grad_out, cols), x2 = as_rows(x, cols), r2 = as_rows(residual, cols);
  const at::Tensor w = affine_param(weight, "weight", cols, x, 1.0);
  const at::Tensor m = mean.to(acc).contiguous(), s = rstd.to(acc).contiguous();
  AddDropoutLayerNormBwd a{};
  a.dtype = kernel_dtype(x);
  a.rows = rows;
  a.cols = cols;
  a.grad_out = g2.data_ptr();
  a.x = x2.data_ptr();
  a.residual = r2.data_ptr();
  a.grad_out_stride = row_stride(g2);
  a.x_stride = row_stride(x2);
  a.residual_stride = row_stride(r2);
  a.weight = w.data_ptr();
  a.mean = m.data_ptr();
  a.rstd = s.data_ptr();
  a.grad_x = gx.data_ptr();
  a.grad_residual = gr.data_ptr();
  a.dropout = make_dropout_params(p, p > 0.0 ? read_seed(kAddDropoutLayerNorm, seed) : 0, 0);

  // Fixed chunks (not at::parallel_for's split) so the weight/bias gradient sums come out the
  // same on every run with the same thread count.
  const int64_t chunks = std::min<int64_t>(rows, std::max<int64_t>(1, at::get_num_threads()));
  at::Tensor partial = at::empty({2, chunks, cols}, x.options().dtype(acc));
  const KernelTable& k = kernels();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t r0 = rows * c / chunks, r1 = rows * (c + 1) / chunks;
      k.add_dropout_layer_norm_bwd(a, r0, r1, partial[0][c].data_ptr(), partial[1][c].data_ptr());
    }
  });
  // Two separate tensors (copy = true): outputs of an op must not alias each other.
  at::Tensor sums = partial.sum(1);
  return {gx, gr, sums[0].to(wdtype, false, true), sums[1].to(wdtype, false, true)};
}

TORCH_LIBRARY_IMPL(aiayn, CPU, m) {
  m.impl("add_dropout_layer_norm_fwd", &add_dropout_layer_norm_fwd_cpu);
  m.impl("add_dropout_layer_norm_bwd", &add_dropout_layer_norm_bwd_cpu);
}

}  // namespace aiayn::cpu
