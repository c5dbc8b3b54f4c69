// The kernels for any x86-64 CPU (baseline SSE2 code generation, no target pragma).
#include "prelude.h"

namespace aiayn::cpu::generic {
#include "simd.inc"
#include "../simd/vec_generic.h"

constexpr Isa kIsa = Isa::generic;
constexpr double (*kPeakBf16)(int64_t) = nullptr;
constexpr double (*kPeakBf16Amx)(int64_t) = nullptr;
#include "kernels.inc"
}  // namespace aiayn::cpu::generic

namespace aiayn::cpu {
const KernelTable* kernel_table_generic() { return &generic::table; }
}  // namespace aiayn::cpu
