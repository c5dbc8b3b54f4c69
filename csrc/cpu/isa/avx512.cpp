// The kernels for AVX-512 CPUs with the BF16 and VNNI extensions (Cooper Lake, Sapphire Rapids, Zen 4 and
// later: every CPU with AVX512_BF16 has AVX512_VNNI, which the int8 linear uses).
#include "prelude.h"

#pragma GCC push_options
#ifdef AIAYN_AMX_COMPILED
// amx-tile / amx-bf16 only enable the tile intrinsics of the AMX GEMM (gemm_kernel.h), which run
// only where cpu_features' amx_supported() says so; no compiler generates AMX code by itself.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx2,fma,f16c,bmi,bmi2,popcnt,amx-tile,amx-bf16")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx2,fma,f16c,bmi,bmi2,popcnt")
#endif

namespace aiayn::cpu::avx512 {
#include "simd.inc"
#include "../simd/vec_avx512.h"

// bf16 dot-product peak: vdpbf16ps does 32 multiply-adds (64 flops) per instruction.
inline double peak_bf16_dot(int64_t iters) {
  constexpr int kAcc = 12;
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(0.001f * static_cast<float>(i));
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3F7F);  // ~0.996 in bf16
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3A83);  // ~0.001
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = _mm512_add_ps(s, acc[i]);
  volatile float sink = _mm512_reduce_add_ps(s);
  (void)sink;
  return 64.0 * kAcc * static_cast<double>(iters);
}

#ifdef AIAYN_AMX_COMPILED
#include "../simd/amx_tiles.h"
// bf16 peak on AMX tiles: four independent accumulators (tmm0..3) fed by two A and two B tiles
// that stay loaded, 16 x 16 x 32 multiply-adds per tdpbf16ps.
inline double peak_bf16_amx(int64_t iters) {
  alignas(64) static const uint16_t zeros[16 * 32] = {};  // operand values do not change the rate
  amx_configure();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, zeros, 64);
  _tile_loadd(5, zeros, 64);
  _tile_loadd(6, zeros, 64);
  _tile_loadd(7, zeros, 64);
  for (int64_t it = 0; it < iters; ++it) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float sink[16 * 16];
  _tile_stored(0, sink, 64);
  amx_barrier();
  _tile_release();
  volatile float keep = sink[0];
  (void)keep;
  return 4.0 * 2 * 16 * 16 * 32 * static_cast<double>(iters);
}
constexpr double (*kPeakBf16Amx)(int64_t) = peak_bf16_amx;
#else
constexpr double (*kPeakBf16Amx)(int64_t) = nullptr;
#endif

constexpr Isa kIsa = Isa::avx512;
constexpr double (*kPeakBf16)(int64_t) = peak_bf16_dot;
#define AIAYN_GEMM_BF16_DOT 1  // gemm_kernel.h: bf16 on vdpbf16ps
#define AIAYN_INT8_VNNI 1      // int8_kernel.h: vpdpbusd
#ifdef AIAYN_AMX_COMPILED
#define AIAYN_AMX_TILES 1  // bf16 on AMX tiles (Bf16Gemm::amx): gemm_kernel.h, attention_amx.h
#endif
#include "kernels.inc"
#undef AIAYN_AMX_TILES
#undef AIAYN_GEMM_BF16_DOT
#undef AIAYN_INT8_VNNI
}  // namespace aiayn::cpu::avx512

#pragma GCC pop_options

namespace aiayn::cpu {
const KernelTable* kernel_table_avx512() { return &avx512::table; }
}  // namespace aiayn::cpu
