// cuda_emu.h — a small CPU emulation of the CUDA surface the attention kernels
// use, so that their unmodified source (cuda/src/attention_*.cuh) compiles
// with g++ and runs on a machine without a GPU: one CTA at a time, each CUDA
// thread a cooperative fiber (ucontext) on one OS thread, barriers for
// __syncthreads and __syncwarp that park a fiber until all its peers have
// arrived (so a missing barrier or a divergent one deadlocks and is
// reported), shuffles and ballots through per-warp exchange slots, WMMA
// fragments as whole 16x16 fp32 tiles (fp16 inputs) that check WMMA's
// preconditions (32-byte aligned pointers, ldm multiples, shared-memory
// bounds), fp16 as _Float16. It shows wrong indexing, masking, races on
// barriers and NaN propagation; it cannot show timing, bank conflicts or the
// real (opaque) fragment layouts, which the kernels never depend on.
//
// The including test defines __shared__ before including a kernel header:
// empty for `extern __shared__` dynamic memory (attn_tc::smem below), or
// `static` for kernels with static __shared__ arrays (one CTA at a time, so a
// static local is exactly a CTA's shared array).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#define ORCH_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline dim3 blockIdx, blockDim, gridDim; // one CTA at a time
struct EmuFiber;
inline dim3 emu_thread_idx();
#define threadIdx (emu_thread_idx())

struct uint4 {
  unsigned x, y, z, w;
};
struct float4 {
  float x, y, z, w;
};
struct float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct __half {
  _Float16 v;
};
struct __half2 {
  __half x, y;
};
static_assert(sizeof(__half) == 2 && sizeof(__half2) == 4, "fp16 sizes");
inline __half __float2half(float f) { return {(_Float16)f}; }
inline float __half2float(__half h) { return (float)h.v; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half(a), __float2half(b)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half __ushort_as_half(unsigned short u) {
  __half h;
  std::memcpy(&h, &u, 2);
  return h;
}
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float __expf(float x) { return expf(x); }
using std::max;
using std::min;

#define CHECK(c, ...)                                            \
  do {                                                           \
    if (!(c)) {                                                  \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                         \
      std::fprintf(stderr, "\n");                                \
      std::abort();                                              \
    }                                                            \
  } while (0)

constexpr int EMU_MAX_THREADS = 1024;
constexpr size_t EMU_SMEM = 256 * 1024;
// Dynamic shared memory: the tensor-core kernel's `extern __shared__
// unsigned char smem[]` is declared inside namespace attn_tc.
namespace attn_tc {
alignas(128) inline unsigned char smem[EMU_SMEM];
}
inline size_t g_smem_bytes = 0; // dynamic shared memory of the launch

// Cooperative scheduler: fibers run round-robin; a fiber gives up the CPU
// only at a barrier (emu_yield), so everything between barriers is atomic.
struct EmuFiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  int id = 0;
  bool pdl_waited = false; // called pdl_wait() / cudaGridDependencySynchronize() (see emu_launch_pdl)
};
inline ucontext_t g_sched_ctx;
inline std::vector<EmuFiber> g_fibers;
inline EmuFiber *g_cur = nullptr;
inline const std::function<void()> *g_kernel = nullptr;
inline long g_progress = 0; // barrier arrivals and fiber exits: a round without any is a deadlock
inline void emu_yield() { swapcontext(&g_cur->ctx, &g_sched_ctx); }
inline dim3 emu_thread_idx() { return dim3{(unsigned)g_cur->id, 0, 0}; }

// Barrier of `expected` fibers: the last to arrive opens a new generation.
struct EmuBarrier {
  int expected = 0, arrived = 0;
  unsigned gen = 0;
  explicit EmuBarrier(int n) : expected(n) {}
  void arrive_and_wait() {
    const unsigned g = gen;
    g_progress++;
    if (++arrived == expected) {
      arrived = 0;
      gen++;
      return;
    }
    while (gen == g) emu_yield();
  }
};

struct EmuWarp {
  EmuBarrier bar{32};
  float f[32];
  long long ll[32];
  unsigned u[32];
};
inline std::unique_ptr<EmuBarrier> g_cta;
inline std::unique_ptr<EmuWarp> g_warps[EMU_MAX_THREADS / 32];

inline int emu_lane() { return threadIdx.x & 31; }
inline EmuWarp &emu_warp() { return *g_warps[threadIdx.x >> 5]; }
inline void __syncthreads() { g_cta->arrive_and_wait(); }
inline void __syncwarp() { emu_warp().bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
  EmuWarp &w = emu_warp();
  w.f[emu_lane()] = v;
  w.bar.arrive_and_wait();
  float r = w.f[emu_lane() ^ m];
  w.bar.arrive_and_wait();
  return r;
}
inline float __shfl_sync(unsigned, float v, int src) {
  EmuWarp &w = emu_warp();
  w.f[emu_lane()] = v;
  w.bar.arrive_and_wait();
  float r = w.f[src & 31];
  w.bar.arrive_and_wait();
  return r;
}
inline long long __shfl_sync(unsigned, long long v, int src) {
  EmuWarp &w = emu_warp();
  w.ll[emu_lane()] = v;
  w.bar.arrive_and_wait();
  long long r = w.ll[src & 31];
  w.bar.arrive_and_wait();
  return r;
}
inline long __shfl_sync(unsigned m, long v, int src) { return (long)__shfl_sync(m, (long long)v, src); }
inline unsigned __ballot_sync(unsigned, bool p) {
  EmuWarp &w = emu_warp();
  w.u[emu_lane()] = p;
  w.bar.arrive_and_wait();
  unsigned m = 0;
  for (int i = 0; i < 32; i++) m |= (w.u[i] ? 1u : 0u) << i;
  w.bar.arrive_and_wait();
  return m;
}
inline bool __any_sync(unsigned m, bool p) { return __ballot_sync(m, p) != 0; }
// common.cuh's warp reductions, same butterfly.
inline float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
inline float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// A pointer a fragment op reads or writes (last_byte: offset of its last
// byte): WMMA needs 256-bit alignment; shared-memory operands must stay
// inside the launch's dynamic shared memory.
inline void emu_check_ptr(const void *p, size_t last_byte) {
  using attn_tc::smem;
  CHECK(((uintptr_t)p & 31) == 0, "WMMA pointer %p not 32-byte aligned", p);
  const unsigned char *c = (const unsigned char *)p;
  if (c >= smem && c < smem + EMU_SMEM)
    CHECK(c + last_byte < smem + g_smem_bytes, "WMMA access past dynamic shared memory (%zu >= %zu)",
          (size_t)(c + last_byte - smem), g_smem_bytes);
}

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  float v[16][16];
};
inline float emu_f(float x) { return x; }
inline float emu_f(__half x) { return __half2float(x); }
template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout> &f, const T *p, unsigned ldm) {
  CHECK(ldm % (16 / sizeof(T)) == 0, "ldm %u not a multiple of %zu", ldm, 16 / sizeof(T));
  emu_check_ptr(p, (15 * (size_t)ldm + 16) * sizeof(T) - 1);
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < 16; j++)
      f.v[i][j] = std::is_same<Layout, col_major>::value ? emu_f(p[j * ldm + i]) : emu_f(p[i * ldm + j]);
  __syncwarp(); // collective
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &f, const float *p, unsigned ldm, layout_t l) {
  CHECK(ldm % 4 == 0, "float ldm %u", ldm);
  emu_check_ptr(p, (15 * (size_t)ldm + 16) * 4 - 1);
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < 16; j++) f.v[i][j] = l == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
  __syncwarp();
}
inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f, unsigned ldm, layout_t l) {
  CHECK(ldm % 4 == 0, "float ldm %u", ldm);
  emu_check_ptr(p, (15 * (size_t)ldm + 16) * 4 - 1);
  __syncwarp();
  if (emu_lane() == 0)
    for (int i = 0; i < 16; i++)
      for (int j = 0; j < 16; j++) (l == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.v[i][j];
  __syncwarp();
}
template <class T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T> &f, float x) {
  for (auto &r : f.v)
    for (auto &e : r) e = x;
}
// Any 16-bit input type (fragments hold the values as float): __half here, __nv_bfloat16 where a test adds it.
template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float> &d, const fragment<matrix_a, 16, 16, 16, T, LA> &a,
              const fragment<matrix_b, 16, 16, 16, T, LB> &b, const fragment<accumulator, 16, 16, 16, float> &c) {
  float t[16][16];
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < 16; j++) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; k++) s += a.v[i][k] * b.v[k][j];
      t[i][j] = s;
    }
  std::memcpy(d.v, t, sizeof t);
}
} // namespace wmma
} // namespace nvcuda

// Programmatic dependent launch (common.cuh pdl_wait / pdl_trigger): on the
// CPU every launch runs after the previous one has finished, so waiting is a
// no-op; what the emulation checks is that a kernel launched with PDL
// (emu_launch_pdl) calls the wait in every thread of every CTA — a thread that
// skips it would race with the previous kernel on the GPU.
inline bool g_emu_pdl_required = false;
inline void emu_pdl_wait() { g_cur->pdl_waited = true; }
inline void cudaGridDependencySynchronize() { emu_pdl_wait(); }
inline void cudaTriggerProgrammaticLaunchCompletion() {}

inline void emu_fiber_main() {
  (*g_kernel)();
  CHECK(!g_emu_pdl_required || g_cur->pdl_waited, "PDL-launched kernel: thread %d of CTA (%u,%u,%u) exits without pdl_wait()",
        g_cur->id, blockIdx.x, blockIdx.y, blockIdx.z);
  g_cur->done = true;
  g_progress++;
  swapcontext(&g_cur->ctx, &g_sched_ctx);
}

// Runs kernel over grid (x, y, z), one CTA of `threads` fibers at a time.
// Shared memory starts as NaN-pattern garbage, like real shared memory. A
// CTA whose fibers all wait at barriers that can never open is reported.
inline void emu_launch(dim3 grid, int threads, size_t smem_bytes, const std::function<void()> &kernel) {
  CHECK(smem_bytes <= EMU_SMEM && threads % 32 == 0 && threads <= EMU_MAX_THREADS, "launch config");
  g_smem_bytes = smem_bytes;
  gridDim = grid;
  blockDim = dim3{(unsigned)threads, 1, 1};
  g_kernel = &kernel;
  g_fibers.resize(threads);
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx = 0; bx < grid.x; bx++) {
        std::memset(attn_tc::smem, 0xff, EMU_SMEM);
        blockIdx = dim3{bx, by, bz};
        g_cta = std::make_unique<EmuBarrier>(threads);
        for (int w = 0; w < threads / 32; w++) g_warps[w] = std::make_unique<EmuWarp>();
        for (int i = 0; i < threads; i++) {
          EmuFiber &f = g_fibers[i];
          f.stack.resize(256 * 1024);
          f.done = false;
          f.id = i;
          f.pdl_waited = false;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, emu_fiber_main, 0);
        }
        for (;;) {
          const long before = g_progress;
          int live = 0;
          for (auto &f : g_fibers) {
            if (f.done) continue;
            live++;
            g_cur = &f;
            swapcontext(&g_sched_ctx, &f.ctx);
          }
          if (!live) break;
          CHECK(g_progress != before, "CTA (%u,%u,%u) deadlocks: a barrier not every thread reaches", bx, by, bz);
        }
      }
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 (cuda/src/dec16.cuh
// dec16_mma16816): d += A * B over the whole warp. Every lane deposits its
// fragments; each then computes its own four outputs from the others' by the
// PTX ISA fragment table (lane = 4 * group + tig): A rows group / group+8 in
// a[0],a[2] / a[1],a[3], columns 2tig(+1) in a[0..1] and 2tig+8(+9) in
// a[2..3]; B rows 2tig(+1) in b[0] and 2tig+8(+9) in b[1], column group; D
// rows group / group+8, columns 2tig, 2tig+1. Products and sums in double,
// rounded once to float (the hardware's internal accumulation order is not
// specified; results differ from it by fp32 rounding only).
struct EmuMmaExchange {
  unsigned a[32][4], b[32][2];
};
inline EmuMmaExchange g_emu_mma[EMU_MAX_THREADS / 32];
inline double emu_half_bits(unsigned h) {
  const unsigned short u = (unsigned short)h;
  _Float16 f;
  std::memcpy(&f, &u, 2);
  return (double)f;
}
inline void emu_mma_m16n8k16(float d[4], const unsigned a[4], const unsigned b[2]) {
  EmuMmaExchange &x = g_emu_mma[threadIdx.x >> 5];
  const int lane = emu_lane();
  for (int i = 0; i < 4; i++) x.a[lane][i] = a[i];
  for (int i = 0; i < 2; i++) x.b[lane][i] = b[i];
  emu_warp().bar.arrive_and_wait();
  auto A = [&](int row, int col) { // element A[row][col]
    const int g = row & 7, t = (col & 7) >> 1, reg = (row >> 3) + 2 * (col >> 3);
    return emu_half_bits(x.a[4 * g + t][reg] >> (16 * (col & 1)));
  };
  auto B = [&](int row, int col) { // element B[row][col]
    const int t = (row & 7) >> 1, reg = row >> 3;
    return emu_half_bits(x.b[4 * col + t][reg] >> (16 * (row & 1)));
  };
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; i++) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    double s = d[i];
    for (int kk = 0; kk < 16; kk++) s += A(row, kk) * B(kk, col);
    d[i] = (float)s;
  }
  emu_warp().bar.arrive_and_wait();
}

// emu_launch for a kernel launched with programmatic dependent launch: also
// checks that every thread calls pdl_wait().
inline void emu_launch_pdl(dim3 grid, int threads, size_t smem_bytes, const std::function<void()> &kernel) {
  g_emu_pdl_required = true;
  emu_launch(grid, threads, smem_bytes, kernel);
  g_emu_pdl_required = false;
}
