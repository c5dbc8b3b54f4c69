// Argument checks of linear and feed_forward, shared by the CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <vector>

#include "checks.h"
#include "relu_mask.h"

namespace aiayn {

constexpr const char* kLinear = "linear";
constexpr const char* kFeedForward = "feed_forward";

// A 2-d weight of x's dtype and device with the given shape (rows, cols); names in messages.
inline void check_weight(const char* op, const char* name, const at::Tensor& w, const at::Tensor& x,
                         int64_t rows, const char* rows_name, int64_t cols, const char* cols_name) {
  check_defined(op, name, w);
  check_same_device(op, name, w, "x", x);
  check_same_dtype(op, name, w, "x", x);
  TORCH_CHECK_VALUE(w.dim() == 2 && (rows < 0 || w.size(0) == rows) && w.size(1) == cols, op, ": argument '",
                    name, "' must have shape (", rows_name, rows < 0 ? "" : "=", rows < 0 ? std::string() : std::to_string(rows),
                    ", ", cols_name, "=", cols, "), got ", w.sizes());
}

inline void check_bias(const char* op, const char* name, const std::optional<at::Tensor>& b, const at::Tensor& x,
                       int64_t n, const char* n_name) {
  if (!b.has_value() || !b->defined()) return;
  check_same_device(op, name, *b, "x", x);
  check_same_dtype(op, name, *b, "x", x);
  TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == n, op, ": argument '", name, "' must have shape (", n_name,
                    "=", n, ",), got ", b->sizes());
}

inline void check_input(const char* op, const at::Tensor& x, std::initializer_list<at::ScalarType> dtypes) {
  check_defined(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": argument 'x' must have at least one dimension");
  check_dtype_in(op, "x", x, dtypes);
  check_addressable(op, "x", x, static_cast<int64_t>(x.element_size()));
}

// A (tokens, cols) result, tokens = x's leading elements, must be allocatable (x may be an expanded
// view far larger than its memory): refused, naming the arguments, before allocating (and before
// tokens * cols could overflow).
inline void check_result_addressable(const char* op, const char* names, const at::Tensor& x, int64_t cols,
                                     const char* cols_name) {
  constexpr int64_t kMaxBytes = int64_t{1} << 47;
  if (cols == 0) return;
  const int64_t max_tokens = kMaxBytes / std::max<int64_t>(x.element_size(), 1) / cols;
  int64_t tokens = 1;  // saturates at max_tokens + 1 (no overflow); 0 if any leading dim is 0
  for (int64_t i = 0; i + 1 < x.dim(); ++i) {
    if (x.size(i) == 0) return;
    tokens = tokens > max_tokens / x.size(i) ? max_tokens + 1 : tokens * x.size(i);
  }
  TORCH_CHECK_VALUE(tokens <= max_tokens, op,
                    ": arguments ", names, ": x of shape ", x.sizes(), " with ", cols_name, "=", cols,
                    " is too large: a result of its size needs more than 2^47 bytes");
}

// x: (..., in_features), w: (out_features, in_features), b: (out_features,).
inline void check_linear_args(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                              std::initializer_list<at::ScalarType> dtypes) {
  check_input(kLinear, x, dtypes);
  check_weight(kLinear, "w", w, x, -1, "out_features", x.size(-1), "in_features");
  check_bias(kLinear, "b", b, x, w.size(0), "out_features");
  check_result_addressable(kLinear, "'x' and 'w'", x, w.size(0), "out_features");
}

// x: (..., d_model), w1: (d_ff, d_model), b1: (d_ff,), w2: (d_model, d_ff), b2: (d_model,).
inline void check_feed_forward_args(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                    const at::Tensor& w2, const std::optional<at::Tensor>& b2, double p,
                                    std::initializer_list<at::ScalarType> dtypes) {
  check_input(kFeedForward, x, dtypes);
  const int64_t d_model = x.size(-1);
  check_weight(kFeedForward, "w1", w1, x, -1, "d_ff", d_model, "d_model");
  const int64_t d_ff = w1.size(0);
  check_weight(kFeedForward, "w2", w2, x, d_model, "d_model", d_ff, "d_ff");
  check_bias(kFeedForward, "b1", b1, x, d_ff, "d_ff");
  check_bias(kFeedForward, "b2", b2, x, d_model, "d_model");
  check_probability(kFeedForward, "p", p);
  check_result_addressable(kFeedForward, "'x' and 'w1'", x, d_ff, "d_ff");
}

// The leading elements of x: the GEMMs' token count (1 for a 1-d x).
inline int64_t leading_elements(const at::Tensor& x) {
  int64_t tokens = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) tokens *= x.size(i);
  return tokens;
}

// x's shape with the last dim replaced.
inline std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> s = x.sizes().vec();
  s.back() = last;
  return s;
}

// linear_bwd: grad_out like the forward's output, and that output when relu (its sign is the mask).
inline void check_linear_bwd_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
                                  const std::optional<at::Tensor>& out, bool relu,
                                  std::initializer_list<at::ScalarType> dtypes) {
  check_linear_args(x, w, std::nullopt, dtypes);
  const std::vector<int64_t> shape = with_last(x, w.size(0));
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(shape), kLinear, ": argument 'grad_out' must have shape ",
                    at::IntArrayRef(shape), ", got ", grad_out.sizes());
  check_same_dtype(kLinear, "grad_out", grad_out, "x", x);
  check_same_device(kLinear, "grad_out", grad_out, "x", x);
  TORCH_CHECK_VALUE(!relu || (out.has_value() && out->defined() && out->sizes() == grad_out.sizes()), kLinear,
                    ": argument 'out' (the forward output) is needed with shape ", grad_out.sizes(), " when relu");
  if (relu) {
    check_same_dtype(kLinear, "out", *out, "x", x);
    check_same_device(kLinear, "out", *out, "x", x);
  }
}

// feed_forward_bwd: grad_out like x, hidden (the forward's hidden activation) (..., d_ff).
inline void check_feed_forward_bwd_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                                        const at::Tensor& w2, const at::Tensor& hidden, double p,
                                        std::initializer_list<at::ScalarType> dtypes) {
  check_feed_forward_args(x, w1, std::nullopt, w2, std::nullopt, p, dtypes);
  check_same_shape(kFeedForward, "grad_out", grad_out, "x", x);
  check_same_dtype(kFeedForward, "grad_out", grad_out, "x", x);
  check_same_device(kFeedForward, "grad_out", grad_out, "x", x);
  check_defined(kFeedForward, "hidden", hidden);
  check_same_dtype(kFeedForward, "hidden", hidden, "x", x);
  check_same_device(kFeedForward, "hidden", hidden, "x", x);
  const std::vector<int64_t> shape = with_last(x, w1.size(0));
  TORCH_CHECK_VALUE(hidden.sizes() == at::IntArrayRef(shape), kFeedForward, ": argument 'hidden' must have shape ",
                    at::IntArrayRef(shape), ", got ", hidden.sizes());
}

// feed_forward_bwd's relu_mask: None or empty (the gate is then read off hidden's sign, as the CPU
// does), or the CUDA forward's ReLU-and-dropout bit-mask (common/relu_mask.h): uint8
// (..., relu_mask_row_bytes(d_ff)) on x's device. Returns whether there is one.
inline bool check_relu_mask(const std::optional<at::Tensor>& relu_mask, const at::Tensor& x, int64_t d_ff) {
  if (!relu_mask.has_value() || !relu_mask->defined() || relu_mask->numel() == 0) return false;
  const at::Tensor& m = *relu_mask;
  check_same_device(kFeedForward, "relu_mask", m, "x", x);
  const std::vector<int64_t> shape = with_last(x, relu_mask_row_bytes(d_ff));
  TORCH_CHECK_VALUE(m.scalar_type() == at::kByte && m.sizes() == at::IntArrayRef(shape), kFeedForward,
                    ": argument 'relu_mask' must be a uint8 tensor of shape ", at::IntArrayRef(shape),
                    " (the forward's bit-mask), got ", m.scalar_type(), " ", m.sizes());
  return true;
}

}  // namespace aiayn
