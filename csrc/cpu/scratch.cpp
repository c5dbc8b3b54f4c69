// Scratch memory kept for reuse (scratch.h): a process-wide pool of blocks for torch-side
// temporaries, and a small per-thread cache for the kernels' Buffers (kernels.h).
#include "scratch.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

#include "kernels.h"

namespace aiayn::cpu {

namespace {

constexpr size_t kPoolMinBytes = size_t(64) << 10;
constexpr size_t kPoolKeepBytes = size_t(384) << 20;

size_t pool_round(size_t bytes) {
  const size_t unit = bytes < (size_t(8) << 20) ? size_t(64) << 10 : size_t(2) << 20;
  return (bytes + unit - 1) / unit * unit;
}

class ScratchPool {
 public:
  at::Tensor get(size_t bytes) {
    const size_t want = pool_round(bytes);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // The smallest free block that fits, unless it is much larger than asked for.
      auto it = free_.lower_bound(want);
      if (it != free_.end() && it->first <= want + want / 4 + (size_t(64) << 10)) {
        p = it->second;
        free_bytes_ -= it->first;
        free_.erase(it);
      }
    }
    if (!p) {
      p = std::aligned_alloc(64, want);
      if (!p) throw std::bad_alloc();
      std::lock_guard<std::mutex> lock(mu_);
      size_of_[p] = want;
    }
    return at::from_blob(p, {static_cast<int64_t>(bytes)}, [this](void* q) { put(q); },
                         at::TensorOptions().dtype(at::kByte));
  }

 private:
  void put(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t size = size_of_.at(p);
    free_.emplace(size, p);
    free_bytes_ += size;
    while (free_bytes_ > kPoolKeepBytes) {
      auto largest = std::prev(free_.end());
      free_bytes_ -= largest->first;
      size_of_.erase(largest->second);
      std::free(largest->second);
      free_.erase(largest);
    }
  }
  std::mutex mu_;
  std::multimap<size_t, void*> free_;           // size -> unused block
  std::unordered_map<void*, size_t> size_of_;  // every block the pool owns, used or not
  size_t free_bytes_ = 0;
};

// Per thread: up to kSlots unused blocks (at most kThreadKeepBytes each), best fit on acquire.
constexpr int kSlots = 4;
constexpr size_t kThreadKeepBytes = size_t(64) << 20;

struct ThreadBlocks {
  void* p[kSlots] = {};
  size_t n[kSlots] = {};
  ~ThreadBlocks() {
    for (int i = 0; i < kSlots; ++i) std::free(p[i]);
  }
};
thread_local ThreadBlocks t_blocks;

}  // namespace

at::Tensor scratch_tensor(int64_t bytes) {
  if (static_cast<size_t>(bytes) < kPoolMinBytes) return at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  static ScratchPool* pool = new ScratchPool();  // never destroyed: tensors may outlive static destructors
  return pool->get(static_cast<size_t>(bytes));
}

void* kernel_scratch_acquire(size_t bytes, size_t* capacity) {
  ThreadBlocks& t = t_blocks;
  int best = -1;
  for (int i = 0; i < kSlots; ++i)
    if (t.p[i] && t.n[i] >= bytes && (best < 0 || t.n[i] < t.n[best])) best = i;
  if (best >= 0) {
    void* p = t.p[best];
    *capacity = t.n[best];
    t.p[best] = nullptr;
    t.n[best] = 0;
    return p;
  }
  const size_t size = (bytes + 4095) / 4096 * 4096;
  void* p = std::aligned_alloc(64, size);
  if (!p) throw std::bad_alloc();
  *capacity = size;
  return p;
}

void kernel_scratch_release(void* p, size_t capacity) {
  if (!p) return;
  ThreadBlocks& t = t_blocks;
  if (capacity <= kThreadKeepBytes) {
    int slot = -1;
    for (int i = 0; i < kSlots && slot < 0; ++i)
      if (!t.p[i]) slot = i;
    if (slot < 0) {  // all full: replace the smallest kept block if this one is larger
      int smallest = 0;
      for (int i = 1; i < kSlots; ++i)
        if (t.n[i] < t.n[smallest]) smallest = i;
      if (t.n[smallest] < capacity) {
        std::free(t.p[smallest]);
        slot = smallest;
      }
    }
    if (slot >= 0) {
      t.p[slot] = p;
      t.n[slot] = capacity;
      return;
    }
  }
  std::free(p);
}

}  // namespace aiayn::cpu
