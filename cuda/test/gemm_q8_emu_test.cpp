// CPU emulation test of the raw-Q8_0 prefill GEMM (cuda/src/gemm_q8.cuh,
// ORCH_CUDA_PREFILL=v3): compiles the header with g++ against cuda_emu.h (a
// fiber per CUDA thread, real barriers, mma.sync m16n8k16 and ldmatrix by the
// PTX fragment tables) plus cp.async whose copies land as LATE as the
// kernel's wait_group allows (a stage read before its wait, or a slot reused
// while another warp still reads it, gives wrong numbers). Weights are
// allocated at their exact byte size, so AddressSanitizer catches a copy past
// the tensor's end. The reference applies the kernel's roundings (x scaled by
// a power of two per token row and rounded to fp16, d * q rounded to fp16)
// and sums in float64, so the check is tight (1e-5 of the largest output):
// indexing, ragged tiles, the pipeline, bias / accumulate, the row factors.
//
//   g++ -std=c++20 -O1 -g -fsanitize=address -Wno-unknown-pragmas -Icuda/include \
//     -o /tmp/gq8 cuda/test/gemm_q8_emu_test.cpp && /tmp/gq8
#include <random>

#include "cuda_emu.h"

#define __CUDA_RUNTIME_H__
#define __CUDA_FP16_H__
#define __CUDA_BF16_H__
#define CUBLAS_V2_H_
#define __shared__
#undef __launch_bounds__
#define __launch_bounds__(...)
typedef void *cudaStream_t;
struct uint2 {
  unsigned x, y;
};
typedef void *cublasHandle_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
inline const char *cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

template <class A, class B, class S>
inline uint32_t __funnelshift_rc(A lo, B hi, S s) {
  return (uint32_t)((((uint64_t)(uint32_t)hi << 32) | (uint32_t)lo) >> ((uint32_t)s < 32 ? (uint32_t)s : 32));
}
template <class U = unsigned>
inline unsigned __byte_perm(U x, U y, unsigned s) {
  const uint64_t in = ((uint64_t)(uint32_t)y << 32) | (uint32_t)x;
  unsigned r = 0;
  for (int i = 0; i < 4; i++) {
    const unsigned sel = (s >> (4 * i)) & 15;
    unsigned b = (unsigned)(in >> (8 * (sel & 7))) & 0xff;
    if (sel & 8) b = (b & 0x80) ? 0xff : 0;
    r |= b << (8 * i);
  }
  return r;
}
// fp16 pair arithmetic: the exact result rounded once (as HSUB2 / HMUL2).
template <class H = __half2>
inline H __hsub2(H a, H b) {
  return {{(_Float16)((double)a.x.v - (double)b.x.v)}, {(_Float16)((double)a.y.v - (double)b.y.v)}};
}
template <class H = __half2>
inline H __hmul2(H a, H b) {
  return {{(_Float16)((double)a.x.v * (double)b.x.v)}, {(_Float16)((double)a.y.v * (double)b.y.v)}};
}
inline int __shfl_sync(unsigned m, int v, int src) { return (int)__shfl_sync(m, (long long)v, src); }

// cp.async: per thread, open copies and committed groups; wait_group(N) lands
// every group but the newest N (the latest moment the hardware may).
struct EmuCopy {
  void *dst;
  const void *src;
  int bytes;
};
inline std::vector<EmuCopy> g_open[EMU_MAX_THREADS];
inline std::vector<std::vector<EmuCopy>> g_groups[EMU_MAX_THREADS];
inline unsigned char *gq8_emu_smem() { return attn_tc::smem; }
inline void gq8_emu_cp_async(void *dst, const void *src, int bytes) {
  const unsigned char *d = (const unsigned char *)dst;
  CHECK(d >= attn_tc::smem && d + bytes <= attn_tc::smem + g_smem_bytes, "cp.async destination outside shared memory");
  CHECK(((uintptr_t)dst % bytes) == 0 && ((uintptr_t)src % bytes) == 0, "cp.async %d: unaligned %p <- %p", bytes, dst,
        src);
  g_open[threadIdx.x].push_back({dst, src, bytes});
}
inline void gq8_emu_commit() {
  g_groups[threadIdx.x].push_back(std::move(g_open[threadIdx.x]));
  g_open[threadIdx.x].clear();
}
inline void gq8_emu_wait(int n) {
  auto &gs = g_groups[threadIdx.x];
  while ((int)gs.size() > n) {
    for (const EmuCopy &c : gs.front()) std::memcpy(c.dst, c.src, c.bytes);
    gs.erase(gs.begin());
  }
}

#define warp_sum common_warp_sum
#define warp_max common_warp_max
#include "../src/gemm_q8.cuh"
#undef warp_sum
#undef warp_max

static int fails = 0;

static double h2d(_Float16 h) { return (double)h; }

// One case: random Q8_0 W [m rows of k], x [n, k] with rows of very
// different magnitudes (the per-row factor), optional bias / accumulate.
static void run_case(std::mt19937 &rng, int bm, int n, int k, int m, bool bias, bool acc) {
  const int nb = k / 32;
  const int64_t rb = (int64_t)nb * 34;
  std::vector<uint8_t> wb(rb * m); // exact size: ASan sees any read past the end
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> u01(0.f, 1.f);
  std::vector<double> wv((size_t)m * k);
  for (int r = 0; r < m; r++)
    for (int b = 0; b < nb; b++) {
      uint8_t *p = wb.data() + r * rb + b * 34;
      const _Float16 d = (_Float16)(0.001f + 0.02f * u01(rng));
      std::memcpy(p, &d, 2);
      for (int j = 0; j < 32; j++) {
        const int8_t q = (int8_t)byte(rng);
        p[2 + j] = (uint8_t)q;
        wv[(size_t)r * k + b * 32 + j] = h2d((_Float16)((double)d * q)); // one rounding, as HMUL2
      }
    }
  std::vector<float> x((size_t)n * k), b(m), y((size_t)m * n), y0;
  for (int t = 0; t < n; t++) {
    const float mag = std::ldexp(1.f, (int)(u01(rng) * 40) - 20); // 2^-20 .. 2^20 per row
    for (int i = 0; i < k; i++) x[(size_t)t * k + i] = (2 * u01(rng) - 1) * mag;
  }
  for (auto &v : b) v = 2 * u01(rng) - 1;
  for (auto &v : y) v = acc ? 2 * u01(rng) - 1 : NAN;
  y0 = y;
  // Reference: the kernel's roundings, float64 sums.
  std::vector<double> ref((size_t)m * n);
  double ymax = 0;
  for (int t = 0; t < n; t++) {
    float mx = 0;
    for (int i = 0; i < k; i++) mx = std::max(mx, std::fabs(x[(size_t)t * k + i]));
    int e2 = 0;
    if (mx > 0) std::frexp(mx, &e2);
    const int e = std::min(std::max(e2 - 1, -126), 126);
    const float s = std::ldexp(1.f, -e);
    for (int r = 0; r < m; r++) {
      double sum = 0;
      for (int i = 0; i < k; i++) sum += h2d((_Float16)(x[(size_t)t * k + i] * s)) * wv[(size_t)r * k + i];
      double v = sum * std::ldexp(1.0, e) + (bias ? b[r] : 0.0) + (acc ? y0[(size_t)t * m + r] : 0.0);
      ref[(size_t)t * m + r] = v;
    }
  }
  // Tolerance per token row (rows differ by up to 2^40 in magnitude).
  std::vector<float> xv(x);
  std::vector<unsigned char> scr(gq8::scratch_bytes(n, k) + 256);
  void *sp = (void *)(((uintptr_t)scr.data() + 255) / 256 * 256);
  CHECK(gq8::supported(n, k, m, (uintptr_t)wb.data(), (uintptr_t)xv.data()), "supported");
  gq8::run(nullptr, sp, y.data(), xv.data(), wb.data(), bias ? b.data() : nullptr, n, k, m, rb, acc ? 1 : 0, bm);
  double worst = 0;
  for (int t = 0; t < n; t++) {
    double rmax = 0;
    for (int r = 0; r < m; r++) rmax = std::max(rmax, std::fabs(ref[(size_t)t * m + r]));
    for (int r = 0; r < m; r++) {
      const double g = y[(size_t)t * m + r], want = ref[(size_t)t * m + r];
      const double err = std::fabs(g - want) / std::max(rmax, 1e-30);
      if (!(err <= 1e-5)) {
        if (fails < 10)
          std::fprintf(stderr, "bm=%d n=%d k=%d m=%d bias=%d acc=%d: y[t=%d][r=%d] = %.9g, want %.9g\n", bm, n, k, m,
                       bias, acc, t, r, g, want);
        fails++;
      }
      worst = std::max(worst, std::isnan(err) ? 1.0 : err);
    }
  }
  std::printf("bm=%d n=%d k=%d m=%d bias=%d acc=%d: worst error %.3g of the row's max\n", bm, n, k, m, bias, acc,
              worst);
}

int main() {
  std::mt19937 rng(std::random_device{}());
  // Gates: k % 64 != 0 and unaligned pointers are not taken.
  CHECK(!gq8::supported(4, 96, 8, 0, 0) && !gq8::supported(4, 128, 8, 2, 0) && !gq8::supported(4, 128, 8, 0, 8),
        "supported() gates");
  run_case(rng, 128, 130, 320, 200, true, false); // ragged token and row tiles, 5 stages (slot reuse)
  run_case(rng, 128, 3, 64, 129, false, true);     // one stage; 3 tokens; accumulate
  run_case(rng, 128, 128, 256, 128, true, true);   // exact tiles, 4 stages
  run_case(rng, 256, 40, 256, 300, true, false);   // 256-row tiles (16 warps): ragged, 4 stages
  run_case(rng, 256, 5, 64, 256, false, true);     // one exact row tile, one stage
  run_case(rng, 1, 130, 384, 200, true, false);    // gemm_p: ragged, 6 stages (raw slots reused twice)
  run_case(rng, 1, 3, 64, 129, false, true);       // gemm_p: one stage
  run_case(rng, 1, 17, 128, 128, true, true);      // gemm_p: two stages
  if (fails) {
    std::printf("FAILED: %d elements\n", fails);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
