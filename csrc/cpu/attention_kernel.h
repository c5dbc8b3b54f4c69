// Scaled dot-product attention, softmax(Q K^T * scale + mask) V (paper §3.2.1), forward and
// backward, flash-attention style: blocked over queries and keys with an online softmax, so the
// Lq x Lk score matrix never exists; the log-sum-exp of each row is saved for the backward, which
// recomputes the probabilities block by block (Dao et al., FlashAttention-2, Algorithms 1 and 2).
// Written once over `Vec`; included inside the ISA namespace by isa/*.cpp.
//
// Scores are kept in the log2 domain (scaled by scale * log2 e) so that the softmax is exp2.

constexpr int64_t kAttnBlockQ = 64;  // query rows per block
constexpr int64_t kAttnBlockK = 64;  // keys per block (a multiple of every vector width)
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <typename V, typename T>
struct Attention {
  using S = typename V::Scalar;
  using Gemm = SmallGemm<V>;
  static constexpr int W = V::N;
  static constexpr int64_t BQ = kAttnBlockQ, BK = kAttnBlockK;

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

  // rows [i0, i0 + m) of a (b, h) slice into a dense S buffer with row stride D.
  void load_rows(const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t i0,
                 int64_t m, S* dst) const {
    for (int64_t r = 0; r < m; ++r) {
      const T* src = row(base, stride, b, h, i0 + r);
      for (int64_t d = 0; d < D; ++d) dst[r * D + d] = to_s(src[d]);
    }
  }

  // Keys [j0, j0 + n) transposed into dst[d * BK + j], zero past n.
  void pack_keys_t(const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t j0,
                   int64_t n, S* dst) const {
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = n; j < BK; ++j) dst[d * BK + j] = S(0);
    for (int64_t j = 0; j < n; ++j) {
      const T* src = row(base, stride, b, h, j0 + j);
      for (int64_t d = 0; d < D; ++d) dst[d * BK + j] = to_s(src[d]);
    }
  }

  bool key_block_all_padded(int64_t b, int64_t kb) const {
    if (!a.key_padding) return false;
    const bool* p = a.key_padding + b * a.key_padding_stride[0];
    for (int64_t j = kb * BK, e = imin(Lk, (kb + 1) * BK); j < e; ++j)
      if (!p[j * a.key_padding_stride[1]]) return false;
    return true;
  }

  // Scores of query row i against keys [j0, j0 + BK) (srow, already Q K^T) -> log2-domain
  // logits with every mask applied; masked entries (and keys past Lk) become -inf.
  void mask_row(S* srow, int64_t b, int64_t h, int64_t i, int64_t j0) const {
    const int64_t n = imin(BK, Lk - j0);
    const V cv = V::set1(c);
    for (int64_t j = 0; j < BK; j += W) (V::load(srow + j) * cv).store(srow + j);
    for (int64_t j = n; j < BK; ++j) srow[j] = neg_inf;
    if (a.mask.kind == AttentionMask::additive) {
      const S* m = static_cast<const S*>(a.mask.data) + b * a.mask.stride[0] +
                   h * a.mask.stride[1] + i * a.mask.stride[2] + j0 * a.mask.stride[3];
      const int64_t sk = a.mask.stride[3];
      for (int64_t j = 0; j < n; ++j) srow[j] += m[j * sk] * static_cast<S>(kLog2e);
    } else if (a.mask.kind == AttentionMask::boolean) {
      const bool* m = static_cast<const bool*>(a.mask.data) + b * a.mask.stride[0] +
                      h * a.mask.stride[1] + i * a.mask.stride[2] + j0 * a.mask.stride[3];
      const int64_t sk = a.mask.stride[3];
      for (int64_t j = 0; j < n; ++j)
        if (!m[j * sk]) srow[j] = neg_inf;
    }
    if (a.key_padding) {
      const bool* p = a.key_padding + b * a.key_padding_stride[0] + j0 * a.key_padding_stride[1];
      for (int64_t j = 0; j < n; ++j)
        if (p[j * a.key_padding_stride[1]]) srow[j] = neg_inf;
    }
    if (a.causal)
      for (int64_t j = imax(0, i + 1 - j0); j < n; ++j) srow[j] = neg_inf;
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

  void forward(int64_t task) const {
    const int64_t qc = a.query_chunks;
    const int64_t b = task / (H * qc), h = task / qc % H, chunk = task % qc;
    const int64_t nqb = (Lq + BQ - 1) / BQ;

    // This head's keys, packed transposed once (all key blocks), and values as S rows.
    Buffer<S> kt(nkb * D * BK);
    const int64_t kmax = key_blocks_for(0, Lq);
    for (int64_t kb = 0; kb < kmax; ++kb)
      pack_keys_t(a.k, a.k_stride, b, h, kb * BK, imin(BK, Lk - kb * BK), kt.data() + kb * D * BK);
    const bool direct_v = sizeof(T) == sizeof(S);
    Buffer<S> vbuf(direct_v ? 1 : Lk * D);
    if (!direct_v) load_rows(a.v, a.v_stride, b, h, 0, Lk, vbuf.data());
    Buffer<S> qbuf(BQ * D), sbuf(BQ * BK), obuf(BQ * D), m(BQ), l(BQ);
    Buffer<uint64_t> bits(keep_bits_words(BK));

    // Query blocks of this chunk: chunk c takes blocks c and 2 qc - 1 - c of every 2 qc, so a
    // causal mask (later rows see more keys) costs every chunk about the same.
    for (int64_t qb = 0; qb < nqb; ++qb) {
      const int64_t pos = qb % (2 * qc);
      if (pos != chunk && pos != 2 * qc - 1 - chunk) continue;
      const int64_t i0 = qb * BQ, mq = imin(BQ, Lq - i0);
      load_rows(a.q, a.q_stride, b, h, i0, mq, qbuf.data());
      for (int64_t r = 0; r < mq; ++r) m.data()[r] = neg_inf, l.data()[r] = S(0);
      for (int64_t x = 0; x < mq * D; ++x) obuf.data()[x] = S(0);

      const int64_t kend = key_blocks_for(i0, mq);
      for (int64_t kb = 0; kb < kend; ++kb) {
        if (key_block_all_padded(b, kb)) continue;
        const int64_t j0 = kb * BK, nk = imin(BK, Lk - j0);
        Gemm::run(mq, BK, D, qbuf.data(), D, 1, kt.data() + kb * D * BK, BK, sbuf.data(), BK, false);
        for (int64_t r = 0; r < mq; ++r) {
          S* srow = sbuf.data() + r * BK;
          const int64_t i = i0 + r;
          mask_row(srow, b, h, i, j0);
          V mx = V::load(srow);
          for (int64_t j = W; j < BK; j += W) mx = V::max(mx, V::load(srow + j));
          const S m_new = imax_s(m.data()[r], mx.reduce_max());
          if (m_new == neg_inf) {  // nothing visible yet in this row
            for (int64_t j = 0; j < BK; ++j) srow[j] = S(0);
            continue;
          }
          const S alpha = V::exp2(V::set1(m.data()[r] - m_new)).reduce_max();
          const V mv = V::set1(m_new);
          V sum = V::zero();
          for (int64_t j = 0; j < BK; j += W) {
            const V p = V::exp2(V::load(srow + j) - mv);
            p.store(srow + j);
            sum = sum + p;
          }
          l.data()[r] = l.data()[r] * alpha + sum.reduce_add();
          m.data()[r] = m_new;
          if (alpha != S(1)) {
            const V av = V::set1(alpha);
            S* orow = obuf.data() + r * D;
            for (int64_t d = 0; d + W <= D; d += W) (V::load(orow + d) * av).store(orow + d);
            for (int64_t d = D / W * W; d < D; ++d) orow[d] *= alpha;
          }
          if (a.dropout.enabled) apply_dropout(srow, b, h, i, j0, nk, bits.data());
        }
        const S* vrows = direct_v ? reinterpret_cast<const S*>(row(a.v, a.v_stride, b, h, j0))
                                  : vbuf.data() + j0 * D;
        const int64_t ldv = direct_v ? a.v_stride[2] : D;
        Gemm::run(mq, D, nk, sbuf.data(), BK, 1, vrows, ldv, obuf.data(), D, true);
      }

      T* out = static_cast<T*>(a.out) + ((b * H + h) * Lq + i0) * D;
      S* lse = static_cast<S*>(a.lse) + (b * H + h) * Lq + i0;
      for (int64_t r = 0; r < mq; ++r) {
        const S lr = l.data()[r];
        if (lr == S(0)) {  // a fully masked row: zeros, and +inf so the backward sees P = 0
          for (int64_t d = 0; d < D; ++d) out[r * D + d] = from_s(S(0));
          lse[r] = __builtin_inf();
          continue;
        }
        const S inv = S(1) / lr;
        for (int64_t d = 0; d < D; ++d) out[r * D + d] = from_s(obuf.data()[r * D + d] * inv);
        lse[r] = static_cast<S>((static_cast<double>(m.data()[r]) + std::log2(static_cast<double>(lr))) * kLn2);
      }
    }
  }

  static S imax_s(S x, S y) { return x > y ? x : y; }

  // P(i, j) *= keep(i, j) / (1 - p) for keys [j0, j0 + n).
  void apply_dropout(S* prow, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n,
                     uint64_t* bits) const {
    const int64_t e0 = dropout_base(b, h, i, j0);
    const int64_t bit0 = fill_keep_bits(a.dropout, e0, e0 + n, bits);
    const V sv = V::set1(static_cast<S>(a.dropout.scale));
    for (int64_t j = 0; j < BK; j += W)
      (V::keep(extract_bits(bits, bit0 + j, W), V::load(prow + j)) * sv).store(prow + j);
  }

  // --- backward --------------------------------------------------------------------------

  void backward(int64_t task) const {
    const int64_t kc = a.key_chunks;
    const int64_t b = task / (H * kc), h = task / kc % H, chunk = task % kc;
    const int64_t kb_begin = nkb * chunk / kc, kb_end = nkb * (chunk + 1) / kc;

    // The whole head's queries, output gradients, row terms delta_i = dO_i . O_i and the
    // log2-domain log-sum-exp, as S: O(Lq) memory per task.
    Buffer<S> qf(Lq * D), dof(Lq * D), delta(Lq), lse2(Lq);
    load_rows(a.q, a.q_stride, b, h, 0, Lq, qf.data());
    load_rows(a.grad_out, a.grad_out_stride, b, h, 0, Lq, dof.data());
    const T* out = static_cast<const T*>(a.out) + (b * H + h) * Lq * D;
    const S* lse = static_cast<const S*>(a.lse) + (b * H + h) * Lq;
    for (int64_t i = 0; i < Lq; ++i) {
      double acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(dof.data()[i * D + d]) * to_s(out[i * D + d]);
      delta.data()[i] = static_cast<S>(acc);
      lse2.data()[i] = lse[i] * static_cast<S>(kLog2e);  // +inf stays +inf
    }
    S* dq = static_cast<S*>(a.grad_q_partial) + ((b * H + h) * kc + chunk) * Lq * D;
    for (int64_t x = 0; x < Lq * D; ++x) dq[x] = S(0);

    Buffer<S> kt(D * BK), vt(D * BK), krows(BK * D), sbuf(BQ * BK), pz(BQ * BK), dk(BK * D), dv(BK * D);
    Buffer<uint64_t> bits(keep_bits_words(BK));
    const S scale = static_cast<S>(a.scale);
    T* gk = static_cast<T*>(a.grad_k) + (b * H + h) * Lk * D;
    T* gv = static_cast<T*>(a.grad_v) + (b * H + h) * Lk * D;

    for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
      const int64_t j0 = kb * BK, nk = imin(BK, Lk - j0);
      for (int64_t x = 0; x < BK * D; ++x) dk.data()[x] = dv.data()[x] = S(0);
      // Rows that can see these keys: all, or under the causal mask only i >= j0.
      const int64_t qb_begin = a.causal ? j0 / BQ : 0;
      const bool skip = key_block_all_padded(b, kb) || qb_begin * BQ >= Lq;
      if (!skip) {
        pack_keys_t(a.k, a.k_stride, b, h, j0, nk, kt.data());
        pack_keys_t(a.v, a.v_stride, b, h, j0, nk, vt.data());
        load_rows(a.k, a.k_stride, b, h, j0, nk, krows.data());
      }
      for (int64_t qb = skip ? (Lq + BQ - 1) / BQ : qb_begin; qb * BQ < Lq; ++qb) {
        const int64_t i0 = qb * BQ, mq = imin(BQ, Lq - i0);
        const S* qblk = qf.data() + i0 * D;
        const S* doblk = dof.data() + i0 * D;
        Gemm::run(mq, BK, D, qblk, D, 1, kt.data(), BK, sbuf.data(), BK, false);  // S
        Gemm::run(mq, BK, D, doblk, D, 1, vt.data(), BK, pz.data(), BK, false);   // dO V^T
        for (int64_t r = 0; r < mq; ++r) {
          const int64_t i = i0 + r;
          S* srow = sbuf.data() + r * BK;  // -> dS * scale
          S* prow = pz.data() + r * BK;    // dP~ in, P * Z out
          mask_row(srow, b, h, i, j0);
          const V lv = V::set1(lse2.data()[i]);
          const V dl = V::set1(delta.data()[i]);
          const V sv = V::set1(scale);
          if (a.dropout.enabled) {
            const int64_t e0 = dropout_base(b, h, i, j0);
            const int64_t bit0 = fill_keep_bits(a.dropout, e0, e0 + nk, bits.data());
            const V zs = V::set1(static_cast<S>(a.dropout.scale));
            for (int64_t j = 0; j < BK; j += W) {
              const uint64_t keep = extract_bits(bits.data(), bit0 + j, W);
              const V p = V::exp2(V::load(srow + j) - lv);
              const V dp = V::keep(keep, V::load(prow + j)) * zs;
              (p * (dp - dl) * sv).store(srow + j);
              (V::keep(keep, p) * zs).store(prow + j);
            }
          } else {
            for (int64_t j = 0; j < BK; j += W) {
              const V p = V::exp2(V::load(srow + j) - lv);
              (p * (V::load(prow + j) - dl) * sv).store(srow + j);
              p.store(prow + j);
            }
          }
        }
        // dV += (P Z)^T dO;  dQ += dS K;  dK += dS^T Q  (dS already carries the scale).
        Gemm::run(nk, D, mq, pz.data(), 1, BK, doblk, D, dv.data(), D, true);
        Gemm::run(mq, D, nk, sbuf.data(), BK, 1, krows.data(), D, dq + i0 * D, D, true);
        Gemm::run(nk, D, mq, sbuf.data(), 1, BK, qblk, D, dk.data(), D, true);
      }
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t d = 0; d < D; ++d) {
          gk[(j0 + j) * D + d] = from_s(dk.data()[j * D + d]);
          gv[(j0 + j) * D + d] = from_s(dv.data()[j * D + d]);
        }
    }
  }
};

inline void attention_fwd(const AttentionArgs& a, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    switch (a.dtype) {
      case DType::f32: Attention<Vec, float>(a).forward(t); break;
      case DType::bf16: Attention<Vec, uint16_t>(a).forward(t); break;
      case DType::f64: Attention<ScalarVec<double>, double>(a).forward(t); break;
    }
  }
}

inline void attention_bwd(const AttentionArgs& a, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    switch (a.dtype) {
      case DType::f32: Attention<Vec, float>(a).backward(t); break;
      case DType::bf16: Attention<Vec, uint16_t>(a).backward(t); break;
      case DType::f64: Attention<ScalarVec<double>, double>(a).backward(t); break;
    }
  }
}
