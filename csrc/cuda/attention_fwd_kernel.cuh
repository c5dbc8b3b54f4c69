// Tensor-core attention forward for float16 / bfloat16 on sm_80+ (FlashAttention-2, Dao 2023,
// Algorithm 1): a block of 4 warps owns 64 query rows (16 per warp, Q fragments kept in registers)
// and streams 64-key blocks of K and V through double-buffered, swizzled shared memory (cp.async);
// S = Q K^T and O += P V with mma.sync.m16n8k16 (f32 accumulation), P reused from the S registers.
// Online softmax in the log2 domain (scale * log2 e folded into one multiply, exp2), masks and
// dropout (Philox, the CPU op's element numbering) applied to the S registers; the log-sum-exp is
// saved for the backward.
#pragma once
#include "attention_mma.cuh"
#ifndef AIAYN_HOST_EMULATION  // the host emulation runs the kernels without the launchers
#include "launch.h"
#endif

namespace aiayn::cuda {

struct AttnFwdMma {
  static constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4, kThreads = kWarps * 32;
  template <typename T, int D>
  static constexpr size_t smem_bytes() {
    return static_cast<size_t>(kBlockM + 4 * kBlockN) * D * sizeof(T);  // Q, K x 2, V x 2
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(AttnFwdMma::kThreads) attention_fwd_mma_kernel(AttentionParams p) {
  mma_arch_guard();
  constexpr int BM = AttnFwdMma::kBlockM, BN = AttnFwdMma::kBlockN, NT = BN / 8, DT = D / 8, KS = D / 16;
  constexpr int kThreads = AttnFwdMma::kThreads;
  T* sq = dynamic_smem<T>();
  T* sk = sq + BM * D;      // [2][BN][D]
  T* sv = sk + 2 * BN * D;  // [2][BN][D]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const QueryBlock blk = query_block<BM, BN>(p);
  const int64_t bh = blk.bh, b = blk.b, h = blk.h, i0 = blk.i0, nkb = blk.key_blocks;
  const T* qg = attn_row<T>(p.q, p.q_stride, b, h, 0);
  const T* kg = attn_row<T>(p.k, p.k_stride, b, h, 0);
  const T* vg = attn_row<T>(p.v, p.v_stride, b, h, 0);

  load_tile_async<BM, D, kThreads>(sq, qg, p.q_stride[2], i0, p.len_q);
  if (nkb > 0) {
    load_tile_async<BN, D, kThreads>(sk, kg, p.k_stride[2], 0, p.len_k);
    load_tile_async<BN, D, kThreads>(sv, vg, p.v_stride[2], 0, p.len_k);
  }
  cp_async_commit();

  const float c = static_cast<float>(p.scale * kAttnLog2e);
  const float zs = static_cast<float>(p.dropout.scale);
  const RowCol la = ldsm_a_lane(lane), lb = ldsm_b_lane(lane), lbt = ldsm_bt_lane(lane);
  float o[DT][4];
  zero_acc(o);
  float m[2] = {neg_inf<float>(), neg_inf<float>()}, l[2] = {0.f, 0.f};
  uint32_t qf[KS][4];

  for (int64_t n = 0; n < nkb; ++n) {
    const int buf = static_cast<int>(n & 1);
    pipeline_step(n, nkb, [&](int64_t next) {
      load_tile_async<BN, D, kThreads>(sk + (buf ^ 1) * BN * D, kg, p.k_stride[2], next * BN, p.len_k);
      load_tile_async<BN, D, kThreads>(sv + (buf ^ 1) * BN * D, vg, p.v_stride[2], next * BN, p.len_k);
    });
    if (n == 0) {
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) ldsm_tile<D, false>(qf[kk], sq, la, warp * 16, kk * 16);
    }
    const T* kt = sk + buf * BN * D;
    const T* vt = sv + buf * BN * D;

    float s[NT][4];
    zero_acc(s);
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) mma_a_bt<T, D, NT>(s, qf[kk], kt, lb, kk);

    // Log2-domain scores with the masks, and the row maxima (each row lives in a quad of lanes).
    const int64_t j0 = n * BN;
    float mx[2] = {neg_inf<float>(), neg_inf<float>()};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = i0 + warp * 16 + mma_c_row(lane, e);
        const int64_t j = j0 + nt * 8 + mma_c_col(lane, e);
        // Rows past Lq (zero-filled Q) must not read the mask: they stay empty.
        const float x = i < p.len_q ? attn_mask_score<float>(p, s[nt][e] * c, b, h, i, j) : neg_inf<float>();
        s[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float mu[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xFFFFFFFFu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xFFFFFFFFu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      mu[r] = m_new == neg_inf<float>() ? 0.f : m_new;  // nothing visible yet: P = 0, not NaN
      const float alpha = exp2f(m[r] - mu[r]);         // 0 while the row was empty
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) o[dt][2 * r] *= alpha, o[dt][2 * r + 1] *= alpha;
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2f(s[nt][e] - mu[e >> 1]);
        l[e >> 1] += pe;
        s[nt][e] = pe;
      }
    }
    if (p.dropout.enabled) {  // after the row sums: dropout acts on the normalised probabilities
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t i = i0 + warp * 16 + mma_c_row(lane, 2 * r);
          const int64_t j = j0 + nt * 8 + mma_c_col(lane, 2 * r);
          if (i >= p.len_q) continue;
          const uint32_t keep = dropout_keep_pair(p.dropout, attention_dropout_element(bh, i, j, p.len_q, p.len_k));
          s[nt][2 * r] = keep & 1u ? s[nt][2 * r] * zs : 0.f;
          s[nt][2 * r + 1] = keep & 2u ? s[nt][2 * r + 1] * zs : 0.f;
        }
      }
    }

    // O += P V, P (16 x 64 per warp) straight from the S registers as four 16 x 16 A operands.
    mma_p_b<T, D, NT>(o, s, vt, lbt);
    __syncthreads();  // the next iteration's loads overwrite this buffer
  }
  cp_async_wait<0>();

  T* out = static_cast<T*>(p.out);
  float* lse = static_cast<float*>(p.lse);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float lr = l[r];
    lr += __shfl_xor_sync(0xFFFFFFFFu, lr, 1);
    lr += __shfl_xor_sync(0xFFFFFFFFu, lr, 2);
    const int64_t i = i0 + warp * 16 + mma_c_row(lane, 2 * r);
    if (i >= p.len_q) continue;
    const bool dead = lr == 0.f;  // fully masked: zeros, lse = +inf (NaN rows stay NaN)
    const float inv = dead ? 0.f : 1.f / lr;
    T* orow = out + (bh * p.len_q + i) * D;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      *reinterpret_cast<uint32_t*>(orow + dt * 8 + mma_c_col(lane, 0)) = pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    if ((lane & 3) == 0)
      lse[bh * p.len_q + i] = dead ? std::numeric_limits<float>::infinity()
                                   : static_cast<float>((static_cast<double>(m[r]) + log2(static_cast<double>(lr))) * kAttnLn2);
  }
}

#ifndef AIAYN_HOST_EMULATION
template <typename T, int D>
bool launch_attention_fwd_mma(const AttentionParams& p, cudaStream_t stream) {
  constexpr size_t smem = AttnFwdMma::smem_bytes<T, D>();
  if (!request_dynamic_smem(attention_fwd_mma_kernel<T, D>, smem)) return false;
  const int64_t blocks = (p.len_q + AttnFwdMma::kBlockM - 1) / AttnFwdMma::kBlockM * p.batch * p.heads;
  attention_fwd_mma_kernel<T, D><<<static_cast<unsigned>(blocks), AttnFwdMma::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}
#endif

}  // namespace aiayn::cuda
