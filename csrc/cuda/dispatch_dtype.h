// Host side: from a tensor's dtype to the device storage type the kernels are instantiated for.
// Kept apart from type_convert.cuh, which the host emulation tests compile without torch headers.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace aiayn::cuda {

// Calls f(T{}, A{}) with the device storage type T of dtype s and its accumulation type A (float,
// or double for float64); `op` names the caller in the error for other dtypes.
template <typename F>
void dispatch_storage(at::ScalarType s, const char* op, F&& f) {
  switch (s) {
    case at::kFloat: return f(float{}, float{});
    case at::kDouble: return f(double{}, double{});
    case at::kHalf: return f(__half{}, float{});
    case at::kBFloat16: return f(__nv_bfloat16{}, float{});
    default: TORCH_CHECK(false, op, ": unreachable dtype ", s);
  }
}

}  // namespace aiayn::cuda
