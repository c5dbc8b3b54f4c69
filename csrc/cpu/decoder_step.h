// aiayn._C.decoder_step (decoder_step.cpp): one incremental decoding step through all decoder
// layers in C++, for aiayn/nn/transformer.py's Decoder.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace aiayn::cpu {

// Tensors per layer in `params`: six linear slots (self-attention in_proj and out_proj,
// cross-attention query rows of in_proj and out_proj, FFN w_1 and w_2), each (weight, scale, bias,
// packed) with undefined tensors for what a float linear lacks; then (weight, bias) of the three
// LayerNorms.
constexpr size_t kDecoderStepParams = 6 * 4 + 3 * 2;

// x: (N, 1, d_model), the embedded token of the step. self_k / self_v: per layer, the cache's
// position-major (capacity, N, heads, d_k) buffers holding `length` positions (capacity > length);
// this step's keys and values are written at `length`. cross_k / cross_v: per layer, the encoder
// output's (N, heads, S, d_k) keys and values. memory_padding: (N, S) bool, True = padding.
// Returns the last layer's output (N, 1, d_model) (before a pre-LN stack's final norm).
at::Tensor decoder_step(const at::Tensor& x, const std::vector<at::Tensor>& params,
                        const std::vector<at::Tensor>& self_k, const std::vector<at::Tensor>& self_v, int64_t length,
                        const std::vector<at::Tensor>& cross_k, const std::vector<at::Tensor>& cross_v,
                        const std::optional<at::Tensor>& memory_padding, int64_t heads, double eps, bool norm_first,
                        const at::Tensor& seed);

}  // namespace aiayn::cpu
