// Tensor-core attention backward for float16 / bfloat16 on sm_80+ (FlashAttention-2, Algorithm
// 2), as two kernels so that no gradient needs atomics (deterministic, like the CPU op):
//  - dK / dV: a block owns 64 keys (16 per warp) and streams query blocks; per block it recomputes
//    S^T = K Q^T and dP^T = V dO^T, forms P^T (from the saved log-sum-exp) and dS^T, and
//    accumulates dV += (P Z)^T dO, dK += dS^T Q in registers;
//  - dQ: a block owns 64 queries and streams key blocks: S, dP again, then dQ += dS K.
// dS = P (Z dP - delta) * scale with delta_i = dO_i . O_i (launch_attention_bwd_prep), Z the
// dropout keep / (1 - p). Operands stream through double-buffered swizzled shared memory
// (cp.async); every product is mma.sync.m16n8k16 with f32 accumulation; A operands of the second
// products come straight from the accumulator registers of the first.
#pragma once
#include "attention_mma.cuh"
#ifndef AIAYN_HOST_EMULATION  // the host emulation runs the kernels without the launchers
#include "launch.h"
#endif

namespace aiayn::cuda {

struct AttnBwdMma {
  static constexpr int kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kKeys = 64;     // dK/dV kernel: keys per block
  static constexpr int kQueries = 64;  // dQ kernel: queries per block
  static constexpr int kKeyStep = 64;  // dQ kernel: keys per step
  template <int D>
  static constexpr int query_step() {  // dK/dV kernel: queries per step (registers at D = 128)
    return D == 128 ? 32 : 64;
  }
  template <typename T, int D>
  static constexpr size_t dkdv_smem() {  // K, V, Q x 2, dO x 2
    return static_cast<size_t>(2 * kKeys + 4 * query_step<D>()) * D * sizeof(T);
  }
  template <typename T, int D>
  static constexpr size_t dq_smem() {  // Q, dO, K x 2, V x 2
    return static_cast<size_t>(2 * kQueries + 4 * kKeyStep) * D * sizeof(T);
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(AttnBwdMma::kThreads) attention_bwd_dkdv_mma_kernel(AttentionParams p) {
  mma_arch_guard();
  constexpr int BN = AttnBwdMma::kKeys, BQ = AttnBwdMma::query_step<D>();
  constexpr int QT = BQ / 8, DT = D / 8, KS = D / 16, kThreads = AttnBwdMma::kThreads;
  T* sk = dynamic_smem<T>();
  T* sv = sk + BN * D;
  T* sq = sv + BN * D;       // [2][BQ][D]
  T* sdo = sq + 2 * BQ * D;  // [2][BQ][D]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t BH = p.batch * p.heads;
  const int64_t bh = blockIdx.x % BH, b = bh / p.heads, h = bh % p.heads;
  const int64_t j0 = blockIdx.x / BH * BN;
  const int64_t nqb = (p.len_q + BQ - 1) / BQ;
  const int64_t qb0 = attention_first_query_block(p.causal, j0, BQ);
  const T* qg = attn_row<T>(p.q, p.q_stride, b, h, 0);
  const T* gg = attn_row<T>(p.grad_out, p.grad_out_stride, b, h, 0);
  const float* lse = static_cast<const float*>(p.lse_saved) + bh * p.len_q;
  const float* delta = static_cast<const float*>(p.delta) + bh * p.len_q;

  load_tile_async<BN, D, kThreads>(sk, attn_row<T>(p.k, p.k_stride, b, h, 0), p.k_stride[2], j0, p.len_k);
  load_tile_async<BN, D, kThreads>(sv, attn_row<T>(p.v, p.v_stride, b, h, 0), p.v_stride[2], j0, p.len_k);
  if (qb0 < nqb) {
    load_tile_async<BQ, D, kThreads>(sq, qg, p.q_stride[2], qb0 * BQ, p.len_q);
    load_tile_async<BQ, D, kThreads>(sdo, gg, p.grad_out_stride[2], qb0 * BQ, p.len_q);
  }
  cp_async_commit();

  const float c = static_cast<float>(p.scale * kAttnLog2e);
  const float log2e = static_cast<float>(kAttnLog2e);
  const RowCol la = ldsm_a_lane(lane), lb = ldsm_b_lane(lane), lbt = ldsm_bt_lane(lane);
  float dk[DT][4], dv[DT][4];
  zero_acc(dk);
  zero_acc(dv);

  for (int64_t qb = qb0; qb < nqb; ++qb) {
    const int buf = static_cast<int>((qb - qb0) & 1);
    pipeline_step(qb - qb0, nqb - qb0, [&](int64_t next) {
      load_tile_async<BQ, D, kThreads>(sq + (buf ^ 1) * BQ * D, qg, p.q_stride[2], (qb0 + next) * BQ, p.len_q);
      load_tile_async<BQ, D, kThreads>(sdo + (buf ^ 1) * BQ * D, gg, p.grad_out_stride[2], (qb0 + next) * BQ, p.len_q);
    });
    const T* qt = sq + buf * BQ * D;
    const T* gt = sdo + buf * BQ * D;

    // S^T (this warp's 16 keys x BQ queries) and dP~^T = V dO^T.
    float st[QT][4], dpt[QT][4];
    zero_acc(st);
    zero_acc(dpt);
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      uint32_t ka[4], va[4];
      ldsm_tile<D, false>(ka, sk, la, warp * 16, kk * 16);
      ldsm_tile<D, false>(va, sv, la, warp * 16, kk * 16);
      mma_a_bt<T, D, QT>(st, ka, qt, lb, kk);
      mma_a_bt<T, D, QT>(dpt, va, gt, lb, kk);
    }
    // P Z -> st, dS -> dpt (element: key row, query column).
    const int64_t i0 = qb * BQ;
#pragma unroll
    for (int nt = 0; nt < QT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t j = j0 + warp * 16 + mma_c_row(lane, e);
        const int64_t i = i0 + nt * 8 + mma_c_col(lane, e);
        float pz = 0.f, ds = 0.f;
        if (i < p.len_q)  // lse = +inf (row fully masked): P = 0
          attention_bwd_pair(p, attn_mask_score<float>(p, st[nt][e] * c, b, h, i, j), dpt[nt][e], lse[i] * log2e,
                             delta[i], bh, i, j, pz, ds);
        st[nt][e] = pz;
        dpt[nt][e] = ds;
      }
    }
    // dV += (P Z)^T dO, dK += dS^T Q: k = queries, B from the [query][d] tiles transposed.
    mma_p_b<T, D, QT>(dv, st, gt, lbt);
    mma_p_b<T, D, QT>(dk, dpt, qt, lbt);
    __syncthreads();
  }
  cp_async_wait<0>();

  T* gk = static_cast<T*>(p.grad_k);
  T* gv = static_cast<T*>(p.grad_v);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = j0 + warp * 16 + mma_c_row(lane, 2 * r);
    if (j >= p.len_k) continue;
    const int64_t off = (bh * p.len_k + j) * D + mma_c_col(lane, 0);
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      *reinterpret_cast<uint32_t*>(gk + off + dt * 8) = pack2<T>(dk[dt][2 * r], dk[dt][2 * r + 1]);
      *reinterpret_cast<uint32_t*>(gv + off + dt * 8) = pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(AttnBwdMma::kThreads) attention_bwd_dq_mma_kernel(AttentionParams p) {
  mma_arch_guard();
  constexpr int BM = AttnBwdMma::kQueries, BN = AttnBwdMma::kKeyStep;
  constexpr int NT = BN / 8, DT = D / 8, KS = D / 16, kThreads = AttnBwdMma::kThreads;
  T* sq = dynamic_smem<T>();
  T* sdo = sq + BM * D;
  T* sk = sdo + BM * D;     // [2][BN][D]
  T* sv = sk + 2 * BN * D;  // [2][BN][D]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const QueryBlock blk = query_block<BM, BN>(p);
  const int64_t bh = blk.bh, b = blk.b, h = blk.h, i0 = blk.i0, nkb = blk.key_blocks;
  const T* kg = attn_row<T>(p.k, p.k_stride, b, h, 0);
  const T* vg = attn_row<T>(p.v, p.v_stride, b, h, 0);

  load_tile_async<BM, D, kThreads>(sq, attn_row<T>(p.q, p.q_stride, b, h, 0), p.q_stride[2], i0, p.len_q);
  load_tile_async<BM, D, kThreads>(sdo, attn_row<T>(p.grad_out, p.grad_out_stride, b, h, 0), p.grad_out_stride[2],
                                   i0, p.len_q);
  if (nkb > 0) {
    load_tile_async<BN, D, kThreads>(sk, kg, p.k_stride[2], 0, p.len_k);
    load_tile_async<BN, D, kThreads>(sv, vg, p.v_stride[2], 0, p.len_k);
  }
  cp_async_commit();

  const float c = static_cast<float>(p.scale * kAttnLog2e), scale = static_cast<float>(p.scale);
  const float zs = static_cast<float>(p.dropout.scale);
  const RowCol la = ldsm_a_lane(lane), lb = ldsm_b_lane(lane), lbt = ldsm_bt_lane(lane);
  // This thread's two rows: log2-domain log-sum-exp and delta (rows past Lq are never used).
  float lse2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = i0 + warp * 16 + mma_c_row(lane, 2 * r);
    const bool in = i < p.len_q;
    lse2[r] = in ? static_cast<const float*>(p.lse_saved)[bh * p.len_q + i] * static_cast<float>(kAttnLog2e) : 0.f;
    dl[r] = in ? static_cast<const float*>(p.delta)[bh * p.len_q + i] : 0.f;
  }
  float dq[DT][4];
  zero_acc(dq);

  for (int64_t n = 0; n < nkb; ++n) {
    const int buf = static_cast<int>(n & 1);
    pipeline_step(n, nkb, [&](int64_t next) {
      load_tile_async<BN, D, kThreads>(sk + (buf ^ 1) * BN * D, kg, p.k_stride[2], next * BN, p.len_k);
      load_tile_async<BN, D, kThreads>(sv + (buf ^ 1) * BN * D, vg, p.v_stride[2], next * BN, p.len_k);
    });
    const T* kt = sk + buf * BN * D;
    const T* vt = sv + buf * BN * D;

    float s[NT][4], dp[NT][4];
    zero_acc(s);
    zero_acc(dp);
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      uint32_t qa[4], ga[4];
      ldsm_tile<D, false>(qa, sq, la, warp * 16, kk * 16);
      ldsm_tile<D, false>(ga, sdo, la, warp * 16, kk * 16);
      mma_a_bt<T, D, NT>(s, qa, kt, lb, kk);
      mma_a_bt<T, D, NT>(dp, ga, vt, lb, kk);
    }
    const int64_t j0 = n * BN;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t i = i0 + warp * 16 + mma_c_row(lane, 2 * r);
        const int64_t j = j0 + nt * 8 + mma_c_col(lane, 2 * r);
        if (i >= p.len_q) {
          s[nt][2 * r] = s[nt][2 * r + 1] = 0.f;
          continue;
        }
        const uint32_t keep = p.dropout.enabled
            ? dropout_keep_pair(p.dropout, attention_dropout_element(bh, i, j, p.len_q, p.len_k)) : 3u;
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int e = 2 * r + u;
          const float x = attn_mask_score<float>(p, s[nt][e] * c, b, h, i, j + u);
          const float pp = exp2f(x - lse2[r]);
          const float dpe = (keep >> u) & 1u ? dp[nt][e] * zs : 0.f;  // zs = 1 without dropout
          s[nt][e] = pp * (dpe - dl[r]) * scale;
        }
      }
    }
    // dQ += dS K: k = keys, B from the [key][d] tile transposed.
    mma_p_b<T, D, NT>(dq, s, kt, lbt);
    __syncthreads();
  }
  cp_async_wait<0>();

  T* gq = static_cast<T*>(p.grad_q);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = i0 + warp * 16 + mma_c_row(lane, 2 * r);
    if (i >= p.len_q) continue;
    T* row = gq + (bh * p.len_q + i) * D + mma_c_col(lane, 0);
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) *reinterpret_cast<uint32_t*>(row + dt * 8) = pack2<T>(dq[dt][2 * r], dq[dt][2 * r + 1]);
  }
}

#ifndef AIAYN_HOST_EMULATION
template <typename T, int D>
bool launch_attention_bwd_mma(const AttentionParams& p, cudaStream_t stream) {
  constexpr size_t dkdv_smem = AttnBwdMma::dkdv_smem<T, D>(), dq_smem = AttnBwdMma::dq_smem<T, D>();
  if (!request_dynamic_smem(attention_bwd_dkdv_mma_kernel<T, D>, dkdv_smem) ||
      !request_dynamic_smem(attention_bwd_dq_mma_kernel<T, D>, dq_smem))
    return false;
  const int64_t BH = p.batch * p.heads;
  const int64_t key_blocks = (p.len_k + AttnBwdMma::kKeys - 1) / AttnBwdMma::kKeys;
  const int64_t query_blocks = (p.len_q + AttnBwdMma::kQueries - 1) / AttnBwdMma::kQueries;
  attention_bwd_dkdv_mma_kernel<T, D><<<static_cast<unsigned>(key_blocks * BH), AttnBwdMma::kThreads, dkdv_smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  attention_bwd_dq_mma_kernel<T, D><<<static_cast<unsigned>(query_blocks * BH), AttnBwdMma::kThreads, dq_smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}
#endif

}  // namespace aiayn::cuda
