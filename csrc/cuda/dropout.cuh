// Dropout keep-bits for the CUDA kernels: the predicate of common/dropout.h (dropout_keep), for
// N consecutive elements at once, so that a thread that handles a vector of elements runs one
// Philox call per 4 elements instead of one per element. Host-callable too, so the host can check
// it against dropout_keep bit for bit.
#pragma once
#include <cstdint>

#include "../common/dropout.h"

namespace aiayn::cuda {

// Word k (0..3) of w, without indexing the array with a run-time value (which would put it in
// local memory on the device).
AIAYN_HOST_DEVICE uint32_t philox_word(const Philox4x32& w, int k) {
  return k == 0 ? w.v[0] : k == 1 ? w.v[1] : k == 2 ? w.v[2] : w.v[3];
}

// Bit i set iff element e0 + i is kept: bit i == dropout_keep(d, e0 + i) for i < N.
// N is 1, 2 or a multiple of 4 up to 32, and e0 % N == 0 (so the N elements never straddle a
// Philox counter unless N is a multiple of 4, when they span whole counters).
template <int N>
AIAYN_HOST_DEVICE uint32_t dropout_keep_bits(const DropoutParams& d, uint64_t e0) {
  static_assert(N == 1 || N == 2 || (N % 4 == 0 && N <= 32), "N must be 1, 2 or a multiple of 4 up to 32");
  if (!d.enabled) return N == 32 ? 0xFFFFFFFFu : (uint32_t{1} << N) - 1u;
  if (d.scale == 0.0f) return 0;  // p >= 1: nothing is kept (dropout_keep's `scale != 0`)
  uint32_t bits = 0;
  if constexpr (N % 4 == 0) {
    for (int k = 0; k < N / 4; ++k) {
      const Philox4x32 w = philox_words(d.seed, d.stream, (e0 >> 2) + static_cast<uint64_t>(k));
      for (int i = 0; i < 4; ++i) bits |= static_cast<uint32_t>(w.v[i] >= d.threshold) << (4 * k + i);
    }
  } else {
    const Philox4x32 w = philox_words(d.seed, d.stream, e0 >> 2);
    const int first = static_cast<int>(e0 & 3u);
    for (int i = 0; i < N; ++i)
      bits |= static_cast<uint32_t>(philox_word(w, first + i) >= d.threshold) << i;
  }
  return bits;
}

}  // namespace aiayn::cuda
