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

// The backward's terms of one (query i, key j) pair from its log2-domain masked score s and
// dp = dO_i . V_j: pz = P_ij Z_ij (the weight of dO_i in dV_j) and dS_ij = P_ij (Z_ij dp - delta_i)
// scale, where P_ij = 2^(s - lse2_i) and Z = keep / (1 - p) (1 without dropout).
template <typename A>
__device__ __forceinline__ void attention_bwd_pair(const AttentionParams& p, A s, A dp, A lse2, A delta,
                                                   int64_t bh, int64_t i, int64_t j, A& pz, A& ds) {
  const A pp = exp2_acc(s - lse2);
  pz = pp;
  if (p.dropout.enabled) {
    const A zs = static_cast<A>(p.dropout.scale);
    const bool keep = dropout_keep(p.dropout, attention_dropout_element(bh, i, j, p.len_q, p.len_k));
    pz = keep ? pp * zs : A(0);
    dp = keep ? dp * zs : A(0);
  }
  ds = pp * (dp - delta) * static_cast<A>(p.scale);
}

}  // namespace aiayn::cuda
