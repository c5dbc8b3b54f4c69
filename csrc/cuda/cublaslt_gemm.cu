// cuBLASLt GEMMs with fused epilogues for linear and feed_forward (paper §3.3), and their fallback.
//
// Row-major C = A B is column-major C^T = B^T A^T: cuBLAS's "A" is our B, its "B" our A, and a
// row-major (rows, cols) buffer with row stride ld is a column-major (cols, rows) matrix with the
// same ld. So m = N, n = M, k = K; the BIAS epilogue's vector runs along cuBLAS's rows (our N) and
// BGRADB reduces cuBLAS's B (our A) over k into a vector along cuBLAS's columns (our M).
// DRELU_BGRAD's bias gradient runs along D's rows too (our N: summed over our M), and the ReLU
// bit-mask is a column-major bit matrix like D (common/relu_mask.h has the layout).
//
// The handle is torch's (one per device and thread), the workspace comes from torch's caching
// allocator on the current stream, and every status is checked: a call that cuBLASLt turns down
// (no algorithm from the heuristic, or NOT_SUPPORTED / INVALID_VALUE) goes to the fallback before
// anything was written, so a result is never wrong, only slower.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "../common/relu_mask.h"
#include "../common/tensor_layout.h"
#include "cublaslt_gemm.h"
#include "relu_dropout.h"

namespace aiayn::cuda {
namespace {

std::atomic<int64_t> g_fallbacks{0};
std::atomic<bool> g_relu_epilogues{true};

bool is_relu_epilogue(GemmEpilogue e) {
  return e == GemmEpilogue::kRelu || e == GemmEpilogue::kReluAux || e == GemmEpilogue::kDReluBiasGrad;
}

// Hopper's recommended cuBLAS workspace; a cached block after the first call.
constexpr int64_t kWorkspaceBytes = int64_t{32} << 20;

// AIAYN_CUBLASLT=0 sends every GEMM to the fallback (tests, and a way out should a cuBLASLt
// version misbehave). Read per call so that tests can switch it.
bool cublaslt_enabled() {
  const char* v = std::getenv("AIAYN_CUBLASLT");
  return v == nullptr || !(std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0 || std::strcmp(v, "false") == 0);
}

// A 2-d tensor cuBLASLt (and mm) can read as row-major rows: unit last stride, rows not
// overlapping. Anything else (stride-0 expansions, a strided last dim) is copied.
at::Tensor as_matrix(const at::Tensor& t) {
  const bool unit = t.size(1) <= 1 || t.stride(1) == 1;
  const bool apart = t.size(0) <= 1 || t.stride(0) >= t.size(1);
  return unit && apart ? t : t.contiguous();
}

int64_t ld_of(const at::Tensor& t) { return std::max<int64_t>(row_stride(t), 1); }

// The alignment (a power of two, at most 256 bytes, cuBLASLt's default requirement) of every row
// start: base pointer and row pitch. The heuristic only offers algorithms that work with it.
uint32_t row_alignment(const at::Tensor& t) {
  const uintptr_t v = reinterpret_cast<uintptr_t>(t.data_ptr()) |
                      static_cast<uintptr_t>(ld_of(t) * static_cast<int64_t>(t.element_size()));
  uint32_t a = 1;
  while (a < 256 && v % (2 * a) == 0) a *= 2;
  return a;
}

bool lt_dtype(at::ScalarType s, cudaDataType_t* t) {
  switch (s) {
    case at::kFloat: *t = CUDA_R_32F; return true;
    case at::kHalf: *t = CUDA_R_16F; return true;
    case at::kBFloat16: *t = CUDA_R_16BF; return true;
    default: return false;  // float64: the fallback (torch's cuBLAS path, full precision)
  }
}

struct MatmulDesc {
  cublasLtMatmulDesc_t d = nullptr;
  ~MatmulDesc() {
    if (d) cublasLtMatmulDescDestroy(d);
  }
};
struct Layout {
  cublasLtMatrixLayout_t d = nullptr;
  ~Layout() {
    if (d) cublasLtMatrixLayoutDestroy(d);
  }
};
struct Preference {
  cublasLtMatmulPreference_t d = nullptr;
  ~Preference() {
    if (d) cublasLtMatmulPreferenceDestroy(d);
  }
};

#define AIAYN_LT_TRY(expr)                                   \
  do {                                                       \
    if ((expr) != CUBLAS_STATUS_SUCCESS) return false;       \
  } while (0)

template <typename V>
cublasStatus_t set_attr(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const V& v) {
  return cublasLtMatmulDescSetAttribute(d, attr, &v, sizeof(v));
}
template <typename V>
cublasStatus_t set_pref(cublasLtMatmulPreference_t d, cublasLtMatmulPreferenceAttributes_t attr, const V& v) {
  return cublasLtMatmulPreferenceSetAttribute(d, attr, &v, sizeof(v));
}

// Runs g on cuBLASLt; false (nothing written) when cuBLASLt does not take it.
bool run_cublaslt(const GemmCall& g, const at::Tensor& a, const at::Tensor& b, int64_t M, int64_t N,
                  int64_t K) {
  cudaDataType_t type;
  if (!lt_dtype(g.c.scalar_type(), &type)) return false;
  const bool adds_bias =
      g.epilogue == GemmEpilogue::kBias || g.epilogue == GemmEpilogue::kRelu || g.epilogue == GemmEpilogue::kReluAux;
  if (adds_bias && g.alpha != 1.0) return false;  // BIAS adds after alpha: keep it simple

  const bool fp32 = g.c.scalar_type() == at::kFloat;
  // TF32 only where torch.backends.cuda.matmul.allow_tf32 (float32_matmul_precision) allows it.
  const cublasComputeType_t compute =
      fp32 && at::globalContext().allowTF32CuBLAS() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  MatmulDesc desc;
  AIAYN_LT_TRY(cublasLtMatmulDescCreate(&desc.d, compute, CUDA_R_32F));
  // Our B is cuBLAS's A: stored (K, N) row-major = (N, K) column-major, used as is; stored (N, K)
  // when b_trans = (K, N) column-major, transposed.
  const int32_t op_a = g.b_trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int32_t op_b = g.a_trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  AIAYN_LT_TRY(set_attr(desc.d, CUBLASLT_MATMUL_DESC_TRANSA, op_a));
  AIAYN_LT_TRY(set_attr(desc.d, CUBLASLT_MATMUL_DESC_TRANSB, op_b));
  // The bias (gradient) vector is in C's type: CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE's default. The
  // heuristic reads the pointer's value for its alignment.
  uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const bool has_bias = g.bias.defined();
  switch (g.epilogue) {
    case GemmEpilogue::kNone: break;
    case GemmEpilogue::kBias: epilogue = CUBLASLT_EPILOGUE_BIAS; break;
    case GemmEpilogue::kBiasGradA: epilogue = CUBLASLT_EPILOGUE_BGRADB; break;  // our A is cuBLAS's B
    case GemmEpilogue::kRelu: epilogue = has_bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU; break;
    case GemmEpilogue::kReluAux:
      epilogue = has_bias ? CUBLASLT_EPILOGUE_RELU_AUX_BIAS : CUBLASLT_EPILOGUE_RELU_AUX;
      break;
    case GemmEpilogue::kDReluBiasGrad: epilogue = CUBLASLT_EPILOGUE_DRELU_BGRAD; break;
  }
  if (adds_bias && has_bias) {
    const void* p = g.bias.data_ptr();
    AIAYN_LT_TRY(set_attr(desc.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, p));
  } else if (g.epilogue == GemmEpilogue::kBiasGradA || g.epilogue == GemmEpilogue::kDReluBiasGrad) {
    void* p = g.bias_grad.data_ptr();
    AIAYN_LT_TRY(set_attr(desc.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, p));
  }
  if (g.epilogue == GemmEpilogue::kReluAux || g.epilogue == GemmEpilogue::kDReluBiasGrad) {
    // The bit-mask: ld in bits, a multiple of 128 (relu_mask_ld_bits); the heuristic reads the
    // pointer's value for its alignment (a fresh allocation: 256 bytes).
    void* p = g.relu_mask.data_ptr();
    const int64_t ld = relu_mask_ld_bits(N);
    AIAYN_LT_TRY(set_attr(desc.d, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, p));
    AIAYN_LT_TRY(set_attr(desc.d, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, ld));
  }
  AIAYN_LT_TRY(set_attr(desc.d, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue));

  Layout la, lb, lc;
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  if (g.b_trans) {
    AIAYN_LT_TRY(cublasLtMatrixLayoutCreate(&la.d, type, u(K), u(N), ld_of(b)));
  } else {
    AIAYN_LT_TRY(cublasLtMatrixLayoutCreate(&la.d, type, u(N), u(K), ld_of(b)));
  }
  if (g.a_trans) {
    AIAYN_LT_TRY(cublasLtMatrixLayoutCreate(&lb.d, type, u(M), u(K), ld_of(a)));
  } else {
    AIAYN_LT_TRY(cublasLtMatrixLayoutCreate(&lb.d, type, u(K), u(M), ld_of(a)));
  }
  AIAYN_LT_TRY(cublasLtMatrixLayoutCreate(&lc.d, type, u(N), u(M), ld_of(g.c)));

  Preference pref;
  AIAYN_LT_TRY(cublasLtMatmulPreferenceCreate(&pref.d));
  const uint64_t ws_bytes = static_cast<uint64_t>(kWorkspaceBytes);
  AIAYN_LT_TRY(set_pref(pref.d, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ws_bytes));
  AIAYN_LT_TRY(set_pref(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, row_alignment(b)));
  AIAYN_LT_TRY(set_pref(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, row_alignment(a)));
  const uint32_t c_alignment = row_alignment(g.c);
  AIAYN_LT_TRY(set_pref(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c_alignment));
  AIAYN_LT_TRY(set_pref(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, c_alignment));
  if (!fp32) {
    // Split-k partial sums in float32 (or none), never in the 16-bit output type.
    const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    AIAYN_LT_TRY(set_pref(pref.d, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, schemes));
  }

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t result;
  std::memset(&result, 0, sizeof(result));
  int found = 0;
  AIAYN_LT_TRY(cublasLtMatmulAlgoGetHeuristic(handle, desc.d, la.d, lb.d, lc.d, lc.d, pref.d, 1, &result, &found));
  if (found == 0 || result.state != CUBLAS_STATUS_SUCCESS) return false;

  const at::Tensor workspace = at::empty({kWorkspaceBytes}, g.c.options().dtype(at::kByte));
  const float alpha = static_cast<float>(g.alpha), beta = 0.0f;
  const cublasStatus_t s = cublasLtMatmul(handle, desc.d, &alpha, b.data_ptr(), la.d, a.data_ptr(), lb.d, &beta,
                                          g.c.data_ptr(), lc.d, g.c.data_ptr(), lc.d, &result.algo,
                                          workspace.data_ptr(), static_cast<size_t>(kWorkspaceBytes),
                                          c10::cuda::getCurrentCUDAStream());
  if (s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_INVALID_VALUE) return false;
  TORCH_CHECK(s == CUBLAS_STATUS_SUCCESS, "aiayn: cublasLtMatmul failed: ", cublasLtGetStatusString(s),
              " (M=", M, ", N=", N, ", K=", K, ", dtype ", g.c.scalar_type(), ")");
  return true;
}

#undef AIAYN_LT_TRY

// The same GEMM through torch's matmul (cuBLAS), plus separate passes for what the epilogue does:
// bias-gradient sums, and our ReLU / bit-mask kernels (cuda/relu_dropout.h).
void run_fallback(const GemmCall& g, const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor am = g.a_trans ? a.t() : a;  // (M, K)
  const at::Tensor bm = g.b_trans ? b.t() : b;  // (K, N)
  at::Tensor c = g.c;
  if (g.bias.defined()) {
    at::addmm_out(c, g.bias, am, bm, /*beta=*/1, /*alpha=*/g.alpha);
  } else {
    at::mm_out(c, am, bm);
    if (g.alpha != 1.0) c.mul_(g.alpha);
  }
  const auto sum_dim = [](const at::Tensor& t, int64_t dim) {
    return at::sum(t, at::IntArrayRef(&dim, 1), /*keepdim=*/false, acc_type(t));
  };
  switch (g.epilogue) {
    case GemmEpilogue::kNone:
    case GemmEpilogue::kBias: break;
    case GemmEpilogue::kBiasGradA: g.bias_grad.copy_(sum_dim(am, 1)); break;
    case GemmEpilogue::kRelu: relu_dropout_(c, /*relu=*/true, DropoutParams{}); break;
    case GemmEpilogue::kReluAux: relu_mask_dropout_(c, g.relu_mask, /*from_aux=*/false, DropoutParams{}); break;
    case GemmEpilogue::kDReluBiasGrad:
      relu_mask_gate_(c, g.relu_mask);
      g.bias_grad.copy_(sum_dim(c, 0));
      break;
  }
}

// cuBLASLt documents the ReLU bit-mask only as a matrix of bits with a leading dimension in bits;
// the bit order within a byte (common/relu_mask.h assumes least significant first) matters where
// our code reads or edits the mask (the dropout fold of feed_forward). Once per device, a small
// RELU_AUX GEMM checks that bit (r, c) is set exactly where cuBLASLt's own output is positive. If
// it is not, the mask-carrying epilogues stay on the fallback on that device, which writes and
// reads the mask in our layout, so a wrong guess costs speed, never a wrong gradient.
constexpr int kMaxDevices = 64;
std::atomic<int8_t> g_mask_layout[kMaxDevices];  // 0: not checked yet, 1: as assumed, -1: not
std::mutex g_mask_probe_mutex;

bool relu_mask_layout_ok(const at::Tensor& like) {
  const int dev = like.get_device();
  if (dev < 0 || dev >= kMaxDevices) return false;
  if (const int8_t known = g_mask_layout[dev].load()) return known > 0;
  // The probe synchronises (it reads the result back): not inside a CUDA graph capture, where this
  // call takes the fallback and the probe waits for a later call.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(dev).stream(), &capture));
  if (capture != cudaStreamCaptureStatusNone) return false;
  std::lock_guard<std::mutex> lock(g_mask_probe_mutex);
  if (const int8_t known = g_mask_layout[dev].load()) return known > 0;
  constexpr int64_t M = 8, N = 256, K = 16;
  // Deterministic inputs of both signs (no draw from torch's generators).
  at::Tensor a_host = at::empty({M, K}, at::kFloat), b_host = at::empty({N, K}, at::kFloat);
  float* ap = a_host.data_ptr<float>();
  float* bp = b_host.data_ptr<float>();
  for (int64_t i = 0; i < M * K; ++i) ap[i] = std::sin(0.7f * static_cast<float>(i) + 0.3f);
  for (int64_t i = 0; i < N * K; ++i) bp[i] = std::cos(1.3f * static_cast<float>(i));
  GemmCall probe;
  probe.a = a_host.to(like.options());
  probe.b = b_host.to(like.options());
  probe.b_trans = true;
  probe.c = at::empty({M, N}, like.options());
  probe.epilogue = GemmEpilogue::kReluAux;
  probe.relu_mask = at::zeros({M, relu_mask_row_bytes(N)}, like.options().dtype(at::kByte));
  if (!run_cublaslt(probe, probe.a, probe.b, M, N, K)) return false;  // turned down: decided by a later call
  const at::Tensor c = probe.c.to(at::kCPU).to(at::kFloat), mask = probe.relu_mask.cpu();
  const float* cp = c.data_ptr<float>();
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  bool ok = true;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t col = 0; col < N; ++col) {
      const bool bit = (mp[relu_mask_byte(r, col, N)] >> relu_mask_bit(col)) & 1u;
      ok = ok && bit == (cp[r * N + col] > 0.f);
    }
  g_mask_layout[dev].store(ok ? 1 : -1);
  if (!ok)
    TORCH_WARN("aiayn: cuBLASLt's ReLU bit-mask on device ", dev, " is not laid out as common/relu_mask.h ",
               "assumes; feed_forward's ReLU mask stays on the fallback path there (slower, same results)");
  return ok;
}

}  // namespace

bool gemm(const GemmCall& g) {
  const at::Tensor a = as_matrix(g.a), b = as_matrix(g.b);
  const int64_t M = g.c.size(0), N = g.c.size(1), K = g.a_trans ? a.size(0) : a.size(1);
  TORCH_INTERNAL_ASSERT(g.c.is_contiguous() && a.scalar_type() == g.c.scalar_type() &&
                        b.scalar_type() == g.c.scalar_type());
  TORCH_INTERNAL_ASSERT((g.a_trans ? a.size(1) : a.size(0)) == M && (g.b_trans ? b.size(0) : b.size(1)) == N &&
                        (g.b_trans ? b.size(1) : b.size(0)) == K);
  TORCH_INTERNAL_ASSERT(!(g.epilogue == GemmEpilogue::kReluAux || g.epilogue == GemmEpilogue::kDReluBiasGrad) ||
                        (g.relu_mask.scalar_type() == at::kByte && g.relu_mask.is_contiguous() &&
                         g.relu_mask.numel() == M * relu_mask_row_bytes(N)));
  const bool empty = M == 0 || N == 0 || K == 0;  // torch's mm and sum get these right
  bool allowed = !empty && cublaslt_enabled() && (!is_relu_epilogue(g.epilogue) || g_relu_epilogues.load());
  if (allowed && (g.epilogue == GemmEpilogue::kReluAux || g.epilogue == GemmEpilogue::kDReluBiasGrad))
    allowed = relu_mask_layout_ok(g.c);
  if (allowed && run_cublaslt(g, a, b, M, N, K)) return true;
  if (!empty) g_fallbacks.fetch_add(1, std::memory_order_relaxed);
  run_fallback(g, a, b);
  return false;
}

int64_t gemm_fallback_count() { return g_fallbacks.load(std::memory_order_relaxed); }

bool set_relu_epilogues(bool enabled) { return g_relu_epilogues.exchange(enabled); }

}  // namespace aiayn::cuda
