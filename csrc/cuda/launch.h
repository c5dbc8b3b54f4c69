// Host-side helpers of the CUDA entry points (rows: common/tensor_layout.h): alignment and launch geometry,
// dynamic shared memory beyond the default 48 KiB. Only c10/cuda headers (not
// ATen/cuda/CUDAContext.h), so that the entry points need neither cuBLAS headers nor recent APIs.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../common/tensor_layout.h"

namespace aiayn::cuda {

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Whether rows of `elem_size`-byte elements, `row_stride` apart and starting at p, can be read in
// 16-byte vectors: p aligned and the row stride a whole number of vectors.
inline bool rows_vectorizable(const void* p, int64_t row_stride, size_t elem_size) {
  const int64_t vec = static_cast<int64_t>(16 / elem_size);
  return is_aligned(p, 16) && row_stride % vec == 0;
}

// Threads per block for `work` independent items per row: enough to cover them (a multiple of the
// warp size, for the reductions), at most `max_threads`.
inline int block_threads(int64_t work, int max_threads) {
  const int64_t t = (std::max<int64_t>(work, 1) + 31) / 32 * 32;
  return static_cast<int>(std::min<int64_t>(t, max_threads));
}

inline int sm_count() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return std::max(n, 1);
}

// Room left for a kernel's own static shared memory (the reduction scratch, < 1 KiB).
constexpr size_t kStaticSmemReserve = 1024;
constexpr size_t kDefaultSmemLimit = 48 * 1024;

// Whether `kernel` can run with `bytes` of dynamic shared memory per block on the current device;
// raises its limit when more than the default 48 KiB is asked for (up to the opt-in maximum,
// 227 KiB on H100, 163 KiB on A100).
template <typename Kernel>
bool request_dynamic_smem(Kernel* kernel, size_t bytes) {
  if (bytes + kStaticSmemReserve <= kDefaultSmemLimit) return true;
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (bytes + kStaticSmemReserve > static_cast<size_t>(optin)) return false;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  return true;
}

// Blocks of `kernel` resident on the whole device at once (at least 1).
template <typename Kernel>
int64_t resident_blocks(Kernel* kernel, int threads, size_t smem_bytes) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes));
  return static_cast<int64_t>(std::max(per_sm, 1)) * sm_count();
}

// One block per row, but no more blocks than this: kernels loop over rows (grid-stride), so this
// only bounds the grid, well under the 2^31 - 1 limit.
constexpr int64_t kMaxRowBlocks = int64_t{1} << 20;

}  // namespace aiayn::cuda
