// CUDA entry points of add_dropout_layer_norm: LayerNorm(residual + dropout(x)), the paper's
// sub-layer connection (§3.1, §5.4). Same checks, layouts and results as the CPU entry points
// (cpu/add_dropout_layer_norm.cpp), plus float16; the kernels are in
// add_dropout_layer_norm_kernel.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "dispatch_dtype.h"
#include "../common/add_dropout_layer_norm_args.h"
#include "../common/checks.h"
#include "../common/dropout.h"
#include "add_dropout_layer_norm_kernel.cuh"
#include "launch.h"

namespace aiayn::cuda {
namespace {

// weight / bias in the accumulation type, 16-byte aligned for the vector loads, or undefined for
// None (the kernels use 1 and 0 then, with no tensor to read).
at::Tensor affine_param(const std::optional<at::Tensor>& p, const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  at::Tensor t = p->to(acc_type(x)).contiguous();
  return is_aligned(t.data_ptr(), 16) ? t : t.clone();
}

template <typename A>
const A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<const A*>(t.data_ptr()) : nullptr;
}

template <typename T, typename A, int VEC>
void launch_fwd(const AdlnFwdArgs<T, A>& a, cudaStream_t stream) {
  const int threads = block_threads(a.cols / VEC, kAdlnMaxThreads);
  const int64_t blocks = std::min(a.rows, kMaxRowBlocks);
  const size_t smem = static_cast<size_t>(a.cols) * sizeof(A);
  if (request_dynamic_smem(add_dropout_layer_norm_fwd_kernel<T, A, VEC, true>, smem)) {
    add_dropout_layer_norm_fwd_kernel<T, A, VEC, true><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(a);
  } else {
    add_dropout_layer_norm_fwd_kernel<T, A, VEC, false><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Partials bigger than this get fewer blocks (only for very long rows: cols in the millions).
constexpr size_t kMaxPartialBytes = size_t{64} << 20;

// Launches the row kernel; returns the number of blocks, whose partial sums fill `partial`
// (allocated here, [2][blocks][cols]).
template <typename T, typename A, int VEC>
int64_t launch_bwd(AdlnBwdArgs<T, A> a, const at::Tensor& x, at::Tensor& partial, cudaStream_t stream) {
  const int threads = block_threads(a.cols / VEC, kAdlnMaxThreads);
  const size_t smem = static_cast<size_t>(a.cols) * 3 * sizeof(A) + static_cast<size_t>(a.cols / VEC);
  const bool cache = request_dynamic_smem(add_dropout_layer_norm_bwd_kernel<T, A, VEC, true>, smem);
  const int64_t resident = cache ? resident_blocks(add_dropout_layer_norm_bwd_kernel<T, A, VEC, true>, threads, smem)
                                 : resident_blocks(add_dropout_layer_norm_bwd_kernel<T, A, VEC, false>, threads, 0);
  const int64_t by_memory =
      std::max<int64_t>(1, static_cast<int64_t>(kMaxPartialBytes / (2 * sizeof(A) * static_cast<size_t>(a.cols))));
  const int64_t blocks = std::min({a.rows, resident, by_memory});
  partial = at::empty({2, blocks, a.cols}, x.options().dtype(acc_type(x)));
  a.partial = static_cast<A*>(partial.data_ptr());
  if (cache) {
    add_dropout_layer_norm_bwd_kernel<T, A, VEC, true><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(a);
  } else {
    add_dropout_layer_norm_bwd_kernel<T, A, VEC, false><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return blocks;
}

template <typename A, typename O>
void launch_column_sums(const at::Tensor& partial, int64_t blocks, int64_t cols, at::Tensor& gw,
                        at::Tensor& gb, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t grid = std::min<int64_t>((cols + kThreads - 1) / kThreads, 65535);
  column_sums_kernel<A, O><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(static_cast<const A*>(partial.data_ptr()), blocks, cols,
                                                         static_cast<O*>(gw.data_ptr()), static_cast<O*>(gb.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_dropout_layer_norm_fwd_cuda(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double p, double eps, const at::Tensor& seed) {
  check_add_dropout_layer_norm_args(x, residual, weight, bias, p, eps,
                                    {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(x.is_cuda(), kAddDropoutLayerNorm, ": argument 'x' must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  at::Tensor out, mean, rstd;  // plain variables: lambdas below capture them (C++17)
  std::tie(out, mean, rstd) = add_dropout_layer_norm_outputs(x, rows);
  if (rows == 0 || cols == 0) return {out, mean, rstd};

  const at::Tensor x2 = as_rows(x, cols), r2 = as_rows(residual, cols);
  const at::Tensor w = affine_param(weight, x), b = affine_param(bias, x);
  const DropoutParams dropout = make_dropout_params(p, p > 0.0 ? read_seed(kAddDropoutLayerNorm, seed) : 0, 0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(x.scalar_type(), kAddDropoutLayerNorm, [&](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    constexpr int kVec = 16 / sizeof(T);
    AdlnFwdArgs<T, A> a{};
    a.x = static_cast<const T*>(x2.data_ptr());
    a.residual = static_cast<const T*>(r2.data_ptr());
    a.x_stride = row_stride(x2);
    a.residual_stride = row_stride(r2);
    a.weight = ptr_or_null<A>(w);
    a.bias = ptr_or_null<A>(b);
    a.out = static_cast<T*>(out.data_ptr());
    a.mean = static_cast<A*>(mean.data_ptr());
    a.rstd = static_cast<A*>(rstd.data_ptr());
    a.rows = rows;
    a.cols = cols;
    a.eps = static_cast<A>(eps);
    a.dropout = dropout;
    const bool vec = cols % kVec == 0 && rows_vectorizable(a.x, a.x_stride, sizeof(T)) &&
                     rows_vectorizable(a.residual, a.residual_stride, sizeof(T)) && is_aligned(a.out, 16);
    if (vec) {
      launch_fwd<T, A, kVec>(a, stream);
    } else {
      launch_fwd<T, A, 1>(a, stream);
    }
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_dropout_layer_norm_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& residual,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    double p, const at::Tensor& seed) {
  check_add_dropout_layer_norm_args(x, residual, weight, std::nullopt, p, 0.0,
                                    {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  const int64_t rows = check_add_dropout_layer_norm_bwd_args(grad_out, x, mean, rstd);
  TORCH_CHECK(x.is_cuda(), kAddDropoutLayerNorm, ": argument 'x' must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cols = x.size(-1);
  const auto acc = acc_type(x);
  at::Tensor gx = at::empty(x.sizes(), x.options());
  at::Tensor gr = at::empty(x.sizes(), x.options());
  const auto wdtype = weight.has_value() && weight->defined() ? weight->scalar_type() : acc;
  at::Tensor gw = at::empty({cols}, x.options().dtype(wdtype));
  at::Tensor gb = at::empty({cols}, x.options().dtype(wdtype));
  if (rows == 0 || cols == 0) {
    gw.zero_();
    gb.zero_();
    return {gx, gr, gw, gb};
  }

  const at::Tensor g2 = as_rows(grad_out, cols), x2 = as_rows(x, cols), r2 = as_rows(residual, cols);
  const at::Tensor w = affine_param(weight, x);
  const at::Tensor m = mean.to(acc).contiguous(), s = rstd.to(acc).contiguous();
  const DropoutParams dropout = make_dropout_params(p, p > 0.0 ? read_seed(kAddDropoutLayerNorm, seed) : 0, 0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(x.scalar_type(), kAddDropoutLayerNorm, [&](auto t, auto acc_v) {
    using T = decltype(t);
    using A = decltype(acc_v);
    constexpr int kVec = 16 / sizeof(T);
    AdlnBwdArgs<T, A> a{};
    a.grad_out = static_cast<const T*>(g2.data_ptr());
    a.x = static_cast<const T*>(x2.data_ptr());
    a.residual = static_cast<const T*>(r2.data_ptr());
    a.grad_out_stride = row_stride(g2);
    a.x_stride = row_stride(x2);
    a.residual_stride = row_stride(r2);
    a.weight = ptr_or_null<A>(w);
    a.mean = static_cast<const A*>(m.data_ptr());
    a.rstd = static_cast<const A*>(s.data_ptr());
    a.grad_x = static_cast<T*>(gx.data_ptr());
    a.grad_residual = static_cast<T*>(gr.data_ptr());
    a.rows = rows;
    a.cols = cols;
    a.dropout = dropout;
    const bool vec = cols % kVec == 0 && rows_vectorizable(a.grad_out, a.grad_out_stride, sizeof(T)) &&
                     rows_vectorizable(a.x, a.x_stride, sizeof(T)) &&
                     rows_vectorizable(a.residual, a.residual_stride, sizeof(T)) &&
                     is_aligned(a.grad_x, 16) && is_aligned(a.grad_residual, 16);
    at::Tensor partial;
    const int64_t blocks = vec ? launch_bwd<T, A, kVec>(a, x, partial, stream) : launch_bwd<T, A, 1>(a, x, partial, stream);
    switch (wdtype) {
      case at::kFloat: return launch_column_sums<A, float>(partial, blocks, cols, gw, gb, stream);
      case at::kDouble: return launch_column_sums<A, double>(partial, blocks, cols, gw, gb, stream);
      case at::kHalf: return launch_column_sums<A, __half>(partial, blocks, cols, gw, gb, stream);
      case at::kBFloat16: return launch_column_sums<A, __nv_bfloat16>(partial, blocks, cols, gw, gb, stream);
      default: TORCH_CHECK(false, kAddDropoutLayerNorm, ": unreachable weight dtype ", wdtype);
    }
  });
  return {gx, gr, gw, gb};
}

TORCH_LIBRARY_IMPL(aiayn, CUDA, m) {
  m.impl("add_dropout_layer_norm_fwd", &add_dropout_layer_norm_fwd_cuda);
  m.impl("add_dropout_layer_norm_bwd", &add_dropout_layer_norm_bwd_cuda);
}

}  // namespace aiayn::cuda
