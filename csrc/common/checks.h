// Argument checks shared by the CPU and CUDA entry points. Every message names the op, the
// argument and what was expected, so a user can fix the call without reading our code.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>
#include <string>

namespace aiayn {

// Raised as ValueError in Python (c10::ValueError maps to it).
#define AIAYN_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": argument '", name, "' must be a tensor, got None");
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": argument '", name, "' is on ", t.device(),
              " but '", ref_name, "' is on ", ref.device(), "; all tensors must be on one device");
}

inline void check_dtype_in(const char* op, const char* name, const at::Tensor& t,
                           std::initializer_list<at::ScalarType> allowed) {
  for (auto s : allowed)
    if (t.scalar_type() == s) return;
  std::string list;
  for (auto s : allowed) list += (list.empty() ? "" : ", ") + std::string(c10::toString(s));
  TORCH_CHECK_TYPE(false, op, ": argument '", name, "' has dtype ", t.scalar_type(),
                   ", expected one of ", list);
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": argument '", name,
                   "' has dtype ", t.scalar_type(), " but '", ref_name, "' has ",
                   ref.scalar_type(), "; they must match");
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& t,
                             const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": argument '", name, "' has shape ",
                    t.sizes(), " but '", ref_name, "' has shape ", ref.sizes(),
                    "; they must match");
}

inline void check_probability(const char* op, const char* name, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, op, ": argument '", name,
                    "' must be a probability in [0, 1], got ", p);
}

// A result shaped like `t` (views such as expand() can be far larger than their memory) must be
// allocatable: x86-64 gives a process 2^47 bytes, so anything larger fails here, with the
// argument's name, before the op allocates (and before any byte count could overflow).
inline void check_addressable(const char* op, const char* name, const at::Tensor& t, int64_t element_size) {
  constexpr int64_t kMaxBytes = int64_t{1} << 47;
  TORCH_CHECK_VALUE(t.numel() <= kMaxBytes / std::max<int64_t>(element_size, 1), op, ": argument '", name,
                    "' of shape ", t.sizes(), " (", t.numel(), " elements) is too large: a result of its size needs more than 2^47 bytes");
}

// The Philox seed every dropout-capable op takes: a CPU int64 tensor holding one value.
inline uint64_t read_seed(const char* op, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(seed.defined() && seed.numel() == 1, op,
                    ": argument 'seed' must be an int64 tensor with one element");
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, op, ": argument 'seed' has dtype ",
                   seed.scalar_type(), ", expected torch.int64");
  TORCH_CHECK(seed.device().is_cpu(), op, ": argument 'seed' must be on the CPU, got ",
              seed.device());
  return static_cast<uint64_t>(seed.item<int64_t>());
}

}  // namespace aiayn
