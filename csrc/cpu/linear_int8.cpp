// CPU entry points of the int8 linear (inference only): linear_int8_pack packs an int8 weight once
// into the layout of kernels.h (LinearInt8Args; the same for every ISA, so a packed weight stays
// valid when the ISA is switched), linear_int8 quantizes x's rows and runs int8_kernel.h.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/checks.h"
#include "../common/feed_forward_args.h"
#include "gemm/gemm.h"
#include "kernels.h"
#include "scratch.h"

namespace aiayn::cpu {

namespace {

constexpr const char* kOp = "linear_int8";
// |sum| <= K * 127 * 128 (x in [-127, 127], W in [-128, 127]) must fit int32.
constexpr int64_t kMaxK = 131072;

int64_t padded_k(int64_t K) { return (K + 3) / 4 * 4; }
int64_t panels(int64_t N) { return (N + kInt8Panel - 1) / kInt8Panel; }
int64_t packed_bytes(int64_t N, int64_t K) {
  return panels(N) * kInt8Panel * (padded_k(K) + static_cast<int64_t>(sizeof(int32_t)));
}

void check_weight_int8(const char* op, const at::Tensor& w) {
  check_defined(op, "w", w);
  TORCH_CHECK_TYPE(w.scalar_type() == at::kChar, op, ": argument 'w' has dtype ", w.scalar_type(),
                   ", expected torch.int8 (quantize it with aiayn.functional.quantize_weight_int8)");
  TORCH_CHECK_VALUE(w.dim() == 2, op, ": argument 'w' must have shape (out_features, in_features), got ",
                    w.sizes());
  TORCH_CHECK(w.device().is_cpu(), op, ": argument 'w' is on ", w.device(), "; int8 inference runs on the CPU only");
  TORCH_CHECK_VALUE(w.size(1) <= kMaxK, op, ": argument 'w' has in_features=", w.size(1), ", more than ", kMaxK,
                    " (the int32 sums could overflow)");
}

}  // namespace

at::Tensor linear_int8_pack_cpu(const at::Tensor& w_in) {
  check_weight_int8("linear_int8_pack", w_in);
  const at::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), Kp = padded_k(K), np = panels(N);
  at::Tensor packed = at::empty({packed_bytes(N, K)}, w.options().dtype(at::kByte));
  int8_t* dst = reinterpret_cast<int8_t*>(packed.data_ptr<uint8_t>());
  int32_t* comp = reinterpret_cast<int32_t*>(dst + np * kInt8Panel * Kp);
  const int8_t* src = w.data_ptr<int8_t>();
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int8_t* panel = dst + p * kInt8Panel * Kp;
      for (int64_t c = 0; c < kInt8Panel; ++c) {
        const int64_t n = p * kInt8Panel + c;
        int32_t sum = 0;
        for (int64_t k = 0; k < Kp; ++k) {
          const int8_t v = n < N && k < K ? src[n * K + k] : 0;
          panel[(k / 4) * kInt8Panel * 4 + c * 4 + k % 4] = v;
          sum += v;
        }
        comp[n] = 128 * sum;
      }
    }
  });
  return packed;
}

at::Tensor linear_int8_cpu(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& b, bool relu, const std::optional<at::Tensor>& w_packed) {
  check_input(kOp, x_in, {at::kFloat, at::kBFloat16});
  TORCH_CHECK(x_in.device().is_cpu(), kOp, ": argument 'x' is on ", x_in.device(),
              "; int8 inference runs on the CPU only");
  check_weight_int8(kOp, w);
  const int64_t K = x_in.size(-1), N = w.size(0);
  TORCH_CHECK_VALUE(w.size(1) == K, kOp, ": argument 'w' must have shape (out_features, in_features=", K,
                    ") to match x's last dim, got ", w.sizes());
  check_defined(kOp, "w_scale", w_scale);
  TORCH_CHECK_TYPE(w_scale.scalar_type() == at::kFloat, kOp, ": argument 'w_scale' has dtype ",
                   w_scale.scalar_type(), ", expected torch.float32");
  TORCH_CHECK_VALUE(w_scale.dim() == 1 && w_scale.size(0) == N, kOp,
                    ": argument 'w_scale' must have shape (out_features=", N, ",), got ", w_scale.sizes());
  check_same_device(kOp, "w_scale", w_scale, "w", w);
  at::Tensor bias;
  if (b.has_value() && b->defined()) {
    TORCH_CHECK_TYPE(b->scalar_type() == at::kFloat, kOp, ": argument 'b' has dtype ", b->scalar_type(),
                     ", expected torch.float32");
    TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == N, kOp, ": argument 'b' must have shape (out_features=", N,
                      ",), got ", b->sizes());
    check_same_device(kOp, "b", *b, "w", w);
    bias = b->contiguous();
  }
  at::Tensor packed;
  if (w_packed.has_value() && w_packed->defined()) {
    packed = *w_packed;
    TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, kOp, ": argument 'w_packed' has dtype ",
                     packed.scalar_type(), ", expected torch.uint8 (from linear_int8_pack(w))");
    TORCH_CHECK_VALUE(packed.dim() == 1 && packed.size(0) == packed_bytes(N, K) && packed.is_contiguous(), kOp,
                      ": argument 'w_packed' must be linear_int8_pack(w) of this w: ", packed_bytes(N, K),
                      " contiguous bytes for w of shape ", w.sizes(), ", got shape ", packed.sizes());
    check_same_device(kOp, "w_packed", packed, "w", w);
  } else {
    packed = linear_int8_pack_cpu(w);
  }
  check_result_addressable(kOp, "'x' and 'w'", x_in, N, "out_features");

  at::Tensor out = at::empty(with_last(x_in, N), x_in.options().dtype(at::kFloat));
  const int64_t M = leading_elements(x_in);
  if (M == 0 || N == 0) return out;
  const at::Tensor x = gemm_rows(x_in.scalar_type() == at::kFloat ? x_in : x_in.to(at::kFloat), K);
  const at::Tensor ws = w_scale.contiguous();

  LinearInt8Args a{};
  a.M = M;
  a.N = N;
  a.K = K;
  a.Kp = padded_k(K);
  a.x = x.data_ptr<float>();
  a.x_rs = gemm_row_stride(x);
  a.xq_rs = std::max<int64_t>((2 * a.Kp + 63) / 64 * 64, 64);  // room for every ISA's layout
  at::Tensor xq = scratch_tensor(M * a.xq_rs + M * static_cast<int64_t>(sizeof(float)));
  a.xq = xq.data_ptr();
  a.x_scale = reinterpret_cast<float*>(static_cast<char*>(a.xq) + M * a.xq_rs);
  a.w_packed = reinterpret_cast<const int8_t*>(packed.data_ptr<uint8_t>());
  a.w_comp = reinterpret_cast<const int32_t*>(a.w_packed + panels(N) * kInt8Panel * a.Kp);
  a.w_scale = ws.data_ptr<float>();
  a.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  a.relu = relu;
  a.out = out.data_ptr<float>();
  a.out_rs = N;

  const KernelTable& kt = kernels();
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)),
                   [&](int64_t r0, int64_t r1) { kt.linear_int8_quantize(a, r0, r1); });
  // Tasks: blocks of rows x groups of 4 panels (64 columns). Row blocks of 256 keep a task's
  // quantized rows (256 x Kp bytes) in L2 next to its W group; decoding steps (few rows) split
  // over the columns only.
  constexpr int64_t kRowBlock = 256, kPanelGroup = 4;
  const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock;
  const int64_t groups = (panels(N) + kPanelGroup - 1) / kPanelGroup;
  at::parallel_for(0, row_blocks * groups, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rb = t % row_blocks, g = t / row_blocks;
      kt.linear_int8_run(a, rb * kRowBlock, std::min(M, (rb + 1) * kRowBlock), g * kPanelGroup,
                         std::min(panels(N), (g + 1) * kPanelGroup));
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(aiayn, CPU, m) {
  m.impl("linear_int8", &linear_int8_cpu);
  m.impl("linear_int8_pack", &linear_int8_pack_cpu);
}

}  // namespace aiayn::cpu
