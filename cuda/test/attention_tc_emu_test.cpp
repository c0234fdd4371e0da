// CPU emulation test of the tensor-core prefill attention kernel: compiles the
// kernel source itself (cuda/src/attention_tc.cuh) with g++ against a small
// emulation of what it uses — 128 std::threads per CTA with real barriers for
// __syncthreads/__syncwarp, shuffles and ballots through per-warp exchange
// slots, WMMA fragments as full 16x16 fp32 tiles (fp16 inputs), fp16 as
// _Float16 — and checks it against a float64 reference on paged caches with
// shuffled block tables, windows, sinks, GQA, F16 and F32 KV, and mixed
// batches (rows the kernel must not take stay untouched). The WMMA emulation
// also checks WMMA's preconditions (32-byte aligned pointers, ldm multiples,
// accesses inside the shared-memory buffer); AddressSanitizer checks the
// global-memory reads.
//
//   g++ -std=c++20 -O1 -g -pthread -fsanitize=address -Wno-unknown-pragmas -Icuda/include
//     -o /tmp/attn_tc_emu cuda/test/attention_tc_emu_test.cpp && /tmp/attn_tc_emu
//
// What it cannot show: timing, real bank conflicts, and the real fragment
// layouts (the kernel never depends on them: fragments only go through
// load/store/mma/fill, which is the documented contract).
#include <algorithm>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>

// ---- emulation of the CUDA surface the kernel uses ----
#define ORCH_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

struct uint4 {
  unsigned x, y, z, w;
};
struct float4 {
  float x, y, z, w;
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
inline float __expf(float x) { return expf(x); }
using std::max;
using std::min;

constexpr int EMU_THREADS = 128; // the kernel's block size
constexpr size_t EMU_SMEM = 256 * 1024;
// The kernel's `extern __shared__ unsigned char smem[]` (declared inside
// namespace attn_tc) names this buffer.
namespace attn_tc {
alignas(128) unsigned char smem[EMU_SMEM];
}
using attn_tc::smem;
size_t g_smem_bytes = 0; // dynamic shared memory of the launch: accesses must stay below

struct EmuWarp {
  std::barrier<> bar{32};
  float f[32];
  unsigned u[32];
};
std::unique_ptr<std::barrier<>> g_cta;
std::unique_ptr<EmuWarp> g_warps[EMU_THREADS / 32];

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
inline unsigned __ballot_sync(unsigned, bool p) {
  EmuWarp &w = emu_warp();
  w.u[emu_lane()] = p;
  w.bar.arrive_and_wait();
  unsigned m = 0;
  for (int i = 0; i < 32; i++) m |= (w.u[i] ? 1u : 0u) << i;
  w.bar.arrive_and_wait();
  return m;
}

#define CHECK(c, ...)                                            \
  do {                                                           \
    if (!(c)) {                                                  \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                         \
      std::fprintf(stderr, "\n");                                \
      std::abort();                                              \
    }                                                            \
  } while (0)

// Pointer p with `count` elements of size sz read/written by a fragment op:
// WMMA needs 256-bit alignment; shared-memory operands must stay inside the
// launch's dynamic shared memory.
static void emu_check_ptr(const void *p, size_t last_byte) {
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
template <class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float> &d, const fragment<matrix_a, 16, 16, 16, __half, LA> &a,
              const fragment<matrix_b, 16, 16, 16, __half, LB> &b, const fragment<accumulator, 16, 16, 16, float> &c) {
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

#include "../src/attention_tc.cuh"

// Runs kernel over the grid, one CTA at a time, EMU_THREADS threads each.
static void emu_launch(dim3 grid, size_t smem_bytes, const std::function<void()> &kernel) {
  CHECK(smem_bytes <= EMU_SMEM, "shared memory %zu", smem_bytes);
  g_smem_bytes = smem_bytes;
  gridDim = grid;
  blockDim = dim3{EMU_THREADS, 1, 1};
  for (unsigned by = 0; by < grid.y; by++)
    for (unsigned bx = 0; bx < grid.x; bx++) {
      std::memset(smem, 0xff, EMU_SMEM); // garbage (NaN floats) like real shared memory
      g_cta = std::make_unique<std::barrier<>>(EMU_THREADS);
      for (auto &w : g_warps) w = std::make_unique<EmuWarp>();
      std::vector<std::thread> th;
      for (int i = 0; i < EMU_THREADS; i++)
        th.emplace_back([&, i] {
          threadIdx = dim3{(unsigned)i, 0, 0};
          blockIdx = dim3{bx, by, 0};
          kernel();
        });
      for (auto &t : th) t.join();
    }
}

// ---- the test ----
struct Seq {
  int hist, n; // cached positions before, new rows (queries) of this batch
};

template <typename KV, int HD>
static void run_case(const char *name, std::mt19937 &rng, std::vector<Seq> seqs, int nh, int nkv, int bs, int window,
                     bool sinks) {
  std::normal_distribution<float> nd(0.f, 1.f);
  int max_len = 0;
  for (auto &s : seqs) max_len = max(max_len, s.hist + s.n);
  const int max_blocks = (max_len + bs - 1) / bs, nseq = (int)seqs.size();
  const int nb = max_blocks * nseq + 3;
  std::vector<int32_t> perm(nb);
  for (int i = 0; i < nb; i++) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> blocks(perm.begin(), perm.begin() + max_blocks * nseq);
  const int64_t slot_stride = (int64_t)nkv * HD;
  // Slots of positions no sequence has written hold NaN (as garbage could):
  // a kernel that reads one into its sums shows it.
  std::vector<KV> kc((size_t)nb * bs * slot_stride), vc(kc.size());
  std::vector<double> kd(kc.size(), NAN), vd(kc.size(), NAN); // exact values the cache holds
  std::vector<bool> written(kc.size());
  for (int s = 0; s < nseq; s++)
    for (int p = 0; p < seqs[s].hist + seqs[s].n; p++) {
      int64_t slot = (int64_t)blocks[s * max_blocks + p / bs] * bs + p % bs;
      for (int64_t j = 0; j < slot_stride; j++) written[slot * slot_stride + j] = true;
    }
  for (size_t i = 0; i < kc.size(); i++) {
    float k = written[i] ? nd(rng) : NAN, v = written[i] ? nd(rng) : NAN;
    if constexpr (sizeof(KV) == 2) {
      kc[i] = __float2half(k);
      vc[i] = __float2half(v);
      kd[i] = __half2float(kc[i]);
      vd[i] = __half2float(vc[i]);
    } else {
      kc[i] = k;
      vc[i] = v;
      kd[i] = k;
      vd[i] = v;
    }
  }
  std::vector<int32_t> tseq, tpos;
  for (int s = 0; s < nseq; s++)
    for (int p = seqs[s].hist; p < seqs[s].hist + seqs[s].n; p++) tseq.push_back(s), tpos.push_back(p);
  const int64_t n_tok = (int64_t)tseq.size();
  const int64_t q_stride = (int64_t)nh * HD + 8; // not the packed stride: as a fused qkv row
  std::vector<float> q(n_tok * q_stride), out(n_tok * nh * HD, NAN), sk(nh);
  for (auto &x : q) x = nd(rng);
  for (auto &x : sk) x = 2 * nd(rng);
  orch_attn_args a{};
  a.out = out.data();
  a.q = q.data();
  a.k_cache = kc.data();
  a.v_cache = vc.data();
  a.tok_seq = tseq.data();
  a.tok_pos = tpos.data();
  a.block_tables = blocks.data();
  a.sinks = sinks ? sk.data() : nullptr;
  a.q_stride = q_stride;
  a.n_tok = n_tok;
  a.max_blocks = max_blocks;
  a.block_size = bs;
  a.n_heads = nh;
  a.n_kv_heads = nkv;
  a.head_dim = HD;
  a.window = window;
  a.kv_dtype = sizeof(KV) == 2 ? ORCH_KV_F16 : ORCH_KV_F32;
  a.scale = 1.f / std::sqrt((float)HD);
  a.max_pos = max_len;

  using namespace attn_tc;
  emu_launch(dim3{(unsigned)((n_tok + TC_BQ - 1) / TC_BQ), (unsigned)nh, 1}, TcLayout<HD>::BYTES,
             [&] { attn_tc_kernel<KV, HD>(a); });

  // Which rows the kernel must take (same rule, computed on the host).
  int taken = 0;
  double num = 0, den = 0, worst = 0;
  for (int64_t t = 0; t < n_tok; t++) {
    const int64_t t0 = t - t % ATTN_TC_ROWS;
    int run = 0;
    while (run < ATTN_TC_ROWS && attn_tc_row_ok(tseq.data(), tpos.data(), n_tok, t0, t0 + run)) run++;
    const bool take = attn_tc_takes(run, (int)(t - t0));
    taken += take;
    const int s = tseq[t], qp = tpos[t];
    for (int h = 0; h < nh; h++) {
      const float *o = &out[(t * nh + h) * HD];
      if (!take) {
        for (int d = 0; d < HD; d++) CHECK(std::isnan(o[d]), "%s: row %ld head %d written but not taken", name, (long)t, h);
        continue;
      }
      const int kvh = h / (nh / nkv);
      const int start = window > 0 ? max(0, qp - window + 1) : 0;
      std::vector<double> sc;
      double mx = sinks ? sk[h] : -INFINITY;
      for (int kp = start; kp <= qp; kp++) {
        int64_t slot = (int64_t)blocks[s * max_blocks + kp / bs] * bs + kp % bs;
        double d = 0;
        for (int e = 0; e < HD; e++) d += (double)q[t * q_stride + h * HD + e] * kd[slot * slot_stride + kvh * HD + e];
        d *= a.scale;
        sc.push_back(d);
        mx = std::max(mx, d);
      }
      double L = sinks ? std::exp(sk[h] - mx) : 0;
      std::vector<double> acc(HD, 0);
      for (int kp = start; kp <= qp; kp++) {
        int64_t slot = (int64_t)blocks[s * max_blocks + kp / bs] * bs + kp % bs;
        double p = std::exp(sc[kp - start] - mx);
        L += p;
        for (int e = 0; e < HD; e++) acc[e] += p * vd[slot * slot_stride + kvh * HD + e];
      }
      double rn = 0, rd = 0;
      for (int d = 0; d < HD; d++) {
        double ref = acc[d] / L;
        CHECK(std::isfinite(o[d]), "%s: row %ld head %d dim %d is %f", name, (long)t, h, d, o[d]);
        rn += (o[d] - ref) * (o[d] - ref);
        rd += ref * ref;
      }
      num += rn;
      den += rd;
      worst = std::max(worst, std::sqrt(rn / std::max(rd, 1e-30)));
    }
  }
  const double rel = std::sqrt(num / std::max(den, 1e-30));
  std::printf("%-44s rows %3ld taken %3d  rel err %.2e  worst row %.2e\n", name, (long)n_tok, taken, rel, worst);
  // fp16 rounding of q, K/V (F32 cache) and P: ~1e-3; a wrong index is O(1).
  CHECK(rel < 3e-3 && worst < 1e-2, "%s: error too large", name);
}

int main() {
  std::mt19937 rng(12345);
  // One prefill chunk after a history: 150 rows = tiles of 64, 64, 22.
  run_case<__half, 64>("hd64 f16 gqa sinks hist37 n150 bs7", rng, {{37, 150}}, 4, 2, 7, 0, true);
  run_case<float, 64>("hd64 f32 gqa window20 n150", rng, {{5, 150}}, 4, 1, 16, 20, false);
  // Mixed batch: a decode row, a chunk of 100, a decode row, a chunk of 30:
  // tile 0 (run 1) and tile 2 (run 4) are not taken; tile 1 takes 37 rows.
  run_case<float, 128>("hd128 f32 mixed window16 sinks", rng, {{5, 1}, {0, 100}, {50, 1}, {10, 30}}, 2, 2, 5, 16,
                       true);
  run_case<__half, 16>("hd16 f16 mixed", rng, {{0, 70}, {3, 1}, {0, 20}}, 4, 2, 16, 0, true);
  run_case<float, 32>("hd32 f32 window8 (gpt-oss-tiny-swa like)", rng, {{0, 40}}, 4, 2, 16, 8, true);
  run_case<__half, 80>("hd80 f16 window 130 long history", rng, {{300, 64}}, 2, 1, 16, 130, false);
  run_case<float, 96>("hd96 f32 mha", rng, {{0, 16}, {0, 15}}, 3, 3, 4, 0, false);
  std::printf("attention_tc_emu_test: ok\n");
  return 0;
}
