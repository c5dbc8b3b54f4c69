// Runs the CUDA SIMT attention kernels (csrc/cuda/attention_simt_kernel.cuh, the very source the GPU
// build compiles) on the host: each block is 128 std::threads, one per CUDA thread, and the warp
// intrinsics (__shfl_sync, __shfl_xor_sync, __any_sync, __syncwarp) are emulated with a barrier per
// warp. Used by tests/test_cuda_attention_emulated.py to check the kernels' semantics (masks, causal,
// dropout numbering, split-K decode, NaN rules, the backward) against aiayn.reference without a GPU.
//
//   attention_simt_emulation DIR
// reads DIR/params.txt and the raw float64 arrays q, k, v, grad_out (and mask, key_padding) and
// writes out, lse, grad_q, grad_k, grad_v (float64).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

namespace emu {
constexpr int kWarpsPerBlock = 4;
struct Warp {
  std::barrier<> bar{32};
  double slots[32];
};
thread_local uint3 tid;
thread_local Warp* warp;
uint3 grid_dim{1, 1, 1};
uint3 block_idx{0, 0, 0};

template <typename T>
T exchange(T v, int src) {
  warp->slots[tid.x & 31] = static_cast<double>(v);  // float / double / int: exact in double
  warp->bar.arrive_and_wait();
  const T r = static_cast<T>(warp->slots[src & 31]);
  warp->bar.arrive_and_wait();
  return r;
}
}  // namespace emu

inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
#include "cuda/type_convert.cuh"  // first: its `extern __shared__` declaration must stay extern

#undef __shared__
#define __shared__ static  // one copy per kernel instantiation: shared by the block's threads
#define __launch_bounds__(...)
#define threadIdx emu::tid
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim
template <typename T>
T __shfl_sync(unsigned, T v, int src) { return emu::exchange(v, src); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) { return emu::exchange(v, static_cast<int>(emu::tid.x & 31) ^ mask); }
inline int __any_sync(unsigned, int pred) {
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= emu::exchange(pred ? 1 : 0, l);
  return any;
}
inline void __syncwarp() { emu::warp->bar.arrive_and_wait(); }

#include "cuda/attention_simt_kernel.cuh"

using namespace aiayn;
using namespace aiayn::cuda;

// One launch: 128 threads in 4 warps, one block; the kernels' grid-stride loops cover every item.
template <typename F>
void launch(F kernel) {
  std::vector<emu::Warp> warps(emu::kWarpsPerBlock);
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < 32u * emu::kWarpsPerBlock; ++t)
    threads.emplace_back([&, t] {
      emu::tid = uint3{t, 0, 0};
      emu::warp = &warps[t / 32];
      kernel();
    });
  for (auto& th : threads) th.join();
}

static std::vector<double> read(const std::string& path, size_t n) {
  std::vector<double> v(n);
  std::ifstream f(path, std::ios::binary);
  if (!f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(double)))) {
    std::fprintf(stderr, "cannot read %zu doubles from %s\n", n, path.c_str());
    std::exit(2);
  }
  return v;
}

static void write(const std::string& path, const std::vector<double>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(double)));
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  std::ifstream pf(dir + "/params.txt");
  int64_t B, H, Lq, Lk, D, mask_kind, mask_shape[4], has_kp, causal, splits, split_keys;
  double scale, dropout_p;
  unsigned long long seed;
  pf >> B >> H >> Lq >> Lk >> D >> scale >> causal >> dropout_p >> seed >> mask_kind >> mask_shape[0] >>
      mask_shape[1] >> mask_shape[2] >> mask_shape[3] >> has_kp >> splits >> split_keys;
  if (!pf) {
    std::fprintf(stderr, "bad params.txt\n");
    return 2;
  }
  const auto q = read(dir + "/q", B * H * Lq * D), k = read(dir + "/k", B * H * Lk * D),
             v = read(dir + "/v", B * H * Lk * D), go = read(dir + "/grad_out", B * H * Lq * D);
  std::vector<double> mask;
  std::vector<char> mask_bool;
  if (mask_kind != kAttnMaskNone) {
    mask = read(dir + "/mask", mask_shape[0] * mask_shape[1] * mask_shape[2] * mask_shape[3]);
    for (double x : mask) mask_bool.push_back(x != 0.0);
  }
  std::vector<char> kp;
  if (has_kp)
    for (double x : read(dir + "/key_padding", B * Lk)) kp.push_back(x != 0.0);

  AttentionParams p;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  const int64_t qs[3] = {H * Lq * D, Lq * D, D}, ks[3] = {H * Lk * D, Lk * D, D};
  for (int d = 0; d < 3; ++d) p.q_stride[d] = p.grad_out_stride[d] = qs[d], p.k_stride[d] = p.v_stride[d] = ks[d];
  p.batch = B, p.heads = H, p.len_q = Lq, p.len_k = Lk, p.dim = static_cast<int>(D);
  p.scale = scale;
  p.causal = causal != 0;
  p.mask_kind = static_cast<int>(mask_kind);
  if (mask_kind != kAttnMaskNone) {
    p.mask = mask_kind == kAttnMaskBool ? static_cast<const void*>(mask_bool.data()) : mask.data();
    int64_t stride = 1;
    for (int d = 3; d >= 0; --d) {
      p.mask_stride[d] = mask_shape[d] == 1 ? 0 : stride;
      stride *= mask_shape[d];
    }
  }
  if (has_kp) {
    p.key_padding = reinterpret_cast<const bool*>(kp.data());
    p.key_padding_stride[0] = Lk;
    p.key_padding_stride[1] = 1;
  }
  p.dropout = make_dropout_params(dropout_p, seed, 0);
  std::vector<double> out(B * H * Lq * D, -777.0), lse(B * H * Lq, -777.0);
  p.out = out.data();
  p.lse = lse.data();
  p.splits = static_cast<int>(splits);
  p.split_keys = split_keys;
  std::vector<double> part_ml(2 * B * H * Lq * splits), part_o(B * H * Lq * splits * D);
  p.part_ml = part_ml.data();
  p.part_o = part_o.data();
  launch([&] { attention_fwd_simt_kernel<double, double>(p); });
  if (splits > 1) launch([&] { attention_combine_splits_kernel<double, double>(p); });

  std::vector<double> delta(B * H * Lq), gq(B * H * Lq * D, -777.0), gk(B * H * Lk * D, -777.0),
      gv(B * H * Lk * D, -777.0);
  p.grad_out = go.data();
  p.out_saved = out.data();
  p.lse_saved = lse.data();
  p.delta = delta.data();
  p.grad_q = gq.data();
  p.grad_k = gk.data();
  p.grad_v = gv.data();
  launch([&] { attention_bwd_prep_kernel<double, double>(p); });
  launch([&] { attention_bwd_dq_simt_kernel<double, double>(p); });
  launch([&] { attention_bwd_dkdv_simt_kernel<double, double>(p); });
  write(dir + "/out", out);
  write(dir + "/lse", lse);
  write(dir + "/grad_q", gq);
  write(dir + "/grad_k", gk);
  write(dir + "/grad_v", gv);
  return 0;
}
