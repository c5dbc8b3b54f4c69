// The seam between the torch-facing CPU code and the per-ISA kernels.
//
// Every hot kernel is written once over a SIMD wrapper (simd/) and compiled three times, in
// isa/avx512.cpp, isa/avx2.cpp and isa/generic.cpp, each under its own `#pragma GCC target`.
// Those translation units see no torch header (an inline torch function compiled for AVX-512 could
// otherwise be picked by the linker for every caller, and crash a CPU without AVX-512), so the
// kernels take plain pointers and sizes, declared here, and the torch-facing files
// (add_dropout_layer_norm.cpp, ...) parallelise over rows with at::parallel_for and call the
// kernel of the ISA that cpu_features chose.
#pragma once
#include <cstddef>
#include <cstdint>

#include "../common/dropout.h"

namespace aiayn::cpu {

enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2 };
const char* isa_name(Isa isa);

// Per-thread cache of the kernels' large scratch buffers (simd/buffer.h; scratch.cpp): acquire
// returns a 64-byte-aligned block of at least `bytes` and its capacity, release gives it back to
// the calling thread's cache (a few blocks kept, so a block is not page-faulted in on every call).
void* kernel_scratch_acquire(size_t bytes, size_t* capacity);
void kernel_scratch_release(void* p, size_t capacity);

// Storage types the kernels read and write. bf16 is stored as its 16 raw bits.
enum class DType : int { f32 = 0, bf16 = 1, f64 = 2 };

// out = LayerNorm(residual + dropout(x)) * weight + bias over the last dimension, for rows
// [row_begin, row_end). The dropout element number of (row, col) is row * cols + col.
struct AddDropoutLayerNormFwd {
  DType dtype;
  int64_t rows, cols;
  const void* x;         // row stride x_stride (elements)
  const void* residual;  // row stride residual_stride
  int64_t x_stride, residual_stride;
  const void* weight;  // cols values in acc type (f32, or f64 when dtype == f64)
  const void* bias;    // idem
  void* out;           // contiguous rows x cols, dtype
  void* mean;          // rows values in acc type
  void* rstd;          // rows values in acc type
  double eps;
  DropoutParams dropout;
};

// Gradients of the above. grad_weight / grad_bias are per-chunk partial sums: the caller gives each
// chunk of rows its own `cols`-long accumulators (zeroed by the kernel) and adds them up after.
struct AddDropoutLayerNormBwd {
  DType dtype;
  int64_t rows, cols;
  const void* grad_out;
  const void* x;
  const void* residual;
  int64_t grad_out_stride, x_stride, residual_stride;
  const void* weight;  // acc type
  const void* mean;    // acc type
  const void* rstd;    // acc type
  void* grad_x;         // contiguous, dtype
  void* grad_residual;  // contiguous, dtype
  DropoutParams dropout;
};

// --- GEMM (gemm/gemm_kernel.h): C = epilogue(A * B), the kernel of linear and feed_forward ---
//
// A is M x K, B is K x N, any element strides; C is M x N with row stride c_rs. A, B and C share
// `dtype` (storage), the accumulation is in float32 (float64 for f64). B is packed once per call
// (or once per weight version, see gemm/gemm.h) into panels of `nr` columns; each task packs its
// own rows of A (the full K) and runs the register-blocked micro-kernel over them, the whole
// K-reduction staying in registers, then applies the epilogue to the tile before storing it.

// How bf16 products run (AVX-512 only; elsewhere always widened): widened to float32 for the FMA
// kernel, vdpbf16ps on pairs of k, or Intel AMX tiles (tdpbf16ps, where the CPU and the OS allow).
enum class Bf16Gemm : int { widened = 0, dot = 1, amx = 2 };

// Whether this compiler builds the AMX kernel into the AVX-512 unit (GCC >= 11, Clang >= 12 know
// the amx-tile / amx-bf16 targets).
#if defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define AIAYN_AMX_COMPILED 1
#endif

// The packed layout of one ISA and dtype: B panels of nr columns, A micro-panels of mr rows, K
// padded to a multiple of kp (2 for the bf16 pairs of vdpbf16ps, 32 for AMX tiles), elements of
// elem_bytes.
struct GemmInfo {
  int mr, nr, kp, elem_bytes;
  int dot_nr;  // columns per task unit of the dot-product path (GemmArgs::b_rows)
};

struct GemmPackB {
  DType dtype;
  Bf16Gemm bf16;  // how bf16 runs (ignored for other dtypes)
  int64_t K, N;
  const void* b;  // B(k, n) = b[k * b_rs + n * b_cs]
  int64_t b_rs, b_cs;
};

struct GemmArgs {
  DType dtype;
  Bf16Gemm bf16;  // as GemmPackB::bf16; must match the packing of packed_b
  int64_t M, N, K;
  const void* a;  // A(m, k) = a[m * a_rs + k * a_cs]
  int64_t a_rs, a_cs;
  // Optional gate applied while packing A: A(m, k) := gate(m, k) > 0 ? A(m, k) * a_gate_scale : 0,
  // gate laid out like A (same strides), dtype `dtype` (the ReLU mask of linear's backward).
  const void* a_gate;
  double a_gate_scale;
  // Optional: sum over k of the (gated) A(m, k) for the task's rows, in the accumulation type
  // (a bias gradient fused into the packing of the weight-gradient GEMM). Written by the task that
  // owns panel 0.
  void* a_row_sums;
  const void* packed_b;  // gemm_pack_b of B
  // Optional (float32 only): all of A already packed by gemm_pack_a (micro-panel q holds rows
  // q * mr ..); tasks then do not pack their rows.
  const void* packed_a;
  int64_t b_panel_stride;  // elements from one packed panel to the next; 0: round_up(K, kp) * nr
  int64_t b_first_panel;   // the panel that packed_b starts with (a chunk of B packed by one task)
  // The dot-product path (few rows of A, gemm_kernel.h): when set, B = W^T is read straight from
  // the rows of W, B(k, n) = b_rows[n * b_rows_rs + k], and packed_b is unused; "panels" are then
  // groups of GemmInfo::dot_nr columns. Needs a_cs == 1, no a_gate, no a_row_sums.
  const void* b_rows;
  int64_t b_rows_rs;
  // With b_rows (float32 only): W's rows are the broadcast operand of the packed micro-kernel
  // (gemm_wrows_run) instead of dot products; "panels" are then groups of GemmInfo::mr columns.
  bool b_rows_bcast;
  // Epilogue, in this order on the float32 tile: + bias[n] (acc type, N values, may be null);
  // ReLU; dropout (element (m, n) is number m * N + n of `dropout`, kept ones scaled);
  // c_gate: C(m, n) := gate(m, n) > 0 ? C(m, n) * c_gate_scale : 0 (gate of dtype `dtype`, row
  // stride c_gate_rs: the ReLU/dropout mask of the FFN backward, read off the saved activation).
  const void* bias;
  bool relu;
  DropoutParams dropout;
  const void* c_gate;
  int64_t c_gate_rs;
  double c_gate_scale;
  double dropout_scale;  // 1 / (1 - p) in double (dropout.scale rounded to float is not enough for f64)
  void* c;  // C(m, n) = c[m * c_rs + n]
  int64_t c_rs;
  // bf16 only: C is float32 (the finished float32 tile stored unrounded), not bf16. For a bf16
  // product whose result is read in float32 (linear_cross_entropy's logits and gradients).
  bool c_f32;
};

// Scaled dot-product attention softmax(Q K^T * scale + mask) V (paper §3.2.1) over
// (batch, head) pairs. q/k/v/grad_out: element strides per batch, head and position; the last dim
// is contiguous. out, grads: contiguous (B, H, L, D). lse: (B, H, Lq) in acc type (natural log;
// +inf for a fully masked row, whose output is 0).
// Query rows and keys per block of the attention kernels (keys: a multiple of every vector width;
// rows: of every tile height).
constexpr int64_t kAttentionBlockQ = 96;
constexpr int64_t kAttentionBlockK = 64;

struct AttentionMask {
  enum Kind : int { none = 0, boolean = 1, additive = 2 };
  Kind kind = none;
  const void* data = nullptr;  // boolean: bool (true = takes part); additive: acc type
  int64_t stride[4] = {0, 0, 0, 0};  // batch, head, query, key; 0 where broadcast
};

struct AttentionArgs {
  DType dtype;
  int64_t batch, heads, len_q, len_k, dim;
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride[3], k_stride[3], v_stride[3];
  AttentionMask mask;
  const bool* key_padding;  // (B, Lk), true = padding; nullptr: none
  int64_t key_padding_stride[2];
  bool causal;  // key j takes part in query i only if j <= i (torch's top-left alignment)
  double scale;
  // bf16 forward on AMX tiles (attention_amx.h): set for bf16 with dim % 32 == 0 where the bf16
  // mode (gemm.h: gemm_bf16_mode) is AMX.
  bool amx;
  // Dropout on the probabilities: element (b, h, i, j) has number ((b * H + h) * Lq + i) * Lk + j.
  DropoutParams dropout;
  void* out;
  // out holds float rows although the inputs are bf16 (forward: written so; backward: read so). The
  // backward's delta_i = dO_i . O_i then carries no bf16 rounding of O, which a row over few keys
  // (P near 1) turns into a dS, dQ and dK error that torch's math never makes.
  bool out_float;
  void* lse;
  // Backward only.
  const void* grad_out;
  int64_t grad_out_stride[3];
  void* grad_q_partial;  // (B, H, key_chunks, Lq, D) acc type: each task's dQ, summed by the caller
  void* grad_k;
  void* grad_v;
  int64_t key_chunks;  // backward tasks per (b, h)
  int64_t query_chunks;  // forward tasks per (b, h)
};

// Beam search's step scoring (log_softmax_topk_kernel.h): per row of `x` (rows x cols, row stride
// x_stride, dtype f32 or bf16), the k largest values of log_softmax(row) in descending order
// (equal values: lower index first) and their column indices, never choosing the `num_exclude`
// columns of `exclude` (they still count in the normaliser). Slots beyond the row's finite,
// non-excluded values get -inf and index -1. values / indices: contiguous rows x k.
constexpr int kLogSoftmaxTopkMaxK = 64;
struct LogSoftmaxTopk {
  DType dtype;
  int64_t rows, cols;
  const void* x;
  int64_t x_stride;
  int k;
  const int64_t* exclude;
  int num_exclude;
  float* values;
  int64_t* indices;
};

// --- int8 linear (int8_kernel.h): out = act(dequant(q(x) W_q^T) + b), inference only ---
//
// x's rows are quantized symmetrically (scale = max|x_row| / 127, q = round-half-even(x * 127 /
// max|x_row|)), W is int8 per output channel with float32 scales; products accumulate exactly in
// int32 and out(m, n) = float(acc) * (x_scale[m] * w_scale[n]) [+ bias[n]] [ReLU], each a float32
// operation (so a reference reproduces the bits). W is packed once, in one layout for every ISA:
// panels of kInt8Panel columns, K padded to a multiple of 4, k-quads of a column adjacent (64 bytes
// = one k-quad of a panel: the operand of vpdpbusd), then 128 * (column sum of W) as int32 per padded
// column (vpdpbusd multiplies unsigned x + 128 by signed W; the sum corrects for the + 128).
constexpr int64_t kInt8Panel = 16;

struct LinearInt8Args {
  int64_t M, N, K, Kp;  // Kp = K rounded up to a multiple of 4
  const float* x;       // M rows of K floats, row stride x_rs
  int64_t x_rs;
  void* xq;             // quantized rows, row stride xq_rs bytes (>= 2 * Kp), layout per ISA
  int64_t xq_rs;
  float* x_scale;       // M: max|x_row| / 127; 0 for a zero row; NaN for a row with inf / NaN
  const int8_t* w_packed;   // the packed panels (layout above)
  const int32_t* w_comp;    // 128 * column sums, one per padded column
  const float* w_scale;     // N
  const float* bias;        // N or null
  bool relu;
  float* out;  // out(m, n) = out[m * out_rs + n]
  int64_t out_rs;
};

struct KernelTable {
  Isa isa;
  void (*add_dropout_layer_norm_fwd)(const AddDropoutLayerNormFwd& a, int64_t row_begin,
                                     int64_t row_end);
  // grad_weight/grad_bias: acc-type accumulators of length cols, overwritten.
  void (*add_dropout_layer_norm_bwd)(const AddDropoutLayerNormBwd& a, int64_t row_begin,
                                     int64_t row_end, void* grad_weight, void* grad_bias);
  // Forward tasks: task t is (b, h, query chunk) = (t / (H * qc), t / qc % H, t % qc).
  // `workspace`: attention_workspace(a, backward) bytes of scratch owned by the calling thread.
  void (*attention_fwd)(const AttentionArgs& a, int64_t task_begin, int64_t task_end, void* workspace);
  // Backward tasks: (b, h, key chunk) likewise with key_chunks.
  void (*attention_bwd)(const AttentionArgs& a, int64_t task_begin, int64_t task_end, void* workspace);
  size_t (*attention_workspace)(const AttentionArgs& a, bool backward);
  void (*log_softmax_topk)(const LogSoftmaxTopk& a, int64_t row_begin, int64_t row_end);
  // Dropout keep-bits of elements [4 * first_counter, 4 * (first_counter + num_counters)):
  // bit i of the result (bits[i / 64] >> (i % 64)) is element 4 * first_counter + i.
  void (*dropout_keep_bits)(const DropoutParams& d, uint64_t first_counter, int64_t num_counters,
                            uint64_t* bits);
  // GEMM: the packed layout for a dtype (and bf16 mode, where supported); pack B panels [panel_begin, panel_end) into `packed`
  // (gemm_info's layout: panel p at element offset p * round_up(K, kp) * nr); run the rows
  // [m_begin, m_end) x panels [panel_begin, panel_end) of C.
  GemmInfo (*gemm_info)(DType dtype, Bf16Gemm bf16);
  void (*gemm_pack_b)(const GemmPackB& b, int64_t panel_begin, int64_t panel_end, void* packed);
  // Packs rows [m_begin, m_end) of A (float32; m_begin a multiple of mr) into `packed`, micro-panel
  // m_begin / mr at element offset (m_begin / mr) * round_up(K, kp) * mr (the GemmArgs::packed_a layout).
  void (*gemm_pack_a)(const GemmArgs& g, int64_t m_begin, int64_t m_end, void* packed);
  void (*gemm_run)(const GemmArgs& g, int64_t m_begin, int64_t m_end, int64_t panel_begin,
                   int64_t panel_end);
  // int8 linear: quantize rows [row_begin, row_end) of x into xq / x_scale; run rows
  // [m_begin, m_end) x panels [panel_begin, panel_end) of out (after quantizing every row).
  void (*linear_int8_quantize)(const LinearInt8Args& a, int64_t row_begin, int64_t row_end);
  void (*linear_int8_run)(const LinearInt8Args& a, int64_t m_begin, int64_t m_end, int64_t panel_begin,
                          int64_t panel_end);
  // Peak probes for the benchmark harness: run `iters` iterations of an FMA (resp. bf16 dot
  // product) loop on the calling thread; return the floating-point operations done.
  double (*peak_fp32_fma)(int64_t iters);
  double (*peak_bf16_dot)(int64_t iters);  // nullptr where the ISA has no bf16 dot product
  // The same for AMX's tdpbf16ps (tiles configured and released inside); nullptr where AMX was
  // not compiled in. Call only where amx_supported().
  double (*peak_bf16_amx)(int64_t iters);
};

// The tables compiled into this library (avx512 / avx2 are null where the compiler could not
// build them).
const KernelTable* kernel_table_generic();
const KernelTable* kernel_table_avx2();
const KernelTable* kernel_table_avx512();

// The table to use: the best the CPU supports, lowered by AIAYN_CPU_ISA=avx2|generic (read once).
const KernelTable& kernels();
// Whether the AVX-512 kernels may use AMX bf16 tiles: the CPU has AMX-TILE and AMX-BF16 and the
// OS granted this process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, Linux >= 5.16;
// requested once, on the first call). Only then is Bf16Gemm::amx used.
bool amx_supported();
// Whether this CPU can run the named ISA (avx512, avx2, generic).
bool isa_supported(const char* name);
// Forces an ISA from code (tests); throws std::invalid_argument for an unsupported one.
void set_isa(const char* name);

}  // namespace aiayn::cpu
