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
