// Intel AMX tile set-up shared by the bf16 kernels that use tiles (gemm/gemm_kernel.h,
// attention_amx.h, the AMX peak probe). Included by isa/avx512.cpp inside its namespace, only where
// AIAYN_AMX_COMPILED (the compiler knows the tile intrinsics).

// The asm of GCC's tile intrinsics declares no memory operands: barriers keep ordinary stores
// (packing) before the tile loads that read them and tile stores before the code that reads them.
inline void amx_barrier() { asm volatile("" ::: "memory"); }

// Palette 1 with all eight tiles at 16 rows x 64 bytes (a 16 x 16 float accumulator, a 16 x 32
// bf16 operand). The configuration is thread state: set it at the start of each task that uses
// tiles and _tile_release() at its end.
inline void amx_configure() {
  alignas(64) unsigned char cfg[64] = {};
  cfg[0] = 1;
  for (int t = 0; t < 8; ++t) {
    const uint16_t colsb = 64;
    std::memcpy(cfg + 16 + 2 * t, &colsb, 2);
    cfg[48 + t] = 16;
  }
  amx_barrier();
  _tile_loadconfig(cfg);
}
