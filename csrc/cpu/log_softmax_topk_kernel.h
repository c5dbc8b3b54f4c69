// Beam search's scoring of one decoder step (log_softmax_topk.cpp): for each row of logits, the k
// largest log-probabilities log_softmax(x)_j = (x_j - max) - log(sum_i exp(x_i - max)) and their
// indices, without writing the row's log-probabilities. Two passes over a row that stays in L1/L2:
// the max, then the sum of exponentials with the top-k selection beside it. Most 4-vector blocks
// are below the current k-th value (one reduce_max compare); only the others are scanned.
// Included by isa/kernels.inc inside each ISA namespace (after its Vec).

inline float log_softmax_topk_load(float v) { return v; }
inline float log_softmax_topk_load(uint16_t v) { return bf16_to_float(v); }

inline void log_softmax_topk_insert(float v, int64_t j, int k, int& count, float* tv, int64_t* ti,
                                    const LogSoftmaxTopk& a) {
  for (int e = 0; e < a.num_exclude; ++e)
    if (a.exclude[e] == j) return;
  int pos = count < k ? count++ : k - 1;
  // Equal values keep the earlier index first (ascending scan order).
  while (pos > 0 && tv[pos - 1] < v) {
    tv[pos] = tv[pos - 1];
    ti[pos] = ti[pos - 1];
    --pos;
  }
  tv[pos] = v;
  ti[pos] = j;
}

template <typename T>
inline void log_softmax_topk_row(const LogSoftmaxTopk& a, const T* x, float* out_v, int64_t* out_i) {
  const int64_t V = a.cols;
  const int k = a.k;
  constexpr int N = Vec::N;
  constexpr int64_t kBlock = 4 * N;
  const float ninf = -std::numeric_limits<float>::infinity();
  float m = ninf;
  int64_t j = 0;
  {
    Vec m0 = Vec::set1(ninf), m1 = m0, m2 = m0, m3 = m0;
    for (; j + kBlock <= V; j += kBlock) {
      m0 = Vec::max(m0, Vec::load(x + j));
      m1 = Vec::max(m1, Vec::load(x + j + N));
      m2 = Vec::max(m2, Vec::load(x + j + 2 * N));
      m3 = Vec::max(m3, Vec::load(x + j + 3 * N));
    }
    m = Vec::max(Vec::max(m0, m1), Vec::max(m2, m3)).reduce_max();
    for (; j < V; ++j) { const float v = log_softmax_topk_load(x[j]); m = v > m ? v : m; }
  }
  float tv[kLogSoftmaxTopkMaxK];
  int64_t ti[kLogSoftmaxTopkMaxK];
  int count = 0;
  float threshold = ninf;  // a value enters the top k only if above this
  const Vec vm = Vec::set1(m), log2e = Vec::set1(1.4426950408889634f);
  Vec s0 = Vec::zero(), s1 = s0, s2 = s0, s3 = s0;
  j = 0;
  for (; j + kBlock <= V; j += kBlock) {
    const Vec x0 = Vec::load(x + j), x1 = Vec::load(x + j + N), x2 = Vec::load(x + j + 2 * N),
              x3 = Vec::load(x + j + 3 * N);
    s0 = s0 + Vec::exp2((x0 - vm) * log2e);
    s1 = s1 + Vec::exp2((x1 - vm) * log2e);
    s2 = s2 + Vec::exp2((x2 - vm) * log2e);
    s3 = s3 + Vec::exp2((x3 - vm) * log2e);
    if (Vec::max(Vec::max(x0, x1), Vec::max(x2, x3)).reduce_max() > threshold) {
      for (int64_t i = j; i < j + kBlock; ++i) {
        const float v = log_softmax_topk_load(x[i]);
        if (v > threshold) {
          log_softmax_topk_insert(v, i, k, count, tv, ti, a);
          if (count == k) threshold = tv[k - 1];
        }
      }
    }
  }
  float sum = ((s0 + s1) + (s2 + s3)).reduce_add();
  for (; j < V; ++j) {
    const float v = log_softmax_topk_load(x[j]);
    sum += std::exp2((v - m) * 1.4426950408889634f);
    if (v > threshold) {
      log_softmax_topk_insert(v, j, k, count, tv, ti, a);
      if (count == k) threshold = tv[k - 1];
    }
  }
  const float log_sum = static_cast<float>(std::log(static_cast<double>(sum)));
  for (int s = 0; s < k; ++s) {
    if (s < count && m != ninf) {
      out_v[s] = (tv[s] - m) - log_sum;
      out_i[s] = ti[s];
    } else {  // fewer than k finite, non-excluded logits
      out_v[s] = ninf;
      out_i[s] = -1;
    }
  }
}

inline void log_softmax_topk(const LogSoftmaxTopk& a, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* v = a.values + r * a.k;
    int64_t* i = a.indices + r * a.k;
    if (a.dtype == DType::bf16)
      log_softmax_topk_row(a, static_cast<const uint16_t*>(a.x) + r * a.x_stride, v, i);
    else
      log_softmax_topk_row(a, static_cast<const float*>(a.x) + r * a.x_stride, v, i);
  }
}
