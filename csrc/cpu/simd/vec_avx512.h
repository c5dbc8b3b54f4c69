// 16 float lanes in a zmm register (AVX-512F/BW/VL). Same interface as ScalarVec (vec_scalar.h).
// Included inside namespace aiayn::cpu::avx512 by isa/avx512.cpp, under its target pragma.

// r[i][j] <- r[j][i]: a 16 x 16 float block transposed in registers (unpacks within 128-bit lanes,
// then two rounds of 128-bit lane shuffles): Vec::transpose, and the bf16 GEMM packers on 32-bit
// pairs (shuffles move bits, so any 32-bit payload transposes exactly).
inline void transpose16x16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  const auto lo = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  const auto hi = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = lo(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = hi(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = lo(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = hi(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

struct Vec {
  using Scalar = float;
  static constexpr int N = 16;
  __m512 v;
  // Register tiling of small matrix products (attention_gemm.h): a kTileR x kTileNV block of
  // accumulators, and kStripR rows for one-vector column strips.
  static constexpr int kTileNV = 4, kTileR = 6, kStripR = 8;
  // Rows of a tile of `nv` column vectors: as many as the 32 registers hold (nv + 1 for operands).
  static constexpr int rows_for(int nv) { return nv >= 4 ? 6 : 8; }

  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec set1(float s) { return {_mm512_set1_ps(s)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  static Vec load_partial(const float* p, int n) { return {_mm512_maskz_loadu_ps(tail(n), p)}; }
  // The 16 x 16 block at src (row stride ls) transposed into dst (row stride ld). The loads do
  // the 128-bit lane moves: z[k] holds chunk c (columns 4c..4c+3) of rows k, 4 + k, 8 + k,
  // 12 + k in its four lanes (a load and three inserts from memory, which issue on either vector
  // ALU port), so only the 4 x 4 transposes within lanes are shuffles (32 on the shuffle port
  // against 64 for transpose16x16), and each chunk of columns needs 8 registers, not 32 (no spills).
  static void transpose(const float* src, int64_t ls, float* dst, int64_t ld) {
    for (int c = 0; c < 4; ++c) {
      __m512 z[4];
      for (int k = 0; k < 4; ++k) {
        const float* p = src + k * ls + 4 * c;
        __m512 x = _mm512_castps128_ps512(_mm_loadu_ps(p));
        x = _mm512_insertf32x4(x, _mm_loadu_ps(p + 4 * ls), 1);
        x = _mm512_insertf32x4(x, _mm_loadu_ps(p + 8 * ls), 2);
        z[k] = _mm512_insertf32x4(x, _mm_loadu_ps(p + 12 * ls), 3);
      }
      const __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(z[0], z[1]));
      const __m512d t1 = _mm512_castps_pd(_mm512_unpackhi_ps(z[0], z[1]));
      const __m512d t2 = _mm512_castps_pd(_mm512_unpacklo_ps(z[2], z[3]));
      const __m512d t3 = _mm512_castps_pd(_mm512_unpackhi_ps(z[2], z[3]));
      float* o = dst + 4 * c * ld;
      _mm512_storeu_ps(o, _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2)));
      _mm512_storeu_ps(o + ld, _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2)));
      _mm512_storeu_ps(o + 2 * ld, _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3)));
      _mm512_storeu_ps(o + 3 * ld, _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3)));
    }
  }
  static Vec load_partial(const uint16_t* p, int n) {
    const __m256i h = _mm256_maskz_loadu_epi16(tail(n), p);
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(uint16_t* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16());
  }
  void store_partial(float* p, int n) const { _mm512_mask_storeu_ps(p, tail(n), v); }
  void store_partial(uint16_t* p, int n) const { _mm256_mask_storeu_epi16(p, tail(n), to_bf16()); }

  Vec operator+(Vec b) const { return {_mm512_add_ps(v, b.v)}; }
  Vec operator-(Vec b) const { return {_mm512_sub_ps(v, b.v)}; }
  Vec operator*(Vec b) const { return {_mm512_mul_ps(v, b.v)}; }
  Vec operator/(Vec b) const { return {_mm512_div_ps(v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec keep(uint64_t bits, Vec a) {
    return {_mm512_maskz_mov_ps(static_cast<__mmask16>(bits), a.v)};
  }
  Vec relu() const { return {_mm512_max_ps(_mm512_setzero_ps(), v)}; }  // NaN stays NaN
  // Lanes of `a` where `m` > 0, 0 elsewhere (NaN in m gives 0).
  static Vec where_positive(Vec m, Vec a) {
    return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m.v, _mm512_setzero_ps(), _CMP_GT_OQ), a.v)};
  }
  static Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  // Every lane of a equal to b's (ordered: a NaN lane is unequal).
  static bool all_equal(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ) == 0xFFFF; }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  // Lane i = the sum of a[i]'s lanes, for 16 vectors at once (the horizontal sums of the GEMM's
  // dot-product path): four levels of shuffle + add, ~2 instructions per sum. Every lane is
  // summed by the same tree, ((q0 + q2) + (q1 + q3)) over 128-bit quarters, then pairs, so a sum
  // does not depend on which lane it lands in.
  static Vec sum_lanes(const Vec* a) {
    __m512 b[16], c[4];
    for (int j = 0; j < 8; ++j) {  // halves: a[i] | a[i + 4], 8 partials each
      const int i = j < 4 ? j : j + 4;
      b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i].v, a[i + 4].v, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_f32x4(a[i].v, a[i + 4].v, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    for (int i = 0; i < 4; ++i)  // quarters: a[i], a[i + 4], a[i + 8], a[i + 12], 4 partials each
      c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 8], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(b[i], b[i + 8], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 d0 = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 d1 = _mm512_add_ps(_mm512_shuffle_ps(c[2], c[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(c[2], c[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return {_mm512_add_ps(_mm512_shuffle_ps(d0, d1, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_ps(d0, d1, _MM_SHUFFLE(3, 1, 3, 1)))};
  }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
  // (m + log2 l) ln 2 computed in float64, for l > 0 (NaN stays NaN): the log-sum-exps of 16
  // softmax rows at once, where a libm log2 per row cost a call and its zmm spills.
  static Vec log_sum_exp(Vec m, Vec l) {
    const auto half = [](__m256 m8, __m256 l8) {
      const __m512d sum = _mm512_add_pd(_mm512_cvtps_pd(m8), log2_pd(_mm512_cvtps_pd(l8)));
      return _mm512_cvtpd_ps(_mm512_mul_pd(sum, _mm512_set1_pd(kLn2)));
    };
    const __m256 lo = half(_mm512_castps512_ps256(m.v), _mm512_castps512_ps256(l.v));
    const __m256 hi = half(_mm512_extractf32x8_ps(m.v, 1), _mm512_extractf32x8_ps(l.v, 1));
    return {_mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1)};
  }
  // log2 x for x > 0 (NaN stays NaN): x = 2^e t with t in [0.75, 1.5) (vgetmantpd; vgetexppd
  // gives the exponent of x's [1, 2) mantissa, one less where t < 1), then the atanh series.
  static __m512d log2_pd(__m512d x) {
    const __m512d one = _mm512_set1_pd(1.0);
    const __m512d t = _mm512_getmant_pd(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
    __m512d e = _mm512_getexp_pd(x);
    e = _mm512_mask_add_pd(e, _mm512_cmp_pd_mask(t, one, _CMP_LT_OQ), e, one);
    const __m512d u = _mm512_div_pd(_mm512_sub_pd(t, one), _mm512_add_pd(t, one));
    const __m512d u2 = _mm512_mul_pd(u, u);
    __m512d p = _mm512_set1_pd(kAtanhSeries[9]);
    for (int k = 8; k >= 0; --k) p = _mm512_fmadd_pd(p, u2, _mm512_set1_pd(kAtanhSeries[k]));
    p = _mm512_fmadd_pd(p, u2, one);
    return _mm512_fmadd_pd(_mm512_mul_pd(u, p), _mm512_set1_pd(2.0 / kLn2), e);
  }
  // 2^x = 2^f * 2^floor(x): f = x - floor(x) in [0, 1] from one vreduceps, 2^f by the polynomial
  // 1 + c[0] f + ... + c[N-1] f^N (a minimax fit on [0, 1], scalar_math.h), 2^floor(x) applied by
  // vscalefps, which floors x itself.
  // Results below the normal range are 0, as on AVX2: the callers (attention_kernel.h's entry
  // points) run with MXCSR.FTZ set, under which a vscalefps that underflows (a masked score at
  // -inf, a padded key, a far smaller score) gives 0 at full speed; without FTZ it takes a
  // microcode assist of ~60 ns per vector. (An explicit mask of the lanes below 2^-125 did the
  // same at one more instruction per vector.) vreduceps and vscalefps pass NaN on, so NaN stays
  // NaN (a NaN or Inf input); -inf gives f = 0, then 0.
  template <int N>
  static __m512 exp2_poly01(__m512 x, const float (&c)[N]) {
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF);  // x - floor(x)
    __m512 p = _mm512_set1_ps(c[N - 1]);
    for (int i = N - 2; i >= 0; --i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, x);
  }
  // 2^x to ~1.7 ulp (degree 6): 9 instructions where rounding x to n (vrndscaleps, two uops on
  // scalef's port) and a degree-7 polynomial on |f| <= 1/2 took 13.
  static Vec exp2(Vec x) { return {exp2_poly01(x.v, kExp2Minimax01Deg6)}; }

 private:
  static __mmask16 tail(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  // Round to nearest even on the bits, as float_to_bf16 (scalar_math.h) does, NaN kept quiet.
  __m256i to_bf16() const {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded =
        _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x400000));
    const __m512i r = _mm512_srli_epi32(_mm512_mask_mov_epi32(rounded, nan, quiet), 16);
    return _mm512_cvtepi32_epi16(r);
  }
};

// Philox4x32-10 in 16 lanes: counters c .. c + 15 at once.
struct PhiloxLanes {
  static constexpr int N = 16;
  static uint64_t keep_bits(const DropoutParams& d, uint64_t c) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return keep_bits_from(d, _mm512_set1_epi32(static_cast<int>(c)), _mm512_set1_epi32(static_cast<int>(c >> 32)), lane);
  }
  // Counters a .. a + 7 in lanes 0-7 and b .. b + 7 in lanes 8-15: bits 0-31 are a's 32 elements,
  // bits 32-63 b's (one Philox pass for two 32-element spans).
  static uint64_t keep_bits_8x2(const DropoutParams& d, uint64_t a, uint64_t b) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i lo = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(static_cast<int>(a)), _mm512_set1_epi32(static_cast<int>(b)));
    const __m512i hi = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(static_cast<int>(a >> 32)),
                                               _mm512_set1_epi32(static_cast<int>(b >> 32)));
    return keep_bits_from(d, lo, hi, lane);
  }
  // Counters c + lane * stride in lanes 0-15 (lane * stride < 2^32): bit `lane` of out[w] is the
  // keep-bit of the lane's word w. For elements numbered row-major in rows of 4 * stride, lane =
  // row and word = one of 4 consecutive columns: the transposed attention forward's masks.
  static void keep_words_strided(const DropoutParams& d, uint64_t c, uint32_t stride, uint32_t (&out)[4]) {
    const __m512i lane = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(stride)));
    keep_words(d, _mm512_set1_epi32(static_cast<int>(c)), _mm512_set1_epi32(static_cast<int>(c >> 32)), lane, out);
  }

 private:
  // Philox of counters (base_hi : base_lo) + lane per lane, then the keep test.
  static uint64_t keep_bits_from(const DropoutParams& d, __m512i base_lo, __m512i base_hi, __m512i lane) {
    uint32_t w[4];
    keep_words(d, base_lo, base_hi, lane, w);
    // Element 4 * lane + word: spread each word's lane bits to every fourth position.
    return _pdep_u64(w[0], 0x1111111111111111ull) | _pdep_u64(w[1], 0x2222222222222222ull) |
           _pdep_u64(w[2], 0x4444444444444444ull) | _pdep_u64(w[3], 0x8888888888888888ull);
  }
  // Philox4x32-10 of counters (base_hi : base_lo) + lane per lane; out[w] bit `lane`: word w >=
  // the threshold (kept).
  static void keep_words(const DropoutParams& d, __m512i base_lo, __m512i base_hi, __m512i lane,
                         uint32_t (&out)[4]) {
    // Counter low words; a carry into the high word happens where the low word wrapped.
    const __m512i lo = _mm512_add_epi32(base_lo, lane);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(lo, base_lo);
    __m512i x0 = lo;
    __m512i x1 = _mm512_mask_add_epi32(base_hi, carry, base_hi, _mm512_set1_epi32(1));
    __m512i x2 = _mm512_set1_epi32(static_cast<int>(d.stream));
    __m512i x3 = _mm512_set1_epi32(static_cast<int>(d.stream >> 32));
    uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
    const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
    const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
    for (int r = 0; r < kPhiloxRounds; ++r) {
      if (r > 0) {
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      __m512i hi0, lo0, hi1, lo1;
      mulhilo(m0, x0, hi0, lo0);
      mulhilo(m1, x2, hi1, lo1);
      x0 = _mm512_xor_si512(_mm512_xor_si512(hi1, x1), _mm512_set1_epi32(static_cast<int>(k0)));
      x1 = lo1;
      x2 = _mm512_xor_si512(_mm512_xor_si512(hi0, x3), _mm512_set1_epi32(static_cast<int>(k1)));
      x3 = lo0;
    }
    const __m512i t = _mm512_set1_epi32(static_cast<int>(d.threshold));
    out[0] = _mm512_cmpge_epu32_mask(x0, t), out[1] = _mm512_cmpge_epu32_mask(x1, t);
    out[2] = _mm512_cmpge_epu32_mask(x2, t), out[3] = _mm512_cmpge_epu32_mask(x3, t);
  }

  // The 64-bit products of the even and the odd lanes, each half moved into place by one masked
  // vpshufd (a shift and a blend each took two instructions: 25% more per Philox round).
  static void mulhilo(__m512i m, __m512i x, __m512i& hi, __m512i& lo) {
    const __m512i even = _mm512_mul_epu32(m, x);                        // lanes 0, 2, ...
    const __m512i odd = _mm512_mul_epu32(m, _mm512_srli_epi64(x, 32));  // lanes 1, 3, ...
    hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);   // even lanes: even's high halves
    lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);   // odd lanes: odd's low halves
  }
};
