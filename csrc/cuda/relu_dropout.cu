// Kernels of cuda/relu_dropout.h: flat grid-stride loops, 16-byte vectors (VEC elements) where
// every pointer allows, one Philox call per 4 elements (cuda/dropout.cuh).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "dispatch_dtype.h"
#include "dropout.cuh"
#include "../common/relu_mask.h"
#include "launch.h"
#include "relu_dropout.h"
#include "type_convert.cuh"

namespace aiayn::cuda {
namespace {

constexpr int kThreads = 256;

// ReLU that keeps NaN (a comparison with NaN is false), like the CPU's max(0, v).
template <typename A>
__device__ __forceinline__ A relu_keep_nan(A v) {
  return v < A(0) ? A(0) : v;
}

template <typename T, typename A, int VEC>
__global__ void relu_dropout_kernel(T* __restrict__ h, int64_t n, bool relu, DropoutParams d, A scale) {
  const int64_t groups = (n + VEC - 1) / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += step) {
    const int64_t e0 = g * VEC;
    const uint32_t keep = dropout_keep_bits<VEC>(d, static_cast<uint64_t>(e0));
    if (e0 + VEC <= n) {
      A v[VEC];
      load_vec<VEC>(h + e0, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const A r = relu ? relu_keep_nan(v[i]) : v[i];
        v[i] = (keep >> i) & 1u ? r * scale : A(0);
      }
      store_vec<VEC>(h + e0, v);
    } else {
      for (int i = 0; e0 + i < n; ++i) {
        const A x = convert<A>(h[e0 + i]);
        const A r = relu ? relu_keep_nan(x) : x;
        h[e0 + i] = convert<T>((keep >> i) & 1u ? r * scale : A(0));
      }
    }
  }
}

template <typename T, typename A, int VEC>
__global__ void relu_gate_kernel(T* out, const T* g, const T* __restrict__ gate, int64_t n, A scale) {
  const int64_t groups = (n + VEC - 1) / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < groups; k += step) {
    const int64_t e0 = k * VEC;
    if (e0 + VEC <= n) {
      A v[VEC], m[VEC];
      load_vec<VEC>(g + e0, v);
      load_vec<VEC>(gate + e0, m);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = m[i] > A(0) ? v[i] * scale : A(0);
      store_vec<VEC>(out + e0, v);
    } else {
      for (int i = 0; e0 + i < n; ++i) {
        const A v = convert<A>(g[e0 + i]);
        out[e0 + i] = convert<T>(convert<A>(gate[e0 + i]) > A(0) ? v * scale : A(0));
      }
    }
  }
}

// The keep bits of mask byte b of row r (common/relu_mask.h): one Philox call per 4 elements when
// the byte's 8 elements start at a multiple of 8 (cols % 8 == 0, the usual d_ff), else per element.
__device__ __forceinline__ uint32_t keep_byte(const DropoutParams& d, int64_t r, int64_t b, int64_t cols) {
  if (!d.enabled) return 0xFFu;
  if (cols % 8 == 0) return dropout_keep_bits<8>(d, static_cast<uint64_t>(r * cols + 8 * b));
  return relu_mask_keep_byte(d, r, b, cols);
}

// One thread per mask byte: the byte's 8 elements of h and the byte itself.
template <typename T, typename A>
__global__ void relu_mask_dropout_kernel(T* __restrict__ h, uint8_t* __restrict__ mask, int64_t rows, int64_t cols,
                                         bool from_aux, DropoutParams d, A scale) {
  const int64_t row_bytes = relu_mask_row_bytes(cols), n = rows * row_bytes;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += step) {
    const int64_t r = k / row_bytes, b = k % row_bytes, c0 = 8 * b;
    const int64_t byte = relu_mask_byte(r, c0, cols);  // == k: the threads walk the mask in order
    if (c0 >= cols) {
      mask[byte] = 0;
      continue;
    }
    const int count = static_cast<int>(cols - c0 < 8 ? cols - c0 : 8);
    const uint32_t keep = keep_byte(d, r, b, cols);
    T* row = h + r * cols + c0;
    A v[8];
    for (int i = 0; i < count; ++i) v[i] = convert<A>(row[i]);
    mask[byte] = static_cast<uint8_t>(
        relu_mask_dropout_byte<A>(v, count, from_aux ? mask[byte] : 0u, from_aux, keep, d.enabled, scale));
    if (!from_aux || d.enabled)
      for (int i = 0; i < count; ++i) row[i] = convert<T>(v[i]);
  }
}

template <typename T, typename A>
__global__ void relu_mask_gate_kernel(T* __restrict__ g, const uint8_t* __restrict__ mask, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += step) {
    const int64_t r = e / cols, c = e % cols;
    if (!((mask[relu_mask_byte(r, c, cols)] >> relu_mask_bit(c)) & 1u)) g[e] = convert<T>(A(0));
  }
}

unsigned grid_for(int64_t groups) {
  const int64_t blocks = (groups + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{sm_count()} * 16)));
}

}  // namespace

void relu_dropout_(const at::Tensor& h, bool relu, const DropoutParams& d) {
  TORCH_INTERNAL_ASSERT(h.is_cuda() && h.is_contiguous());
  const int64_t n = h.numel();
  if (n == 0 || (!relu && !d.enabled)) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(h.scalar_type(), "relu_dropout", [&](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    constexpr int kVec = 16 / sizeof(T);  // 2, 4 or 8: dropout_keep_bits takes each
    T* p = static_cast<T*>(h.data_ptr());
    const A scale = d.enabled ? static_cast<A>(d.scale) : A(1);
    if (is_aligned(p, 16)) {
      relu_dropout_kernel<T, A, kVec><<<grid_for((n + kVec - 1) / kVec), kThreads, 0, stream>>>(p, n, relu, d, scale);
    } else {
      relu_dropout_kernel<T, A, 1><<<grid_for(n), kThreads, 0, stream>>>(p, n, relu, d, scale);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void relu_gate(const at::Tensor& out, const at::Tensor& g, const at::Tensor& gate, double scale) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && g.is_contiguous() && gate.is_contiguous() &&
                        out.numel() == g.numel() && gate.numel() == g.numel() &&
                        out.scalar_type() == g.scalar_type() && gate.scalar_type() == g.scalar_type());
  const int64_t n = g.numel();
  if (n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(g.scalar_type(), "relu_gate", [&](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    constexpr int kVec = 16 / sizeof(T);
    T* o = static_cast<T*>(out.data_ptr());
    const T* gp = static_cast<const T*>(g.data_ptr());
    const T* mp = static_cast<const T*>(gate.data_ptr());
    if (is_aligned(o, 16) && is_aligned(gp, 16) && is_aligned(mp, 16)) {
      relu_gate_kernel<T, A, kVec><<<grid_for((n + kVec - 1) / kVec), kThreads, 0, stream>>>(o, gp, mp, n, static_cast<A>(scale));
    } else {
      relu_gate_kernel<T, A, 1><<<grid_for(n), kThreads, 0, stream>>>(o, gp, mp, n, static_cast<A>(scale));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

namespace {

void check_mask(const at::Tensor& t, const at::Tensor& mask) {
  TORCH_INTERNAL_ASSERT(t.is_cuda() && t.is_contiguous() && t.dim() == 2 && mask.is_contiguous() &&
                        mask.scalar_type() == at::kByte && mask.numel() == t.size(0) * relu_mask_row_bytes(t.size(1)));
}

}  // namespace

void relu_mask_dropout_(const at::Tensor& h, const at::Tensor& mask, bool from_aux, const DropoutParams& d) {
  check_mask(h, mask);
  const int64_t rows = h.size(0), cols = h.size(1), n = mask.numel();
  if (n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(h.scalar_type(), "relu_mask_dropout", [&](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    const A scale = d.enabled ? static_cast<A>(d.scale) : A(1);
    relu_mask_dropout_kernel<T, A><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<T*>(h.data_ptr()), static_cast<uint8_t*>(mask.data_ptr()), rows, cols, from_aux, d, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void relu_mask_gate_(const at::Tensor& g, const at::Tensor& mask) {
  check_mask(g, mask);
  const int64_t rows = g.size(0), cols = g.size(1), n = g.numel();
  if (n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(g.scalar_type(), "relu_mask_gate", [&](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    relu_mask_gate_kernel<T, A><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<T*>(g.data_ptr()), static_cast<const uint8_t*>(mask.data_ptr()), rows, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace aiayn::cuda
