// CUDA entry point of dropout_mask: the keep-mask that a dropout-capable op draws for (p, seed)
// (common/dropout.h), as a bool tensor shaped like `like`, element e = row-major index. Bit for bit
// the CPU op's mask (cpu/dropout_mask.cpp), so tests can check the CUDA ops exactly.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/checks.h"
#include "../common/dropout.h"
#include "dropout.cuh"
#include "launch.h"

namespace aiayn::cuda {
namespace {

// One thread per Philox counter: the 4 elements it draws, written as one 4-byte store (bool is one
// byte holding 0 or 1) except in the last, partial group.
__global__ void dropout_mask_kernel(bool* __restrict__ out, int64_t n, DropoutParams d) {
  const int64_t groups = (n + 3) / 4;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += step) {
    const int64_t e0 = 4 * g;
    const uint32_t bits = dropout_keep_bits<4>(d, static_cast<uint64_t>(e0));
    if (e0 + 4 <= n) {
      *reinterpret_cast<uchar4*>(out + e0) = make_uchar4(bits & 1u, (bits >> 1) & 1u, (bits >> 2) & 1u, (bits >> 3) & 1u);
    } else {
      for (int64_t i = 0; e0 + i < n; ++i) out[e0 + i] = (bits >> i) & 1u;
    }
  }
}

}  // namespace

at::Tensor dropout_mask_cuda(const at::Tensor& like, double p, const at::Tensor& seed) {
  constexpr const char* op = "dropout_mask";
  check_defined(op, "like", like);
  check_probability(op, "p", p);
  check_addressable(op, "like", like, 1);
  TORCH_CHECK(like.is_cuda(), op, ": argument 'like' must be a CUDA tensor, got ", like.device());
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor mask = at::empty(like.sizes(), like.options().dtype(at::kBool));
  const DropoutParams d = make_dropout_params(p, p > 0.0 ? read_seed(op, seed) : 0, 0);
  const int64_t n = mask.numel();
  if (!d.enabled) return mask.fill_(true);
  if (n == 0) return mask;
  constexpr int kThreads = 256;
  const int64_t groups = (n + 3) / 4;
  const int64_t blocks = std::min<int64_t>((groups + kThreads - 1) / kThreads, 16 * 1024);
  dropout_mask_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      mask.data_ptr<bool>(), n, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

TORCH_LIBRARY_IMPL(aiayn, CUDA, m) { m.impl("dropout_mask", &dropout_mask_cuda); }

}  // namespace aiayn::cuda
