// Every op schema of the aiayn library, in one place, and the Python module aiayn._C with the
// helpers that are not ops. The CPU and CUDA kernels register in cpu/*.cpp and cuda/*.cu.
//
// Op semantics are documented in aiayn/functional.py and defined by aiayn/reference.py.
#include <torch/library.h>

#include "common/philox.h"
#include "cpu/decoder_step.h"
#include "cpu/kernels.h"

TORCH_LIBRARY(aiayn, m) {
  // LayerNorm(residual + dropout(x)) over the last dim (paper §3.1, §5.4). Returns
  // (out, mean, rstd); mean and rstd (float32, float64 for float64 x) feed the backward.
  // seed: int64 CPU tensor with one element, read only when p > 0 (the dropout mask is
  // dropout_mask(x, p, seed)).
  m.def("add_dropout_layer_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, "
        "float p, float eps, Tensor seed) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_residual, grad_weight, grad_bias); the dropout mask is regenerated.
  m.def("add_dropout_layer_norm_bwd(Tensor grad_out, Tensor x, Tensor residual, Tensor? weight, "
        "Tensor mean, Tensor rstd, float p, Tensor seed) -> (Tensor, Tensor, Tensor, Tensor)");
  // out = act(x w^T + b), act = ReLU when relu (else identity); w: (out_features, in_features)
  // like nn.Linear. x: (..., in_features), any leading shape.
  m.def("linear_fwd(Tensor x, Tensor w, Tensor? b, bool relu) -> Tensor");
  // Returns (grad_x, grad_w, grad_b); `out` (the forward's result) is read only when relu.
  m.def("linear_bwd(Tensor grad_out, Tensor x, Tensor w, Tensor? out, bool relu) -> (Tensor, Tensor, Tensor)");
  // int8 inference (CPU only, no autograd): out = act(float(q(x) w^T) * (x_scale * w_scale) + b),
  // float32 (..., out_features). x: (..., in_features) float32 or bfloat16 (widened), its rows
  // quantized on the fly (x_scale = max|row| / 127, q = round-half-even(x * 127 / max|row|));
  // w: int8 (out_features, in_features); w_scale: float32 (out_features,); b: float32 or None;
  // w_packed: linear_int8_pack(w), or None to pack on every call. Bits: aiayn.reference.linear_int8.
  m.def("linear_int8(Tensor x, Tensor w, Tensor w_scale, Tensor? b, bool relu, Tensor? w_packed=None) -> Tensor");
  // w's blocked layout for linear_int8 (uint8, the same on every ISA).
  m.def("linear_int8_pack(Tensor w) -> Tensor");
  // FFN(x) = dropout(relu(x w1^T + b1), p) w2^T + b2 (paper §3.3; dropout on the hidden activation,
  // hidden element (t, j) is dropout element number t * d_ff + j). Returns (out, hidden, relu_mask),
  // hidden being the activation after ReLU and dropout. relu_mask is the backward's gate as a
  // bit-mask (common/relu_mask.h), uint8 (..., ceil(d_ff / 128) * 16), on CUDA (cuBLASLt's RELU_AUX
  // output with the dropout keep mask ANDed in); on the CPU an empty (0,) tensor (the gate is
  // hidden > 0 there).
  m.def("feed_forward_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, float p, Tensor seed) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_w1, grad_b1, grad_w2, grad_b2). Without relu_mask (None or empty) the
  // gate is hidden > 0; the CPU always reads it there.
  m.def("feed_forward_bwd(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, Tensor hidden, float p, Tensor? relu_mask=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // softmax(q k^T * scale + mask) v over (B, H, L, D) tensors (paper §3.2.1); attn_mask bool
  // (True = takes part) or additive, broadcastable to (B, H, Lq, Lk); key_padding_mask (B, Lk)
  // bool (True = padding); is_causal: key j takes part in query i iff j <= i. Returns (out, lse):
  // out (B, H, Lq, D) contiguous, lse the natural-log log-sum-exp per row (+inf for a fully
  // masked row, whose output is 0). Dropout mask: dropout_mask(<(B, H, Lq, Lk)>, dropout_p, seed).
  // float_out: for bfloat16 / float16 q, out is float32 (the unrounded output, which autograd
  // saves for the backward's delta = dO . O); other dtypes ignore it.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? key_padding_mask, "
        "float dropout_p, bool is_causal, float scale, Tensor seed, bool float_out=False) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v), contiguous; probabilities and dropout are recomputed. out:
  // q's dtype, or float32 for bfloat16 / float16 q (attention_fwd's float_out).
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? attn_mask, Tensor? key_padding_mask, float dropout_p, bool is_causal, float scale, "
        "Tensor seed) -> (Tensor, Tensor, Tensor)");
  // The keep-mask (bool, shaped like `like`) that the ops above draw for (p, seed).
  m.def("dropout_mask(Tensor like, float p, Tensor seed) -> Tensor");
  // Label-smoothed cross-entropy (§5.4) of the logits z = x weight^T (the pre-softmax projection,
  // §3.4), never forming them whole: x (..., d), weight (V, d), target (...) int64. Per row:
  // nll = lse(z) - z[t], loss = (1 - eps) nll + eps (lse(z) - mean(z)); both 0 where t ==
  // ignore_index. reduction 0: (loss, nll) shaped like target; 1: their means over the counted
  // rows (NaN when none counts); 2: their sums. Accumulation type (float32; float64 for float64).
  // lse: (rows,) for the backward. compute_grad (reductions 1, 2): grad_x (x's shape), grad_weight
  // (V, d) of the reduced loss, accumulation type; else both empty.
  m.def("linear_cross_entropy_fwd(Tensor x, Tensor weight, Tensor target, float label_smoothing, int ignore_index, "
        "int reduction, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (grad_x, grad_weight) in x's / weight's dtype for per-row output gradients grad_loss and
  // grad_nll (shaped like target; ignored rows contribute nothing); the logits are recomputed.
  m.def("linear_cross_entropy_bwd(Tensor grad_loss, Tensor? grad_nll, Tensor x, Tensor weight, Tensor target, "
        "Tensor lse, float label_smoothing, int ignore_index) -> (Tensor, Tensor)");
  // Beam search's step scoring: over the last dim of logits (..., V) (float32 or bfloat16), the
  // k largest of log_softmax(logits) descending (equal values: lower index first), float32, and
  // their int64 indices, never choosing a column in `exclude` (which still counts in the
  // normaliser); slots beyond the finite, non-excluded values: -inf and index -1. Inference only.
  m.def("log_softmax_topk(Tensor logits, int k, int[] exclude) -> (Tensor, Tensor)");
}

#ifdef AIAYN_WITH_PYTHON
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <array>
#include <chrono>

#ifndef AIAYN_VERSION
#define AIAYN_VERSION "0.0.0"
#endif
#ifndef AIAYN_CUDA_ARCHS
#define AIAYN_CUDA_ARCHS ""
#endif

#ifdef AIAYN_WITH_CUDA
namespace aiayn::cuda {
int64_t gemm_fallback_count();  // cuda/cublaslt_gemm.cu
bool set_relu_epilogues(bool enabled);  // cuda/cublaslt_gemm.cu
}
#endif

namespace aiayn::cpu {
void gemm_clear_pack_cache();  // cpu/gemm/gemm.cpp
bool gemm_set_pack_cache(bool enabled);
Bf16Gemm gemm_bf16_mode();
int gemm_set_bf16_mode(int mode);
int gemm_set_rows_path(int mode);
}

namespace {

namespace cpu = aiayn::cpu;

const char* bf16_mode_name() {
  switch (cpu::gemm_bf16_mode()) {
    case cpu::Bf16Gemm::amx: return "amx";
    case cpu::Bf16Gemm::dot: return "vdpbf16ps";
    case cpu::Bf16Gemm::widened: break;
  }
  return "widened to float32";
}

py::dict build_info() {
  py::dict info;
  info["version"] = AIAYN_VERSION;
  info["torch_version"] = AIAYN_TORCH_VERSION;
  py::list compiled;
  for (const char* isa : {"avx512", "avx2", "generic"}) compiled.append(isa);
  info["cpu_isas_compiled"] = compiled;
  py::list supported;
  for (const char* isa : {"avx512", "avx2", "generic"})
    if (cpu::isa_supported(isa)) supported.append(isa);
  info["cpu_isas_supported"] = supported;
  info["cpu_isa"] = cpu::isa_name(cpu::kernels().isa);
  info["gemm_bf16"] = bf16_mode_name();
  info["amx_bf16"] = cpu::amx_supported();
#ifdef AIAYN_AMX_COMPILED
  info["amx_compiled"] = true;
#else
  info["amx_compiled"] = false;
#endif
#ifdef AIAYN_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(AIAYN_CUDA_ARCHS);
  info["openmp_threads"] = at::get_num_threads();
  info["parallel_backend"] = at::get_parallel_info();
  return info;
}

// Seconds and floating-point operations of a peak probe on every thread at once.
std::pair<double, double> run_peak(double (*probe)(int64_t), int64_t iters) {
  TORCH_CHECK(probe, "this CPU ISA has no such peak probe");
  const int threads = at::get_num_threads();
  std::vector<double> flops(threads, 0.0);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) flops[i] = probe(iters);
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double total = 0;
  for (double f : flops) total += f;
  return {s, total};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "aiayn compiled core: ops register with torch.ops.aiayn; helpers live here";
  m.def("build_info", &build_info, "What this build of aiayn contains and what it selected.");
  m.def("cpu_isa", [] { return std::string(cpu::isa_name(cpu::kernels().isa)); },
        "The CPU ISA variant the kernels run now.");
  m.def("set_cpu_isa", [](const std::string& name) { cpu::set_isa(name.c_str()); },
        "Force a CPU ISA variant (avx512, avx2, generic) the CPU supports; for tests.");
  m.def("clear_pack_cache", [] { cpu::gemm_clear_pack_cache(); },
        "Drop every cached packed weight of linear / feed_forward (after writes that bypass the version counter).");
  m.def("set_pack_cache", [](bool enabled) { return cpu::gemm_set_pack_cache(enabled); },
        "Turn the packed-weight cache of linear / feed_forward on or off; returns the previous setting.");
  m.def("gemm_bf16", [] { return std::string(bf16_mode_name()); },
        "How bf16 GEMMs (linear, feed_forward) run now: amx, vdpbf16ps or widened to float32.");
  m.def("set_gemm_bf16", [](int mode) { return cpu::gemm_set_bf16_mode(mode); },
        "Force the bf16 GEMM mode: 2 AMX (ValueError where unsupported), 1 vdpbf16ps, 0 widened to "
        "float32, -1 automatic (AIAYN_BF16_GEMM, else AMX where supported, else the faster of the "
        "other two, timed once); returns the previous setting; for tests.");
  m.def("amx_supported", [] { return cpu::amx_supported(); },
        "Whether the CPU has AMX-BF16 and the OS granted the tile state (the GEMMs may use AMX).");
  m.def("set_gemm_rows_path", [](int mode) { return cpu::gemm_set_rows_path(mode); },
        "Force the rows path of linear / feed_forward forwards (C = A W^T from W's rows, W not "
        "packed: dot products, or float32 from 21 to 160 rows W's rows broadcast on the packed "
        "micro-kernel): 1 on, 0 off, -1 by the number of rows (AIAYN_GEMM_DOT); returns the previous setting.");
  m.def("cpu_isa_supported", [](const std::string& name) { return cpu::isa_supported(name.c_str()); });
  m.def("decoder_step",
        [](const at::Tensor& x, const std::vector<std::optional<at::Tensor>>& params,
           const std::vector<at::Tensor>& self_k, const std::vector<at::Tensor>& self_v, int64_t length,
           const std::vector<at::Tensor>& cross_k, const std::vector<at::Tensor>& cross_v,
           const std::optional<at::Tensor>& memory_padding, int64_t heads, double eps, bool norm_first,
           const at::Tensor& seed) {
          std::vector<at::Tensor> p;
          p.reserve(params.size());
          for (const auto& t : params) p.push_back(t.value_or(at::Tensor()));
          return cpu::decoder_step(x, p, self_k, self_v, length, cross_k, cross_v, memory_padding, heads, eps,
                                   norm_first, seed);
        },
        "One incremental decoding step through every decoder layer (inference; see "
        "csrc/cpu/decoder_step.h and aiayn/nn/transformer.py's Decoder).");
  m.def("philox4x32_10",
        [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
          const auto w = aiayn::philox4x32_10(aiayn::Philox4x32{{ctr[0], ctr[1], ctr[2], ctr[3]}}, key[0], key[1]);
          return std::array<uint32_t, 4>{w.v[0], w.v[1], w.v[2], w.v[3]};
        },
        "The raw Philox4x32-10 bijection of csrc/common/philox.h (for tests against Random123's answers).");
  m.def("peak_fp32_fma", [](int64_t iters) { return run_peak(cpu::kernels().peak_fp32_fma, iters); },
        "(seconds, flops) of an fp32 FMA loop on every thread, current ISA.");
#ifdef AIAYN_WITH_CUDA
  m.def("cuda_gemm_fallbacks", [] { return aiayn::cuda::gemm_fallback_count(); },
        "How many linear / feed_forward GEMMs on CUDA took torch's matmul instead of cuBLASLt (for tests).");
  m.def("cuda_set_relu_epilogues", [](bool enabled) { return aiayn::cuda::set_relu_epilogues(enabled); },
        "Let the ReLU epilogues of linear / feed_forward run on cuBLASLt (True, the default) or send those GEMMs "
        "to the fallback (False, for tests comparing the paths); returns the previous setting.");
#endif
  m.def("peak_bf16_dot", [](int64_t iters) { return run_peak(cpu::kernels().peak_bf16_dot, iters); },
        "(seconds, flops) of a bf16 dot-product loop on every thread (AVX-512 BF16 only).");
  m.def("peak_bf16_amx",
        [](int64_t iters) {
          TORCH_CHECK(cpu::amx_supported(), "no AMX-BF16 here (CPU lacks it, or the OS refused the tile state)");
          return run_peak(cpu::kernels().peak_bf16_amx, iters);
        },
        "(seconds, flops) of an AMX tdpbf16ps loop on every thread (AVX-512 kernels with AMX only).");
}
#endif  // AIAYN_WITH_PYTHON
