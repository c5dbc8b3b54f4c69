// A one-lane "vector" in plain C++: the shape every SIMD wrapper (vec_avx2.h, vec_avx512.h)
// follows, so a kernel written against `Vec` compiles with any of them. Every ISA uses it for
// float64; the generic ISA for everything (vec_generic.h).
// Included inside the ISA namespace by isa/*.cpp.

template <typename S>
struct ScalarVec {
  using Scalar = S;
  static constexpr int N = 1;
  static constexpr int kTileNV = 4, kTileR = 4, kStripR = 4;  // see vec_avx512.h
  static constexpr int rows_for(int) { return 4; }
  static void transpose(const S* src, int64_t, S* dst, int64_t) { *dst = *src; }  // a 1 x 1 block
  S v;

  static ScalarVec zero() { return {S(0)}; }
  static ScalarVec set1(S s) { return {s}; }
  static ScalarVec load(const S* p) { return {*p}; }
  static ScalarVec load(const uint16_t* p) { return {S(bf16_to_float(*p))}; }
  void store(S* p) const { *p = v; }
  void store(uint16_t* p) const { *p = float_to_bf16(static_cast<float>(v)); }
  // N == 1: a partial vector is never needed; these exist so kernels need no special case.
  template <typename T>
  static ScalarVec load_partial(const T* p, int) { return load(p); }
  template <typename T>
  void store_partial(T* p, int) const { store(p); }

  ScalarVec operator+(ScalarVec b) const { return {v + b.v}; }
  ScalarVec operator-(ScalarVec b) const { return {v - b.v}; }
  ScalarVec operator*(ScalarVec b) const { return {v * b.v}; }
  ScalarVec operator/(ScalarVec b) const { return {v / b.v}; }
  static ScalarVec fma(ScalarVec a, ScalarVec b, ScalarVec c) { return {a.v * b.v + c.v}; }
  // Lanes whose bit in `keep` is 0 become 0.
  static ScalarVec keep(uint64_t bits, ScalarVec a) { return {(bits & 1u) ? a.v : S(0)}; }
  // max(v, 0); NaN stays NaN, as torch.relu.
  ScalarVec relu() const { return {v > S(0) || v != v ? v : S(0)}; }
  // `a` where `m` > 0, 0 elsewhere (NaN in m gives 0).
  static ScalarVec where_positive(ScalarVec m, ScalarVec a) { return {m.v > S(0) ? a.v : S(0)}; }
  static ScalarVec max(ScalarVec a, ScalarVec b) { return {a.v > b.v ? a.v : b.v}; }
  static bool all_equal(ScalarVec a, ScalarVec b) { return a.v == b.v; }
  S reduce_add() const { return v; }
  // Lane i = the sum of a[i]'s lanes (vec_avx512.h): one lane here.
  static ScalarVec sum_lanes(const ScalarVec* a) { return a[0]; }
  S reduce_max() const { return v; }
  // 2^x; exactly 0 for x = -inf (masked scores).
  static ScalarVec exp2(ScalarVec x) { return {std::exp2(x.v)}; }
  // (m + log2 l) ln 2 computed in float64, for l > 0 (NaN stays NaN): a softmax row's log-sum-exp.
  static ScalarVec log_sum_exp(ScalarVec m, ScalarVec l) {
    return {static_cast<S>(log_sum_exp_scalar(static_cast<double>(m.v), static_cast<double>(l.v)))};
  }
};
