// The kernels' storage type of a tensor (torch-facing CPU code only: kernels.h stays torch-free).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kernels.h"

namespace aiayn::cpu {

// Callers have checked the dtype is one of these three.
inline DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kDouble: return DType::f64;
    default: TORCH_CHECK(false, "aiayn: no CPU kernel for dtype ", t.scalar_type());
  }
}

}  // namespace aiayn::cpu
