// A scratch array for kernels. Kernels use it instead of std::vector so that no out-of-line
// std:: function is instantiated inside an ISA translation unit (kernels.h explains why).
// Included inside the ISA namespace by isa/*.cpp.

// From kBufferCacheBytes on, blocks come from the calling thread's scratch cache (kernels.h), as
// the packed A blocks of the GEMM tasks (~1 MiB): freed to glibc they were page-faulted in again
// on every call.
constexpr size_t kBufferCacheBytes = size_t(64) << 10;

template <typename T>
struct Buffer {
  explicit Buffer(int64_t n) {
    const size_t bytes = ((sizeof(T) * static_cast<size_t>(n > 0 ? n : 0) + 63) / 64 + 1) * 64;
    if (bytes >= kBufferCacheBytes) {
      p = static_cast<T*>(kernel_scratch_acquire(bytes, &capacity));
    } else {
      p = static_cast<T*>(std::aligned_alloc(64, bytes));
      if (!p) throw std::bad_alloc();
    }
  }
  ~Buffer() {
    if (capacity)
      kernel_scratch_release(p, capacity);
    else
      std::free(p);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() { return p; }
  T* p = nullptr;
  size_t capacity = 0;  // nonzero: from the thread's scratch cache
};

// Carves 64-byte-aligned arrays out of scratch memory the caller provides (one block per thread,
// allocated once per op call instead of per task). With base == nullptr it only counts, so the
// kernel's own layout function also tells the caller how many bytes to provide.
struct Workspace {
  char* base = nullptr;
  size_t used = 0;
  template <typename T>
  T* take(int64_t n) {
    const size_t offset = (used + 63) & ~size_t{63};
    used = offset + sizeof(T) * static_cast<size_t>(n > 0 ? n : 0);
    return base ? reinterpret_cast<T*>(base + offset) : nullptr;
  }
};
