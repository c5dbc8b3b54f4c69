// LayerNorm(residual + dropout(x)) forward and backward on CUDA: the sub-layer connection of
// "Attention Is All You Need" (§3.1: LayerNorm(x + Sublayer(x)); §5.4: dropout on each sub-layer's
// output before the residual add). Same semantics and rounding points as the CPU kernels
// (cpu/add_dropout_layer_norm_kernel.h): statistics in the accumulation type A (float, or double
// for double storage), two exact passes for the variance, element (row, col) of the dropout mask
// numbered row * cols + col.
//
// One block per row (grid-stride over rows). Thread t owns the vectors j = t, t + blockDim.x, ...
// of VEC elements of every row, always the same ones: whatever a thread caches in shared memory
// in one pass it reads back itself in the next, so the caches need no barrier; only the
// reductions do. VEC = 16 / sizeof(T) when every row start and the row length are 16-byte
// aligned, 1 otherwise (any cols).
//
// kCache: keep the row (forward: h = residual + dropout(x); backward: xhat and the keep-bits) in
// dynamic shared memory between passes, and the backward's weight/bias sums too. When that does
// not fit, the passes recompute from global memory (and the sums live in the global partials).
#pragma once
#include <cstdint>

#include "../common/dropout.h"
#include "dropout.cuh"
#include "reduce.cuh"
#include "type_convert.cuh"

namespace aiayn::cuda {

constexpr int kAdlnMaxThreads = 512;

template <typename T, typename A>
struct AdlnFwdArgs {
  const T* x;  // rows of cols elements, row stride x_stride (elements)
  const T* residual;
  int64_t x_stride, residual_stride;
  const A* weight;  // cols values, or nullptr for ones
  const A* bias;    // cols values, or nullptr for zeros
  T* out;           // rows x cols, contiguous
  A* mean;          // rows
  A* rstd;          // rows
  int64_t rows, cols;
  A eps;
  DropoutParams dropout;
};

template <typename T, typename A>
struct AdlnBwdArgs {
  const T* grad_out;
  const T* x;
  const T* residual;
  int64_t grad_out_stride, x_stride, residual_stride;
  const A* weight;  // nullptr for ones
  const A* mean;
  const A* rstd;
  T* grad_x;         // rows x cols, contiguous
  T* grad_residual;  // rows x cols, contiguous
  // [2][gridDim.x][cols]: block b's sums over its rows of dy * xhat (weight) and of dy (bias).
  A* partial;
  int64_t rows, cols;
  DropoutParams dropout;
};

// h = residual + dropout(x) for the VEC elements of vector j of a row. keep: bit i for element i.
// x * scale is rounded before the add, as on the CPU.
template <int VEC, typename T, typename A>
__device__ __forceinline__ void adln_h(const T* x, const T* res, int64_t j, bool dropout, uint32_t keep,
                                       A scale, A (&h)[VEC]) {
  A xv[VEC], rv[VEC];
  load_vec(x + j * VEC, xv);
  load_vec(res + j * VEC, rv);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const A xi = dropout ? ((keep >> i) & 1u ? mul_rn(xv[i], scale) : A(0)) : xv[i];
    h[i] = rv[i] + xi;
  }
}

template <int VEC, typename A>
__device__ __forceinline__ void load_or_fill(const A* p, int64_t j, A fill, A (&v)[VEC]) {
  if (p != nullptr) {
    load_vec(p + j * VEC, v);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = fill;
  }
}

template <typename T, typename A, int VEC, bool kCache>
__global__ void __launch_bounds__(kAdlnMaxThreads)
    add_dropout_layer_norm_fwd_kernel(const AdlnFwdArgs<T, A> a) {
  __shared__ A scratch[kMaxWarps];
  A* const h_cache = dynamic_smem<A>();  // cols values when kCache
  const int64_t cols = a.cols;
  const int64_t nvec = cols / VEC;
  const bool dropout = a.dropout.enabled;
  const A scale = static_cast<A>(a.dropout.scale);

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = a.x + row * a.x_stride;
    const T* res = a.residual + row * a.residual_stride;
    const uint64_t e_row = static_cast<uint64_t>(row) * static_cast<uint64_t>(cols);
    auto compute_h = [&](int64_t j, A(&h)[VEC]) {
      const uint32_t keep = dropout ? dropout_keep_bits<VEC>(a.dropout, e_row + static_cast<uint64_t>(j * VEC)) : 0u;
      adln_h<VEC>(x, res, j, dropout, keep, scale, h);
    };
    auto get_h = [&](int64_t j, A(&h)[VEC]) {
      if constexpr (kCache) {
        load_vec(h_cache + j * VEC, h);
      } else {
        compute_h(j, h);
      }
    };

    A sum = 0;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      A h[VEC];
      compute_h(j, h);
      if constexpr (kCache) store_vec(h_cache + j * VEC, h);
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += h[i];
    }
    const A mean = block_reduce_sum(sum, scratch) / static_cast<A>(cols);

    A sq = 0;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      A h[VEC];
      get_h(j, h);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const A d = h[i] - mean;
        sq = fma(d, d, sq);
      }
    }
    const A var = block_reduce_sum(sq, scratch) / static_cast<A>(cols);
    const A rstd = A(1) / sqrt(var + a.eps);
    if (threadIdx.x == 0) {
      a.mean[row] = mean;
      a.rstd[row] = rstd;
    }

    T* out = a.out + row * cols;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      A h[VEC], w[VEC], b[VEC], y[VEC];
      get_h(j, h);
      load_or_fill(a.weight, j, A(1), w);
      load_or_fill(a.bias, j, A(0), b);
#pragma unroll
      for (int i = 0; i < VEC; ++i) y[i] = fma((h[i] - mean) * rstd, w[i], b[i]);
      store_vec(out + j * VEC, y);
    }
  }
}

// dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight; grad_residual = dh,
// grad_x = dh through the forward's mask and scale. The weight/bias gradients are summed per
// block (each thread over its own columns, so without atomics) and reduced by
// column_sums_kernel: the same result on every run with the same grid.
template <typename T, typename A, int VEC, bool kCache>
__global__ void __launch_bounds__(kAdlnMaxThreads)
    add_dropout_layer_norm_bwd_kernel(const AdlnBwdArgs<T, A> a) {
  __shared__ A scratch[2 * kMaxWarps];
  const int64_t cols = a.cols;
  const int64_t nvec = cols / VEC;
  const bool dropout = a.dropout.enabled;
  const A scale = static_cast<A>(a.dropout.scale);
  // kCache layout: xhat[cols], dw[cols], db[cols] (A), then one keep byte per vector.
  A* const xhat_cache = dynamic_smem<A>();
  uint8_t* const keep_cache = reinterpret_cast<uint8_t*>(xhat_cache + 3 * cols);
  A* const dw = kCache ? xhat_cache + cols : a.partial + static_cast<int64_t>(blockIdx.x) * cols;
  A* const db = kCache ? xhat_cache + 2 * cols
                       : a.partial + (static_cast<int64_t>(gridDim.x) + blockIdx.x) * cols;
  static_assert(VEC <= 8, "the keep cache holds one byte per vector");

  for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
    const A zero[VEC] = {};
    store_vec(dw + j * VEC, zero);
    store_vec(db + j * VEC, zero);
  }

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* dy_row = a.grad_out + row * a.grad_out_stride;
    const T* x = a.x + row * a.x_stride;
    const T* res = a.residual + row * a.residual_stride;
    const uint64_t e_row = static_cast<uint64_t>(row) * static_cast<uint64_t>(cols);
    const A mean = a.mean[row];
    const A rstd = a.rstd[row];
    auto keep_bits = [&](int64_t j) {
      return dropout ? dropout_keep_bits<VEC>(a.dropout, e_row + static_cast<uint64_t>(j * VEC)) : 0u;
    };
    auto compute_xhat = [&](int64_t j, uint32_t keep, A(&xh)[VEC]) {
      A h[VEC];
      adln_h<VEC>(x, res, j, dropout, keep, scale, h);
#pragma unroll
      for (int i = 0; i < VEC; ++i) xh[i] = (h[i] - mean) * rstd;
    };

    A sums[2] = {A(0), A(0)};  // sum of g, sum of g * xhat
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const uint32_t keep = keep_bits(j);
      A xh[VEC], dy[VEC], w[VEC], dwv[VEC], dbv[VEC];
      compute_xhat(j, keep, xh);
      load_vec(dy_row + j * VEC, dy);
      load_or_fill(a.weight, j, A(1), w);
      load_vec(dw + j * VEC, dwv);
      load_vec(db + j * VEC, dbv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const A g = dy[i] * w[i];
        sums[0] += g;
        sums[1] = fma(g, xh[i], sums[1]);
        dwv[i] = fma(dy[i], xh[i], dwv[i]);
        dbv[i] = dy[i] + dbv[i];
      }
      store_vec(dw + j * VEC, dwv);
      store_vec(db + j * VEC, dbv);
      if constexpr (kCache) {
        store_vec(xhat_cache + j * VEC, xh);
        if (dropout) keep_cache[j] = static_cast<uint8_t>(keep);
      }
    }
    block_reduce_sum<2>(sums, scratch);
    const A mean_g = sums[0] / static_cast<A>(cols);
    const A mean_gx = sums[1] / static_cast<A>(cols);

    T* gx_row = a.grad_x + row * cols;
    T* gr_row = a.grad_residual + row * cols;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      uint32_t keep;
      A xh[VEC], dy[VEC], w[VEC], dh[VEC], dx[VEC];
      if constexpr (kCache) {
        keep = dropout ? keep_cache[j] : 0u;
        load_vec(xhat_cache + j * VEC, xh);
      } else {
        keep = keep_bits(j);
        compute_xhat(j, keep, xh);
      }
      load_vec(dy_row + j * VEC, dy);
      load_or_fill(a.weight, j, A(1), w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const A g = dy[i] * w[i];
        dh[i] = (g - mean_g - xh[i] * mean_gx) * rstd;
        dx[i] = dropout ? ((keep >> i) & 1u ? mul_rn(dh[i], scale) : A(0)) : dh[i];
      }
      store_vec(gr_row + j * VEC, dh);
      store_vec(gx_row + j * VEC, dx);
    }
  }

  if constexpr (kCache) {
    A* const out_w = a.partial + static_cast<int64_t>(blockIdx.x) * cols;
    A* const out_b = a.partial + (static_cast<int64_t>(gridDim.x) + blockIdx.x) * cols;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      A v[VEC];
      load_vec(dw + j * VEC, v);
      store_vec(out_w + j * VEC, v);
      load_vec(db + j * VEC, v);
      store_vec(out_b + j * VEC, v);
    }
  }
}

// grad_weight[c] = sum over blocks of partial[0][b][c], grad_bias[c] likewise from partial[1], in
// block order (deterministic), converted to the weight's dtype.
template <typename A, typename O>
__global__ void column_sums_kernel(const A* __restrict__ partial, int64_t blocks, int64_t cols,
                                   O* __restrict__ grad_weight, O* __restrict__ grad_bias) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += step) {
    A sw = 0, sb = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      sw += partial[b * cols + c];
      sb += partial[(blocks + b) * cols + c];
    }
    grad_weight[c] = convert<O>(sw);
    grad_bias[c] = convert<O>(sb);
  }
}

}  // namespace aiayn::cuda
