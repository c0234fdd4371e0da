// CPU emulation test of the tensor-core GEMM (cuda/src/qgemm.cu): compiles the
// whole source file (kernels and the ABI entry points orch_qgemm /
// orch_moe_ffn_grouped) with g++ against cuda_emu.h (a fiber per CUDA thread,
// real barriers, WMMA as whole fp32 tiles) plus the bits qgemm needs on top:
// bf16, funnel shifts, and cp.async whose copies land as LATE as the kernel's
// wait_group allows (so a read of a stage before its wait, or a buffer reused
// while another warp still reads it, shows up as wrong numbers). Weights are
// allocated at their exact byte size, so AddressSanitizer catches a staging
// copy that reads past a tensor's end. The reference rounds x, W and the MoE
// activations to bf16 as the kernel does and sums in float64, so the check is
// tight (1e-4 of the largest output): indexing, masking, ragged edges, the
// gate/up pairing, bucketing and both schedules.
//
//   g++ -std=c++20 -O1 -g -fsanitize=address -Wno-unknown-pragmas -Icuda/include \
//     -o /tmp/qgemm_emu cuda/test/qgemm_emu_test.cpp && /tmp/qgemm_emu [name filter, e.g. "tile=16"]
//
// It cannot show timing, bank conflicts or real fragment layouts (the kernel
// only uses the documented load/store/mma/fill fragment contract).
#include <cstdarg>
#include <random>

#include "cuda_emu.h"

// ---- what qgemm.cu needs beyond cuda_emu.h ----
// The CUDA headers common.cuh includes are replaced by the declarations below.
#define __CUDA_RUNTIME_H__
#define __CUDA_FP16_H__
#define __CUDA_BF16_H__
#define CUBLAS_V2_H_
#define __shared__
#undef __launch_bounds__
#define __launch_bounds__(...) // qgemm passes (threads, min CTAs per SM)
#define __grid_constant__ // MoE GEMM v4's tensor-map parameter (v4 never runs here)
typedef void *cudaStream_t;
typedef void *cublasHandle_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline const char *cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int *d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr, int) { *v = 227 * 1024; return cudaSuccess; }
template <class F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }

// Function shims are templates: should cuda_emu.h grow a plain function of
// the same name and signature, that one is preferred and this does not clash.
template <class U = unsigned short>
inline __half __ushort_as_half(U u) {
  const unsigned short v = (unsigned short)u;
  __half h;
  std::memcpy(&h, &v, 2);
  return h;
}
template <class U = uint32_t>
inline float __uint_as_float(U u) {
  const uint32_t v = (uint32_t)u;
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
template <class T>
T __ldg(const T *p) { return *p; }
template <class A, class B, class S>
inline uint32_t __funnelshift_r(A lo, B hi, S s) {
  return (uint32_t)((((uint64_t)(uint32_t)hi << 32) | (uint32_t)lo) >> ((uint32_t)s & 31));
}
template <class A, class B, class S>
inline uint32_t __funnelshift_rc(A lo, B hi, S s) {
  return (uint32_t)((((uint64_t)(uint32_t)hi << 32) | (uint32_t)lo) >> ((uint32_t)s < 32 ? (uint32_t)s : 32));
}
template <class I>
inline I atomicAdd(I *p, I v) { // fibers switch only at barriers: a plain add is atomic
  const I o = *p;
  *p += v;
  return o;
}

struct __nv_bfloat16 {
  uint16_t x;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
static_assert(sizeof(__nv_bfloat16) == 2 && sizeof(__nv_bfloat162) == 4, "bf16 sizes");
inline __nv_bfloat16 __float2bfloat16_rn(float f) { // round to nearest even (no NaN inputs here)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return {(uint16_t)(u >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline float bf2f(__nv_bfloat16 h) {
  uint32_t u = (uint32_t)h.x << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float emu_f(__nv_bfloat16 h) { return bf2f(h); } // found by ADL from cuda_emu's load_matrix_sync
inline float bf16r(float f) { return bf2f(__float2bfloat16_rn(f)); }
template <class B = __nv_bfloat162>
inline B __hmul2(B a, B b) { // the product of two bf16 rounded to bf16 (exact for the kernel's power-of-two scales)
  return {__float2bfloat16_rn(bf2f(a.x) * bf2f(b.x)), __float2bfloat16_rn(bf2f(a.y) * bf2f(b.y))};
}
// prmt.b32 generic mode: selector nibble i picks byte (s_i & 7) of {y, x};
// its bit 3 replicates that byte's sign bit instead (the kernel masks it off,
// this checks it does).
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


// cp.async: per thread, open copies and committed groups; wait_group(N) lands
// every group but the newest N (the latest moment the hardware may).
struct EmuCopy {
  void *dst;
  const void *src;
  int bytes;
};
inline std::vector<EmuCopy> g_open[EMU_MAX_THREADS];
inline std::vector<std::vector<EmuCopy>> g_groups[EMU_MAX_THREADS];
inline unsigned char *qg_emu_smem() { return attn_tc::smem; }
inline void qg_emu_cp_async(void *dst, const void *src, int bytes) {
  const unsigned char *d = (const unsigned char *)dst;
  CHECK(d >= attn_tc::smem && d + 16 <= attn_tc::smem + g_smem_bytes, "cp.async destination outside shared memory");
  CHECK(((uintptr_t)dst & 15) == 0 && ((uintptr_t)src & 15) == 0, "cp.async 16: unaligned %p <- %p", dst, src);
  CHECK(bytes >= 0 && bytes <= 16, "cp.async src-size %d", bytes);
  g_open[threadIdx.x].push_back({dst, src, bytes});
}
inline void qg_emu_commit() {
  g_groups[threadIdx.x].push_back(std::move(g_open[threadIdx.x]));
  g_open[threadIdx.x].clear();
}
inline void qg_emu_wait(int n) {
  auto &gs = g_groups[threadIdx.x];
  while ((int)gs.size() > n) {
    for (const EmuCopy &c : gs.front()) {
      std::memcpy(c.dst, c.src, c.bytes);
      std::memset((char *)c.dst + c.bytes, 0, 16 - c.bytes);
    }
    gs.erase(gs.begin());
  }
}

// common.cuh's warp reductions are cuda_emu.h's: rename common.cuh's copies.
#define warp_sum common_warp_sum
#define warp_max common_warp_max
#include "../src/qgemm.cu"
#undef warp_sum
#undef warp_max
#include "emu_lib.h"
// The library's other entry point qgemm.cu calls.

extern "C" int orch_moe_combine(orch_ctx *, float *out, const float *y, const float *w, int64_t n, int32_t k, int64_t dim,
                                int32_t accumulate) {
  for (int64_t t = 0; t < n; t++)
    for (int64_t d = 0; d < dim; d++) {
      float s = 0.f;
      for (int j = 0; j < k; j++) s += w[t * k + j] * y[(t * k + j) * dim + d];
      out[t * dim + d] = accumulate ? out[t * dim + d] + s : s;
    }
  return ORCH_OK;
}

// ---- the test ----
static int fails = 0;
static const char *g_filter = ""; // argv[1]: run only the cases whose name contains it

static float half_to_float(uint16_t h) { return __half2float(__ushort_as_half((unsigned short)h)); }
static uint16_t float_to_half(float f) {
  __half h = __float2half(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

// Random valid GGUF rows (rows of k) of type t and their dequantized values.
struct QW {
  std::vector<uint8_t> bytes;
  std::vector<float> val; // rows x k
};
static int g_mx_emin = 124, g_mx_emax = 128; // E8M0 scale bytes of make_weight's MXFP4 blocks

static QW make_weight(std::mt19937 &rng, int t, int k, int rows) {
  const int64_t rb = orch_row_bytes(t, k);
  QW w;
  w.bytes.resize(rb * rows);
  w.val.resize((size_t)k * rows);
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto &b : w.bytes) b = (uint8_t)byte(rng);
  const int bb = type_block_bytes(t);
  std::uniform_real_distribution<float> u01(0.f, 1.f);
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < k / 32; c++) {
      uint8_t *b = w.bytes.data() + r * rb + c * bb;
      float *v = w.val.data() + (size_t)r * k + 32 * c;
      if (t == ORCH_T_Q8_0) {
        const uint16_t d = float_to_half(0.01f + 0.02f * u01(rng));
        std::memcpy(b, &d, 2);
        for (int j = 0; j < 32; j++) v[j] = half_to_float(d) * (float)(int8_t)b[2 + j];
      } else if (t == ORCH_T_Q4_0) {
        const uint16_t d = float_to_half(0.05f + 0.2f * u01(rng));
        std::memcpy(b, &d, 2);
        for (int j = 0; j < 16; j++) {
          v[j] = half_to_float(d) * (float)((b[2 + j] & 15) - 8);
          v[j + 16] = half_to_float(d) * (float)((b[2 + j] >> 4) - 8);
        }
      } else { // MXFP4
        b[0] = (uint8_t)(g_mx_emin + byte(rng) % (g_mx_emax - g_mx_emin + 1));
        const float d = std::ldexp(1.f, (int)b[0] - 127);
        static const float e2m1[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
        for (int j = 0; j < 16; j++) {
          v[j] = d * e2m1[b[1 + j] & 15];
          v[j + 16] = d * e2m1[b[1 + j] >> 4];
        }
      }
    }
  return w;
}

// A device-like buffer of exactly the data's size (malloc is 16-byte aligned
// here), so that AddressSanitizer reports any read past its end.
struct ExactBuf {
  uint8_t *p;
  explicit ExactBuf(const std::vector<uint8_t> &data) {
    p = (uint8_t *)std::malloc(data.size());
    CHECK(((uintptr_t)p & 15) == 0, "malloc alignment");
    std::memcpy(p, data.data(), data.size());
  }
  ~ExactBuf() { std::free(p); }
  ExactBuf(const ExactBuf &) = delete;
};

static void check(const char *name, const std::vector<float> &got, const std::vector<double> &want) {
  double mx = 0, err = 0;
  for (size_t i = 0; i < want.size(); i++) mx = std::max(mx, std::fabs(want[i]));
  for (size_t i = 0; i < want.size(); i++) {
    if (!std::isfinite(got[i])) {
      std::printf("FAIL %s: element %zu is %g (reference %g)\n", name, i, got[i], want[i]);
      fails++;
      return;
    }
    err = std::max(err, std::fabs(got[i] - want[i]));
  }
  const bool ok = err <= 1e-4 * std::max(mx, 1e-6);
  std::printf("%s %s: max abs err %.3g of max |y| %.3g\n", ok ? "ok  " : "FAIL", name, err, mx);
  if (!ok) fails++;
}

static const char *tname(int t) { return t == ORCH_T_Q8_0 ? "Q8_0" : t == ORCH_T_Q4_0 ? "Q4_0" : "MXFP4"; }

static void test_dense(std::mt19937 &rng, int t, int k, int m, int n, int tile, bool bias, bool acc) {
  char name[160];
  std::snprintf(name, sizeof name, "qgemm %s k=%d m=%d n=%d tile=%d bias=%d acc=%d", tname(t), k, m, n, tile, bias, acc);
  if (!std::strstr(name, g_filter)) return;
  std::normal_distribution<float> nd(0.f, 1.f);
  QW w = make_weight(rng, t, k, m);
  ExactBuf wd(w.bytes);
  std::vector<float> x((size_t)n * k), b(m), y((size_t)n * m);
  for (auto &v : x) v = nd(rng);
  for (auto &v : b) v = nd(rng);
  for (auto &v : y) v = acc ? nd(rng) : NAN;
  std::vector<double> want((size_t)n * m);
  for (int i = 0; i < n; i++)
    for (int r = 0; r < m; r++) {
      double s = 0;
      for (int c = 0; c < k; c++) s += (double)bf16r(x[(size_t)i * k + c]) * bf16r(w.val[(size_t)r * k + c]);
      want[(size_t)i * m + r] = s + (bias ? b[r] : 0) + (acc ? y[(size_t)i * m + r] : 0);
    }
  std::vector<uint8_t> xbf((size_t)n * k * 2 + 16);
  uint8_t *xb = (uint8_t *)(((uintptr_t)xbf.data() + 15) & ~(uintptr_t)15);
  orch_ctx ctx;
  const int rc = orch_qgemm(&ctx, y.data(), x.data(), wd.p, t, bias ? b.data() : nullptr, n, k, m, acc, xb, tile);
  if (rc != ORCH_OK) {
    std::printf("FAIL %s: rc %d: %s\n", name, rc, g_err);
    fails++;
    return;
  }
  check(name, y, want);
}

static void test_moe(std::mt19937 &rng, int gt, int dt, int n, int k, int ne, int dim, int ff, int tile,
                     const char *routing, bool bias) {
  char name[200];
  std::snprintf(name, sizeof name, "moe %s+%s n=%d k=%d experts=%d dim=%d ff=%d tile=%d %s bias=%d", tname(gt),
                tname(dt), n, k, ne, dim, ff, tile, routing, bias);
  if (!std::strstr(name, g_filter)) return;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> u01(0.f, 1.f);
  QW g = make_weight(rng, gt, dim, ff * ne), u = make_weight(rng, gt, dim, ff * ne), d = make_weight(rng, dt, ff, dim * ne);
  ExactBuf gd(g.bytes), ud(u.bytes), dd(d.bytes);
  std::vector<float> x((size_t)n * dim), gb(ff * ne), ub(ff * ne), db(dim * ne), wts(n * k), out((size_t)n * dim, NAN);
  for (auto &v : x) v = nd(rng);
  for (auto &v : gb) v = nd(rng);
  for (auto &v : ub) v = nd(rng);
  for (auto &v : db) v = nd(rng);
  for (auto &v : wts) v = u01(rng);
  std::vector<int32_t> ids(n * k);
  for (int t = 0; t < n; t++) {
    std::vector<int> perm(ne);
    for (int e = 0; e < ne; e++) perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int s = 0; s < k; s++) {
      int e = perm[s];
      if (!std::strcmp(routing, "one")) e = s; // every token on experts 0..k-1
      if (!std::strcmp(routing, "skew") && s == 0) e = ne - 1; // one hot expert ...
      if (!std::strcmp(routing, "skew") && s > 0) e = perm[s] == ne - 1 ? perm[k] : perm[s]; // ... distinct others
      ids[t * k + s] = e;
    }
  }
  const float alpha = 1.702f, limit = 7.f;
  std::vector<double> want((size_t)n * dim, 0.0);
  std::vector<float> act(ff);
  for (int t = 0; t < n; t++)
    for (int s = 0; s < k; s++) {
      const int e = ids[t * k + s];
      for (int f = 0; f < ff; f++) {
        double gv = 0, uv = 0;
        for (int c = 0; c < dim; c++) {
          const double xv = bf16r(x[(size_t)t * dim + c]);
          gv += xv * bf16r(g.val[((size_t)e * ff + f) * dim + c]);
          uv += xv * bf16r(u.val[((size_t)e * ff + f) * dim + c]);
        }
        if (bias) {
          gv += gb[e * ff + f];
          uv += ub[e * ff + f];
        }
        gv = std::min(gv, (double)limit);
        uv = std::min(std::max(uv, (double)-limit), (double)limit);
        act[f] = bf16r((float)((uv + 1) * gv / (1 + std::exp(-alpha * gv))));
      }
      for (int o = 0; o < dim; o++) {
        double v = 0;
        for (int f = 0; f < ff; f++) v += (double)act[f] * bf16r(d.val[((size_t)e * dim + o) * ff + f]);
        if (bias) v += db[e * dim + o];
        want[(size_t)t * dim + o] += wts[t * k + s] * v;
      }
    }
  const int64_t P = (int64_t)n * k;
  std::vector<uint8_t> scratch(P * dim * 2 + P * ff * 2 + P * dim * 4 + orch_moe_route_ints(P, ne) * 4 + 64);
  uint8_t *base = (uint8_t *)(((uintptr_t)scratch.data() + 15) & ~(uintptr_t)15);
  uint8_t *xg = base, *actb = xg + ((P * dim * 2 + 15) & ~15ll), *yb = actb + ((P * ff * 2 + 15) & ~15ll);
  uint8_t *route = yb + P * dim * 4;
  orch_ctx ctx;
  const int rc = orch_moe_ffn_grouped(&ctx, out.data(), x.data(), ids.data(), wts.data(), gd.p, ud.p, gt,
                                      bias ? gb.data() : nullptr, bias ? ub.data() : nullptr, dd.p, dt,
                                      bias ? db.data() : nullptr, n, k, ne, dim, ff, alpha, limit, xg, actb,
                                      (float *)yb, (int32_t *)route, tile);
  if (rc != ORCH_OK) {
    std::printf("FAIL %s: rc %d: %s\n", name, rc, g_err);
    fails++;
    return;
  }
  check(name, out, want);
}

int main(int argc, char **argv) {
  if (argc > 1) g_filter = argv[1];
  std::mt19937 rng(20261125);
  // Dense: k = 96 (3 blocks: a partial stage for every KB), m = 40 and n = 19
  // ragged against every tile; both schedules; bias and accumulate.
  for (int t : {ORCH_T_Q8_0, ORCH_T_MXFP4, ORCH_T_Q4_0})
    for (int tile : {1, 2, 3, 4, 5, 9, 12, 13}) test_dense(rng, t, 96, 40, 19, tile, true, tile == 2);
  test_dense(rng, ORCH_T_MXFP4, 288, 70, 33, 0, false, false); // several stages, auto tile (M), 2 token tiles
  test_dense(rng, ORCH_T_Q8_0, 32, 17, 5, 0, true, true);      // one block, tiny
  g_mx_emin = 100, g_mx_emax = 140; // MXFP4 scales 2^-27 .. 2^13: the table path's multiply stays exact
  test_dense(rng, ORCH_T_MXFP4, 128, 24, 17, 2, false, false);
  g_mx_emin = 124, g_mx_emax = 128;
  // Grouped MoE: ragged pairs, experts with no pairs, one hot expert.
  for (const char *routing : {"uniform", "skew", "one"})
    for (int tile : {1, 2, 3, 5}) test_moe(rng, ORCH_T_MXFP4, ORCH_T_MXFP4, 13, 4, 6, 64, 96, tile, routing, true);
  // ~65 pairs per expert, by shape: MXFP4 takes v3 (ORCH_CUDA_MOEGEMM unset), tile 17
  test_moe(rng, ORCH_T_MXFP4, ORCH_T_MXFP4, 130, 4, 8, 64, 64, 0, "uniform", true);
  test_moe(rng, ORCH_T_Q8_0, ORCH_T_MXFP4, 21, 2, 5, 96, 64, 0, "uniform", false);
  test_moe(rng, ORCH_T_Q4_0, ORCH_T_Q8_0, 7, 3, 4, 64, 64, 1, "skew", true);
  // v3 (moe_gemm.cuh: MXFP4 decoded into mma A fragments, ldmatrix B, by
  // the PTX fragment tables), tile 17 (96 pairs a tile): k = 96 (a partial
  // stage), m below one CTA's rows, ragged pair counts (n-blocks skipped),
  // empty experts, one expert over two tiles (130 tokens on 5 experts: ~104
  // each), no biases; a Q8_0 call asking for 17 (v1's tiles take it).
  for (const char *routing : {"uniform", "skew", "one"})
    test_moe(rng, ORCH_T_MXFP4, ORCH_T_MXFP4, 13, 4, 6, 96, 96, 17, routing, true);
  test_moe(rng, ORCH_T_MXFP4, ORCH_T_MXFP4, 130, 4, 5, 64, 64, 17, "uniform", false);
  test_moe(rng, ORCH_T_MXFP4, ORCH_T_MXFP4, 60, 3, 3, 64, 32, 17, "one", true);
  test_moe(rng, ORCH_T_Q8_0, ORCH_T_MXFP4, 9, 2, 5, 64, 64, 17, "uniform", false);
  // Several CTA columns (r0 > 0, the last one partial) for gate_up (ff 224)
  // and down (dim 416), k of 13 and 7 blocks (7 and 4 stages over 4 buffers).
  test_moe(rng, ORCH_T_MXFP4, ORCH_T_MXFP4, 9, 2, 2, 416, 224, 17, "uniform", true);
  // Tile 19 (64 pairs a tile): the hot expert (13 pairs) and 105 pairs over
  // 4 experts (two tiles each, the second with 41).
  test_moe(rng, ORCH_T_MXFP4, ORCH_T_MXFP4, 13, 4, 6, 96, 96, 19, "skew", true);
  test_moe(rng, ORCH_T_MXFP4, ORCH_T_MXFP4, 105, 4, 4, 64, 64, 19, "uniform", false);
  if (fails) {
    std::printf("qgemm_emu_test: %d failures\n", fails);
    return 1;
  }
  std::printf("qgemm_emu_test: ok\n");
  return 0;
}
