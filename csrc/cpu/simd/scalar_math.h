// Scalar helpers every ISA shares: bfloat16 <-> float on raw bits, and the exp2 polynomial.
//
// bfloat16 conversion is identical on every ISA (and to c10::BFloat16): round to nearest
// even, NaN stays NaN, subnormals kept. (AVX512_BF16's vcvtneps2bf16 flushes subnormals, which
// would make the ISA variants disagree, so no variant uses it.)
// Included inside the ISA namespace by isa/*.cpp.

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Taylor coefficients of 2^f = e^(f ln 2): (ln 2)^k / k!, k = 0..7; on |f| <= 1/2 the truncation
// error is below 3e-9, under float32's half ulp.
constexpr float kExp2C[8] = {1.0f,
                             0.693147180559945f,
                             0.240226506959101f,
                             0.0555041086648216f,
                             0.00961812910762848f,
                             0.00133335581464284f,
                             0.000154035303933816f,
                             1.52527338040598e-05f};

// Coefficients c1..cN of 1 + c1 f + ... + cN f^N, the minimax (relative error) polynomials of 2^f
// on [0, 1] (Vec::exp2_poly01 on AVX-512). Degree 6: 2e-9 before rounding, 1.7 ulp in float32
// Horner (Vec::exp2); degrees 3 and 4: 9e-5 and 3e-6 (the AMX softmax, attention_amx.h).
constexpr float kExp2Minimax01Deg6[6] = {0.6931470632553101f, 0.2402293086051941f, 0.055485282093286514f,
                                         0.009675448760390282f, 0.0012467879569157958f, 0.00021612789714708924f};
constexpr float kExp2Minimax01Deg4[4] = {0.6930448412895203f, 0.24128007888793945f, 0.052242740988731384f,
                                         0.013426518067717552f};
constexpr float kExp2Minimax01Deg3[3] = {0.6951163411140442f, 0.22764700651168823f, 0.07706519961357117f};

constexpr double kLn2 = 0.6931471805599453;

// 1 / (2k + 1), k = 1..10: log2 t = (2 / ln 2) atanh(u) = (2 / ln 2)(u + u^3 / 3 + u^5 / 5 + ...)
// with u = (t - 1) / (t + 1). For t in [0.75, 1.5), |u| <= 1/5, so the terms past u^21 / 21 are
// below 1e-16 of the sum: the vector log-sum-exps (Vec::log_sum_exp) are float64-accurate.
constexpr double kAtanhSeries[10] = {1.0 / 3,  1.0 / 5,  1.0 / 7,  1.0 / 9,  1.0 / 11,
                                     1.0 / 13, 1.0 / 15, 1.0 / 17, 1.0 / 19, 1.0 / 21};

// (m + log2 l) ln 2 in float64: the natural-log log-sum-exp of a softmax row whose running max
// is m (log2 units) and whose sum is l > 0.
inline double log_sum_exp_scalar(double m, double l) { return (m + std::log2(l)) * kLn2; }

// Our own min/max, so kernels instantiate no std:: template in an ISA unit (kernels.h).
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
