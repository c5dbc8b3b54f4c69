// The GEMMs of linear and feed_forward on CUDA: cuBLASLt with a fused epilogue (bias, or the bias
// gradient of the reduced operand), and torch's own matmul as the fallback whenever cuBLASLt
// cannot do a call (float64, an alignment or shape no algorithm takes, an unsupported epilogue,
// AIAYN_CUBLASLT=0, the ReLU epilogues switched off). Row-major in, row-major out; the fallback
// gives the same result up to rounding (and NaN: see kRelu).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace aiayn::cuda {

// C = alpha * A B (+ epilogue), all row-major, on the current stream of C's device.
//   A: (M, K), or given as its transpose (K, M) when a_trans; B: (K, N), or (N, K) when b_trans.
//   Each is a 2-d tensor whose last dim has stride 1 and whose rows are >= a row apart.
//   C: (M, N), contiguous, same dtype.
enum class GemmEpilogue {
  kNone,
  kBias,       // C += bias[n]: bias (N,) in C's dtype, contiguous
  kBiasGradA,  // bias_grad[m] = sum over k of A[m, k] (the bias gradient of a weight gradient
               // dW = G^T X, A = G^T): bias_grad (M,) in C's dtype, contiguous
  kRelu,       // C = max(0, A B + bias[n]) (bias optional). cuBLASLt's ReLU turns NaN into 0; the
               // fallback (torch's matmul + our pass) keeps NaN as the CPU op does
  kReluAux,    // kRelu, and relu_mask (common/relu_mask.h layout, (M, relu_mask_row_bytes(N))
               // uint8, contiguous) gets bit (m, n) = [C[m, n] > 0] (written)
  kDReluBiasGrad,  // C = alpha * (A B) * bit(m, n) of relu_mask (read), and
                   // bias_grad[n] = sum over m of C[m, n]: bias_grad (N,) in C's dtype
};

struct GemmCall {
  at::Tensor a, b, c;
  bool a_trans = false, b_trans = false;
  double alpha = 1.0;
  GemmEpilogue epilogue = GemmEpilogue::kNone;
  at::Tensor bias;       // kBias, kRelu, kReluAux
  at::Tensor bias_grad;  // kBiasGradA, kDReluBiasGrad (written)
  at::Tensor relu_mask;  // kReluAux (written), kDReluBiasGrad (read)
};

// Runs the call; returns whether cuBLASLt ran it (false: the torch matmul fallback did).
bool gemm(const GemmCall& g);

// How many GEMMs took the fallback in this process (for tests).
int64_t gemm_fallback_count();

// Whether the ReLU epilogues (kRelu, kReluAux, kDReluBiasGrad) may run on cuBLASLt (default on);
// off sends them to the fallback, so that tests can compare both paths. Returns the old setting.
bool set_relu_epilogues(bool enabled);

}  // namespace aiayn::cuda
