// CPU entry points of scaled-dot-product attention (paper §3.2.1): checks, strides and masks in,
// then the ISA kernel (attention_kernel.h) over (batch, head, chunk) tasks with at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

#include "../common/attention_args.h"
#include "../common/dropout.h"
#include "../common/tensor_layout.h"
#include "gemm/gemm.h"
#include "kernel_dtype.h"
#include "kernels.h"
#include "scratch.h"

namespace aiayn::cpu {
namespace {

// q/k/v as used by the kernel: any strides with a contiguous last dim (views of a fused QKV
// projection need no copy); a copy only when the last dim is strided.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(3) > 1 && t.stride(3) != 1 ? t.contiguous() : t;
}

void set_strides(int64_t* dst, const at::Tensor& t) {
  dst[0] = t.stride(0);
  dst[1] = t.stride(1);
  dst[2] = t.stride(2);
}

// The user's mask at its own shape (no expansion to B x H x Lq x Lk), additive masks in the
// accumulation type; broadcast dims get stride 0.
at::Tensor prepare_mask(const std::optional<at::Tensor>& attn_mask, const at::Tensor& q, AttentionMask& m) {
  if (!attn_mask.has_value() || !attn_mask->defined()) return {};
  at::Tensor t = *attn_mask;
  if (t.scalar_type() == at::kBool) {
    m.kind = AttentionMask::boolean;
  } else {
    m.kind = AttentionMask::additive;
    t = t.to(acc_type(q));
  }
  while (t.dim() < 4) t = t.unsqueeze(0);
  m.data = t.data_ptr();
  for (int d = 0; d < 4; ++d) m.stride[d] = t.size(d) == 1 ? 0 : t.stride(d);
  return t;
}

int64_t chunks_per_head(int64_t heads_total, int64_t blocks) {
  // Enough tasks to keep every thread busy (4 per thread), never more than blocks per head.
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t per_head = (want + heads_total - 1) / std::max<int64_t>(heads_total, 1);
  return std::max<int64_t>(1, std::min<int64_t>(per_head, blocks));
}

struct Prepared {
  AttentionArgs a{};
  at::Tensor q, k, v, mask, key_padding;
};

Prepared prepare(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                 const std::optional<at::Tensor>& attn_mask,
                 const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                 bool is_causal, double scale, const at::Tensor& seed) {
  check_attention_args(q_in, k_in, v_in, attn_mask, key_padding_mask, dropout_p,
                       {at::kFloat, at::kBFloat16, at::kDouble});
  TORCH_CHECK_VALUE(std::isfinite(scale), kAttention, ": argument 'scale' must be finite, got ", scale);
  Prepared p;
  p.q = last_dim_contiguous(q_in);
  p.k = last_dim_contiguous(k_in);
  p.v = last_dim_contiguous(v_in);
  AttentionArgs& a = p.a;
  a.dtype = kernel_dtype(p.q);
  a.batch = p.q.size(0);
  a.heads = p.q.size(1);
  a.len_q = p.q.size(2);
  a.len_k = p.k.size(2);
  a.dim = p.q.size(3);
  a.q = p.q.data_ptr();
  a.k = p.k.data_ptr();
  a.v = p.v.data_ptr();
  set_strides(a.q_stride, p.q);
  set_strides(a.k_stride, p.k);
  set_strides(a.v_stride, p.v);
  p.mask = prepare_mask(attn_mask, p.q, a.mask);
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    p.key_padding = *key_padding_mask;
    a.key_padding = p.key_padding.data_ptr<bool>();
    a.key_padding_stride[0] = p.key_padding.stride(0);
    a.key_padding_stride[1] = p.key_padding.stride(1);
  }
  a.causal = is_causal;
  a.scale = scale;
  a.amx = a.dtype == DType::bf16 && a.dim % 32 == 0 && gemm_bf16_mode() == Bf16Gemm::amx;
  a.dropout = make_dropout_params(dropout_p, dropout_p > 0.0 ? read_seed(kAttention, seed) : 0, 0);
  return p;
}

// Scratch memory for the kernel: one block per thread, allocated once per call (the kernel carves
// its arrays out of its block with the ISA-side Workspace, simd/buffer.h).
class ThreadScratch {
 public:
  explicit ThreadScratch(size_t bytes_per_thread)
      : stride_((bytes_per_thread + 63) / 64 * 64),
        buf_(scratch_tensor(static_cast<int64_t>(stride_) * at::get_num_threads() + 64)) {}
  void* for_thread() const {
    auto base = reinterpret_cast<uintptr_t>(buf_.data_ptr());
    base = (base + 63) / 64 * 64;
    return reinterpret_cast<void*>(base + stride_ * static_cast<size_t>(at::get_thread_num()));
  }

 private:
  size_t stride_;
  at::Tensor buf_;
};

int64_t blocks(int64_t len, int64_t block) { return (len + block - 1) / block; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, double scale, const at::Tensor& seed, bool float_out) {
  Prepared p = prepare(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed);
  AttentionArgs& a = p.a;
  a.out_float = float_out && a.dtype == DType::bf16;
  at::Tensor out = at::empty({a.batch, a.heads, a.len_q, a.dim}, a.out_float ? q.options().dtype(at::kFloat) : q.options());
  at::Tensor lse = at::empty({a.batch, a.heads, a.len_q}, q.options().dtype(acc_type(q)));
  const int64_t heads_total = a.batch * a.heads;
  if (heads_total == 0 || a.len_q == 0) return {out, lse};
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  a.query_chunks = chunks_per_head(heads_total, blocks(a.len_q, kAttentionBlockQ));
  const KernelTable& kt = kernels();
  ThreadScratch ws(kt.attention_workspace(a, false));
  at::parallel_for(0, heads_total * a.query_chunks, 1,
                   [&](int64_t b, int64_t e) { kt.attention_fwd(a, b, e, ws.for_thread()); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, double dropout_p, bool is_causal,
    double scale, const at::Tensor& seed) {
  Prepared p = prepare(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed);
  AttentionArgs& a = p.a;
  check_same_shape(kAttention, "grad_out", grad_out, "q", q);
  check_same_dtype(kAttention, "grad_out", grad_out, "q", q);
  check_same_device(kAttention, "grad_out", grad_out, "q", q);
  check_same_shape(kAttention, "out", out, "q", q);
  check_saved_out_dtype(out, q);
  a.out_float = out.scalar_type() != q.scalar_type();
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == a.batch && lse.size(1) == a.heads &&
                        lse.size(2) == a.len_q,
                    kAttention, ": argument 'lse' must have shape (batch, heads, Lq), got ", lse.sizes());
  const auto acc = acc_type(q);
  at::Tensor go = last_dim_contiguous(grad_out);
  at::Tensor o = out.contiguous();
  at::Tensor l = lse.to(acc).contiguous();
  at::Tensor gk = at::empty({a.batch, a.heads, a.len_k, a.dim}, q.options());
  at::Tensor gv = at::empty({a.batch, a.heads, a.len_k, a.dim}, q.options());
  const int64_t heads_total = a.batch * a.heads;
  a.key_chunks = heads_total == 0 ? 1 : chunks_per_head(heads_total, std::max<int64_t>(1, blocks(a.len_k, kAttentionBlockK)));
  at::Tensor gq_partial = at::empty({a.batch, a.heads, a.key_chunks, a.len_q, a.dim}, q.options().dtype(acc));
  if (heads_total == 0) return {at::empty(q.sizes(), q.options()), gk, gv};
  if (a.len_q == 0 || a.len_k == 0) {
    gk.zero_();
    gv.zero_();
    return {at::zeros(q.sizes(), q.options()), gk, gv};
  }
  a.grad_out = go.data_ptr();
  set_strides(a.grad_out_stride, go);
  a.out = o.data_ptr();
  a.lse = l.data_ptr();
  a.grad_q_partial = gq_partial.data_ptr();
  a.grad_k = gk.data_ptr();
  a.grad_v = gv.data_ptr();
  const KernelTable& kt = kernels();
  ThreadScratch ws(kt.attention_workspace(a, true));
  at::parallel_for(0, heads_total * a.key_chunks, 1,
                   [&](int64_t b, int64_t e) { kt.attention_bwd(a, b, e, ws.for_thread()); });
  at::Tensor gq = a.key_chunks == 1 ? gq_partial.reshape({a.batch, a.heads, a.len_q, a.dim})
                                    : gq_partial.sum(2);
  return {gq.to(q.scalar_type()), gk, gv};
}

TORCH_LIBRARY_IMPL(aiayn, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace aiayn::cpu
