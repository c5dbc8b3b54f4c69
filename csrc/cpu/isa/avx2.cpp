// The kernels for AVX2 + FMA CPUs (Haswell and later, Zen 1 and later).
#include "prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")

namespace aiayn::cpu::avx2 {
#include "../simd/bf16.h"
#include "../simd/buffer.h"
#include "../simd/vec_scalar.h"
#include "../simd/vec_avx2.h"
#include "../dropout_kernel.h"
#include "../add_dropout_layer_norm_kernel.h"
#include "../peak_kernel.h"
#include "../gemm/gemm_kernel.h"

const KernelTable table = {
    .isa = Isa::avx2,
    .add_dropout_layer_norm_fwd = add_dropout_layer_norm_fwd,
    .add_dropout_layer_norm_bwd = add_dropout_layer_norm_bwd,
    .dropout_keep_bits = dropout_keep_bits,
    .gemm_info = gemm_info,
    .gemm_pack_b = gemm_pack_b,
    .gemm_run = gemm_run,
    .peak_fp32_fma = peak_fp32_fma,
    .peak_bf16_dot = nullptr,
};
}  // namespace aiayn::cpu::avx2

#pragma GCC pop_options

namespace aiayn::cpu {
const KernelTable* kernel_table_avx2() { return &avx2::table; }
}  // namespace aiayn::cpu
