// Tensor-core attention backward, head dim 32: one file per (pass, head dim) keeps the build parallel and small.
#include "attention_bwd_kernel.cuh"

namespace aiayn::cuda {
template bool launch_attention_bwd_mma<__half, 32>(const AttentionParams&, cudaStream_t);
template bool launch_attention_bwd_mma<__nv_bfloat16, 32>(const AttentionParams&, cudaStream_t);
}  // namespace aiayn::cuda
