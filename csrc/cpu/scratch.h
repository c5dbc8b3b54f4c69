// Reused scratch memory for the CPU ops' temporaries (packed GEMM operands, K-chunk partial
// products, attention workspaces). glibc returns large freed blocks to the OS (munmap, heap trim,
// MADV_DONTNEED of thread arenas) and page-faults them in again on the next call: ~1 us per 4 KiB
// page, ~20% of a 512-token linear backward here. Kernel-side buffers (simd/buffer.h) use the
// per-thread cache declared in kernels.h (kernel_scratch_acquire), implemented in scratch.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace aiayn::cpu {

// A uint8 tensor of `bytes` (data 64-byte aligned). From 64 KiB on it comes from a pool of blocks
// kept after use (returned when the tensor is freed; at most 384 MiB of unused blocks are kept,
// the largest freed first), so it is not page-faulted in on every call.
at::Tensor scratch_tensor(int64_t bytes);

}  // namespace aiayn::cpu
