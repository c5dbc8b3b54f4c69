// The kernels for AVX2 + FMA CPUs (Haswell and later, Zen 1 and later).
#include "prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")

namespace aiayn::cpu::avx2 {
#include "simd.inc"
#include "../simd/vec_avx2.h"

constexpr Isa kIsa = Isa::avx2;
constexpr double (*kPeakBf16)(int64_t) = nullptr;
constexpr double (*kPeakBf16Amx)(int64_t) = nullptr;
#define AIAYN_INT8_AVX2 1  // int8_kernel.h: vpmaddwd on int16
#include "kernels.inc"
#undef AIAYN_INT8_AVX2
}  // namespace aiayn::cpu::avx2

#pragma GCC pop_options

namespace aiayn::cpu {
const KernelTable* kernel_table_avx2() { return &avx2::table; }
}  // namespace aiayn::cpu
