// Tensor-core building blocks of the attention kernels (sm_80+): cp.async tile loads into
// swizzled shared memory, ldmatrix fragment loads and mma.sync.m16n8k16 with f32 accumulation.
// Fragment layouts and the lane -> address maps are in common/attention_index.h, where
// tests/cpp/attention_index_check.cpp checks them against the PTX ISA's layouts on the host.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention_common.cuh"

namespace aiayn::cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define AIAYN_MMA_UNSUPPORTED 1  // the host dispatches these kernels only on sm_80+
#endif

#ifdef AIAYN_HOST_EMULATION
// The instructions as tests/cpp/attention_kernels_emulation.cpp emulates them on the host (from the
// PTX ISA's definitions), so that these kernels run there without a GPU.
void emulated_cp_async_16(void* dst, const void* src, bool valid);
void emulated_ldsm_x4(uint32_t (&r)[4], const void* p, bool trans);
void emulated_mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
#define AIAYN_MMA_UNSUPPORTED 1  // no inline PTX
#endif

// First statement of every tensor-core kernel: a build without sm_80 code that still ends up
// running one (PTX of an older arch JIT-compiled) traps instead of returning garbage.
__device__ __forceinline__ void mma_arch_guard() {
#if defined(AIAYN_MMA_UNSUPPORTED) && !defined(AIAYN_HOST_EMULATION)
  __trap();
#endif
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
#ifdef AIAYN_HOST_EMULATION
  return 0;  // unused there
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 writes zeros (rows past the end).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#ifdef AIAYN_HOST_EMULATION
  emulated_cp_async_16(dst, src, valid);
#endif
#ifndef AIAYN_MMA_UNSUPPORTED
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef AIAYN_MMA_UNSUPPORTED
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef AIAYN_MMA_UNSUPPORTED
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
#ifdef AIAYN_HOST_EMULATION
  emulated_ldsm_x4(r, p, false);
#endif
#ifndef AIAYN_MMA_UNSUPPORTED
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
#ifdef AIAYN_HOST_EMULATION
  emulated_ldsm_x4(r, p, true);
#endif
#ifndef AIAYN_MMA_UNSUPPORTED
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}

// d += a b: a 16 x 16 (row), b 16 x 8 (col), f32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef AIAYN_HOST_EMULATION
  emulated_mma_16816(d, a, b0, b1, false);
#endif
#ifndef AIAYN_MMA_UNSUPPORTED
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef AIAYN_HOST_EMULATION
  emulated_mma_16816(d, a, b0, b1, true);
#endif
#ifndef AIAYN_MMA_UNSUPPORTED
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats as one 32-bit register of T (lo in the low half: the lower column index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// A 16 x 16 A operand built from two adjacent 16 x 8 accumulator tiles c0 (columns 0-7) and c1
// (columns 8-15): a0 = (row g, cols 2t, 2t+1) = c0[0..1], a1 = (row g + 8) = c0[2..3],
// a2 = (row g, cols 8 + 2t..) = c1[0..1], a3 = c1[2..3] (the FlashAttention-2 register reuse of P).
template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// A tile of ROWS rows x D columns of T in shared memory, swizzled (common/attention_index.h).
template <int D>
struct SmemTile {
  static constexpr int kChunks = D / 8;
  template <typename T>
  static __device__ __forceinline__ T* at(T* tile, int row, int col) {  // col a multiple of 8
    return tile + smem_offset(row, col >> 3, kChunks);
  }
};

// Rows [row0, row0 + ROWS) of a (batch, head) slice (row stride `stride` elements, 16-byte aligned
// rows) into a swizzled tile with cp.async; rows >= len are zero-filled. All THREADS threads call.
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* base, int64_t stride, int64_t row0, int64_t len) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += THREADS) {
    const int r = idx / kChunks, ch = idx % kChunks;
    const bool valid = row0 + r < len;
    const T* src = valid ? base + (row0 + r) * stride + ch * 8 : base;
    cp_async_16(tile + smem_offset(r, ch, kChunks), src, valid);
  }
}

// ldmatrix of a 16 x 16 block at (row0, col0) of a swizzled tile, the lane's row from `map`.
template <int D, bool TRANS, typename T>
__device__ __forceinline__ void ldsm_tile(uint32_t (&r)[4], const T* tile, RowCol rc, int row0, int col0) {
  const T* p = SmemTile<D>::at(tile, row0 + rc.row, col0 + rc.col);
  if constexpr (TRANS) ldsm_x4_trans(r, p);
  else ldsm_x4(r, p);
}

template <int N>
__device__ __forceinline__ void zero_acc(float (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

// One k-step (16 of the D columns, step kk) of acc += A B^T: A a 16 x 16 fragment, B rows
// [0, 8 NT) of a [n][D] tile (K for Q K^T, Q for K Q^T, ...); acc holds NT 16 x 8 tiles.
template <typename T, int D, int NT>
__device__ __forceinline__ void mma_a_bt(float (&acc)[NT][4], const uint32_t (&a)[4], const T* tile, RowCol lb, int kk) {
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    uint32_t bb[4];
    ldsm_tile<D, false>(bb, tile, lb, np * 16, kk * 16);
    mma_16816<T>(acc[2 * np], a, bb[0], bb[1]);
    mma_16816<T>(acc[2 * np + 1], a, bb[2], bb[3]);
  }
}

// acc (16 x D) += P B: P 16 x 8 NT from accumulator registers (rounded to T), B rows [0, 8 NT)
// of a [k][D] tile (V for P V, dO for P^T dO, K for dS K, Q for dS^T Q).
template <typename T, int D, int NT>
__device__ __forceinline__ void mma_p_b(float (&acc)[D / 8][4], const float (&pr)[NT][4], const T* tile, RowCol lbt) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    uint32_t a[4];
    acc_to_a<T>(a, pr[2 * kk], pr[2 * kk + 1]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t bb[4];
      ldsm_tile<D, true>(bb, tile, lbt, kk * 16, dp * 16);
      mma_16816<T>(acc[2 * dp], a, bb[0], bb[1]);
      mma_16816<T>(acc[2 * dp + 1], a, bb[2], bb[3]);
    }
  }
}

// A block that owns BM query rows of one (batch, head) and streams key blocks of BN (the forward
// and the dQ kernel): under the causal mask later query blocks see more keys, so they go first.
struct QueryBlock {
  int64_t bh, b, h, i0, key_blocks;
};
template <int BM, int BN>
__device__ __forceinline__ QueryBlock query_block(const AttentionParams& p) {
  const int64_t BH = p.batch * p.heads;
  const int64_t nqb = (p.len_q + BM - 1) / BM;
  QueryBlock q;
  q.bh = blockIdx.x % BH;
  q.b = q.bh / p.heads;
  q.h = q.bh % p.heads;
  const int64_t qb = p.causal ? nqb - 1 - blockIdx.x / BH : blockIdx.x / BH;
  q.i0 = qb * BM;
  q.key_blocks = attention_key_blocks(p.causal, q.i0, BM, BN, (p.len_k + BN - 1) / BN);
  return q;
}

// Before step n of a double-buffered stream: starts loading step n + 1 into the other buffer
// (load(n + 1), when there is one) and waits for step n's data, then syncs the block.
template <typename Load>
__device__ __forceinline__ void pipeline_step(int64_t n, int64_t steps, Load&& load) {
  if (n + 1 < steps) {
    load(n + 1);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

}  // namespace aiayn::cuda
