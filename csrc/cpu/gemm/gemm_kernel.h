// The GEMM of linear and feed_forward (paper §3.3): packing, register-blocked micro-kernels and
// the fused epilogue (bias, ReLU, Philox dropout, ReLU/dropout gate), written once over `Vec`.
// Included inside the ISA namespace by isa/*.cpp, after simd/*.h and dropout_kernel.h.
// isa/avx512.cpp defines AIAYN_GEMM_BF16_DOT first: bf16 then runs on vdpbf16ps (pairs of k per
// 32-bit lane) and, with AIAYN_AMX_TILES, on AMX tiles (gemm_run_amx) where GemmArgs::bf16 says so;
// elsewhere bf16 is widened to float32 while packing.
//
// Blocking (see kernels.h, GemmArgs): B is packed once into panels of NR columns x round_up(K, KP)
// rows. A task (rows [m0, m1) x a range of panels, chosen by gemm/gemm.cpp so that the packed A
// block, MC x K, stays in L2) packs its rows of A into micro-panels of MR rows, then for each B
// panel (reused from L1/L2 by every micro-panel) runs the MR x NR micro-kernel over the *whole* K
// with the tile in registers (MR * NV accumulators: 14 x 2 zmm on AVX-512, 6 x 2 ymm on AVX2) and
// applies the epilogue to the registers before the one store of C. Keeping the whole reduction in
// registers means no partial C sums in memory and an epilogue that sees finished values.

// Register tile per ISA: MR rows x NV vectors. AVX-512: 14 x 2 (28 accumulators, 2 B vectors and
// a broadcast: 31 of 32 zmm) ran 1-4% faster than 12 x 2 on linear at 384 .. 3072 rows.
template <typename V>
struct GemmTile {
  static constexpr int MR = V::N == 16 ? 14 : V::N == 8 ? 6 : 4;
  static constexpr int NV = V::N == 1 ? 4 : 2;
  static constexpr int NR = NV * V::N;
};

inline int64_t gemm_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Storage -> compute (float, double for f64) and compute -> packed (float, double, or raw bf16
// bits for the dot path) conversions.
inline float gemm_to_float(float v) { return v; }
inline float gemm_to_float(uint16_t v) { return bf16_to_float(v); }
inline double gemm_to_float(double v) { return v; }
template <typename P, typename F>
inline P gemm_from(F v) {
  if constexpr (std::is_same_v<P, uint16_t>)
    return float_to_bf16(static_cast<float>(v));
  else
    return static_cast<P>(v);
}
// Storage -> packed, exact when they are the same type.
template <typename P, typename T>
inline P gemm_cvt(T v) {
  if constexpr (std::is_same_v<P, T>)
    return v;
  else
    return gemm_from<P>(gemm_to_float(v));
}

// A full float panel of B = W^T from NR rows of W (row stride ws, k contiguous): Vec::N x Vec::N
// blocks transposed in registers (on AVX-512 ~4x faster than one element at a time; this packing
// was ~13% of a 512-row forward GEMM).
template <int NR>
inline void gemm_pack_bt_f32(const float* w, int64_t ws, int64_t K, float* dst) {
  constexpr int W = Vec::N;
  int64_t k = 0;
  for (; k + W <= K; k += W)
    for (int h = 0; h < NR / W; ++h) Vec::transpose(w + h * W * ws + k, ws, dst + k * NR + h * W, NR);
  for (; k < K; ++k)
    for (int j = 0; j < NR; ++j) dst[k * NR + j] = w[j * ws + k];
}

#ifdef AIAYN_GEMM_BF16_DOT
// --- bf16 packing in vectors (the vdpbf16ps / AMX layouts; AVX-512 only) ---

// vpermt2w indices interleaving the first 16 16-bit elements of two vectors: a0 b0 a1 b1 ...
alignas(64) constexpr uint16_t kGemmInterleave16[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};

// Transposes 16 x 16 32-bit elements (z[r] element c becomes z[c] element r) with the float
// transpose: shuffles only move bits, so bf16 pairs come through exactly.
inline void gemm_transpose16x16_epi32(__m512i (&z)[16]) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(z[i]);
  transpose16x16(r);
  for (int i = 0; i < 16; ++i) z[i] = _mm512_castps_si512(r[i]);
}

// Pair rows (k, k + 1) of 32 columns of B = W^T, read from 16 rows of W, 32 k each: dst[(k / 2)
// * row_stride + j * 2 + k % 2] = w[j][k] for j < 16, k < 32.
inline void gemm_pack_pairs_from_rows(const uint16_t* const* w, int64_t k0, uint16_t* dst, int64_t row_stride) {
  __m512i z[16];
  for (int j = 0; j < 16; ++j) z[j] = _mm512_loadu_si512(w[j] + k0);  // 16 pairs of row j
  gemm_transpose16x16_epi32(z);                                      // z[p]: pair p of the 16 rows
  for (int p = 0; p < 16; ++p) _mm512_storeu_si512(dst + p * row_stride, z[p]);
}

// Interleaves rows k and k + 1 (32 columns each) into one pair row of 64 values.
inline void gemm_pack_pair_row(const uint16_t* r0, const uint16_t* r1, uint16_t* dst) {
  const __m512i lo = _mm512_load_si512(kGemmInterleave16), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const __m512i a = _mm512_loadu_si512(r0), b = _mm512_loadu_si512(r1);
  _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo, b));
  _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(a, hi, b));
}

// A transposed (A(m, k) = a[k * a_cs + m], rows [0, rows) from `a`) into AMX micro-panels of 16
// rows, each 32-k block a 16 x 32 tile: out[q * Kp * 16 + (k / 32) * 512 + (i % 16) * 32 + k % 32].
// Padding must be zero already.
inline void gemm_pack_a_t_tiles(const uint16_t* a, int64_t a_cs, int64_t rows, int64_t K, int64_t Kp, uint16_t* out) {
  const __m512i lo = _mm512_load_si512(kGemmInterleave16);
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    uint16_t* panel = out + (i0 / 16) * Kp * 16;
    const int n = static_cast<int>(rows - i0 < 16 ? rows - i0 : 16);
    int64_t k = 0;
    if (n == 16) {
      for (; k + 32 <= K; k += 32) {
        __m512i z[16];
        for (int j = 0; j < 16; ++j) {
          const uint16_t* r0 = a + (k + 2 * j) * a_cs + i0;
          z[j] = _mm512_permutex2var_epi16(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0))), lo,
                                           _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + a_cs))));
        }
        gemm_transpose16x16_epi32(z);  // z[i]: the 32 k of row i
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(panel + k * 16 + i * 32, z[i]);
      }
    }
    for (; k < K; ++k)
      for (int i = 0; i < n; ++i) panel[(k / 32) * 512 + i * 32 + k % 32] = a[k * a_cs + i0 + i];
  }
}
#endif

// Packs B(k, n) for panels [p0, p1): element (k, j) of panel p at
// p * Kp * NR + (k / KP) * NR * KP + j * KP + k % KP, Kp = round_up(K, KPAD); zero outside K x N.
template <typename T, typename P, int NR, int KP, int KPAD = KP>
void gemm_pack_b_impl(const GemmPackB& g, int64_t p0, int64_t p1, P* out) {
  const int64_t K = g.K, N = g.N, Kp = gemm_round_up(K, KPAD);
  const T* b = static_cast<const T*>(g.b);
  for (int64_t p = p0; p < p1; ++p) {
    P* dst = out + p * Kp * NR;
    const int64_t n0 = p * NR;
    const int nn = static_cast<int>(N - n0 < NR ? N - n0 : NR);
    if (nn < NR || Kp != K)
      for (int64_t i = 0; i < Kp * NR; ++i) dst[i] = P(0);
#ifdef AIAYN_GEMM_BF16_DOT
    // bf16 pairs of 32 columns (vdpbf16ps, AMX): whole vectors where the panel is full.
    if constexpr (std::is_same_v<T, uint16_t> && std::is_same_v<P, uint16_t> && NR == 32 && KP == 2) {
      if (nn == NR && g.b_cs == 1) {
        int64_t k = 0;
        for (; k + 1 < K; k += 2) gemm_pack_pair_row(b + k * g.b_rs + n0, b + (k + 1) * g.b_rs + n0, dst + k * NR);
        for (; k < K; ++k)
          for (int j = 0; j < NR; ++j) dst[(k / 2) * NR * 2 + j * 2 + k % 2] = b[k * g.b_rs + n0 + j];
        continue;
      }
      if (nn == NR && g.b_rs == 1) {
        const uint16_t* rows[NR];
        for (int j = 0; j < NR; ++j) rows[j] = b + (n0 + j) * g.b_cs;
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
          gemm_pack_pairs_from_rows(rows, k, dst + k * NR, NR * 2);
          gemm_pack_pairs_from_rows(rows + 16, k, dst + k * NR + 32, NR * 2);
        }
        for (; k < K; ++k)
          for (int j = 0; j < NR; ++j) dst[(k / 2) * NR * 2 + j * 2 + k % 2] = rows[j][k];
        continue;
      }
    }
#endif
    if (g.b_cs == 1) {
      for (int64_t k = 0; k < K; ++k) {
        const T* src = b + k * g.b_rs + n0;
        P* d = dst + (k / KP) * NR * KP + k % KP;
        for (int j = 0; j < nn; ++j) d[j * KP] = gemm_cvt<P>(src[j]);
      }
    } else {
      // B = W^T (the forward's weights): k outer, so the panel is written contiguously while
      // the nn source rows are each read sequentially.
      const T* src[NR];
      for (int j = 0; j < NR; ++j) src[j] = b + (n0 + (j < nn ? j : 0)) * g.b_cs;
      if constexpr (std::is_same_v<T, float> && std::is_same_v<P, float> && KP == 1 && NR % Vec::N == 0) {
        if (nn == NR && g.b_rs == 1) {
          gemm_pack_bt_f32<NR>(b + n0 * g.b_cs, g.b_cs, K, dst);
          continue;
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        P* d = dst + (k / KP) * NR * KP + k % KP;
        const int64_t off = k * g.b_rs;
        if (nn == NR) {
#pragma GCC unroll 8
          for (int j = 0; j < NR; ++j) d[j * KP] = gemm_cvt<P>(src[j][off]);
        } else {
          for (int j = 0; j < nn; ++j) d[j * KP] = gemm_cvt<P>(src[j][off]);
        }
      }
    }
  }
}

// Packs rows [m0, m0 + rows) of A into micro-panels of MR rows (zero padded):
// element (i, k) of micro-panel q at q * Kp * MR + (k / KP) * MR * KP + (i % MR) * KP + k % KP.
// Optionally gates A (a_gate) and sums each row into a_row_sums (in the compute type, via a
// double accumulator).
template <typename T, typename P, typename Acc, int MR, int KP>
void gemm_pack_a(const GemmArgs& g, int64_t m0, int64_t rows, P* out, bool want_sums) {
  using F = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t K = g.K, Kp = gemm_round_up(K, KP);
  const T* a = static_cast<const T*>(g.a);
  const T* gate = static_cast<const T*>(g.a_gate);
  const int64_t panels = (rows + MR - 1) / MR;
  auto at = [&](int64_t i, int64_t k) -> P& {
    return out[(i / MR) * Kp * MR + (k / KP) * MR * KP + (i % MR) * KP + k % KP];
  };
  for (int64_t i = rows; i < panels * MR; ++i)
    for (int64_t k = 0; k < Kp; ++k) at(i, k) = P(0);
  for (int64_t k = K; k < Kp; ++k)
    for (int64_t i = 0; i < rows; ++i) at(i, k) = P(0);
  const F gscale = static_cast<F>(g.a_gate_scale);
  Acc* sums_out = static_cast<Acc*>(g.a_row_sums);
#ifdef AIAYN_GEMM_BF16_DOT
  if constexpr (std::is_same_v<T, uint16_t> && std::is_same_v<P, uint16_t> && MR == 16 && KP == 32) {
    // AMX tiles: a row's 32 k of a block are contiguous, so rows copy in 64-byte pieces and a
    // transposed A is transposed a 16 x 32 block at a time.
    if (!gate && !want_sums && g.a_cs == 1) {
      for (int64_t i = 0; i < rows; ++i) {
        const T* src = a + (m0 + i) * g.a_rs;
        P* d = out + (i / MR) * Kp * MR + (i % MR) * KP;
        for (int64_t k = 0; k < K; k += KP) std::memcpy(d + k * MR, src + k, (K - k < KP ? K - k : KP) * sizeof(T));
      }
      return;
    }
    if (!gate && g.a_rs == 1 && g.a_cs != 1) {
      gemm_pack_a_t_tiles(a + m0, g.a_cs, rows, K, Kp, out);
      if (want_sums) {
        Buffer<double> sums(rows);
        for (int64_t i = 0; i < rows; ++i) sums.p[i] = 0.0;
        for (int64_t k = 0; k < K; ++k) {
          const T* src = a + k * g.a_cs + m0;
          for (int64_t i = 0; i < rows; ++i) sums.p[i] += static_cast<F>(gemm_to_float(src[i]));
        }
        for (int64_t i = 0; i < rows; ++i) sums_out[m0 + i] = static_cast<Acc>(sums.p[i]);
      }
      return;
    }
  }
#endif
  if (g.a_cs == 1 || g.a_rs != 1) {
    // Rows contiguous in k (x, dY). Plain copies: a panel at a time, k outer, so that the packed
    // panel is written contiguously from MR row streams.
    if (!gate && !want_sums && g.a_cs == 1) {
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t i0 = q * MR, n = rows - i0 < MR ? rows - i0 : MR;
        const T* src[MR];
        for (int i = 0; i < MR; ++i) src[i] = a + (m0 + i0 + (i < n ? i : 0)) * g.a_rs;
        P* d = out + q * Kp * MR;
        if (n == MR) {
          int64_t k = 0;
#ifdef AIAYN_GEMM_BF16_DOT
          // float32 on AVX-512: 16 k at a time through a 16 x 16 register transpose (rows MR .. 15
          // zero), one masked store of MR values per k; element-wise this was ~5% of a backward.
          if constexpr (std::is_same_v<T, float> && std::is_same_v<P, float> && KP == 1 && MR <= 16) {
            const __mmask16 lanes = static_cast<__mmask16>((1u << MR) - 1);
            for (; k + 16 <= K; k += 16) {
              __m512 r[16];
              for (int i = 0; i < 16; ++i) r[i] = i < MR ? _mm512_loadu_ps(src[i] + k) : _mm512_setzero_ps();
              transpose16x16(r);
              for (int j = 0; j < 16; ++j) _mm512_mask_storeu_ps(d + (k + j) * MR, lanes, r[j]);
            }
          }
#endif
          for (; k < K; ++k)
#pragma GCC unroll 16
            for (int i = 0; i < MR; ++i) d[(k / KP) * MR * KP + i * KP + k % KP] = gemm_cvt<P>(src[i][k]);
        } else {
          for (int64_t k = 0; k < K; ++k)
            for (int i = 0; i < n; ++i) d[(k / KP) * MR * KP + i * KP + k % KP] = gemm_cvt<P>(src[i][k]);
        }
      }
      return;
    }
    for (int64_t i = 0; i < rows; ++i) {
      const T* src = a + (m0 + i) * g.a_rs;
      P* d = out + (i / MR) * Kp * MR + (i % MR) * KP;
      if (!gate && !want_sums) {
        if (KP == 1)
          for (int64_t k = 0; k < K; ++k) d[k * MR] = gemm_cvt<P>(src[k * g.a_cs]);
        else
          for (int64_t k = 0; k < K; ++k) d[(k / KP) * MR * KP + k % KP] = gemm_cvt<P>(src[k * g.a_cs]);
        continue;
      }
      const T* gsrc = gate ? gate + (m0 + i) * g.a_rs : nullptr;
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        F v = gemm_to_float(src[k * g.a_cs]);
        if (gsrc) v = gemm_to_float(gsrc[k * g.a_cs]) > 0 ? v * gscale : F(0);
        s += v;
        d[(k / KP) * MR * KP + k % KP] = gemm_from<P>(v);
      }
      if (want_sums) sums_out[m0 + i] = static_cast<Acc>(s);
    }
  } else {
    // A transposed (A(m, k) = y[k, m], the weight-gradient GEMMs): MR contiguous values per k.
    Buffer<double> sums(want_sums ? rows : 1);
    if (want_sums)
      for (int64_t i = 0; i < rows; ++i) sums.p[i] = 0.0;
    // Row k of the source is a short run (rows values) far from row k - 1's (a_cs apart: 37000
    // floats for the vocabulary projection's dW), which the hardware prefetcher does not follow:
    // fetch the rows a few k ahead (this loop stalled on the loads ~half of its time without it).
    constexpr int64_t kAhead = 4;
    constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
    for (int64_t k = 0; k < K; ++k) {
      const T* src = a + k * g.a_cs + m0;
      const T* gsrc = gate ? gate + k * g.a_cs + m0 : nullptr;
      if (k + kAhead < K) {
        for (int64_t i = 0; i < rows; i += kLine) __builtin_prefetch(src + kAhead * g.a_cs + i);
        if (gsrc)
          for (int64_t i = 0; i < rows; i += kLine) __builtin_prefetch(gsrc + kAhead * g.a_cs + i);
      }
      for (int64_t q = 0; q < panels; ++q) {
        P* d = out + q * Kp * MR + (k / KP) * MR * KP + k % KP;
        const int64_t i0 = q * MR, n = rows - i0 < MR ? rows - i0 : MR;
        if (!gsrc && !want_sums) {
          for (int64_t i = 0; i < n; ++i) d[i * KP] = gemm_cvt<P>(src[i0 + i]);
          continue;
        }
        for (int64_t i = 0; i < n; ++i) {
          F v = gemm_to_float(src[i0 + i]);
          if (gsrc) v = gemm_to_float(gsrc[i0 + i]) > 0 ? v * gscale : F(0);
          if (want_sums) sums.p[i0 + i] += v;
          d[i * KP] = gemm_from<P>(v);
        }
      }
    }
    if (want_sums)
      for (int64_t i = 0; i < rows; ++i) sums_out[m0 + i] = static_cast<Acc>(sums.p[i]);
  }
}

// K is reduced in blocks of kGemmKBlock steps: each block in fresh registers, the block sums
// added into the tile's running total (in L1). One block per K slice (kGemmKSlice): blocks of 64
// kept the error of K = 2048 .. 8192 at ~0.4-0.9x MKL's, but their running total (24 zmm, in
// memory beside the 24 of the block) cost 2-4% of a forward GEMM; with 256 the error is MKL's
// (0.8-1.06x, max abs error against a float64 reference) and slices chain in `partial` as a
// blocked BLAS's do.
constexpr int64_t kGemmKBlock = 256;
// K slice kept in L1 per B panel (gemm_run_impl): 256 x 32 floats = 32 KiB on AVX-512.
constexpr int64_t kGemmKSlice = 256;

// Adds (or, for the first block, copies) the block sums into the running total.
template <typename V, int NV, int ROWS>
inline void gemm_fold(V (&tot)[ROWS][NV], const V (&blk)[ROWS][NV], bool first) {
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) tot[r][j] = first ? blk[r][j] : tot[r][j] + blk[r][j];
}

// Micro-kernel: acc[r][j] = sum_k A(r, k) * B(k, j*N .. j*N + N) over the whole (padded) K, B
// rows BS apart. `A` gives A(r, k) (at(k, r)) and prefetches ahead of k (prefetch(k)): a packed
// micro-panel (GemmPackedA) or rows read in place (GemmRowsA, the W-rows path).
template <typename V, int ROWS, int NV, int BS, typename A>
inline void gemm_micro_on(const A& a, const typename V::Scalar* __restrict b, int64_t K, V (&acc)[ROWS][NV]) {
  if (K == 0) {
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = V::zero();
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kGemmKBlock) {
    const int64_t k1 = K - k0 < kGemmKBlock ? K : k0 + kGemmKBlock;
    V blk[ROWS][NV];
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) blk[r][j] = V::zero();
#pragma GCC unroll 2
    for (int64_t k = k0; k < k1; ++k) {
      a.prefetch(k);
      V bv[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) bv[j] = V::load(b + k * BS + j * V::N);
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
        const V av = V::set1(a.at(k, r));
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) blk[r][j] = V::fma(av, bv[j], blk[r][j]);
      }
    }
    gemm_fold<V, NV, ROWS>(acc, blk, k0 == 0);
  }
}

// A packed micro-panel of MR rows: A(r, k) at a[k * MR + r], streamed from L2.
template <typename S, int MR>
struct GemmPackedA {
  const S* __restrict a;
  S at(int64_t k, int r) const { return a[k * MR + r]; }
  void prefetch(int64_t k) const { __builtin_prefetch(a + (k + 12) * MR); }
};

// Rows read in place: A(r, k) at rows[r][k] (the hardware prefetcher follows each row), against a
// B panel (row stride bs, at most 32 floats a row) that streams from L2 and is fetched 16 k ahead
// (+15% at K = 512 in the W-rows path).
template <typename S, int ROWS>
struct GemmRowsA {
  const S* const* rows;
  const S* b;
  int64_t bs;
  S at(int64_t k, int r) const { return rows[r][k]; }
  void prefetch(int64_t k) const {
    __builtin_prefetch(b + (k + 16) * bs);
    __builtin_prefetch(b + (k + 16) * bs + 64 / sizeof(S));
  }
};

template <typename V, int MR, int NV, int ROWS>
inline void gemm_micro(const typename V::Scalar* __restrict a, const typename V::Scalar* __restrict b,
                       int64_t K, V (&acc)[ROWS][NV]) {
  gemm_micro_on<V, ROWS, NV, NV * V::N>(GemmPackedA<typename V::Scalar, MR>{a}, b, K, acc);
}

#ifdef AIAYN_GEMM_BF16_DOT
// bf16 micro-kernel on vdpbf16ps: each 32-bit lane holds the pair (k, k + 1), Kp / 2 steps.
template <int MR, int ROWS>
inline void gemm_micro_bf16(const uint16_t* __restrict a, const uint16_t* __restrict b, int64_t Kp,
                            Vec (&acc)[ROWS][2]) {
  const int64_t steps = Kp / 2;
  if (steps == 0) {
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = Vec::zero();
    return;
  }
  for (int64_t s0 = 0; s0 < steps; s0 += kGemmKBlock / 2) {
    const int64_t s1 = steps - s0 < kGemmKBlock / 2 ? steps : s0 + kGemmKBlock / 2;
    Vec blk[ROWS][2];
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) blk[r][0] = blk[r][1] = Vec::zero();
#pragma GCC unroll 2
    for (int64_t s = s0; s < s1; ++s) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + s * 64);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + s * 64 + 32);
      const uint16_t* ap = a + s * 2 * MR;
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
        int32_t pair;
        std::memcpy(&pair, ap + 2 * r, sizeof pair);
        const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
        blk[r][0].v = _mm512_dpbf16_ps(blk[r][0].v, av, b0);
        blk[r][1].v = _mm512_dpbf16_ps(blk[r][1].v, av, b1);
      }
    }
    gemm_fold<Vec, 2, ROWS>(acc, blk, s0 == 0);
  }
}
#endif

// The epilogue on a finished tile: rows m0 .. m0 + ROWS, columns n0 .. n0 + nn (nn <= NV * N).
template <typename V, typename T, int NV, int ROWS>
inline void gemm_epilogue(const GemmArgs& g, V (&acc)[ROWS][NV], int64_t m0, int64_t n0, int nn) {
  using S = typename V::Scalar;
  constexpr int N = V::N;
  const S* bias = static_cast<const S*>(g.bias);
  V bv[NV];
  if (bias) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const int valid = nn - j * N;
      bv[j] = valid >= N ? V::load(bias + n0 + j * N) : valid > 0 ? V::load_partial(bias + n0 + j * N, valid) : V::zero();
    }
  }
  const bool drop = g.dropout.enabled;
  const V dscale = V::set1(static_cast<S>(g.dropout_scale));
  const V gscale = V::set1(static_cast<S>(g.c_gate_scale));
  const T* cgate = static_cast<const T*>(g.c_gate);
  T* c = static_cast<T*>(g.c);
  // Keep-bits of the tile's rows, two rows per Philox pass where each row's span is 32 elements
  // starting on a counter (4 elements): a row alone would fill 16 lanes and use half. The passes
  // are independent, so the out-of-order core overlaps their 10 dependent rounds.
  uint64_t paired[ROWS];
  const bool pairs = drop && ROWS >= 2 && nn <= 32 && g.N % 4 == 0 && n0 % 4 == 0;
  if (pairs) {
    for (int r = 0; r < ROWS; r += 2) {
      const int64_t e0 = (m0 + r) * g.N + n0, e1 = r + 1 < ROWS ? e0 + g.N : e0;
      const uint64_t b = PhiloxLanes::keep_bits_8x2(g.dropout, static_cast<uint64_t>(e0) >> 2,
                                                   static_cast<uint64_t>(e1) >> 2);
      paired[r] = b & 0xFFFFFFFFu;
      if (r + 1 < ROWS) paired[r + 1] = b >> 32;
    }
  }
#pragma GCC unroll 1
  for (int r = 0; r < ROWS; ++r) {
    const int64_t m = m0 + r;
    uint64_t bits[4];
    int64_t bit0 = 0;
    if (pairs) bits[0] = paired[r];
    else if (drop) bit0 = fill_keep_bits(g.dropout, m * g.N + n0, m * g.N + n0 + nn, bits);
    T* crow = c + m * g.c_rs + n0;
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const int valid = nn - j * N;
      if (valid <= 0) break;
      V v = acc[r][j];
      if (bias) v = v + bv[j];
      if (g.relu) v = v.relu();
      if (drop) v = V::keep(extract_bits(bits, bit0 + j * N, N), v) * dscale;
      if (cgate) {
        const T* gp = cgate + m * g.c_gate_rs + n0 + j * N;
        const V gv = valid >= N ? V::load(gp) : V::load_partial(gp, valid);
        v = V::where_positive(gv, v * gscale);
      }
      if constexpr (std::is_same_v<T, uint16_t>) {
        if (g.c_f32) {
          float* cf = static_cast<float*>(g.c) + m * g.c_rs + n0 + j * N;
          if (valid >= N)
            v.store(cf);
          else
            v.store_partial(cf, valid);
          continue;
        }
      }
      if (valid >= N)
        v.store(crow + j * N);
      else
        v.store_partial(crow + j * N, valid);
    }
  }
}

#ifdef AIAYN_AMX_TILES
// --- bf16 on Intel AMX (tdpbf16ps) ---
//
// A C block of 32 x 32 float32 is 4 accumulator tiles (tmm0..3, 16 x 16 each) over the whole K:
// per 32-k step, two A tiles (tmm4, tmm5: 16 rows x 32 bf16 each) and two B tiles (tmm6, tmm7:
// 16 k-pairs x 16 columns x 2) feed 4 tdpbf16ps. Layouts (K padded to Kp = round_up(K, 32)):
// - B: panels of 32 columns in k-pairs, (k, j) at (k / 2) * 64 + j * 2 + k % 2 (vdpbf16ps's
//   layout with NR = 32): a B tile is 16 pair rows of 64 bytes at stride 128, columns 16..31 at
//   +64 bytes;
// - A: micro-panels of 16 rows, each 32-k block a contiguous 16 x 32 tile (gemm_pack_a with
//   MR = 16, KP = 32).
// The finished tiles are stored to a 32 x 32 float buffer and go row by row through the same
// epilogue as every other path (so the dropout numbering is the same). Each output's k order is
// fixed by K alone (32-k steps in order), so neither the task split nor the thread count changes
// a result. Tile registers are configured at the start of each call (per thread: the
// configuration is thread state) and released at its end.
constexpr int kAmxMR = 16, kAmxNR = 32, kAmxKP = 32;

// The 16 (TWO: 32) rows x 32 columns of C from A micro-panel(s) a0 (a1) and a B panel.
template <bool TWO>
inline void gemm_amx_block(const uint16_t* a0, const uint16_t* a1, const uint16_t* b, int64_t Kp,
                           float (*out)[kAmxNR]) {
  _tile_zero(0);
  _tile_zero(1);
  if (TWO) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kb = 0; kb < Kp / kAmxKP; ++kb) {
    // Each product issued as soon as its operands are loaded (~5% over loading all four first).
    const uint16_t* bk = b + kb * kAmxKP * kAmxNR;
    _tile_loadd(4, a0 + kb * kAmxMR * kAmxKP, 64);
    _tile_loadd(6, bk, 128);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, bk + 32, 128);
    _tile_dpbf16ps(1, 4, 7);
    if (TWO) {
      _tile_loadd(5, a1 + kb * kAmxMR * kAmxKP, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, &out[0][0], kAmxNR * sizeof(float));
  _tile_stored(1, &out[0][16], kAmxNR * sizeof(float));
  if (TWO) {
    _tile_stored(2, &out[16][0], kAmxNR * sizeof(float));
    _tile_stored(3, &out[16][16], kAmxNR * sizeof(float));
  }
  amx_barrier();
}

// One task: rows [m0, m1) x panels [p0, p1) of 32 columns.
inline void gemm_run_amx(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t Kp = gemm_round_up(g.K, kAmxKP), rows = m1 - m0;
  const bool sums = g.a_row_sums != nullptr && p0 == 0;
  if (rows <= 0 || (p1 <= p0 && !sums)) return;
  const int64_t panels = (rows + kAmxMR - 1) / kAmxMR;
  Buffer<uint16_t> ap(panels * Kp * kAmxMR);
  gemm_pack_a<uint16_t, uint16_t, float, kAmxMR, kAmxKP>(g, m0, rows, ap.data(), sums);
  if (p1 <= p0) return;
  amx_configure();
  const uint16_t* bpacked = static_cast<const uint16_t*>(g.packed_b);
  alignas(64) float tile[2 * kAmxMR][kAmxNR];
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* bp = bpacked + (p - g.b_first_panel) * (g.b_panel_stride ? g.b_panel_stride : Kp * kAmxNR);
    const int64_t n0 = p * kAmxNR;
    const int nn = static_cast<int>(g.N - n0 < kAmxNR ? g.N - n0 : kAmxNR);
    for (int64_t q = 0; q < panels; q += 2) {
      const uint16_t* a0 = ap.data() + q * Kp * kAmxMR;
      const bool two = q + 1 < panels;
      if (two)
        gemm_amx_block<true>(a0, a0 + Kp * kAmxMR, bp, Kp, tile);
      else
        gemm_amx_block<false>(a0, a0, bp, Kp, tile);
      const int64_t r_end = rows - q * kAmxMR < 2 * kAmxMR ? rows - q * kAmxMR : 2 * kAmxMR;
      // Rows in pairs: the epilogue's dropout draws two rows' keep-bits per Philox pass.
      int64_t r = 0;
      for (; r + 1 < r_end; r += 2) {
        Vec acc[2][2] = {{Vec::load(tile[r]), Vec::load(tile[r] + 16)}, {Vec::load(tile[r + 1]), Vec::load(tile[r + 1] + 16)}};
        gemm_epilogue<Vec, uint16_t, 2, 2>(g, acc, m0 + q * kAmxMR + r, n0, nn);
      }
      if (r < r_end) {
        Vec acc[1][2] = {{Vec::load(tile[r]), Vec::load(tile[r] + 16)}};
        gemm_epilogue<Vec, uint16_t, 2, 1>(g, acc, m0 + q * kAmxMR + r, n0, nn);
      }
    }
  }
  _tile_release();
}
#endif

// Calls f(std::integral_constant<int, rows>) for 1 <= rows <= R.
template <int R, typename F>
inline void gemm_dispatch_rows(int rows, F&& f) {
  if constexpr (R >= 1) {
    if (rows == R)
      f(std::integral_constant<int, R>{});
    else
      gemm_dispatch_rows<R - 1>(rows, f);
  }
}

// One task: rows [m0, m1) x panels [p0, p1). V: accumulator vector, T: storage, P: packed.
template <typename V, typename T, typename P, int MR, int NV, int KP>
void gemm_run_impl(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  using S = typename V::Scalar;
  constexpr int NR = NV * V::N;
  const int64_t K = g.K, Kp = gemm_round_up(K, KP);
  const int64_t rows = m1 - m0;
  const bool sums = g.a_row_sums != nullptr && p0 == 0;
  if (rows <= 0 || (p1 <= p0 && !sums)) return;
  const int64_t panels = (rows + MR - 1) / MR;
  const bool prepacked = g.packed_a != nullptr && !sums;
  Buffer<P> ap(prepacked ? 1 : panels * Kp * MR);
  const P* apacked = ap.data();
  if (prepacked)
    apacked = static_cast<const P*>(g.packed_a) + m0 / MR * Kp * MR;
  else
    gemm_pack_a<T, P, S, MR, KP>(g, m0, rows, ap.data(), sums);
  const P* bpacked = static_cast<const P*>(g.packed_b);
  // K in L1-sized slices: a slice of the B panel (kGemmKSlice x NR) stays in L1 while every
  // micro-panel of the task's rows runs over it; the tile's partial sums of earlier slices wait in
  // `partial` (MC x NR floats, L1/L2). The last slice adds them to the registers and runs the
  // epilogue there. Short K (<= 1.5 slices) runs in one slice.
  const int64_t slice = Kp <= kGemmKSlice + kGemmKSlice / 2 ? Kp : kGemmKSlice;
  Buffer<S> partial(slice < Kp ? panels * MR * NR : 1);
  for (int64_t p = p0; p < p1; ++p) {
    const P* bp = bpacked + (p - g.b_first_panel) * (g.b_panel_stride ? g.b_panel_stride : Kp * NR);
    const int64_t n0 = p * NR;
    const int nn = static_cast<int>(g.N - n0 < NR ? g.N - n0 : NR);
    for (int64_t kb = 0; kb < Kp || kb == 0; kb += slice) {
      const int64_t kn = Kp - kb < slice ? Kp - kb : slice;
      const bool first = kb == 0, last = kb + kn >= Kp;
      for (int64_t q = 0; q < panels; ++q) {
        const int r = static_cast<int>(rows - q * MR < MR ? rows - q * MR : MR);
        const P* aq = apacked + q * Kp * MR + kb * MR;
        S* part = partial.data() + q * MR * NR;
        gemm_dispatch_rows<MR>(r, [&](auto rows_c) {
          constexpr int R = decltype(rows_c)::value;
          V acc[R][NV];
#ifdef AIAYN_GEMM_BF16_DOT
          if constexpr (KP == 2)
            gemm_micro_bf16<MR, R>(aq, bp + kb * NR, kn, acc);
          else
#endif
            gemm_micro<V, MR, NV, R>(aq, bp + kb * NR, kn, acc);
          if (!last) {
#pragma GCC unroll 16
            for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
              for (int j = 0; j < NV; ++j) {
                S* c = part + i * NR + j * V::N;
                (first ? acc[i][j] : acc[i][j] + V::load(c)).store(c);
              }
            return;
          }
          if (!first) {
#pragma GCC unroll 16
            for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
              for (int j = 0; j < NV; ++j) acc[i][j] = acc[i][j] + V::load(part + i * NR + j * V::N);
          }
          gemm_epilogue<V, T, NV, R>(g, acc, m0 + q * MR, n0, nn);
        });
      }
      if (kn == 0) break;
    }
  }
}

// Dot-product path for few rows of A (decoding, small batches): C = A W^T straight from W's
// (N x K) rows, nothing packed. Packing W costs about as much as the whole product when M is
// small, and a packed weight is only reused within one call. A tile is R = 2 rows of A x C rows
// of W, R * C vector accumulators over k (lane l sums k = l, l + N, ...), reduced across lanes at
// the end by Vec::sum_lanes (N sums per call) into a CB-column tile that goes through the same
// epilogue as the packed path. Loop order: a group of CB rows of W (CB x K, in L1 for K <= 512)
// against every row pair of A (from L2). Each output's sum order depends only on K and the ISA,
// never on the task split (groups and row pairs start at fixed multiples).
template <typename V>
struct GemmDotTile {
  static constexpr int R = 2;
  static constexpr int C = V::N >= 8 ? V::N / 2 : 4;  // R * C accumulators: a multiple of N
  static constexpr int CB = V::N > C ? V::N : C;      // columns per group: whole vectors
  static constexpr int NV = CB / V::N;
};
// k block of the dot-product path, in vectors: C rows of W x 64 vectors = 32 KiB on AVX-512 (L1).
constexpr int64_t kGemmDotBlock = 64;

// blk[r * C + c] = sum over k in [k0, k1) of A(r, k) * W(c, k): one block (at most kGemmDotBlock
// vectors) of the two-level sum of gemm_dot_run.
template <typename V, typename T, int C>
inline void gemm_dot_block(const T* __restrict a0, const T* __restrict a1, const T* const* w, int64_t k0, int64_t k1,
                           V (&blk)[2 * C]) {
  constexpr int N = V::N;
#pragma GCC unroll 16
  for (int i = 0; i < 2 * C; ++i) blk[i] = V::zero();
  int64_t k = k0;
#pragma GCC unroll 2
  for (; k + N <= k1; k += N) {
    const V x0 = V::load(a0 + k), x1 = V::load(a1 + k);
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      V wc = V::load(w[c] + k);
      // One load per W vector: left alone, GCC folds it into both FMAs as a memory operand
      // (two loads), and the loop becomes load-bound.
      asm("" : "+v"(wc.v));
      blk[c] = V::fma(x0, wc, blk[c]);
      blk[C + c] = V::fma(x1, wc, blk[C + c]);
    }
  }
  if (k < k1) {
    const int n = static_cast<int>(k1 - k);
    const V x0 = V::load_partial(a0 + k, n), x1 = V::load_partial(a1 + k, n);
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const V wc = V::load_partial(w[c] + k, n);
      blk[c] = V::fma(x0, wc, blk[c]);
      blk[C + c] = V::fma(x1, wc, blk[C + c]);
    }
  }
}

// One task of the dot-product path: rows [m0, m1) x column groups [p0, p1) of dot_nr = CB.
// Each (row pair, C rows of W) tile sums over k in blocks of kGemmDotBlock vectors, the block sums
// added in order (two-level, as in gemm_micro), then reduced across lanes. Loop order: C rows of W,
// one k block of them (C x 1024 floats = 32 KiB on AVX-512, in L1), every row pair; the tiles'
// running sums wait in `state` between blocks. So W is read from L2 once per k block whatever K is
// (the whole rows of W, 8 KiB each at K = 2048, would not stay in L1 across row pairs). The sum
// order depends only on K and the ISA, never on the task split or the loop order.
template <typename V, typename T>
void gemm_dot_run(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  using S = typename V::Scalar;
  using D = GemmDotTile<V>;
  constexpr int N = V::N, C = D::C, CB = D::CB, NV = D::NV, kSums = 2 * C / N;
  constexpr int64_t kBlock = kGemmDotBlock * N;
  const T* a = static_cast<const T*>(g.a);
  const T* w = static_cast<const T*>(g.b_rows);
  const int64_t K = g.K, pairs = (m1 - m0 + 1) / 2;
  Buffer<S> tiles(pairs * 2 * CB);                            // (pair, row, column): finished dot products
  Buffer<S> state(K > kBlock ? pairs * 2 * C * N : 1);        // (pair, accumulator, lane): running sums
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * CB;
    const int nn = static_cast<int>(g.N - n0 < CB ? g.N - n0 : CB);
    const T* wr[CB];
    for (int j = 0; j < CB; ++j) wr[j] = w + (n0 + (j < nn ? j : 0)) * g.b_rows_rs;
    for (int sub = 0; sub < CB / C; ++sub) {
      for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kBlock) {
        const int64_t k1 = K - k0 < kBlock ? K : k0 + kBlock;
        const bool first = k0 == 0, last = k1 >= K;
        for (int64_t pr = 0; pr < pairs; ++pr) {
          const int64_t m = m0 + 2 * pr;
          const T* a0 = a + m * g.a_rs;
          const T* a1 = m + 1 < m1 ? a0 + g.a_rs : a0;
          V acc[2 * C];
          gemm_dot_block<V, T, C>(a0, a1, wr + sub * C, k0, k1, acc);
          S* st = state.data() + pr * 2 * C * N;
          if (!first) {
#pragma GCC unroll 16
            for (int i = 0; i < 2 * C; ++i) acc[i] = V::load(st + i * N) + acc[i];
          }
          if (!last) {
#pragma GCC unroll 16
            for (int i = 0; i < 2 * C; ++i) acc[i].store(st + i * N);
            continue;
          }
          S* tile = tiles.data() + pr * 2 * CB;
          for (int q = 0; q < kSums; ++q) {
            alignas(64) S lanes[N];
            V::sum_lanes(acc + q * N).store(lanes);
            for (int l = 0; l < N; ++l) {
              const int i = q * N + l;
              tile[(i / C) * CB + sub * C + i % C] = lanes[l];
            }
          }
        }
        if (K == 0) break;
      }
    }
    for (int64_t pr = 0; pr < pairs; ++pr) {
      const int64_t m = m0 + 2 * pr;
      const S* tile = tiles.data() + pr * 2 * CB;
      V out[2][NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        out[0][j] = V::load(tile + j * N);
        out[1][j] = V::load(tile + CB + j * N);
      }
      if (m + 1 < m1) {
        gemm_epilogue<V, T, NV, 2>(g, out, m, n0, nn);
      } else {
        V one[1][NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) one[0][j] = out[0][j];
        gemm_epilogue<V, T, NV, 1>(g, one, m, n0, nn);
      }
    }
  }
}

// Rows path on W's rows (float32; gemm.cpp picks it for a few tens of rows of A, where it ran
// ~1.5x faster than the dot-product path): C^T = W A^T on the packed micro-kernel with the roles
// swapped. A^T is packed as B panels of NR rows of A (small: M x K), and MR rows of W are read in
// place as the broadcast operand, so W, the large operand, is neither packed nor transposed. A
// tile is MR columns of C (rows of W) x NR rows of C (a last panel of at most N rows runs as a
// half tile); it is transposed through a small buffer into rows of C for the common epilogue.
// Each output's k order is gemm_micro's (two-level, kGemmKBlock), fixed by K alone.
template <typename V>
void gemm_wrows_run(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  using S = typename V::Scalar;
  constexpr int MR = GemmTile<V>::MR, NV = GemmTile<V>::NV, NR = GemmTile<V>::NR, N = V::N;
  constexpr int NE = (MR + N - 1) / N;  // vectors per row of a transposed tile
  constexpr int MRP = NE * N;
  constexpr int ER = 8;                 // rows per epilogue call
  const int64_t K = g.K, rows = m1 - m0;
  if (rows <= 0 || p1 <= p0) return;
  const int64_t mpanels = (rows + NR - 1) / NR;
  // A^T as B panels: B(k, i) = A(m0 + i, k).
  Buffer<S> apack(mpanels * K * NR + 1);
  const GemmPackB pb{DType::f32, Bf16Gemm::widened, K, rows, static_cast<const S*>(g.a) + m0 * g.a_rs, 1, g.a_rs};
  gemm_pack_b_impl<S, S, NR, 1>(pb, 0, mpanels, apack.data());
  const S* w = static_cast<const S*>(g.b_rows);
  // tile[r][i]: the tile as computed (rows MR .. MRP zero); rowt[i][r]: transposed, one row of C
  // per i, in whole vectors (the transpose was ~25% of the time at K = 512 done element-wise).
  alignas(64) S tile[MRP][NR] = {};
  alignas(64) S rowt[NR][MRP];
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * MR;
    const int nn = static_cast<int>(g.N - n0 < MR ? g.N - n0 : MR);
    const S* wr[MR];
    for (int r = 0; r < MR; ++r) wr[r] = w + (n0 + (r < nn ? r : 0)) * g.b_rows_rs;
    for (int64_t q = 0; q < mpanels; ++q) {
      const int mm = static_cast<int>(rows - q * NR < NR ? rows - q * NR : NR);
      const bool half = NV > 1 && mm <= N;
      const S* bq = apack.data() + q * K * NR;
      if (half) {
        V acc[MR][1];
        gemm_micro_on<V, MR, 1, NR>(GemmRowsA<S, MR>{wr, bq, NR}, bq, K, acc);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) acc[r][0].store(&tile[r][0]);
      } else {
        V acc[MR][NV];
        gemm_micro_on<V, MR, NV, NR>(GemmRowsA<S, MR>{wr, bq, NR}, bq, K, acc);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
          for (int j = 0; j < NV; ++j) acc[r][j].store(&tile[r][j * N]);
      }
      for (int j = 0; j < (half ? 1 : NV); ++j)
        for (int rb = 0; rb < NE; ++rb) V::transpose(&tile[rb * N][j * N], NR, &rowt[j * N][rb * N], MRP);
      for (int i0 = 0; i0 < mm; i0 += ER) {
        const int64_t m = m0 + q * NR + i0;
        gemm_dispatch_rows<ER>(mm - i0 < ER ? mm - i0 : ER, [&](auto rows_c) {
          constexpr int R = decltype(rows_c)::value;
          V e[R][NE];
          for (int i = 0; i < R; ++i)
            for (int j = 0; j < NE; ++j) e[i][j] = V::load(&rowt[i0 + i][j * N]);
          gemm_epilogue<V, S, NE, R>(g, e, m, n0, nn);
        });
      }
    }
  }
}

// GemmArgs::packed_a for float32: rows [m0, m1) of A in gemm_run_impl's micro-panel layout.
inline void gemm_pack_a_f32(const GemmArgs& g, int64_t m0, int64_t m1, void* packed) {
  constexpr int MR = GemmTile<Vec>::MR;
  float* out = static_cast<float*>(packed) + m0 / MR * g.K * MR;
  if (m1 > m0) gemm_pack_a<float, float, float, MR, 1>(g, m0, m1 - m0, out, false);
}

// The packed layout of each dtype on this ISA.
template <typename V, int KP, typename P>
constexpr GemmInfo gemm_info_of() {
  return GemmInfo{GemmTile<V>::MR, GemmTile<V>::NR, KP, static_cast<int>(sizeof(P)), GemmDotTile<V>::CB};
}

using GemmF64 = ScalarVec<double>;

inline GemmInfo gemm_info(DType dtype, Bf16Gemm bf16) {
  switch (dtype) {
    case DType::f32: return gemm_info_of<Vec, 1, float>();
    case DType::bf16:
#ifdef AIAYN_AMX_TILES
      if (bf16 == Bf16Gemm::amx) return GemmInfo{kAmxMR, kAmxNR, kAmxKP, 2, GemmDotTile<Vec>::CB};
#endif
#ifdef AIAYN_GEMM_BF16_DOT
      if (bf16 == Bf16Gemm::dot) return gemm_info_of<Vec, 2, uint16_t>();
#endif
      (void)bf16;
      return gemm_info_of<Vec, 1, float>();
    case DType::f64: return gemm_info_of<GemmF64, 1, double>();
  }
  return GemmInfo{};
}

inline void gemm_pack_b(const GemmPackB& b, int64_t p0, int64_t p1, void* packed) {
  switch (b.dtype) {
    case DType::f32:
      gemm_pack_b_impl<float, float, GemmTile<Vec>::NR, 1>(b, p0, p1, static_cast<float*>(packed));
      break;
    case DType::bf16:
#ifdef AIAYN_AMX_TILES
      if (b.bf16 == Bf16Gemm::amx) {
        gemm_pack_b_impl<uint16_t, uint16_t, kAmxNR, 2, kAmxKP>(b, p0, p1, static_cast<uint16_t*>(packed));
        break;
      }
#endif
#ifdef AIAYN_GEMM_BF16_DOT
      if (b.bf16 == Bf16Gemm::dot) {
        gemm_pack_b_impl<uint16_t, uint16_t, GemmTile<Vec>::NR, 2>(b, p0, p1, static_cast<uint16_t*>(packed));
        break;
      }
#endif
      gemm_pack_b_impl<uint16_t, float, GemmTile<Vec>::NR, 1>(b, p0, p1, static_cast<float*>(packed));
      break;
    case DType::f64:
      gemm_pack_b_impl<double, double, GemmTile<GemmF64>::NR, 1>(b, p0, p1, static_cast<double*>(packed));
      break;
  }
}

inline void gemm_run(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (g.b_rows) {
    switch (g.dtype) {
      case DType::f32:
        if (g.b_rows_bcast)
          gemm_wrows_run<Vec>(g, m0, m1, p0, p1);
        else
          gemm_dot_run<Vec, float>(g, m0, m1, p0, p1);
        break;
      case DType::bf16: gemm_dot_run<Vec, uint16_t>(g, m0, m1, p0, p1); break;
      case DType::f64: gemm_dot_run<GemmF64, double>(g, m0, m1, p0, p1); break;
    }
    return;
  }
  switch (g.dtype) {
    case DType::f32:
      gemm_run_impl<Vec, float, float, GemmTile<Vec>::MR, GemmTile<Vec>::NV, 1>(g, m0, m1, p0, p1);
      break;
    case DType::bf16:
#ifdef AIAYN_AMX_TILES
      if (g.bf16 == Bf16Gemm::amx) {
        gemm_run_amx(g, m0, m1, p0, p1);
        break;
      }
#endif
#ifdef AIAYN_GEMM_BF16_DOT
      if (g.bf16 == Bf16Gemm::dot) {
        gemm_run_impl<Vec, uint16_t, uint16_t, GemmTile<Vec>::MR, GemmTile<Vec>::NV, 2>(g, m0, m1, p0, p1);
        break;
      }
#endif
      gemm_run_impl<Vec, uint16_t, float, GemmTile<Vec>::MR, GemmTile<Vec>::NV, 1>(g, m0, m1, p0, p1);
      break;
    case DType::f64:
      gemm_run_impl<GemmF64, double, double, GemmTile<GemmF64>::MR, GemmTile<GemmF64>::NV, 1>(g, m0, m1, p0, p1);
      break;
  }
}
