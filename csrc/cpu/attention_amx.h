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
  // (a0 b0 a1 b1 ... a15 b15) from a = x[0..15], b = x[16..31].
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                           8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  for (int64_t c = 0; c * 32 < n; ++c)
    for (int64_t p = 0; p < 16; ++p) {
      const int64_t j = c * 32 + 2 * p;
      const uint16_t* r0 = v + j * vs;
      const uint16_t* r1 = r0 + vs;
      for (int64_t t = 0; t < ct; ++t) {
        const __m256i x0 = j < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + t * 16)) : _mm256_setzero_si256();
        const __m256i x1 = j + 1 < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + t * 16)) : _mm256_setzero_si256();
        const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(x0), x1, 1);
        _mm512_storeu_si512(out + (c * ct + t) * 512 + p * 32, _mm512_permutexvar_epi16(idx, x));
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

#endif
