// Device helpers shared by the SIMT and tensor-core attention kernels: element access, the masks
// (in the log2 domain of the scores, as the CPU kernel: scores are scaled by scale * log2 e so the
// softmax is exp2), dropout keep-bits with the CPU op's element numbering, warp reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>

#include "../common/attention_index.h"
#include "attention_launch.h"
#include "dropout.cuh"
#include "type_convert.cuh"

namespace aiayn::cuda {

constexpr double kAttnLog2e = 1.4426950408889634;
constexpr double kAttnLn2 = 0.6931471805599453;

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }

// max that skips NaN (as the CPU kernel's running max does): fmax returns the other operand.
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_acc(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// Row i of a (batch, head) slice of a strided (B, H, L, D) tensor.
template <typename T>
__device__ __forceinline__ const T* attn_row(const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t i) {
  return static_cast<const T*>(base) + b * stride[0] + h * stride[1] + i * stride[2];
}

// Log2-domain score x of (b, h, query i, key j) with every mask applied: -inf where the key does
// not take part (past Lk, causal j > i, key padding, bool mask False), + mask * log2 e for an
// additive mask. A = the accumulation type (the additive mask is stored in it).
template <typename A>
__device__ __forceinline__ A attn_mask_score(const AttentionParams& p, A x, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (j >= p.len_k || (p.causal && j > i)) return neg_inf<A>();
  if (p.key_padding && p.key_padding[b * p.key_padding_stride[0] + j * p.key_padding_stride[1]]) return neg_inf<A>();
  if (p.mask_kind != kAttnMaskNone) {
    const int64_t off = b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] + j * p.mask_stride[3];
    if (p.mask_kind == kAttnMaskBool) {
      if (!static_cast<const bool*>(p.mask)[off]) return neg_inf<A>();
    } else {
      x += static_cast<const A*>(p.mask)[off] * static_cast<A>(kAttnLog2e);
    }
  }
  return x;
}

}  // namespace aiayn::cuda
