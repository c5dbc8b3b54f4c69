// Small in-cache matrix products for the attention kernels: C (+)= A * B with B's rows contiguous
// and A read through arbitrary strides (so A or A^T, e.g. P or P^T, with no transposed copy).
// Register-blocked: a kTileR x kTileNV tile of vector accumulators per step; each step broadcasts
// one A element per row and loads one B row segment (the vector width and tile come from `Vec`).
// Included inside the ISA namespace by isa/*.cpp.

template <typename V>
struct SmallGemm {
  using S = typename V::Scalar;
  static constexpr int W = V::N;

  // Rows [0, R) x vectors [0, NV) of C; the last vector holds `tail` (<= W) valid lanes.
  // Whole vectors (tail == W) and plain overwrite take branch-free instantiations, so the
  // accumulators go straight between registers and C. With `row_scale`, row r of the tile is
  // multiplied by row_scale[r] on its way to C (attention's 1 / l, so O = P V lands normalised).
  template <int R, int NV>
  static void tile(int64_t K, const S* A, int64_t a_row, int64_t a_col, const S* B, int64_t ldb,
                   S* C, int64_t ldc, int tail, bool accumulate, const S* row_scale) {
    if (tail == W) {
      if (accumulate) tile_impl<R, NV, true, true>(K, A, a_row, a_col, B, ldb, C, ldc, tail, row_scale);
      else tile_impl<R, NV, true, false>(K, A, a_row, a_col, B, ldb, C, ldc, tail, row_scale);
    } else {
      if (accumulate) tile_impl<R, NV, false, true>(K, A, a_row, a_col, B, ldb, C, ldc, tail, row_scale);
      else tile_impl<R, NV, false, false>(K, A, a_row, a_col, B, ldb, C, ldc, tail, row_scale);
    }
  }

  template <int R, int NV, bool kFull, bool kAccumulate>
  static void tile_impl(int64_t K, const S* A, int64_t a_row, int64_t a_col, const S* B, int64_t ldb,
                        S* C, int64_t ldc, int tail, const S* row_scale = nullptr) {
    // Every loop over the tile is unrolled: GCC peels at most 16 iterations by itself, and a 6 x 4
    // tile left partly rolled kept its accumulators in a stack array, with 72 extra vector loads
    // and stores around the k loop of each call.
    V c[R][NV];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        if constexpr (!kAccumulate) c[r][v] = V::zero();
        else if (!kFull && v == NV - 1) c[r][v] = V::load_partial(C + r * ldc + v * W, tail);
        else c[r][v] = V::load(C + r * ldc + v * W);
      }
    for (int64_t k = 0; k < K; ++k) {
      V b[NV];
      const S* brow = B + k * ldb;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        b[v] = (!kFull && v == NV - 1) ? V::load_partial(brow + v * W, tail) : V::load(brow + v * W);
      const S* acol = A + k * a_col;
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const V x = V::set1(acol[r * a_row]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) c[r][v] = V::fma(x, b[v], c[r][v]);
      }
    }
    if (row_scale) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const V x = V::set1(row_scale[r]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) c[r][v] = c[r][v] * x;
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        if (!kFull && v == NV - 1) c[r][v].store_partial(C + r * ldc + v * W, tail);
        else c[r][v].store(C + r * ldc + v * W);
      }
  }

  // All M rows of one column panel, R rows at a time, the remainder by a smaller tile.
  template <int NV, int R>
  static void panel(int64_t M, int64_t K, const S* A, int64_t a_row, int64_t a_col, const S* B,
                    int64_t ldb, S* C, int64_t ldc, int tail, bool accumulate, const S* row_scale = nullptr) {
    int64_t i = 0;
    for (; i + R <= M; i += R)
      tile<R, NV>(K, A + i * a_row, a_row, a_col, B, ldb, C + i * ldc, ldc, tail, accumulate,
                  row_scale ? row_scale + i : nullptr);
    if (i < M)
      rest<NV, R - 1>(M - i, K, A + i * a_row, a_row, a_col, B, ldb, C + i * ldc, ldc, tail, accumulate,
                      row_scale ? row_scale + i : nullptr);
  }

  template <int NV, int R>
  static void rest(int64_t m, int64_t K, const S* A, int64_t a_row, int64_t a_col, const S* B,
                   int64_t ldb, S* C, int64_t ldc, int tail, bool accumulate, const S* row_scale) {
    if constexpr (R >= 1) {
      if (m == R) return tile<R, NV>(K, A, a_row, a_col, B, ldb, C, ldc, tail, accumulate, row_scale);
      rest<NV, R - 1>(m, K, A, a_row, a_col, B, ldb, C, ldc, tail, accumulate, row_scale);
    }
  }

  // C[M x N] = (accumulate ? C : 0) + A[M x K] * B[K x N]; A(i, k) = A[i * a_row + k * a_col].
  // row_scale (M values, or null): row i of the result times row_scale[i].
  // Full-width panels of kTileNV vectors, then one narrower panel for the remaining whole vectors,
  // then a one-vector panel for a partial vector.
  static void run(int64_t M, int64_t N, int64_t K, const S* A, int64_t a_row, int64_t a_col,
                  const S* B, int64_t ldb, S* C, int64_t ldc, bool accumulate, const S* row_scale = nullptr) {
    if (M <= 0 || N <= 0) return;
    constexpr int NV = V::kTileNV;
    int64_t n = 0;
    for (; n + NV * W <= N; n += NV * W)
      panel<NV, V::rows_for(NV)>(M, K, A, a_row, a_col, B + n, ldb, C + n, ldc, W, accumulate, row_scale);
    const int64_t rest_vectors = (N - n) / W;
    if (rest_vectors > 0) {
      narrow<NV - 1>(rest_vectors, M, K, A, a_row, a_col, B + n, ldb, C + n, ldc, accumulate, row_scale);
      n += rest_vectors * W;
    }
    if (n < N)
      panel<1, V::rows_for(1)>(M, K, A, a_row, a_col, B + n, ldb, C + n, ldc, static_cast<int>(N - n), accumulate,
                               row_scale);
  }

  template <int NV>
  static void narrow(int64_t nv, int64_t M, int64_t K, const S* A, int64_t a_row, int64_t a_col,
                     const S* B, int64_t ldb, S* C, int64_t ldc, bool accumulate, const S* row_scale) {
    if constexpr (NV >= 1) {
      if (nv == NV) return panel<NV, V::rows_for(NV)>(M, K, A, a_row, a_col, B, ldb, C, ldc, W, accumulate, row_scale);
      narrow<NV - 1>(nv, M, K, A, a_row, a_col, B, ldb, C, ldc, accumulate, row_scale);
    }
  }
};
