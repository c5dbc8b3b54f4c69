// Philox4x32-10, the counter-based RNG of Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3" (SC'11), as in Random123. One definition for the CPU kernels and the CUDA kernels, so
// that for the same (seed, stream, counter) both devices draw exactly the same words.
//
// Counter layout used by every aiayn op: ctr = {lo(counter), hi(counter), lo(stream), hi(stream)},
// key = {lo(seed), hi(seed)}. An op numbers the elements it may drop 0, 1, 2, ... in its own
// logical order; element e takes word (e % 4) of philox(seed, stream, counter = e / 4).
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AIAYN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AIAYN_HOST_DEVICE inline
#endif

namespace aiayn {

struct Philox4x32 {
  uint32_t v[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

AIAYN_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// The raw bijection: 10 rounds on a 128-bit counter under a 64-bit key.
AIAYN_HOST_DEVICE Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kPhiloxM0, ctr.v[0], hi0, lo0);
    philox_mulhilo(kPhiloxM1, ctr.v[2], hi1, lo1);
    ctr = Philox4x32{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
  }
  return ctr;
}

// Four words for `counter` of `stream` under `seed` (the layout above).
AIAYN_HOST_DEVICE Philox4x32 philox_words(uint64_t seed, uint64_t stream, uint64_t counter) {
  const Philox4x32 ctr{{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                        static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)}};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace aiayn
