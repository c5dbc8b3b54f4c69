// Launchers of the SIMT attention kernels (attention_simt_kernel.cuh) for every storage type.
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "attention_simt_kernel.cuh"
#include "launch.h"

namespace aiayn::cuda {
namespace {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Warps of work -> blocks of kSimtWarps warps (grid-stride loops cover the rest).
unsigned simt_blocks(int64_t warps) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min((warps + kSimtWarps - 1) / kSimtWarps, kMaxRowBlocks)));
}

}  // namespace

template <typename T>
void launch_attention_fwd_simt(const AttentionParams& p, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int64_t items = p.batch * p.heads * p.splits * p.len_q;
  attention_fwd_simt_kernel<T, A><<<simt_blocks(items), kSimtWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits > 1) {
    attention_combine_splits_kernel<T, A><<<simt_blocks(p.batch * p.heads * p.len_q), kSimtWarps * 32, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_attention_bwd_prep(const AttentionParams& p, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  attention_bwd_prep_kernel<T, A><<<simt_blocks(p.batch * p.heads * p.len_q), kSimtWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_attention_bwd_simt(const AttentionParams& p, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  attention_bwd_dq_simt_kernel<T, A><<<simt_blocks(p.batch * p.heads * p.len_q), kSimtWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  attention_bwd_dkdv_simt_kernel<T, A><<<simt_blocks(p.batch * p.heads * p.len_k), kSimtWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define AIAYN_ATTENTION_SIMT(T)                                                             \
  template void launch_attention_fwd_simt<T>(const AttentionParams&, cudaStream_t);        \
  template void launch_attention_bwd_prep<T>(const AttentionParams&, cudaStream_t);        \
  template void launch_attention_bwd_simt<T>(const AttentionParams&, cudaStream_t);
AIAYN_ATTENTION_SIMT(float)
AIAYN_ATTENTION_SIMT(double)
AIAYN_ATTENTION_SIMT(__half)
AIAYN_ATTENTION_SIMT(__nv_bfloat16)
#undef AIAYN_ATTENTION_SIMT

}  // namespace aiayn::cuda
