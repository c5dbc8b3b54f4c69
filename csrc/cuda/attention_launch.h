// The seam between the CUDA attention entry points (attention.cu) and the kernels, which are
// compiled in one file per (pass, head dim) to keep the build parallel and small: the kernel
// argument struct and the launchers each file defines.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dropout.h"

namespace aiayn::cuda {

enum AttentionMaskKind : int { kAttnMaskNone = 0, kAttnMaskBool = 1, kAttnMaskAdditive = 2 };

// Everything a kernel needs, by value. Strides in elements, (batch, head, row); q / k / v /
// grad_out have a contiguous last dim. out, lse, delta and the gradients are contiguous.
struct AttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride[3] = {}, k_stride[3] = {}, v_stride[3] = {};
  int64_t batch = 0, heads = 0, len_q = 0, len_k = 0;
  int dim = 0;
  double scale = 1.0;
  bool causal = false;
  int mask_kind = kAttnMaskNone;
  const void* mask = nullptr;  // bool, or additive in the accumulation type; broadcast dims stride 0
  int64_t mask_stride[4] = {};
  const bool* key_padding = nullptr;  // (B, Lk), True = padding
  int64_t key_padding_stride[2] = {};
  DropoutParams dropout;
  // Forward outputs: out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) in the accumulation type.
  void* out = nullptr;
  void* lse = nullptr;
  // Split-K decode (SIMT forward with splits > 1): partial (m, l) pairs and unnormalised rows.
  int splits = 1;
  int64_t split_keys = 0;  // keys per split, a multiple of 32
  void* part_ml = nullptr;
  void* part_o = nullptr;
  // Backward: grad_out (strided like q), out (contiguous), lse and delta = rowsum(dO * O) in the
  // accumulation type, gradients contiguous in q's dtype.
  const void* grad_out = nullptr;
  int64_t grad_out_stride[3] = {};
  const void* out_saved = nullptr;
  const void* lse_saved = nullptr;
  void* delta = nullptr;
  void* grad_q = nullptr;
  void* grad_k = nullptr;
  void* grad_v = nullptr;
};

// Tensor-core kernels (attention_{fwd,bwd}_d{32,64,128}.cu), T = __half or __nv_bfloat16, sm_80+.
// The backward expects delta already computed (launch_attention_bwd_prep). false: not launched
// (the device lacks the shared memory), the caller takes the SIMT kernels.
template <typename T, int D>
bool launch_attention_fwd_mma(const AttentionParams& p, cudaStream_t stream);
template <typename T, int D>
bool launch_attention_bwd_mma(const AttentionParams& p, cudaStream_t stream);

// SIMT kernels (attention_simt.cu), any dtype (T = float, double, __half, __nv_bfloat16), any D <= 256.
// The forward does the split-K decode too when p.splits > 1 (and combines the splits).
template <typename T>
void launch_attention_fwd_simt(const AttentionParams& p, cudaStream_t stream);
template <typename T>
void launch_attention_bwd_simt(const AttentionParams& p, cudaStream_t stream);
// delta_i = dO_i . O_i for every query row (both backward paths).
template <typename T>
void launch_attention_bwd_prep(const AttentionParams& p, cudaStream_t stream);

}  // namespace aiayn::cuda
