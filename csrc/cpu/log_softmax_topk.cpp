// CPU entry point of log_softmax_topk: beam search's scoring of a decoder step (decoding.py), the
// k best next tokens of each hypothesis with their log-probabilities, from the logits in one
// pass per row (log_softmax_topk_kernel.h) instead of log_softmax writing rows x vocabulary
// log-probabilities for topk to read again.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "kernels.h"

namespace aiayn::cpu {

std::tuple<at::Tensor, at::Tensor> log_softmax_topk_cpu(const at::Tensor& logits, int64_t k,
                                                        at::IntArrayRef exclude) {
  constexpr const char* op = "log_softmax_topk";
  check_defined(op, "logits", logits);
  check_dtype_in(op, "logits", logits, {at::kFloat, at::kBFloat16});
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) > 0, op,
                    ": argument 'logits' must have a non-empty last dimension (the vocabulary), got shape ",
                    logits.sizes());
  const int64_t V = logits.size(-1);
  TORCH_CHECK_VALUE(k >= 1 && k <= std::min<int64_t>(V, kLogSoftmaxTopkMaxK), op, ": argument 'k' must be in [1, ",
                    std::min<int64_t>(V, kLogSoftmaxTopkMaxK), "] (at most the vocabulary size and ",
                    kLogSoftmaxTopkMaxK, "), got ", k);
  for (int64_t e : exclude)
    TORCH_CHECK_VALUE(e >= 0 && e < V, op, ": argument 'exclude' holds ", e, ", expected column indices in [0, ",
                      V, ")");
  std::vector<int64_t> out_shape(logits.sizes().begin(), logits.sizes().end());
  out_shape.back() = k;
  at::Tensor x = logits.reshape({-1, V});
  if (x.size(0) > 0 && (x.stride(1) != 1 || x.stride(0) < V)) x = x.contiguous();
  const int64_t rows = x.size(0);
  at::Tensor values = at::empty({rows, k}, logits.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({rows, k}, logits.options().dtype(at::kLong));
  std::vector<int64_t> excluded(exclude.begin(), exclude.end());
  LogSoftmaxTopk a{};
  a.dtype = x.scalar_type() == at::kBFloat16 ? DType::bf16 : DType::f32;
  a.rows = rows;
  a.cols = V;
  a.x = x.data_ptr();
  a.x_stride = rows > 0 ? x.stride(0) : V;
  a.k = static_cast<int>(k);
  a.exclude = excluded.data();
  a.num_exclude = static_cast<int>(excluded.size());
  a.values = values.data_ptr<float>();
  a.indices = indices.data_ptr<int64_t>();
  const KernelTable& kt = kernels();
  // A row is a few microseconds of work per thousand columns: tasks of ~32k columns.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / V);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { kt.log_softmax_topk(a, r0, r1); });
  return {values.view(out_shape), indices.view(out_shape)};
}

TORCH_LIBRARY_IMPL(aiayn, CPU, m) { m.impl("log_softmax_topk", &log_softmax_topk_cpu); }

}  // namespace aiayn::cpu
