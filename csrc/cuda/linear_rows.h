// Operands of the linear / feed_forward GEMMs on CUDA, and their shared backward GEMMs (host only).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "cublaslt_gemm.h"

namespace aiayn::cuda {

// x (..., cols) as a (tokens, cols) matrix of rows: a view when the leading dims collapse to one
// stride and the last is contiguous (slices, row-strided views), else a copy. (Explicit sizes:
// reshape({-1, 0}) is ambiguous for cols == 0.)
inline at::Tensor token_rows(const at::Tensor& x, int64_t tokens, int64_t cols) {
  at::Tensor r = x.reshape({tokens, cols});
  return cols > 1 && r.stride(1) != 1 ? r.contiguous() : r;
}

// The BIAS epilogue for b (contiguous), or none for None.
inline void set_bias(GemmCall& g, const std::optional<at::Tensor>& b) {
  if (!b.has_value() || !b->defined()) return;
  g.epilogue = GemmEpilogue::kBias;
  g.bias = b->contiguous();
}

// dX = G W: the input gradient of y = x W^T (+ b), G the gradient of y (or of the pre-activation)
// as (tokens, out) rows, dX a (tokens, in) matrix.
inline void gemm_input_grad(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& dx) {
  GemmCall g;
  g.a = grad;
  g.b = w;
  g.c = dx;
  gemm(g);
}

// dW = G^T X, and db = column sums of G in the same GEMM (BGRADB epilogue) when db is defined.
inline void gemm_weight_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& dw,
                             const at::Tensor& db = at::Tensor()) {
  GemmCall g;
  g.a = grad;
  g.a_trans = true;
  g.b = x;
  g.c = dw;
  if (db.defined()) {
    g.epilogue = GemmEpilogue::kBiasGradA;
    g.bias_grad = db;
  }
  gemm(g);
}

}  // namespace aiayn::cuda
