// Storage <-> accumulation conversions and vectorised loads/stores for the CUDA kernels.
// Storage types: float, double, __half, __nv_bfloat16 (the device twins of at::Half and
// at::BFloat16, same bits). torch compiles CUDA with __CUDA_NO_HALF_CONVERSIONS__ and friends, so
// half and bfloat16 go through the explicit round-to-nearest-even intrinsics, which is also what
// c10::Half / c10::BFloat16 and the CPU kernels (cpu/simd/bf16.h) do.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace aiayn::cuda {

// Convert<To, From>::apply(v): the value of v in To, rounded to nearest even.
template <typename To, typename From>
struct Convert {
  static __device__ __forceinline__ To apply(From v) { return static_cast<To>(v); }
};
template <typename From>
struct Convert<__half, From> {
  static __device__ __forceinline__ __half apply(From v) { return __float2half_rn(static_cast<float>(v)); }
};
template <typename To>
struct Convert<To, __half> {
  static __device__ __forceinline__ To apply(__half v) { return static_cast<To>(__half2float(v)); }
};
template <>
struct Convert<__half, __half> {
  static __device__ __forceinline__ __half apply(__half v) { return v; }
};
template <typename From>
struct Convert<__nv_bfloat16, From> {
  static __device__ __forceinline__ __nv_bfloat16 apply(From v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
};
template <typename To>
struct Convert<To, __nv_bfloat16> {
  static __device__ __forceinline__ To apply(__nv_bfloat16 v) { return static_cast<To>(__bfloat162float(v)); }
};
template <>
struct Convert<__nv_bfloat16, __nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 apply(__nv_bfloat16 v) { return v; }
};

template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  return Convert<To, From>::apply(v);
}

// Products that must not be contracted into an FMA with a following add, so that a kernel rounds
// exactly where the CPU kernels and the reference do (e.g. dropout's x * scale before + residual).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Every vectorised access moves at most 16 bytes (the widest load a thread can issue), so a
// pointer only ever needs 16-byte alignment, whatever N * sizeof(T).
constexpr int kMaxAccessBytes = 16;

template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

// Elements per access for N elements of T: all N if they fit in 16 bytes.
template <typename T, int N>
constexpr int access_elems() {
  return N * static_cast<int>(sizeof(T)) > kMaxAccessBytes ? kMaxAccessBytes / static_cast<int>(sizeof(T)) : N;
}

// out[i] = p[i] for i < N, widened to A. p must be aligned to min(16, N * sizeof(T)) bytes.
template <int N, typename A, typename T>
__device__ __forceinline__ void load_vec(const T* p, A (&out)[N]) {
  constexpr int kChunk = access_elems<T, N>();
  static_assert(N % kChunk == 0, "N must be a multiple of the access width");
#pragma unroll
  for (int c = 0; c < N; c += kChunk) {
    const Packed<T, kChunk> v = *reinterpret_cast<const Packed<T, kChunk>*>(p + c);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) out[c + i] = convert<A>(v.v[i]);
  }
}

// p[i] = in[i] for i < N, narrowed to T (round to nearest even). Same alignment as load_vec.
template <int N, typename T, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&in)[N]) {
  constexpr int kChunk = access_elems<T, N>();
  static_assert(N % kChunk == 0, "N must be a multiple of the access width");
#pragma unroll
  for (int c = 0; c < N; c += kChunk) {
    Packed<T, kChunk> v;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) v.v[i] = convert<T>(in[c + i]);
    *reinterpret_cast<Packed<T, kChunk>*>(p + c) = v;
  }
}

// The block's dynamic shared memory as T (16-byte aligned, for load_vec / store_vec).
#ifdef AIAYN_HOST_EMULATION
unsigned char* emulated_dynamic_smem();  // tests/cpp/attention_kernels_emulation.cpp
#endif
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef AIAYN_HOST_EMULATION
  return reinterpret_cast<T*>(emulated_dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char aiayn_dynamic_smem[];
  return reinterpret_cast<T*>(aiayn_dynamic_smem);
#endif
}

}  // namespace aiayn::cuda
