// Argument checks of scaled-dot-product attention, shared by the CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/safe_numerics.h>

#include <initializer_list>
#include <optional>

#include "checks.h"

namespace aiayn {

constexpr const char* kAttention = "scaled_dot_product_attention";
constexpr int64_t kAttentionMaxHeadDim = 256;

// q: (B, H, Lq, D), k: (B, H, Lk, D), v: (B, H, Lk, D); masks broadcastable to (B, H, Lq, Lk)
// (attn_mask) and exactly (B, Lk) (key_padding_mask).
inline void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& attn_mask,
                                 const std::optional<at::Tensor>& key_padding_mask,
                                 double dropout_p, std::initializer_list<at::ScalarType> dtypes) {
  const char* op = kAttention;
  check_defined(op, "q", q);
  check_defined(op, "k", k);
  check_defined(op, "v", v);
  for (auto [name, t] : {std::pair{"q", &q}, std::pair{"k", &k}, std::pair{"v", &v}})
    TORCH_CHECK_VALUE(t->dim() == 4, op, ": argument '", name,
                      "' must be 4-D (batch, heads, length, head_dim), got shape ", t->sizes());
  check_dtype_in(op, "q", q, dtypes);
  check_same_dtype(op, "k", k, "q", q);
  check_same_dtype(op, "v", v, "q", q);
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "v", v, "q", q);
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                        v.size(1) == q.size(1),
                    op, ": arguments 'q', 'k', 'v' must have the same batch and heads, got ",
                    q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), op, ": argument 'k' must have head_dim ", q.size(3),
                    " (that of 'q'), got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.size(2) == k.size(2), op, ": argument 'v' must have length ", k.size(2),
                    " (that of 'k'), got shape ", v.sizes());
  TORCH_CHECK_VALUE(v.size(3) == q.size(3), op, ": argument 'v' must have head_dim ", q.size(3),
                    " (that of 'q' and 'k'; d_v = d_k as in the paper), got shape ", v.sizes());
  TORCH_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= kAttentionMaxHeadDim, op,
                    ": head_dim (last dim of 'q') must be in [1, ", kAttentionMaxHeadDim, "], got ",
                    q.size(3));
  check_addressable(op, "q", q, static_cast<int64_t>(q.element_size()));
  check_addressable(op, "k", k, static_cast<int64_t>(k.element_size()));
  check_addressable(op, "v", v, static_cast<int64_t>(v.element_size()));
  const int64_t want[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
  // Dropout numbers the (batch, head, query, key) scores with one int64 index, and the returned
  // mask has that many elements: the product must not overflow (checked before any allocation).
  int64_t scores = 1;
  bool overflow = false;
  for (int64_t n : want) overflow = overflow || c10::mul_overflows(scores, n, &scores);
  TORCH_CHECK_VALUE(!overflow, op, ": arguments 'q' and 'k' give batch * heads * Lq * Lk = ", want[0],
                    " * ", want[1], " * ", want[2], " * ", want[3],
                    " attention scores, more than an int64 index can number");
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    check_same_device(op, "attn_mask", m, "q", q);
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
                     ": argument 'attn_mask' must be bool (True = takes part) or floating (added to "
                     "the scores), got ", m.scalar_type());
    bool ok = m.dim() >= 1 && m.dim() <= 4;
    for (int64_t d = 0; ok && d < m.dim(); ++d) {
      const int64_t s = m.size(m.dim() - 1 - d), w = want[3 - d];
      ok = s == w || s == 1;
    }
    TORCH_CHECK_VALUE(ok, op, ": argument 'attn_mask' of shape ", m.sizes(),
                      " is not broadcastable to (batch, heads, Lq, Lk) = (", want[0], ", ", want[1],
                      ", ", want[2], ", ", want[3], ")");
  }
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const at::Tensor& m = *key_padding_mask;
    check_same_device(op, "key_padding_mask", m, "q", q);
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, op,
                     ": argument 'key_padding_mask' must be bool (True = padding), got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == want[0] && m.size(1) == want[3], op,
                      ": argument 'key_padding_mask' must have shape (batch, Lk) = (", want[0], ", ",
                      want[3], "), got ", m.sizes());
  }
  check_probability(op, "dropout_p", dropout_p);
}

// The backward's saved output: q's dtype, or float32 for reduced-precision q (the forward's
// float_out, what autograd saves so that delta = dO . O misses O's rounding).
inline void check_saved_out_dtype(const at::Tensor& out, const at::Tensor& q) {
  const bool reduced = q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf;
  TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type() || (reduced && out.scalar_type() == at::kFloat),
                   kAttention, ": argument 'out' must have q's dtype ", q.scalar_type(),
                   reduced ? " or float32" : "", ", got ", out.scalar_type());
}

}  // namespace aiayn
