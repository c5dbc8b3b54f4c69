// Peak-throughput probes for the benchmark harness (aiayn/bench/peak.py): enough independent
// accumulators to hide the FMA latency on every core we target (Zen 4: 2 pipes x 4 cycles).
// Included inside the ISA namespace by isa/*.cpp.

inline double peak_fp32_fma(int64_t iters) {
  constexpr int kAcc = 12;
  Vec acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = Vec::set1(0.001f * static_cast<float>(i));
  const Vec m = Vec::set1(0.9999f), c = Vec::set1(1e-6f);
  for (int64_t it = 0; it < iters; ++it) {
    // No compiler barrier here: a "memory" clobber would force the accumulators through memory
    // every iteration and halve the measured peak. The trip count is a run-time value and the
    // result is consumed below, so the loop cannot be folded away.
    for (int i = 0; i < kAcc; ++i) acc[i] = Vec::fma(acc[i], m, c);
  }
  Vec s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = s + acc[i];
  volatile float sink = s.reduce_add();
  (void)sink;
  return 2.0 * Vec::N * kAcc * static_cast<double>(iters);
}
