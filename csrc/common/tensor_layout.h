// How the CPU and CUDA entry points lay tensors out for their kernels (host code only).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace aiayn {

// Statistics and accumulators: float32, or float64 for float64 inputs.
inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows of a tensor whose last dim is the one an op works along, without a copy when the leading
// dims collapse to a single stride (slices, row-strided views); a copy otherwise. Both devices
// accept the same layouts this way.
inline at::Tensor as_rows(const at::Tensor& t, int64_t cols) {
  at::Tensor r = t.reshape({-1, cols});
  return cols > 1 && r.stride(1) != 1 ? r.contiguous() : r;
}

// The distance between rows of as_rows' result (any value for a single row).
inline int64_t row_stride(const at::Tensor& r) { return r.size(0) > 1 ? r.stride(0) : r.size(1); }

}  // namespace aiayn
