// Runs the CUDA attention kernels on the host, from the very sources the GPU build compiles: the
// SIMT kernels (attention_simt_kernel.cuh) and the tensor-core kernels (attention_fwd_kernel.cuh,
// attention_bwd_kernel.cuh). A block is 128 std::threads, one per CUDA thread; warp intrinsics
// (__shfl_sync, __shfl_xor_sync, __any_sync, __syncwarp), __syncthreads, cp.async, ldmatrix and
// mma.sync.m16n8k16 are emulated from their PTX ISA definitions (AIAYN_HOST_EMULATION hooks in
// attention_mma.cuh / type_convert.cuh). Used by tests/test_cuda_attention_emulated.py to check the
// kernels against aiayn.reference without a GPU.
//
//   attention_kernels_emulation DIR MODE      MODE = simt (float64) | mma-f16 | mma-bf16
// reads DIR/params.txt and raw float64 arrays q, k, v, grad_out (and mask, key_padding) and writes
// out, lse, grad_q, grad_k, grad_v as float64.
#define AIAYN_HOST_EMULATION 1
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

namespace emu {
constexpr int kThreads = 128;
struct Warp {
  std::barrier<> bar{32};
  double slots[32];
  const void* ptr[32];
  uint32_t a[32][4], b[32][2];
};
thread_local uint3 tid;
thread_local Warp* warp;
thread_local std::barrier<>* block_barrier;
uint3 grid_dim{1, 1, 1};
uint3 block_idx{0, 0, 0};
alignas(16) unsigned char smem[160 * 1024];

template <typename T>
T exchange(T v, int src) {
  warp->slots[tid.x & 31] = static_cast<double>(v);  // float / double / int: exact in double
  warp->bar.arrive_and_wait();
  const T r = static_cast<T>(warp->slots[src & 31]);
  warp->bar.arrive_and_wait();
  return r;
}
}  // namespace emu

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
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

#include "cuda/type_convert.cuh"  // first: its `extern __shared__` declaration must stay extern

#undef __shared__
#define __shared__ static  // one copy per kernel instantiation: shared by the block's threads

#include "cuda/attention_bwd_kernel.cuh"
#include "cuda/attention_fwd_kernel.cuh"
#include "cuda/attention_simt_kernel.cuh"

namespace aiayn::cuda {

unsigned char* emulated_dynamic_smem() { return emu::smem; }

void emulated_cp_async_16(void* dst, const void* src, bool valid) {
  if (valid) std::memcpy(dst, src, 16);
  else std::memset(dst, 0, 16);
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).b16: lane l gives the address of row l % 8 of matrix l / 8
// (8 consecutive b16). Thread t receives in register q the elements (t / 4, 2 (t % 4) + u) of matrix
// q, or (2 (t % 4) + u, t / 4) with .trans; u = 0 in the low half.
void emulated_ldsm_x4(uint32_t (&r)[4], const void* p, bool trans) {
  const int lane = static_cast<int>(emu::tid.x & 31);
  emu::warp->ptr[lane] = p;
  emu::warp->bar.arrive_and_wait();
  for (int q = 0; q < 4; ++q) {
    uint16_t h[2];
    for (int u = 0; u < 2; ++u) {
      const int row = trans ? 2 * (lane % 4) + u : lane / 4;
      const int col = trans ? lane / 4 : 2 * (lane % 4) + u;
      h[u] = static_cast<const uint16_t*>(emu::warp->ptr[8 * q + row])[col];
    }
    r[q] = static_cast<uint32_t>(h[0]) | static_cast<uint32_t>(h[1]) << 16;
  }
  emu::warp->bar.arrive_and_wait();
}

static float b16_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C with the PTX ISA's fragments:
// a_q half u = A(g + 8 (q % 2), 2 t + u + 8 (q / 2)); b_q half u = B(2 t + u + 8 q, g);
// c_e = C(g + 8 (e / 2), 2 t + e % 2); g = lane / 4, t = lane % 4.
void emulated_mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  const int lane = static_cast<int>(emu::tid.x & 31);
  for (int q = 0; q < 4; ++q) emu::warp->a[lane][q] = a[q];
  emu::warp->b[lane][0] = b0;
  emu::warp->b[lane][1] = b1;
  emu::warp->bar.arrive_and_wait();
  auto half_of = [&](uint32_t w, int u) { return b16_to_float(static_cast<uint16_t>(u ? w >> 16 : w & 0xFFFFu), bf16); };
  auto A = [&](int row, int k) {
    return half_of(emu::warp->a[4 * (row % 8) + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k & 1);
  };
  auto B = [&](int k, int n) { return half_of(emu::warp->b[4 * n + (k % 8) / 2][k >= 8], k & 1); };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = lane / 4 + 8 * (e / 2), col = 2 * (lane % 4) + e % 2;
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[e] = d[e] + acc;
  }
  emu::warp->bar.arrive_and_wait();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

}  // namespace aiayn::cuda

using namespace aiayn;
using namespace aiayn::cuda;

// One launch: `blocks` blocks one after the other, each 128 threads in 4 warps.
template <typename F>
void launch(int64_t blocks, F kernel) {
  for (int64_t blk = 0; blk < blocks; ++blk) {
    emu::block_idx = uint3{static_cast<unsigned>(blk), 0, 0};
    emu::grid_dim = uint3{static_cast<unsigned>(blocks), 1, 1};
    std::vector<emu::Warp> warps(emu::kThreads / 32);
    std::barrier<> block_barrier(emu::kThreads);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < static_cast<unsigned>(emu::kThreads); ++t)
      threads.emplace_back([&, t] {
        emu::tid = uint3{t, 0, 0};
        emu::warp = &warps[t / 32];
        emu::block_barrier = &block_barrier;
        kernel();
      });
    for (auto& th : threads) th.join();
  }
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

template <typename S>
static void write(const std::string& path, const std::vector<S>& v) {
  std::vector<double> d(v.size());
  for (size_t i = 0; i < v.size(); ++i) d[i] = static_cast<double>(convert<float>(v[i]));
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(d.data()), static_cast<std::streamsize>(d.size() * sizeof(double)));
}
template <>
void write<double>(const std::string& path, const std::vector<double>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(double)));
}

template <typename T>
static std::vector<T> to(const std::vector<double>& v) {
  std::vector<T> r;
  for (double x : v) r.push_back(convert<T>(x));
  return r;
}

struct Problem {
  int64_t B, H, Lq, Lk, D, mask_kind, mask_shape[4], has_kp, causal, splits, split_keys;
  double scale, dropout_p;
  unsigned long long seed;
};

// T: storage, A: accumulation; MMA: the tensor-core kernels for head dim kD (T half / bf16), else
// the SIMT ones (any head dim).
template <typename T, typename A, int kD, bool MMA>
int run(const std::string& dir, const Problem& pr) {
  const int64_t B = pr.B, H = pr.H, Lq = pr.Lq, Lk = pr.Lk;
  const int64_t D = pr.D;
  const auto q = to<T>(read(dir + "/q", B * H * Lq * D)), k = to<T>(read(dir + "/k", B * H * Lk * D)),
             v = to<T>(read(dir + "/v", B * H * Lk * D)), go = to<T>(read(dir + "/grad_out", B * H * Lq * D));
  std::vector<A> mask;
  std::vector<char> mask_bool;
  if (pr.mask_kind != kAttnMaskNone) {
    for (double x : read(dir + "/mask", pr.mask_shape[0] * pr.mask_shape[1] * pr.mask_shape[2] * pr.mask_shape[3])) {
      mask.push_back(static_cast<A>(x));
      mask_bool.push_back(x != 0.0);
    }
  }
  std::vector<char> kp;
  if (pr.has_kp)
    for (double x : read(dir + "/key_padding", B * Lk)) kp.push_back(x != 0.0);

  AttentionParams p;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  const int64_t qs[3] = {H * Lq * D, Lq * D, D}, ks[3] = {H * Lk * D, Lk * D, D};
  for (int d = 0; d < 3; ++d) p.q_stride[d] = p.grad_out_stride[d] = qs[d], p.k_stride[d] = p.v_stride[d] = ks[d];
  p.batch = B, p.heads = H, p.len_q = Lq, p.len_k = Lk, p.dim = static_cast<int>(pr.D);
  p.scale = pr.scale;
  p.causal = pr.causal != 0;
  p.mask_kind = static_cast<int>(pr.mask_kind);
  if (pr.mask_kind != kAttnMaskNone) {
    p.mask = pr.mask_kind == kAttnMaskBool ? static_cast<const void*>(mask_bool.data()) : mask.data();
    int64_t stride = 1;
    for (int d = 3; d >= 0; --d) {
      p.mask_stride[d] = pr.mask_shape[d] == 1 ? 0 : stride;
      stride *= pr.mask_shape[d];
    }
  }
  if (pr.has_kp) {
    p.key_padding = reinterpret_cast<const bool*>(kp.data());
    p.key_padding_stride[0] = Lk;
    p.key_padding_stride[1] = 1;
  }
  p.dropout = make_dropout_params(pr.dropout_p, pr.seed, 0);
  std::vector<T> out(B * H * Lq * D, convert<T>(-777.0));
  std::vector<A> lse(B * H * Lq, A(-777));
  p.out = out.data();
  p.lse = lse.data();
  p.splits = static_cast<int>(pr.splits);
  p.split_keys = pr.split_keys;
  std::vector<A> part_ml(2 * B * H * Lq * pr.splits), part_o(B * H * Lq * pr.splits * D);
  p.part_ml = part_ml.data();
  p.part_o = part_o.data();
  if constexpr (MMA) {
    launch((Lq + 63) / 64 * B * H, [&] { attention_fwd_mma_kernel<T, kD>(p); });
  } else {
    launch(1, [&] { attention_fwd_simt_kernel<T, A>(p); });
    if (pr.splits > 1) launch(1, [&] { attention_combine_splits_kernel<T, A>(p); });
  }

  std::vector<A> delta(B * H * Lq);
  std::vector<T> gq(B * H * Lq * D, convert<T>(-777.0)), gk(B * H * Lk * D, convert<T>(-777.0)),
      gv(B * H * Lk * D, convert<T>(-777.0));
  p.grad_out = go.data();
  p.out_saved = out.data();
  p.lse_saved = lse.data();
  p.delta = delta.data();
  p.grad_q = gq.data();
  p.grad_k = gk.data();
  p.grad_v = gv.data();
  launch(1, [&] { attention_bwd_prep_kernel<T, A>(p); });
  if constexpr (MMA) {
    launch((Lk + AttnBwdMma::kKeys - 1) / AttnBwdMma::kKeys * B * H, [&] { attention_bwd_dkdv_mma_kernel<T, kD>(p); });
    launch((Lq + AttnBwdMma::kQueries - 1) / AttnBwdMma::kQueries * B * H, [&] { attention_bwd_dq_mma_kernel<T, kD>(p); });
  } else {
    launch(1, [&] { attention_bwd_dq_simt_kernel<T, A>(p); });
    launch(1, [&] { attention_bwd_dkdv_simt_kernel<T, A>(p); });
  }
  write(dir + "/out", out);
  write(dir + "/lse", lse);
  write(dir + "/grad_q", gq);
  write(dir + "/grad_k", gk);
  write(dir + "/grad_v", gv);
  return 0;
}

template <typename T>
int run_mma(const std::string& dir, const Problem& pr) {
  switch (pr.D) {
    case 32: return run<T, float, 32, true>(dir, pr);
    case 64: return run<T, float, 64, true>(dir, pr);
    case 128: return run<T, float, 128, true>(dir, pr);
  }
  std::fprintf(stderr, "the tensor-core kernels take D = 32, 64, 128, not %lld\n", static_cast<long long>(pr.D));
  return 2;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s DIR simt|mma-f16|mma-bf16\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1], mode = argv[2];
  std::ifstream pf(dir + "/params.txt");
  Problem pr;
  pf >> pr.B >> pr.H >> pr.Lq >> pr.Lk >> pr.D >> pr.scale >> pr.causal >> pr.dropout_p >> pr.seed >> pr.mask_kind >>
      pr.mask_shape[0] >> pr.mask_shape[1] >> pr.mask_shape[2] >> pr.mask_shape[3] >> pr.has_kp >> pr.splits >>
      pr.split_keys;
  if (!pf || pr.D > kSimtMaxDim) {
    std::fprintf(stderr, "bad params.txt\n");
    return 2;
  }
  if (mode == "simt") return run<double, double, 0, false>(dir, pr);
  if (mode == "mma-f16") return run_mma<__half>(dir, pr);
  if (mode == "mma-bf16") return run_mma<__nv_bfloat16>(dir, pr);
  std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
  return 2;
}
