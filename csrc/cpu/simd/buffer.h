// A scratch array for kernels. Kernels use it instead of std::vector so that no out-of-line
// std:: function is instantiated inside an ISA translation unit (kernels.h explains why).
// Included inside the ISA namespace by isa/*.cpp.

template <typename T>
struct Buffer {
  explicit Buffer(int64_t n)
      : p(static_cast<T*>(std::aligned_alloc(64, ((sizeof(T) * n + 63) / 64 + 1) * 64))) {
    if (!p) throw std::bad_alloc();
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() { return p; }
  T* p;
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
