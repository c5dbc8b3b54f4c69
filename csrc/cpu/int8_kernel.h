// The int8 linear (kernels.h, LinearInt8Args): row quantization of x and the int8 GEMM with its
// dequantizing epilogue. Included inside the ISA namespace by isa/*.cpp. isa/avx512.cpp defines
// AIAYN_INT8_VNNI (vpdpbusd: x as unsigned x + 128 against signed W, corrected by the packed
// 128 * column sums), isa/avx2.cpp AIAYN_INT8_AVX2 (x and W sign-extended to int16, vpmaddwd);
// generic.cpp runs scalar int32 loops. All three give the same int32 sums (exact: |sum| <=
// K * 127 * 128 < 2^31 for the K the entry point allows, and vpdpbusd's wrapping adds make the
// + 128 correction exact even where the uncorrected sum would overflow), hence the same bits.
//
// Quantized rows (LinearInt8Args::xq), per ISA: AVX-512 u8 (q + 128, padding 128), AVX2 int16
// (padding 0), generic int8 (padding 0); K padded to Kp. W's padding is 0, so padding adds nothing.

// The per-row quantization every ISA shares, scalar: the reference (aiayn.reference.quantize_rows_int8)
// does exactly these float32 operations, and the vector version below the same ones per lane.
inline float int8_row_scale(const float* x, int64_t K, float* inv_out) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::fabs(x[k]);
    finite = finite && a <= std::numeric_limits<float>::max();
    amax = a > amax ? a : amax;
  }
  if (!finite) {
    *inv_out = 0.0f;
    return std::numeric_limits<float>::quiet_NaN();
  }
  *inv_out = amax > 0.0f ? 127.0f / amax : 0.0f;
  return amax / 127.0f;
}

inline int32_t int8_quantize_one(float v, float inv) {
  // nearbyint rounds half to even in the default rounding mode, as torch.round does.
  float q = std::nearbyint(v * inv);
  if (q != q) return 0;  // inf or NaN in the row (inv = 0): q = 0 as in the reference; scale is NaN
  q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
  return static_cast<int32_t>(q);
}

inline void linear_int8_quantize(const LinearInt8Args& a, int64_t row_begin, int64_t row_end) {
  for (int64_t m = row_begin; m < row_end; ++m) {
    const float* x = a.x + m * a.x_rs;
    char* row = static_cast<char*>(a.xq) + m * a.xq_rs;
#if defined(AIAYN_INT8_VNNI)
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    const __m512 fmax = _mm512_set1_ps(std::numeric_limits<float>::max());
    int64_t k = 0;
    for (; k < a.K; k += 16) {
      const __mmask16 t = a.K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (a.K - k)) - 1);
      const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(t, x + k));
      bad |= _mm512_mask_cmp_ps_mask(t, v, fmax, _CMP_NLE_UQ);  // inf or NaN
      vmax = _mm512_max_ps(vmax, v);
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    float inv, scale;
    if (bad) {
      inv = 0.0f;
      scale = std::numeric_limits<float>::quiet_NaN();
    } else {
      inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      scale = amax / 127.0f;
    }
    a.x_scale[m] = scale;
    uint8_t* q = reinterpret_cast<uint8_t*>(row);
    if (bad) {  // q = 0 (stored + 128) as in the reference; the row's outputs are NaN through its scale
      std::memset(q, 128, static_cast<size_t>(a.Kp));
      continue;
    }
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(128);
    for (k = 0; k < a.K; k += 16) {
      const __mmask16 t = a.K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (a.K - k)) - 1);
      // cvtps rounds by MXCSR: half to even, like nearbyint above.
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(t, x + k), vinv));
      v = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v, lo), hi), off);
      _mm_mask_storeu_epi8(q + k, t, _mm512_cvtepi32_epi8(v));
    }
    for (k = a.K; k < a.Kp; ++k) q[k] = 128;
#else
    float inv;
    a.x_scale[m] = int8_row_scale(x, a.K, &inv);
#if defined(AIAYN_INT8_AVX2)
    using Q = int16_t;
#else
    using Q = int8_t;
#endif
    Q* q = reinterpret_cast<Q*>(row);
    for (int64_t k = 0; k < a.K; ++k) q[k] = static_cast<Q>(int8_quantize_one(x[k], inv));
    for (int64_t k = a.K; k < a.Kp; ++k) q[k] = 0;
#endif
  }
}

// out(m, n0 .. n0 + 16) from 16 int32 sums; `cols` of them are real columns. The float32
// operations and their order are the reference's: float(acc) * (xs * ws) + b, then ReLU.
inline void int8_epilogue16(const LinearInt8Args& a, int64_t m, int64_t n0, const int32_t* acc, int64_t cols) {
  float* o = a.out + m * a.out_rs + n0;
  const float xs = a.x_scale[m];
  for (int64_t c = 0; c < cols; ++c) {
    float v = static_cast<float>(acc[c]) * (xs * a.w_scale[n0 + c]);
    if (a.bias) v = v + a.bias[n0 + c];
    if (a.relu) v = v < 0.0f ? 0.0f : v;  // NaN stays NaN, as torch.relu
    o[c] = v;
  }
}

#if defined(AIAYN_INT8_VNNI)
// R rows x P panels (16 columns each) over the whole K: R * P zmm accumulators, one vpdpbusd per
// (row, panel, k-quad). 4 x 4 leaves 11 of 32 registers for the 4 W vectors and the broadcast.
template <int R, int P>
inline void int8_tile(const LinearInt8Args& a, int64_t m0, int64_t p0) {
  __m512i acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_si512();
  const uint8_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = static_cast<const uint8_t*>(a.xq) + (m0 + r) * a.xq_rs;
  const int8_t* wp = a.w_packed + p0 * kInt8Panel * a.Kp;
  const int64_t panel_bytes = kInt8Panel * a.Kp;
  for (int64_t g = 0; g < a.Kp; g += 4) {
    __m512i w[P];
    for (int p = 0; p < P; ++p) w[p] = _mm512_loadu_si512(wp + p * panel_bytes + g * kInt8Panel);
    for (int r = 0; r < R; ++r) {
      int32_t quad;
      std::memcpy(&quad, xr[r] + g, 4);
      const __m512i xb = _mm512_set1_epi32(quad);
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], xb, w[p]);
    }
  }
  for (int p = 0; p < P; ++p) {
    const int64_t n0 = (p0 + p) * kInt8Panel;
    const int64_t cols = a.N - n0 < kInt8Panel ? a.N - n0 : kInt8Panel;
    const __mmask16 t = cols == 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
    const __m512i comp = _mm512_loadu_si512(a.w_comp + n0);
    const __m512 ws = _mm512_maskz_loadu_ps(t, a.w_scale + n0);
    const __m512 b = a.bias ? _mm512_maskz_loadu_ps(t, a.bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][p], comp));
      __m512 v = _mm512_mul_ps(f, _mm512_mul_ps(_mm512_set1_ps(a.x_scale[m0 + r]), ws));
      if (a.bias) v = _mm512_add_ps(v, b);
      if (a.relu) v = _mm512_max_ps(_mm512_setzero_ps(), v);  // NaN stays NaN
      _mm512_mask_storeu_ps(a.out + (m0 + r) * a.out_rs + n0, t, v);
    }
  }
}

template <int R>
inline void int8_tile_rows(const LinearInt8Args& a, int64_t m0, int64_t p0, int64_t np) {
  switch (np) {
    case 4: int8_tile<R, 4>(a, m0, p0); break;
    case 3: int8_tile<R, 3>(a, m0, p0); break;
    case 2: int8_tile<R, 2>(a, m0, p0); break;
    default: int8_tile<R, 1>(a, m0, p0); break;
  }
}
constexpr int64_t kInt8TileR = 4, kInt8TileP = 4;

#elif defined(AIAYN_INT8_AVX2)
// R rows x 1 panel: a k-quad of the panel (64 bytes) sign-extends into 4 ymm of int16 (4 columns
// x 4 k each); x's quad is broadcast as 4 int16; vpmaddwd leaves per column two int32 pair sums,
// added across k and folded (hadd + lane permute) once at the end. 4 R accumulators + 4 W + 1 = 13
// of 16 ymm at R = 2.
template <int R, int P>
inline void int8_tile(const LinearInt8Args& a, int64_t m0, int64_t p0) {
  static_assert(P == 1, "one panel per AVX2 tile");
  __m256i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_si256();
  const int16_t* xr[R];
  for (int r = 0; r < R; ++r)
    xr[r] = reinterpret_cast<const int16_t*>(static_cast<const char*>(a.xq) + (m0 + r) * a.xq_rs);
  const int8_t* wp = a.w_packed + p0 * kInt8Panel * a.Kp;
  for (int64_t g = 0; g < a.Kp; g += 4) {
    __m256i w[4];
    for (int j = 0; j < 4; ++j)
      w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + g * kInt8Panel + 16 * j)));
    for (int r = 0; r < R; ++r) {
      int64_t quad;
      std::memcpy(&quad, xr[r] + g, 8);
      const __m256i xb = _mm256_set1_epi64x(quad);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(w[j], xb));
    }
  }
  const int64_t n0 = p0 * kInt8Panel;
  const int64_t cols = a.N - n0 < kInt8Panel ? a.N - n0 : kInt8Panel;
  alignas(32) int32_t sums[16];
  for (int r = 0; r < R; ++r) {
    // hadd gives [c0 c1 c4 c5 | c2 c3 c6 c7]; the 64-bit permute (0, 2, 1, 3) puts them in order.
    const __m256i lo = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][0], acc[r][1]), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][2], acc[r][3]), 0xD8);
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums), lo);
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums + 8), hi);
    int8_epilogue16(a, m0 + r, n0, sums, cols);
  }
}

template <int R>
inline void int8_tile_rows(const LinearInt8Args& a, int64_t m0, int64_t p0, int64_t) { int8_tile<R, 1>(a, m0, p0); }
constexpr int64_t kInt8TileR = 2, kInt8TileP = 1;

#else
template <int R, int P>
inline void int8_tile(const LinearInt8Args& a, int64_t m0, int64_t p0) {
  const int8_t* wp = a.w_packed + p0 * kInt8Panel * a.Kp;
  const int64_t n0 = p0 * kInt8Panel;
  const int64_t cols = a.N - n0 < kInt8Panel ? a.N - n0 : kInt8Panel;
  for (int r = 0; r < R; ++r) {
    const int8_t* x = static_cast<const int8_t*>(a.xq) + (m0 + r) * a.xq_rs;
    int32_t acc[16] = {};
    for (int64_t g = 0; g < a.Kp; g += 4) {
      const int8_t* w = wp + g * kInt8Panel;
      for (int c = 0; c < 16; ++c)
        for (int j = 0; j < 4; ++j) acc[c] += int32_t{x[g + j]} * int32_t{w[c * 4 + j]};
    }
    int8_epilogue16(a, m0 + r, n0, acc, cols);
  }
}

template <int R>
inline void int8_tile_rows(const LinearInt8Args& a, int64_t m0, int64_t p0, int64_t) { int8_tile<R, 1>(a, m0, p0); }
constexpr int64_t kInt8TileR = 1, kInt8TileP = 1;
#endif

// Panel groups outermost: a group's W (kInt8TileP panels x Kp bytes) stays in L1/L2 while every row
// tile of the task passes over it; with the few rows of a decoding step W streams from memory once.
inline void linear_int8_run(const LinearInt8Args& a, int64_t m_begin, int64_t m_end, int64_t panel_begin,
                            int64_t panel_end) {
  for (int64_t p = panel_begin; p < panel_end; p += kInt8TileP) {
    const int64_t np = panel_end - p < kInt8TileP ? panel_end - p : kInt8TileP;
    int64_t m = m_begin;
    for (; m + kInt8TileR <= m_end; m += kInt8TileR) int8_tile_rows<kInt8TileR>(a, m, p, np);
    switch (m_end - m) {  // the last rows in one tile: W is read once more, not once per row
      case 3: int8_tile_rows<3>(a, m, p, np); break;
      case 2: int8_tile_rows<2>(a, m, p, np); break;
      case 1: int8_tile_rows<1>(a, m, p, np); break;
      default: break;
    }
  }
}
