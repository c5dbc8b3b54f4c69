// Scaled dot-product attention, softmax(Q K^T * scale + mask) V (paper §3.2.1), forward and
// backward, flash-attention style: blocked over queries and keys with an online softmax, so the
// Lq x Lk score matrix never exists; the log-sum-exp of each row is saved for the backward, which
// recomputes the probabilities block by block (Dao et al., FlashAttention-2, Algorithms 1 and 2).
// Written once over `Vec`; included inside the ISA namespace by isa/*.cpp.
//
// Scores are kept in the log2 domain (scaled by scale * log2 e) so that the softmax is exp2.

constexpr double kLog2e = 1.4426950408889634;

template <typename V, typename T>
struct Attention {
  using S = typename V::Scalar;
  using Gemm = SmallGemm<V>;
  static constexpr int W = V::N;
  static constexpr int64_t BQ = kAttentionBlockQ, BK = kAttentionBlockK;
  // Transposed AMX: one key block's S^T (float) or P^T (bf16 key pairs) for a group of 16 rows.
  static constexpr int64_t kAmxBlockT = BK * 16;

  const AttentionArgs& a;
  const int64_t D, Lq, Lk, H;
  const int64_t nkb;  // key blocks
  const S c;          // scale * log2 e
  const S neg_inf;

  explicit Attention(const AttentionArgs& args)
      : a(args),
        D(args.dim),
        Lq(args.len_q),
        Lk(args.len_k),
        H(args.heads),
        nkb((args.len_k + BK - 1) / BK),
        c(static_cast<S>(args.scale * kLog2e)),
        neg_inf(-__builtin_inf()) {}

  static S to_s(T x) {
    if constexpr (sizeof(T) == 2) return bf16_to_float(x);
    else return static_cast<S>(x);
  }
  static T from_s(S x) {
    if constexpr (sizeof(T) == 2) return float_to_bf16(static_cast<float>(x));
    else return static_cast<T>(x);
  }

  const T* row(const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t i) const {
    return static_cast<const T*>(base) + b * stride[0] + h * stride[1] + i * stride[2];
  }

  // rows [i0, i0 + m) of a (b, h) slice into a dense S buffer with row stride D, times `mul`.
  void load_rows(const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t i0,
                 int64_t m, S* dst, S mul = S(1)) const {
    const V mv = V::set1(mul);
    const int64_t full = D / W * W;
    const int tail = static_cast<int>(D - full);
    for (int64_t r = 0; r < m; ++r) {
      const T* src = row(base, stride, b, h, i0 + r);
      S* out = dst + r * D;
      for (int64_t d = 0; d < full; d += W) (V::load(src + d) * mv).store(out + d);
      if (tail) (V::load_partial(src + full, tail) * mv).store_partial(out + full, tail);
    }
  }

  // Rows [j0, j0 + n) of a (b, h) slice (keys; queries for forward_block_t) transposed into
  // dst[d * ld + j], zero past n (to the next vector).
  void pack_rows_t(const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t j0,
                   int64_t n, S* dst, int64_t ld = BK) const {
    const int64_t np = (n + W - 1) / W * W;
    int64_t j = 0, dzero = 0;  // columns [n, np) of rows d >= dzero still need their zeros
    if constexpr (sizeof(T) == sizeof(S)) {
      // Groups of W rows: W x W blocks transposed in registers (contiguous loads). A last partial
      // group goes through a block whose missing rows are zero, so the transpose writes the zero
      // columns too (element by element that was ~2000 scalar stores per (b, h) at the paper's
      // padded shape, 38 keys). The head-dim tail one element at a time.
      const int64_t ks = stride[2], dfull = D / W * W;
      alignas(64) S blk[W * W];
      for (; j < n; j += W) {
        const int64_t cnt = imin(W, n - j);
        const S* src = reinterpret_cast<const S*>(row(base, stride, b, h, j0 + j));
        if (cnt == W) {
          for (int64_t d = 0; d < dfull; d += W) V::transpose(src + d, ks, dst + d * ld + j, ld);
        } else {
          for (int64_t u = cnt; u < W; ++u) V::zero().store(blk + u * W);
          for (int64_t d = 0; d < dfull; d += W) {
            for (int64_t u = 0; u < cnt; ++u) V::load(src + u * ks + d).store(blk + u * W);
            V::transpose(blk, W, dst + d * ld + j, ld);
          }
        }
        for (int64_t d = dfull; d < D; ++d)
          for (int64_t u = 0; u < cnt; ++u) dst[d * ld + j + u] = src[u * ks + d];
      }
      dzero = dfull;
    }
    for (int64_t d = dzero; d < D; ++d)
      for (int64_t c = n; c < np; ++c) dst[d * ld + c] = S(0);
    for (; j < n; ++j) {
      const T* src = row(base, stride, b, h, j0 + j);
      for (int64_t d = 0; d < D; ++d) dst[d * ld + j] = to_s(src[d]);
    }
  }

  bool key_block_all_padded(int64_t b, int64_t kb) const {
    if (!a.key_padding) return false;
    const bool* p = a.key_padding + b * a.key_padding_stride[0];
    for (int64_t j = kb * BK, e = imin(Lk, (kb + 1) * BK); j < e; ++j)
      if (!p[j * a.key_padding_stride[1]]) return false;
    return true;
  }

  // Columns of a key block that the kernels compute: the keys rounded up to whole vectors.
  int64_t padded(int64_t nk) const { return (nk + W - 1) / W * W; }

  // Scores of query row i against keys [j0, j0 + nk) in srow (Q K^T, times `mul` here unless the
  // queries were pre-scaled) -> log2-domain logits with every mask applied over the padded width;
  // masked entries and keys past Lk become -inf. kbias: this batch's key-padding bias (0 / -inf).
  void mask_row(S* srow, int64_t b, int64_t h, int64_t i, int64_t j0, const S* kbias,
                S mul = S(1)) const {
    const int64_t n = imin(BK, Lk - j0), np = padded(n);
    if (mul != S(1)) {
      const V cv = V::set1(mul);
      for (int64_t j = 0; j < np; j += W) (V::load(srow + j) * cv).store(srow + j);
    }
    for (int64_t j = n; j < np; ++j) srow[j] = neg_inf;
    if (a.mask.kind == AttentionMask::additive) {
      const S* m = static_cast<const S*>(a.mask.data) + b * a.mask.stride[0] +
                   h * a.mask.stride[1] + i * a.mask.stride[2] + j0 * a.mask.stride[3];
      const int64_t sk = a.mask.stride[3];
      const V l2e = V::set1(static_cast<S>(kLog2e));
      int64_t j = 0;
      if (sk == 1)
        for (; j + W <= n; j += W) V::fma(V::load(m + j), l2e, V::load(srow + j)).store(srow + j);
      for (; j < n; ++j) srow[j] += m[j * sk] * static_cast<S>(kLog2e);
    } else if (a.mask.kind == AttentionMask::boolean) {
      const bool* m = static_cast<const bool*>(a.mask.data) + b * a.mask.stride[0] +
                      h * a.mask.stride[1] + i * a.mask.stride[2] + j0 * a.mask.stride[3];
      const int64_t sk = a.mask.stride[3];
      for (int64_t j = 0; j < n; ++j)
        if (!m[j * sk]) srow[j] = neg_inf;
    }
    if (kbias)
      for (int64_t j = 0; j < np; j += W) (V::load(srow + j) + V::load(kbias + j0 + j)).store(srow + j);
    if (a.causal)
      for (int64_t j = imax(0, i + 1 - j0); j < n; ++j) srow[j] = neg_inf;
  }

  // 0 for a visible key, -inf for a padded one, over every key block of batch b (nullptr when
  // there is no key padding mask). `visible`: keys up to the last unpadded one, the only ones the
  // kernels compute with (padded sentences end in padding: their tails cost nothing).
  S* key_bias(int64_t b, S* buf, int64_t& visible) const {
    visible = Lk;
    if (!a.key_padding) return nullptr;
    const bool* p = a.key_padding + b * a.key_padding_stride[0];
    visible = 0;
    for (int64_t j = 0; j < nkb * BK; ++j) {
      const bool pad = j >= Lk || p[j * a.key_padding_stride[1]];
      buf[j] = pad ? neg_inf : S(0);
      if (!pad) visible = j + 1;
    }
    return buf;
  }

  // First element number of row i's keys from j0 (kernels.h: dropout numbering).
  int64_t dropout_base(int64_t b, int64_t h, int64_t i, int64_t j0) const {
    return ((b * H + h) * Lq + i) * Lk + j0;
  }

  // Keys that query rows [i0, i0 + m) can see under the causal mask: blocks [0, end).
  int64_t key_blocks_for(int64_t i0, int64_t m) const {
    if (!a.causal) return nkb;
    return imin(nkb, (i0 + m - 1) / BK + 1);
  }

  // --- forward ---------------------------------------------------------------------------

  // Rows at most this many take the decode path: one pass over the keys as dot products, no
  // packing (incremental decoding and beam search query 1..few rows against a KV cache).
  static constexpr int64_t kDecodeRows = 4;
  bool decode() const { return Lq <= kDecodeRows; }

  // bf16 on AMX tiles (attention_amx.h): Q K^T and P V as tdpbf16ps on bf16 blocks, the softmax
  // in float32 as everywhere else. attention.cpp sets a.amx only for bf16 with D % 32 == 0 where
  // the bf16 mode is AMX; the decode path keeps its dot products.
  bool amx() const {
#ifdef AIAYN_AMX_TILES
    if constexpr (sizeof(T) == 2) return a.amx && !decode();
#endif
    return false;
  }
  // The transposed AMX path (attention_amx.h: groups of 16 rows on S^T and O^T, the softmax's
  // state in vectors) where it applies: no attention mask, no dropout, a positive scale.
  bool amx_transposed() const {
    return amx() && a.mask.kind == AttentionMask::none && !a.dropout.enabled && a.scale > 0;
  }

  // The float32 forward on transposed score blocks (forward_block_t) where it applies: no
  // attention mask (its per-row layout stays on the row path), a positive scale; dropout where
  // its Philox counters line up with the lanes (transposed_keep_words).
  bool transposed_scores() const {
    return sizeof(T) == sizeof(S) && !decode() && a.mask.kind == AttentionMask::none && a.scale > 0 &&
           (!a.dropout.enabled || (W == PhiloxLanes::N && Lk % 4 == 0 && Lk < (int64_t{1} << 30)));
  }

  // Dropout keep-masks of key rows [j0, j0 + n) (j0 % 4 == 0) for query lanes [i, i + W):
  // keep[j] bit u is element (i + u, j0 + j)'s. Elements are numbered row-major (dropout_base), so
  // with Lk % 4 == 0 one Philox counter holds 4 consecutive keys of one row, and one PhiloxLanes
  // pass with counters Lk / 4 apart gives 4 key rows of W lanes: no bit transposes.
  void transposed_keep_words(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, uint32_t* keep) const {
    for (int64_t j = 0; j < n; j += 4) {
      uint32_t w[4];
      PhiloxLanes::keep_words_strided(a.dropout, static_cast<uint64_t>(dropout_base(b, h, i, j0 + j)) >> 2,
                                      static_cast<uint32_t>(Lk / 4), w);
      for (int u = 0; u < 4; ++u) keep[j + u] = w[u];
    }
  }

  struct FwdScratch {
    S *kt, *vbuf, *qbuf, *sbuf, *obuf, *m, *m_new, *l, *kbias;
    uint64_t* bits;
    int64_t* bit0;  // per row of a block: where its keep-bits start in `bits`
    uint16_t *k16, *v16, *q16, *p16;  // AMX: packed key / value blocks, bf16 Q rows and P rows
    uint16_t *ktail, *qt16, *pt16;    // transposed AMX: last partial key tile, Q^T, P^T tiles
    uint16_t* pt16_residual;          // out_float: P^T's bf16 rounding residual, pt16's layout
    float *st, *ot;                   // transposed AMX: S^T of two blocks, O^T of a group
  };
  FwdScratch fwd_scratch(Workspace& ws) const {
    FwdScratch f{};
    f.kbias = ws.take<S>(a.key_padding ? nkb * BK : 0);
    const bool direct_v = sizeof(T) == sizeof(S), tiles = amx();
    f.kt = ws.take<S>(decode() || tiles || transposed_scores() ? 0 : nkb * D * BK);
    f.vbuf = ws.take<S>(decode() || direct_v || tiles ? 0 : Lk * D);
    const bool tr = amx_transposed();
    f.k16 = ws.take<uint16_t>(tiles && !tr ? nkb * BK * D : 0);
    f.ktail = ws.take<uint16_t>(tr ? 16 * D : 0);
    f.qt16 = ws.take<uint16_t>(tr ? 16 * D : 0);
    // Two blocks each: amx_rows_t's pipeline (S^T one block ahead, P V one block late).
    f.pt16 = ws.take<uint16_t>(tr ? 2 * kAmxBlockT : 0);
    f.pt16_residual = ws.take<uint16_t>(tr && a.out_float ? 2 * kAmxBlockT : 0);
    f.st = ws.take<float>(tr ? 2 * kAmxBlockT : 0);
    f.ot = ws.take<float>(tr ? D * 16 : 0);
    f.v16 = ws.take<uint16_t>(tiles ? nkb * BK * D : 0);
    f.q16 = ws.take<uint16_t>(tiles ? BQ * D : 0);
    f.p16 = ws.take<uint16_t>(tiles ? BQ * BK : 0);
    f.qbuf = ws.take<S>(BQ * D);
    f.sbuf = ws.take<S>(decode() ? nkb * BK : BQ * BK);
    f.obuf = ws.take<S>(BQ * D);
    f.m = ws.take<S>(BQ);
    f.m_new = ws.take<S>(BQ);
    f.l = ws.take<S>(BQ);
    f.bits = ws.take<uint64_t>(kBlockBitWords);
    f.bit0 = ws.take<int64_t>(BQ);
    return f;
  }

  void forward(int64_t task, void* workspace) const {
    const int64_t qc = a.query_chunks;
    const int64_t b = task / (H * qc), h = task / qc % H, chunk = task % qc;
    Workspace ws{static_cast<char*>(workspace)};
    const FwdScratch f = fwd_scratch(ws);
    int64_t nvis = Lk;
    const S* kbias = key_bias(b, f.kbias, nvis);
    if (decode()) return forward_decode(b, h, f, kbias);
    const int64_t nqb = (Lq + BQ - 1) / BQ;
    const int64_t vis_blocks = (nvis + BK - 1) / BK;

    // This head's keys, packed transposed once (the key blocks its rows can see), and the values
    // as S rows unless they already are.
    const int64_t kmax = imin(vis_blocks, key_blocks_for(0, Lq));
    const bool tiles = amx();
    const bool transposed = tiles && amx_transposed();
    const bool tscores = transposed_scores();
    if (tiles) {
      amx_begin();
      for (int64_t kb = 0; kb < kmax; ++kb) amx_pack_block(b, h, kb, imin(BK, nvis - kb * BK), f, transposed);
    } else if (!tscores) {
      for (int64_t kb = 0; kb < kmax; ++kb)
        pack_rows_t(a.k, a.k_stride, b, h, kb * BK, imin(BK, nvis - kb * BK), f.kt + kb * D * BK);
    }
    const bool direct_v = sizeof(T) == sizeof(S);
    if (!direct_v && !tiles) load_rows(a.v, a.v_stride, b, h, 0, Lk, f.vbuf);

    // Query blocks of this chunk: chunk c takes blocks c and 2 qc - 1 - c of every 2 qc, so a
    // causal mask (later rows see more keys) costs every chunk about the same.
    for (int64_t qb = 0; qb < nqb; ++qb) {
      const int64_t pos = qb % (2 * qc);
      if (pos != chunk && pos != 2 * qc - 1 - chunk) continue;
      const int64_t i0 = qb * BQ, mq = imin(BQ, Lq - i0);
      if (tscores) {
        forward_block_t(b, h, i0, mq, kbias, nvis, f);
        continue;
      }
      if (transposed) {
        for (int64_t g0 = i0; g0 < i0 + mq; g0 += 16) amx_rows_t(b, h, g0, imin(16, i0 + mq - g0), kbias, nvis, f);
        continue;
      }
      if (tiles) amx_load_queries(b, h, i0, mq, f);  // bf16 as given: mask_row scales S
      else load_rows(a.q, a.q_stride, b, h, i0, mq, f.qbuf, c);  // pre-scaled: S comes out in log2 units
      const S smul = tiles ? c : S(1);
      for (int64_t r = 0; r < mq; ++r) f.m[r] = neg_inf, f.l[r] = S(0);
      const int64_t kend = imin(vis_blocks, key_blocks_for(i0, mq));
      // One key block (short sequences: L <= BK): a plain softmax, nothing to rescale; P is
      // normalised before P V, which then writes the output rows directly when they are S.
      const bool single = kend == 1;
      const bool in_out = single && direct_v;
      S* o = in_out ? static_cast<S*>(a.out) + ((b * H + h) * Lq + i0) * D : f.obuf;
      if (!single)
        for (int64_t x = 0; x < mq * D; ++x) f.obuf[x] = S(0);

      for (int64_t kb = 0; kb < kend; ++kb) {
        if (key_block_all_padded(b, kb)) continue;
        const int64_t j0 = kb * BK, nk = imin(BK, nvis - j0), np = padded(nk);
        // Causal: rows above the block's first key see none of it and keep their state, so the
        // block's products and softmax start at row r0 (the float32 path; a query block's last
        // key block is often 2/3 hidden). r0 < mq: kend stops at the last row's block.
        const int64_t r0 = a.causal && !tiles ? imax(0, j0 - i0) : 0;
        if (tiles) amx_scores(mq, np, kb, f);
        else Gemm::run(mq - r0, np, D, f.qbuf + r0 * D, D, 1, f.kt + kb * D * BK, BK, f.sbuf + r0 * BK, BK, false);
        // Three passes over the rows, each short and independent per row, so the out-of-order
        // core overlaps rows (one long chain per row, max -> exp -> sum -> 1 / l, stalls on
        // latency at short lengths).
        for (int64_t r = r0; r < mq; ++r) {  // masks and running maxima
          S* srow = f.sbuf + r * BK;
          mask_row(srow, b, h, i0 + r, j0, kbias, smul);
          V mx = V::load(srow);
          for (int64_t j = W; j < np; j += W) mx = V::max(mx, V::load(srow + j));
          f.m_new[r] = imax_s(f.m[r], mx.reduce_max());
        }
        for (int64_t r = r0; r < mq; ++r) {  // exponentials, sums, rescaling
          S* srow = f.sbuf + r * BK;
          const S m_new = f.m_new[r];
          if (m_new == neg_inf) {  // nothing visible yet in this row
            // unless a score is NaN (a NaN or Inf input; the max skips NaN): the row is NaN, as torch's
            if (any_nan(srow, np)) f.l[r] = nan_s();
            for (int64_t j = 0; j < np; ++j) srow[j] = S(0);
            continue;
          }
          // Rescale what the row holds so far only when its running max moved (and it holds
          // something: a first visible block starts from O = 0, l = 0).
          const S m_old = f.m[r];
          const S alpha = m_old == m_new ? S(1) : m_old == neg_inf ? S(0) : exp2_scalar(m_old - m_new);
          const V mv = V::set1(m_new);
          V sum = V::zero();
          for (int64_t j = 0; j < np; j += W) {
            const V p = V::exp2(V::load(srow + j) - mv);
            p.store(srow + j);
            sum = sum + p;
          }
          f.l[r] = f.l[r] * alpha + sum.reduce_add();
          f.m[r] = m_new;
          if (!in_out && alpha != S(1) && alpha != S(0)) scale_row(f.obuf + r * D, alpha, D);
        }
        if (a.dropout.enabled) block_keep_bits(b, h, i0, mq, j0, nk, f.bits, f.bit0);
        if (in_out || a.dropout.enabled)
          for (int64_t r = r0; r < mq; ++r) {  // normalisation, dropout
            S* srow = f.sbuf + r * BK;
            if (in_out && f.m[r] != neg_inf) scale_row(srow, S(1) / f.l[r], np);
            if (a.dropout.enabled) apply_keep_bits(srow, nk, f.bits, f.bit0[r]);
          }
        if (tiles) {
          amx_pv(mq, nk, np, kb, f, !single);
          continue;
        }
        const S* vrows = direct_v ? reinterpret_cast<const S*>(row(a.v, a.v_stride, b, h, j0)) : f.vbuf + j0 * D;
        const int64_t ldv = direct_v ? a.v_stride[2] : D;
        Gemm::run(mq - r0, D, nk, f.sbuf + r0 * BK, BK, 1, vrows, ldv, o + r0 * D, D, !single);
      }
      finish_rows(b, h, i0, mq, f, in_out);
    }
    if (tiles) amx_end();
  }

  // Query rows [i0, i0 + mq) of the float32 forward on transposed blocks: S^T = K Q^T per key
  // block, key rows by query lanes, so each vector holds one key's scores for W query rows. The
  // online softmax's running max and sum are then lane-wise vector operations down the key rows:
  // no horizontal max and sum per row and block, no per-row scalar work. K is read in place as
  // the product's broadcast operand, Q^T packed once per query block (unscaled: the exponent is
  // s * c - m, one FMA), and P^T feeds O += P V as a strided operand. Padded keys past the last
  // visible one are not rows at all.
  void forward_block_t(int64_t b, int64_t h, int64_t i0, int64_t mq, const S* kbias, int64_t nvis,
                       const FwdScratch& f) const {
    const int64_t npq = padded(mq);
    pack_rows_t(a.q, a.q_stride, b, h, i0, mq, f.qbuf, BQ);  // Q^T: D rows of BQ query lanes
    for (int64_t q = 0; q < npq; q += W) V::set1(neg_inf).store(f.m + q), V::zero().store(f.l + q);
    const int64_t kend = imin((nvis + BK - 1) / BK, key_blocks_for(i0, mq));
    // One key block: O = P V goes straight into obuf, with nothing to rescale or zero first.
    const bool single = kend == 1;
    if (!single)
      for (int64_t x = 0; x < mq * D; ++x) f.obuf[x] = S(0);
    const S* k0 = reinterpret_cast<const S*>(row(a.k, a.k_stride, b, h, 0));
    const S* v0 = reinterpret_cast<const S*>(row(a.v, a.v_stride, b, h, 0));
    const int64_t ks = a.k_stride[2], vs = a.v_stride[2];
    const V cv = V::set1(c), lowest = V::set1(std::numeric_limits<S>::lowest());
    S* st = f.sbuf;  // S^T, then P^T: BK key rows of BQ lanes
    for (int64_t kb = 0; kb < kend; ++kb) {
      if (key_block_all_padded(b, kb)) continue;
      const int64_t j0 = kb * BK;
      // Causal: query rows above r0 see none of this block (kend stops at the last row's block,
      // so r0 < mq), whole vectors of lanes from q0 on are computed; keys past the last row are
      // seen by no row of this query block and are not computed.
      const int64_t nk = imin(imin(BK, nvis - j0), a.causal ? i0 + mq - j0 : BK);
      const int64_t r0 = a.causal ? imax(0, j0 - i0) : 0, q0 = r0 / W * W;
      // S^T. Causal, a block across the diagonal: lanes [q, q_end) need only the keys up to their
      // last query, so S^T goes in groups of 3 vectors, each over the key rows it needs (the rows
      // past them are -inf by the causal fill below). A block 6 vectors wide (AVX-512, 96 lanes)
      // as 4 x 6 register tiles: run()'s panels of 4 vectors would leave a 2-vector panel of
      // 8 x 2 tiles, a load per 1.6 FMAs.
      const bool diagonal = a.causal && i0 + q0 + W < j0 + nk;
      if (diagonal) {
        for (int64_t q = q0; q < npq; q += 3 * W) {
          const int64_t q_end = imin(q + 3 * W, npq), rows = imin(nk, i0 + q_end - j0);
          Gemm::run(rows, q_end - q, D, k0 + j0 * ks, ks, 1, f.qbuf + q, BQ, st + q, BQ, false);
        }
      } else if (W == 16 && npq - q0 == 96) {
        Gemm::template panel<6, 4>(nk, D, k0 + j0 * ks, ks, 1, f.qbuf + q0, BQ, st + q0, BQ, W, false);
      } else {
        Gemm::run(nk, npq - q0, D, k0 + j0 * ks, ks, 1, f.qbuf + q0, BQ, st + q0, BQ, false);
      }
      for (int64_t j = 0; j < nk; ++j) {
        if (kbias && kbias[j0 + j] == neg_inf) fill_neg_inf(st + j * BQ, q0, npq);  // a padded key inside
        else if (a.causal) fill_neg_inf(st + j * BQ, q0, imin(j0 + j - i0, npq));  // rows i < key j
      }
      for (int64_t q = q0; q < npq; q += W) {
        // The block's max per lane in four chains, the running max (log2 units) updated.
        V mx[4] = {V::set1(neg_inf), V::set1(neg_inf), V::set1(neg_inf), V::set1(neg_inf)};
        int64_t j = 0;
        for (; j + 4 <= nk; j += 4)
          for (int u = 0; u < 4; ++u) mx[u] = V::max(mx[u], V::load(st + (j + u) * BQ + q));
        for (; j < nk; ++j) mx[0] = V::max(mx[0], V::load(st + j * BQ + q));
        const V m_old = V::load(f.m + q);
        const V m_new = V::max(m_old, V::max(V::max(mx[0], mx[1]), V::max(mx[2], mx[3])) * cv);
        // Subtracted in the exponent: a lane with nothing visible yet (-inf) subtracts a finite
        // number, so its -inf scores give 0, not NaN.
        const V m_sub = V::max(m_new, lowest);
        V l = V::load(f.l + q);
        if (!V::all_equal(m_old, m_new)) {  // rescale what the lanes whose max moved hold so far
          const V alpha = V::exp2(m_old - m_sub);
          l = l * alpha;
          if (!single) {
            S al[W], mo[W];
            alpha.store(al), m_old.store(mo);
            for (int u = 0; u < W && q + u < mq; ++u)
              if (al[u] != S(1) && mo[u] != neg_inf) scale_row(f.obuf + (q + u) * D, al[u], D);
          }
          m_new.store(f.m + q);
        }
        const V neg_m = V::zero() - m_sub;
        V l1 = V::zero();
        // P^T, with dropout's keep * 1 / (1 - p) applied after the sums (l is over all of P).
        const auto exps = [&](auto dropping) {
          constexpr bool kDrop = decltype(dropping)::value;
          uint32_t keep[BK];
          if constexpr (kDrop) transposed_keep_words(b, h, i0 + q, j0, nk, keep);
          const V zs = V::set1(static_cast<S>(a.dropout.scale));
          const auto put = [&](S* at, V p, int64_t jj) {
            if constexpr (kDrop) (V::keep(keep[jj], p) * zs).store(at);
            else p.store(at);
          };
          int64_t jj = 0;
          for (; jj + 2 <= nk; jj += 2) {
            S* s0 = st + jj * BQ + q;
            const V p0 = V::exp2(V::fma(V::load(s0), cv, neg_m));
            const V p1 = V::exp2(V::fma(V::load(s0 + BQ), cv, neg_m));
            l = l + p0, l1 = l1 + p1;
            put(s0, p0, jj), put(s0 + BQ, p1, jj + 1);
          }
          if (jj < nk) {
            const V p0 = V::exp2(V::fma(V::load(st + jj * BQ + q), cv, neg_m));
            l = l + p0;
            put(st + jj * BQ + q, p0, jj);
          }
        };
        if (a.dropout.enabled) exps(std::true_type{});
        else exps(std::false_type{});
        (l + l1).store(f.l + q);
      }
      const S* vb = v0 + j0 * vs;
      if (single && !diagonal) {
        // One key block: l is final, so O = P V goes to the output normalised (1 / l as the
        // product's row scale) with no pass over O of its own. A fully masked row (l = 0, P = 0)
        // gets 0, a row with a NaN score NaN (its P holds it).
        S* inv_l = f.m_new;
        for (int64_t q = 0; q < npq; q += W) {
          const V l = V::load(f.l + q);
          V::where_positive(l, V::set1(S(1)) / l).store(inv_l + q);
        }
        S* out = static_cast<S*>(a.out) + ((b * H + h) * Lq + i0) * D;
        Gemm::run(mq - r0, D, nk, st + r0, 1, BQ, vb, vs, out + r0 * D, D, false, inv_l + r0);
        finish_rows(b, h, i0, mq, f, true);
        return;
      }
      if (!diagonal) {
        Gemm::run(mq - r0, D, nk, st + r0, 1, BQ, vb, vs, f.obuf + r0 * D, D, !single);
        continue;
      }
      // Across the diagonal, each register tile's rows sum only over the keys they can see.
      constexpr int R = V::rows_for(V::kTileNV);
      for (int64_t r = r0; r < mq; r += R) {
        const int64_t r_end = imin(r + R, mq);
        Gemm::run(r_end - r, D, imin(nk, i0 + r_end - j0), st + r, 1, BQ, vb, vs, f.obuf + r * D, D, !single);
      }
    }
    finish_rows(b, h, i0, mq, f);
  }

  // Lanes [from, to) of a row of BQ lanes to -inf; `from` is a whole number of vectors.
  static void fill_neg_inf(S* x, int64_t from, int64_t to) {
    const V n = V::set1(-__builtin_inf());
    int64_t q = from;
    for (; q + W <= to; q += W) n.store(x + q);
    if (q < to) n.store_partial(x + q, static_cast<int>(to - q));
  }

  // --- the AMX hooks of the forward (attention_amx.h); only called where amx() ---------------

  static int64_t tiles_of(int64_t n) { return (n + 15) / 16; }

  void amx_begin() const {
#ifdef AIAYN_AMX_TILES
    amx_configure();
#endif
  }
  void amx_end() const {
#ifdef AIAYN_AMX_TILES
    _tile_release();
#endif
  }

  // Rows [i0, i0 + m) of a bf16 (b, h) slice as rows of D at dst, zero rows up to `rows`.
  void copy_rows16(const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t i0, int64_t m, int64_t rows,
                   uint16_t* dst) const {
    for (int64_t r = 0; r < m; ++r) std::memcpy(dst + r * D, row(base, stride, b, h, i0 + r), D * sizeof(uint16_t));
    std::memset(dst + m * D, 0, (rows - m) * D * sizeof(uint16_t));
  }

  // Key block kb (n keys) of this head into its Q K^T and P V tiles (transposed: V^T tiles, and
  // the keys of a partial last tile zero-padded; the other keys are read in place).
  void amx_pack_block(int64_t b, int64_t h, int64_t kb, int64_t n, const FwdScratch& f, bool transposed) const {
#ifdef AIAYN_AMX_TILES
    const int64_t j0 = kb * BK;
    if (transposed) {
      attention_amx_pack_values_t(reinterpret_cast<const uint16_t*>(row(a.v, a.v_stride, b, h, j0)), a.v_stride[2], n,
                                  D, f.v16 + kb * BK * D);
      if (n % 16) {
        const int64_t t0 = n / 16 * 16;
        copy_rows16(a.k, a.k_stride, b, h, j0 + t0, n - t0, 16, f.ktail);
      }
      return;
    }
    attention_amx_pack_keys(reinterpret_cast<const uint16_t*>(row(a.k, a.k_stride, b, h, j0)), a.k_stride[2], n, D,
                            f.k16 + kb * BK * D);
    attention_amx_pack_values(reinterpret_cast<const uint16_t*>(row(a.v, a.v_stride, b, h, j0)), a.v_stride[2], n, D,
                              f.v16 + kb * BK * D);
#else
    (void)b, (void)h, (void)kb, (void)n, (void)f, (void)transposed;
#endif
  }

  // Query rows [g0, g0 + m) (m <= 16) through every key block they see, on the transposed tiles;
  // finishes the rows (out, lse) through finish_rows.
  void amx_rows_t(int64_t b, int64_t h, int64_t g0, int64_t m, const S* kbias, int64_t nvis, const FwdScratch& f) const {
#ifdef AIAYN_AMX_TILES
    if constexpr (sizeof(T) == 2) {
      // Q^T straight from q for a whole group (its rows' pairs are 32-bit aligned at an even
      // stride), else from rows copied and zero-padded to 16.
      if (m == 16 && a.q_stride[2] % 2 == 0) {
        attention_amx_queries_t(reinterpret_cast<const uint16_t*>(row(a.q, a.q_stride, b, h, g0)), a.q_stride[2], D,
                                f.qt16);
      } else {
        copy_rows16(a.q, a.q_stride, b, h, g0, m, 16, f.q16);
        attention_amx_queries_t(f.q16, D, D, f.qt16);
      }
      __m512 mv = _mm512_set1_ps(neg_inf), lv = _mm512_setzero_ps();
      const int64_t kend = imin((nvis + BK - 1) / BK, key_blocks_for(g0, m));
      const uint16_t* k0 = reinterpret_cast<const uint16_t*>(row(a.k, a.k_stride, b, h, 0));
      const bool resident = D <= 64;  // O^T in tiles tmm4..7 across the key blocks
      if (resident) amx_o_zero(D);
      else std::memset(f.ot, 0, D * 16 * sizeof(float));
      auto visible_from = [&](int64_t kb) {
        while (kb < kend && key_block_all_padded(b, kb)) ++kb;
        return kb;
      };
      auto scores = [&](int64_t kb, float* st) {
        const int64_t j0 = kb * BK, nk = imin(BK, nvis - j0);
        attention_amx_scores_t(k0 + j0 * a.k_stride[2], a.k_stride[2], tiles_of(nk), nk % 16 ? f.ktail : nullptr,
                               f.qt16, D, st);
      };
      // out_float: P's bf16 rounding residual goes through P V too (see amx_pv).
      uint16_t* residual = a.out_float ? f.pt16_residual : nullptr;
      // Software-pipelined over key blocks: the next block's S^T product is issued before this
      // block's softmax, and this block's P V after the next block's softmax (S^T and P^T alternate
      // between two buffers), so neither the softmax's vector loads nor the P V's tile loads wait
      // for stores just made by the other unit. A max that moves rescales O^T after the previous
      // block's P V (O = alpha (O + P_prev V_prev) + P V).
      auto pv = [&](int64_t pkb, int64_t pnk, int64_t slot) {
        const int64_t kc = (pnk + 31) / 32;
        attention_amx_pv_t(f.pt16 + slot * kAmxBlockT, kc, f.v16 + pkb * BK * D, D, f.ot, resident);
        if (residual) attention_amx_pv_t(residual + slot * kAmxBlockT, kc, f.v16 + pkb * BK * D, D, f.ot, resident);
      };
      int64_t kb = visible_from(0), pending = -1, pending_nk = 0, pending_slot = 0;
      if (kb < kend) scores(kb, f.st);
      for (int64_t step = 0; kb < kend; ++step) {
        const int64_t next = visible_from(kb + 1), slot = step & 1;
        float* st = f.st + slot * kAmxBlockT;
        if (next < kend) scores(next, f.st + (slot ^ 1) * kAmxBlockT);
        const int64_t j0 = kb * BK, nk = imin(BK, nvis - j0);
        __m512 alpha;
        const bool rescale = attention_amx_softmax_t(st, nk, c, kbias ? kbias + j0 : nullptr, a.causal, j0 - g0, mv, lv,
                                                     alpha, f.pt16 + slot * kAmxBlockT,
                                                     residual ? residual + slot * kAmxBlockT : nullptr);
        if (pending >= 0) pv(pending, pending_nk, pending_slot);
        if (rescale) amx_rescale_o(f.ot, D, resident, alpha);
        pending = kb, pending_nk = nk, pending_slot = slot;
        kb = next;
      }
      if (pending >= 0) pv(pending, pending_nk, pending_slot);
      if (resident) amx_o_store(f.ot, D);
      _mm512_storeu_ps(f.m, mv);
      _mm512_storeu_ps(f.l, lv);
      for (int64_t t = 0; t < D / 16; ++t) Vec::transpose(f.ot + t * 256, 16, f.obuf + t * 16, D);
      finish_rows(b, h, g0, m, f);
    }
#else
    (void)b, (void)h, (void)g0, (void)m, (void)kbias, (void)nvis, (void)f;
#endif
  }

  // Query rows [i0, i0 + m) as bf16 rows of D, zero rows up to whole tiles; P's rows past m zero.
  void amx_load_queries(int64_t b, int64_t h, int64_t i0, int64_t m, const FwdScratch& f) const {
    const int64_t rows = tiles_of(m) * 16;
    copy_rows16(a.q, a.q_stride, b, h, i0, m, rows, f.q16);
    std::memset(f.p16 + m * BK, 0, (rows - m) * BK * sizeof(uint16_t));
  }

  // S rows [0, m) x keys [0, np) of key block kb into f.sbuf (unscaled).
  void amx_scores(int64_t m, int64_t np, int64_t kb, const FwdScratch& f) const {
#ifdef AIAYN_AMX_TILES
    if constexpr (sizeof(T) == 2) attention_amx_scores(f.q16, D, tiles_of(m), f.k16 + kb * BK * D, np / 16, f.sbuf);
#else
    (void)m, (void)np, (void)kb, (void)f;
#endif
  }

  // O (f.obuf) (+)= P V for key block kb: P's rows (f.sbuf) rounded to bf16, zero past np up to
  // the 32-key chunks the product reads.
  void amx_pv(int64_t m, int64_t nk, int64_t np, int64_t kb, const FwdScratch& f, bool accumulate) const {
    const int64_t kc = (nk + 31) / 32;
    for (int64_t r = 0; r < m; ++r) {
      const S* srow = f.sbuf + r * BK;
      uint16_t* prow = f.p16 + r * BK;
      for (int64_t j = 0; j < np; j += W) V::load(srow + j).store(prow + j);
      for (int64_t j = np; j < kc * 32; ++j) prow[j] = 0;
    }
#ifdef AIAYN_AMX_TILES
    if constexpr (sizeof(T) == 2) {
      attention_amx_pv(f.p16, tiles_of(m), f.v16 + kb * BK * D, D, kc, f.obuf, accumulate);
      if (a.out_float) {
        // For the backward (out_float): P's bf16 rounding residual through the same tiles, so O is
        // sum_j p_j v_j with p_j as float32 as the backward recomputes it. Otherwise delta = dO . O
        // would disagree with the backward's P by P's rounding, an error in dS of O's size.
        for (int64_t r = 0; r < m; ++r) {
          const S* srow = f.sbuf + r * BK;
          uint16_t* prow = f.p16 + r * BK;
          for (int64_t j = 0; j < np; j += W) (V::load(srow + j) - V::load(prow + j)).store(prow + j);
        }
        attention_amx_pv(f.p16, tiles_of(m), f.v16 + kb * BK * D, D, kc, f.obuf, true);
      }
    }
#else
    (void)kb, (void)accumulate;
#endif
  }

  // out = O / l and the log-sum-exp, for rows [i0, i0 + mq) held in f.obuf, f.m, f.l.
  // in_out: P was normalised and the rows are in `out` already (only the special rows change).
  void finish_rows(int64_t b, int64_t h, int64_t i0, int64_t mq, const FwdScratch& f,
                   bool in_out = false) const {
    const int64_t offset = ((b * H + h) * Lq + i0) * D;
    if (sizeof(T) != sizeof(S) && a.out_float) finish_rows_to(static_cast<S*>(a.out) + offset, b, h, i0, mq, f, in_out);
    else finish_rows_to(static_cast<T*>(a.out) + offset, b, h, i0, mq, f, in_out);
  }
  template <typename O>
  void finish_rows_to(O* out, int64_t b, int64_t h, int64_t i0, int64_t mq, const FwdScratch& f,
                      bool in_out) const {
    const auto cast = [](S x) -> O {
      if constexpr (std::is_same_v<O, S>) return x;
      else return from_s(x);
    };
    S* lse = static_cast<S*>(a.lse) + (b * H + h) * Lq + i0;
    // The log-sum-exps W rows at a time (fully masked rows, l = 0, are set below).
    for (int64_t r = 0; r < mq; r += W) {
      const int n = static_cast<int>(imin(W, mq - r));
      V::log_sum_exp(V::load_partial(f.m + r, n), V::load_partial(f.l + r, n)).store_partial(lse + r, n);
    }
    for (int64_t r = 0; r < mq; ++r) {
      const S lr = f.l[r];
      if (lr == S(0)) {  // a fully masked row: zeros, and +inf so the backward sees P = 0
        for (int64_t d = 0; d < D; ++d) out[r * D + d] = cast(S(0));
        lse[r] = __builtin_inf();
        continue;
      }
      if (in_out) {
        if (lr != lr)  // a NaN score: the row was zeroed, NaN as O / l gives it
          for (int64_t d = 0; d < D; ++d) out[r * D + d] = cast(lr);
        continue;
      }
      const V inv = V::set1(S(1) / lr);
      const int64_t full = D / W * W;
      for (int64_t d = 0; d < full; d += W) (V::load(f.obuf + r * D + d) * inv).store(out + r * D + d);
      if (full < D) {
        const int t = static_cast<int>(D - full);
        (V::load_partial(f.obuf + r * D + full, t) * inv).store_partial(out + r * D + full, t);
      }
    }
  }

  static void scale_row(S* x, S alpha, int64_t n) {
    const V av = V::set1(alpha);
    int64_t d = 0;
    for (; d + W <= n; d += W) (V::load(x + d) * av).store(x + d);
    for (; d < n; ++d) x[d] *= alpha;
  }

  // out[j] = q . k_{j0 + j} for j < n, four keys at a time (independent accumulator chains).
  void dot_keys(const S* q, int64_t b, int64_t h, int64_t j0, int64_t n, S* out) const {
    const int64_t full = D / W * W;
    const int tail = static_cast<int>(D - full);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const T* k0 = row(a.k, a.k_stride, b, h, j0 + j);
      const int64_t ks = a.k_stride[2];
      V acc[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
      for (int64_t d = 0; d < full; d += W) {
        const V qv = V::load(q + d);
        for (int u = 0; u < 4; ++u) acc[u] = V::fma(qv, V::load(k0 + u * ks + d), acc[u]);
      }
      if (tail) {
        const V qv = V::load_partial(q + full, tail);
        for (int u = 0; u < 4; ++u) acc[u] = V::fma(qv, V::load_partial(k0 + u * ks + full, tail), acc[u]);
      }
      for (int u = 0; u < 4; ++u) out[j + u] = acc[u].reduce_add();
    }
    for (; j < n; ++j) {
      const T* krow = row(a.k, a.k_stride, b, h, j0 + j);
      V acc = V::zero();
      for (int64_t d = 0; d < full; d += W) acc = V::fma(V::load(q + d), V::load(krow + d), acc);
      if (tail) acc = V::fma(V::load_partial(q + full, tail), V::load_partial(krow + full, tail), acc);
      out[j] = acc.reduce_add();
    }
  }

  // The decode path: per query row, scores as dot products against every key (read straight from
  // k, in its own dtype), an exact two-pass softmax over the row, then sum_j p_j v_j.
  void forward_decode(int64_t b, int64_t h, const FwdScratch& f, const S* kbias) const {
    load_rows(a.q, a.q_stride, b, h, 0, Lq, f.qbuf, c);
    for (int64_t i = 0; i < Lq; ++i) {
      const S* qrow = f.qbuf + i * D;
      S* srow = f.sbuf;
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const int64_t j0 = kb * BK, nk = imin(BK, Lk - j0);
        if (key_block_all_padded(b, kb)) {
          for (int64_t j = 0; j < BK; ++j) srow[j0 + j] = neg_inf;
          continue;
        }
        dot_keys(qrow, b, h, j0, nk, srow + j0);
        mask_row(srow + j0, b, h, i, j0, kbias);
        for (int64_t j = padded(nk); j < BK; ++j) srow[j0 + j] = neg_inf;
      }
      V mx = V::set1(neg_inf);
      for (int64_t j = 0; j < nkb * BK; j += W) mx = V::max(mx, V::load(srow + j));
      const S m = mx.reduce_max();
      f.m[i] = m;
      f.l[i] = S(0);
      S* orow = f.obuf + i * D;
      for (int64_t d = 0; d < D; ++d) orow[d] = S(0);
      if (m == neg_inf) {  // fully masked, unless a score is NaN (the max skips NaN): then NaN
        if (any_nan(srow, nkb * BK)) f.l[i] = nan_s();
        continue;
      }
      const V mv = V::set1(m);
      V sum = V::zero();
      for (int64_t j = 0; j < nkb * BK; j += W) {
        const V p = V::exp2(V::load(srow + j) - mv);
        p.store(srow + j);
        sum = sum + p;
      }
      f.l[i] = sum.reduce_add();
      if (a.dropout.enabled)
        for (int64_t kb = 0; kb < nkb; ++kb)
          apply_dropout(srow + kb * BK, b, h, i, kb * BK, imin(BK, Lk - kb * BK), f.bits);
      // o = sum_j p_j v_j.
      if constexpr (sizeof(T) == sizeof(S)) {
        Gemm::run(1, D, Lk, srow, 0, 1, reinterpret_cast<const S*>(row(a.v, a.v_stride, b, h, 0)), a.v_stride[2],
                  orow, D, false);
      } else {
        for (int64_t d = 0; d < D; d += W) {
          const int n = static_cast<int>(imin(W, D - d));
          V acc = V::zero();
          for (int64_t j = 0; j < Lk; ++j) {
            const T* vrow = row(a.v, a.v_stride, b, h, j) + d;
            acc = V::fma(V::set1(srow[j]), n == W ? V::load(vrow) : V::load_partial(vrow, n), acc);
          }
          if (n == W) acc.store(orow + d);
          else acc.store_partial(orow + d, n);
        }
      }
    }
    finish_rows(b, h, 0, Lq, f);
  }

  static S imax_s(S x, S y) { return x > y ? x : y; }
  static S nan_s() { return static_cast<S>(__builtin_nan("")); }
  static bool any_nan(const S* x, int64_t n) {
    for (int64_t j = 0; j < n; ++j)
      if (x[j] != x[j]) return true;
    return false;
  }
  static S exp2_scalar(S x) { return V::exp2(V::set1(x)).reduce_max(); }

  // P(i, j) *= keep(i, j) / (1 - p) for keys [j0, j0 + n).
  void apply_dropout(S* prow, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n,
                     uint64_t* bits) const {
    const int64_t e0 = dropout_base(b, h, i, j0);
    apply_keep_bits(prow, n, bits, fill_keep_bits(a.dropout, e0, e0 + n, bits));
  }
  // The same with the row's keep-bits at bit `bit0` of `bits` (block_keep_bits).
  void apply_keep_bits(S* prow, int64_t n, const uint64_t* bits, int64_t bit0) const {
    const V sv = V::set1(static_cast<S>(a.dropout.scale));
    for (int64_t j = 0; j < padded(n); j += W)
      (V::keep(extract_bits(bits, bit0 + j, W), V::load(prow + j)) * sv).store(prow + j);
  }

  // Keep-bits of rows [i0, i0 + m) over keys [j0, j0 + n), all before any row uses them, so the
  // rows' Philox passes are independent work the core overlaps (a pass per row, used at once, runs
  // its ten dependent rounds alone). When one block holds every key, consecutive rows are
  // consecutive elements of the numbering: one span for the whole block, every lane used (a short
  // row of 48 keys alone fills 12 of 16). Row r's bits start at bit0[r] of `bits`.
  static constexpr int64_t kRowBitWords = keep_bits_words(BK);
  static constexpr int64_t kBlockBitWords = BQ * kRowBitWords;
  static_assert(kBlockBitWords >= keep_bits_words(BQ * BK), "room for a whole block's span");
  void block_keep_bits(int64_t b, int64_t h, int64_t i0, int64_t m, int64_t j0, int64_t n, uint64_t* bits,
                       int64_t* bit0) const {
    if (j0 == 0 && Lk <= BK) {  // one key block: row r's keys at r * Lk (a padded tail included)
      const int64_t e0 = dropout_base(b, h, i0, 0);
      const int64_t first = fill_keep_bits(a.dropout, e0, e0 + m * Lk, bits);
      for (int64_t r = 0; r < m; ++r) bit0[r] = first + r * Lk;
      return;
    }
    for (int64_t r = 0; r < m; ++r) {
      const int64_t e0 = dropout_base(b, h, i0 + r, j0);
      bit0[r] = r * kRowBitWords * 64 + fill_keep_bits(a.dropout, e0, e0 + n, bits + r * kRowBitWords);
    }
  }

  // --- backward --------------------------------------------------------------------------

  struct BwdScratch {
    S *qf, *dof, *delta, *lse2, *kt, *vt, *krows, *sbuf, *pz, *dk, *dv, *kbias;
    uint64_t* bits;
    int64_t* bit0;
  };
  BwdScratch bwd_scratch(Workspace& ws) const {
    BwdScratch f{};
    f.kbias = ws.take<S>(a.key_padding ? nkb * BK : 0);
    f.qf = ws.take<S>(Lq * D);
    f.dof = ws.take<S>(Lq * D);
    f.delta = ws.take<S>(Lq);
    f.lse2 = ws.take<S>(Lq);
    f.kt = ws.take<S>(D * BK);
    f.vt = ws.take<S>(D * BK);
    f.krows = ws.take<S>(BK * D);
    f.sbuf = ws.take<S>(BQ * BK);
    f.pz = ws.take<S>(BQ * BK);
    f.dk = ws.take<S>(BK * D);
    f.dv = ws.take<S>(BK * D);
    f.bits = ws.take<uint64_t>(kBlockBitWords);
    f.bit0 = ws.take<int64_t>(BQ);
    return f;
  }

  void backward(int64_t task, void* workspace) const {
    const int64_t kc = a.key_chunks;
    const int64_t b = task / (H * kc), h = task / kc % H, chunk = task % kc;
    const int64_t kb_begin = nkb * chunk / kc, kb_end = nkb * (chunk + 1) / kc;
    Workspace ws{static_cast<char*>(workspace)};
    const BwdScratch f = bwd_scratch(ws);
    int64_t nvis = Lk;
    const S* kbias = key_bias(b, f.kbias, nvis);
    // The whole head's queries, output gradients, row terms delta_i = dO_i . O_i and the
    // log2-domain log-sum-exp, as S: O(Lq) memory per task.
    load_rows(a.q, a.q_stride, b, h, 0, Lq, f.qf);
    load_rows(a.grad_out, a.grad_out_stride, b, h, 0, Lq, f.dof);
    const S* lse = static_cast<const S*>(a.lse) + (b * H + h) * Lq;
    const auto row_terms = [&](const auto* out) {
      const int64_t full = D / W * W;
      const int dtail = static_cast<int>(D - full);
      for (int64_t i = 0; i < Lq; ++i) {
        // W partial sums (a vector accumulator) then a tree: as accurate as torch's float sum.
        const S* dorow = f.dof + i * D;
        const auto* orow = out + i * D;
        V acc = V::zero();
        for (int64_t d = 0; d < full; d += W) acc = V::fma(V::load(dorow + d), V::load(orow + d), acc);
        if (dtail) acc = V::fma(V::load_partial(dorow + full, dtail), V::load_partial(orow + full, dtail), acc);
        f.delta[i] = acc.reduce_add();
        f.lse2[i] = lse[i] * static_cast<S>(kLog2e);  // +inf stays +inf
      }
    };
    if (sizeof(T) != sizeof(S) && a.out_float) row_terms(static_cast<const S*>(a.out) + (b * H + h) * Lq * D);
    else row_terms(static_cast<const T*>(a.out) + (b * H + h) * Lq * D);
    S* dq = static_cast<S*>(a.grad_q_partial) + ((b * H + h) * kc + chunk) * Lq * D;
    // A task of one key block (short sequences) writes each dQ row at most once: it overwrites
    // them and zeroes only the rows it does not reach; otherwise dQ accumulates from zero.
    const bool one_kb = kb_end - kb_begin == 1;
    if (!one_kb)
      for (int64_t x = 0; x < Lq * D; ++x) dq[x] = S(0);
    // dK and dV go straight into the output rows when those are S.
    constexpr bool direct = sizeof(T) == sizeof(S);

    const S scale = static_cast<S>(a.scale);
    T* gk = static_cast<T*>(a.grad_k) + (b * H + h) * Lk * D;
    T* gv = static_cast<T*>(a.grad_v) + (b * H + h) * Lk * D;

    for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
      // Keys past the last visible one get zero gradients without being computed.
      const int64_t j0 = kb * BK, nk_all = imin(BK, Lk - j0), nk = imax(0, imin(nk_all, nvis - j0));
      const int64_t np = padded(nk);
      // Rows that can see these keys: all, or under the causal mask only i >= j0.
      const int64_t qb_begin = a.causal ? j0 / BQ : 0;
      const bool skip = nk == 0 || key_block_all_padded(b, kb) || qb_begin * BQ >= Lq;
      if (one_kb)
        for (int64_t x = 0, e = (skip ? Lq : qb_begin * BQ) * D; x < e; ++x) dq[x] = S(0);
      S* dk = direct ? reinterpret_cast<S*>(gk + j0 * D) : f.dk;
      S* dv = direct ? reinterpret_cast<S*>(gv + j0 * D) : f.dv;
      const S* krows = f.krows;
      int64_t ldk = D;
      if (!skip) {
        pack_rows_t(a.k, a.k_stride, b, h, j0, nk, f.kt);
        pack_rows_t(a.v, a.v_stride, b, h, j0, nk, f.vt);
        if constexpr (direct) {
          krows = reinterpret_cast<const S*>(row(a.k, a.k_stride, b, h, j0));
          ldk = a.k_stride[2];
        } else {
          load_rows(a.k, a.k_stride, b, h, j0, nk, f.krows);
        }
      }
      bool first = true;  // dK, dV: the first query block overwrites
      for (int64_t qb = skip ? (Lq + BQ - 1) / BQ : qb_begin; qb * BQ < Lq; ++qb) {
        const int64_t i0 = qb * BQ, mq = imin(BQ, Lq - i0);
        const S* qblk = f.qf + i0 * D;
        const S* doblk = f.dof + i0 * D;
        Gemm::run(mq, np, D, qblk, D, 1, f.kt, BK, f.sbuf, BK, false);  // S
        Gemm::run(mq, np, D, doblk, D, 1, f.vt, BK, f.pz, BK, false);   // dO V^T
        if (a.dropout.enabled) block_keep_bits(b, h, i0, mq, j0, nk, f.bits, f.bit0);
        for (int64_t r = 0; r < mq; ++r) {
          const int64_t i = i0 + r;
          S* srow = f.sbuf + r * BK;  // -> dS * scale
          S* prow = f.pz + r * BK;    // dP~ in, P * Z out
          // A row with nothing to mask in this block (no masks, no padding, keys up to the row under
          // a causal mask, whole vectors) folds the scale into the exponent's FMA; the others go
          // through mask_row, which scales first.
          const bool plain = a.mask.kind == AttentionMask::none && !kbias && nk == np && (!a.causal || j0 + nk - 1 <= i);
          if (!plain) mask_row(srow, b, h, i, j0, kbias, c);
          const V cv = V::set1(plain ? c : S(1));
          const V nlv = V::set1(-f.lse2[i]);
          const V dl = V::set1(f.delta[i]);
          const V sv = V::set1(scale);
          if (a.dropout.enabled) {
            const int64_t bit0 = f.bit0[r];
            const V zs = V::set1(static_cast<S>(a.dropout.scale));
            for (int64_t j = 0; j < np; j += W) {
              const uint64_t keep = extract_bits(f.bits, bit0 + j, W);
              const V p = V::exp2(V::fma(V::load(srow + j), cv, nlv));
              const V dp = V::keep(keep, V::load(prow + j)) * zs;
              (p * (dp - dl) * sv).store(srow + j);
              (V::keep(keep, p) * zs).store(prow + j);
            }
          } else {
            for (int64_t j = 0; j < np; j += W) {
              const V p = V::exp2(V::fma(V::load(srow + j), cv, nlv));
              (p * (V::load(prow + j) - dl) * sv).store(srow + j);
              p.store(prow + j);
            }
          }
        }
        // dV += (P Z)^T dO;  dQ += dS K;  dK += dS^T Q  (dS already carries the scale).
        Gemm::run(nk, D, mq, f.pz, 1, BK, doblk, D, dv, D, !first);
        Gemm::run(mq, D, nk, f.sbuf, BK, 1, krows, ldk, dq + i0 * D, D, !one_kb);
        Gemm::run(nk, D, mq, f.sbuf, 1, BK, qblk, D, dk, D, !first);
        first = false;
      }
      // Rows [0, done) hold dK, dV; the rest (padded or unreached keys) are zero.
      const int64_t done = first ? 0 : nk;
      for (int64_t j = direct ? done : 0; j < nk_all; ++j)
        for (int64_t d = 0; d < D; ++d) {
          gk[(j0 + j) * D + d] = from_s(j < done ? f.dk[j * D + d] : S(0));
          gv[(j0 + j) * D + d] = from_s(j < done ? f.dv[j * D + d] : S(0));
        }
    }
  }
};

// Scratch bytes one thread needs for any task of this call.
template <typename V, typename T>
size_t attention_workspace_for(const AttentionArgs& a, bool backward) {
  const Attention<V, T> att(a);
  Workspace ws;
  if (backward) att.bwd_scratch(ws);
  else att.fwd_scratch(ws);
  return ws.used + 64;
}

inline size_t attention_workspace(const AttentionArgs& a, bool backward) {
  switch (a.dtype) {
    case DType::f32: return attention_workspace_for<Vec, float>(a, backward);
    case DType::bf16: return attention_workspace_for<Vec, uint16_t>(a, backward);
    case DType::f64: return attention_workspace_for<ScalarVec<double>, double>(a, backward);
  }
  return 0;
}

// MXCSR.FTZ for the kernels' duration on this thread, restored after: exp2 of a masked or far
// smaller score underflows, which without FTZ costs a microcode assist per vector (Vec::exp2_poly01).
// P below 2^-126 was 0 in every path anyway; other float results that small (a product's) become
// 0 too, far below any tolerance.
struct FlushToZero {
  unsigned saved = _mm_getcsr();
  FlushToZero() { _mm_setcsr(saved | 0x8000u); }
  ~FlushToZero() { _mm_setcsr(saved); }
};

inline void attention_fwd(const AttentionArgs& a, int64_t begin, int64_t end, void* ws) {
  const FlushToZero ftz;
  for (int64_t t = begin; t < end; ++t) {
    switch (a.dtype) {
      case DType::f32: Attention<Vec, float>(a).forward(t, ws); break;
      case DType::bf16: Attention<Vec, uint16_t>(a).forward(t, ws); break;
      case DType::f64: Attention<ScalarVec<double>, double>(a).forward(t, ws); break;
    }
  }
}

inline void attention_bwd(const AttentionArgs& a, int64_t begin, int64_t end, void* ws) {
  const FlushToZero ftz;
  for (int64_t t = begin; t < end; ++t) {
    switch (a.dtype) {
      case DType::f32: Attention<Vec, float>(a).backward(t, ws); break;
      case DType::bf16: Attention<Vec, uint16_t>(a).backward(t, ws); break;
      case DType::f64: Attention<ScalarVec<double>, double>(a).backward(t, ws); break;
    }
  }
}
