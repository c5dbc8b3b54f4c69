// One incremental decoding step through every decoder layer (paper §3.1, §3.2.3: masked
// self-attention over the cached keys/values, attention over the encoder output, the FFN, each in
// its residual + LayerNorm), called once per step from Python instead of ~20 op calls per layer.
// Inference only: it calls the same aiayn ops through the dispatcher in the same order with the same
// arguments as aiayn/nn's modules do, so the tokens are the same (tests/test_decoder_step.py); what
// it removes is the Python interpreter between them (~10-20 us per op call against ~2 us here).
// Float models run linear / feed_forward / attention / add_dropout_layer_norm; int8 models
// (aiayn.quantize) linear_int8 for every projection. Not an op (no autograd, no fake kernel): a
// pybind11 helper, aiayn._C.decoder_step.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "decoder_step.h"

namespace aiayn::cpu {
namespace {

using OptT = std::optional<at::Tensor>;

const auto& linear_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aiayn::linear_fwd", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, bool)>();
  return op;
}

const auto& linear_int8_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("aiayn::linear_int8", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, bool, const OptT&)>();
  return op;
}

const auto& feed_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aiayn::feed_forward_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&, const OptT&,
                                 double, const at::Tensor&)>();
  return op;
}

const auto& attention_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aiayn::attention_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, const OptT&,
                                 double, bool, double, const at::Tensor&, bool)>();
  return op;
}

const auto& add_norm_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aiayn::add_dropout_layer_norm_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, double, double,
                                 const at::Tensor&)>();
  return op;
}

OptT opt(const at::Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }

// A linear slot: (weight, scale, bias, packed); int8 when the weight is int8 (scale and packed
// from Int8Linear.rows), else the float linear (scale, packed undefined).
struct Linear {
  const at::Tensor *w, *scale, *b, *packed;
  at::Tensor operator()(const at::Tensor& x, bool relu = false) const {
    if (w->scalar_type() == at::kChar) return linear_int8_op().call(x, *w, *scale, opt(*b), relu, opt(*packed));
    return linear_op().call(x, *w, opt(*b), relu);
  }
  bool int8() const { return w->scalar_type() == at::kChar; }
};

}  // namespace

at::Tensor decoder_step(const at::Tensor& x_in, const std::vector<at::Tensor>& params,
                        const std::vector<at::Tensor>& self_k, const std::vector<at::Tensor>& self_v, int64_t length,
                        const std::vector<at::Tensor>& cross_k, const std::vector<at::Tensor>& cross_v,
                        const std::optional<at::Tensor>& memory_padding, int64_t heads, double eps, bool norm_first,
                        const at::Tensor& seed) {
  const size_t layers = self_k.size();
  TORCH_CHECK_VALUE(params.size() == layers * kDecoderStepParams && self_v.size() == layers &&
                        cross_k.size() == layers && cross_v.size() == layers,
                    "decoder_step: ", kDecoderStepParams, " parameters, a self-attention key and value buffer and "
                    "cross-attention keys and values per layer expected");
  TORCH_CHECK_VALUE(x_in.dim() == 3 && x_in.size(1) == 1, "decoder_step: x must be (N, 1, d_model), got ",
                    x_in.sizes());
  const int64_t N = x_in.size(0), d = x_in.size(2), dk = d / heads;
  TORCH_CHECK_VALUE(heads > 0 && d % heads == 0, "decoder_step: d_model ", d, " is not a multiple of heads ", heads);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dk));
  at::Tensor x = x_in;
  for (size_t l = 0; l < layers; ++l) {
    const at::Tensor* p = params.data() + l * kDecoderStepParams;
    const Linear sa_in{p + 0, p + 1, p + 2, p + 3}, sa_out{p + 4, p + 5, p + 6, p + 7};
    const Linear ca_q{p + 8, p + 9, p + 10, p + 11}, ca_out{p + 12, p + 13, p + 14, p + 15};
    const Linear ff1{p + 16, p + 17, p + 18, p + 19}, ff2{p + 20, p + 21, p + 22, p + 23};
    const at::Tensor* norms = p + 24;  // (weight, bias) of the three LayerNorms
    TORCH_CHECK_VALUE(self_k[l].dim() == 4 && self_k[l].size(0) > length && self_k[l].size(1) == N,
                      "decoder_step: layer ", l, "'s key buffer must be (capacity > ", length, ", ", N,
                      ", heads, d_k), got ", self_k[l].sizes());

    // The sub-layer connection of SublayerConnection: post-LN LayerNorm(x + sub(x)) on the fused
    // op, or pre-LN x + sub(LayerNorm(x)) on torch's layer_norm as nn.LayerNorm runs it.
    auto sublayer = [&](int which, auto&& sub) {
      const at::Tensor& w = norms[2 * which];
      const at::Tensor& b = norms[2 * which + 1];
      if (norm_first) return x + sub(at::layer_norm(x, {d}, opt(w), opt(b), eps));
      return std::get<0>(add_norm_op().call(sub(x), x, opt(w), opt(b), 0.0, eps, seed));
    };

    // Masked self-attention: this step's key/value go into the position-major cache at `length`;
    // the query attends to positions 0 .. length (a causal mask is moot for one query after the
    // cache; the first step keeps is_causal as MultiHeadAttention passes it).
    x = sublayer(0, [&](const at::Tensor& y) {
      const at::Tensor qkv = sa_in(y).view({N, 1, 3, heads, dk}).permute({2, 0, 3, 1, 4});
      self_k[l].select(0, length).copy_(qkv.select(0, 1).select(2, 0));
      self_v[l].select(0, length).copy_(qkv.select(0, 2).select(2, 0));
      const at::Tensor k = self_k[l].narrow(0, 0, length + 1).permute({1, 2, 0, 3});
      const at::Tensor v = self_v[l].narrow(0, 0, length + 1).permute({1, 2, 0, 3});
      // An int8 model may keep its caches in bf16: the query follows them (copy_ above rounds k, v
      // alike), as the module's projection casts all three.
      const at::Tensor q = qkv.select(0, 0).to(k.scalar_type());
      const at::Tensor o = std::get<0>(
          attention_op().call(q, k, v, std::nullopt, std::nullopt, 0.0, length == 0, scale, seed, false));
      return sa_out(o.transpose(1, 2).reshape({N, 1, d}));
    });
    // Attention over the encoder output (its keys/values projected once, before the first step).
    x = sublayer(1, [&](const at::Tensor& y) {
      const at::Tensor q =
          ca_q(y).to(cross_k[l].scalar_type()).view({N, 1, heads, dk}).permute({0, 2, 1, 3});
      const at::Tensor o = std::get<0>(attention_op().call(q, cross_k[l], cross_v[l], std::nullopt, memory_padding,
                                                           0.0, false, scale, seed, false));
      return ca_out(o.transpose(1, 2).reshape({N, 1, d}));
    });
    // The position-wise FFN: one fused op for float weights, two int8 linears (ReLU in the first).
    x = sublayer(2, [&](const at::Tensor& y) {
      if (ff1.int8()) return ff2(ff1(y, /*relu=*/true));
      return std::get<0>(feed_forward_op().call(y, *ff1.w, opt(*ff1.b), *ff2.w, opt(*ff2.b), 0.0, seed));
    });
  }
  return x;
}

}  // namespace aiayn::cpu
