// Tensor-core attention forward, head dim 64: one file per (pass, head dim) keeps the build parallel and small.
#include "attention_fwd_kernel.cuh"

namespace aiayn::cuda {
template bool launch_attention_fwd_mma<__half, 64>(const AttentionParams&, cudaStream_t);
template bool launch_attention_fwd_mma<__nv_bfloat16, 64>(const AttentionParams&, cudaStream_t);
}  // namespace aiayn::cuda
