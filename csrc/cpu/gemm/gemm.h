// Torch-facing driver of the GEMM kernels (gemm_kernel.h): packs B, splits C into tasks for
// at::parallel_for, and caches packed weights. Used by linear.cpp and feed_forward.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <utility>
#include <vector>

#include "../kernels.h"

namespace aiayn::cpu {

DType gemm_dtype(const at::Tensor& t);

// How bf16 GEMMs run on the current ISA: AMX tiles where amx_supported(); else vdpbf16ps
// (AVX-512 BF16) or widened to float32 for the FMA kernel, whichever is faster on this CPU (timed
// once); always widened below AVX-512. AIAYN_BF16_GEMM=amx|dot|widened forces a mode (amx only
// where supported).
Bf16Gemm gemm_bf16_mode();
// Forces the bf16 mode: 2 AMX, 1 vdpbf16ps, 0 widened, -1 automatic; returns the previous setting.
// Throws std::invalid_argument for AMX where amx_supported() is false.
int gemm_set_bf16_mode(int mode);

// A tensor as (rows, cols) with unit column stride and one row stride, copying only when the
// leading dims do not collapse or the last dim is strided.
at::Tensor gemm_rows(const at::Tensor& t, int64_t cols);
inline int64_t gemm_row_stride(const at::Tensor& r) { return r.size(0) > 1 ? r.stride(0) : r.size(1); }
// A 2-d weight with unit column stride (copied otherwise).
at::Tensor gemm_weight(const at::Tensor& w);
// An optional bias in the accumulation type (float32, float64 for float64), contiguous; undefined
// when absent.
at::Tensor gemm_bias(const std::optional<at::Tensor>& b, at::ScalarType x_dtype);

// Packs B(k, n) = b[k * b_rs + n * b_cs] (K x N) for the current ISA; a uint8 tensor.
at::Tensor gemm_pack_b(DType dtype, int64_t K, int64_t N, const void* b, int64_t b_rs, int64_t b_cs);

// Packs a 2-d weight `w` (rows x cols, last dim contiguous) as B = w^T (transpose, the forward
// x @ w^T of nn.Linear) or B = w (the backward dY @ w).
//
// Packed-weight cache (off by default; gemm_set_pack_cache / AIAYN_PACK_CACHE=1 turn it on): an
// entry is reused while the weight's storage is alive, its data pointer, shape, strides, dtype and
// ISA are the same and its version counter (`w._version` in Python, bumped by every in-place
// write such as optimizer.step() or w.add_()) has not moved. So a weight is packed once per
// optimizer step and reused by every call in between. Writes that bypass the version counter
// (`w.data.copy_(...)`, what torch.autograd.gradcheck does to perturb inputs) are not seen, which
// is why the cache is opt-in; inference tensors (no version counter) are never cached. At most
// kPackCacheEntries (256) packed weights are held; entries of freed storages are dropped.
at::Tensor gemm_pack_weight(const at::Tensor& w, bool transpose);
void gemm_clear_pack_cache();
// Turns the cache on or off (entries are kept, only not used while off; gemm_clear_pack_cache
// drops them); returns the previous setting.
bool gemm_set_pack_cache(bool enabled);

// C = epilogue(A * B) over all of C, in parallel. g.packed_b is set from `packed`.
void gemm_run_all(GemmArgs g, const at::Tensor& packed);
// C = epilogue(A w^T) for a 2-d weight w (N x K, last dim contiguous), the forward of nn.Linear:
// few rows of A (gemm_use_rows_path) run straight from w's rows (float32 from ~20 rows: w's rows
// broadcast on the packed micro-kernel; else dot products), the rest on w packed
// (gemm_pack_weight, cached where enabled).
void gemm_run_weight_t(GemmArgs g, const at::Tensor& w);
// Whether M rows of A take a rows path (`cached`: the weight would come from the packed-weight
// cache); gemm_set_rows_path(1/0) or AIAYN_GEMM_DOT=1/0 force it on/off, -1 restores the size
// rule. Returns the previous setting.
bool gemm_use_rows_path(int64_t M, bool cached, DType dtype);
int gemm_set_rows_path(int mode);
// Independent GEMMs (none reads another's C) in one parallel region.
void gemm_run_many(const std::vector<std::pair<GemmArgs, at::Tensor>>& jobs);

}  // namespace aiayn::cpu
