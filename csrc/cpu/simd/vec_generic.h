// The generic ISA: one lane of plain C++ (vec_scalar.h) and Philox one counter at a time.
// Included inside namespace aiayn::cpu::generic by isa/generic.cpp.

using Vec = ScalarVec<float>;

// Philox over N counters at once, one lane each; here N == 1.
struct PhiloxLanes {
  static constexpr int N = 1;
  // Counters a .. a + 7 and b .. b + 7: bits 0-31 are a's 32 elements, bits 32-63 b's.
  static uint64_t keep_bits_8x2(const DropoutParams& d, uint64_t a, uint64_t b) {
    uint64_t bits = 0;
    for (int i = 0; i < 8; ++i) bits |= keep_bits(d, a + i) << (4 * i) | keep_bits(d, b + i) << (32 + 4 * i);
    return bits;
  }
  // Keep-bits of the 4 * N elements of counters [c, c + N): bit 4 * lane + word.
  static uint64_t keep_bits(const DropoutParams& d, uint64_t c) {
    uint32_t w[4];
    keep_words_strided(d, c, 0, w);
    uint64_t bits = 0;
    for (int k = 0; k < 4; ++k) bits |= static_cast<uint64_t>(w[k]) << k;
    return bits;
  }
  // Counter c in the one lane (vec_avx512.h: lanes c + lane * stride): out[w] = word w's keep-bit.
  static void keep_words_strided(const DropoutParams& d, uint64_t c, uint32_t, uint32_t (&out)[4]) {
    const Philox4x32 w = philox_words(d.seed, d.stream, c);
    for (int k = 0; k < 4; ++k) out[k] = w.v[k] >= d.threshold;
  }
};
