// Torch-facing GEMM driver: packing of B, task split over at::parallel_for, the packed-weight
// cache (gemm.h).
#include "gemm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace aiayn::cpu {

DType gemm_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kDouble: return DType::f64;
    default: TORCH_CHECK(false, "aiayn gemm: unsupported dtype ", t.scalar_type());
  }
}

at::Tensor gemm_rows(const at::Tensor& t, int64_t cols) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) rows *= t.size(i);
  at::Tensor r = t.reshape({rows, cols});
  return cols > 1 && r.size(0) > 0 && r.stride(1) != 1 ? r.contiguous() : r;
}

at::Tensor gemm_weight(const at::Tensor& w) { return w.size(1) > 1 && w.stride(1) != 1 ? w.contiguous() : w; }

at::Tensor gemm_bias(const std::optional<at::Tensor>& b, at::ScalarType x_dtype) {
  if (!b.has_value() || !b->defined()) return at::Tensor();
  return b->to(x_dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

at::Tensor gemm_pack_b(DType dtype, int64_t K, int64_t N, const void* b, int64_t b_rs, int64_t b_cs) {
  const KernelTable& k = kernels();
  const GemmInfo info = k.gemm_info(dtype);
  const int64_t Kp = (K + info.kp - 1) / info.kp * info.kp;
  const int64_t panels = (N + info.nr - 1) / info.nr;
  at::Tensor packed = at::empty({std::max<int64_t>(1, panels * Kp * info.nr * info.elem_bytes) + 64},
                                at::TensorOptions().dtype(at::kByte));
  GemmPackB pb{dtype, K, N, b, b_rs, b_cs};
  // Panels per task: about 64K elements each.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, Kp * info.nr));
  void* out = packed.data_ptr();
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) { k.gemm_pack_b(pb, p0, p1, out); });
  return packed;
}

namespace {

constexpr size_t kPackCacheEntries = 64;

struct PackEntry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  bool transpose;
  Isa isa;
  uint32_t version;
  uint64_t last_use;
  at::Tensor packed;
};

std::mutex g_pack_mutex;
std::vector<PackEntry>& pack_cache() {
  static std::vector<PackEntry> cache;
  return cache;
}
uint64_t g_pack_clock = 0;

std::atomic<bool>& pack_cache_flag() {
  static std::atomic<bool> on{[] {
    const char* e = std::getenv("AIAYN_PACK_CACHE");
    return e && std::strcmp(e, "1") == 0;
  }()};
  return on;
}
bool pack_cache_enabled() { return pack_cache_flag().load(std::memory_order_relaxed); }

at::Tensor pack_weight_uncached(const at::Tensor& w, bool transpose) {
  const int64_t rows = w.size(0), cols = w.size(1);
  const int64_t rs = rows > 1 ? w.stride(0) : cols;
  // B = w^T: K = cols, N = rows, B(k, n) = w[n, k]; B = w: K = rows, N = cols.
  return transpose ? gemm_pack_b(gemm_dtype(w), cols, rows, w.data_ptr(), 1, rs)
                   : gemm_pack_b(gemm_dtype(w), rows, cols, w.data_ptr(), rs, 1);
}

}  // namespace

at::Tensor gemm_pack_weight(const at::Tensor& w, bool transpose) {
  TORCH_INTERNAL_ASSERT(w.dim() == 2 && (w.size(1) <= 1 || w.stride(1) == 1));
  if (!pack_cache_enabled() || w.is_inference() || !w.has_storage()) return pack_weight_uncached(w, transpose);
  const uint32_t version = w.unsafeGetTensorImpl()->version_counter().current_version();
  c10::StorageImpl* storage = w.storage().unsafeGetStorageImpl();
  const Isa isa = kernels().isa;
  {
    std::lock_guard<std::mutex> lock(g_pack_mutex);
    auto& cache = pack_cache();
    for (PackEntry& e : cache) {
      if (e.data != w.data_ptr() || e.transpose != transpose || e.isa != isa || e.dtype != w.scalar_type() ||
          e.version != version || e.sizes != w.sizes().vec() || e.strides != w.strides().vec())
        continue;
      auto alive = e.storage.lock();
      if (!alive || alive.get() != storage) continue;
      e.last_use = ++g_pack_clock;
      return e.packed;
    }
  }
  at::Tensor packed = pack_weight_uncached(w, transpose);
  std::lock_guard<std::mutex> lock(g_pack_mutex);
  auto& cache = pack_cache();
  // Drop entries of freed storages, stale versions of this weight, then the least recently used.
  cache.erase(std::remove_if(cache.begin(), cache.end(),
                             [&](const PackEntry& e) {
                               return e.storage.expired() ||
                                      (e.data == w.data_ptr() && e.transpose == transpose && e.isa == isa &&
                                       e.version != version);
                             }),
              cache.end());
  if (cache.size() >= kPackCacheEntries) {
    auto lru = std::min_element(cache.begin(), cache.end(),
                                [](const PackEntry& a, const PackEntry& b) { return a.last_use < b.last_use; });
    cache.erase(lru);
  }
  cache.push_back(PackEntry{c10::weak_intrusive_ptr<c10::StorageImpl>(w.storage().getWeakStorageImpl()),
                            w.data_ptr(), w.sizes().vec(), w.strides().vec(), w.scalar_type(), transpose, isa,
                            version, ++g_pack_clock, packed});
  return packed;
}

bool gemm_set_pack_cache(bool enabled) {
  const bool previous = pack_cache_flag().exchange(enabled);
  if (!enabled) gemm_clear_pack_cache();
  return previous;
}

void gemm_clear_pack_cache() {
  std::lock_guard<std::mutex> lock(g_pack_mutex);
  pack_cache().clear();
}

void gemm_run_all(GemmArgs g, const at::Tensor& packed) {
  if (g.M <= 0 || (g.N <= 0 && !g.a_row_sums)) return;
  const KernelTable& k = kernels();
  const GemmInfo info = k.gemm_info(g.dtype);
  g.packed_b = packed.data_ptr();
  const int64_t Kp = (g.K + info.kp - 1) / info.kp * info.kp;
  const int64_t panels = (g.N + info.nr - 1) / info.nr;
  const int64_t mpanels = (g.M + info.mr - 1) / info.mr;
  // Rows per task: the packed A block (rows x Kp) within ~1 MiB of L2, at most 32 micro-panels.
  const int64_t row_bytes = std::max<int64_t>(1, Kp * info.elem_bytes);
  const int64_t mp_per_block = std::clamp<int64_t>((1 << 20) / (row_bytes * info.mr), 1, 32);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t mblocks = (mpanels + mp_per_block - 1) / mp_per_block;
  if (mblocks > 1) mblocks = (mblocks + threads - 1) / threads * threads;  // equal work per thread
  mblocks = std::min(mblocks, mpanels);
  // Few row blocks (small M, decoding): split the columns too.
  int64_t nchunks = 1;
  if (mblocks < 2 * threads) nchunks = std::max<int64_t>(1, std::min(panels, (2 * threads + mblocks - 1) / mblocks));
  const int64_t tasks = mblocks * nchunks;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mb = t / nchunks, nc = t % nchunks;
      const int64_t m0 = std::min(g.M, mpanels * mb / mblocks * info.mr);
      const int64_t m1 = std::min(g.M, mpanels * (mb + 1) / mblocks * info.mr);
      const int64_t p0 = panels * nc / nchunks, p1 = panels * (nc + 1) / nchunks;
      k.gemm_run(g, m0, m1, p0, p1);
    }
  });
}

}  // namespace aiayn::cpu
