// Dropout on top of Philox (philox.h): which elements are kept, and by how much a kept element
// is scaled. Host and device share these helpers so that the CPU and CUDA kernels agree bit for
// bit on the mask. Inverted dropout as in the paper's implementation (tensor2tensor): a kept
// element is multiplied by 1 / (1 - p) during training, nothing is done at inference.
#pragma once
#include <cstdint>

#include "philox.h"

namespace aiayn {

// An element is kept iff its 32-bit Philox word is >= threshold, so it is kept with probability
// 1 - threshold / 2^32 = 1 - p up to 2^-32. p >= 1 drops everything (scale 0, below).
struct DropoutParams {
  uint64_t seed = 0;
  uint64_t stream = 0;
  uint32_t threshold = 0;  // 0: keep everything
  double scale = 1.0;      // 1 / (1 - p), or 0 when p >= 1 (double: exact enough for float64 ops)
  bool enabled = false;    // false: no mask at all (p == 0 or not training)
};

AIAYN_HOST_DEVICE DropoutParams make_dropout_params(double p, uint64_t seed, uint64_t stream) {
  DropoutParams d;
  d.seed = seed;
  d.stream = stream;
  d.enabled = p > 0.0;
  if (!d.enabled) return d;
  if (p >= 1.0) {
    d.threshold = 0xFFFFFFFFu;
    d.scale = 0.0;
  } else {
    const double t = p * 4294967296.0;  // p * 2^32, < 2^32 here
    d.threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
    d.scale = 1.0 / (1.0 - p);
  }
  return d;
}

// Whether element `e` (the op's logical element number) is kept.
AIAYN_HOST_DEVICE bool dropout_keep(const DropoutParams& d, uint64_t e) {
  if (!d.enabled) return true;
  const Philox4x32 w = philox_words(d.seed, d.stream, e >> 2);
  return w.v[e & 3] >= d.threshold && d.scale != 0.0;
}

}  // namespace aiayn
