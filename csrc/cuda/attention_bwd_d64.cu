// Tensor-core attention backward, head dim 64 (one file per head dim: parallel, small builds).
#include <c10/cuda/CUDAException.h>

#include "attention_bwd_kernel.cuh"

namespace aiayn::cuda {

template <typename T, int D>
bool launch_attention_bwd_mma(const AttentionParams& p, cudaStream_t stream) {
  return launch_attention_bwd_mma_impl<T, D>(p, stream);
}
template bool launch_attention_bwd_mma<__half, 64>(const AttentionParams&, cudaStream_t);
template bool launch_attention_bwd_mma<__nv_bfloat16, 64>(const AttentionParams&, cudaStream_t);

}  // namespace aiayn::cuda
