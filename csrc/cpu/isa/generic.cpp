// The kernels for any x86-64 CPU (baseline SSE2 code generation, no target pragma).
#include "prelude.h"

namespace aiayn::cpu::generic {
#include "../simd/bf16.h"
#include "../simd/buffer.h"
#include "../simd/vec_scalar.h"
#include "../simd/vec_generic.h"
#include "../dropout_kernel.h"
#include "../add_dropout_layer_norm_kernel.h"
#include "../peak_kernel.h"
#include "../gemm/gemm_kernel.h"

const KernelTable table = {
    .isa = Isa::generic,
    .add_dropout_layer_norm_fwd = add_dropout_layer_norm_fwd,
    .add_dropout_layer_norm_bwd = add_dropout_layer_norm_bwd,
    .dropout_keep_bits = dropout_keep_bits,
    .gemm_info = gemm_info,
    .gemm_pack_b = gemm_pack_b,
    .gemm_run = gemm_run,
    .peak_fp32_fma = peak_fp32_fma,
    .peak_bf16_dot = nullptr,
};
}  // namespace aiayn::cpu::generic

namespace aiayn::cpu {
const KernelTable* kernel_table_generic() { return &generic::table; }
}  // namespace aiayn::cpu
