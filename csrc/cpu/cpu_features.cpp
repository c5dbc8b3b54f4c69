// Runtime ISA selection: cpuid (through GCC's __builtin_cpu_supports, which also checks that the
// OS saves the wide registers) picks the widest kernel table compiled in; AIAYN_CPU_ISA lowers it.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace aiayn::cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    case Isa::generic: return "generic";
  }
  return "?";
}

namespace {

bool cpu_has(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni") &&
             __builtin_cpu_supports("bmi2");
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi2");
    case Isa::generic: return true;
  }
  return false;
#else
  return isa == Isa::generic;
#endif
}

const KernelTable* table_for(Isa isa) {
  switch (isa) {
    case Isa::avx512: return kernel_table_avx512();
    case Isa::avx2: return kernel_table_avx2();
    case Isa::generic: return kernel_table_generic();
  }
  return nullptr;
}

Isa parse(const char* name) {
  for (Isa isa : {Isa::avx512, Isa::avx2, Isa::generic})
    if (std::strcmp(name, isa_name(isa)) == 0) return isa;
  throw std::invalid_argument(std::string("unknown CPU ISA '") + name +
                              "', expected avx512, avx2 or generic");
}

const KernelTable* best() {
  for (Isa isa : {Isa::avx512, Isa::avx2})
    if (cpu_has(isa) && table_for(isa)) return table_for(isa);
  return kernel_table_generic();
}

const KernelTable* select_from_env() {
  const KernelTable* t = best();
  const char* env = std::getenv("AIAYN_CPU_ISA");
  if (env && *env) {
    const Isa want = parse(env);
    // Only ever lower: asking for more than the CPU has would crash on the first instruction.
    if (static_cast<int>(want) < static_cast<int>(t->isa)) t = table_for(want);
  }
  return t;
}

std::atomic<const KernelTable*> g_table{nullptr};

}  // namespace

const KernelTable& kernels() {
  static const KernelTable* initial = select_from_env();
  const KernelTable* t = g_table.load();
  return t ? *t : *initial;
}

bool amx_supported() {
  static const bool ok = [] {
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && defined(SYS_arch_prctl) && defined(AIAYN_AMX_COMPILED)
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
    if (!amx_tile || !amx_bf16 || !cpu_has(Isa::avx512)) return false;
    // The tile data (8 KiB per thread) is off by default since Linux 5.16: a process asks once for
    // permission (process-wide, for every thread); older kernels or a refusal mean no AMX.
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

bool isa_supported(const char* name) {
  const Isa isa = parse(name);
  return cpu_has(isa) && table_for(isa) != nullptr;
}

void set_isa(const char* name) {
  const Isa isa = parse(name);
  if (!cpu_has(isa) || !table_for(isa))
    throw std::invalid_argument(std::string("CPU ISA '") + name + "' is not supported here");
  g_table = table_for(isa);
}

}  // namespace aiayn::cpu
