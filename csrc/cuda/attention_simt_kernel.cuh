// SIMT attention kernels (no tensor cores): every dtype (float64 for gradcheck, float32, and
// float16 / bfloat16 head dims without a tensor-core kernel), any head dim up to 256, and the
// split-K decode step. One warp per query row (forward, dQ) or key row (dK, dV): the lanes own 32
// keys (queries) at a time for the dot products, then own head-dim columns for the weighted sums,
// the 32 weights broadcast by shuffles. Same math as the CPU kernel (cpu/attention_kernel.h):
// log2-domain scores, online softmax, log-sum-exp saved, probabilities recomputed backward.
#pragma once
#include "attention_common.cuh"

namespace aiayn::cuda {

constexpr int kSimtWarps = 4;
constexpr int kSimtMaxDim = 256;
constexpr int kSimtPerLane = kSimtMaxDim / 32;

// Rows a (times mul) and b into this warp's shared buffers as, bs, widened to A.
template <typename T, typename A>
__device__ __forceinline__ void stage_rows(A* as, const T* a, A mul, A* bs, const T* b, int D) {
  const int lane = threadIdx.x & 31;
  __syncwarp();
  for (int d = lane; d < D; d += 32) as[d] = convert<A>(a[d]) * mul, bs[d] = convert<A>(b[d]);
  __syncwarp();
}

// x . xr over D (x staged in shared memory, xr a row in global memory), in four interleaved partial
// sums: independent chains for the pipeline, and a rounding error closer to a blocked GEMM's.
template <typename T, typename A>
__device__ __forceinline__ A dot(const A* x, const T* xr, int D) {
  A s[4] = {A(0), A(0), A(0), A(0)};
  int d = 0;
  for (; d + 4 <= D; d += 4) {
#pragma unroll
    for (int u = 0; u < 4; ++u) s[u] += x[d + u] * convert<A>(xr[d + u]);
  }
  for (; d < D; ++d) s[d & 3] += x[d] * convert<A>(xr[d]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// acc[r] += sum_{u < n} w_u row(u)[lane + 32 r], where w_u is lane u's w: the weighted sum of n
// rows, the weights broadcast from the lanes that computed them.
template <typename T, typename A, typename RowOf>
__device__ __forceinline__ void accumulate_rows(A (&acc)[kSimtPerLane], A w, int n, int D, RowOf&& row_of) {
  const int lane = threadIdx.x & 31;
  for (int u = 0; u < n; ++u) {
    const A wu = __shfl_sync(0xFFFFFFFFu, w, u);
    const T* r = row_of(u);
#pragma unroll
    for (int k = 0; k < kSimtPerLane; ++k)
      if (lane + 32 * k < D) acc[k] += wu * convert<A>(r[lane + 32 * k]);
  }
}

// Scores of one query row against keys [j_begin, j_end) by one warp: running max m, sum l and
// the unnormalised output row o (column lane + 32 r in o[r]). l is NaN if a score was NaN while
// nothing was visible (the CPU kernel's rule: such a row is NaN, not zeros).
template <typename T, typename A>
__device__ void simt_row_forward(const AttentionParams& p, const A* qs, int64_t b, int64_t h, int64_t i,
                                 int64_t j_begin, int64_t j_end, A& m_out, A& l_out, A (&o)[kSimtPerLane]) {
  const int lane = threadIdx.x & 31;
  const int D = p.dim;
  const int64_t bh = b * p.heads + h;
  A m = neg_inf<A>(), l = A(0);
  bool nan_seen = false;
#pragma unroll
  for (int r = 0; r < kSimtPerLane; ++r) o[r] = A(0);
  const A zs = static_cast<A>(p.dropout.scale);
  for (int64_t j0 = j_begin; j0 < j_end; j0 += 32) {
    const int64_t j = j0 + lane;
    A s = neg_inf<A>();
    if (j < j_end) {
      s = attn_mask_score<A>(p, dot(qs, attn_row<T>(p.k, p.k_stride, b, h, j), D), b, h, i, j);
    }
    nan_seen = nan_seen || __any_sync(0xFFFFFFFFu, s != s);
    const A m_new = max_acc(m, warp_max(s));
    if (m_new == neg_inf<A>()) continue;  // nothing visible yet (uniform over the warp)
    const A alpha = m == neg_inf<A>() ? A(0) : exp2_acc(m - m_new);
    A pj = exp2_acc(s - m_new);
    l = l * alpha + warp_sum(pj);
    m = m_new;
    if (p.dropout.enabled && j < j_end)
      pj = dropout_keep(p.dropout, attention_dropout_element(bh, i, j, p.len_q, p.len_k)) ? pj * zs : A(0);
#pragma unroll
    for (int r = 0; r < kSimtPerLane; ++r) o[r] *= alpha;
    accumulate_rows<T>(o, pj, static_cast<int>(j_end - j0 < 32 ? j_end - j0 : 32), D,
                       [&](int u) { return attn_row<T>(p.v, p.v_stride, b, h, j0 + u); });
  }
  if (m == neg_inf<A>() && nan_seen) l = std::numeric_limits<A>::quiet_NaN();
  m_out = m;
  l_out = l;
}

// out = o / l and lse = (m + log2 l) ln 2 of row (bh, i); a fully masked row (l == 0) gives zeros
// and lse = +inf, so that the backward sees P = 0.
template <typename T, typename A>
__device__ void simt_finish_row(const AttentionParams& p, int64_t bh, int64_t i, A m, A l, const A (&o)[kSimtPerLane]) {
  const int lane = threadIdx.x & 31;
  const int D = p.dim;
  T* out = static_cast<T*>(p.out) + (bh * p.len_q + i) * D;
  const bool dead = l == A(0);
  const A inv = dead ? A(0) : A(1) / l;
#pragma unroll
  for (int r = 0; r < kSimtPerLane; ++r) {
    const int d = lane + 32 * r;
    if (d < D) out[d] = convert<T>(dead ? A(0) : o[r] * inv);
  }
  if (lane == 0)
    static_cast<A*>(p.lse)[bh * p.len_q + i] =
        dead ? std::numeric_limits<A>::infinity()
             : static_cast<A>((static_cast<double>(m) + log2(static_cast<double>(l))) * kAttnLn2);
}

// One warp per (row, split) item, item = ((bh * splits + split) * Lq + i): the warps of a block
// share a (head, split) and read the same keys. splits == 1 writes the output; otherwise partial
// (m, l) and o rows for attention_combine_splits_kernel.
template <typename T, typename A>
__global__ void __launch_bounds__(kSimtWarps * 32) attention_fwd_simt_kernel(AttentionParams p) {
  __shared__ A q_smem[kSimtWarps][kSimtMaxDim];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  A* qs = q_smem[warp];
  const int D = p.dim;
  const A c = static_cast<A>(p.scale * kAttnLog2e);
  const int64_t items = p.batch * p.heads * p.splits * p.len_q;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp; item < items;
       item += static_cast<int64_t>(gridDim.x) * kSimtWarps) {
    const int64_t i = item % p.len_q;
    const int64_t rest = item / p.len_q;
    const int split = static_cast<int>(rest % p.splits);
    const int64_t bh = rest / p.splits;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const T* qr = attn_row<T>(p.q, p.q_stride, b, h, i);
    __syncwarp();
    for (int d = lane; d < D; d += 32) qs[d] = convert<A>(qr[d]) * c;  // pre-scaled: log2 units
    __syncwarp();
    const int64_t visible = p.causal ? (i + 1 < p.len_k ? i + 1 : p.len_k) : p.len_k;
    const int64_t j_begin = split * p.split_keys;
    const int64_t j_end = p.splits == 1 ? visible : (j_begin + p.split_keys < visible ? j_begin + p.split_keys : visible);
    A m, l, o[kSimtPerLane];
    simt_row_forward<T, A>(p, qs, b, h, i, j_begin, j_end, m, l, o);
    if (p.splits == 1) {
      simt_finish_row<T, A>(p, bh, i, m, l, o);
    } else {
      A* ml = static_cast<A*>(p.part_ml) + 2 * item;
      A* po = static_cast<A*>(p.part_o) + item * D;
      if (lane == 0) ml[0] = m, ml[1] = l;
#pragma unroll
      for (int r = 0; r < kSimtPerLane; ++r)
        if (lane + 32 * r < D) po[lane + 32 * r] = o[r];
    }
  }
}

// Merges the splits of each row: M = max m_s, l = sum l_s 2^(m_s - M), o = sum o_s 2^(m_s - M).
// A split that saw nothing has m_s = -inf and weight 0 (its l_s, 0 or NaN, still propagates NaN).
template <typename T, typename A>
__global__ void __launch_bounds__(kSimtWarps * 32) attention_combine_splits_kernel(AttentionParams p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int D = p.dim;
  const int64_t rows = p.batch * p.heads * p.len_q;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kSimtWarps) {
    const int64_t i = row % p.len_q, bh = row / p.len_q;
    const A* ml = static_cast<const A*>(p.part_ml);
    const A* po = static_cast<const A*>(p.part_o);
    A mx = neg_inf<A>();
    for (int s = 0; s < p.splits; ++s) mx = max_acc(mx, ml[2 * ((bh * p.splits + s) * p.len_q + i)]);
    A l = A(0), o[kSimtPerLane];
#pragma unroll
    for (int r = 0; r < kSimtPerLane; ++r) o[r] = A(0);
    for (int s = 0; s < p.splits; ++s) {
      const int64_t item = (bh * p.splits + s) * p.len_q + i;
      const A ms = ml[2 * item], ls = ml[2 * item + 1];
      const A w = ms == neg_inf<A>() ? A(0) : exp2_acc(ms - mx);
      l += w * ls;
      if (w != A(0)) {
#pragma unroll
        for (int r = 0; r < kSimtPerLane; ++r)
          if (lane + 32 * r < D) o[r] += w * po[item * D + lane + 32 * r];
      }
    }
    simt_finish_row<T, A>(p, bh, i, mx, l, o);
  }
}

// delta_i = dO_i . O_i (in double, as the CPU kernel), one warp per query row.
template <typename T, typename A>
__global__ void __launch_bounds__(kSimtWarps * 32) attention_bwd_prep_kernel(AttentionParams p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int D = p.dim;
  const int64_t rows = p.batch * p.heads * p.len_q;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kSimtWarps) {
    const int64_t i = row % p.len_q, bh = row / p.len_q;
    const T* go = attn_row<T>(p.grad_out, p.grad_out_stride, bh / p.heads, bh % p.heads, i);
    const T* o = static_cast<const T*>(p.out_saved) + row * D;
    double acc = 0;
    for (int d = lane; d < D; d += 32) acc += static_cast<double>(convert<A>(go[d])) * static_cast<double>(convert<A>(o[d]));
    acc = warp_sum(acc);
    if (lane == 0) static_cast<A*>(p.delta)[row] = static_cast<A>(acc);
  }
}

// dQ_i = sum_j dS_ij K_j, one warp per query row.
template <typename T, typename A>
__global__ void __launch_bounds__(kSimtWarps * 32) attention_bwd_dq_simt_kernel(AttentionParams p) {
  __shared__ A smem[kSimtWarps][2][kSimtMaxDim];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  A* qs = smem[warp][0];
  A* gs = smem[warp][1];
  const int D = p.dim;
  const A c = static_cast<A>(p.scale * kAttnLog2e);
  const int64_t rows = p.batch * p.heads * p.len_q;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kSimtWarps) {
    const int64_t i = row % p.len_q, bh = row / p.len_q;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const T* qr = attn_row<T>(p.q, p.q_stride, b, h, i);
    const T* gr = attn_row<T>(p.grad_out, p.grad_out_stride, b, h, i);
    stage_rows(qs, qr, c, gs, gr, D);
    const A lse2 = static_cast<const A*>(p.lse_saved)[row] * static_cast<A>(kAttnLog2e);
    const A dl = static_cast<const A*>(p.delta)[row];
    A dq[kSimtPerLane];
#pragma unroll
    for (int r = 0; r < kSimtPerLane; ++r) dq[r] = A(0);
    const int64_t visible = p.causal ? (i + 1 < p.len_k ? i + 1 : p.len_k) : p.len_k;
    for (int64_t j0 = 0; j0 < visible; j0 += 32) {
      const int64_t j = j0 + lane;
      A pz, ds = A(0);
      if (j < visible) {
        const A s = attn_mask_score<A>(p, dot(qs, attn_row<T>(p.k, p.k_stride, b, h, j), D), b, h, i, j);
        attention_bwd_pair(p, s, dot(gs, attn_row<T>(p.v, p.v_stride, b, h, j), D), lse2, dl, bh, i, j, pz, ds);
      }
      accumulate_rows<T>(dq, ds, static_cast<int>(visible - j0 < 32 ? visible - j0 : 32), D,
                         [&](int u) { return attn_row<T>(p.k, p.k_stride, b, h, j0 + u); });
    }
    T* out = static_cast<T*>(p.grad_q) + row * D;
#pragma unroll
    for (int r = 0; r < kSimtPerLane; ++r)
      if (lane + 32 * r < D) out[lane + 32 * r] = convert<T>(dq[r]);
  }
}

// dV_j = sum_i P_ij Z_ij dO_i and dK_j = sum_i dS_ij Q_i, one warp per key row (under the causal
// mask only rows i >= j).
template <typename T, typename A>
__global__ void __launch_bounds__(kSimtWarps * 32) attention_bwd_dkdv_simt_kernel(AttentionParams p) {
  __shared__ A smem[kSimtWarps][2][kSimtMaxDim];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  A* ks = smem[warp][0];
  A* vs = smem[warp][1];
  const int D = p.dim;
  const A c = static_cast<A>(p.scale * kAttnLog2e);
  const int64_t rows = p.batch * p.heads * p.len_k;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kSimtWarps) {
    const int64_t j = row % p.len_k, bh = row / p.len_k;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const T* kr = attn_row<T>(p.k, p.k_stride, b, h, j);
    const T* vr = attn_row<T>(p.v, p.v_stride, b, h, j);
    stage_rows(ks, kr, c, vs, vr, D);
    A dk[kSimtPerLane], dv[kSimtPerLane];
#pragma unroll
    for (int r = 0; r < kSimtPerLane; ++r) dk[r] = dv[r] = A(0);
    const A* lse = static_cast<const A*>(p.lse_saved) + bh * p.len_q;
    const A* delta = static_cast<const A*>(p.delta) + bh * p.len_q;
    for (int64_t i0 = p.causal ? j : 0; i0 < p.len_q; i0 += 32) {
      const int64_t i = i0 + lane;
      A pz = A(0), ds = A(0);
      if (i < p.len_q) {
        const A s = attn_mask_score<A>(p, dot(ks, attn_row<T>(p.q, p.q_stride, b, h, i), D), b, h, i, j);
        attention_bwd_pair(p, s, dot(vs, attn_row<T>(p.grad_out, p.grad_out_stride, b, h, i), D),
                           lse[i] * static_cast<A>(kAttnLog2e), delta[i], bh, i, j, pz, ds);
      }
      const int n = static_cast<int>(p.len_q - i0 < 32 ? p.len_q - i0 : 32);
      accumulate_rows<T>(dv, pz, n, D, [&](int u) { return attn_row<T>(p.grad_out, p.grad_out_stride, b, h, i0 + u); });
      accumulate_rows<T>(dk, ds, n, D, [&](int u) { return attn_row<T>(p.q, p.q_stride, b, h, i0 + u); });
    }
    T* gk = static_cast<T*>(p.grad_k) + row * D;
    T* gv = static_cast<T*>(p.grad_v) + row * D;
#pragma unroll
    for (int r = 0; r < kSimtPerLane; ++r)
      if (lane + 32 * r < D) gk[lane + 32 * r] = convert<T>(dk[r]), gv[lane + 32 * r] = convert<T>(dv[r]);
  }
}

}  // namespace aiayn::cuda
