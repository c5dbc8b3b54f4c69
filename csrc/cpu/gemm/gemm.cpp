// Torch-facing GEMM driver: packing of B, task split over at::parallel_for, the packed-weight
// cache (gemm.h).
#include "gemm.h"

#include "../scratch.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
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

namespace {

// Runs a small bf16 GEMM (96 x 256 x 512) in one mode on the calling thread; seconds, best of 3.
double time_bf16_mode(const KernelTable& k, Bf16Gemm mode) {
  constexpr int64_t M = 96, N = 256, K = 512;
  std::vector<uint16_t> a(M * K, 0x3F80), b(K * N, 0x3F80), c(M * N);
  const GemmInfo info = k.gemm_info(DType::bf16, mode);
  const int64_t Kp = (K + info.kp - 1) / info.kp * info.kp;
  std::vector<unsigned char> packed((N + info.nr - 1) / info.nr * Kp * info.nr * info.elem_bytes + 64);
  GemmPackB pb{DType::bf16, mode, K, N, b.data(), N, 1};
  k.gemm_pack_b(pb, 0, (N + info.nr - 1) / info.nr, packed.data());
  GemmArgs g{};
  g.dtype = DType::bf16;
  g.bf16 = mode;
  g.M = M;
  g.N = N;
  g.K = K;
  g.a = a.data();
  g.a_rs = K;
  g.a_cs = 1;
  g.a_gate_scale = g.c_gate_scale = g.dropout_scale = 1.0;
  g.packed_b = packed.data();
  g.c = c.data();
  g.c_rs = N;
  double best = 1e30;
  for (int rep = 0; rep < 4; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    k.gemm_run(g, 0, M, 0, (N + info.nr - 1) / info.nr);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (rep > 0) best = std::min(best, s);
  }
  return best;
}

std::atomic<int> g_bf16_override{-1};

// The automatic mode on the AVX-512 kernels.
Bf16Gemm bf16_mode_auto() {
  static const Bf16Gemm mode = [] {
    if (const char* e = std::getenv("AIAYN_BF16_GEMM")) {
      if (std::strcmp(e, "amx") == 0 && amx_supported()) return Bf16Gemm::amx;
      if (std::strcmp(e, "dot") == 0) return Bf16Gemm::dot;
      if (std::strcmp(e, "widened") == 0) return Bf16Gemm::widened;
    }
    // AMX's tdpbf16ps does 16 x 16 x 32 multiply-adds per instruction: 8x vdpbf16ps's rate.
    if (amx_supported()) return Bf16Gemm::amx;
    // vdpbf16ps does 2x the multiply-adds of an fp32 FMA per instruction, but some cores (Intel's
    // Sapphire Rapids family) issue it on one port against two for FMAs, so widening bf16 to
    // float32 while packing is as fast or faster there. Measure both once and keep the faster.
    const KernelTable& k = *kernel_table_avx512();
    double t_dot = 0, t_wide = 0;
    for (int i = 0; i < 2; ++i) {
      t_dot += time_bf16_mode(k, Bf16Gemm::dot);
      t_wide += time_bf16_mode(k, Bf16Gemm::widened);
    }
    return t_dot <= t_wide ? Bf16Gemm::dot : Bf16Gemm::widened;
  }();
  return mode;
}

}  // namespace

int gemm_set_bf16_mode(int mode) {
  if (mode == static_cast<int>(Bf16Gemm::amx) && !amx_supported())
    throw std::invalid_argument("bf16 GEMM mode amx (2) is not supported here: no AMX-BF16, or the OS refused the tile state");
  if (mode < -1 || mode > 2) throw std::invalid_argument("bf16 GEMM mode must be -1, 0, 1 or 2");
  return g_bf16_override.exchange(mode);
}

Bf16Gemm gemm_bf16_mode() {
  if (kernels().isa != Isa::avx512) return Bf16Gemm::widened;
  const int forced = g_bf16_override.load(std::memory_order_relaxed);
  return forced >= 0 ? static_cast<Bf16Gemm>(forced) : bf16_mode_auto();
}

namespace {
// The bf16 mode of a GEMM in `dtype` (the field is ignored for other dtypes; widened keeps it fixed).
Bf16Gemm bf16_mode_for(DType dtype) { return dtype == DType::bf16 ? gemm_bf16_mode() : Bf16Gemm::widened; }
}  // namespace

at::Tensor gemm_pack_b(DType dtype, int64_t K, int64_t N, const void* b, int64_t b_rs, int64_t b_cs) {
  const KernelTable& k = kernels();
  const Bf16Gemm mode = bf16_mode_for(dtype);
  const GemmInfo info = k.gemm_info(dtype, mode);
  const int64_t Kp = (K + info.kp - 1) / info.kp * info.kp;
  const int64_t panels = (N + info.nr - 1) / info.nr;
  at::Tensor packed = scratch_tensor(std::max<int64_t>(1, panels * Kp * info.nr * info.elem_bytes) + 64);
  GemmPackB pb{dtype, mode, K, N, b, b_rs, b_cs};
  // Panels per task: about 64K elements each.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, Kp * info.nr));
  void* out = packed.data_ptr();
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) { k.gemm_pack_b(pb, p0, p1, out); });
  return packed;
}

namespace {

// Enough for every weight of a 6 + 6 layer model (67 for the base Transformer, which beam search
// keeps packed for a whole search).
constexpr size_t kPackCacheEntries = 256;

struct PackEntry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  bool transpose;
  Isa isa;
  Bf16Gemm bf16;
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
  const Bf16Gemm mode = bf16_mode_for(gemm_dtype(w));
  {
    std::lock_guard<std::mutex> lock(g_pack_mutex);
    auto& cache = pack_cache();
    for (PackEntry& e : cache) {
      if (e.data != w.data_ptr() || e.transpose != transpose || e.isa != isa || e.bf16 != mode || e.dtype != w.scalar_type() ||
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
                            w.data_ptr(), w.sizes().vec(), w.strides().vec(), w.scalar_type(), transpose, isa, mode,
                            version, ++g_pack_clock, packed});
  return packed;
}

bool gemm_set_pack_cache(bool enabled) {
  return pack_cache_flag().exchange(enabled);
}

void gemm_clear_pack_cache() {
  std::lock_guard<std::mutex> lock(g_pack_mutex);
  pack_cache().clear();
}

namespace {

// How one GEMM is cut into tasks: K chunks x row blocks x column chunks.
struct GemmPlan {
  GemmArgs g;
  GemmInfo info;
  int64_t panels = 0, mpanels = 0, mblocks = 0, nchunks = 1, kchunks = 1;
  std::vector<GemmArgs> chunk_args;
  at::Tensor partial, partial_sums;
  int64_t tasks() const { return kchunks * mblocks * nchunks; }
  void run(const KernelTable& k, int64_t t) const {
    const int64_t per_chunk = mblocks * nchunks;
    const int64_t c = t / per_chunk, mb = (t % per_chunk) / nchunks, nc = t % nchunks;
    const int64_t m0 = std::min(g.M, mpanels * mb / mblocks * info.mr);
    const int64_t m1 = std::min(g.M, mpanels * (mb + 1) / mblocks * info.mr);
    const int64_t p0 = panels * nc / nchunks, p1 = panels * (nc + 1) / nchunks;
    k.gemm_run(chunk_args[c], m0, m1, p0, p1);
  }
};

GemmPlan make_plan(GemmArgs g, const at::Tensor& packed, int64_t threads) {
  GemmPlan pl;
  const KernelTable& k = kernels();
  g.bf16 = bf16_mode_for(g.dtype);
  const GemmInfo info = k.gemm_info(g.dtype, g.bf16);
  pl.info = info;
  if (g.b_rows) {
    // Rows paths (dot products, or W's rows broadcast): every task takes all rows and a range of
    // column groups; the split does not change any result (gemm_kernel.h). The broadcast path packs
    // A^T once per task, so it gets one task per thread: the FFN at T = 64 ran ~2% faster than
    // with two (whose dynamic schedule balances a noisy machine better, but packs A^T twice as
    // often; a packed A^T shared by the tasks, each panel packed by whoever claimed it first, was
    // no faster than one task per thread).
    TORCH_INTERNAL_ASSERT(g.a_cs == 1 && !g.a_gate && !g.a_row_sums);
    const int64_t unit = g.b_rows_bcast ? info.mr : info.dot_nr;
    pl.panels = (g.N + unit - 1) / unit;
    pl.mpanels = pl.mblocks = 1;
    pl.info.mr = static_cast<int>(std::max<int64_t>(1, g.M));
    pl.nchunks = threads > 1 ? std::max<int64_t>(1, std::min(pl.panels, (g.b_rows_bcast ? 1 : 4) * threads)) : 1;
    pl.chunk_args.assign(1, g);
    pl.g = g;
    return pl;
  }
  g.packed_b = packed.data_ptr();
  const int64_t Kp = (g.K + info.kp - 1) / info.kp * info.kp;
  pl.panels = (g.N + info.nr - 1) / info.nr;
  pl.mpanels = (g.M + info.mr - 1) / info.mr;

  // Long reductions without an epilogue (the weight gradients, K = tokens): split K into chunks
  // whose float32 partial products are summed after, in a fixed order. A chunk's packed A block
  // is small, so each block of rows covers more of them and B is streamed from memory fewer
  // times. (bf16 keeps one pass: its C is stored as bf16.)
  const bool plain = !g.bias && !g.relu && !g.dropout.enabled && !g.c_gate && g.dtype != DType::bf16;
  pl.kchunks = plain && g.K > 1536 && g.N > 0 ? (g.K + 767) / 768 : 1;
  const int64_t kc = (Kp + pl.kchunks - 1) / pl.kchunks;
  const size_t esize = g.dtype == DType::f64 ? 8 : g.dtype == DType::f32 ? 4 : 2;

  // Rows per task: the packed A block (rows x K chunk) within ~1 MiB of L2, at most 32 micro-panels,
  // but at least kMinBlockPanels micro-panels where M allows: every task streams all of its B
  // panels through L1, so a task of few rows reads B (from L2/L3) for little work. At M = 512
  // (one training batch of the base model) cutting the rows into 8 blocks of 64 ran at ~270
  // GFLOP/s on 2 threads, 2 blocks x 2 column chunks at ~300-340.
  constexpr int64_t kMinBlockPanels = 16;
  const int64_t row_bytes = std::max<int64_t>(1, std::min(Kp, kc + info.kp) * info.elem_bytes);
  const int64_t mp_per_block = std::clamp<int64_t>((1 << 20) / (row_bytes * info.mr), 1, 32);
  int64_t mblocks = (pl.mpanels + mp_per_block - 1) / mp_per_block;
  mblocks = std::min(mblocks, std::max<int64_t>(1, pl.mpanels / kMinBlockPanels));
  if (mblocks > 1) mblocks = (mblocks + threads - 1) / threads * threads;  // equal work per thread
  // Slack for the dynamic schedule; one thread gains nothing from it and would stream B more often.
  if (threads > 1 && mblocks * pl.kchunks < 4 * threads && pl.mpanels >= 4 * threads * kMinBlockPanels)
    mblocks = 4 * threads;
  pl.mblocks = std::max<int64_t>(1, std::min(mblocks, pl.mpanels));
  // Few row blocks (small M, decoding): split the columns too; one row block splits them once per
  // thread (each task then packs all of A; more chunks measured slower).
  if (pl.mblocks * pl.kchunks < 2 * threads) {
    const int64_t want = pl.mblocks == 1 && pl.kchunks == 1 ? threads : (2 * threads + pl.mblocks - 1) / pl.mblocks;
    pl.nchunks = std::max<int64_t>(1, std::min(pl.panels, want));
  }

  pl.chunk_args.assign(pl.kchunks, g);
  if (pl.kchunks > 1) {
    const auto acc = g.dtype == DType::f64 ? at::kDouble : at::kFloat;
    pl.partial = scratch_tensor(pl.kchunks * g.M * g.N * static_cast<int64_t>(c10::elementSize(acc)))
                     .view(acc)
                     .view({pl.kchunks, g.M, g.N});
    if (g.a_row_sums) pl.partial_sums = at::empty({pl.kchunks, g.M}, at::TensorOptions().dtype(acc));
    for (int64_t c = 0; c < pl.kchunks; ++c) {
      const int64_t k0 = std::min(Kp, c * kc), k1 = std::min(g.K, (c + 1) * kc);
      GemmArgs& gc = pl.chunk_args[c];
      gc.K = std::max<int64_t>(0, k1 - k0);
      gc.a = static_cast<const char*>(g.a) + k0 * g.a_cs * esize;
      if (g.a_gate) gc.a_gate = static_cast<const char*>(g.a_gate) + k0 * g.a_cs * esize;
      gc.packed_b = static_cast<const char*>(g.packed_b) + k0 * info.nr * info.elem_bytes;
      gc.b_panel_stride = Kp * info.nr;
      gc.c = pl.partial[c].data_ptr();
      gc.c_rs = g.N;
      gc.a_row_sums = g.a_row_sums ? pl.partial_sums[c].data_ptr() : nullptr;
    }
  }
  pl.g = g;
  return pl;
}

// Sums a plan's K-chunk partial products (and row sums) into C, in chunk order.
void reduce_plan(const GemmPlan& pl) {
  if (pl.kchunks == 1) return;
  const GemmArgs& g = pl.g;
  const int64_t kchunks = pl.kchunks;
  auto reduce = [&](auto* src, int64_t rows, int64_t cols, int64_t plane, auto* dst, int64_t dst_rs) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < cols; ++j) {
          auto s = src[r * cols + j];
          for (int64_t c = 1; c < kchunks; ++c) s += src[c * plane + r * cols + j];
          dst[r * dst_rs + j] = s;
        }
    });
  };
  if (g.dtype == DType::f64) {
    reduce(pl.partial.data_ptr<double>(), g.M, g.N, g.M * g.N, static_cast<double*>(g.c), g.c_rs);
    if (g.a_row_sums) reduce(pl.partial_sums.data_ptr<double>(), 1, g.M, g.M, static_cast<double*>(g.a_row_sums), 0);
  } else {
    reduce(pl.partial.data_ptr<float>(), g.M, g.N, g.M * g.N, static_cast<float*>(g.c), g.c_rs);
    if (g.a_row_sums) reduce(pl.partial_sums.data_ptr<float>(), 1, g.M, g.M, static_cast<float*>(g.a_row_sums), 0);
  }
}

}  // namespace

void gemm_run_many(const std::vector<std::pair<GemmArgs, at::Tensor>>& jobs) {
  const KernelTable& k = kernels();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<GemmPlan> plans;
  std::vector<int64_t> first;  // first global task of each plan
  int64_t tasks = 0;
  for (const auto& [g, packed] : jobs) {
    if (g.M <= 0 || (g.N <= 0 && !g.a_row_sums)) continue;
    plans.push_back(make_plan(g, packed, threads));
    first.push_back(tasks);
    tasks += plans.back().tasks();
  }
  auto run = [&](int64_t t) {
    const size_t i = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
    plans[i].run(k, t - first[i]);
  };
  if (tasks <= 1 || threads == 1) {
    for (int64_t t = 0; t < tasks; ++t) run(t);
  } else {
    // Tasks are handed out dynamically (an atomic counter): on a shared, noisy machine a
    // statically split range waits for its slowest thread, and independent GEMMs share one
    // parallel region (one barrier). Which task computes what is fixed, so results do not depend
    // on the schedule.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) run(t);
    });
  }
  for (const GemmPlan& pl : plans) reduce_plan(pl);
}

void gemm_run_all(GemmArgs g, const at::Tensor& packed) { gemm_run_many({{g, packed}}); }

namespace {
std::atomic<int> g_rows_override{-1};
// Rows of A up to which C = A W^T runs on the dot-product path. Measured on a Sapphire-Rapids-class
// core (float32, one thread, K = 512 .. 2048, N = 512 .. 2048): against pack + GEMM it is ~1.6x
// faster at M <= 64, ~1.4x at 96, even at 128 for K = 2048; against a GEMM on a weight already
// packed (the packed-weight cache) it is even at M <= 64 and ~10% slower above, so a weight that
// the cache will keep takes the packed path unless M is tiny (then both stream W once).
constexpr int64_t kDotMaxRows = 96;
constexpr int64_t kDotMaxRowsCached = 8;
// float32 rows paths from kWRowsMinRows rows on broadcast W's rows on the packed micro-kernel
// (gemm_wrows_run) instead of dot products: ~1.5x faster at M = 32 .. 96, even at ~20 rows (2
// threads, K = 512 .. 2048), and faster than pack + GEMM up to ~160 rows (kWRowsMaxRows).
constexpr int64_t kWRowsMinRows = 21;
constexpr int64_t kWRowsMaxRows = 160;
// Packed weights larger than this are packed a chunk per task (gemm_run_weight_t_chunked).
constexpr int64_t kChunkedPackBytes = 16 << 20;
}  // namespace

int gemm_set_rows_path(int mode) { return g_rows_override.exchange(mode); }

bool gemm_use_rows_path(int64_t M, bool cached, DType dtype) {
  int forced = g_rows_override.load(std::memory_order_relaxed);
  if (forced < 0) {
    static const int env = [] {
      const char* e = std::getenv("AIAYN_GEMM_DOT");
      return e ? (std::strcmp(e, "1") == 0 ? 1 : std::strcmp(e, "0") == 0 ? 0 : -1) : -1;
    }();
    forced = env;
  }
  return forced >= 0 ? forced == 1
                     : M <= (cached ? kDotMaxRowsCached : dtype == DType::f32 ? kWRowsMaxRows : kDotMaxRows);
}

namespace {

// C = A w^T for a weight whose packed copy would not stay in cache (the vocabulary projection:
// 37000 x 512 floats, 75 MB): packing it whole writes it to memory and the GEMM streams it back
// once per block of rows. Instead each task packs a chunk of ~512 KiB of panels into its own
// buffer (L2) and runs every block of rows over it, so W is read once and packed B never leaves
// L2; the packed A blocks are repacked per chunk (A is small next to W). Same tiles, same k order
// as the packed path, so the same results.
void gemm_run_weight_t_chunked(GemmArgs g, const at::Tensor& w, const GemmInfo& info) {
  const KernelTable& k = kernels();
  const int64_t Kp = (g.K + info.kp - 1) / info.kp * info.kp;
  const int64_t panels = (g.N + info.nr - 1) / info.nr;
  const int64_t panel_bytes = Kp * info.nr * info.elem_bytes;
  const int64_t chunk = std::max<int64_t>(1, (512 << 10) / panel_bytes);
  const int64_t chunks = (panels + chunk - 1) / chunk;
  const int64_t mp_per_block = std::clamp<int64_t>((1 << 20) / (Kp * info.elem_bytes * info.mr), 1, 32);
  const int64_t block_rows = mp_per_block * info.mr;
  const int64_t w_rs = w.size(0) > 1 ? w.stride(0) : w.size(1);
  const char* wdata = static_cast<const char*>(w.data_ptr());
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // float32: A packed once for every chunk (each chunk's tasks repacked their rows: ~10% of the
  // vocabulary projection).
  at::Tensor packed_a;
  if (g.dtype == DType::f32 && !g.a_gate && !g.a_row_sums) {
    const int64_t mpanels = (g.M + info.mr - 1) / info.mr;
    packed_a = scratch_tensor(mpanels * Kp * info.mr * info.elem_bytes + 64);
    void* pa = packed_a.data_ptr();
    at::parallel_for(0, mpanels, 1, [&](int64_t q0, int64_t q1) {
      k.gemm_pack_a(g, q0 * info.mr, std::min(g.M, q1 * info.mr), pa);
    });
    g.packed_a = pa;
  }
  auto task = [&](int64_t c) {
    const int64_t p0 = c * chunk, p1 = std::min(panels, p0 + chunk);
    const at::Tensor buf = scratch_tensor((p1 - p0) * panel_bytes + 64);
    // B = w^T from column p0 * nr on: panels 0 .. p1 - p0 of the shifted problem.
    const int64_t n0 = p0 * info.nr;
    GemmPackB pb{g.dtype, g.bf16, g.K, g.N - n0, wdata + n0 * w_rs * static_cast<int64_t>(w.element_size()), 1, w_rs};
    k.gemm_pack_b(pb, 0, p1 - p0, buf.data_ptr());
    GemmArgs gc = g;
    gc.packed_b = buf.data_ptr();
    gc.b_first_panel = p0;
    for (int64_t m0 = 0; m0 < g.M; m0 += block_rows) k.gemm_run(gc, m0, std::min(g.M, m0 + block_rows), p0, p1);
  };
  if (threads == 1 || chunks == 1) {
    for (int64_t c = 0; c < chunks; ++c) task(c);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) task(c);
  });
}

}  // namespace

void gemm_run_weight_t(GemmArgs g, const at::Tensor& w) {
  TORCH_INTERNAL_ASSERT(w.dim() == 2 && (w.size(1) <= 1 || w.stride(1) == 1));
  if (g.K > 0 && g.a_cs == 1 && !g.a_gate && !g.a_row_sums && gemm_use_rows_path(g.M, pack_cache_enabled() && !w.is_inference() && w.has_storage(), g.dtype)) {  // K = 0: w has no data pointer
    g.b_rows = w.data_ptr();
    g.b_rows_rs = w.size(0) > 1 ? w.stride(0) : w.size(1);
    g.b_rows_bcast = g.dtype == DType::f32 && g.M >= kWRowsMinRows && g.M <= kWRowsMaxRows;
    gemm_run_all(g, at::Tensor());
    return;
  }
  const bool cached = pack_cache_enabled() && !w.is_inference() && w.has_storage();
  g.bf16 = bf16_mode_for(g.dtype);
  const GemmInfo info = kernels().gemm_info(g.dtype, g.bf16);
  const int64_t Kp = (g.K + info.kp - 1) / info.kp * info.kp;
  if (!cached && g.M > 0 && g.N > 0 && Kp * g.N * info.elem_bytes > kChunkedPackBytes) {
    gemm_run_weight_t_chunked(g, w, info);
    return;
  }
  gemm_run_all(g, gemm_pack_weight(w, /*transpose=*/true));
}

}  // namespace aiayn::cpu
