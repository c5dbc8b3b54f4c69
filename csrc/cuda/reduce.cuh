// Warp and block sum reductions for the CUDA kernels (one block per row: LayerNorm statistics,
// the backward's row sums).
#pragma once

namespace aiayn::cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;  // 1024 threads

// Butterfly (xor) reduction: every lane ends with the total, and with the same bits, because each
// step adds the same two partial sums in every lane pair (a + b == b + a in IEEE arithmetic).
template <typename T>
__device__ __forceinline__ T warp_reduce_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}

// Sums v[0..N) over the block; every thread gets the totals, bit-identical in every thread, so
// that all threads normalise a row with the same statistics. Every thread of the block must call
// it (blockDim.x a multiple of 32, at most 1024); `scratch` is shared memory of N * kMaxWarps.
// Safe to call back to back on the same scratch: the leading barrier keeps a fast warp from
// overwriting scratch while a slow one still reads the totals of the previous call.
template <int N, typename T>
__device__ __forceinline__ void block_reduce_sum(T (&v)[N], T* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = warp_reduce_sum(v[k]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) scratch[k * kMaxWarps + warp] = v[k];
  }
  __syncthreads();
  // Every warp reduces the per-warp sums itself: no third barrier to broadcast the result.
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = warp_reduce_sum(lane < warps ? scratch[k * kMaxWarps + lane] : T(0));
}

template <typename T>
__device__ __forceinline__ T block_reduce_sum(T v, T* scratch) {
  T a[1] = {v};
  block_reduce_sum<1>(a, scratch);
  return a[0];
}

}  // namespace aiayn::cuda
