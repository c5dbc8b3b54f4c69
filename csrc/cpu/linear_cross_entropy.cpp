// CPU entry points of linear_cross_entropy: the pre-softmax projection (§3.4) fused with the
// label-smoothed cross-entropy (§5.4), chunked over tokens so that the tokens x vocabulary logits
// (606 MB in float32 for a 4096-token batch of the base model) never exist. Per chunk of rows:
// logits = x_c W^T on aiayn's GEMM into one reused (chunk x V) buffer, log-softmax in place, the
// per-row loss terms, and, when the caller will differentiate, the logits' gradient in the same
// buffer, consumed at once by dx_c = G W and dW += G^T x_c. The forward then
// hands autograd finished gradients (3 GEMMs of the logits' size in all, as unfused), and
// backward only scales them. linear_cross_entropy_bwd recomputes the chunks from the saved
// log-sum-exps for per-row output gradients (reduction "none", or a differentiated nll).
//
// The softmax, the losses and the logits' gradient run in the accumulation type (float32; float64
// for float64). bf16 x and weight stay bf16 in the three GEMMs (vdpbf16ps / AMX where the bf16
// GEMM uses them: twice the float32 FMA rate on a Zen 4) with float32 accumulation and float32
// results: the logits are never rounded to bf16 (torch's bf16 linear + cross_entropy rounds them).
// The logits' gradient is rounded to bf16 once, as the operand of dx = G W and dW = G^T x, where
// torch's unfused bf16 path has it in bf16 too. Widening x and W to float32 instead ran these GEMMs
// at the float32 rate: ~27% of a bf16 training step of the Multi30k model.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "../common/checks.h"
#include "../common/feed_forward_args.h"
#include "gemm/gemm.h"
#include "kernels.h"
#include "scratch.h"

namespace aiayn::cpu {
namespace {

constexpr const char* kOp = "linear_cross_entropy";

// Bytes of one chunk's logits. Cache-sized chunks (~8 MiB, 64 rows at V = 37000) lost on a 2-core
// Zen 4: each chunk streams all of packed W through the logits and dx GEMMs, runs them at few rows,
// and adds a whole dW partial, which cost more than the cache saved. fwd + bwd, medians: 1250 x
// 256 x 8000 took 630 ms in 262-row chunks, 520 in 512-row, 387 in one chunk (torch unfused: 592);
// 1024 x 512 x 37000: 3960 ms in 64-row chunks, 2970 in 226-row, 2780 in 512-row, 2760 in one
// (torch: 3030). So: ~64 MiB, at least 256 rows, at most 2048 (the Multi30k batch in one chunk, the
// base model's 4096 tokens in ~9 of 453 rows; torch holds 3 x 606 MB there).
constexpr int64_t kChunkBytes = int64_t{64} << 20;
constexpr int64_t kMinChunkRows = 256, kMaxChunkRows = 2048;

void check_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target, double label_smoothing,
                int64_t reduction) {
  check_input(kOp, x, {at::kFloat, at::kBFloat16, at::kDouble});
  check_weight(kOp, "weight", weight, x, -1, "vocab_size", x.size(-1), "d");
  TORCH_CHECK_VALUE(weight.size(0) >= 1, kOp, ": argument 'weight' must have at least one row (vocab_size >= 1)");
  check_defined(kOp, "target", target);
  check_same_device(kOp, "target", target, "x", x);
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, kOp, ": argument 'target' has dtype ", target.scalar_type(),
                   ", expected torch.int64");
  TORCH_CHECK_VALUE(target.sizes() == x.sizes().slice(0, x.dim() - 1), kOp, ": argument 'target' must have shape ",
                    x.sizes().slice(0, x.dim() - 1), " (x's shape without its last dim), got ", target.sizes());
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, kOp,
                    ": argument 'label_smoothing' must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, kOp,
                    ": argument 'reduction' must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// Every target is ignore_index or a class in [0, V): a wrong one would index past the logits.
void check_targets(const at::Tensor& t, int64_t ignore_index, int64_t V) {
  const int64_t* p = t.data_ptr<int64_t>();
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(p[i] == ignore_index || (p[i] >= 0 && p[i] < V), kOp, ": argument 'target' holds ", p[i],
                      " at flat position ", i, ", outside [0, vocab_size=", V, ") and not ignore_index=",
                      ignore_index);
}

// x and W in the accumulation type, W packed once for both of its GEMMs, reused by every chunk.
struct Problem {
  int64_t rows = 0, d = 0, V = 0;
  at::ScalarType acc;
  DType dt;
  bool lowp = false;  // bf16 operands, float32 results (c_f32)
  at::Tensor x;  // (rows, d), unit column stride
  at::Tensor xa;  // x in the accumulation type (x itself unless lowp), for the smoothing terms
  int64_t x_rs = 0;
  at::Tensor w;         // (V, d), unit column stride
  at::Tensor packed_wt; // B = W^T: logits = x W^T
  at::Tensor packed_w;  // B = W: dx = G W
  at::Tensor target;    // (rows,) int64, contiguous
  int64_t chunk = 0;    // rows per chunk

  Problem(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& t_in, bool need_w_packed) {
    d = x_in.size(-1);
    V = w_in.size(0);
    rows = leading_elements(x_in);
    acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    lowp = x_in.scalar_type() == at::kBFloat16;  // check_weight: weight has x's dtype
    x = gemm_rows(x_in, d);
    x_rs = gemm_row_stride(x);
    xa = lowp ? x.to(acc) : x;
    w = gemm_weight(w_in);
    dt = gemm_dtype(x);
    target = t_in.reshape({rows}).contiguous();
    const int64_t esize = static_cast<int64_t>(c10::elementSize(acc));
    chunk = std::clamp<int64_t>(kChunkBytes / (V * esize), kMinChunkRows, kMaxChunkRows);
    // AIAYN_LCE_CHUNK_ROWS: the tests force many small (or single) chunks with it.
    if (const char* e = std::getenv("AIAYN_LCE_CHUNK_ROWS"); e && std::atoll(e) > 0) chunk = std::atoll(e);
    chunk = std::max<int64_t>(1, std::min(chunk, rows));
    if (rows > 0 && d > 0) {
      packed_wt = gemm_pack_weight(w, /*transpose=*/true);
      if (need_w_packed) packed_w = gemm_pack_weight(w, /*transpose=*/false);
    }
  }

  const char* x_row(int64_t r) const {
    return static_cast<const char*>(x.data_ptr()) + r * x_rs * static_cast<int64_t>(x.element_size());
  }

  GemmArgs args(int64_t M, int64_t N, int64_t K) const {
    GemmArgs g{};
    g.dtype = dt;
    g.M = M;
    g.N = N;
    g.K = K;
    g.a_gate_scale = 1.0;
    g.c_gate_scale = 1.0;
    g.dropout_scale = 1.0;
    g.c_f32 = lowp;
    return g;
  }

  // logits (c x V, contiguous, acc type) of rows [r0, r0 + c).
  void logits(int64_t r0, int64_t c, at::Tensor& out) const {
    if (d == 0) {
      out.zero_();
      return;
    }
    GemmArgs g = args(c, V, d);
    g.a = x_row(r0);
    g.a_rs = x_rs;
    g.a_cs = 1;
    g.c = out.data_ptr();
    g.c_rs = V;
    gemm_run_all(g, packed_wt);
  }

  // dx[r0 : r0 + c] = G W and dW (+)= G^T x_c in one parallel region; G is c x V in the
  // accumulation type (rounded to bf16 first when lowp). The GEMM has no accumulating epilogue, so
  // every chunk but the first writes its dW into `dw_part` and adds.
  void grads(const at::Tensor& G_acc, int64_t r0, int64_t c, at::Tensor& dx, at::Tensor& dw, bool first,
             at::Tensor& dw_part) const {
    if (d == 0) return;
    at::Tensor G = G_acc;
    if (lowp) {
      G = scratch_tensor(G_acc.numel() * 2 + 64).view(at::kBFloat16).narrow(0, 0, G_acc.numel()).view(G_acc.sizes());
      G.copy_(G_acc);
    }
    GemmArgs gx = args(c, d, V);
    gx.a = G.data_ptr();
    gx.a_rs = V;
    gx.a_cs = 1;
    gx.c = static_cast<char*>(dx.data_ptr()) + r0 * d * static_cast<int64_t>(dx.element_size());
    gx.c_rs = d;
    GemmArgs gw = args(V, d, c);
    gw.a = G.data_ptr();
    gw.a_rs = 1;
    gw.a_cs = V;
    if (!first && !dw_part.defined()) dw_part = at::empty({V, d}, dw.options());
    gw.c = first ? dw.data_ptr() : dw_part.data_ptr();
    gw.c_rs = d;
    gemm_run_many({{gx, packed_w}, {gw, gemm_pack_b(dt, c, d, x_row(r0), x_rs, 1)}});
    if (!first) dw.add_(dw_part);
  }
};

// Rows whose target is ignore_index get an all-zero gradient, even where their logits are not
// finite (NaN * 0 would otherwise reach dx and dW).
void zero_ignored_rows(at::Tensor& G, const at::Tensor& valid) {
  const bool* v = valid.data_ptr<bool>();
  const int64_t bytes = G.size(1) * static_cast<int64_t>(G.element_size());
  for (int64_t i = 0; i < G.size(0); ++i)
    if (!v[i]) std::memset(static_cast<char*>(G.data_ptr()) + i * bytes, 0, bytes);
}

// Per-chunk state: the chunk's targets, which rows count, and a safe class index for gathers.
struct ChunkTargets {
  at::Tensor valid, safe;
  ChunkTargets(const at::Tensor& t, int64_t ignore_index) {
    valid = t.ne(ignore_index);
    safe = t.masked_fill(valid.logical_not(), 0).unsqueeze(1);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool compute_grad) {
  check_args(x, weight, target, label_smoothing, reduction);
  TORCH_CHECK_VALUE(!compute_grad || reduction != 0, kOp,
                    ": compute_grad needs a scalar reduction (1 mean, 2 sum); reduction 0 (none) uses "
                    "linear_cross_entropy_bwd");
  const Problem p(x, weight, target, compute_grad);
  check_targets(p.target, ignore_index, p.V);
  const auto opts = x.options().dtype(p.acc);
  const double eps = label_smoothing;
  const int64_t rows = p.rows, V = p.V;

  at::Tensor lse = at::empty({rows}, opts);
  at::Tensor loss_rows, nll_rows;
  if (reduction == 0) {
    loss_rows = at::empty({rows}, opts);
    nll_rows = at::empty({rows}, opts);
  }
  at::Tensor dx = compute_grad ? at::empty({rows, p.d}, opts) : at::empty({0}, opts);
  at::Tensor dw = compute_grad ? at::empty({V, p.d}, opts) : at::empty({0}, opts);
  at::Tensor dw_part;

  const at::Tensor valid_all = p.target.ne(ignore_index);
  const int64_t count = valid_all.sum().item<int64_t>();
  // mean: 0 / 0 = NaN with every row ignored, as torch's cross_entropy.
  const double scale = reduction == 1 ? 1.0 / static_cast<double>(count) : 1.0;
  double loss_sum = 0.0, nll_sum = 0.0;
  // The uniform part of the smoothed target needs each row's mean logit, and its gradient is the
  // constant -eps / V on every logit: both are rank-one through w_sum = sum_j W_j (mean z_i =
  // x_i . w_sum / V; dx_i -= eps / V w_sum, dW_j -= eps / V sum_i x_i), so no pass over the
  // logits does either (the gradient's part only in float32 / float64: see lowp below).
  const at::Tensor w_sum = eps > 0.0 ? p.w.sum(0, false, at::kDouble).to(p.acc) : at::Tensor();

  at::Tensor buf = scratch_tensor(p.chunk * V * static_cast<int64_t>(c10::elementSize(p.acc)) + 64).view(p.acc);
  for (int64_t r0 = 0; r0 < rows; r0 += p.chunk) {
    const int64_t c = std::min(p.chunk, rows - r0);
    at::Tensor L = buf.narrow(0, 0, c * V).view({c, V});
    p.logits(r0, c, L);
    const ChunkTargets ct(p.target.narrow(0, r0, c), ignore_index);
    at::Tensor z_t = L.gather(1, ct.safe);
    const at::Tensor m = L.amax(1, /*keepdim=*/true);
    // log p in place: torch's last-dim log_softmax reads a block of rows whole (max, sum) before
    // writing it, so the aliasing is safe (the tests compare with the reference). lse = m - log p
    // at the largest logit (the largest log p, in [-log V, 0]: nothing lost to cancellation).
    at::_log_softmax_out(L, L, 1, false);
    at::Tensor l = m - L.amax(1, /*keepdim=*/true);
    lse.narrow(0, r0, c).copy_(l.squeeze(1));
    at::Tensor nll = (l - z_t).squeeze(1).masked_fill_(ct.valid.logical_not(), 0);
    at::Tensor loss = nll;
    if (eps > 0.0) {
      const at::Tensor z_mean = at::mv(p.xa.narrow(0, r0, c), w_sum).div_(static_cast<double>(V));
      loss = (nll * (1.0 - eps) + (l.squeeze(1) - z_mean) * eps).masked_fill_(ct.valid.logical_not(), 0);
    }
    if (reduction == 0) {
      loss_rows.narrow(0, r0, c).copy_(loss);
      nll_rows.narrow(0, r0, c).copy_(nll);
    } else {
      loss_sum += loss.sum(at::kDouble).item<double>();
      nll_sum += nll.sum(at::kDouble).item<double>();
    }
    if (!compute_grad) continue;
    // dloss/dz = softmax - (1 - eps) onehot (- eps / V, added after the loop) on counted rows;
    // the reduction's scale is applied once to dx and dW at the end.
    L.exp_();
    L.scatter_add_(1, ct.safe, at::where(ct.valid, -(1.0 - eps), 0.0).to(p.acc).unsqueeze(1));
    // bf16 GEMM operands: the -eps / V goes into G before its rounding (a rank-one correction of
    // the rounded G would add the rounding of entries near eps / V back as error).
    if (p.lowp && eps > 0.0) L.sub_(eps / V);
    zero_ignored_rows(L, ct.valid);
    p.grads(L, r0, c, dx, dw, r0 == 0, dw_part);
  }
  if (compute_grad && rows > 0) {
    if (eps > 0.0 && !p.lowp) {
      const at::Tensor vf = valid_all.to(p.acc).unsqueeze(1);
      dx.sub_(vf * w_sum.unsqueeze(0), eps / V);
      const at::Tensor x_sum = at::mv(p.xa.t(), vf.squeeze(1));
      dw.sub_(x_sum.unsqueeze(0), eps / V);
    }
    if (scale != 1.0 && count > 0) {
      dx.mul_(scale);
      dw.mul_(scale);
    }
  }
  if (compute_grad && rows == 0) dw.zero_();
  at::Tensor loss_out, nll_out;
  if (reduction == 0) {
    loss_out = loss_rows.view(target.sizes());
    nll_out = nll_rows.view(target.sizes());
  } else {
    const double div = reduction == 1 ? static_cast<double>(count) : 1.0;
    loss_out = at::scalar_tensor(loss_sum / div, opts);
    nll_out = at::scalar_tensor(nll_sum / div, opts);
  }
  if (compute_grad) dx = dx.view(x.sizes());
  return {loss_out, nll_out, lse, dx, dw};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_bwd_cpu(const at::Tensor& grad_loss,
                                                                const std::optional<at::Tensor>& grad_nll,
                                                                const at::Tensor& x, const at::Tensor& weight,
                                                                const at::Tensor& target, const at::Tensor& lse,
                                                                double label_smoothing, int64_t ignore_index) {
  check_args(x, weight, target, label_smoothing, 0);
  const bool has_nll = grad_nll.has_value() && grad_nll->defined();
  auto check_grad = [&](const char* name, const at::Tensor& g) {
    check_defined(kOp, name, g);
    check_same_device(kOp, name, g, "x", x);
    TORCH_CHECK_VALUE(g.sizes() == target.sizes(), kOp, ": argument '", name, "' must have target's shape ",
                      target.sizes(), ", got ", g.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(g.scalar_type()), kOp, ": argument '", name, "' has dtype ",
                     g.scalar_type(), ", expected a floating dtype");
  };
  check_grad("grad_loss", grad_loss);
  if (has_nll) check_grad("grad_nll", *grad_nll);
  const Problem p(x, weight, target, true);
  check_targets(p.target, ignore_index, p.V);
  const int64_t rows = p.rows, V = p.V;
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == rows && lse.scalar_type() == p.acc, kOp,
                    ": argument 'lse' must be the forward's (", rows, ",) ", p.acc, " tensor, got ", lse.scalar_type(),
                    " ", lse.sizes());
  check_same_device(kOp, "lse", lse, "x", x);
  const auto opts = x.options().dtype(p.acc);
  const double eps = label_smoothing;
  const at::Tensor a = grad_loss.reshape({rows}).to(p.acc).contiguous();
  const at::Tensor b = has_nll ? grad_nll->reshape({rows}).to(p.acc).contiguous() : at::Tensor();
  at::Tensor dx = at::empty({rows, p.d}, opts);
  at::Tensor dw = at::empty({V, p.d}, opts);
  at::Tensor dw_part;
  at::Tensor buf = scratch_tensor(p.chunk * V * static_cast<int64_t>(c10::elementSize(p.acc)) + 64).view(p.acc);
  for (int64_t r0 = 0; r0 < rows; r0 += p.chunk) {
    const int64_t c = std::min(p.chunk, rows - r0);
    at::Tensor L = buf.narrow(0, 0, c * V).view({c, V});
    p.logits(r0, c, L);
    const ChunkTargets ct(p.target.narrow(0, r0, c), ignore_index);
    const at::Tensor zero = at::scalar_tensor(0.0, opts);
    at::Tensor ac = at::where(ct.valid, a.narrow(0, r0, c), zero);
    at::Tensor bc = has_nll ? at::where(ct.valid, b.narrow(0, r0, c), zero) : at::Tensor();
    // d/dz = (a + b) softmax - (a (1 - eps) + b) onehot - a eps / V.
    L.sub_(lse.narrow(0, r0, c).unsqueeze(1)).exp_();
    L.mul_((has_nll ? ac + bc : ac).unsqueeze(1));
    at::Tensor hot = ac * -(1.0 - eps);
    if (has_nll) hot.sub_(bc);
    L.scatter_add_(1, ct.safe, hot.unsqueeze(1));
    if (eps > 0.0) L.sub_((ac * (eps / V)).unsqueeze(1));
    zero_ignored_rows(L, ct.valid);
    p.grads(L, r0, c, dx, dw, r0 == 0, dw_part);
  }
  if (rows == 0) dw.zero_();
  return {dx.view(x.sizes()).to(x.scalar_type()), dw.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(aiayn, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cpu);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cpu);
}

}  // namespace aiayn::cpu
