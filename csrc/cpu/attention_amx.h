// The two matrix products of the bf16 attention forward on Intel AMX tiles (tdpbf16ps: bf16
// operands, float32 accumulators), used by attention_kernel.h where AttentionArgs::amx says so:
// S = Q K^T of a query block against a key block, and O += P V. The online softmax between them
// stays in AVX-512 float32, as on every other path. Included inside the AVX-512 namespace; empty
// unless AIAYN_AMX_TILES (amx_tiles.h configures the tiles: 16 rows x 64 bytes each).
//
// Layouts, for a head dim D that is a multiple of 32 and a key block of kAttentionBlockK = 64 keys:
// - Q: bf16 rows of D (row stride D): the A tile of row tile r, head-dim chunk c is at
//   q + r * 16 * D + c * 32.
// - K block: B tiles of Q K^T, (chunk c, key tile t) at kp + (c * 4 + t) * 512; its row p holds keys
//   16 t .. 16 t + 15 as pairs (K[j][32 c + 2 p], K[j][32 c + 2 p + 1]): the 16 x 16 transpose of
//   the block's 32-bit pairs.
// - V block: B tiles of P V, (key chunk c, column tile t) at vp + (c * D / 16 + t) * 512; its row
//   p holds columns 16 t .. 16 t + 15 as pairs (V[32 c + 2 p][d], V[32 c + 2 p + 1][d]).
// - S: float rows of 64 (stride 64); P: bf16 rows of 64 (stride 64); O: float rows of D.
// Keys past the block's end are zero in both packed blocks, so padded columns of P (zeros) meet
// zero rows of V. Each score and output sums its terms in a fixed order (32 at a time, in order),
// so neither the thread count nor the task split changes a result.
#ifdef AIAYN_AMX_TILES

// (a0 b0 a1 b1 ... a15 b15) from a 512-bit register holding a = x[0..15], b = x[16..31].
inline __m512i amx_interleave_halves(__m512i x) {
  alignas(64) static constexpr uint16_t kIdx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(kIdx), x);
}

// Keys [0, n) of a block (rows of D bf16 at stride ks) into the B tiles of Q K^T; only the key
// tiles holding keys are written (the scores of the others are never computed).
inline void attention_amx_pack_keys(const uint16_t* k, int64_t ks, int64_t n, int64_t D, uint16_t* out) {
  const int64_t chunks = D / 32;
  for (int64_t t = 0; t * 16 < n; ++t) {
    const int64_t j0 = t * 16;
    // Whole tiles of 32-bit pairs transpose in registers; a partial one (or an odd row stride,
    // which splits the pairs) goes element by element.
    const bool whole = j0 + 16 <= n && ks % 2 == 0;
    for (int64_t c = 0; c < chunks; ++c) {
      uint16_t* tile = out + (c * 4 + t) * 512;
      if (whole) {
        Vec::transpose(reinterpret_cast<const float*>(k + j0 * ks + c * 32), ks / 2,
                       reinterpret_cast<float*>(tile), 16);
        continue;
      }
      for (int64_t p = 0; p < 16; ++p)
        for (int64_t j = 0; j < 16; ++j)
          for (int64_t e = 0; e < 2; ++e)
            tile[p * 32 + j * 2 + e] = j0 + j < n ? k[(j0 + j) * ks + c * 32 + 2 * p + e] : uint16_t{0};
    }
  }
}

// Values [0, n) of a block (rows of D bf16 at stride vs) into the B tiles of P V, zero rows up to
// the next 32 keys.
inline void attention_amx_pack_values(const uint16_t* v, int64_t vs, int64_t n, int64_t D, uint16_t* out) {
  const int64_t ct = D / 16;
  for (int64_t c = 0; c * 32 < n; ++c)
    for (int64_t p = 0; p < 16; ++p) {
      const int64_t j = c * 32 + 2 * p;
      const uint16_t* r0 = v + j * vs;
      const uint16_t* r1 = r0 + vs;
      for (int64_t t = 0; t < ct; ++t) {
        const __m256i x0 = j < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + t * 16)) : _mm256_setzero_si256();
        const __m256i x1 = j + 1 < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + t * 16)) : _mm256_setzero_si256();
        const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(x0), x1, 1);
        _mm512_storeu_si512(out + (c * ct + t) * 512 + p * 32, amx_interleave_halves(x));
      }
    }
}

// S[16 rt x 16 kt] = Q K^T over row tiles [0, rt) and key tiles [0, kt): 2 x 2 accumulator tiles
// at a time (tmm0..3), A tiles in tmm4/5, B tiles in tmm6/7.
inline void attention_amx_scores(const uint16_t* q, int64_t D, int64_t rt, const uint16_t* kp, int64_t kt, float* s) {
  amx_barrier();
  const int64_t chunks = D / 32, qs = D * 2;
  for (int64_t r = 0; r < rt; r += 2) {
    const bool r2 = r + 1 < rt;
    const uint16_t* q0 = q + r * 16 * D;
    const uint16_t* q1 = q0 + 16 * D;
    for (int64_t t = 0; t < kt; t += 2) {
      const bool t2 = t + 1 < kt;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t c = 0; c < chunks; ++c) {
        const uint16_t* b = kp + (c * 4 + t) * 512;
        _tile_loadd(4, q0 + c * 32, qs);
        _tile_loadd(6, b, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (t2) {
          _tile_loadd(7, b + 512, 64);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (r2) {
          _tile_loadd(5, q1 + c * 32, qs);
          _tile_dpbf16ps(2, 5, 6);
          if (t2) _tile_dpbf16ps(3, 5, 7);
        }
      }
      float* s0 = s + r * 16 * 64 + t * 16;
      _tile_stored(0, s0, 256);
      if (t2) _tile_stored(1, s0 + 16, 256);
      if (r2) {
        _tile_stored(2, s0 + 16 * 64, 256);
        if (t2) _tile_stored(3, s0 + 16 * 64 + 16, 256);
      }
    }
  }
  amx_barrier();
}

// O[16 rt x D] (+)= P V over row tiles [0, rt) and key chunks [0, kc) of 32.
inline void attention_amx_pv(const uint16_t* p, int64_t rt, const uint16_t* vp, int64_t D, int64_t kc, float* o,
                             bool accumulate) {
  amx_barrier();
  const int64_t ct = D / 16, os = D * 4;
  for (int64_t r = 0; r < rt; r += 2) {
    const bool r2 = r + 1 < rt;
    const uint16_t* p0 = p + r * 16 * 64;
    const uint16_t* p1 = p0 + 16 * 64;
    for (int64_t t = 0; t < ct; t += 2) {  // ct is even: D % 32 == 0
      float* o0 = o + r * 16 * D + t * 16;
      float* o1 = o0 + 16 * D;
      if (accumulate) {
        _tile_loadd(0, o0, os);
        _tile_loadd(1, o0 + 16, os);
        if (r2) {
          _tile_loadd(2, o1, os);
          _tile_loadd(3, o1 + 16, os);
        }
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t c = 0; c < kc; ++c) {
        const uint16_t* b = vp + (c * ct + t) * 512;
        _tile_loadd(4, p0 + c * 32, 128);
        _tile_loadd(6, b, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, b + 512, 64);
        _tile_dpbf16ps(1, 4, 7);
        if (r2) {
          _tile_loadd(5, p1 + c * 32, 128);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, o0, os);
      _tile_stored(1, o0 + 16, os);
      if (r2) {
        _tile_stored(2, o1, os);
        _tile_stored(3, o1 + 16, os);
      }
    }
  }
  amx_barrier();
}

// --- Transposed products (the fast path: no attention mask, no dropout, scale > 0) ----------
//
// Groups of 16 query rows work on S^T = K Q^T and O^T += V^T P^T, so that a vector holds one key's
// (one head dim's) values for the group's 16 rows: the softmax's running max, sum and rescale
// factor are vectors, with no horizontal reductions and no scalar exponentials, and P^T's bf16
// pairs are two vectors interleaved. Layouts:
// - K: A tiles straight from K's rows (16 keys x 32 head dims at stride ks), a partial last tile
//   from a zero-padded copy;
// - Q^T: B tiles per 32-dim chunk c at qt + c * 512: row p holds dims (2 p, 2 p + 1) of the 16 rows
//   (the 16 x 16 transpose of the rows' 32-bit pairs);
// - V^T: A tiles per (32-key chunk c, 16-dim tile t) at vt + (c * D / 16 + t) * 512: row d holds keys
//   32 c .. 32 c + 31 of dim 16 t + d, zero past the keys;
// - S^T: float, key j of the block at st + j * 16; P^T: B tiles per 32-key chunk at pt + c * 512;
// - O^T: float, dim d at ot + d * 16.

// Values [0, n) of a block (rows of D bf16 at stride vs) into V^T tiles, zero keys up to 32 c.
inline void attention_amx_pack_values_t(const uint16_t* v, int64_t vs, int64_t n, int64_t D, uint16_t* out) {
  const int64_t ct = D / 16;
  for (int64_t c = 0; c * 32 < n; ++c)
    for (int64_t t = 0; t < ct; ++t) {
      __m512 r[16];
      for (int64_t p = 0; p < 16; ++p) {  // key pair p: (V[j][d], V[j + 1][d]) for the tile's 16 dims
        const int64_t j = c * 32 + 2 * p;
        const uint16_t* r0 = v + j * vs + t * 16;
        const __m256i x0 = j < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0)) : _mm256_setzero_si256();
        const __m256i x1 = j + 1 < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + vs)) : _mm256_setzero_si256();
        r[p] = _mm512_castsi512_ps(amx_interleave_halves(_mm512_inserti64x4(_mm512_castsi256_si512(x0), x1, 1)));
      }
      transpose16x16(r);  // -> row d: the 16 key pairs of dim d
      uint16_t* tile = out + (c * ct + t) * 512;
      for (int d = 0; d < 16; ++d) _mm512_storeu_ps(reinterpret_cast<float*>(tile + d * 32), r[d]);
    }
}

// 16 query rows (bf16 rows of D at an even stride qs) into Q^T tiles.
inline void attention_amx_queries_t(const uint16_t* q, int64_t qs, int64_t D, uint16_t* qt) {
  for (int64_t c = 0; c < D / 32; ++c)
    Vec::transpose(reinterpret_cast<const float*>(q + c * 32), qs / 2, reinterpret_cast<float*>(qt + c * 512), 16);
}

// S^T of key tiles [0, kt): tile t reads 16 keys from k + 16 t * ks (stride ks), except the
// last when `tail` is given (16 keys at stride D). Accumulators tmm0/1, K in tmm2, Q^T in tmm3.
inline void attention_amx_scores_t(const uint16_t* k, int64_t ks, int64_t kt, const uint16_t* tail,
                                   const uint16_t* qt, int64_t D, float* st) {
  amx_barrier();
  const int64_t chunks = D / 32;
  auto key_tile = [&](int64_t t, int64_t c, int64_t& stride) {
    if (tail && t == kt - 1) {
      stride = D * 2;
      return tail + c * 32;
    }
    stride = ks * 2;
    return k + t * 16 * ks + c * 32;
  };
  for (int64_t t = 0; t < kt; t += 2) {
    const bool t2 = t + 1 < kt;
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t stride;
      _tile_loadd(3, qt + c * 512, 64);
      const uint16_t* a0 = key_tile(t, c, stride);
      _tile_loadd(2, a0, stride);
      _tile_dpbf16ps(0, 2, 3);
      if (t2) {
        const uint16_t* a1 = key_tile(t + 1, c, stride);
        _tile_loadd(2, a1, stride);
        _tile_dpbf16ps(1, 2, 3);
      }
    }
    _tile_stored(0, st + t * 256, 64);
    if (t2) _tile_stored(1, st + (t + 1) * 256, 64);
  }
  amx_barrier();
}

// O^T's accumulators tmm4..7 (tmm4/5 only for 32 dims) to and from ot (dims rows of 16 floats):
// a resident O^T (D <= 64) around a rescale, or four 16-dim tiles of a larger one per block.
inline void amx_o_store(float* ot, int64_t dims) {
  amx_barrier();
  _tile_stored(4, ot, 64);
  _tile_stored(5, ot + 256, 64);
  if (dims > 32) {
    _tile_stored(6, ot + 512, 64);
    _tile_stored(7, ot + 768, 64);
  }
  amx_barrier();
}
inline void amx_o_zero(int64_t dims) {
  _tile_zero(4);
  _tile_zero(5);
  if (dims > 32) {
    _tile_zero(6);
    _tile_zero(7);
  }
}
inline void amx_o_load(const float* ot, int64_t dims) {
  amx_barrier();
  _tile_loadd(4, ot, 64);
  _tile_loadd(5, ot + 256, 64);
  if (dims > 32) {
    _tile_loadd(6, ot + 512, 64);
    _tile_loadd(7, ot + 768, 64);
  }
}

// O^T (+)= V^T P^T over key chunks [0, kc): accumulators tmm4..7 (four 16-dim tiles at a time),
// P^T chunks in tmm0/1 (loaded once), V^T in tmm2/3. `resident`: D <= 64 and O^T stays in
// tmm4..7 across the key blocks (amx_o_load / amx_o_store move it); else it is loaded from and
// stored to ot per call.
inline void attention_amx_pv_t(const uint16_t* pt, int64_t kc, const uint16_t* vt, int64_t D, float* ot, bool resident) {
  amx_barrier();
  const int64_t ct = D / 16;
  _tile_loadd(0, pt, 64);
  if (kc > 1) _tile_loadd(1, pt + 512, 64);
  for (int64_t t = 0; t < ct; t += 4) {
    const int64_t n = ct - t < 4 ? ct - t : 4;  // 2 or 4: D % 32 == 0
    float* o = ot + t * 256;
    if (!resident) amx_o_load(o, n * 16);
    for (int64_t c = 0; c < kc; ++c) {
      const uint16_t* v = vt + (c * ct + t) * 512;
      _tile_loadd(2, v, 64);
      if (c == 0) _tile_dpbf16ps(4, 2, 0);
      else _tile_dpbf16ps(4, 2, 1);
      _tile_loadd(3, v + 512, 64);
      if (c == 0) _tile_dpbf16ps(5, 3, 0);
      else _tile_dpbf16ps(5, 3, 1);
      if (n > 2) {
        _tile_loadd(2, v + 1024, 64);
        if (c == 0) _tile_dpbf16ps(6, 2, 0);
        else _tile_dpbf16ps(6, 2, 1);
        _tile_loadd(3, v + 1536, 64);
        if (c == 0) _tile_dpbf16ps(7, 3, 0);
        else _tile_dpbf16ps(7, 3, 1);
      }
    }
    if (!resident) amx_o_store(o, n * 16);
  }
  amx_barrier();
}

// How far (log2 units) a row's block max may exceed its running max before the softmax moves it
// (and rescales O^T). Skipping small moves saves most rescales, but a row whose largest P is not
// exactly 1 rounds it to bf16 too, the largest term of O's error: over 1200 draws of
// test_forward_tile_edges-like cases the worst error ratio to torch's bf16 was 1.41x with slack 0,
// 1.64x with 1, 1.80x with 2, and past 2x with 8 (the 2x rule's limit).
constexpr float kAmxRescaleSlack = 1.0f;

// 2^x for P (Vec::exp2_poly01): degree 3 (relative error < 9e-5) where P only meets bf16 (rounded
// to 2^-9 right after; l sees the same values, so the error cancels in O / l to far below bf16's);
// degree 4 (< 3e-6) under out_float, whose residual path carries P to float32 accuracy. x <=
// kAmxRescaleSlack here (the lazy max).
template <bool kFloatAccurate>
inline __m512 amx_exp2(__m512 x) {
  if constexpr (kFloatAccurate) return Vec::exp2_poly01(x, kExp2Minimax01Deg4);
  else return Vec::exp2_poly01(x, kExp2Minimax01Deg3);
}

// P^T's tiles (and under kResidual the bf16 residual tiles) of a block's keys [0, nk) from S^T:
// p = 2^(s c - mc), zero past nk up to whole 32-key chunks; l += the row sums.
template <bool kResidual>
inline void amx_softmax_pairs(const float* st, int64_t nk, __m512 cv, __m512 mc, __m512& l, uint16_t* pt,
                              uint16_t* pt_residual) {
  const int64_t pairs = (nk + 31) / 32 * 16, full = nk / 2;
  __m512 la = _mm512_setzero_ps(), lb = _mm512_setzero_ps();
  auto store = [&](int64_t pr, __m512 p0, __m512 p1) {
    la = _mm512_add_ps(la, p0);
    lb = _mm512_add_ps(lb, p1);
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);  // p0 low, p1 high
    const __m512i pairs_of = amx_interleave_halves(both);      // 32-bit lane i: (p0[i], p1[i])
    _mm512_storeu_si512(pt + pr * 32, pairs_of);
    if constexpr (kResidual) {  // what the rounding dropped, as bf16 in the same layout
      const __m512 r0 = _mm512_sub_ps(p0, _mm512_castsi512_ps(_mm512_slli_epi32(pairs_of, 16)));
      const __m512 r1 = _mm512_sub_ps(p1, _mm512_castsi512_ps(_mm512_and_si512(pairs_of, _mm512_set1_epi32(-65536))));
      _mm512_storeu_si512(pt_residual + pr * 32, amx_interleave_halves((__m512i)_mm512_cvtne2ps_pbh(r1, r0)));
    }
  };
  auto p_of = [&](int64_t j) { return amx_exp2<kResidual>(_mm512_fmsub_ps(_mm512_loadu_ps(st + j * 16), cv, mc)); };
  for (int64_t pr = 0; pr < full; ++pr) store(pr, p_of(2 * pr), p_of(2 * pr + 1));  // both keys there
  for (int64_t pr = full; pr < pairs; ++pr) {  // the tail: one key or none, zeros up to 32-key chunks
    const int64_t j = 2 * pr;
    store(pr, j < nk ? p_of(j) : _mm512_setzero_ps(), _mm512_setzero_ps());
  }
  l = _mm512_add_ps(l, _mm512_add_ps(la, lb));
}

// O^T (D dims; in tmm4..7 if resident) times alpha, lane by lane.
inline void amx_rescale_o(float* ot, int64_t D, bool resident, __m512 alpha) {
  if (resident) amx_o_store(ot, D);
  for (int64_t d = 0; d < D; ++d) _mm512_storeu_ps(ot + d * 16, _mm512_mul_ps(_mm512_loadu_ps(ot + d * 16), alpha));
  if (resident) amx_o_load(ot, D);
}

// The online softmax of one key block for a group of 16 rows, on S^T (keys [0, nk), lanes =
// rows; log2 units after the scale c > 0): key padding (kbias: 0 / -inf per key, or null) and the
// causal mask (key j hidden from lanes below j + causal_shift, where causal) go in first; the
// running max m and sum l (vectors) move, and P^T's tiles are written, zero for keys past nk up to
// whole 32-key chunks. Returns whether O^T must be multiplied by `alpha` (the max moved in a lane
// that holds something) before this block's P V is added: the caller does it (amx_rescale_o),
// after the previous block's P V (amx_rows_t runs each block's P V one softmax later).
inline bool attention_amx_softmax_t(float* st, int64_t nk, float c, const float* kbias, bool causal,
                                    int64_t causal_shift, __m512& m, __m512& l, __m512& alpha_out,
                                    uint16_t* pt, uint16_t* pt_residual = nullptr) {
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  // The block's max in four independent chains (one would be a chain of nk dependent maxes).
  __m512 bmax[4] = {ninf, ninf, ninf, ninf};
  if (!kbias && !(causal && nk - 1 + causal_shift > 0)) {
    int64_t j = 0;
    for (; j + 4 <= nk; j += 4)
      for (int u = 0; u < 4; ++u) bmax[u] = _mm512_max_ps(bmax[u], _mm512_loadu_ps(st + (j + u) * 16));
    for (; j < nk; ++j) bmax[j & 3] = _mm512_max_ps(bmax[j & 3], _mm512_loadu_ps(st + j * 16));
  } else {
    for (int64_t j = 0; j < nk; ++j) {
      __m512 s = _mm512_loadu_ps(st + j * 16);
      bool masked = false;
      if (kbias && kbias[j] != 0.0f) s = ninf, masked = true;
      if (causal && j + causal_shift > 0) {
        const int64_t hidden = j + causal_shift < 16 ? j + causal_shift : 16;
        s = _mm512_mask_mov_ps(s, static_cast<__mmask16>((1u << hidden) - 1u), ninf);
        masked = true;
      }
      if (masked) _mm512_storeu_ps(st + j * 16, s);
      bmax[j & 3] = _mm512_max_ps(bmax[j & 3], s);
    }
  }
  const __m512 cv = _mm512_set1_ps(c);
  const __m512 mb = _mm512_mul_ps(_mm512_max_ps(_mm512_max_ps(bmax[0], bmax[1]), _mm512_max_ps(bmax[2], bmax[3])), cv);
  // Lazy rescaling (as FlashAttention-4 does): a row's max moves only where the block's exceeds it
  // by more than kAmxRescaleSlack, so P <= 2^slack and O^T is rescaled less often. O / l and the
  // log-sum-exp m + log2 l do not depend on which m was used, but the rounding of P to bf16 does:
  // with the exact max a row's largest P is exactly 1, otherwise it is rounded too (see
  // kAmxRescaleSlack). A row's first visible block (m = -inf) always moves it.
  const __mmask16 moved = _mm512_cmp_ps_mask(mb, _mm512_add_ps(m, _mm512_set1_ps(kAmxRescaleSlack)), _CMP_GT_OQ) |
                          _mm512_cmp_ps_mask(mb, mb, _CMP_UNORD_Q);
  __m512 alpha = _mm512_set1_ps(1.0f);
  bool rescale_o = false;
  if (moved) {
    const __m512 m_new = _mm512_mask_max_ps(m, moved, m, mb);
    // alpha = 2^(m - m_new): 0 where nothing was visible before (m = -inf), 1 where m stayed.
    alpha = _mm512_mask_blend_ps(moved, alpha, Vec::exp2(Vec{_mm512_sub_ps(m, m_new)}).v);
    // O^T holds something only in rows that saw a key before (finite m).
    if (moved & _mm512_cmp_ps_mask(m, ninf, _CMP_NEQ_UQ)) {
      l = _mm512_mul_ps(l, alpha);
      rescale_o = true;
    }
    m = m_new;
  }
  // Rows with nothing visible yet subtract 0: their scores are -inf, so P = 0.
  const __m512 mc = _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(m, ninf, _CMP_EQ_OQ), _mm512_setzero_ps());
  if (pt_residual) amx_softmax_pairs<true>(st, nk, cv, mc, l, pt, pt_residual);
  else amx_softmax_pairs<false>(st, nk, cv, mc, l, pt, nullptr);
  alpha_out = alpha;
  return rescale_o;
}

#endif
