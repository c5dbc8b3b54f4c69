// bfloat16 <-> float on raw bits, identical on every ISA (and to c10::BFloat16): round to nearest
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
