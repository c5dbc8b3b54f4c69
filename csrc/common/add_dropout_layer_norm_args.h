// Argument checks of add_dropout_layer_norm, shared by the CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>

#include "checks.h"
#include "tensor_layout.h"

namespace aiayn {

constexpr const char* kAddDropoutLayerNorm = "add_dropout_layer_norm";

inline void check_add_dropout_layer_norm_args(const at::Tensor& x, const at::Tensor& residual,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias, double p,
                                       double eps, std::initializer_list<at::ScalarType> dtypes) {
  check_defined(kAddDropoutLayerNorm, "x", x);
  check_defined(kAddDropoutLayerNorm, "residual", residual);
  TORCH_CHECK_VALUE(x.dim() >= 1, kAddDropoutLayerNorm, ": argument 'x' must have at least one dimension");
  check_dtype_in(kAddDropoutLayerNorm, "x", x, dtypes);
  check_same_dtype(kAddDropoutLayerNorm, "residual", residual, "x", x);
  check_same_shape(kAddDropoutLayerNorm, "residual", residual, "x", x);
  check_same_device(kAddDropoutLayerNorm, "residual", residual, "x", x);
  check_addressable(kAddDropoutLayerNorm, "x", x, static_cast<int64_t>(x.element_size()));
  const int64_t cols = x.size(-1);
  for (auto [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    const at::Tensor& v = **t;
    check_same_device(kAddDropoutLayerNorm, name, v, "x", x);
    TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == cols, kAddDropoutLayerNorm, ": argument '", name,
                      "' must have shape (", cols, ",) (the last dim of x), got ", v.sizes());
    TORCH_CHECK_TYPE(v.scalar_type() == x.scalar_type() || v.scalar_type() == at::kFloat, kAddDropoutLayerNorm,
                     ": argument '", name, "' has dtype ", v.scalar_type(), ", expected ",
                     x.scalar_type(), " (the dtype of x) or torch.float32");
  }
  check_probability(kAddDropoutLayerNorm, "p", p);
  TORCH_CHECK_VALUE(eps >= 0.0, kAddDropoutLayerNorm, ": argument 'eps' must be >= 0, got ", eps);
}

// The forward's outputs, shaped and typed alike on every device: out (x's shape and dtype,
// contiguous), mean and rstd (one per row, in the accumulation type).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> add_dropout_layer_norm_outputs(const at::Tensor& x,
                                                                                    int64_t rows) {
  const auto stats = x.options().dtype(acc_type(x));
  return {at::empty(x.sizes(), x.options()), at::empty({rows}, stats), at::empty({rows}, stats)};
}

// The backward's extra arguments; returns the number of rows.
inline int64_t check_add_dropout_layer_norm_bwd_args(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = kAddDropoutLayerNorm;
  check_defined(op, "grad_out", grad_out);
  check_defined(op, "mean", mean);
  check_defined(op, "rstd", rstd);
  check_same_shape(op, "grad_out", grad_out, "x", x);
  check_same_dtype(op, "grad_out", grad_out, "x", x);
  check_same_device(op, "grad_out", grad_out, "x", x);
  check_same_device(op, "mean", mean, "x", x);
  check_same_device(op, "rstd", rstd, "x", x);
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  TORCH_CHECK_VALUE(mean.numel() == rows && rstd.numel() == rows, op,
                    ": arguments 'mean' and 'rstd' must hold one value per row (", rows, "), got ",
                    mean.numel(), " and ", rstd.numel());
  return rows;
}

}  // namespace aiayn
