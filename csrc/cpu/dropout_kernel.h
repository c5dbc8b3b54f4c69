// Dropout keep-bits from Philox (common/dropout.h), PhiloxLanes::N counters at a time.
// Written once over the ISA's PhiloxLanes; included inside the ISA namespace by isa/*.cpp.

// Bits of elements [4 * first_counter, 4 * (first_counter + num_counters)), element i of the
// span at bit i % 64 of bits[i / 64]. `bits` holds ceil(num_counters / 16) + 1 words.
inline void dropout_keep_bits(const DropoutParams& d, uint64_t first_counter,
                              int64_t num_counters, uint64_t* bits) {
  // A step writes 4 * N bits (4, 32 or 64: never straddles a word), possibly past the span.
  const int64_t words = (num_counters + 15) / 16 + 1;
  for (int64_t w = 0; w < words; ++w) bits[w] = 0;
  for (int64_t c = 0; c < num_counters; c += PhiloxLanes::N) {
    const uint64_t b = PhiloxLanes::keep_bits(d, first_counter + c);
    const int64_t bit = c * 4;
    bits[bit / 64] |= b << (bit % 64);
  }
}

// The `n` (<= 64) keep-bits starting at bit `pos` of a bit span from dropout_keep_bits.
inline uint64_t extract_bits(const uint64_t* bits, int64_t pos, int n) {
  const int64_t w = pos >> 6;
  const int s = static_cast<int>(pos & 63);
  uint64_t r = bits[w] >> s;
  if (s != 0 && s + n > 64) r |= bits[w + 1] << (64 - s);
  return n == 64 ? r : r & ((uint64_t{1} << n) - 1);
}

// Keep-bits for the elements [e_begin, e_end) of an op: fills `bits` (sized by
// keep_bits_words) and returns the bit position of e_begin in it.
constexpr int64_t keep_bits_words(int64_t count) { return (count + 3) / 4 / 16 + 3; }
inline int64_t fill_keep_bits(const DropoutParams& d, int64_t e_begin, int64_t e_end,
                              uint64_t* bits) {
  const uint64_t first = static_cast<uint64_t>(e_begin) >> 2;
  const uint64_t last = static_cast<uint64_t>(e_end - 1) >> 2;
  dropout_keep_bits(d, first, static_cast<int64_t>(last - first + 1), bits);
  return e_begin - static_cast<int64_t>(first * 4);
}
