// CPU emulation test of orch_moe_decode_oproj (session 10, cuda/src/moe_oproj.cuh: the attention out projection as
// the norm fold's producer, routing and x staging in its last CTA, then MoE v10's gate_up / down), compiled with
// moe_ffn.cu against cuda_emu.h under AddressSanitizer. Per case (fresh random seed each run, printed; pass one to
// repeat a run):
//  - y, res, x (= xt) and the sum-of-squares partials = launch_gemv5_nf_prod's (orch_matmul_addnorm's producer) bit
//    for bit; y within v5's bound of a float64 GEMV; res = res0 + y, x = res * w exactly;
//  - ids = orch_moe_topk's over the float64 logits of the float64 norm (cases with adjacent top logits closer than
//    1e-3 are regenerated), weights within 1e-4; out within the MoE bound (6e-3; 8e-3 above dim 1024, see moe_bound)
//    of a float64 MoE of that norm;
//  - the existing path (plain v5 GEMV + orch_moe_decode_norm / _addnorm): same y and res bits, same ids, weights
//    within 1e-4, out within the same bound of the same float64 MoE (the two paths' outputs are not compared with
//    each other: each rounds x and the activations to fp16 on its own); with res2 .. ss: res2 = res2_0 + out,
//    xt2 = res2 * w2, ss2 exactly;
//  - the ticket back to 0; a second call through orch_moe_decode_oproj_args identical (first case); declines
//    (nothing written).
//
//   g++ -std=c++20 -O1 -g -pthread -fsanitize=address -Wno-unknown-pragmas -Icuda/include \
//     -o /tmp/moe_oproj_emu cuda/test/moe_oproj_emu_test.cpp && /tmp/moe_oproj_emu [seed]
#include <algorithm>
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
inline float rsqrtf(float v) { return 1.f / std::sqrt(v); } // any function: the same in every kernel
#include "../src/moe_ffn.cu"
#include "../src/moe.cu"
#undef warp_sum
#undef warp_max
#include "emu_lib.h"

#include "quant_test_util.h"

static uint32_t fbits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static bool same_bits(const std::vector<float> &a, const std::vector<float> &b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

// float64 MoE of one token x (ids / weights given): as moe_emu_test.cpp's ref_moe.
static std::vector<double> ref_moe1(const QW &gate, const QW &up, const QW &down, const std::vector<double> &x,
                                    const float *gb, const float *ub, const float *db, const std::vector<int32_t> &ids,
                                    const std::vector<float> &w, int topk, int64_t dim, int64_t ff) {
  std::vector<double> want((size_t)dim, 0.0);
  for (int s = 0; s < topk; s++) {
    const int e = ids[(size_t)s];
    if (e < 0) continue;
    std::vector<double> act((size_t)ff);
    for (int64_t r = 0; r < ff; r++) {
      double g = gb ? gb[e * ff + r] : 0.0, u = ub ? ub[e * ff + r] : 0.0;
      for (int64_t c = 0; c < dim; c++) {
        g += gate.val[(size_t)((e * ff + r) * dim + c)] * x[(size_t)c];
        u += up.val[(size_t)((e * ff + r) * dim + c)] * x[(size_t)c];
      }
      act[(size_t)r] = swiglu(g, u, 1.702, 7.0);
    }
    for (int64_t r = 0; r < dim; r++) {
      double y = db ? db[e * dim + r] : 0.0;
      for (int64_t c = 0; c < ff; c++) y += down.val[(size_t)((e * dim + r) * ff + c)] * act[(size_t)c];
      want[(size_t)r] += w[(size_t)s] * y;
    }
  }
  return want;
}

// The MoE output's bound vs float64: gate_up's dots sum fp16 products in fp16 partial sums (v6's arithmetic), whose
// error grows with their length (dim). 6e-3 as in moe_emu_test up to dim 1024 (errors ~1e-3); above, the dim = 3136
// case (98 chunks, both paths, 120 draws, session 17): mean 2.9e-3, sd 0.8e-3, max 5.1e-3 -- 8e-3 is 6 sd above the
// mean (a lost chunk or a wrong scale is off by more than 1e-2).
static double moe_bound(int64_t dim) { return dim > 1024 ? 8e-3 : 6e-3; }

// to: the projection's type (ok -> dim), te: the experts' (gate / up / down). an: with the next norm's producer.
static void test_oproj(int to, int te, int64_t dim, int64_t ok, int64_t ff, int ne, int topk, bool bias, bool an,
                       bool again = false) {
  const float eps = 1e-5f, limit = 7.f;
  const int64_t C = dim / 8, rbo = orch_row_bytes(to, ok);
  for (int attempt = 0;; attempt++) {
    EXPECT(attempt < 20, "no case without near-tied logits in 20 tries");
    if (attempt >= 20) return;
    QW wo, gate, up, down;
    make_weight(wo, to, ok, dim);
    make_weight(gate, te, dim, ff * ne);
    make_weight(up, te, dim, ff * ne);
    make_weight(down, te, ff, dim * ne);
    const auto ox = randv((size_t)ok, 1.f), obv = randv((size_t)dim, 0.5f), res0 = randv((size_t)dim, 4.f),
               nw = randv((size_t)dim, 1.f), rw = randv((size_t)(ne * dim), 1.f), rb = randv((size_t)ne, 4.f);
    const auto gbv = randv((size_t)(ff * ne), 1.f), ubv = randv((size_t)(ff * ne), 1.f),
               dbv = randv((size_t)(dim * ne), 1.f), r2v = randv((size_t)dim, 2.f), nw2 = randv((size_t)dim, 1.f);
    Buf<float> box(ox), bob(obv), bnw(nw), brw(rw), brb(rb), bgb(gbv), bub(ubv), bdb(dbv), bnw2(nw2);
    auto gp = [&](Buf<float> &b) { return bias ? b.p : nullptr; };
    // The producer alone (orch_matmul_addnorm's kernel): y, res, xt, ss.
    std::vector<float> py, pres, pxt, pss;
    {
      Buf<float> y((size_t)dim, NAN), res(res0), xt((size_t)dim, NAN), ss((size_t)C, NAN);
      gemv5_nf F;
      F.res = res.p, F.w = bnw.p, F.xt = xt.p, F.ss = ss.p;
      ORCH_DISPATCH_TYPE(to, launch_gemv5_nf_prod, nullptr, y.p, box.p, wo.bytes, gp(bob), 1, ok, dim, rbo, F);
      py = y.vec(), pres = res.vec(), pxt = xt.vec(), pss = ss.vec();
    }
    // float64 norm and logits
    double sq = 0;
    for (float v : pres) sq += (double)v * v;
    const double r64 = 1.0 / std::sqrt(sq / (double)dim + eps);
    std::vector<double> h64((size_t)dim);
    for (int64_t i = 0; i < dim; i++) h64[(size_t)i] = (double)pres[(size_t)i] * r64 * nw[(size_t)i];
    std::vector<float> lg((size_t)ne);
    for (int e = 0; e < ne; e++) {
      double v = bias ? rb[(size_t)e] : 0.0;
      for (int64_t c = 0; c < dim; c++) v += (double)rw[(size_t)(e * dim + c)] * h64[(size_t)c];
      lg[(size_t)e] = (float)v;
    }
    {
      std::vector<float> sl = lg;
      std::sort(sl.begin(), sl.end(), std::greater<float>());
      bool tie = false;
      for (int i = 0; i < topk && i + 1 < ne; i++) tie |= sl[(size_t)i] - sl[(size_t)i + 1] < 1e-3f * std::max(1.f, std::fabs(sl[(size_t)i]));
      if (tie) {
        std::printf("  (near-tied logits: case regenerated)\n");
        continue;
      }
    }
    std::vector<int32_t> idr;
    std::vector<float> wr;
    {
      orch_ctx ctx;
      ctx.moe = 6;
      Buf<float> l(lg), wb((size_t)topk, NAN);
      Buf<int32_t> ib((size_t)topk, -1);
      EXPECT(orch_moe_topk(&ctx, ib.p, wb.p, l.p, 1, ne, topk) == ORCH_OK, "moe_topk: %s", g_err);
      idr = ib.vec(), wr = wb.vec();
    }
    // the op
    struct Got {
      std::vector<float> y, res, x, w, out, ssp, res2, xt2, ss2;
      std::vector<int32_t> ids;
    };
    auto run = [&](Got &g, bool via_struct, bool dual = false) {
      orch_ctx ctx;
      ctx.moe = 6;
      ctx.moe_auto = true;
      Buf<float> y((size_t)dim, NAN), res(res0), x((size_t)dim, NAN), out((size_t)dim, NAN), wb((size_t)topk, NAN),
          act((size_t)(topk * ff), NAN), yb((size_t)(topk * dim), NAN), r2(r2v), xt2((size_t)dim, NAN),
          ss2((size_t)C, NAN);
      Buf<int32_t> ib((size_t)topk, -1);
      int rc;
      if (via_struct) { // orch_moe_decode_oproj_args: the same call
        const orch_moe_oproj_args a{box.p,      wo.bytes,  gp(bob),   y.p,        out.p,    x.p,     res.p,
                                    bnw.p,      brw.p,     gp(brb),   ib.p,       wb.p,     gate.bytes, up.bytes,
                                    gp(bgb),    gp(bub),   down.bytes, gp(bdb),   act.p,    yb.p,
                                    an ? r2.p : nullptr,   an ? bnw2.p : nullptr, an ? xt2.p : nullptr,
                                    an ? ss2.p : nullptr,  ok,        1,          dim,      ff,      to,
                                    ORCH_T_F32, ne,        te,        te,         topk,     eps,     1.702f,
                                    limit,      0};
        rc = orch_moe_decode_oproj_args(&ctx, &a);
      } else if (dual) { // the experts' repacked rows (ORCH_T_MXFP4_DUAL)
        DualW dg(gate, ORCH_T_MXFP4, ff * ne, dim), du(up, ORCH_T_MXFP4, ff * ne, dim), dd(down, ORCH_T_MXFP4, dim * ne, ff);
        rc = orch_moe_decode_oproj(&ctx, box.p, wo.bytes, to, gp(bob), ok, y.p, out.p, x.p, res.p, bnw.p, eps, brw.p,
                                   ORCH_T_F32, gp(brb), ne, ib.p, wb.p, dg.p, du.p, ORCH_T_MXFP4_DUAL, gp(bgb),
                                   gp(bub), dd.p, ORCH_T_MXFP4_DUAL, gp(bdb), act.p, yb.p, 1, topk, dim, ff, 1.702f,
                                   limit, an ? r2.p : nullptr, an ? bnw2.p : nullptr, an ? xt2.p : nullptr,
                                   an ? ss2.p : nullptr);
      } else {
        rc = orch_moe_decode_oproj(&ctx, box.p, wo.bytes, to, gp(bob), ok, y.p, out.p, x.p, res.p, bnw.p, eps, brw.p,
                                   ORCH_T_F32, gp(brb), ne, ib.p, wb.p, gate.bytes, up.bytes, te, gp(bgb), gp(bub),
                                   down.bytes, te, gp(bdb), act.p, yb.p, 1, topk, dim, ff, 1.702f, limit,
                                   an ? r2.p : nullptr, an ? bnw2.p : nullptr, an ? xt2.p : nullptr,
                                   an ? ss2.p : nullptr);
      }
      EXPECT(rc == ORCH_OK, "moe_decode_oproj rc %d (%s)", rc, g_err);
      EXPECT(g_moe_oproj_ticket == 0, "ticket %u after the op", g_moe_oproj_ticket);
      g.y = y.vec(), g.res = res.vec(), g.x = x.vec(), g.w = wb.vec(), g.out = out.vec(), g.ids = ib.vec();
      const auto ybv = yb.vec();
      const int64_t off = moe10_ybuf_floats(1, dim, ne);
      g.ssp.assign(ybv.begin() + off, ybv.begin() + off + C);
      g.res2 = r2.vec(), g.xt2 = xt2.vec(), g.ss2 = ss2.vec();
    };
    Got g;
    run(g, false);
    const char *tn = tname(to), *te_n = tname(te);
    EXPECT(same_bits(g.y, py) && same_bits(g.res, pres) && same_bits(g.x, pxt) && same_bits(g.ssp, pss),
           "y / res / x / ss partials != orch_matmul_addnorm's producer (%s dim=%lld ok=%lld)", tn, (long long)dim,
           (long long)ok);
    std::vector<double> y64((size_t)dim);
    for (int64_t r = 0; r < dim; r++) {
      double v = bias ? obv[(size_t)r] : 0.0;
      for (int64_t c = 0; c < ok; c++) v += wo.val[(size_t)(r * ok + c)] * ox[(size_t)c];
      y64[(size_t)r] = v;
    }
    const double ey = rel_l2(g.y, y64);
    EXPECT(ey <= 1.5e-3, "y: relative error %.3g vs float64", ey);
    for (int64_t i = 0; i < dim; i++) {
      const float rr = res0[(size_t)i] + g.y[(size_t)i];
      EXPECT(fbits(g.res[(size_t)i]) == fbits(rr), "res[%lld] %g vs %g", (long long)i, g.res[(size_t)i], rr);
      EXPECT(fbits(g.x[(size_t)i]) == fbits(rr * nw[(size_t)i]), "x[%lld] != res * w", (long long)i);
    }
    EXPECT(g.ids == idr, "ids differ from the top-k of the float64 logits (%s %s dim=%lld top-%d of %d)", tn, te_n,
           (long long)dim, topk, ne);
    double dw = 0;
    for (int s = 0; s < topk; s++) dw = std::max(dw, (double)std::fabs(g.w[(size_t)s] - wr[(size_t)s]));
    EXPECT(dw <= 1e-4, "weights: max difference %.3g vs float64 routing", dw);
    const auto want = ref_moe1(gate, up, down, h64, gp(bgb), gp(bub), gp(bdb), g.ids, g.w, topk, dim, ff);
    const double eo = rel_l2(g.out, want);
    EXPECT(eo <= moe_bound(dim), "out: relative error %.3g vs float64 (%s %s dim=%lld ff=%lld)", eo, tn, te_n,
           (long long)dim, (long long)ff);
    if (an) {
      for (int64_t i = 0; i < dim; i++) {
        const float r2 = r2v[(size_t)i] + g.out[(size_t)i];
        EXPECT(fbits(g.res2[(size_t)i]) == fbits(r2), "res2[%lld]", (long long)i);
        EXPECT(fbits(g.xt2[(size_t)i]) == fbits(r2 * nw2[(size_t)i]), "xt2[%lld]", (long long)i);
      }
      for (int64_t b = 0; b < C; b++) {
        float s = 0.f;
        for (int w = 0; w < 8; w++) {
          const float v = g.res2[(size_t)(8 * b + w)];
          s += v * v;
        }
        EXPECT(fbits(g.ss2[(size_t)b]) == fbits(s), "ss2[%lld]", (long long)b);
      }
    }
    // The existing path: plain v5 GEMV, then orch_moe_decode_norm (_addnorm).
    double eold = 0, dold = 0, dwo = 0;
    {
      orch_ctx ctx;
      ctx.moe = 6;
      ctx.moe_auto = true;
      Buf<float> y((size_t)dim, NAN), res(res0), h((size_t)dim, NAN), out((size_t)dim, NAN), wb((size_t)topk, NAN),
          act((size_t)(topk * ff), NAN), yb((size_t)(topk * dim), NAN), r2(r2v), xt2((size_t)dim, NAN),
          ss2((size_t)C, NAN);
      Buf<int32_t> ib((size_t)topk, -1);
      ORCH_DISPATCH_TYPE(to, launch_gemv5, nullptr, y.p, box.p, wo.bytes, gp(bob), 1, ok, dim, rbo, 0);
      const int rc =
          an ? orch_moe_decode_addnorm(&ctx, out.p, h.p, res.p, y.p, bnw.p, eps, brw.p, ORCH_T_F32, gp(brb), ne, ib.p,
                                       wb.p, gate.bytes, up.bytes, te, gp(bgb), gp(bub), down.bytes, te, gp(bdb),
                                       act.p, yb.p, 1, topk, dim, ff, 1.702f, limit, r2.p, bnw2.p, xt2.p, ss2.p)
             : orch_moe_decode_norm(&ctx, out.p, h.p, res.p, y.p, bnw.p, eps, brw.p, ORCH_T_F32, gp(brb), ne, ib.p,
                                    wb.p, gate.bytes, up.bytes, te, gp(bgb), gp(bub), down.bytes, te, gp(bdb), act.p,
                                    yb.p, 1, topk, dim, ff, 1.702f, limit);
      EXPECT(rc == ORCH_OK, "existing path rc %d (%s)", rc, g_err);
      EXPECT(same_bits(y.vec(), g.y) && same_bits(res.vec(), g.res), "y / res differ from the existing path's");
      EXPECT(ib.vec() == g.ids, "ids differ from the existing path's");
      const auto wo8 = wb.vec(), oo = out.vec();
      for (int s = 0; s < topk; s++) dwo = std::max(dwo, (double)std::fabs(wo8[(size_t)s] - g.w[(size_t)s]));
      EXPECT(dwo <= 1e-4, "weights: max difference %.3g vs the existing path", dwo);
      // Both paths round x and the activations to fp16 on their own (the fused op stages x from xt, the existing
      // path from its norm), so their outputs are two independent draws within the MoE bound of the float64 MoE,
      // not each other's: each is held to that bound, their difference (~1.4x either error) only printed.
      eold = rel_l2(oo, want);
      EXPECT(eold <= moe_bound(dim), "out (existing path): relative error %.3g vs float64", eold);
      dold = rel_l2(g.out, std::vector<double>(oo.begin(), oo.end()));
    }
    if (again) {
      Got g2;
      run(g2, true);
      EXPECT(same_bits(g2.out, g.out) && same_bits(g2.w, g.w) && g2.ids == g.ids && same_bits(g2.x, g.x) &&
                 same_bits(g2.y, g.y) && same_bits(g2.res, g.res) && (!an || same_bits(g2.ss2, g.ss2)),
             "a second call (orch_moe_decode_oproj_args) differs");
    }
    if (te == ORCH_T_MXFP4) { // the experts' repacked rows: the same bits
      Got g3;
      run(g3, false, true);
      EXPECT(same_bits(g3.out, g.out) && same_bits(g3.w, g.w) && g3.ids == g.ids && same_bits(g3.x, g.x) &&
                 (!an || (same_bits(g3.ss2, g.ss2) && same_bits(g3.xt2, g.xt2))),
             "the repacked rows (ORCH_T_MXFP4_DUAL) differ from the plain ones");
    }
    if (to == ORCH_T_Q8_0) { // 3 blocks a lane a round in the 32-warp CTAs (ORCH_CUDA_OPROJ_NB=3; 4 by default)
      Got g5;
      g_moe_oproj_nb_force = 3;
      run(g5, false);
      g_moe_oproj_nb_force = 0;
      EXPECT(same_bits(g5.out, g.out) && same_bits(g5.w, g.w) && g5.ids == g.ids && same_bits(g5.x, g.x) &&
                 same_bits(g5.y, g.y) && same_bits(g5.res, g.res) && same_bits(g5.ssp, g.ssp) &&
                 (!an || (same_bits(g5.ss2, g.ss2) && same_bits(g5.xt2, g.xt2))),
             "the projection with 3 blocks a lane a round differs from the default (ok=%lld)", (long long)ok);
    }
    for (int w : {8, 16}) { // the projection in CTAs of 8 / 16 warps (ORCH_CUDA_OPROJ_W; 32 by default): the same bits
      if (dim % w) continue;
      Got g4;
      g_moe_oproj_w_force = w;
      run(g4, false);
      g_moe_oproj_w_force = 0;
      EXPECT(same_bits(g4.out, g.out) && same_bits(g4.w, g.w) && g4.ids == g.ids && same_bits(g4.x, g.x) &&
                 same_bits(g4.y, g.y) && same_bits(g4.res, g.res) && same_bits(g4.ssp, g.ssp) &&
                 (!an || (same_bits(g4.ss2, g.ss2) && same_bits(g4.xt2, g.xt2))),
             "the projection in %d-warp CTAs differs from the default (dim=%lld)", w, (long long)dim);
    }
    std::printf("oproj %-5s ok=%-4lld -> dim=%-4lld, MoE %-5s ff=%-4lld top-%d of %-2d bias=%d next-norm=%d: y/res/x/ss = "
                "the producer's bits (y err %.1e); ids = float64 top-k; out err %.2e (existing path %.2e, "
                "the two apart %.2e; weights %.1e)%s%s\n",
                tn, (long long)ok, (long long)dim, te_n, (long long)ff, topk, ne, bias, an, ey, eo, eold, dold, dwo,
                again ? "; second call (struct form) identical" : "",
                te == ORCH_T_MXFP4 ? "; repacked rows identical" : "");
    return;
  }
}

// Declines: nothing written, ORCH_ERR_UNSUPPORTED.
static void test_declines() {
  const int to = ORCH_T_Q8_0, te = ORCH_T_MXFP4, ne = 8, topk = 4;
  const int64_t dim = 64, ok = 64, ff = 64;
  QW wo, gate, up, down;
  make_weight(wo, to, ok, dim);
  make_weight(gate, te, dim, ff * ne);
  make_weight(up, te, dim, ff * ne);
  make_weight(down, te, ff, dim * ne);
  const auto res0 = randv((size_t)dim, 1.f);
  Buf<float> ox((size_t)ok + 4, 1.f), nw((size_t)dim, 1.f), rw((size_t)(ne * dim), 1.f);
  int n = 0;
  auto call = [&](const char *what, auto tweak) {
    orch_ctx ctx;
    ctx.moe = 6;
    ctx.moe_auto = true;
    int64_t kk = ok, d = dim, f = ff, nn = 1;
    int32_t wt = to;
    const float *px = ox.p;
    tweak(ctx, kk, d, f, nn, wt, px);
    Buf<float> y((size_t)dim, NAN), res(res0), x((size_t)dim, NAN), out((size_t)dim, NAN), wb((size_t)topk, NAN),
        act((size_t)(topk * ff), NAN), yb((size_t)(topk * dim), NAN);
    Buf<int32_t> ib((size_t)topk, -1);
    const int rc = orch_moe_decode_oproj(&ctx, px, wo.bytes, wt, nullptr, kk, y.p, out.p, x.p, res.p, nw.p, 1e-5f,
                                         rw.p, ORCH_T_F32, nullptr, ne, ib.p, wb.p, gate.bytes, up.bytes, te, nullptr,
                                         nullptr, down.bytes, te, nullptr, act.p, yb.p, nn, topk, d, f, 1.702f, 7.f,
                                         nullptr, nullptr, nullptr, nullptr);
    EXPECT(rc == ORCH_ERR_UNSUPPORTED, "%s: must decline (rc %d)", what, rc);
    EXPECT(std::isnan(y.p[0]) && std::isnan(x.p[0]) && std::isnan(out.p[0]) && same_bits(res.vec(), res0) &&
               ib.p[0] == -1,
           "%s: wrote something while declining", what);
    n++;
  };
  using Ctx = orch_ctx;
  call("n = 2", [](Ctx &, int64_t &, int64_t &, int64_t &, int64_t &nn, int32_t &, const float *&) { nn = 2; });
  call("GEMV pinned v7", [](Ctx &c, int64_t &, int64_t &, int64_t &, int64_t &, int32_t &, const float *&) { c.gemv = 7; });
  call("MoE pinned v6", [](Ctx &c, int64_t &, int64_t &, int64_t &, int64_t &, int32_t &, const float *&) {
    c.moe_auto = false;
  });
  call("F32 projection", [](Ctx &, int64_t &, int64_t &, int64_t &, int64_t &, int32_t &wt, const float *&) {
    wt = ORCH_T_F32;
  });
  call("ok % 32", [](Ctx &, int64_t &kk, int64_t &, int64_t &, int64_t &, int32_t &, const float *&) { kk = 48; });
  call("unaligned ox", [&](Ctx &, int64_t &, int64_t &, int64_t &, int64_t &, int32_t &, const float *&p) { p = ox.p + 1; });
  call("partials > act", [](Ctx &, int64_t &, int64_t &d, int64_t &, int64_t &, int32_t &, const float *&) {
    d = 512; // 8 experts x 64 CTAs > 4 slots x 64 (declined before anything is read)
  });
  g_moe_oproj_env = -1;
  setenv("ORCH_CUDA_MOE_OPROJ", "0", 1);
  call("ORCH_CUDA_MOE_OPROJ=0", [](Ctx &, int64_t &, int64_t &, int64_t &, int64_t &, int32_t &, const float *&) {});
  unsetenv("ORCH_CUDA_MOE_OPROJ");
  g_moe_oproj_env = -1;
  orch_ctx ctx;
  EXPECT(orch_moe_decode_oproj_args(&ctx, nullptr) == ORCH_ERR_INVALID, "struct form: a NULL struct is invalid");
  std::printf("declines: %d cases, nothing written\n", n);
}

int main(int argc, char **argv) {
  const unsigned seed = argc > 1 ? (unsigned)std::strtoul(argv[1], nullptr, 10) : std::random_device{}();
  rng.seed(seed);
  std::printf("moe_oproj_emu_test: seed %u\n", seed);
  test_oproj(ORCH_T_Q8_0, ORCH_T_MXFP4, 256, 128, 64, 8, 4, true, true, true); // gpt-oss's types, next norm folded
  test_oproj(ORCH_T_Q4_0, ORCH_T_Q8_0, 96, 256, 64, 4, 2, false, false);      // C = 12 (3 float4 of partials)
  test_oproj(ORCH_T_MXFP4, ORCH_T_Q4_0, 512, 64, 512, 32, 4, true, false);    // 32 experts, C = 64
  test_oproj(ORCH_T_Q8_0, ORCH_T_MXFP4, 64, 8192, 64, 8, 4, true, true);      // k >= 8192: x staged per round (XR 1)
  test_oproj(ORCH_T_Q8_0, ORCH_T_MXFP4, 64, 3200, 64, 8, 4, true, true);      // 100 blocks: one round of 4 vs two of 3
  test_oproj(ORCH_T_Q8_0, ORCH_T_MXFP4, 3136, 64, 416, 2, 2, true, false);     // C = 392: two batches of partials
  test_declines();
  if (fails) {
    std::fprintf(stderr, "moe_oproj_emu_test: %d failures (seed %u)\n", fails, seed);
    return 1;
  }
  std::printf("moe_oproj_emu_test: PASS\n");
  return 0;
}
