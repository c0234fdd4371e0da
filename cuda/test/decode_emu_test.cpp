// CPU emulation test of the decode kernels with the fp16 decode: the fused
// MoE FFN (cuda/src/moe_ffn.cu, compiled whole: v2 fp32, v3 fp16, v4
// double-buffered down, v5 + one-wave double-buffered gate_up) and GEMV v5 / v6 (cuda/src/gemv16.cuh), run on the CPU
// through cuda/test/cuda_emu.h (a fiber per CUDA thread, real barriers and
// shuffles, shared memory starting as garbage). dec16.cuh's arithmetic runs
// its host fallbacks (the PTX semantics it emulates are tested exhaustively by
// dec16_test.cu). Checks: every output against a float64 reference from the
// dequantized weights (1e-4 for the fp32 kernels, the GPU suite's fp16 bounds
// for the others), MoE v5 == v4 == v3 and GEMV v6 == v5 bit for bit (same per-lane
// summation order, different schedule), ragged row counts, several rounds of
// blocks per lane, token tiles 1/2/4/8, bias and accumulate, and — with
// weights allocated at their exact size under AddressSanitizer — no read past
// a tensor's end.
//
//   g++ -std=c++20 -O1 -g -fsanitize=address -Wno-unknown-pragmas -Icuda/include \
//     -o /tmp/decode_emu cuda/test/decode_emu_test.cpp && /tmp/decode_emu
#include <cstdarg>
#include <random>

#include "cuda_emu.h"

#include "emu_decode_shims.h"
// moe_ffn.cu's MoE v7 / v8 routing (moe_route.cuh) needs these too (as moe_emu_test.cpp).
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __shfl_xor_sync(unsigned m, int v, int o) { return (int)__shfl_xor_sync(m, (unsigned)v, o); }
inline int __shfl_sync(unsigned m, int v, int src) { return (int)__shfl_sync(m, (long long)v, src); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

// cp.async for GEMV v9: per thread, open copies and committed groups;
// wait_group(N) lands every group but the newest N (the latest moment the
// hardware may), so a missing wait or barrier reads the garbage of emu_launch.
struct EmuCopy {
  void *dst;
  const void *src;
  int bytes;
};
inline std::vector<EmuCopy> g_open[EMU_MAX_THREADS];
inline std::vector<std::vector<EmuCopy>> g_groups[EMU_MAX_THREADS];
inline void gemv9_emu_cp_async(void *dst, const void *src, int bytes) {
  const unsigned char *d = (const unsigned char *)dst;
  CHECK(d >= attn_tc::smem && d + 16 <= attn_tc::smem + g_smem_bytes, "cp.async destination outside shared memory");
  CHECK(((uintptr_t)dst & 15) == 0 && ((uintptr_t)src & 15) == 0, "cp.async 16: unaligned %p <- %p", dst, src);
  CHECK(bytes > 0 && bytes <= 16, "cp.async src-size %d", bytes);
  g_open[threadIdx.x].push_back({dst, src, bytes});
}
inline void gemv9_emu_commit() {
  g_groups[threadIdx.x].push_back(std::move(g_open[threadIdx.x]));
  g_open[threadIdx.x].clear();
}
inline void gemv9_emu_wait(int n) {
  auto &gs = g_groups[threadIdx.x];
  while ((int)gs.size() > n) {
    for (const EmuCopy &c : gs.front()) {
      std::memcpy(c.dst, c.src, (size_t)c.bytes);
      std::memset((char *)c.dst + c.bytes, 0, (size_t)(16 - c.bytes));
    }
    gs.erase(gs.begin());
  }
}
#define GEMV9_EMU_CP_ASYNC 1

inline float rsqrtf(float v) { return 1.f / std::sqrt(v); } // the device's approximate rsqrt: any function, the same in both kernels
// rope.cuh's explicit roundings (as attention_emu_test.cpp): one fma, one product.
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }

#define warp_sum common_warp_sum
#define warp_max common_warp_max
#include "../src/moe_ffn.cu"
#include "../src/moe.cu" // orch_moe_topk / orch_moe_combine, which moe_ffn.cu's v8 entry calls (as moe_emu_test.cpp)
#include "../src/gemv16.cuh"
#include "../src/rope.cu"
// norm.cu's kernels use a static __shared__ array: one CTA at a time, so a
// static local is exactly the CTA's array (cuda_emu.h).
#undef __shared__
#define __shared__ static
#include "../src/norm.cu"
#undef __shared__
#define __shared__
#undef warp_sum
#undef warp_max
#include "emu_lib.h"


// ---- the test ----
#include "quant_test_util.h"

static void test_moe(int t, int64_t dim, int64_t ff, int ne, int topk, int n) {
  QW gate, up, down;
  make_weight(gate, t, dim, ff * ne);
  make_weight(up, t, dim, ff * ne);
  make_weight(down, t, ff, dim * ne);
  const auto x = randv((size_t)(n * dim), 1.f), gbv = randv((size_t)(ff * ne), 1.f), ubv = randv((size_t)(ff * ne), 1.f),
             dbv = randv((size_t)(dim * ne), 1.f);
  std::vector<int32_t> idv((size_t)(n * topk));
  std::vector<float> wv((size_t)(n * topk));
  for (int i = 0; i < n; i++) {
    std::vector<int> e(ne);
    for (int j = 0; j < ne; j++) e[j] = j;
    std::shuffle(e.begin(), e.end(), rng);
    for (int s = 0; s < topk; s++) {
      idv[(size_t)(i * topk + s)] = e[s];
      wv[(size_t)(i * topk + s)] = 0.1f + (rng() % 1000) / 1000.f;
    }
  }
  const float alpha = 1.702f, limit = 7.f;
  std::vector<double> want((size_t)(n * dim), 0.0);
  for (int i = 0; i < n; i++)
    for (int s = 0; s < topk; s++) {
      const int e = idv[(size_t)(i * topk + s)];
      std::vector<double> act((size_t)ff);
      for (int64_t r = 0; r < ff; r++) {
        double g = gbv[(size_t)(e * ff + r)], u = ubv[(size_t)(e * ff + r)];
        for (int64_t c = 0; c < dim; c++) {
          g += gate.val[(size_t)((e * ff + r) * dim + c)] * x[(size_t)(i * dim + c)];
          u += up.val[(size_t)((e * ff + r) * dim + c)] * x[(size_t)(i * dim + c)];
        }
        act[(size_t)r] = swiglu(g, u, alpha, limit);
      }
      for (int64_t r = 0; r < dim; r++) {
        double y = dbv[(size_t)(e * dim + r)];
        for (int64_t c = 0; c < ff; c++) y += down.val[(size_t)((e * dim + r) * ff + c)] * act[(size_t)c];
        want[(size_t)(i * dim + r)] += wv[(size_t)(i * topk + s)] * y;
      }
    }
  std::vector<float> outs[6];
  for (int ver = 2; ver <= 5; ver++) {
    orch_ctx ctx;
    ctx.moe = ver;
    Buf<float> bx(x), bgb(gbv), bub(ubv), bdb(dbv), bw(wv), out((size_t)(n * dim), NAN),
        act((size_t)(n * topk * ff), NAN);
    Buf<int32_t> bid(idv);
    const int rc = orch_moe_ffn(&ctx, out.p, bx.p, bid.p, bw.p, gate.bytes, up.bytes, t, bgb.p, bub.p, down.bytes, t,
                                bdb.p, act.p, n, topk, dim, ff, alpha, limit);
    EXPECT(rc == ORCH_OK, "moe_ffn rc %d (%s)", rc, g_err);
    outs[ver] = out.vec();
    const double e = rel_l2(outs[ver], want), tol = ver == 2 ? 1e-4 : 6e-3;
    EXPECT(e <= tol, "MoE v%d %s dim=%lld ff=%lld top-%d n=%d: relative error %.3g > %.3g", ver, tname(t),
           (long long)dim, (long long)ff, topk, n, e, tol);
    std::printf("MoE v%d %-5s dim=%-4lld ff=%-4lld top-%d n=%d: relative error %.2e\n", ver, tname(t), (long long)dim,
                (long long)ff, topk, n, e);
  }
  EXPECT(std::memcmp(outs[3].data(), outs[4].data(), outs[3].size() * 4) == 0, "MoE v4 != v3 (%s)", tname(t));
  EXPECT(std::memcmp(outs[3].data(), outs[5].data(), outs[3].size() * 4) == 0, "MoE v5 != v3 (%s)", tname(t));
}

static void test_gemv(int t, int64_t k, int64_t m, int n, bool bias, bool accumulate) {
  QW w;
  make_weight(w, t, k, m);
  const auto x = randv((size_t)(n * k), 1.f), bv = randv((size_t)m, 1.f), y0 = randv((size_t)(n * m), 1.f);
  std::vector<double> want((size_t)(n * m));
  for (int j = 0; j < n; j++)
    for (int64_t r = 0; r < m; r++) {
      double s = (bias ? bv[(size_t)r] : 0.0) + (accumulate ? y0[(size_t)(j * m + r)] : 0.0);
      for (int64_t c = 0; c < k; c++) s += w.val[(size_t)(r * k + c)] * x[(size_t)(j * k + c)];
      want[(size_t)(j * m + r)] = s;
    }
  std::vector<float> got[2];
  for (int v = 0; v < 2; v++) {
    Buf<float> bx(x), bb(bv), y(y0);
    const int64_t rb = orch_row_bytes(t, k);
    if (v == 0) ORCH_DISPATCH_TYPE(t, launch_gemv5, nullptr, y.p, bx.p, w.bytes, bias ? bb.p : nullptr, n, k, m, rb, accumulate)
    else ORCH_DISPATCH_TYPE(t, launch_gemv6, nullptr, y.p, bx.p, w.bytes, bias ? bb.p : nullptr, n, k, m, rb, accumulate)
    got[v] = y.vec();
    const double e = rel_l2(got[v], want);
    EXPECT(e <= 1.5e-3, "GEMV v%d %s k=%lld m=%lld n=%d: relative error %.3g", 5 + v, tname(t), (long long)k,
           (long long)m, n, e);
    std::printf("GEMV v%d %-5s k=%-4lld m=%-5lld n=%d bias=%d acc=%d: relative error %.2e\n", 5 + v, tname(t),
                (long long)k, (long long)m, n, bias, accumulate, e);
  }
  EXPECT(std::memcmp(got[0].data(), got[1].data(), got[0].size() * 4) == 0, "GEMV v6 != v5 (%s k=%lld m=%lld n=%d)",
         tname(t), (long long)k, (long long)m, n);
}

// GEMV v7 (tensor cores: x staged to scratch, mma.sync m16n8k16 through the
// emulated fragment table) against float64: fp32 accumulation of exact
// products, so only x's fp16 rounding remains (bound 5e-4, v5's 1.5e-3).
static void test_gemv7(int t, int64_t k, int64_t m, int n, bool bias, bool accumulate) {
  const int ver = 7;
  QW w;
  make_weight(w, t, k, m);
  const auto x = randv((size_t)(n * k), 1.f), bv = randv((size_t)m, 1.f), y0 = randv((size_t)(n * m), 1.f);
  std::vector<double> want((size_t)(n * m));
  for (int j = 0; j < n; j++)
    for (int64_t r = 0; r < m; r++) {
      double s = (bias ? bv[(size_t)r] : 0.0) + (accumulate ? y0[(size_t)(j * m + r)] : 0.0);
      for (int64_t c = 0; c < k; c++) s += w.val[(size_t)(r * k + c)] * x[(size_t)(j * k + c)];
      want[(size_t)(j * m + r)] = s;
    }
  Buf<float> bx(x), bb(bv), y(y0);
  Buf<uint8_t> scratch(gemv7_scratch(n, k), 0xAB); // garbage: every read byte must have been staged
  ORCH_DISPATCH_TYPE(t, launch_gemv7, nullptr, scratch.p, y.p, bx.p, w.bytes, bias ? bb.p : nullptr, n, k, m,
                     orch_row_bytes(t, k), accumulate)
  const double e = rel_l2(y.vec(), want);
  EXPECT(e <= 5e-4, "GEMV v%d %s k=%lld m=%lld n=%d: relative error %.3g", ver, tname(t), (long long)k, (long long)m, n,
         e);
  std::printf("GEMV v%d %-5s k=%-4lld m=%-5lld n=%d bias=%d acc=%d: relative error %.2e\n", ver, tname(t),
              (long long)k, (long long)m, n, bias, accumulate, e);
}

// GEMV v9 (cp.async weight tiles, up to 8 token tiles per decode) against
// float64 (v7's bound: only x's fp16 rounding), and bit for bit: every
// token's outputs equal a run of that token alone (n = 1: the per-CTA x
// staging), so tile counts, the XS staging and ragged token tiles cannot
// change a result; from n = 9 one and two row groups per CTA give the same
// bits too. xs_mode as launch_gemv9.
static void test_gemv9(int t, int64_t k, int64_t m, int n, bool bias, bool accumulate, int xs_mode = -1) {
  QW w;
  make_weight(w, t, k, m);
  const auto x = randv((size_t)(n * k), 1.f), bv = randv((size_t)m, 1.f), y0 = randv((size_t)(n * m), 1.f);
  std::vector<double> want((size_t)(n * m));
  for (int j = 0; j < n; j++)
    for (int64_t r = 0; r < m; r++) {
      double s = (bias ? bv[(size_t)r] : 0.0) + (accumulate ? y0[(size_t)(j * m + r)] : 0.0);
      for (int64_t c = 0; c < k; c++) s += w.val[(size_t)(r * k + c)] * x[(size_t)(j * k + c)];
      want[(size_t)(j * m + r)] = s;
    }
  const int64_t rb = orch_row_bytes(t, k);
  Buf<float> bx(x), bb(bv), y(y0);
  Buf<uint8_t> scratch(gemv9_scratch(n, k), 0xAB); // garbage: every read byte must have been staged
  ORCH_DISPATCH_TYPE(t, launch_gemv9, nullptr, scratch.p, y.p, bx.p, w.bytes, bias ? bb.p : nullptr, n, k, m, rb,
                     accumulate, xs_mode, 1)
  const double e = rel_l2(y.vec(), want);
  if (n > 8) { // two row groups per CTA (the default from 17 tokens): the same sums in the same order
    Buf<float> y2(y0);
    ORCH_DISPATCH_TYPE(t, launch_gemv9, nullptr, scratch.p, y2.p, bx.p, w.bytes, bias ? bb.p : nullptr, n, k, m, rb,
                       accumulate, xs_mode, 2)
    EXPECT(std::memcmp(y2.p, y.p, sizeof(float) * y.n) == 0, "GEMV v9 %s k=%lld m=%lld n=%d: RG 2 != RG 1", tname(t),
           (long long)k, (long long)m, n);
  }
  EXPECT(e <= 5e-4, "GEMV v9 %s k=%lld m=%lld n=%d xs=%d: relative error %.3g", tname(t), (long long)k, (long long)m, n,
         xs_mode, e);
  // Tokens 0, n/2 and n-1 alone (x row, y0 row).
  for (int j : {0, n / 2, n - 1}) {
    std::vector<float> x1(x.begin() + (size_t)j * k, x.begin() + (size_t)(j + 1) * k),
        y1(y0.begin() + (size_t)j * m, y0.begin() + (size_t)(j + 1) * m);
    Buf<float> bx1(x1), by1(y1);
    Buf<uint8_t> scr1(gemv9_scratch(1, k), 0xAB);
    ORCH_DISPATCH_TYPE(t, launch_gemv9, nullptr, scr1.p, by1.p, bx1.p, w.bytes, bias ? bb.p : nullptr, 1, k, m, rb,
                       accumulate, -1)
    EXPECT(std::memcmp(by1.p, y.p + (size_t)j * m, sizeof(float) * m) == 0,
           "GEMV v9 %s k=%lld m=%lld n=%d: token %d differs from its n=1 run", tname(t), (long long)k, (long long)m, n,
           j);
  }
  const gemv9_geom g = gemv9_plan(type_block_bytes(t), k / 32);
  std::printf("GEMV v9 %-5s k=%-4lld m=%-5lld n=%-2d bias=%d acc=%d xs=%-2d stages=%d: relative error %.2e, tokens == "
              "their n=1 runs%s\n",
              tname(t), (long long)k, (long long)m, n, bias, accumulate, xs_mode, g.ns, e, n > 8 ? ", RG 2 == RG 1" : "");
}

// Multi-weight GEMV (orch_matmul_multi's kernels, v5 and v7): parts of
// different row counts sharing x, each output bit-identical to its own
// launch_gemv5 / launch_gemv7.
static void test_gemv_multi(int t, int64_t k, std::vector<int64_t> ms, int n, bool v7 = false, bool v9 = false) {
  std::vector<std::unique_ptr<QW>> ws;
  const auto x = randv((size_t)(n * k), 1.f);
  Buf<float> bx(x);
  gemv5_parts P = {};
  std::vector<std::unique_ptr<Buf<float>>> bias, ym, ys;
  for (size_t p = 0; p < ms.size(); p++) {
    ws.push_back(std::make_unique<QW>());
    make_weight(*ws[p], t, k, ms[p]);
    bias.push_back(std::make_unique<Buf<float>>(randv((size_t)ms[p], 1.f)));
    ym.push_back(std::make_unique<Buf<float>>((size_t)(n * ms[p]), NAN));
    ys.push_back(std::make_unique<Buf<float>>((size_t)(n * ms[p]), NAN));
    P.w[p] = ws[p]->bytes;
    P.bias[p] = p == 1 ? nullptr : bias[p]->p; // one part without bias
    P.y[p] = ym[p]->p;
    P.m[p] = ms[p];
  }
  const int64_t rb = orch_row_bytes(t, k);
  Buf<uint8_t> scratch(v9 ? gemv9_scratch(n, k) : gemv7_scratch(n, k), 0xAB);
  if (v9) ORCH_DISPATCH_TYPE(t, launch_gemv9_multi, nullptr, scratch.p, P, (int)ms.size(), bx.p, n, k, rb, -1)
  else if (v7) ORCH_DISPATCH_TYPE(t, launch_gemv7_multi, nullptr, scratch.p, P, (int)ms.size(), bx.p, n, k, rb)
  else ORCH_DISPATCH_TYPE(t, launch_gemv5_multi, nullptr, P, (int)ms.size(), bx.p, n, k, rb)
  for (size_t p = 0; p < ms.size(); p++) {
    if (v9)
      ORCH_DISPATCH_TYPE(t, launch_gemv9, nullptr, scratch.p, ys[p]->p, bx.p, ws[p]->bytes, P.bias[p], n, k, ms[p], rb,
                         0, -1)
    else if (v7)
      ORCH_DISPATCH_TYPE(t, launch_gemv7, nullptr, scratch.p, ys[p]->p, bx.p, ws[p]->bytes, P.bias[p], n, k, ms[p], rb,
                         0)
    else ORCH_DISPATCH_TYPE(t, launch_gemv5, nullptr, ys[p]->p, bx.p, ws[p]->bytes, P.bias[p], n, k, ms[p], rb, 0)
    EXPECT(std::memcmp(ym[p]->p, ys[p]->p, sizeof(float) * ym[p]->n) == 0,
           "GEMV v%d multi part %zu (%s k=%lld m=%lld n=%d) != its own launch", v9 ? 9 : v7 ? 7 : 5, p, tname(t), (long long)k,
           (long long)ms[p], n);
    for (size_t i = 0; i < ym[p]->n; i++)
      EXPECT(std::isfinite(ym[p]->p[i]), "GEMV v%d multi part %zu: y[%zu] not written", v9 ? 9 : v7 ? 7 : 5, p, i);
  }
  std::printf("GEMV v%d multi %-5s k=%-4lld parts=%zu n=%d: bit-identical to separate launches\n", v9 ? 9 : v7 ? 7 : 5,
              tname(t), (long long)k, ms.size(), n);
}

// Gate/up GEMVs + SwiGLU in one launch (orch_matmul_swiglu's kernel):
// gate and up bit-identical to the merged v5 launch, out to act.cu's
// swiglu expression on them; out separate or in place over gate.
static void test_gemv_glu(int t, int64_t k, int64_t m, int n, bool bias, bool inplace, int xr = 0) {
  QW wg, wu;
  make_weight(wg, t, k, m);
  make_weight(wu, t, k, m);
  const auto x = randv((size_t)(n * k), 2.f);
  Buf<float> bx(x), bg(randv((size_t)m, 1.f)), bu(randv((size_t)m, 1.f));
  const size_t ny = (size_t)(n * m);
  Buf<float> rg(ny, NAN), ru(ny, NAN), yg(ny, NAN), yu(ny, NAN), out(ny, NAN);
  gemv5_parts P = {};
  P.w[0] = wg.bytes, P.w[1] = wu.bytes;
  P.bias[0] = bias ? bg.p : nullptr, P.bias[1] = bias ? bu.p : nullptr;
  P.y[0] = rg.p, P.y[1] = ru.p;
  P.m[0] = P.m[1] = m;
  const int64_t rb = orch_row_bytes(t, k);
  ORCH_DISPATCH_TYPE(t, launch_gemv5_multi, nullptr, P, 2, bx.p, n, k, rb)
  gemv5_glu_args A = {wg.bytes, wu.bytes, P.bias[0], P.bias[1], yg.p, yu.p, inplace ? yg.p : out.p, m};
  ORCH_DISPATCH_TYPE(t, launch_gemv5_glu, nullptr, A, bx.p, n, k, rb, xr)
  const float *o = inplace ? yg.p : out.p;
  if (!inplace) EXPECT(std::memcmp(yg.p, rg.p, ny * 4) == 0, "GLU gate (%s k=%lld m=%lld n=%d) != v5", tname(t),
                       (long long)k, (long long)m, n);
  EXPECT(std::memcmp(yu.p, ru.p, ny * 4) == 0, "GLU up (%s k=%lld m=%lld n=%d) != v5", tname(t), (long long)k,
         (long long)m, n);
  int bad = 0;
  for (size_t i = 0; i < ny; i++) {
    const float g = rg.p[i], u = ru.p[i], want = g / (1.f + expf(-g)) * u; // act.cu swiglu_kernel
    if (std::memcmp(&o[i], &want, 4) != 0) bad++;
  }
  EXPECT(bad == 0, "GLU out (%s k=%lld m=%lld n=%d inplace=%d): %d of %zu != swiglu(v5 gate, v5 up)", tname(t),
         (long long)k, (long long)m, n, inplace, bad, ny);
  std::printf("GEMV v5+SwiGLU %-5s k=%-4lld m=%-3lld n=%d bias=%d inplace=%d xr=%d: bit-identical to multi + swiglu\n",
              tname(t), (long long)k, (long long)m, n, bias, inplace, xr);
}

// GEMV v5 with x staged per round (gemv5_rows XR = 1, ORCH_CUDA_GEMV5_XR):
// bit-identical to XR = 0, plain (1 and 2 rows per warp) and multi.
template <int T, int NT>
static void gemv5_xr_pair(float *y0, float *y1, float *y3, const float *x, const uint8_t *w, const float *bias,
                          int64_t n, int64_t k, int64_t m, int64_t rb, int rpw) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4) {
    constexpr int NB = gemv5_nb<T, NT>();
    const size_t sm = dec16_smem(k, NT);
    const unsigned gx = (unsigned)ceil_div(m, (int64_t)GEMV16_WARPS * rpw);
    auto k0 = gemv5_kernel<T, NT, NB, 0>;
    auto k1 = gemv5_kernel<T, NT, NB, 1>;
    auto k3 = gemv5_kernel<T, NT, NB, 3>;
    DEC16_LAUNCH_PDL(k0, dim3(gx), GEMV16_WARPS * 32, sm, nullptr, y0, x, w, bias, n, k, m, rb, 0, rpw);
    DEC16_LAUNCH_PDL(k1, dim3(gx), GEMV16_WARPS * 32, sm, nullptr, y1, x, w, bias, n, k, m, rb, 0, rpw);
    DEC16_LAUNCH_PDL(k3, dim3(gx), GEMV16_WARPS * 32, sm, nullptr, y3, x, w, bias, n, k, m, rb, 0, rpw);
  }
}
template <int T>
static void gemv5_xr_run(float *y0, float *y1, float *y3, const float *x, const uint8_t *w, const float *bias,
                         int64_t n, int64_t k, int64_t m, int64_t rb, int rpw) {
  if (n == 1) gemv5_xr_pair<T, 1>(y0, y1, y3, x, w, bias, n, k, m, rb, rpw);
  else gemv5_xr_pair<T, 2>(y0, y1, y3, x, w, bias, n, k, m, rb, rpw);
}
static void test_gemv_xr(int t, int64_t k, int64_t m, int n, int rpw) {
  QW w;
  make_weight(w, t, k, m);
  Buf<float> bx(randv((size_t)(n * k), 3.f)), bb(randv((size_t)m, 1.f));
  Buf<float> y0((size_t)(n * m), NAN), y1((size_t)(n * m), NAN), y3((size_t)(n * m), NAN);
  const int64_t rb = orch_row_bytes(t, k);
  ORCH_DISPATCH_TYPE(t, gemv5_xr_run, y0.p, y1.p, y3.p, bx.p, w.bytes, bb.p, n, k, m, rb, rpw)
  EXPECT(std::memcmp(y0.p, y1.p, y0.n * 4) == 0, "GEMV v5 XR (%s k=%lld m=%lld n=%d rpw=%d) != XR 0", tname(t),
         (long long)k, (long long)m, n, rpw);
  EXPECT(std::memcmp(y0.p, y3.p, y0.n * 4) == 0, "GEMV v5 XR 3 (staggered; %s k=%lld m=%lld n=%d rpw=%d) != XR 0",
         tname(t), (long long)k, (long long)m, n, rpw);
  for (size_t i = 0; i < y1.n; i++) EXPECT(std::isfinite(y1.p[i]), "GEMV v5 XR: y[%zu] not written", i);
  std::printf("GEMV v5 XR 1, 3 %-5s k=%-5lld m=%-3lld n=%d rpw=%d: bit-identical to XR 0\n", tname(t), (long long)k,
              (long long)m, n, rpw);
}

// The RMSNorm folded into the GEMVs around it (gemv16.cuh gemv5_nf; session 8): producer GEMV (y = xp.Wp, m = dim,
// + bias) -> AddRMSNorm(res, h, y, nw) -> consumers on h (merged parts; gate/up + SwiGLU), against the unfolded
// kernels (launch_gemv5, launch_norm, launch_gemv5_multi, launch_gemv5_glu): y and res bit-identical, xt = res * nw
// exactly, the partial sums of squares within 1e-5 of float64, the consumers' outputs within the GEMV bound of the
// unfolded ones and of a float64 reference on the exact norm; and bit-identical from run to run.
static void test_norm_fold(int t, int64_t kp, int64_t dim, int n, std::vector<int64_t> ms, int64_t mg, bool bias,
                           int xr = -1) {
  QW wp, wg, wu;
  make_weight(wp, t, kp, dim);
  make_weight(wg, t, dim, mg);
  make_weight(wu, t, dim, mg);
  std::vector<std::unique_ptr<QW>> wc;
  for (int64_t m : ms) {
    wc.push_back(std::make_unique<QW>());
    make_weight(*wc.back(), t, dim, m);
  }
  const auto xp = randv((size_t)(n * kp), 0.5f), res0 = randv((size_t)(n * dim), 4.f), nwv = randv((size_t)dim, 1.f),
             bv = randv((size_t)dim, 1.f);
  const int64_t rbp = orch_row_bytes(t, kp), rbc = orch_row_bytes(t, dim);
  const size_t nx = (size_t)(n * dim);
  const int nss = (int)(dim / GEMV16_WARPS);
  const float eps = 1e-5f;
  Buf<float> bxp(xp), bnw(nwv), bb(bv);
  const bool v7 = n > 2; // the library's route: v5 at n = 1, 2, v7 (x staged to scratch) above
  Buf<uint8_t> scp(gemv7_scratch(n, kp), 0xAB), scc(gemv7_scratch(n, dim), 0xAB);
  // Unfolded.
  Buf<float> y0(nx, NAN), r0(res0), h0(nx, NAN);
  if (v7) ORCH_DISPATCH_TYPE(t, launch_gemv7, nullptr, scp.p, y0.p, bxp.p, wp.bytes, bias ? bb.p : nullptr, n, kp, dim,
                             rbp, 0)
  else ORCH_DISPATCH_TYPE(t, launch_gemv5, nullptr, y0.p, bxp.p, wp.bytes, bias ? bb.p : nullptr, n, kp, dim, rbp, 0)
  launch_norm<false>(nullptr, n, h0.p, r0.p, y0.p, bnw.p, nullptr, dim, eps);
  auto consumers = [&](const float *x, const gemv5_nf *F, std::vector<std::vector<float>> &outs) {
    gemv5_parts P = {};
    std::vector<std::unique_ptr<Buf<float>>> ys;
    for (size_t p = 0; p < ms.size(); p++) {
      ys.push_back(std::make_unique<Buf<float>>((size_t)(n * ms[p]), NAN));
      P.w[p] = wc[p]->bytes, P.y[p] = ys[p]->p, P.m[p] = ms[p];
      P.bias[p] = p == 0 && bias ? bb.p : nullptr; // dim >= ms[0]: a bias of the part's rows
    }
    if (v7) ORCH_DISPATCH_TYPE(t, launch_gemv7_multi, nullptr, scc.p, P, (int)ms.size(), x, n, dim, rbc, F)
    else if (F) ORCH_DISPATCH_TYPE(t, launch_gemv5_multi_nf, nullptr, P, (int)ms.size(), x, n, dim, rbc, *F, xr)
    else ORCH_DISPATCH_TYPE(t, launch_gemv5_multi, nullptr, P, (int)ms.size(), x, n, dim, rbc)
    Buf<float> g((size_t)(n * mg), NAN), u((size_t)(n * mg), NAN), o((size_t)(n * mg), NAN);
    if (v7) { // gate/up merged (v7), then act.cu's SwiGLU expression
      gemv5_parts G = {};
      G.w[0] = wg.bytes, G.w[1] = wu.bytes, G.y[0] = g.p, G.y[1] = u.p, G.m[0] = G.m[1] = mg;
      G.bias[1] = bias ? bb.p : nullptr;
      ORCH_DISPATCH_TYPE(t, launch_gemv7_multi, nullptr, scc.p, G, 2, x, n, dim, rbc, F)
      for (size_t i = 0; i < o.n; i++) o.p[i] = g.p[i] / (1.f + expf(-g.p[i])) * u.p[i];
    } else {
      gemv5_glu_args A = {wg.bytes, wu.bytes, nullptr, bias ? bb.p : nullptr, g.p, u.p, o.p, mg};
      ORCH_DISPATCH_TYPE(t, launch_gemv5_glu, nullptr, A, x, n, dim, rbc, xr, F)
    }
    outs.clear();
    for (auto &y : ys) outs.push_back(y->vec());
    outs.push_back(g.vec());
    outs.push_back(u.vec());
    outs.push_back(o.vec());
  };
  std::vector<std::vector<float>> want, got, again;
  consumers(h0.p, nullptr, want);
  // Folded, twice.
  for (int run = 0; run < 2; run++) {
    Buf<float> y1(nx, NAN), r1(res0), xt(nx, NAN), ss((size_t)(n * nss), NAN);
    gemv5_nf F;
    F.res = r1.p, F.w = bnw.p, F.xt = xt.p, F.ss = ss.p;
    if (v7) ORCH_DISPATCH_TYPE(t, launch_gemv7, nullptr, scp.p, y1.p, bxp.p, wp.bytes, bias ? bb.p : nullptr, n, kp,
                               dim, rbp, 0, &F)
    else ORCH_DISPATCH_TYPE(t, launch_gemv5_nf_prod, nullptr, y1.p, bxp.p, wp.bytes, bias ? bb.p : nullptr, n, kp, dim,
                            rbp, F)
    EXPECT(std::memcmp(y1.p, y0.p, nx * 4) == 0, "norm fold producer y (%s kp=%lld dim=%lld n=%d) != the GEMV's",
           tname(t), (long long)kp, (long long)dim, n);
    EXPECT(std::memcmp(r1.p, r0.p, nx * 4) == 0, "norm fold res (%s dim=%lld n=%d) != the norm's", tname(t),
           (long long)dim, n);
    int bad = 0;
    for (size_t i = 0; i < nx; i++) {
      const float want_xt = r0.p[i] * nwv[i % (size_t)dim];
      if (std::memcmp(&xt.p[i], &want_xt, 4) != 0) bad++;
    }
    EXPECT(bad == 0, "norm fold xt: %d of %zu != res * w", bad, nx);
    double worst = 0;
    for (int j = 0; j < n; j++)
      for (int b = 0; b < nss; b++) {
        double s = 0;
        for (int r = 0; r < GEMV16_WARPS; r++) s += (double)r0.p[j * dim + b * GEMV16_WARPS + r] * r0.p[j * dim + b * GEMV16_WARPS + r];
        worst = std::max(worst, std::fabs(ss.p[j * nss + b] - s) / std::max(s, 1e-30));
      }
    EXPECT(worst < 1e-5, "norm fold partial sums: relative error %.3g", worst);
    F.nss = nss, F.eps = eps;
    consumers(xt.p, &F, run ? again : got);
    if (run == 0) // every partial slot is read: the whole sum in one slot (first, middle, last) gives the same s
      for (int at : {0, nss / 2 + 1, nss - 1}) {
        Buf<float> s1((size_t)(n * nss), 0.f);
        for (int j = 0; j < n; j++) {
          double tot = 0;
          for (int b = 0; b < nss; b++) tot += ss.p[j * nss + b];
          s1.p[j * nss + at] = (float)tot;
        }
        gemv5_nf F1 = F;
        F1.ss = s1.p;
        std::vector<std::vector<float>> one;
        consumers(xt.p, &F1, one);
        for (size_t i = 0; i < one.size(); i++) {
          std::vector<double> g64(got[i].begin(), got[i].end());
          const double e = rel_l2(one[i], g64);
          EXPECT(e <= 1e-5, "norm fold output %zu with the sum in slot %d of %d: relative error %.3g", i, at, nss, e);
        }
      }
  }
  // float64 reference of the consumers on the exact norm of the (bit-identical) residual.
  std::vector<double> h64(nx);
  for (int j = 0; j < n; j++) {
    double ssum = 0;
    for (int64_t i = 0; i < dim; i++) ssum += (double)r0.p[j * dim + i] * r0.p[j * dim + i];
    const double rs = 1 / std::sqrt(ssum / dim + eps);
    for (int64_t i = 0; i < dim; i++) h64[(size_t)(j * dim + i)] = r0.p[j * dim + i] * rs * nwv[(size_t)i];
  }
  auto gemv64 = [&](const QW &w, int64_t m, const float *b) {
    std::vector<double> y((size_t)(n * m));
    for (int j = 0; j < n; j++)
      for (int64_t r = 0; r < m; r++) {
        double s = b ? b[r] : 0.0;
        for (int64_t c = 0; c < dim; c++) s += w.val[(size_t)(r * dim + c)] * h64[(size_t)(j * dim + c)];
        y[(size_t)(j * m + r)] = s;
      }
    return y;
  };
  const size_t np = ms.size();
  for (size_t i = 0; i < got.size(); i++) {
    EXPECT(std::memcmp(got[i].data(), again[i].data(), got[i].size() * 4) == 0, "norm fold output %zu differs run to run", i);
    std::vector<double> w64(want[i].begin(), want[i].end());
    const double e = rel_l2(got[i], w64);
    std::vector<double> ref;
    if (i < np) ref = gemv64(*wc[i], ms[i], i == 0 && bias ? bb.p : nullptr);
    else if (i == np) ref = gemv64(wg, mg, nullptr);
    else if (i == np + 1) ref = gemv64(wu, mg, bias ? bb.p : nullptr);
    else {
      const auto g64 = gemv64(wg, mg, nullptr), u64 = gemv64(wu, mg, bias ? bb.p : nullptr);
      for (size_t q = 0; q < g64.size(); q++) ref.push_back(g64[q] / (1 + std::exp(-g64[q])) * u64[q]);
    }
    const double e64 = rel_l2(got[i], ref), eu = rel_l2(want[i], ref);
    const double tol = i == np + 2 ? 3e-3 : 1.5e-3;
    EXPECT(e <= tol && e64 <= tol, "norm fold output %zu (%s kp=%lld dim=%lld n=%d): relative error %.3g vs unfolded, "
           "%.3g vs float64 (unfolded: %.3g)", i, tname(t), (long long)kp, (long long)dim, n, e, e64, eu);
    std::printf("norm fold %-5s kp=%-5lld dim=%-4lld n=%d output %zu: vs unfolded %.2e, vs float64 %.2e (unfolded %.2e)\n",
                tname(t), (long long)kp, (long long)dim, n, i, e, e64, eu);
  }
}

// RoPE of q and k in one launch (orch_rope2) against two orch_rope calls
// (bit for bit) and a float64 reference.
static void test_rope2(int neox) {
  const int64_t n = 3;
  const int hd = 16, rot = 12, hq = 4, hk = 2;
  std::vector<float> q0 = randv((size_t)(n * hq * hd), 1.f), k0 = randv((size_t)(n * hk * hd), 1.f);
  std::vector<float> inv(rot / 2);
  for (int i = 0; i < rot / 2; i++) inv[(size_t)i] = std::pow(10000.f, -2.f * i / rot);
  const std::vector<int32_t> posv = {0, 7, 130};
  Buf<int32_t> pos(posv);
  Buf<float> bi(inv), qa(q0), ka(k0), qb(q0), kb(k0);
  orch_ctx ctx;
  EXPECT(orch_rope2(&ctx, qa.p, hq * hd, hq, ka.p, hk * hd, hk, n, hd, rot, pos.p, bi.p, 1.25f, neox) == ORCH_OK,
         "rope2: %s", g_err);
  EXPECT(orch_rope(&ctx, qb.p, hq * hd, n, hq, hd, rot, pos.p, bi.p, 1.25f, neox) == ORCH_OK, "rope: %s", g_err);
  EXPECT(orch_rope(&ctx, kb.p, hk * hd, n, hk, hd, rot, pos.p, bi.p, 1.25f, neox) == ORCH_OK, "rope: %s", g_err);
  EXPECT(std::memcmp(qa.p, qb.p, qa.n * 4) == 0 && std::memcmp(ka.p, kb.p, ka.n * 4) == 0,
         "rope2 (neox=%d) != two rope calls", neox);
  // float64 reference of q
  double worst = 0;
  for (int64_t t = 0; t < n; t++)
    for (int h = 0; h < hq; h++)
      for (int p = 0; p < rot / 2; p++) {
        const size_t base = (size_t)(t * hq * hd + h * hd);
        const size_t i0 = base + (neox ? p : 2 * p), i1 = base + (neox ? p + rot / 2 : 2 * p + 1);
        const double th = (double)posv[(size_t)t] * inv[(size_t)p], c = 1.25 * std::cos(th), s = 1.25 * std::sin(th);
        worst = std::max(worst, std::fabs(qa.p[i0] - (q0[i0] * c - q0[i1] * s)));
        worst = std::max(worst, std::fabs(qa.p[i1] - (q0[i0] * s + q0[i1] * c)));
      }
  EXPECT(worst < 1e-4, "rope2 (neox=%d): max error %.3g vs float64", neox, worst);
  std::printf("RoPE q+k in one launch (neox=%d): bit-identical to two launches, max error %.2e\n", neox, worst);
}

// RoPE of q and k fused with the KV-cache write (orch_rope_kv) against
// orch_rope2 followed by attention.cu's kv_write semantics (cache[slot * per
// + j] = k[t][j] converted to the cache type), bit for bit, F32 and F16
// caches, rot_dim < head_dim (unrotated dims copied).
template <class KV>
static void test_rope_kv(int neox, int rot) {
  const int64_t n = 3;
  const int hd = 16, hq = 4, hk = 2, per = hk * hd, nslots = 7;
  const std::vector<float> q0 = randv((size_t)(n * hq * hd), 1.f), k0 = randv((size_t)(n * per), 1.f),
                           v0 = randv((size_t)(n * per), 1.f);
  std::vector<float> inv(rot / 2);
  for (int i = 0; i < rot / 2; i++) inv[(size_t)i] = std::pow(10000.f, -2.f * i / rot);
  const std::vector<int32_t> posv = {5, 0, 131}, slotv = {6, 2, 3};
  Buf<int32_t> pos(posv), slots(slotv);
  Buf<float> bi(inv), qa(q0), ka(k0), qb(q0), kb(k0), vv(v0);
  std::vector<KV> poison((size_t)(nslots * per));
  for (auto &e : poison) e = (KV)-7.f;
  Buf<KV> kca(poison), vca(poison);
  std::vector<KV> kcb = poison, vcb = poison;
  orch_ctx ctx;
  const int dt = sizeof(KV) == 4 ? ORCH_KV_F32 : ORCH_KV_F16;
  EXPECT(orch_rope_kv(&ctx, qa.p, hq * hd, hq, ka.p, per, hk, vv.p, per, kca.p, vca.p, dt, slots.p, n, hd, rot, pos.p,
                      bi.p, 0.75f, neox) == ORCH_OK,
         "rope_kv: %s", g_err);
  EXPECT(orch_rope2(&ctx, qb.p, hq * hd, hq, kb.p, per, hk, n, hd, rot, pos.p, bi.p, 0.75f, neox) == ORCH_OK, "rope2: %s",
         g_err);
  for (int64_t t = 0; t < n; t++)
    for (int j = 0; j < per; j++) {
      kcb[(size_t)(slotv[(size_t)t] * per + j)] = (KV)kb.p[t * per + j];
      vcb[(size_t)(slotv[(size_t)t] * per + j)] = (KV)v0[(size_t)(t * per + j)];
    }
  EXPECT(std::memcmp(qa.p, qb.p, qa.n * 4) == 0 && std::memcmp(ka.p, kb.p, ka.n * 4) == 0,
         "rope_kv (neox=%d rot=%d): q/k differ from rope2", neox, rot);
  EXPECT(std::memcmp(kca.p, kcb.data(), kcb.size() * sizeof(KV)) == 0 &&
             std::memcmp(vca.p, vcb.data(), vcb.size() * sizeof(KV)) == 0,
         "rope_kv (neox=%d rot=%d, %zu-byte cache): cache differs from rope2 + kv_write", neox, rot, sizeof(KV));
  std::printf("RoPE q+k + KV write in one launch (neox=%d rot=%d, %zu-byte cache): bit-identical to rope2 + kv_write\n",
              neox, rot, sizeof(KV));
}

// RMSNorm / LayerNorm (+ residual add): the register kernel (each thread's
// elements read once) against the looping kernel, bit for bit, and against
// float64; every thread of both waits for PDL.
template <bool LAYER, int N>
static void test_norm(int64_t n, int64_t dim, bool add, bool wb) {
  const auto x0 = randv((size_t)(n * dim), 2.f), a0 = randv((size_t)(n * dim), 1.f), wv = randv((size_t)dim, 1.f),
             bv = randv((size_t)dim, 1.f);
  Buf<float> xa(x0), xb(x0), ad(a0), w(wv), b(bv), oa((size_t)(n * dim), NAN), ob((size_t)(n * dim), NAN);
  const float *addp = add ? ad.p : nullptr, *wp = wb ? w.p : nullptr, *bp = wb && LAYER ? b.p : nullptr;
  orch_launch_pdl(norm_reg_kernel<LAYER, N>, dim3((unsigned)n), dim3(NORM_THREADS), 0, nullptr, oa.p, xa.p, addp, wp, bp,
                  dim, 1e-5f);
  orch_launch_pdl(norm_kernel<LAYER>, dim3((unsigned)n), dim3(NORM_THREADS), 0, nullptr, ob.p, xb.p, addp, wp, bp, dim,
                  1e-5f);
  EXPECT(std::memcmp(oa.p, ob.p, oa.n * 4) == 0 && std::memcmp(xa.p, xb.p, xa.n * 4) == 0,
         "norm (layer=%d N=%d dim=%lld add=%d): register kernel differs from the looping one", LAYER, N, (long long)dim,
         add);
  double worst = 0;
  for (int64_t r = 0; r < n; r++) {
    std::vector<double> v((size_t)dim);
    double mean = 0, var = 0;
    for (int64_t i = 0; i < dim; i++) {
      v[(size_t)i] = (double)x0[(size_t)(r * dim + i)] + (add ? (double)a0[(size_t)(r * dim + i)] : 0.0);
      mean += v[(size_t)i];
    }
    mean = LAYER ? mean / dim : 0.0;
    for (auto e : v) var += (e - mean) * (e - mean);
    const double rs = 1 / std::sqrt(var / dim + 1e-5);
    for (int64_t i = 0; i < dim; i++) {
      double o = (v[(size_t)i] - mean) * rs * (wb ? wv[(size_t)i] : 1.0) + (wb && LAYER ? bv[(size_t)i] : 0.0);
      worst = std::max(worst, std::fabs(oa.p[r * dim + i] - o));
    }
  }
  EXPECT(worst < 1e-4, "norm (layer=%d dim=%lld): max error %.3g vs float64", LAYER, (long long)dim, worst);
  std::printf("norm layer=%d N=%-2d dim=%-4lld add=%d: bit-identical to the looping kernel, max error %.2e\n", LAYER, N,
              (long long)dim, add, worst);
}

// F32 small-m GEMV (routers): 1e-5 against float64 (fp32 products and sums).
static void test_gemv_f32(int64_t k, int64_t m, int n, bool bias, bool accumulate) {
  const auto w = randv((size_t)(m * k), 1.f), x = randv((size_t)(n * k), 1.f), bv = randv((size_t)m, 1.f),
             y0 = randv((size_t)(n * m), 1.f);
  std::vector<double> want((size_t)(n * m));
  for (int j = 0; j < n; j++)
    for (int64_t r = 0; r < m; r++) {
      double s = (bias ? bv[(size_t)r] : 0.0) + (accumulate ? y0[(size_t)(j * m + r)] : 0.0);
      for (int64_t c = 0; c < k; c++) s += (double)w[(size_t)(r * k + c)] * x[(size_t)(j * k + c)];
      want[(size_t)(j * m + r)] = s;
    }
  Buf<float> bw(w), bx(x), bb(bv), y(y0);
  launch_gemv_f32_rows(nullptr, y.p, bx.p, bw.p, bias ? bb.p : nullptr, n, k, m, accumulate);
  const double e = rel_l2(y.vec(), want);
  EXPECT(e <= 1e-5, "GEMV F32 rows k=%lld m=%lld n=%d: relative error %.3g", (long long)k, (long long)m, n, e);
  std::printf("GEMV F32 rows k=%-4lld m=%-3lld n=%d bias=%d acc=%d: relative error %.2e\n", (long long)k, (long long)m, n,
              bias, accumulate, e);
}

// Q8_0 rows repacked after the original ones (ORCH_T_Q8_0_DUAL, session 12): GEMV v5's kernels on the repacked rows
// (template type ORCH_T_Q8_0R, the rows where matmul.cu's entries point them: + rp_offset, rp_row_bytes) give the
// plain rows' outputs bit for bit: plain, multi, SwiGLU, the norm fold's producer and consumers, n = 1, 2; so do
// the CTAs of 16 and 32 warps (ORCH_CUDA_GEMV5_W, session 13; g_gemv5_w_force).
static bool same_bits(const std::vector<float> &a, const std::vector<float> &b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}
static void test_q8r(int64_t k, int64_t dim, int n) {
  constexpr int t = ORCH_T_Q8_0, tr = ORCH_T_Q8_0R;
  const int64_t mq = 40, mk = 8, mg = 24; // q / k parts, gate / up rows; dim: the producer's rows (% 32 == 0)
  QW wp, wq, wk, wg, wu;
  make_weight(wp, t, k, dim);
  make_weight(wq, t, dim, mq);
  make_weight(wk, t, dim, mk);
  make_weight(wg, t, dim, mg);
  make_weight(wu, t, dim, mg);
  DualW dp(wp, t, dim, k), dq(wq, t, mq, dim), dk(wk, t, mk, dim), dg(wg, t, mg, dim), du(wu, t, mg, dim);
  const auto xp = randv((size_t)(n * k), 0.5f), res0 = randv((size_t)(n * dim), 4.f), nwv = randv((size_t)dim, 1.f),
             bv = randv((size_t)std::max(dim, mq), 1.f), xc = randv((size_t)(n * dim), 1.f);
  Buf<float> bxp(xp), bnw(nwv), bb(bv), bxc(xc);
  const int nss = (int)(dim / GEMV16_WARPS);
  using V = std::vector<float>;
  auto run = [&](auto T, std::vector<V> &r) {
    constexpr int TT = decltype(T)::value;
    const bool rp = TT == ORCH_T_Q8_0R;
    const int64_t rbp = rp ? rp_row_bytes(t, k) : orch_row_bytes(t, k);
    const int64_t rbc = rp ? rp_row_bytes(t, dim) : orch_row_bytes(t, dim);
    auto at = [&](const DualW &d, const QW &w, int64_t rows, int64_t kk) {
      return rp ? d.p + rp_offset(t, rows, kk) : (const uint8_t *)w.bytes;
    };
    const uint8_t *P = at(dp, wp, dim, k), *Q = at(dq, wq, mq, dim), *K = at(dk, wk, mk, dim), *G = at(dg, wg, mg, dim),
                  *U = at(du, wu, mg, dim);
    Buf<float> y((size_t)(n * dim), NAN), yq((size_t)(n * mq), NAN), yk((size_t)(n * mk), NAN), g((size_t)(n * mg), NAN),
        u((size_t)(n * mg), NAN), o((size_t)(n * mg), NAN), res(res0), xt((size_t)(n * dim), NAN),
        ss((size_t)(n * nss), NAN), y2((size_t)(n * dim), NAN), fq((size_t)(n * mq), NAN), fk((size_t)(n * mk), NAN),
        fo((size_t)(n * mg), NAN), fg((size_t)(n * mg), NAN), fu((size_t)(n * mg), NAN);
    launch_gemv5<TT>(nullptr, y.p, bxp.p, P, bb.p, n, k, dim, rbp, 0);
    gemv5_parts M = {};
    M.w[0] = Q, M.w[1] = K, M.bias[0] = bb.p, M.y[0] = yq.p, M.y[1] = yk.p, M.m[0] = mq, M.m[1] = mk;
    launch_gemv5_multi<TT>(nullptr, M, 2, bxc.p, n, dim, rbc);
    gemv5_glu_args A = {G, U, nullptr, bb.p, g.p, u.p, o.p, mg};
    launch_gemv5_glu<TT>(nullptr, A, bxc.p, n, dim, rbc);
    gemv5_nf F;
    F.res = res.p, F.w = bnw.p, F.xt = xt.p, F.ss = ss.p;
    launch_gemv5_nf_prod<TT>(nullptr, y2.p, bxp.p, P, bb.p, n, k, dim, rbp, F);
    gemv5_nf C;
    C.ss = ss.p, C.nss = nss, C.eps = 1e-5f;
    gemv5_parts N = M;
    N.y[0] = fq.p, N.y[1] = fk.p;
    launch_gemv5_multi_nf<TT>(nullptr, N, 2, xt.p, n, dim, rbc, C);
    gemv5_glu_args B = {G, U, nullptr, bb.p, fg.p, fu.p, fo.p, mg};
    launch_gemv5_glu<TT>(nullptr, B, xt.p, n, dim, rbc, -1, &C);
    r = {y.vec(), yq.vec(), yk.vec(), g.vec(), u.vec(), o.vec(), y2.vec(), res.vec(), xt.vec(), ss.vec(), fq.vec(),
         fk.vec(), fo.vec()};
  };
  std::vector<V> a;
  run(std::integral_constant<int, t>{}, a);
  static const char *names[] = {"y", "multi q", "multi k", "glu gate", "glu up", "glu out", "producer y", "res", "xt",
                                "ss", "consumer q", "consumer k", "consumer glu out"};
  for (int w : {GEMV16_WARPS, 16, 32}) {
    std::vector<V> b;
    g_gemv5_w_force = w;
    run(std::integral_constant<int, tr>{}, b);
    g_gemv5_w_force = 0;
    for (size_t i = 0; i < a.size(); i++) {
      bool finite = true;
      for (float v : a[i]) finite &= std::isfinite(v);
      EXPECT(finite && same_bits(a[i], b[i]),
             "Q8_0 repacked rows, %d-warp CTAs: %s differs or not written (k=%lld dim=%lld n=%d)", w, names[i],
             (long long)k, (long long)dim, n);
    }
  }
  std::printf("GEMV v5 on repacked Q8_0 rows (ORCH_T_Q8_0R) k=%lld dim=%lld n=%d, CTAs of 8 / 16 / 32 warps: plain, "
              "multi, SwiGLU, norm-fold producer and consumers bit-identical to the plain rows\n",
              (long long)k, (long long)dim, n);
}

int main(int argc, char **argv) {
  const bool long_run = argc > 1 && std::strcmp(argv[1], "long") == 0;
  const bool fold_only = argc > 1 && std::strcmp(argv[1], "fold") == 0; // the norm-fold cases alone
  // Default (cuda-check): every version and type on small shapes; `long`: wide rows too.
  test_norm_fold(ORCH_T_Q8_0, 96, 64, 1, {24, 8, 8}, 16, true);  // out -> norm -> q/k/v and gate/up; nss 8
  test_norm_fold(ORCH_T_Q8_0, 32, 3200, 1, {8}, 8, false, 1);    // 2 rounds: scales under the 2nd round; nss 400
  test_norm_fold(ORCH_T_Q8_0, 8192, 64, 2, {16}, 24, false);     // down-like k: x staged per round; two tokens
  test_norm_fold(ORCH_T_MXFP4, 64, 96, 2, {40, 8}, 8, true, 1);  // ragged consumer CTAs; consumers' x per round
  test_norm_fold(ORCH_T_Q4_0, 128, 160, 1, {8}, 16, false);     // nss 20: 5 partial copies per token
  test_norm_fold(ORCH_T_Q8_0, 96, 64, 8, {24, 8, 8}, 16, true);  // v7 (n = 3..8): 16-row CTAs, two slots each
  test_norm_fold(ORCH_T_MXFP4, 1024, 96, 3, {40}, 8, false);    // v7: ragged 16-row CTAs, 3 tokens
  test_q8r(96, 64, 1);
  test_q8r(8192, 64, 2); // x staged per round
  test_q8r(64, 3200, 1); // two rounds of blocks in the consumers
  test_q8r(4096, 64, 1); // Llama's out projection k: 128 blocks
  if (fold_only) return fails ? 1 : 0;
  for (int t : {ORCH_T_MXFP4, ORCH_T_Q8_0, ORCH_T_Q4_0}) {
    test_moe(t, 64, 32, 3, 2, 3);
    if (t == ORCH_T_MXFP4) test_moe(t, 128, 96, 6, 4, 1);
    // m * row bytes a multiple of 4, as the library's dispatch requires for v5/v6; m = 36 leaves a ragged CTA.
    for (int n : {1, 2, 3, 8}) test_gemv(t, 96, 36, n, n & 1, n == 2);
    test_gemv(t, 4096, 4, 1, true, false); // 128 chunks: several rounds of blocks per lane
    if (long_run) {
      test_moe(t, 3200, 32, 2, 2, 1); // 100 chunks: several rounds of blocks per lane (gate/up)
      test_moe(t, 32, 3200, 2, 2, 1); // ... (down; 32 rows: 4 CTAs)
      test_gemv(t, 96, 36, 5, true, false);
      test_gemv(t, 2880, 24, 4, false, false);
    }
  }
  for (int t : {ORCH_T_Q8_0, ORCH_T_MXFP4}) {
    test_gemv_multi(t, 96, {36, 8, 8}, 1);   // q, k, v (ragged first part)
    test_gemv_multi(t, 128, {16, 24}, 3);    // two parts, token tile 4
  }
  test_gemv_multi(ORCH_T_Q4_0, 64, {8, 40, 16}, 8);
  test_gemv_multi(ORCH_T_Q8_0, 96, {40, 8, 24}, 4, true); // v7: ragged 16-row CTAs per part
  test_gemv_multi(ORCH_T_MXFP4, 64, {16, 32}, 8, true);
  for (int t : {ORCH_T_MXFP4, ORCH_T_Q8_0, ORCH_T_Q4_0}) {
    test_gemv7(t, 96, 36, 1, true, false);   // 3 blocks: warps without blocks; ragged last CTA
    test_gemv7(t, 96, 36, 3, false, true);
    test_gemv7(t, 1024, 20, 8, true, false); // 32 blocks: two rounds of 8 warps x 2
  }
  // GEMV v9: every type; n = 1..64 incl. odd counts and ragged token tiles (9, 17, 33, 63); per-CTA and global
  // x staging; one stage (whole tile) and several (k = 4096 Q8_0, 6400 MXFP4: 3); ragged 16-row CTAs.
  for (int t : {ORCH_T_MXFP4, ORCH_T_Q8_0, ORCH_T_Q4_0}) {
    test_gemv9(t, 96, 36, 1, true, false);       // per-CTA x staging; 3 blocks: warps without blocks
    test_gemv9(t, 96, 36, 2, false, true, 0);    // global staging at n = 2
    test_gemv9(t, 128, 20, 9, true, true);       // 2 tiles, the second with one token
    test_gemv9(t, 64, 24, 33, false, false);     // 8 tiles (NTL 8), the last 4 empty; RG 2: one ragged 32-row CTA
  }
  test_gemv9(ORCH_T_Q8_0, 4096, 20, 17, true, false);  // 3 stages (a ring of 2 buffers), NTL 4
  test_gemv9(ORCH_T_Q8_0, 4096, 18, 1, false, true);   // 3 stages, per-CTA staging
  test_gemv9(ORCH_T_MXFP4, 6400, 16, 3, true, false);  // 3 stages
  test_gemv9(ORCH_T_Q4_0, 160, 40, 63, true, true);   // RG 2: 32 + 8 rows
  test_gemv9(ORCH_T_Q8_0, 96, 17, 64, false, false);
  test_gemv9(ORCH_T_MXFP4, 96, 33, 8, true, false, 1); // per-CTA staging at n = 8 (tests only)
  if (long_run)
    for (int n = 1; n <= 64; n++) test_gemv9(n % 3 == 0 ? ORCH_T_MXFP4 : n % 3 == 1 ? ORCH_T_Q8_0 : ORCH_T_Q4_0, 128, 20, n,
                                             n & 1, n % 4 == 2);
  test_gemv_multi(ORCH_T_Q8_0, 96, {40, 8, 24}, 1, false, true); // v9, per-CTA staging
  test_gemv_multi(ORCH_T_MXFP4, 64, {16, 40}, 20, false, true);  // v9, 3 tiles of 8 (NTL 4, RG 2: ragged 32-row CTA)
  test_gemv_multi(ORCH_T_Q4_0, 4096, {8, 20}, 5, false, true);   // v9, 3 stages
  test_gemv_glu(ORCH_T_Q8_0, 4096, 20, 1, false, true); // two rounds of 2 blocks per lane; ragged CTA
  test_gemv_glu(ORCH_T_Q8_0, 96, 36, 2, true, false);
  test_gemv_glu(ORCH_T_MXFP4, 128, 16, 1, true, false);
  test_gemv_glu(ORCH_T_Q4_0, 96, 8, 2, false, true);
  test_gemv_glu(ORCH_T_Q8_0, 4096, 12, 2, true, true, 1); // x per round: 2 rounds
  test_gemv_glu(ORCH_T_MXFP4, 2880, 8, 1, false, false, 1); // 90 chunks: a partial second round
  test_gemv_xr(ORCH_T_Q8_0, 14336, 8, 1, 1);  // Llama down's k: 5 rounds, the last partial
  test_gemv_xr(ORCH_T_Q8_0, 4096, 20, 2, 2);  // 2 rows per warp: the second row reads what the first staged
  test_gemv_xr(ORCH_T_MXFP4, 2880, 12, 1, 1);
  test_gemv_xr(ORCH_T_Q4_0, 96, 8, 2, 1);     // 3 chunks: one round, lanes without blocks
  test_rope2(1);
  test_rope2(0);
  test_norm<false, 12>(2, 2880, true, true); // gpt-oss width
  test_norm<false, 4>(1, 1000, false, true); // ragged last elements
  test_norm<true, 8>(3, 2048, true, true);
  test_norm<true, 4>(1, 64, false, false);
  test_rope_kv<float>(1, 16);
  test_rope_kv<float>(0, 12);
  test_rope_kv<_Float16>(1, 12);
  test_rope_kv<_Float16>(0, 16);
  for (int n : {1, 3, 8}) test_gemv_f32(96, 5, n, n != 3, n == 3);
  test_gemv_f32(4224, 3, 2, true, false); // two rounds of the 1024 threads
  if (long_run) test_gemv_f32(2880, 32, 1, true, false);
  if (long_run) test_gemv(ORCH_T_Q8_0, 32, 32772, 1, true, false); // v5's 2 rows per warp (m >= 32768)
  if (fails) {
    std::fprintf(stderr, "decode_emu_test: %d failures\n", fails);
    return 1;
  }
  std::printf("decode_emu_test: PASS\n");
  return 0;
}
