// The ReLU bit-mask of feed_forward on CUDA: cuBLASLt's RELU_AUX(_BIAS) epilogue writes it, the
// dropout pass of ours (cuda/relu_dropout.h) ANDs the keep mask into it, and the backward GEMM's
// DRELU_BGRAD epilogue reads it. Host and device share these helpers (and the host test
// tests/cpp/relu_mask_check.cpp), so that one definition of the layout serves the writer, the
// readers and the emulation.
//
// Layout (cublasLt.h, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD: "ReLu bit-mask matrix leading
// dimension in elements (i.e. bits) ... Must be divisible by 128 and be no less than the number of
// rows in the output matrix"): a column-major bit matrix shaped like cuBLAS's D with a leading
// dimension of ld bits. Our row-major (rows, cols) activation is cuBLAS's column-major (cols, rows)
// D (cuda/cublaslt_gemm.cu), so element (r, c) is bit r * ld + c with ld = cols rounded up to 128:
// each row of the activation owns ld / 8 bytes (a multiple of 16), and the mask is a contiguous
// uint8 tensor (..., relu_mask_row_bytes(cols)). Bit b of the matrix is bit b % 8 of byte b / 8
// (least significant first) -- the one reading under which the header's "matrix of bits with a
// leading dimension in bits" is byte-addressable; the header says no more than that, so
// test_cuda_feed_forward.py checks it against cuBLASLt's own output on a GPU.
#pragma once
#include <cstdint>

#include "dropout.h"

namespace aiayn {

// cuBLASLt's required multiple for the bit-mask's leading dimension, in bits.
constexpr int64_t kReluMaskLdMultiple = 128;

AIAYN_HOST_DEVICE int64_t relu_mask_ld_bits(int64_t cols) {
  return (cols + kReluMaskLdMultiple - 1) / kReluMaskLdMultiple * kReluMaskLdMultiple;
}
AIAYN_HOST_DEVICE int64_t relu_mask_row_bytes(int64_t cols) { return relu_mask_ld_bits(cols) / 8; }

// Element (r, c) of a (rows, cols) activation: byte (r * ld + c) / 8, bit c % 8 of it (ld is a
// multiple of 8, so the row's bits start at a byte).
AIAYN_HOST_DEVICE int64_t relu_mask_byte(int64_t r, int64_t c, int64_t cols) {
  return r * relu_mask_row_bytes(cols) + c / 8;
}
AIAYN_HOST_DEVICE uint32_t relu_mask_bit(int64_t c) { return static_cast<uint32_t>(c & 7); }

// The dropout keep bits of mask byte `byte_in_row` of row r: bit i is dropout_keep(d, r * cols + c)
// for c = 8 * byte_in_row + i < cols (the hidden element numbering of the CPU op, common/dropout.h),
// 0 for the row's padding bits. All ones (within cols) when dropout is off.
AIAYN_HOST_DEVICE uint32_t relu_mask_keep_byte(const DropoutParams& d, int64_t r, int64_t byte_in_row, int64_t cols) {
  uint32_t bits = 0;
  const int64_t c0 = 8 * byte_in_row;
  for (int i = 0; i < 8 && c0 + i < cols; ++i)
    bits |= static_cast<uint32_t>(dropout_keep(d, static_cast<uint64_t>(r * cols + c0 + i))) << i;
  return bits;
}

// One mask byte of the pass after GEMM1 (relu_mask_dropout_ in cuda/relu_dropout.h), on the byte's
// count (1..8) elements v of one row, in the accumulation type A:
//   from_aux: v is already max(0, .) and aux_byte holds cuBLASLt's ReLU bits for them;
//   else:     v = max(0, v) here (NaN stays NaN: a comparison with NaN is false, as on the CPU) and
//             the ReLU bit is [v > 0] (0 for NaN).
// With dropout, v = keep ? v * scale : 0. Returns the new byte: ReLU bits & keep bits (bit i is
// element i, relu_mask_bit of its column), padding bits 0.
template <typename A>
AIAYN_HOST_DEVICE uint32_t relu_mask_dropout_byte(A* v, int count, uint32_t aux_byte, bool from_aux, uint32_t keep,
                                                  bool dropout, A scale) {
  uint32_t bits = from_aux ? aux_byte : 0u;
  for (int i = 0; i < count; ++i) {
    if (!from_aux) {
      v[i] = v[i] < A(0) ? A(0) : v[i];
      bits |= static_cast<uint32_t>(v[i] > A(0)) << i;
    }
    if (dropout) v[i] = (keep >> i) & 1u ? v[i] * scale : A(0);
  }
  return bits & keep & ((1u << count) - 1u);
}

}  // namespace aiayn
