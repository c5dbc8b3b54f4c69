// LayerNorm(residual + dropout(x)) forward and backward over rows, written once over `Vec`
// (simd/). The paper's sub-layer connection, §3.1 and §5.4 of "Attention Is All You Need".
// Included inside the ISA namespace by isa/*.cpp.
//
// Each row is read once into an L1-resident buffer of floats (`h`, the pre-norm sum), so the
// mean and the variance are two exact passes over cache, not a one-pass formula that loses digits.

// A row sum that stays accurate for long rows on every ISA (the generic one has a single lane):
// two vector accumulators flushed every 64 vectors into a double total.
template <typename V>
struct RowSum {
  V acc[2] = {V::zero(), V::zero()};
  double total = 0.0;
  int n = 0;
  void add(V v) { step(acc[n & 1] + v); }
  void add_product(V a, V b) { step(V::fma(a, b, acc[n & 1])); }
  typename V::Scalar value() {
    flush();
    return static_cast<typename V::Scalar>(total);
  }

 private:
  void step(V next) {
    acc[n & 1] = next;
    if (++n == 64) flush();
  }
  void flush() {
    total += static_cast<double>((acc[0] + acc[1]).reduce_add());
    acc[0] = acc[1] = V::zero();
    n = 0;
  }
};

template <typename V, typename T>
void add_dropout_layer_norm_fwd_rows(const AddDropoutLayerNormFwd& a, int64_t row_begin,
                                     int64_t row_end) {
  using S = typename V::Scalar;
  constexpr int N = V::N;
  const int64_t cols = a.cols;
  const int64_t full = cols / N * N;
  const int tail = static_cast<int>(cols - full);
  Buffer<S> h(cols);
  Buffer<uint64_t> bits(a.dropout.enabled ? keep_bits_words(cols) : 1);
  const V scale = V::set1(static_cast<S>(a.dropout.scale));
  const S* w = static_cast<const S*>(a.weight);
  const S* b = static_cast<const S*>(a.bias);

  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.x_stride;
    const T* res = static_cast<const T*>(a.residual) + r * a.residual_stride;
    T* out = static_cast<T*>(a.out) + r * cols;
    int64_t bit0 = 0;
    if (a.dropout.enabled) bit0 = fill_keep_bits(a.dropout, r * cols, (r + 1) * cols, bits.data());

    auto sum_in = [&](int64_t c, V xv, V rv) {
      if (a.dropout.enabled) xv = V::keep(extract_bits(bits.data(), bit0 + c, N), xv) * scale;
      return rv + xv;
    };
    RowSum<V> sum;
    for (int64_t c = 0; c < full; c += N) {
      const V hv = sum_in(c, V::load(x + c), V::load(res + c));
      hv.store(h.data() + c);
      sum.add(hv);
    }
    if (tail) {
      const V hv = sum_in(full, V::load_partial(x + full, tail), V::load_partial(res + full, tail));
      hv.store_partial(h.data() + full, tail);
      sum.add(hv);
    }
    const S mean = sum.value() / static_cast<S>(cols);
    const V mv = V::set1(mean);
    RowSum<V> sq;
    for (int64_t c = 0; c < full; c += N) {
      const V d = V::load(h.data() + c) - mv;
      sq.add_product(d, d);
    }
    if (tail) {
      // load_partial zero-fills, so (0 - mean) must be masked out of the sum.
      const V d = V::keep((uint64_t{1} << tail) - 1, V::load_partial(h.data() + full, tail) - mv);
      sq.add_product(d, d);
    }
    const S var = sq.value() / static_cast<S>(cols);
    const S rstd = S(1) / std::sqrt(var + static_cast<S>(a.eps));
    static_cast<S*>(a.mean)[r] = mean;
    static_cast<S*>(a.rstd)[r] = rstd;
    const V rv = V::set1(rstd);
    for (int64_t c = 0; c < full; c += N) {
      const V y = V::fma((V::load(h.data() + c) - mv) * rv, V::load(w + c), V::load(b + c));
      y.store(out + c);
    }
    if (tail) {
      const V y = V::fma((V::load_partial(h.data() + full, tail) - mv) * rv,
                         V::load_partial(w + full, tail), V::load_partial(b + full, tail));
      y.store_partial(out + full, tail);
    }
  }
}

// dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight, xhat the normalised
// input; grad_residual = dh, grad_x = dropout'(dh) (the same mask and scale as the forward).
template <typename V, typename T>
void add_dropout_layer_norm_bwd_rows(const AddDropoutLayerNormBwd& a, int64_t row_begin,
                                     int64_t row_end, void* grad_weight, void* grad_bias) {
  using S = typename V::Scalar;
  constexpr int N = V::N;
  const int64_t cols = a.cols;
  const int64_t full = cols / N * N;
  const int tail = static_cast<int>(cols - full);
  Buffer<S> xhat(cols), g(cols);
  Buffer<uint64_t> bits(a.dropout.enabled ? keep_bits_words(cols) : 1);
  const V scale = V::set1(static_cast<S>(a.dropout.scale));
  const S* w = static_cast<const S*>(a.weight);
  S* dw = static_cast<S*>(grad_weight);
  S* db = static_cast<S*>(grad_bias);
  for (int64_t c = 0; c < cols; ++c) dw[c] = db[c] = S(0);

  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* dy = static_cast<const T*>(a.grad_out) + r * a.grad_out_stride;
    const T* x = static_cast<const T*>(a.x) + r * a.x_stride;
    const T* res = static_cast<const T*>(a.residual) + r * a.residual_stride;
    T* dx = static_cast<T*>(a.grad_x) + r * cols;
    T* dres = static_cast<T*>(a.grad_residual) + r * cols;
    int64_t bit0 = 0;
    if (a.dropout.enabled) bit0 = fill_keep_bits(a.dropout, r * cols, (r + 1) * cols, bits.data());
    const V mv = V::set1(static_cast<const S*>(a.mean)[r]);
    const V rv = V::set1(static_cast<const S*>(a.rstd)[r]);

    RowSum<V> sum_g, sum_gx;
    auto pass1 = [&](int64_t c, V xv, V resv, V dyv, V wv, int n) {
      if (a.dropout.enabled) xv = V::keep(extract_bits(bits.data(), bit0 + c, N), xv) * scale;
      const V xh = (resv + xv - mv) * rv;
      const V gv = dyv * wv;
      if (n == N) {
        xh.store(xhat.data() + c);
        gv.store(g.data() + c);
        V::fma(dyv, xh, V::load(dw + c)).store(dw + c);
        (dyv + V::load(db + c)).store(db + c);
      } else {
        xh.store_partial(xhat.data() + c, n);
        gv.store_partial(g.data() + c, n);
        V::fma(dyv, xh, V::load_partial(dw + c, n)).store_partial(dw + c, n);
        (dyv + V::load_partial(db + c, n)).store_partial(db + c, n);
      }
      // Partial loads zero-fill dy, so g and g * xhat vanish past the tail.
      sum_g.add(gv);
      sum_gx.add_product(gv, xh);
    };
    for (int64_t c = 0; c < full; c += N)
      pass1(c, V::load(x + c), V::load(res + c), V::load(dy + c), V::load(w + c), N);
    if (tail)
      pass1(full, V::load_partial(x + full, tail), V::load_partial(res + full, tail),
            V::load_partial(dy + full, tail), V::load_partial(w + full, tail), tail);

    const V mg = V::set1(sum_g.value() / static_cast<S>(cols));
    const V mgx = V::set1(sum_gx.value() / static_cast<S>(cols));
    auto pass2 = [&](int64_t c, int n) {
      const V xh = n == N ? V::load(xhat.data() + c) : V::load_partial(xhat.data() + c, n);
      const V gv = n == N ? V::load(g.data() + c) : V::load_partial(g.data() + c, n);
      const V dh = (gv - mg - xh * mgx) * rv;
      V dxv = dh;
      if (a.dropout.enabled) dxv = V::keep(extract_bits(bits.data(), bit0 + c, N), dh) * scale;
      if (n == N) {
        dh.store(dres + c);
        dxv.store(dx + c);
      } else {
        dh.store_partial(dres + c, n);
        dxv.store_partial(dx + c, n);
      }
    };
    for (int64_t c = 0; c < full; c += N) pass2(c, N);
    if (tail) pass2(full, tail);
  }
}

// Entry points of the kernel table: pick the storage type.
inline void add_dropout_layer_norm_fwd(const AddDropoutLayerNormFwd& a, int64_t b, int64_t e) {
  switch (a.dtype) {
    case DType::f32: return add_dropout_layer_norm_fwd_rows<Vec, float>(a, b, e);
    case DType::bf16: return add_dropout_layer_norm_fwd_rows<Vec, uint16_t>(a, b, e);
    case DType::f64: return add_dropout_layer_norm_fwd_rows<ScalarVec<double>, double>(a, b, e);
  }
}

inline void add_dropout_layer_norm_bwd(const AddDropoutLayerNormBwd& a, int64_t b, int64_t e,
                                       void* dw, void* db) {
  switch (a.dtype) {
    case DType::f32: return add_dropout_layer_norm_bwd_rows<Vec, float>(a, b, e, dw, db);
    case DType::bf16: return add_dropout_layer_norm_bwd_rows<Vec, uint16_t>(a, b, e, dw, db);
    case DType::f64:
      return add_dropout_layer_norm_bwd_rows<ScalarVec<double>, double>(a, b, e, dw, db);
  }
}
