// 8 float lanes in a ymm register (AVX2 + FMA). Same interface as ScalarVec (vec_scalar.h).
// Included inside namespace aiayn::cpu::avx2 by isa/avx2.cpp, under its target pragma.

struct Vec {
  using Scalar = float;
  static constexpr int N = 8;
  __m256 v;
  // Register tiling of small matrix products (attention_gemm.h): a kTileR x kTileNV block of
  // accumulators, and kStripR rows for one-vector column strips.
  static constexpr int kTileNV = 2, kTileR = 6, kStripR = 8;
  static constexpr int rows_for(int nv) { return nv >= 2 ? 6 : 8; }  // 16 registers

  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec set1(float s) { return {_mm256_set1_ps(s)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
  }
  // The 8 x 8 block at src (row stride ls) transposed into dst (row stride ld) (vec_avx512.h).
  static void transpose(const float* src, int64_t ls, float* dst, int64_t ld) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ls);
    for (int k = 0; k < 4; ++k) {
      t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
      t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 2; ++k) {
      r[4 * k + 0] = _mm256_shuffle_ps(t[4 * k + 0], t[4 * k + 2], 0x44);
      r[4 * k + 1] = _mm256_shuffle_ps(t[4 * k + 0], t[4 * k + 2], 0xEE);
      r[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
      r[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      _mm256_storeu_ps(dst + c * ld, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
      _mm256_storeu_ps(dst + (4 + c) * ld, _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
    }
  }
  // Tails go through a small buffer: AVX2 has no 16-bit masked load/store.
  template <typename T>
  static Vec load_partial(const T* p, int n) {
    T buf[N] = {};
    std::memcpy(buf, p, sizeof(T) * n);
    return load(buf);
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(uint16_t* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16());
  }
  template <typename T>
  void store_partial(T* p, int n) const {
    T buf[N];
    store(buf);
    std::memcpy(p, buf, sizeof(T) * n);
  }

  Vec operator+(Vec b) const { return {_mm256_add_ps(v, b.v)}; }
  Vec operator-(Vec b) const { return {_mm256_sub_ps(v, b.v)}; }
  Vec operator*(Vec b) const { return {_mm256_mul_ps(v, b.v)}; }
  Vec operator/(Vec b) const { return {_mm256_div_ps(v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec keep(uint64_t bits, Vec a) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i b = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits & 0xFF)), lane_bit);
    const __m256i m = _mm256_cmpeq_epi32(b, lane_bit);
    return {_mm256_and_ps(_mm256_castsi256_ps(m), a.v)};
  }
  Vec relu() const { return {_mm256_max_ps(_mm256_setzero_ps(), v)}; }  // NaN stays NaN
  // Lanes of `a` where `m` > 0, 0 elsewhere (NaN in m gives 0).
  static Vec where_positive(Vec m, Vec a) {
    return {_mm256_and_ps(_mm256_cmp_ps(m.v, _mm256_setzero_ps(), _CMP_GT_OQ), a.v)};
  }
  static Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  static bool all_equal(Vec a, Vec b) { return _mm256_movemask_ps(_mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)) == 0xFF; }
  float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // 2^x as in vec_avx512.h; 2^n is built in the exponent bits, so results below 2^-126 (and
  // -inf) become exactly 0. NaN stays NaN (x is max_ps's second operand, which it returns for NaN).
  static Vec exp2(Vec x) {
    const __m256 t = _mm256_max_ps(_mm256_set1_ps(-127.0f), x.v);
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(kExp2C[7]);
    for (int i = 6; i >= 0; --i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C[i]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return {_mm256_mul_ps(p, _mm256_castsi256_ps(e))};
  }
  // (m + log2 l) ln 2 computed in float64, for l > 0 (NaN stays NaN): 8 rows' log-sum-exps.
  static Vec log_sum_exp(Vec m, Vec l) {
    const auto half = [](__m128 m4, __m128 l4) {
      const __m256d sum = _mm256_add_pd(_mm256_cvtps_pd(m4), log2_pd(_mm256_cvtps_pd(l4)));
      return _mm256_cvtpd_ps(_mm256_mul_pd(sum, _mm256_set1_pd(kLn2)));
    };
    const __m128 lo = half(_mm256_castps256_ps128(m.v), _mm256_castps256_ps128(l.v));
    const __m128 hi = half(_mm256_extractf128_ps(m.v, 1), _mm256_extractf128_ps(l.v, 1));
    return {_mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1)};
  }
  // log2 x for a normal x > 0 (NaN stays NaN), as vec_avx512.h's with the exponent and the
  // [1, 2) mantissa taken from the bits (the exponent field read as a double through 2^52).
  static __m256d log2_pd(__m256d x) {
    const __m256d one = _mm256_set1_pd(1.0), two52 = _mm256_set1_pd(4503599627370496.0);
    const __m256i bits = _mm256_castpd_si256(x);
    __m256d t = _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi64x(0x000FFFFFFFFFFFFFLL)),
                                                    _mm256_set1_epi64x(0x3FF0000000000000LL)));
    __m256d e = _mm256_castsi256_pd(_mm256_or_si256(_mm256_srli_epi64(bits, 52), _mm256_castpd_si256(two52)));
    e = _mm256_sub_pd(e, _mm256_add_pd(two52, _mm256_set1_pd(1023.0)));
    const __m256d big = _mm256_cmp_pd(t, _mm256_set1_pd(1.5), _CMP_GE_OQ);  // t -> t / 2 in [0.75, 1)
    t = _mm256_blendv_pd(t, _mm256_mul_pd(t, _mm256_set1_pd(0.5)), big);
    e = _mm256_add_pd(e, _mm256_and_pd(big, one));
    const __m256d u = _mm256_div_pd(_mm256_sub_pd(t, one), _mm256_add_pd(t, one));
    const __m256d u2 = _mm256_mul_pd(u, u);
    __m256d p = _mm256_set1_pd(kAtanhSeries[9]);
    for (int k = 8; k >= 0; --k) p = _mm256_fmadd_pd(p, u2, _mm256_set1_pd(kAtanhSeries[k]));
    p = _mm256_fmadd_pd(p, u2, one);
    const __m256d r = _mm256_fmadd_pd(_mm256_mul_pd(u, p), _mm256_set1_pd(2.0 / kLn2), e);
    return _mm256_blendv_pd(r, x, _mm256_cmp_pd(x, x, _CMP_UNORD_Q));
  }
  // Lane i = the sum of a[i]'s lanes, for 8 vectors at once (see vec_avx512.h).
  static Vec sum_lanes(const Vec* a) {
    __m256 b[4];
    for (int i = 0; i < 4; ++i)  // halves: a[i] | a[i + 4], 4 partials each
      b[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[i].v, a[i + 4].v, 0x20),
                           _mm256_permute2f128_ps(a[i].v, a[i + 4].v, 0x31));
    const __m256 c0 = _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm256_shuffle_ps(b[0], b[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 c1 = _mm256_add_ps(_mm256_shuffle_ps(b[2], b[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm256_shuffle_ps(b[2], b[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return {_mm256_add_ps(_mm256_shuffle_ps(c0, c1, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm256_shuffle_ps(c0, c1, _MM_SHUFFLE(3, 1, 3, 1)))};
  }
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

 private:
  __m128i to_bf16() const {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x400000));
    const __m256i r = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
    // Pack 8 x 32-bit (values < 2^16) to 8 x 16-bit, in order.
    const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit half: lanes 0-3, 0-3
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  }
};

// Philox4x32-10 in 8 lanes: counters c .. c + 7 at once.
struct PhiloxLanes {
  static constexpr int N = 8;
  // Counters a .. a + 7 and b .. b + 7: bits 0-31 are a's 32 elements, bits 32-63 b's.
  static uint64_t keep_bits_8x2(const DropoutParams& d, uint64_t a, uint64_t b) {
    return keep_bits(d, a) | keep_bits(d, b) << 32;
  }
  static uint64_t keep_bits(const DropoutParams& d, uint64_t c) {
    uint32_t w[4];
    keep_words(d, c, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), w);
    return _pdep_u64(w[0], 0x11111111ull) | _pdep_u64(w[1], 0x22222222ull) | _pdep_u64(w[2], 0x44444444ull) |
           _pdep_u64(w[3], 0x88888888ull);
  }
  // Counters c + lane * stride (lane * stride < 2^32): bit `lane` of out[w] is the keep-bit of the
  // lane's word w (vec_avx512.h).
  static void keep_words_strided(const DropoutParams& d, uint64_t c, uint32_t stride, uint32_t (&out)[4]) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    keep_words(d, c, _mm256_mullo_epi32(lane, _mm256_set1_epi32(static_cast<int>(stride))), out);
  }

 private:
  // Philox4x32-10 of counters c + lane per lane; out[w] bit `lane`: word w >= threshold.
  static void keep_words(const DropoutParams& d, uint64_t c, __m256i lane, uint32_t (&out)[4]) {
    const __m256i base = _mm256_set1_epi32(static_cast<int>(c));
    const __m256i lo = _mm256_add_epi32(base, lane);
    // Unsigned lo < base (a carry) via the sign-flip trick: AVX2 compares signed only.
    const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    const __m256i carry =
        _mm256_cmpgt_epi32(_mm256_xor_si256(base, flip), _mm256_xor_si256(lo, flip));
    __m256i x0 = lo;
    __m256i x1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(c >> 32)), carry);
    __m256i x2 = _mm256_set1_epi32(static_cast<int>(d.stream));
    __m256i x3 = _mm256_set1_epi32(static_cast<int>(d.stream >> 32));
    uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
    const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
    const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
    for (int r = 0; r < kPhiloxRounds; ++r) {
      if (r > 0) {
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      __m256i hi0, lo0, hi1, lo1;
      mulhilo(m0, x0, hi0, lo0);
      mulhilo(m1, x2, hi1, lo1);
      x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32(static_cast<int>(k0)));
      x1 = lo1;
      x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(static_cast<int>(k1)));
      x3 = lo0;
    }
    // word >= threshold  <=>  !(threshold > word), unsigned via the sign flip.
    const __m256i t = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(d.threshold)), flip);
    auto ge = [&](__m256i w) -> uint64_t {
      const __m256i lt = _mm256_cmpgt_epi32(t, _mm256_xor_si256(w, flip));
      return ~static_cast<uint64_t>(_mm256_movemask_ps(_mm256_castsi256_ps(lt))) & 0xFFu;
    };
    out[0] = static_cast<uint32_t>(ge(x0)), out[1] = static_cast<uint32_t>(ge(x1));
    out[2] = static_cast<uint32_t>(ge(x2)), out[3] = static_cast<uint32_t>(ge(x3));
  }

  static void mulhilo(__m256i m, __m256i x, __m256i& hi, __m256i& lo) {
    const __m256i even = _mm256_mul_epu32(m, x);
    const __m256i odd = _mm256_mul_epu32(m, _mm256_srli_epi64(x, 32));
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  }
};
