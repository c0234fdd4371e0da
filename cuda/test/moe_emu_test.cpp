// CPU emulation test of MoE v6, v9, v10 (cuda/src/moe_ffn.cu, compiled whole against
// cuda/test/cuda_emu.h under AddressSanitizer; docs/perf-cuda.md "Round 4: MoE
// decode"). Checks:
//  - moe6_mxfp4_word (E2M1 bits placed into fp16 bits, 2^-14 * w) against
//    dec16_mxfp4_word (the v3/v4 decoder): every (nibble i, nibble i+4) pair
//    exhaustively in every position, plus random words, value for value;
//  - the fused MoE FFN under v6 against v4 BIT FOR BIT (same products, same
//    summation order; x staged times 2^14) and both against a float64
//    reference (the GPU suite's fp16 bound 6e-3), for MXFP4 / Q8_0 / Q4_0,
//    top-2/4, 1..8 tokens, ragged row counts, several rounds of blocks per lane,
//    x chunks with a huge dynamic range (fp16-subnormal staged values), and
//    with the speculative routing read of the down kernel returning a wrong
//    (stale) expert: the re-check after pdl_wait must reload it;
//  - orch_moe_ffn_route (session 4): v9 (tensor cores, MXFP4, 2..64 tokens)
//    against a float64 reference (ids and weights = orch_moe_topk's), and the
//    declines (v7 and v8 — both removed —, other types, one token, infinite
//    limit);
//  - orch_moe_decode (session 5, MoE v10, 1..8 tokens): see test_decode10;
//  - orch_moe_decode_norm (session 7: the AddRMSNorm folded into v10's route
//    kernel): see test_decode_norm.
//
//   g++ -std=c++20 -O1 -g -pthread -fsanitize=address -Wno-unknown-pragmas -Icuda/include \
//     -o /tmp/moe_emu cuda/test/moe_emu_test.cpp && /tmp/moe_emu [long]
#include <cstdarg>
#include <random>

#include "cuda_emu.h"

#include "emu_decode_shims.h"

#define warp_sum common_warp_sum
#define warp_max common_warp_max
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __shfl_xor_sync(unsigned m, int v, int o) { return (int)__shfl_xor_sync(m, (unsigned)v, o); }
inline int __shfl_sync(unsigned m, int v, int src) { return (int)__shfl_sync(m, (long long)v, src); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float rsqrtf(float v) { return 1.f / std::sqrt(v); } // the device's approximate rsqrt: any function, the same in both kernels
#include "../src/moe_ffn.cu"
#include "../src/moe.cu"
// norm.cu (the reference of the folded AddRMSNorm): its kernels use a static
// __shared__ array: one CTA at a time, so a static local is exactly the CTA's
// array (cuda_emu.h).
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


static uint32_t fbits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// moe6 halves times 2^14 == dec16 halves, as values (exact: both are binary16).
static bool word_matches(uint32_t q) {
  uint32_t a[4], b[4];
  moe6_mxfp4_word(q, a);
  dec16_mxfp4_word(q, b);
  for (int i = 0; i < 4; i++)
    for (int hh = 0; hh < 2; hh++) {
      const float va = dec16_h2f_host((uint16_t)(a[i] >> (16 * hh))) * 16384.f;
      const float vb = dec16_h2f_host((uint16_t)(b[i] >> (16 * hh)));
      if (fbits(va) != fbits(vb)) {
        std::fprintf(stderr, "q=%08x h[%d].%d: moe6 %g (x2^14) vs dec16 %g\n", q, i, hh, va, vb);
        return false;
      }
    }
  return true;
}

static void test_decoder() {
  long n = 0;
  for (int i = 0; i < 4; i++) // nibbles i and i+4 exhaustively, the others random
    for (uint32_t lo = 0; lo < 16; lo++)
      for (uint32_t hi = 0; hi < 16; hi++)
        for (int r = 0; r < 8; r++) {
          uint32_t q = (uint32_t)rng();
          q = (q & ~((0xFu << (4 * i)) | (0xFu << (4 * i + 16)))) | (lo << (4 * i)) | (hi << (4 * i + 16));
          EXPECT(word_matches(q), "moe6_mxfp4_word differs from dec16_mxfp4_word");
          n++;
        }
  for (int r = 0; r < 200000; r++, n++) EXPECT(word_matches((uint32_t)rng()), "moe6_mxfp4_word differs (random)");
  for (uint32_t q : {0u, 0xFFFFFFFFu, 0x88888888u, 0x77777777u, 0x80000000u, 0x08000000u})
    EXPECT(word_matches(q), "moe6_mxfp4_word differs (edge %08x)", q);
  std::printf("moe6_mxfp4_word: %ld words, every value = dec16_mxfp4_word's times 2^-14\n", n);
  // the repacked word (session 12): decoding the re-encoded word gives moe6_mxfp4_word's halves, bit for bit
  auto rp_ok = [](uint32_t q) {
    uint32_t a[4], b[4];
    moe6_mxfp4_word(q, a);
    mxfp4_rp_word(mxfp4_rp_encode(q), b);
    return std::memcmp(a, b, sizeof a) == 0;
  };
  long m = 0;
  for (int i = 0; i < 8; i++) // each nibble exhaustively, the others random
    for (uint32_t v = 0; v < 16; v++)
      for (int r = 0; r < 64; r++, m++) {
        const uint32_t q = ((uint32_t)rng() & ~(0xFu << (4 * i))) | (v << (4 * i));
        EXPECT(rp_ok(q), "mxfp4_rp_word(mxfp4_rp_encode(%08x)) != moe6_mxfp4_word", q);
      }
  for (int r = 0; r < 200000; r++, m++) {
    const uint32_t q = (uint32_t)rng();
    EXPECT(rp_ok(q), "mxfp4_rp_word(mxfp4_rp_encode(%08x)) != moe6_mxfp4_word (random)", q);
  }
  for (int b = 0; b < 32; b++, m++) EXPECT(rp_ok(1u << b), "repacked word: bit %d", b);
  std::printf("mxfp4_rp_word: %ld repacked words decode to moe6_mxfp4_word's halves\n", m);
}


// Runs orch_moe_ffn under version ver; returns out.
static std::vector<float> run_moe(int ver, int t, const QW &gate, const QW &up, const QW &down,
                                  const std::vector<float> &x, const std::vector<float> &gbv,
                                  const std::vector<float> &ubv, const std::vector<float> &dbv,
                                  const std::vector<int32_t> &idv, const std::vector<float> &wv, int n, int topk,
                                  int64_t dim, int64_t ff, bool bias, float limit) {
  orch_ctx ctx;
  ctx.moe = ver;
  Buf<float> bx(x), bgb(gbv), bub(ubv), bdb(dbv), bw(wv), out((size_t)(n * dim), NAN),
      act((size_t)(n * topk * ff), NAN);
  Buf<int32_t> bid(idv);
  const int rc = orch_moe_ffn(&ctx, out.p, bx.p, bid.p, bw.p, gate.bytes, up.bytes, t, bias ? bgb.p : nullptr,
                              bias ? bub.p : nullptr, down.bytes, t, bias ? bdb.p : nullptr, act.p, n, topk, dim, ff,
                              1.702f, limit);
  EXPECT(rc == ORCH_OK, "moe_ffn v%d rc %d (%s)", ver, rc, g_err);
  return out.vec();
}

// float64 reference of the routed FFN: out[i] = sum over slots s of w[i, s] * (down_e . swiglu(gate_e . x_i + gb,
// up_e . x_i + ub) + db), e = ids[i, s] (gb / ub / db null: no biases).
static std::vector<double> ref_moe(const QW &gate, const QW &up, const QW &down, const std::vector<float> &x,
                                   const float *gb, const float *ub, const float *db, const std::vector<int32_t> &ids,
                                   const std::vector<float> &w, int n, int topk, int64_t dim, int64_t ff, double limit) {
  std::vector<double> want((size_t)(n * dim), 0.0);
  for (int i = 0; i < n; i++)
    for (int s = 0; s < topk; s++) {
      const int e = ids[(size_t)(i * topk + s)];
      std::vector<double> act((size_t)ff);
      for (int64_t r = 0; r < ff; r++) {
        double g = gb ? gb[e * ff + r] : 0.0, u = ub ? ub[e * ff + r] : 0.0;
        for (int64_t c = 0; c < dim; c++) {
          g += gate.val[(size_t)((e * ff + r) * dim + c)] * x[(size_t)(i * dim + c)];
          u += up.val[(size_t)((e * ff + r) * dim + c)] * x[(size_t)(i * dim + c)];
        }
        act[(size_t)r] = swiglu(g, u, 1.702, limit);
      }
      for (int64_t r = 0; r < dim; r++) {
        double y = db ? db[e * dim + r] : 0.0;
        for (int64_t c = 0; c < ff; c++) y += down.val[(size_t)((e * dim + r) * ff + c)] * act[(size_t)c];
        want[(size_t)(i * dim + r)] += w[(size_t)(i * topk + s)] * y;
      }
    }
  return want;
}

// Router logits in float64 (rounded to float): lg[i, e] = rb[e] + rw_e . x_i (rb null: no bias).
static std::vector<float> ref_logits(const std::vector<float> &rw, const std::vector<float> &x, const float *rb, int n,
                                     int ne, int64_t dim) {
  std::vector<float> lg((size_t)(n * ne));
  for (int i = 0; i < n; i++)
    for (int e = 0; e < ne; e++) {
      double v = rb ? rb[e] : 0.0;
      for (int64_t c = 0; c < dim; c++) v += (double)rw[(size_t)(e * dim + c)] * x[(size_t)(i * dim + c)];
      lg[(size_t)(i * ne + e)] = (float)v;
    }
  return lg;
}

// spread: multiply every 7th x element by 1e-6 (chunks whose small elements
// stage as fp16 subnormals in v4: v6 must round them identically).
// limit = +inf: no fixed staging scale for down (chunk-scaled as v4), so v6
// must equal v4 bit for bit; gpt-oss's 7: fixed scale, within 1e-4 of v4.
static void test_moe(int t, int64_t dim, int64_t ff, int ne, int topk, int n, bool bias, bool spread,
                     float limit = 7.f) {
  QW gate, up, down;
  make_weight(gate, t, dim, ff * ne);
  make_weight(up, t, dim, ff * ne);
  make_weight(down, t, ff, dim * ne);
  auto x = randv((size_t)(n * dim), 1.f);
  if (spread)
    for (size_t i = 0; i < x.size(); i += 7) x[i] *= 1e-6f;
  const auto gbv = randv((size_t)(ff * ne), 1.f), ubv = randv((size_t)(ff * ne), 1.f),
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
  const auto want = ref_moe(gate, up, down, x, bias ? gbv.data() : nullptr, bias ? ubv.data() : nullptr,
                            bias ? dbv.data() : nullptr, idv, wv, n, topk, dim, ff, limit);
  const auto o4 = run_moe(4, t, gate, up, down, x, gbv, ubv, dbv, idv, wv, n, topk, dim, ff, bias, limit);
  const auto o6 = run_moe(6, t, gate, up, down, x, gbv, ubv, dbv, idv, wv, n, topk, dim, ff, bias, limit);
  // The down kernel's speculative routing reads all return a wrong expert
  // (kept to the small cases: the emulation of each launch is slow).
  const bool stale = dim * ff <= 64 * 64;
  std::vector<float> o6s = o6;
  if (stale) {
    g_moe6_stale_id = idv[0] == 0 ? 1 : 0;
    o6s = run_moe(6, t, gate, up, down, x, gbv, ubv, dbv, idv, wv, n, topk, dim, ff, bias, limit);
    g_moe6_stale_id = -1;
  }
  const double e4 = rel_l2(o4, want), e6 = rel_l2(o6, want);
  EXPECT(e6 <= 6e-3 && e4 <= 6e-3, "MoE %s dim=%lld ff=%lld top-%d n=%d: relative error v6 %.3g v4 %.3g > 6e-3",
         tname(t), (long long)dim, (long long)ff, topk, n, e6, e4);
  const bool fixed = std::isfinite(limit);
  std::vector<double> o4d(o4.begin(), o4.end());
  const double d46 = rel_l2(o6, o4d);
  if (fixed)
    EXPECT(d46 <= 1e-4, "MoE v6 vs v4 (%s dim=%lld ff=%lld n=%d, fixed down scale): relative difference %.3g",
           tname(t), (long long)dim, (long long)ff, n, d46);
  else
    EXPECT(std::memcmp(o4.data(), o6.data(), o4.size() * 4) == 0,
           "MoE v6 != v4 bit for bit (%s dim=%lld ff=%lld n=%d, chunk-scaled down staging)", tname(t), (long long)dim,
           (long long)ff, n);
  EXPECT(std::memcmp(o6.data(), o6s.data(), o6.size() * 4) == 0,
         "MoE v6 with stale speculative routing != v6 (%s dim=%lld ff=%lld n=%d)", tname(t), (long long)dim,
         (long long)ff, n);
  std::printf("MoE v6 %-5s dim=%-4lld ff=%-4lld top-%d n=%d bias=%d spread=%d limit=%g: relative error %.2e (v4 %.2e), "
              "v6 vs v4 %.2e%s%s\n",
              tname(t), (long long)dim, (long long)ff, topk, n, bias, spread, limit, e6, e4, d46,
              fixed ? "" : " (bit-identical)", stale ? "; with stale speculative routing: bit-identical" : "");
}

// moe6_act_scale: the activation bound it assumes holds (dense grid over
// gate/up incl. the clamps), the scales for gpt-oss, and 0 for bad limits.
static void test_act_scale() {
  const double alpha = 1.702, L = 7.0, A = (L + 1) * std::max(L, 0.2785 / alpha);
  double worst = 0;
  for (double g = -50; g <= 50; g += 0.001)
    for (double u : {-100.0, -7.0, -1.0, 0.0, 7.0, 100.0}) worst = std::max(worst, std::fabs(swiglu(g, u, alpha, L)));
  EXPECT(worst <= A, "swiglu bound: max |act| %.6g > %.6g", worst, A);
  for (double g = -3; g <= 0; g += 1e-5) // the negative minimum g s(alpha g) = -0.2785 / alpha
    EXPECT(g / (1 + std::exp(-alpha * g)) >= -0.2785 / alpha - 1e-12, "g s(alpha g) below the assumed minimum at %g", g);
  EXPECT(moe6_act_scale<ORCH_T_MXFP4>(1.702f, 7.f) == 1024.f, "MXFP4 scale %g", moe6_act_scale<ORCH_T_MXFP4>(1.702f, 7.f));
  EXPECT(moe6_act_scale<ORCH_T_Q8_0>(1.702f, 7.f) == 1.f, "Q8_0 scale %g", moe6_act_scale<ORCH_T_Q8_0>(1.702f, 7.f));
  EXPECT(moe6_act_scale<ORCH_T_Q4_0>(1.702f, 7.f) == 16.f, "Q4_0 scale %g", moe6_act_scale<ORCH_T_Q4_0>(1.702f, 7.f));
  for (float lim : {INFINITY, NAN, -1.f, 1e7f}) EXPECT(moe6_act_scale<ORCH_T_MXFP4>(1.702f, lim) == 0.f, "limit %g", lim);
  EXPECT(moe6_act_scale<ORCH_T_MXFP4>(0.f, 7.f) == 0.f, "alpha 0");
  std::printf("moe6_act_scale: |act| <= %.2f (max seen %.4f); 2^10 (MXFP4), 2^0 (Q8_0), 2^4 (Q4_0) at gpt-oss's limit\n", A,
              worst);
}

// orch_moe_topk under v6 (moe_topk32_kernel) against v4 (moe_topk_kernel):
// identical ids and weights, with ties and -inf logits, n_exp <= 32.
static void test_topk() {
  int cases = 0;
  for (int n_exp : {32, 20, 8})
    for (int k : {4, 1, 2, 8}) {
      const int64_t n = 9;
      std::vector<float> lg((size_t)(n * n_exp));
      for (size_t i = 0; i < lg.size(); i++) {
        const unsigned r = (unsigned)rng() % 10;
        lg[i] = r == 0 ? -INFINITY : r < 4 ? (float)(rng() % 3) : std::normal_distribution<float>(0.f, 2.f)(rng);
      }
      std::vector<int32_t> id[2];
      std::vector<float> w[2];
      for (int v = 0; v < 2; v++) {
        orch_ctx ctx;
        ctx.moe = v ? 6 : 4;
        Buf<float> l(lg), wb((size_t)(n * k), NAN);
        Buf<int32_t> ib((size_t)(n * k), -1);
        EXPECT(orch_moe_topk(&ctx, ib.p, wb.p, l.p, n, n_exp, k) == ORCH_OK, "moe_topk: %s", g_err);
        id[v] = ib.vec();
        w[v] = wb.vec();
      }
      EXPECT(id[0] == id[1], "top-k ids differ (n_exp=%d k=%d)", n_exp, k);
      EXPECT(std::memcmp(w[0].data(), w[1].data(), w[0].size() * 4) == 0, "top-k weights differ (n_exp=%d k=%d)", n_exp, k);
      for (int32_t e : id[1]) EXPECT(e >= 0 && e < n_exp, "top-k id %d out of range", e);
      cases++;
    }
  std::printf("top-k v6 (lane ranks): ids and weights identical to v4 in %d configurations (ties, -inf)\n", cases);
}

// MoE v9 (orch_moe_ffn_route, 2..64 tokens, MXFP4: expert-major tensor-core
// kernels, each expert decoded once for its tokens) against a float64
// reference (no worse than v6), with orch_moe_topk's ids and weights; v6, v7,
// v8 (removed), other types, one token and an infinite limit decline.
static void test_route(int t, int64_t dim, int64_t ff, int ne, int topk, int n, bool bias, float limit = 7.f,
                       bool skew = false) {
  QW gate, up, down;
  make_weight(gate, t, dim, ff * ne);
  make_weight(up, t, dim, ff * ne);
  make_weight(down, t, ff, dim * ne);
  const auto x = randv((size_t)(n * dim), 1.f);
  const auto gbv = randv((size_t)(ff * ne), 1.f), ubv = randv((size_t)(ff * ne), 1.f),
             dbv = randv((size_t)(dim * ne), 1.f);
  std::vector<float> lg((size_t)(n * ne));
  for (size_t i = 0; i < lg.size(); i++) { // ties and -inf included
    const unsigned r = (unsigned)rng() % 10;
    lg[i] = r == 0 ? -INFINITY : r < 3 ? (float)(rng() % 3) : std::normal_distribution<float>(0.f, 2.f)(rng);
    if (skew && (int)(i % ne) < topk) lg[i] = 50.f + (float)(i % ne); // every token: experts 0..topk-1
  }
  Buf<float> bx(x), bgb(gbv), bub(ubv), bdb(dbv), bl(lg);
  auto gp = [&](Buf<float> &b) { return bias ? b.p : nullptr; };
  // v6: top-k kernel, then the fused FFN.
  std::vector<int32_t> id6;
  std::vector<float> w6, o6;
  {
    orch_ctx ctx;
    ctx.moe = 6;
    ctx.moe_auto = false;
    Buf<int32_t> ib((size_t)(n * topk), -1);
    Buf<float> wb((size_t)(n * topk), NAN), out((size_t)(n * dim), NAN), act((size_t)(n * topk * ff), NAN);
    EXPECT(orch_moe_topk(&ctx, ib.p, wb.p, bl.p, n, ne, topk) == ORCH_OK, "moe_topk: %s", g_err);
    EXPECT(orch_moe_ffn_route(&ctx, out.p, bx.p, bl.p, ne, ib.p, wb.p, gate.bytes, up.bytes, t, gp(bgb), gp(bub),
                              down.bytes, t, gp(bdb), act.p, nullptr, n, topk, dim, ff, 1.702f,
                              limit) == ORCH_ERR_UNSUPPORTED,
           "moe_ffn_route must decline under v6");
    EXPECT(orch_moe_ffn(&ctx, out.p, bx.p, ib.p, wb.p, gate.bytes, up.bytes, t, gp(bgb), gp(bub), down.bytes, t,
                        gp(bdb), act.p, n, topk, dim, ff, 1.702f, limit) == ORCH_OK,
           "moe_ffn v6: %s", g_err);
    id6 = ib.vec();
    w6 = wb.vec();
    o6 = out.vec();
  }
  double e9 = -1;
  std::vector<float> o9;
  for (int ver : {7, 8, 9, 0}) { // 0: unpinned (ORCH_CUDA_MOE unset): v9 for MXFP4 from 16 tokens, else decline
    orch_ctx ctx;
    ctx.moe = ver ? ver : 6;
    ctx.moe_auto = ver == 0;
    Buf<int32_t> ib((size_t)(n * topk), -1);
    Buf<float> wb((size_t)(n * topk), NAN), out((size_t)(n * dim), NAN), act((size_t)(n * topk * ff), NAN),
        yb((size_t)(n * topk * dim), NAN);
    const int rc = orch_moe_ffn_route(&ctx, out.p, bx.p, bl.p, ne, ib.p, wb.p, gate.bytes, up.bytes, t, gp(bgb),
                                      gp(bub), down.bytes, t, gp(bdb), act.p, yb.p, n, topk, dim, ff, 1.702f, limit);
    if (ver == 0) {
      if (t == ORCH_T_MXFP4 && n >= 16 && std::isfinite(limit)) {
        EXPECT(rc == ORCH_OK && std::memcmp(out.vec().data(), o9.data(), o9.size() * 4) == 0,
               "unpinned route at n=%d must be v9 (rc %d)", n, rc);
      } else {
        EXPECT(rc == ORCH_ERR_UNSUPPORTED, "unpinned route at n=%d must decline (rc %d)", n, rc);
      }
      continue;
    }
    if (ver != 9 || t != ORCH_T_MXFP4 || n == 1 || !std::isfinite(limit)) { // declines: v6 runs
      EXPECT(rc == ORCH_ERR_UNSUPPORTED, "moe_ffn_route v%d must decline (%s n=%d limit=%g): rc %d", ver, tname(t), n,
             limit, rc);
      continue;
    }
    EXPECT(rc == ORCH_OK, "moe_ffn_route v%d rc %d (%s)", ver, rc, g_err);
    EXPECT(ib.vec() == id6, "v%d ids differ from orch_moe_topk's (%s n=%d top-%d of %d)", ver, tname(t), n, topk, ne);
    const auto w7 = wb.vec(), o7 = out.vec();
    EXPECT(std::memcmp(w7.data(), w6.data(), w6.size() * 4) == 0, "v%d weights differ from orch_moe_topk's", ver);
    { // v9, tensor cores: fp32 sums, not v6's fp16 partial sums
      // float64 reference of the routed FFN (ids / weights as orch_moe_topk's)
      const auto want = ref_moe(gate, up, down, x, bias ? gbv.data() : nullptr, bias ? ubv.data() : nullptr,
                                bias ? dbv.data() : nullptr, id6, w6, n, topk, dim, ff, limit);
      e9 = rel_l2(o7, want);
      o9 = o7;
      const double e6 = rel_l2(o6, want);
      EXPECT(e9 <= 6e-3 && e9 <= 1.5 * e6, "MoE v9 (%s dim=%lld ff=%lld top-%d of %d n=%d): relative error %.3g (v6 %.3g)",
             tname(t), (long long)dim, (long long)ff, topk, ne, n, e9, e6);
    }
  }
  std::printf("MoE v9 %-5s dim=%-4lld ff=%-4lld top-%d of %d n=%d bias=%d%s limit=%g: %s", tname(t), (long long)dim,
              (long long)ff, topk, ne, n, bias, skew ? " skewed" : "", limit,
              e9 < 0 ? "declined (v6 runs)" : "ids, weights = orch_moe_topk's");
  if (e9 >= 0) std::printf("; v9 (tensor cores): relative error %.2e", e9);
  std::printf("\n");
}

// MoE v10 (orch_moe_decode, 1..8 tokens; ORCH_CUDA_MOE=v10): the route
// kernel (router partials per 64-wide slice, the last CTA of each token
// (atomic ticket) summing them and running the top-k; x staged once), then
// gate_up10 / down10. Checks: ids = orch_moe_topk's over the float64 logits
// (rounded to float), weights within 1e-5; the output = orch_moe_ffn under v6
// with v10's ids and weights BIT FOR BIT; a second call identical (the tickets
// wrap back to 0: checked); stale speculative routing reads in down10 change
// nothing; the declines (pinned to v6, unpinned at one token, 9 tokens,
// infinite limit); unpinned from 2 tokens = v10.
static void test_decode10(int t, int64_t dim, int64_t ff, int ne, int topk, int n, bool bias, bool stale = false) {
  QW gate, up, down;
  make_weight(gate, t, dim, ff * ne);
  make_weight(up, t, dim, ff * ne);
  make_weight(down, t, ff, dim * ne);
  const auto x = randv((size_t)(n * dim), 1.f), rw = randv((size_t)(ne * dim), 1.f), rb = randv((size_t)ne, 4.f);
  const auto gbv = randv((size_t)(ff * ne), 1.f), ubv = randv((size_t)(ff * ne), 1.f),
             dbv = randv((size_t)(dim * ne), 1.f);
  Buf<float> bx(x), brw(rw), brb(rb), bgb(gbv), bub(ubv), bdb(dbv);
  auto gp = [&](Buf<float> &b) { return bias ? b.p : nullptr; };
  const float limit = 7.f;
  // reference routing: orch_moe_topk (v6) over the float64 logits
  const auto lg = ref_logits(rw, x, bias ? rb.data() : nullptr, n, ne, dim);
  std::vector<int32_t> idr;
  std::vector<float> wr;
  {
    orch_ctx ctx;
    ctx.moe = 6;
    Buf<float> l(lg), wb((size_t)(n * topk), NAN);
    Buf<int32_t> ib((size_t)(n * topk), -1);
    EXPECT(orch_moe_topk(&ctx, ib.p, wb.p, l.p, n, ne, topk) == ORCH_OK, "moe_topk: %s", g_err);
    idr = ib.vec();
    wr = wb.vec();
  }
  const char *ver = "v10";
  auto run10 = [&](bool pinned, int nn, float lim, std::vector<int32_t> *ids, std::vector<float> *w,
                   std::vector<float> *o) {
    if (pinned) setenv("ORCH_CUDA_MOE", ver, 1);
    orch_ctx ctx;
    ctx.moe = 6;
    ctx.moe_auto = false;
    Buf<int32_t> ib((size_t)(nn * topk), -1);
    Buf<float> wb((size_t)(nn * topk), NAN), out((size_t)(nn * dim), NAN), act((size_t)(nn * topk * ff), NAN),
        yb((size_t)(nn * topk * dim), NAN), xx((size_t)(nn * dim), 0.5f);
    const int rc = orch_moe_decode(&ctx, out.p, nn <= n ? bx.p : xx.p, brw.p, ORCH_T_F32, gp(brb), ne, ib.p, wb.p,
                                   gate.bytes, up.bytes, t, gp(bgb), gp(bub), down.bytes, t, gp(bdb), act.p, yb.p, nn,
                                   topk, dim, ff, 1.702f, lim);
    unsetenv("ORCH_CUDA_MOE");
    if (ids) *ids = ib.vec();
    if (w) *w = wb.vec();
    if (o) *o = out.vec();
    return rc;
  };
  std::vector<int32_t> id10;
  std::vector<float> w10, o10, o10b, o10s;
  EXPECT(run10(true, n, limit, &id10, &w10, &o10) == ORCH_OK, "moe_decode v10: %s", g_err);
  for (int i = 0; i < MOE10_MAX_N; i++) EXPECT(g_moe10_ticket[i] == 0, "ticket %d = %u after the op", i, g_moe10_ticket[i]);
  EXPECT(id10 == idr, "v10 ids differ from orch_moe_topk's over the float64 logits (%s n=%d top-%d of %d)", tname(t), n,
         topk, ne);
  for (size_t i = 0; i < wr.size(); i++)
    EXPECT(std::fabs(w10[i] - wr[i]) <= 1e-5f * (1.f + std::fabs(wr[i])), "v10 weight %zu: %g vs %g", i, w10[i], wr[i]);
  EXPECT(run10(true, n, limit, nullptr, nullptr, &o10b) == ORCH_OK, "moe_decode v10 (again): %s", g_err);
  EXPECT(std::memcmp(o10.data(), o10b.data(), o10.size() * 4) == 0, "v10: a second call differs");
  if (stale) {
    g_moe6_stale_id = id10[0] == 0 ? 1 : 0;
    EXPECT(run10(true, n, limit, nullptr, nullptr, &o10s) == ORCH_OK, "moe_decode v10 (stale): %s", g_err);
    g_moe6_stale_id = -1;
    EXPECT(std::memcmp(o10.data(), o10s.data(), o10.size() * 4) == 0, "v10 with stale speculative routing differs");
  }
  if (t == ORCH_T_MXFP4) { // the repacked rows (ORCH_T_MXFP4_DUAL): v10's output, ids and weights bit for bit
    DualW dg(gate, ORCH_T_MXFP4, ff * ne, dim), du(up, ORCH_T_MXFP4, ff * ne, dim), dd(down, ORCH_T_MXFP4, dim * ne, ff);
    setenv("ORCH_CUDA_MOE", ver, 1);
    orch_ctx ctx;
    ctx.moe = 6;
    ctx.moe_auto = false;
    Buf<int32_t> ib((size_t)(n * topk), -1);
    Buf<float> wb((size_t)(n * topk), NAN), out((size_t)(n * dim), NAN), act((size_t)(n * topk * ff), NAN),
        yb((size_t)(n * topk * dim), NAN);
    const int rc = orch_moe_decode(&ctx, out.p, bx.p, brw.p, ORCH_T_F32, gp(brb), ne, ib.p, wb.p, dg.p, du.p,
                                   ORCH_T_MXFP4_DUAL, gp(bgb), gp(bub), dd.p, ORCH_T_MXFP4_DUAL, gp(bdb), act.p, yb.p, n,
                                   topk, dim, ff, 1.702f, limit);
    const int rc1 = orch_moe_decode(&ctx, out.p, bx.p, brw.p, ORCH_T_F32, gp(brb), ne, ib.p, wb.p, dg.p, du.p,
                                    ORCH_T_MXFP4_DUAL, gp(bgb), gp(bub), dd.p, ORCH_T_MXFP4, gp(bdb), act.p, yb.p, n,
                                    topk, dim, ff, 1.702f, limit);
    // with the biases / routing weights loaded after the dots (ORCH_CUDA_MOE10_BPF=0; the default copies them early)
    Buf<float> outp((size_t)(n * dim), NAN);
    g_moe10_bpf_force = 0;
    const int rc2 = orch_moe_decode(&ctx, outp.p, bx.p, brw.p, ORCH_T_F32, gp(brb), ne, ib.p, wb.p, dg.p, du.p,
                                    ORCH_T_MXFP4_DUAL, gp(bgb), gp(bub), dd.p, ORCH_T_MXFP4_DUAL, gp(bdb), act.p, yb.p,
                                    n, topk, dim, ff, 1.702f, limit);
    g_moe10_bpf_force = -1;
    unsetenv("ORCH_CUDA_MOE");
    EXPECT(rc2 == ORCH_OK && std::memcmp(outp.vec().data(), o10.data(), o10.size() * 4) == 0,
           "MoE v10 on the repacked rows with ORCH_CUDA_MOE10_BPF=0 != the default bit for bit (rc %d)", rc2);
    EXPECT(rc == ORCH_OK, "moe_decode (dual): %s", g_err);
    EXPECT(rc1 == ORCH_ERR_UNSUPPORTED, "moe_decode with gate / up dual and down not must decline (rc %d)", rc1);
    EXPECT(ib.vec() == id10 && std::memcmp(wb.vec().data(), w10.data(), w10.size() * 4) == 0,
           "dual: routing != v10's");
    EXPECT(std::memcmp(out.vec().data(), o10.data(), o10.size() * 4) == 0,
           "MoE v10 on the repacked rows != v10 bit for bit (dim=%lld ff=%lld n=%d)", (long long)dim, (long long)ff, n);
    std::printf("MoE v10 on repacked MXFP4 rows (ORCH_T_MXFP4_DUAL) n=%d: output = v10's bit for bit\n", n);
  }
  // v6 on v10's routing
  {
    orch_ctx ctx;
    ctx.moe = 6;
    Buf<int32_t> ib(id10);
    Buf<float> wb(w10), out((size_t)(n * dim), NAN), act((size_t)(n * topk * ff), NAN);
    EXPECT(orch_moe_ffn(&ctx, out.p, bx.p, ib.p, wb.p, gate.bytes, up.bytes, t, gp(bgb), gp(bub), down.bytes, t,
                        gp(bdb), act.p, n, topk, dim, ff, 1.702f, limit) == ORCH_OK,
           "moe_ffn v6: %s", g_err);
    const auto o6 = out.vec();
    EXPECT(std::memcmp(o10.data(), o6.data(), o6.size() * 4) == 0,
           "MoE v10 != v6 bit for bit (%s dim=%lld ff=%lld top-%d of %d n=%d)", tname(t), (long long)dim,
           (long long)ff, topk, ne, n);
  }
  EXPECT(run10(false, n, limit, nullptr, nullptr, nullptr) == ORCH_ERR_UNSUPPORTED, "moe_decode under v6 must decline");
  { // unpinned (ORCH_CUDA_MOE unset): v10 from MOE10_AUTO_MIN_N tokens, else decline (v6)
    orch_ctx ctx;
    ctx.moe = 6;
    ctx.moe_auto = true;
    Buf<int32_t> ib((size_t)(n * topk), -1);
    Buf<float> wb((size_t)(n * topk), NAN), out((size_t)(n * dim), NAN), act((size_t)(n * topk * ff), NAN),
        yb((size_t)(n * topk * dim), NAN);
    const int rc = orch_moe_decode(&ctx, out.p, bx.p, brw.p, ORCH_T_F32, gp(brb), ne, ib.p, wb.p, gate.bytes, up.bytes,
                                   t, gp(bgb), gp(bub), down.bytes, t, gp(bdb), act.p, yb.p, n, topk, dim, ff, 1.702f,
                                   limit);
    if (n >= MOE10_AUTO_MIN_N)
      EXPECT(rc == ORCH_OK && std::memcmp(out.vec().data(), o10.data(), o10.size() * 4) == 0,
             "unpinned moe_decode at n=%d must be v10 (rc %d)", n, rc);
    else
      EXPECT(rc == ORCH_ERR_UNSUPPORTED, "unpinned moe_decode at n=%d must decline (rc %d)", n, rc);
  }
  EXPECT(run10(true, n, INFINITY, nullptr, nullptr, nullptr) == ORCH_ERR_UNSUPPORTED,
         "moe_decode must decline an infinite limit");
  EXPECT(run10(true, MOE10_MAX_N + 1, limit, nullptr, nullptr, nullptr) == ORCH_ERR_UNSUPPORTED,
         "moe_decode must decline %d tokens", MOE10_MAX_N + 1);
  std::printf("MoE v10 %-5s dim=%-4lld ff=%-4lld top-%d of %d n=%d bias=%d: ids = top-k of the float64 logits, output = "
              "v6's bit for bit, tickets back to 0%s\n",
              tname(t), (long long)dim, (long long)ff, topk, ne, n, bias,
              stale ? ", stale speculative routing: bit-identical" : "");
}

// orch_moe_decode_norm (session 7): res += add, h = RMSNorm(res) * nw, then
// the MoE of h, the norm folded into v10's route kernel. Checks against
// norm.cu's launch_norm followed by orch_moe_decode (pinned v10) on its
// output: res, h, ids, weights and the output BIT FOR BIT; tickets back to 0;
// unpinned at one token it runs (v10), pinned to v6 it declines (nothing
// written), dim > 4096 declines.
static void test_decode_norm(int t, int64_t dim, int64_t ff, int ne, int topk, int n, bool bias,
                             const char *ver = "v10") {
  const bool v13 = std::strcmp(ver, "v13") == 0; // MoE v13's route kernel (unpinned: ORCH_CUDA_MOE13_FROM=2)
  QW gate, up, down;
  make_weight(gate, t, dim, ff * ne);
  make_weight(up, t, dim, ff * ne);
  make_weight(down, t, ff, dim * ne);
  const auto res0 = randv((size_t)(n * dim), 4.f), add = randv((size_t)(n * dim), 1.f), nwv = randv((size_t)dim, 1.f);
  const auto rw = randv((size_t)(ne * dim), 1.f), rb = randv((size_t)ne, 4.f);
  const auto gbv = randv((size_t)(ff * ne), 1.f), ubv = randv((size_t)(ff * ne), 1.f),
             dbv = randv((size_t)(dim * ne), 1.f);
  Buf<float> badd(add), bnw(nwv), brw(rw), brb(rb), bgb(gbv), bub(ubv), bdb(dbv);
  auto gp = [&](Buf<float> &b) { return bias ? b.p : nullptr; };
  const float limit = 7.f, eps = 1e-5f;
  const size_t nd = (size_t)(n * dim);
  // reference: the norm kernel, then v10 on its output
  std::vector<float> rres, rh, rout, rw8;
  std::vector<int32_t> rid;
  {
    Buf<float> res(res0), h(nd, NAN);
    launch_norm<false>(nullptr, n, h.p, res.p, badd.p, bnw.p, nullptr, dim, eps);
    setenv("ORCH_CUDA_MOE", ver, 1);
    orch_ctx ctx;
    ctx.moe = 6;
    ctx.moe_auto = false;
    Buf<int32_t> ib((size_t)(n * topk), -1);
    Buf<float> wb((size_t)(n * topk), NAN), out(nd, NAN), act((size_t)(n * topk * ff), NAN),
        yb((size_t)(n * topk * dim), NAN);
    const int rc = orch_moe_decode(&ctx, out.p, h.p, brw.p, ORCH_T_F32, gp(brb), ne, ib.p, wb.p, gate.bytes, up.bytes,
                                   t, gp(bgb), gp(bub), down.bytes, t, gp(bdb), act.p, yb.p, n, topk, dim, ff, 1.702f,
                                   limit);
    unsetenv("ORCH_CUDA_MOE");
    EXPECT(rc == ORCH_OK, "moe_decode %s (reference): %s", ver, g_err);
    rres = res.vec();
    rh = h.vec();
    rout = out.vec();
    rid = ib.vec();
    rw8 = wb.vec();
  }
  auto fused = [&](bool unpinned, int64_t d2, std::vector<float> *o, std::vector<float> *r, std::vector<float> *hh,
                   std::vector<int32_t> *ids, std::vector<float> *w) {
    orch_ctx ctx;
    ctx.moe = 6;
    ctx.moe_auto = unpinned;
    Buf<float> res(res0), h(nd, NAN), out(nd, NAN), wb((size_t)(n * topk), NAN), act((size_t)(n * topk * ff), NAN),
        yb((size_t)(n * topk * dim), NAN);
    Buf<int32_t> ib((size_t)(n * topk), -1);
    if (v13 && unpinned) setenv("ORCH_CUDA_MOE13_FROM", "2", 1);
    const int rc = orch_moe_decode_norm(&ctx, out.p, h.p, res.p, badd.p, bnw.p, eps, brw.p, ORCH_T_F32, gp(brb), ne,
                                        ib.p, wb.p, gate.bytes, up.bytes, t, gp(bgb), gp(bub), down.bytes, t, gp(bdb),
                                        act.p, yb.p, n, topk, d2, ff, 1.702f, limit);
    unsetenv("ORCH_CUDA_MOE13_FROM");
    if (o) *o = out.vec();
    if (r) *r = res.vec();
    if (hh) *hh = h.vec();
    if (ids) *ids = ib.vec();
    if (w) *w = wb.vec();
    return rc;
  };
  std::vector<float> o, r, hh, w;
  std::vector<int32_t> ids;
  EXPECT(fused(true, dim, &o, &r, &hh, &ids, &w) == ORCH_OK, "moe_decode_norm: %s", g_err);
  for (int i = 0; i < MOE13_MAX_N; i++) EXPECT(g_moe10_ticket[i] == 0, "ticket %d = %u after the op", i, g_moe10_ticket[i]);
  EXPECT(g_moe13_done == 0, "done ticket = %u after the op", g_moe13_done);
  const char *tn = tname(t);
  EXPECT(std::memcmp(r.data(), rres.data(), nd * 4) == 0, "fold: res != norm.cu's (%s dim=%lld n=%d)", tn, (long long)dim, n);
  EXPECT(std::memcmp(hh.data(), rh.data(), nd * 4) == 0, "fold: h != norm.cu's (%s dim=%lld n=%d)", tn, (long long)dim, n);
  EXPECT(ids == rid && std::memcmp(w.data(), rw8.data(), w.size() * 4) == 0, "fold: routing != v10's (%s dim=%lld n=%d)",
         tn, (long long)dim, n);
  EXPECT(std::memcmp(o.data(), rout.data(), nd * 4) == 0, "fold: output != norm + v10 (%s dim=%lld n=%d)", tn,
         (long long)dim, n);
  if (!v13) { // orch_moe_decode_addnorm: the same op + the next RMSNorm's producer half in down10
    const auto r2v = randv(nd, 2.f), nw2 = randv((size_t)dim, 1.f);
    {
    for (int with_norm = 1; with_norm >= 0; with_norm--) {
      orch_ctx ctx;
      ctx.moe = 6;
      ctx.moe_auto = true;
      Buf<float> res(res0), h(rh), out(nd, NAN), wb((size_t)(n * topk), NAN), act((size_t)(n * topk * ff), NAN),
          yb((size_t)(n * topk * dim), NAN), r2(r2v), bnw2(nw2), xt(nd, NAN), ss((size_t)(n * dim / 8), NAN);
      Buf<int32_t> ib((size_t)(n * topk), -1);
      const int rc = orch_moe_decode_addnorm(&ctx, out.p, h.p, with_norm ? res.p : nullptr, badd.p, bnw.p, eps, brw.p,
                                             ORCH_T_F32, gp(brb), ne, ib.p, wb.p, gate.bytes, up.bytes, t, gp(bgb),
                                             gp(bub), down.bytes, t, gp(bdb), act.p, yb.p, n, topk, dim, ff, 1.702f,
                                             limit, r2.p, bnw2.p, xt.p, ss.p);
      EXPECT(rc == ORCH_OK, "moe_decode_addnorm (norm %d): rc %d %s", with_norm, rc, g_err);
      const auto ov = out.vec(), r2o = r2.vec(), xto = xt.vec(), sso = ss.vec();
      EXPECT(std::memcmp(ov.data(), rout.data(), nd * 4) == 0, "addnorm: output != orch_moe_decode's (norm %d)", with_norm);
      if (with_norm) EXPECT(std::memcmp(res.vec().data(), rres.data(), nd * 4) == 0, "addnorm: res != norm.cu's");
      for (size_t i = 0; i < nd; i++) {
        const float want = r2v[i] + ov[i];
        EXPECT(fbits(r2o[i]) == fbits(want), "addnorm: res2[%zu] %g vs %g", i, r2o[i], want);
        EXPECT(fbits(xto[i]) == fbits(want * nw2[i % dim]), "addnorm: xt[%zu]", i);
      }
      for (int tt = 0; tt < n; tt++)
        for (int64_t b = 0; b < dim / 8; b++) {
          float sum = 0.f;
          for (int w = 0; w < 8; w++) {
            const float v = r2o[(size_t)(tt * dim + 8 * b + w)];
            sum += v * v;
          }
          EXPECT(fbits(sso[(size_t)(tt * (dim / 8) + b)]) == fbits(sum), "addnorm: ss[%d][%lld]", tt, (long long)b);
        }
    }
    }
    if (n >= 2) { // where orch_moe_decode_norm runs MoE v13 (ORCH_CUDA_MOE13_FROM=2), the addnorm entry declines
      setenv("ORCH_CUDA_MOE13_FROM", "2", 1);
      orch_ctx ctx;
      ctx.moe = 6;
      ctx.moe_auto = true;
      Buf<float> res(res0), h(rh), out(nd, NAN), wb((size_t)(n * topk), NAN), act((size_t)(n * topk * ff), NAN),
          yb((size_t)(n * topk * dim), NAN), r2(r2v), bnw2(nw2), xt(nd, NAN), ss((size_t)(n * dim / 8), NAN);
      Buf<int32_t> ib((size_t)(n * topk), -1);
      const int rc = orch_moe_decode_addnorm(&ctx, out.p, h.p, res.p, badd.p, bnw.p, eps, brw.p, ORCH_T_F32, gp(brb),
                                             ne, ib.p, wb.p, gate.bytes, up.bytes, t, gp(bgb), gp(bub), down.bytes, t,
                                             gp(bdb), act.p, yb.p, n, topk, dim, ff, 1.702f, limit, r2.p, bnw2.p, xt.p,
                                             ss.p);
      const bool v13runs =
          moe13_on(&ctx, n) && !moe13_declines(&ctx, n, ORCH_T_F32, ne, t, t, topk, dim, ff, 1.702f, limit);
      unsetenv("ORCH_CUDA_MOE13_FROM");
      EXPECT(rc == (n >= 2 && v13runs ? ORCH_ERR_UNSUPPORTED : ORCH_OK),
             "addnorm must decline exactly where v13 runs (%s dim=%lld ff=%lld n=%d): rc %d", tname(t), (long long)dim,
             (long long)ff, n, rc);
      if (t == ORCH_T_MXFP4 && dim == 64 && ff == 64) EXPECT(rc == ORCH_ERR_UNSUPPORTED, "this case: v13 runs");
    }
    std::printf("MoE v10 + next norm's producer (orch_moe_decode_addnorm) %-5s dim=%lld n=%d: output = orch_moe_decode's, "
                "res2 / xt / ss exact\n", tn, (long long)dim, n);
  }
  // declines: pinned to another version (nothing written), dim > 4096
  EXPECT(fused(false, dim, &o, &r, &hh, nullptr, nullptr) == ORCH_ERR_UNSUPPORTED, "moe_decode_norm under v6 must decline");
  EXPECT(std::memcmp(r.data(), res0.data(), nd * 4) == 0 && std::isnan(hh[0]) && std::isnan(o[0]),
         "moe_decode_norm wrote something while declining");
  EXPECT(fused(true, 4096 + 32, nullptr, nullptr, nullptr, nullptr, nullptr) == ORCH_ERR_UNSUPPORTED,
         "moe_decode_norm must decline dim > 4096");
  std::printf("MoE %s + AddRMSNorm %-5s dim=%-4lld ff=%-4lld top-%d of %d n=%d bias=%d: res, h = norm.cu's, routing "
              "and output = orch_moe_decode's, bit for bit\n",
              ver, tn, (long long)dim, (long long)ff, topk, ne, n, bias);
}

// MoE v13 (orch_moe_decode, 2..64 tokens, MXFP4; ORCH_CUDA_MOE=v13, or
// unpinned from ORCH_CUDA_MOE13_FROM tokens): v10's route kernel for up to 64
// tokens + the pairs grouped by expert once (moe13_group), then gate_up13 /
// down13 (each expert's 16-row tiles copied into shared memory once for all
// its tokens; the last CTA of each row tile combines the slots). Checks: ids = orch_moe_topk's over the
// float64 logits, weights within 1e-5; the output = v9's kernels
// (launch_batched9) + combine on v13's ids and weights BIT FOR BIT, and
// within 6e-3 of a float64 reference; the grouping table (every pair once,
// under its expert, ascending); tickets back to 0; a second call identical;
// a stale early expert read in down13 changes nothing; declines (one token,
// Q8_0, infinite limit, ORCH_CUDA_MOE13_FROM=0); unpinned from 9 tokens by default.
static void test_decode13(int t, int64_t dim, int64_t ff, int ne, int topk, int n, bool bias, bool skew = false,
                          bool full = false) {
  QW gate, up, down;
  make_weight(gate, t, dim, ff * ne);
  make_weight(up, t, dim, ff * ne);
  make_weight(down, t, ff, dim * ne);
  const auto x = randv((size_t)(n * dim), 1.f), rw = randv((size_t)(ne * dim), 1.f);
  auto rb = randv((size_t)ne, 4.f);
  if (skew)
    for (int e = 0; e < topk; e++) rb[(size_t)e] = 1000.f + 10.f * (float)e; // every token: experts 0..topk-1
  const auto gbv = randv((size_t)(ff * ne), 1.f), ubv = randv((size_t)(ff * ne), 1.f),
             dbv = randv((size_t)(dim * ne), 1.f);
  const bool rbias = bias || skew;
  Buf<float> bx(x), brw(rw), brb(rb), bgb(gbv), bub(ubv), bdb(dbv);
  auto gp = [&](Buf<float> &b) { return bias ? b.p : nullptr; };
  const float limit = 7.f;
  const int np = n * topk;
  const auto lg = ref_logits(rw, x, rbias ? rb.data() : nullptr, n, ne, dim);
  std::vector<int32_t> idr;
  std::vector<float> wr;
  {
    orch_ctx ctx;
    ctx.moe = 6;
    Buf<float> l(lg), wb((size_t)np, NAN);
    Buf<int32_t> ib((size_t)np, -1);
    EXPECT(orch_moe_topk(&ctx, ib.p, wb.p, l.p, n, ne, topk) == ORCH_OK, "moe_topk: %s", g_err);
    idr = ib.vec();
    wr = wb.vec();
  }
  // mode: 0 pinned (ORCH_CUDA_MOE=v13), 1 unpinned, 2 unpinned with ORCH_CUDA_MOE13_FROM=9, 3 with =0 (off)
  auto run13 = [&](int mode, int tt, int nn, float lim, std::vector<int32_t> *ids, std::vector<float> *w,
                   std::vector<float> *o, std::vector<int32_t> *tab) {
    if (mode == 0) setenv("ORCH_CUDA_MOE", "v13", 1);
    if (mode == 2) setenv("ORCH_CUDA_MOE13_FROM", "9", 1);
    if (mode == 3) setenv("ORCH_CUDA_MOE13_FROM", "0", 1); // off
    orch_ctx ctx;
    ctx.moe = 6;
    ctx.moe_auto = mode != 0;
    const QW &G = tt == t ? gate : up, &U = up, &D = down; // (tt != t: the same bytes, another type: declines)
    Buf<int32_t> ib((size_t)(nn * topk), -1);
    Buf<float> wb((size_t)(nn * topk), NAN), out((size_t)(nn * dim), NAN), act((size_t)(nn * topk * ff), NAN),
        yb((size_t)(nn * topk * dim), NAN), xx((size_t)(nn * dim), 0.5f);
    const int rc = orch_moe_decode(&ctx, out.p, nn <= n ? bx.p : xx.p, brw.p, ORCH_T_F32, rbias ? brb.p : nullptr, ne,
                                   ib.p, wb.p, G.bytes, U.bytes, tt, gp(bgb), gp(bub), D.bytes, tt, gp(bdb), act.p,
                                   yb.p, nn, topk, dim, ff, 1.702f, lim);
    unsetenv("ORCH_CUDA_MOE");
    unsetenv("ORCH_CUDA_MOE13_FROM");
    if (ids) *ids = ib.vec();
    if (w) *w = wb.vec();
    if (o) *o = out.vec();
    if (tab) {
      const auto a = act.vec();
      const int64_t w0 = moe13_tab_word(nn * topk, ff);
      tab->resize((size_t)(MOE13_TAB_LIST + nn * topk));
      std::memcpy(tab->data(), a.data() + w0, tab->size() * 4);
    }
    return rc;
  };
  std::vector<int32_t> id13, tab;
  std::vector<float> w13, o13, o13b, o13s;
  EXPECT(run13(0, t, n, limit, &id13, &w13, &o13, &tab) == ORCH_OK, "moe_decode v13: %s", g_err);
  for (int i = 0; i < MOE13_MAX_N; i++) EXPECT(g_moe10_ticket[i] == 0, "ticket %d = %u after the op", i, g_moe10_ticket[i]);
  EXPECT(g_moe13_done == 0, "done ticket = %u after the op", g_moe13_done);
  for (int i = 0; i < MOE13_MAX_TILES; i++) EXPECT(g_moe13_tile[i] == 0, "tile ticket %d = %u after the op", i, g_moe13_tile[i]);
  EXPECT(id13 == idr, "v13 ids differ from orch_moe_topk's over the float64 logits (n=%d top-%d of %d)", n, topk, ne);
  for (size_t i = 0; i < wr.size(); i++)
    EXPECT(std::fabs(w13[i] - wr[i]) <= 1e-5f * (1.f + std::fabs(wr[i])), "v13 weight %zu: %g vs %g", i, w13[i], wr[i]);
  { // the table: used experts ascending, each pair once under its expert, ascending
    const int U = tab[0];
    std::vector<int> seen((size_t)np, 0);
    int prev = -1, next_off = 0;
    for (int j = 0; j < U; j++) {
      const int e = tab[(size_t)(MOE13_TAB_E + j)], off = tab[(size_t)(MOE13_TAB_OFF + j)],
                c = tab[(size_t)(MOE13_TAB_CNT + j)];
      EXPECT(e > prev && e < ne && off == next_off && c > 0, "table entry %d: e %d off %d cnt %d", j, e, off, c);
      prev = e;
      next_off = off + c;
      for (int i = 0; i < c && off + i < np; i++) {
        const int p = tab[(size_t)(MOE13_TAB_LIST + off + i)];
        EXPECT(p >= 0 && p < np && id13[(size_t)p] == e, "table: pair %d under expert %d", p, e);
        if (p >= 0 && p < np) seen[(size_t)p]++;
        if (i) EXPECT(p > tab[(size_t)(MOE13_TAB_LIST + off + i - 1)], "table: expert %d's list not ascending", e);
      }
    }
    EXPECT(next_off == np, "table covers %d of %d pairs", next_off, np);
    for (int p = 0; p < np; p++) EXPECT(seen[(size_t)p] == 1, "pair %d listed %d times", p, seen[(size_t)p]);
    if (skew) EXPECT(U == topk && tab[MOE13_TAB_CNT] == n, "skewed: %d experts, %d pairs on the first", U, tab[MOE13_TAB_CNT]);
  }
  const bool pipe = full || dim > 1024;
  if (pipe) { // ORCH_CUDA_MOE13_PIPE=1: gate_up13's tiles copied round by round: the same bits
    std::vector<float> op;
    setenv("ORCH_CUDA_MOE13_PIPE", "1", 1);
    EXPECT(run13(0, t, n, limit, nullptr, nullptr, &op, nullptr) == ORCH_OK, "moe_decode v13 (pipe): %s", g_err);
    unsetenv("ORCH_CUDA_MOE13_PIPE");
    EXPECT(std::memcmp(o13.data(), op.data(), o13.size() * 4) == 0, "v13 with ORCH_CUDA_MOE13_PIPE=1 differs");
  }
  if (full) { // (the emulation of each launch is slow: once)
    EXPECT(run13(0, t, n, limit, nullptr, nullptr, &o13b, nullptr) == ORCH_OK, "moe_decode v13 (again): %s", g_err);
    EXPECT(std::memcmp(o13.data(), o13b.data(), o13.size() * 4) == 0, "v13: a second call differs");
    g_moe13_stale_e = id13[0] == 0 ? 1 : 0;
    EXPECT(run13(0, t, n, limit, nullptr, nullptr, &o13s, nullptr) == ORCH_OK, "moe_decode v13 (stale): %s", g_err);
    g_moe13_stale_e = -1;
    EXPECT(std::memcmp(o13.data(), o13s.data(), o13.size() * 4) == 0, "v13 with a stale early expert read differs");
  }
  // v9's kernels + combine on v13's routing: bit for bit
  {
    orch_ctx ctx;
    Buf<int32_t> ib(id13);
    Buf<float> wb(w13), out((size_t)(n * dim), NAN), act((size_t)(n * topk * ff), NAN),
        yb((size_t)(n * topk * dim), NAN);
    launch_batched9(nullptr, yb.p, act.p, bx.p, ne, ib.p, gate.bytes, up.bytes, gp(bgb), gp(bub), down.bytes, gp(bdb), n,
                    topk, dim, ff, 1.702f, limit);
    EXPECT(orch_moe_combine(&ctx, out.p, yb.p, wb.p, n, topk, dim, 0) == ORCH_OK, "combine: %s", g_err);
    const auto o9 = out.vec();
    EXPECT(std::memcmp(o13.data(), o9.data(), o9.size() * 4) == 0,
           "MoE v13 != v9 bit for bit (dim=%lld ff=%lld top-%d of %d n=%d)", (long long)dim, (long long)ff, topk, ne, n);
  }
  // float64 reference on v13's routing
  const auto want = ref_moe(gate, up, down, x, bias ? gbv.data() : nullptr, bias ? ubv.data() : nullptr,
                            bias ? dbv.data() : nullptr, id13, w13, n, topk, dim, ff, limit);
  const double err = rel_l2(o13, want);
  EXPECT(err <= 6e-3, "MoE v13 (dim=%lld ff=%lld n=%d): relative error %.3g", (long long)dim, (long long)ff, n, err);
  // routing and declines
  if (full) {
  EXPECT(run13(0, t, 1, limit, nullptr, nullptr, nullptr, nullptr) == ORCH_ERR_UNSUPPORTED, "v13 must decline one token");
  EXPECT(run13(0, t, n, INFINITY, nullptr, nullptr, nullptr, nullptr) == ORCH_ERR_UNSUPPORTED,
         "v13 must decline an infinite limit");
  EXPECT(run13(0, ORCH_T_Q8_0, n, limit, nullptr, nullptr, nullptr, nullptr) == ORCH_ERR_UNSUPPORTED,
         "v13 must decline Q8_0");
  if (n > MOE10_MAX_N) {
    EXPECT(run13(3, t, n, limit, nullptr, nullptr, nullptr, nullptr) == ORCH_ERR_UNSUPPORTED,
           "unpinned with ORCH_CUDA_MOE13_FROM=0 must decline %d tokens", n);
    std::vector<float> od;
    const int rcd = run13(1, t, n, limit, nullptr, nullptr, &od, nullptr); // unpinned default: v13 from 9
    EXPECT(rcd == ORCH_OK && std::memcmp(od.data(), o13.data(), o13.size() * 4) == 0,
           "unpinned (ORCH_CUDA_MOE13_FROM unset) at n=%d must be v13 (rc %d)", n, rcd);
  }
  std::vector<float> oa;
  const int rca = run13(2, t, n, limit, nullptr, nullptr, &oa, nullptr);
  if (n >= 9)
    EXPECT(rca == ORCH_OK && std::memcmp(oa.data(), o13.data(), o13.size() * 4) == 0,
           "unpinned with ORCH_CUDA_MOE13_FROM=9 at n=%d must be v13 (rc %d)", n, rca);
  else
    EXPECT(rca == ORCH_ERR_UNSUPPORTED || n >= MOE10_AUTO_MIN_N, "unpinned below ORCH_CUDA_MOE13_FROM: rc %d", rca);
  }
  std::printf("MoE v13 MXFP4 dim=%-4lld ff=%-4lld top-%d of %d n=%d bias=%d%s: %d experts; ids = top-k of the float64 "
              "logits, output = v9's bit for bit (relative error %.2e), table, tickets%s%s\n",
              (long long)dim, (long long)ff, topk, ne, n, bias, skew ? " skewed" : "", tab[0], err,
              full ? "; second call, stale read, declines ok" : "", pipe ? "; PIPE=1 bit-identical" : "");
}

static void test_decode13_cases() {
  test_decode13(ORCH_T_MXFP4, 64, 64, 8, 4, 12, true, false, true); // ~6 tokens per expert (1-2 tiles of 8)
  test_decode13(ORCH_T_MXFP4, 64, 32, 8, 4, 20, false, true); // skewed: 20 tokens on experts 0..3 (2 passes)
  test_decode13(ORCH_T_MXFP4, 64, 32, 8, 4, 64, true); // 64 tokens, 256 pairs (the maximum), ~32 per expert: 2 passes
  test_decode13(ORCH_T_MXFP4, 1056, 32, 32, 4, 9, true); // 33 chunks: a second gate_up round (warp 0), 17 route slices
  test_decode13(ORCH_T_MXFP4, 32, 576, 4, 2, 2, false); // 18 chunks: down's blocks on 3 warps
  test_decode_norm(ORCH_T_MXFP4, 1056, 32, 8, 4, 12, true, "v13"); // the norm in v13's route kernel: 12 tokens, 17 slices
}

int main(int argc, char **argv) {
  const bool long_run = argc > 1 && std::strcmp(argv[1], "long") == 0;
  const bool only10 = argc > 1 && std::strcmp(argv[1], "v10") == 0; // the v10 cases only (development)
  const bool only_norm = argc > 1 && std::strcmp(argv[1], "norm") == 0; // the norm-fold cases only (development)
  if (argc > 1 && std::strcmp(argv[1], "v13") == 0) { // the v13 cases only (development)
    test_decode13_cases();
    return fails ? 1 : 0;
  }
  if (!only10 && !only_norm) {
  test_decoder();
  test_act_scale();
  test_topk();
  for (int t : {ORCH_T_MXFP4, ORCH_T_Q8_0, ORCH_T_Q4_0}) {
    test_moe(t, 64, 32, 3, 2, 3, true, false);
    test_moe(t, 64, 64, 4, 4, 1, false, true); // no biases, x with a huge range per chunk
  }
  if (long_run) test_moe(ORCH_T_MXFP4, 128, 96, 6, 4, 1, true, false);
  test_moe(ORCH_T_MXFP4, 64, 64, 8, 4, 8, true, true); // 8 tokens: 32 pairs, 4 staged rows per down CTA
  test_moe(ORCH_T_MXFP4, 64, 32, 5, 1, 2, true, false); // one slot: a single down item per warp
  for (int t : {ORCH_T_MXFP4, ORCH_T_Q8_0}) test_moe(t, 64, 64, 4, 4, 2, true, true, INFINITY); // chunk-scaled down
  test_route(ORCH_T_MXFP4, 64, 64, 8, 4, 3, true);
  test_route(ORCH_T_Q8_0, 64, 32, 8, 4, 3, true); // declines (v9 decodes MXFP4 only)
  test_route(ORCH_T_MXFP4, 96, 32, 32, 4, 2, false); // 32 experts (a full warp of logits), no biases
  test_route(ORCH_T_MXFP4, 64, 32, 5, 1, 2, true); // one slot
  test_route(ORCH_T_MXFP4, 64, 64, 4, 2, 9, true, INFINITY); // infinite limit: v9 declines
  test_route(ORCH_T_MXFP4, 64, 32, 32, 4, 20, true); // 80 pairs
  test_route(ORCH_T_MXFP4, 64, 32, 8, 4, 19, false, 7.f, true); // skewed: 19 tokens on experts 0..3 (3 passes)
  }
  test_decode_norm(ORCH_T_MXFP4, 96, 64, 32, 4, 1, true); // a half last slice, N = 4
  test_decode_norm(ORCH_T_MXFP4, 1056, 32, 8, 4, 2, false); // 17 slices (elements j = 0..4 of a thread), N = 8
  test_decode_norm(ORCH_T_Q8_0, 64, 32, 6, 2, 3, true);
  test_decode_norm(ORCH_T_MXFP4, 64, 64, 8, 4, 2, true); // where MoE v13 could run (ORCH_CUDA_MOE13_FROM=2)
  if (only_norm) return fails ? 1 : 0;
  test_decode13_cases();
  test_decode10(ORCH_T_MXFP4, 96, 64, 32, 4, 1, true, true); // 32 experts, a half last router slice, stale reads
  test_decode10(ORCH_T_MXFP4, 64, 32, 8, 4, 8, false); // 8 tokens (v10's maximum), no biases
  test_decode10(ORCH_T_Q8_0, 64, 64, 6, 2, 3, true);
  test_decode10(ORCH_T_Q4_0, 128, 32, 5, 1, 2, true); // one slot: one down item per warp
  test_decode10(ORCH_T_MXFP4, 576, 32, 8, 2, 1, true); // 9 router slices (2 for a summing thread)
  test_decode10(ORCH_T_MXFP4, 3104, 32, 4, 2, 1, true); // 97 chunks: 2 rounds of blocks a lane in gate_up
  test_decode10(ORCH_T_MXFP4, 64, 3104, 4, 2, 2, true); // down rows of 97 chunks: 2 rounds (down10's per-round sums)
  if (long_run) test_decode10(ORCH_T_MXFP4, 4160, 32, 8, 2, 1, true); // 65 slices (> 64); 2 gate_up rounds (~5 min)
  if (long_run) { // ~3 min on 2 cores
    test_moe(ORCH_T_MXFP4, 3200, 32, 2, 2, 1, true, true); // 100 chunks: 2 rounds of blocks per lane (gate/up)
    test_moe(ORCH_T_MXFP4, 32, 3200, 2, 2, 1, true, false); // ... (down: items = slot x round)
    for (int t : {ORCH_T_Q8_0, ORCH_T_Q4_0}) {
      test_moe(t, 3200, 32, 2, 2, 1, true, false);
      test_moe(t, 32, 3200, 2, 2, 1, true, false);
    }
  }
  if (fails) {
    std::fprintf(stderr, "moe_emu_test: %d failures\n", fails);
    return 1;
  }
  std::printf("moe_emu_test: PASS\n");
  return 0;
}
