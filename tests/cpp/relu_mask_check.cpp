// Host check of feed_forward's CUDA ReLU bit-mask handling (csrc/common/relu_mask.h), compiled with
// the host compiler by tests/test_cuda_relu_mask.py (no GPU needed):
//  - the mask's leading dimension meets cublasLt.h's rule for CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD
//    (bits, a multiple of 128, no less than D's rows);
//  - relu_mask_byte / relu_mask_bit put element (t, j) of our row-major (rows, cols) activation at
//    the bit the header's layout gives cuBLAS's column-major D element (row j, column t): bit
//    j + t * ld of a bit matrix, byte (j + t * ld) / 8, bit (j + t * ld) % 8;
//  - the pass after GEMM1 (relu_mask_dropout_byte, as the kernel runs it byte by byte) turns a mask
//    written as cuBLASLt's RELU_AUX documents it into exactly [pre > 0] & keep, with hidden =
//    keep ? max(0, pre) / (1 - p) : 0, and the fallback writer (from_aux false) gives the same mask
//    from the pre-activation (NaN: bit 0, hidden NaN); padding bits are 0;
//  - relu_mask_keep_byte agrees with dropout_keep (the CPU op's predicate) and with the kernel's fast
//    path dropout_keep_bits<8> when cols % 8 == 0;
//  - gating a gradient with the mask (the DRELU epilogue / relu_mask_gate_) is g * [pre > 0] * keep.
// Prints "ok" and exits 0, or prints the first failures and exits 1.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "common/relu_mask.h"
#include "cuda/dropout.cuh"
#include "host_check.h"

using namespace aiayn;

// cuBLASLt's RELU_AUX output as cublasLt.h describes it: a column-major bit matrix shaped like D
// (cuBLAS's m = our cols rows, n = our rows columns) with leading dimension ld bits.
static void doc_set_bit(std::vector<uint8_t>& aux, int64_t d_row, int64_t d_col, int64_t ld, bool on) {
  const int64_t bit = d_row + d_col * ld;
  if (on) aux[bit / 8] = static_cast<uint8_t>(aux[bit / 8] | (1u << (bit % 8)));
}
static bool doc_get_bit(const std::vector<uint8_t>& aux, int64_t d_row, int64_t d_col, int64_t ld) {
  const int64_t bit = d_row + d_col * ld;
  return (aux[bit / 8] >> (bit % 8)) & 1u;
}

static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static double uniform() {  // xorshift64*, in [-1, 1)
  rng ^= rng >> 12;
  rng ^= rng << 25;
  rng ^= rng >> 27;
  return static_cast<double>((rng * 0x2545F4914F6CDD1DULL) >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

static void check_layout() {
  for (int64_t cols : {1, 7, 8, 127, 128, 129, 1000, 2048}) {
    const int64_t ld = relu_mask_ld_bits(cols);
    CHECK(ld % 128 == 0 && ld >= cols && ld - cols < 128, "cols=%lld ld=%lld", (long long)cols, (long long)ld);
    CHECK(relu_mask_row_bytes(cols) * 8 == ld && relu_mask_row_bytes(cols) % 16 == 0, "cols=%lld", (long long)cols);
    for (int64_t t = 0; t < 5; ++t)
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t bit = j + t * ld;  // cuBLAS's D element (row j, column t)
        CHECK(relu_mask_byte(t, j, cols) == bit / 8 && relu_mask_bit(j) == static_cast<uint32_t>(bit % 8),
              "t=%lld j=%lld cols=%lld", (long long)t, (long long)j, (long long)cols);
      }
  }
}

static void check_keep_bytes() {
  for (double p : {0.0, 0.1, 0.5, 1.0}) {
    const DropoutParams d = make_dropout_params(p, 0x123456789abcdefULL, 0);
    for (int64_t cols : {3, 8, 13, 64, 130}) {
      for (int64_t r = 0; r < 4; ++r)
        for (int64_t b = 0; b < relu_mask_row_bytes(cols); ++b) {
          const uint32_t k = relu_mask_keep_byte(d, r, b, cols);
          for (int i = 0; i < 8; ++i) {
            const int64_t c = 8 * b + i;
            const bool want = c < cols && dropout_keep(d, static_cast<uint64_t>(r * cols + c));
            CHECK(((k >> i) & 1u) == static_cast<uint32_t>(want), "p=%g cols=%lld r=%lld c=%lld", p, (long long)cols,
                  (long long)r, (long long)c);
          }
          if (cols % 8 == 0 && d.enabled && 8 * b < cols)  // the kernel's fast path (bytes within cols)
            CHECK(k == cuda::dropout_keep_bits<8>(d, static_cast<uint64_t>(r * cols + 8 * b)), "bits8 p=%g", p);
        }
    }
  }
}

// The kernel's loop (relu_mask_dropout_kernel), one byte at a time, on the host.
static void run_pass(std::vector<float>& h, std::vector<uint8_t>& mask, int64_t rows, int64_t cols, bool from_aux,
                     const DropoutParams& d) {
  const int64_t row_bytes = relu_mask_row_bytes(cols);
  for (int64_t k = 0; k < rows * row_bytes; ++k) {
    const int64_t r = k / row_bytes, b = k % row_bytes, c0 = 8 * b;
    const int64_t byte = relu_mask_byte(r, c0, cols);
    if (c0 >= cols) {
      mask[byte] = 0;
      continue;
    }
    const int count = static_cast<int>(cols - c0 < 8 ? cols - c0 : 8);
    const uint32_t keep = d.enabled ? relu_mask_keep_byte(d, r, b, cols) : 0xFFu;
    float v[8];
    for (int i = 0; i < count; ++i) v[i] = h[r * cols + c0 + i];
    mask[byte] = static_cast<uint8_t>(relu_mask_dropout_byte<float>(v, count, from_aux ? mask[byte] : 0u, from_aux,
                                                                     keep, d.enabled, static_cast<float>(d.scale)));
    if (!from_aux || d.enabled)
      for (int i = 0; i < count; ++i) h[r * cols + c0 + i] = v[i];
  }
}

static void check_pass() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (double p : {0.0, 0.3, 1.0}) {
    const DropoutParams d = make_dropout_params(p, 42, 0);
    for (int64_t cols : {1, 5, 8, 13, 127, 128, 129, 200}) {
      const int64_t rows = 3, ld = relu_mask_ld_bits(cols);
      std::vector<float> pre(rows * cols);
      for (auto& v : pre) v = static_cast<float>(uniform());
      pre[0] = 0.0f;  // exactly 0: not active
      if (pre.size() > 2) pre[2] = nan;
      for (bool from_aux : {true, false}) {
        std::vector<float> h(pre);
        // Poisoned mask (padding included): every bit the pass leaves alone would show.
        std::vector<uint8_t> mask(rows * relu_mask_row_bytes(cols), 0xA5);
        if (from_aux) {  // what cuBLASLt's RELU_AUX(_BIAS) documents: max(0, x) and its bit-mask
          for (auto& b : mask) b = 0;
          for (int64_t t = 0; t < rows; ++t)
            for (int64_t j = 0; j < cols; ++j) {
              float& v = h[t * cols + j];
              doc_set_bit(mask, j, t, ld, v > 0.0f);
              v = v > 0.0f ? v : 0.0f;  // cuBLASLt's ReLU: NaN -> 0
            }
        }
        run_pass(h, mask, rows, cols, from_aux, d);
        for (int64_t t = 0; t < rows; ++t) {
          for (int64_t j = 0; j < cols; ++j) {
            const float x = pre[t * cols + j];
            const bool keep = dropout_keep(d, static_cast<uint64_t>(t * cols + j));
            const bool want = x > 0.0f && keep;
            const bool got = (mask[relu_mask_byte(t, j, cols)] >> relu_mask_bit(j)) & 1u;
            CHECK(got == want && doc_get_bit(mask, j, t, ld) == want, "p=%g cols=%lld aux=%d t=%lld j=%lld", p,
                  (long long)cols, from_aux, (long long)t, (long long)j);
            const float hv = h[t * cols + j];
            if (std::isnan(x) && !from_aux && (keep || !d.enabled)) {
              CHECK(std::isnan(hv), "NaN kept by the fallback (cols=%lld)", (long long)cols);
            } else {
              const float relu = x > 0.0f ? x : 0.0f;
              const float expect = d.enabled ? (keep ? relu * static_cast<float>(d.scale) : 0.0f) : relu;
              CHECK(hv == expect, "hidden p=%g cols=%lld t=%lld j=%lld: %g vs %g", p, (long long)cols, (long long)t,
                    (long long)j, hv, expect);
            }
            // The backward's gate (DRELU / relu_mask_gate_): g * bit.
            const double g = uniform();
            const double gated = got ? g : 0.0;
            CHECK(gated == (x > 0.0f && keep ? g : 0.0), "gate");
          }
          for (int64_t j = cols; j < ld; ++j)
            CHECK(!doc_get_bit(mask, j, t, ld), "padding bit t=%lld j=%lld cols=%lld", (long long)t, (long long)j,
                  (long long)cols);
        }
      }
    }
  }
}

int main() {
  check_layout();
  check_keep_bytes();
  check_pass();
  return check_report();
}
