// CUDA entry points of scaled-dot-product attention (paper §3.2.1): the same checks, layouts and
// results as the CPU entry points (cpu/attention.cpp), plus float16. Picks a kernel:
//  - up to 4 query rows (decode step against a KV cache): the SIMT kernel, split over the keys
//    (split-K) when the rows alone cannot fill the GPU;
//  - float16 / bfloat16 with head dim 32, 64 or 128 on sm_80+: the tensor-core kernels
//    (attention_{fwd,bwd}_kernel.cuh, one file per head dim);
//  - anything else (float32, float64, other head dims): the SIMT kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "dispatch_dtype.h"
#include "../common/attention_args.h"
#include "../common/checks.h"
#include "../common/dropout.h"
#include "../common/tensor_layout.h"
#include "attention_launch.h"
#include "launch.h"

namespace aiayn::cuda {
namespace {

constexpr int64_t kDecodeRows = 4;     // as the CPU op: up to this many query rows take the decode path
constexpr int64_t kMinSplitKeys = 64;  // keys per split of the decode step, at least

// Whether a (B, H, L, D) tensor's rows can be loaded as 16-byte vectors (tensor-core kernels):
// aligned start and every stride that matters a multiple of 8 elements.
bool rows_16b(const at::Tensor& t) {
  if (!is_aligned(t.data_ptr(), 16)) return false;
  for (int d = 0; d < 3; ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return true;
}

// q / k / v / grad_out as the kernels take them: any strides with a contiguous last dim (views of
// a fused QKV projection need no copy); a copy when the last dim is strided, or when the
// tensor-core kernels need 16-byte rows and these are not.
at::Tensor kernel_layout(const at::Tensor& t, bool need_16b) {
  at::Tensor r = t.size(3) > 1 && t.stride(3) != 1 ? t.contiguous() : t;
  if (need_16b && !rows_16b(r)) r = at::empty(r.sizes(), r.options()).copy_(r);  // fresh: aligned
  return r;
}

void set_strides(int64_t* dst, const at::Tensor& t) {
  for (int d = 0; d < 3; ++d) dst[d] = t.stride(d);
}

bool tensor_cores(const at::Tensor& q) {
  const auto s = q.scalar_type();
  const int64_t d = q.size(3);
  if (!(s == at::kHalf || s == at::kBFloat16) || !(d == 32 || d == 64 || d == 128)) return false;
  int dev = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return major >= 8;
}

template <typename T>
bool launch_mma(bool backward, int64_t dim, const AttentionParams& p, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    switch (dim) {
      case 32: return backward ? launch_attention_bwd_mma<T, 32>(p, stream) : launch_attention_fwd_mma<T, 32>(p, stream);
      case 64: return backward ? launch_attention_bwd_mma<T, 64>(p, stream) : launch_attention_fwd_mma<T, 64>(p, stream);
      case 128: return backward ? launch_attention_bwd_mma<T, 128>(p, stream) : launch_attention_fwd_mma<T, 128>(p, stream);
      default: return false;
    }
  }
  return false;
}

struct Prepared {
  AttentionParams p;
  at::Tensor q, k, v, mask, key_padding;
  bool mma = false;
};

Prepared prepare(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                 const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
                 double dropout_p, bool is_causal, double scale, const at::Tensor& seed, bool backward) {
  check_attention_args(q_in, k_in, v_in, attn_mask, key_padding_mask, dropout_p,
                       {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(q_in.is_cuda(), kAttention, ": argument 'q' must be a CUDA tensor, got ", q_in.device());
  TORCH_CHECK_VALUE(std::isfinite(scale), kAttention, ": argument 'scale' must be finite, got ", scale);
  Prepared r;
  // The decode step (forward only) runs on the SIMT kernel whatever the dtype.
  r.mma = tensor_cores(q_in) && (backward || q_in.size(2) > kDecodeRows);
  r.q = kernel_layout(q_in, r.mma);
  r.k = kernel_layout(k_in, r.mma);
  r.v = kernel_layout(v_in, r.mma);
  AttentionParams& p = r.p;
  p.q = r.q.data_ptr();
  p.k = r.k.data_ptr();
  p.v = r.v.data_ptr();
  set_strides(p.q_stride, r.q);
  set_strides(p.k_stride, r.k);
  set_strides(p.v_stride, r.v);
  p.batch = r.q.size(0);
  p.heads = r.q.size(1);
  p.len_q = r.q.size(2);
  p.len_k = r.k.size(2);
  p.dim = static_cast<int>(r.q.size(3));
  p.scale = scale;
  p.causal = is_causal;
  if (attn_mask.has_value() && attn_mask->defined()) {
    // At its own shape (no expansion to B x H x Lq x Lk): broadcast dims get stride 0; additive
    // masks in the accumulation type.
    at::Tensor m = *attn_mask;
    if (m.scalar_type() == at::kBool) {
      p.mask_kind = kAttnMaskBool;
    } else {
      p.mask_kind = kAttnMaskAdditive;
      m = m.to(acc_type(q_in));
    }
    while (m.dim() < 4) m = m.unsqueeze(0);
    r.mask = m;
    p.mask = m.data_ptr();
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = m.size(d) == 1 ? 0 : m.stride(d);
  }
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    r.key_padding = *key_padding_mask;
    p.key_padding = r.key_padding.data_ptr<bool>();
    p.key_padding_stride[0] = r.key_padding.stride(0);
    p.key_padding_stride[1] = r.key_padding.stride(1);
  }
  p.dropout = make_dropout_params(dropout_p, dropout_p > 0.0 ? read_seed(kAttention, seed) : 0, 0);
  return r;
}

// Splits of the decode step: enough (row, split) warps to fill the GPU, each split >= 64 keys
// (a multiple of 32: the kernel's key chunk).
void plan_splits(AttentionParams& p) {
  const int64_t rows = p.batch * p.heads * p.len_q;
  const int64_t want_warps = static_cast<int64_t>(sm_count()) * 32;
  const int64_t max_splits = std::max<int64_t>(1, p.len_k / kMinSplitKeys);
  const int64_t splits = std::clamp<int64_t>((want_warps + rows - 1) / std::max<int64_t>(rows, 1), 1, max_splits);
  p.split_keys = ((p.len_k + splits - 1) / splits + 31) / 32 * 32;
  p.splits = static_cast<int>((p.len_k + p.split_keys - 1) / p.split_keys);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, double dropout_p, bool is_causal, double scale,
    const at::Tensor& seed, bool float_out) {
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, false);
  // float_out keeps the op's contract (float32 out for reduced q), but the kernels here still write
  // q's dtype: the conversion below adds no precision yet (the CPU kernel writes float rows).
  const bool widen = float_out && (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf);
  AttentionParams& p = r.p;
  at::Tensor out = at::empty({p.batch, p.heads, p.len_q, p.dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.len_q}, q.options().dtype(acc_type(q)));
  if (p.batch * p.heads == 0 || p.len_q == 0) return {widen ? out.to(at::kFloat) : out, lse};
  if (p.len_k == 0) {  // no keys: every row is fully masked
    out.zero_();
    lse.fill_(std::numeric_limits<double>::infinity());
    return {widen ? out.to(at::kFloat) : out, lse};
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor part_ml, part_o;
  dispatch_storage(q.scalar_type(), kAttention, [&](auto t, auto) {
    using T = decltype(t);
    if (r.mma && launch_mma<T>(false, p.dim, p, stream)) return;
    if (p.len_q <= kDecodeRows) plan_splits(p);
    if (p.splits > 1) {
      const int64_t items = p.batch * p.heads * p.len_q * p.splits;
      part_ml = at::empty({items, 2}, lse.options());
      part_o = at::empty({items, p.dim}, lse.options());
      p.part_ml = part_ml.data_ptr();
      p.part_o = part_o.data_ptr();
    }
    launch_attention_fwd_simt<T>(p, stream);
  });
  return {widen ? out.to(at::kFloat) : out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, double scale, const at::Tensor& seed) {
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, true);
  AttentionParams& p = r.p;
  check_same_shape(kAttention, "grad_out", grad_out, "q", q);
  check_same_dtype(kAttention, "grad_out", grad_out, "q", q);
  check_same_device(kAttention, "grad_out", grad_out, "q", q);
  check_same_shape(kAttention, "out", out, "q", q);
  check_same_device(kAttention, "out", out, "q", q);
  check_saved_out_dtype(out, q);
  check_same_device(kAttention, "lse", lse, "q", q);
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == p.batch && lse.size(1) == p.heads && lse.size(2) == p.len_q,
                    kAttention, ": argument 'lse' must have shape (batch, heads, Lq), got ", lse.sizes());
  const auto acc = acc_type(q);
  at::Tensor gq = at::empty({p.batch, p.heads, p.len_q, p.dim}, q.options());
  at::Tensor gk = at::empty({p.batch, p.heads, p.len_k, p.dim}, q.options());
  at::Tensor gv = at::empty({p.batch, p.heads, p.len_k, p.dim}, q.options());
  if (p.batch * p.heads == 0) return {gq, gk, gv};
  if (p.len_q == 0 || p.len_k == 0) return {gq.zero_(), gk.zero_(), gv.zero_()};
  const at::Tensor go = kernel_layout(grad_out, r.mma);
  // A float32 out (float_out) goes back to q's dtype: the delta kernel reads T rows.
  const at::Tensor o = out.to(q.scalar_type()).contiguous();
  const at::Tensor l = lse.to(acc).contiguous();
  at::Tensor delta = at::empty({p.batch, p.heads, p.len_q}, q.options().dtype(acc));
  p.grad_out = go.data_ptr();
  set_strides(p.grad_out_stride, go);
  p.out_saved = o.data_ptr();
  p.lse_saved = l.data_ptr();
  p.delta = delta.data_ptr();
  p.grad_q = gq.data_ptr();
  p.grad_k = gk.data_ptr();
  p.grad_v = gv.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(q.scalar_type(), kAttention, [&](auto t, auto) {
    using T = decltype(t);
    launch_attention_bwd_prep<T>(p, stream);
    if (r.mma && launch_mma<T>(true, p.dim, p, stream)) return;
    launch_attention_bwd_simt<T>(p, stream);
  });
  return {gq, gk, gv};
}

TORCH_LIBRARY_IMPL(aiayn, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace aiayn::cuda
