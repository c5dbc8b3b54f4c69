// CPU entry point of dropout_mask: the keep-mask that a dropout-capable op draws for a given seed
// (common/dropout.h), as a bool tensor shaped like `like`, element e = row-major index. Tests use
// it to check the ops exactly against their references.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/dropout.h"
#include "kernels.h"

namespace aiayn::cpu {

at::Tensor dropout_mask_cpu(const at::Tensor& like, double p, const at::Tensor& seed) {
  constexpr const char* op = "dropout_mask";
  check_defined(op, "like", like);
  check_probability(op, "p", p);
  check_addressable(op, "like", like, 1);
  at::Tensor mask = at::empty(like.sizes(), like.options().dtype(at::kBool));
  const DropoutParams d = make_dropout_params(p, p > 0.0 ? read_seed(op, seed) : 0, 0);
  const int64_t n = mask.numel();
  bool* out = mask.data_ptr<bool>();
  if (!d.enabled) {
    for (int64_t i = 0; i < n; ++i) out[i] = true;
    return mask;
  }
  const KernelTable& k = kernels();
  constexpr int64_t kBlock = 4096;  // elements per task, a multiple of 64
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    uint64_t bits[kBlock / 64 + 2];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = b * kBlock, e1 = std::min(n, e0 + kBlock);
      k.dropout_keep_bits(d, static_cast<uint64_t>(e0) / 4, (e1 - e0 + 3) / 4, bits);
      for (int64_t e = e0; e < e1; ++e)
        out[e] = ((bits[(e - e0) / 64] >> ((e - e0) % 64)) & 1) && d.scale != 0.0f;
    }
  });
  return mask;
}

TORCH_LIBRARY_IMPL(aiayn, CPU, m) { m.impl("dropout_mask", &dropout_mask_cpu); }

}  // namespace aiayn::cpu
