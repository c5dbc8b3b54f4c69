// The kernels for AVX-512 CPUs with the BF16 extension (Cooper Lake, Sapphire Rapids, Zen 4 and later).
#include "prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2,popcnt")

namespace aiayn::cpu::avx512 {
#include "../simd/bf16.h"
#include "../simd/buffer.h"
#include "../simd/vec_scalar.h"
#include "../simd/vec_avx512.h"
#include "../dropout_kernel.h"
#include "../add_dropout_layer_norm_kernel.h"
#include "../peak_kernel.h"
#define AIAYN_GEMM_BF16_DOT 1
#include "../gemm/gemm_kernel.h"
#undef AIAYN_GEMM_BF16_DOT

// bf16 dot-product peak: vdpbf16ps does 32 multiply-adds (64 flops) per instruction.
inline double peak_bf16_dot(int64_t iters) {
  constexpr int kAcc = 12;
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(0.001f * static_cast<float>(i));
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3F7F);  // ~0.996 in bf16
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3A83);  // ~0.001
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    asm volatile("" ::: "memory");
  }
  __m512 s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = _mm512_add_ps(s, acc[i]);
  volatile float sink = _mm512_reduce_add_ps(s);
  (void)sink;
  return 64.0 * kAcc * static_cast<double>(iters);
}

const KernelTable table = {
    .isa = Isa::avx512,
    .add_dropout_layer_norm_fwd = add_dropout_layer_norm_fwd,
    .add_dropout_layer_norm_bwd = add_dropout_layer_norm_bwd,
    .dropout_keep_bits = dropout_keep_bits,
    .gemm_info = gemm_info,
    .gemm_pack_b = gemm_pack_b,
    .gemm_run = gemm_run,
    .peak_fp32_fma = peak_fp32_fma,
    .peak_bf16_dot = peak_bf16_dot,
};
}  // namespace aiayn::cpu::avx512

#pragma GCC pop_options

namespace aiayn::cpu {
const KernelTable* kernel_table_avx512() { return &avx512::table; }
}  // namespace aiayn::cpu
