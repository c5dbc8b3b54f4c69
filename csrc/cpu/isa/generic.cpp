// The kernels for any x86-64 CPU (baseline SSE2 code generation, no target pragma).
#include "prelude.h"

namespace aiayn::cpu::generic {
#include "../simd/scalar_math.h"
#include "../simd/buffer.h"
#include "../simd/vec_scalar.h"
#include "../simd/vec_generic.h"
#include "../dropout_kernel.h"
#include "../add_dropout_layer_norm_kernel.h"
#include "../attention_gemm.h"
#include "../attention_kernel.h"
#include "../peak_kernel.h"

const KernelTable table = {
    .isa = Isa::generic,
    .add_dropout_layer_norm_fwd = add_dropout_layer_norm_fwd,
    .add_dropout_layer_norm_bwd = add_dropout_layer_norm_bwd,
    .attention_fwd = attention_fwd,
    .attention_bwd = attention_bwd,
    .attention_workspace = attention_workspace,
    .dropout_keep_bits = dropout_keep_bits,
    .peak_fp32_fma = peak_fp32_fma,
    .peak_bf16_dot = nullptr,
};
}  // namespace aiayn::cpu::generic

namespace aiayn::cpu {
const KernelTable* kernel_table_generic() { return &generic::table; }
}  // namespace aiayn::cpu
