// dec16_test.cu — host test of the fp16 weight decoders and block dots of
// cuda/src/dec16.cuh (GEMV v5 / MoE v3), run on a machine without a GPU:
//   nvcc -std=c++17 -O2 -o /tmp/dec16_test cuda/test/dec16_test.cu && /tmp/dec16_test
// (.ci/cuda-check.sh builds and runs it). The device code runs the same
// functions with PTX instead of the host emulations checked here.
#include <cuda_fp16.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <random>
#include <vector>

#include "../src/dec16.cuh"

static int failures = 0;
#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      if (failures < 20) {                                \
        fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
        fprintf(stderr, __VA_ARGS__);                     \
        fprintf(stderr, "\n");                            \
      }                                                   \
      failures++;                                         \
    }                                                     \
  } while (0)

static std::mt19937_64 rng(12345);
static uint32_t r32() { return (uint32_t)rng(); }

static uint16_t hbits(double v) { return dec16_d2h_host(v); }
static uint16_t lo16(uint32_t v) { return (uint16_t)(v & 0xFFFFu); }
static uint16_t hi16(uint32_t v) { return (uint16_t)(v >> 16); }

static void test_prmt() {
  CHECK(dec16_prmt_host(0x33221100u, 0x77665544u, 0x3210u) == 0x33221100u, "identity");
  CHECK(dec16_prmt_host(0x33221100u, 0x77665544u, 0x7654u) == 0x77665544u, "b");
  CHECK(dec16_prmt_host(0x33221100u, 0x77665544u, 0x0123u) == 0x00112233u, "reverse");
  CHECK(dec16_prmt_host(0x00000080u, 0u, 0x0808u) == 0x80FF80FFu, "sign replicate");
  CHECK(dec16_prmt_host(0x0000007Fu, 0u, 0x0808u) == 0x7F007F00u, "sign replicate of a positive byte");
  CHECK(dec16_funnel_rc(0x11223344u, 0x55667788u, 8) == 0x88112233u, "funnel 8");
  CHECK(dec16_funnel_rc(0x11223344u, 0x55667788u, 40) == 0x55667788u, "funnel clamps at 32");
}

// The host binary16 rounding against CUDA's own host conversion.
static void test_half_conv() {
  CHECK(hbits(1.0) == 0x3C00u, "1");
  CHECK(hbits(65504.0) == 0x7BFFu, "max");
  CHECK(hbits(65519.99) == 0x7BFFu, "below the inf threshold");
  CHECK(hbits(65520.0) == 0x7C00u, "inf");
  CHECK(hbits(ldexp(1.0, -24)) == 1u, "min subnormal");
  CHECK(hbits(ldexp(1.0, -25)) == 0u, "tie to even (0)");
  CHECK(hbits(3 * ldexp(1.0, -25)) == 2u, "tie to even (2)");
  CHECK(hbits(-2.0) == 0xC000u, "-2");
  for (int i = 0; i < 2000000; i++) {
    uint32_t u = r32();
    if (((u >> 23) & 0xFF) == 0xFF) continue;
    if (i & 1) u = (u & 0x807FFFFFu) | ((uint32_t)(100 + (u >> 23) % 55) << 23); // mostly half range
    float f;
    memcpy(&f, &u, 4);
    const __half h = __float2half_rn(f);
    uint16_t want;
    memcpy(&want, &h, 2);
    const uint16_t got = hbits((double)f);
    CHECK(got == want, "float %a: got %04x want %04x", f, got, want);
    if ((got & 0x7C00u) != 0x7C00u) CHECK(dec16_h2f_host(got) == __half2float(h), "h2f %04x", got);
  }
  for (uint32_t b = 0; b < 65536; b++) {
    if ((b & 0x7C00u) == 0x7C00u) continue;
    __half h;
    const uint16_t hb = (uint16_t)b;
    memcpy(&h, &hb, 2);
    CHECK(dec16_h2f_host(hb) == __half2float(h), "h2f %04x", b);
  }
}

static const double kE2M1[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};

// nibble i of q -> element position in the block-local word: pair outputs.
static int nib_of_pair(int i, int half) { return i + 4 * half; }

static void test_mxfp4_word() {
  // Every byte value at every byte position, the rest random: every output
  // half must be the exact binary16 of its signed E2M1 value.
  for (int pos = 0; pos < 4; pos++)
    for (int v = 0; v < 256; v++)
      for (int rep = 0; rep < 8; rep++) {
        uint32_t q = r32();
        q = (q & ~(0xFFu << (8 * pos))) | ((uint32_t)v << (8 * pos));
        uint32_t h[4];
        dec16_mxfp4_word(q, h);
        for (int i = 0; i < 4; i++)
          for (int half = 0; half < 2; half++) {
            const int n = (int)((q >> (4 * nib_of_pair(i, half))) & 0xF);
            const double val = (n & 8) ? -kE2M1[n & 7] : kE2M1[n & 7];
            const uint16_t want = (n & 8) ? (uint16_t)(0x8000u | hbits(kE2M1[n & 7])) : hbits(val);
            const uint16_t got = half ? hi16(h[i]) : lo16(h[i]);
            CHECK(got == want, "mxfp4 q=%08x pair %d half %d: got %04x want %04x", q, i, half, got, want);
          }
      }
  // The documented element order of the pairs.
  for (int w = 0; w < 4; w++)
    for (int a = 0; a < 32; a++) {
      // element a of the block sits in quant byte a%16, high nibble if a >= 16
      if ((a & 15) / 4 != w) continue;
      const int byte = (a & 15) % 4, nib = 2 * byte + (a >= 16);
      const int i = nib & 3, half = nib >> 2; // output pair and half holding this nibble
      const int idx = dec16_xh_index(1, a);   // staged x position
      CHECK(idx == 8 * w + 2 * i + half, "xh_index(1,%d)=%d, decoder puts it at %d", a, idx, 8 * w + 2 * i + half);
    }
}

static void test_q4_0_word() {
  for (int pos = 0; pos < 4; pos++)
    for (int v = 0; v < 256; v++) {
      uint32_t q = r32();
      q = (q & ~(0xFFu << (8 * pos))) | ((uint32_t)v << (8 * pos));
      uint32_t h[4];
      dec16_q4_0_word(q, h);
      for (int i = 0; i < 4; i++)
        for (int half = 0; half < 2; half++) {
          const int n = (int)((q >> (4 * nib_of_pair(i, half))) & 0xF);
          const uint16_t got = half ? hi16(h[i]) : lo16(h[i]);
          CHECK(dec16_h2f_host(got) == (float)(n - 8), "q4_0 nibble %d -> %g", n, dec16_h2f_host(got));
        }
    }
}

static void test_q8_0_word() {
  for (int pos = 0; pos < 4; pos++)
    for (int v = 0; v < 256; v++) {
      uint32_t q = r32();
      q = (q & ~(0xFFu << (8 * pos))) | ((uint32_t)v << (8 * pos));
      uint32_t h[2];
      dec16_q8_0_word(q, h);
      for (int e = 0; e < 4; e++) {
        const int8_t b = (int8_t)((q >> (8 * e)) & 0xFF);
        const uint16_t got = (e & 1) ? hi16(h[e >> 1]) : lo16(h[e >> 1]);
        CHECK(dec16_h2f_host(got) == (float)b, "q8_0 byte %d -> %g", b, dec16_h2f_host(got));
      }
    }
  for (int a = 0; a < 32; a++) CHECK(dec16_xh_index(0, a) == a, "q8 order");
}

static void test_staging_layout() {
  for (int kind = 0; kind < 2; kind++) {
    int seen[32] = {0};
    for (int a = 0; a < 32; a++) seen[dec16_xh_index(kind, a)]++;
    for (int i = 0; i < 32; i++) CHECK(seen[i] == 1, "kind %d: index %d used %d times", kind, i, seen[i]);
    // put4 (the device staging's per-thread store) agrees with xh_index.
    uint32_t chunk[16];
    for (int o = 0; o < 8; o++)
      dec16_put4(chunk, kind, o, (float)(4 * o), (float)(4 * o + 1), (float)(4 * o + 2), (float)(4 * o + 3));
    for (int a = 0; a < 32; a++) {
      const int idx = dec16_xh_index(kind, a);
      const uint16_t hb = (idx & 1) ? hi16(chunk[idx >> 1]) : lo16(chunk[idx >> 1]);
      CHECK(dec16_h2f_host(hb) == (float)a, "kind %d: element %d staged at %d holds %g", kind, a, idx,
            dec16_h2f_host(hb));
    }
  }
  // Chunk scales: every float exponent.
  for (int e = 0; e < 255; e++) {
    const uint32_t bits = ((uint32_t)e << 23) | (r32() & 0x7FFFFFu);
    float m, s, inv;
    memcpy(&m, &bits, 4);
    dec16_chunk_scale(bits, s, inv);
    CHECK(s * inv == 1.0f, "scale*inv for exponent %d", e);
    if (e >= 1 && e <= 253) CHECK(m * s >= 1.0f && m * s < 2.0f, "scaled max %g for exponent %d", m * s, e);
    else CHECK(m * s < 4.0f, "scaled max %g for exponent %d", m * s, e);
  }
}

// Host staging of one chunk (what dec16_stage does on the device).
static float stage_chunk(const float *x, int kind, uint32_t out[16]) {
  uint32_t mx = 0;
  for (int i = 0; i < 32; i++) mx = std::max(mx, dec16_absbits(x[i]));
  float s, inv;
  dec16_chunk_scale(mx, s, inv);
  for (int o = 0; o < 8; o++)
    dec16_put4(out, kind, o, x[4 * o] * s, x[4 * o + 1] * s, x[4 * o + 2] * s, x[4 * o + 3] * s);
  return inv;
}

// A block written at byte offset sh into a word buffer; returns its decoded
// float values (the reference dequantization).
template <int T>
static void make_block(uint32_t *words, uint32_t sh, double *vals, int scale_e, std::vector<uint8_t> &bytes) {
  const int bb = T == ORCH_T_MXFP4 ? 17 : T == ORCH_T_Q4_0 ? 18 : 34;
  bytes.assign(bb, 0);
  for (auto &b : bytes) b = (uint8_t)r32();
  double d;
  if (T == ORCH_T_MXFP4) {
    bytes[0] = (uint8_t)scale_e;
    d = scale_e == 0 ? ldexp(1.0, -127) : ldexp(1.0, scale_e - 127);
  } else {
    const uint16_t hd = hbits((0.001 + 0.05 * (r32() % 1000) / 1000.0) * ((r32() & 1) ? -1 : 1));
    bytes[0] = (uint8_t)hd;
    bytes[1] = (uint8_t)(hd >> 8);
    d = dec16_h2f_host(hd);
  }
  for (int a = 0; a < 32; a++) {
    if (T == ORCH_T_Q8_0) vals[a] = d * (int8_t)bytes[2 + a];
    else {
      const int off = T == ORCH_T_MXFP4 ? 1 : 2;
      const int n = (bytes[off + (a & 15)] >> (a >= 16 ? 4 : 0)) & 0xF;
      vals[a] = T == ORCH_T_MXFP4 ? d * ((n & 8) ? -kE2M1[n & 7] : kE2M1[n & 7]) : d * (n - 8);
    }
  }
  uint8_t buf[48] = {0};
  for (int i = 0; i < 48; i++) buf[i] = (uint8_t)r32(); // bytes around the block are garbage
  memcpy(buf + sh, bytes.data(), bb);
  memcpy(words, buf, 48);
}

// Block dot error against the double reference, bounded by the classic
// analysis: x rounded to fp16 (relative u = 2^-11 per term), then each half
// accumulates 8 products with one rounding per HFMA2 (|error| <= u * |partial
// sum| <= u * sum|w x| each), two fp32 folds (negligible): |err| <= 9 u sum|w x|
// (+ a fp32 term). The rms error of many-block dots is what the GPU suite's
// relative-L2 tolerance is set from (printed).
template <int T>
static void test_block_dot(const char *name) {
  const int kind = dec16_traits<T>::kind;
  const double u = ldexp(1.0, -11);
  double worst = 0, se = 0, sr = 0;
  long blocks = 0;
  std::normal_distribution<double> nd(0, 1);
  const int shs[4] = {0, 1, 2, 3};
  const int nsh = T == ORCH_T_MXFP4 ? 4 : 2; // Q8_0 / Q4_0 blocks are 2-byte aligned in a row
  const int escales = T == ORCH_T_MXFP4 ? 256 : 64;
  for (int es = 0; es < escales; es++)
    for (int si = 0; si < nsh; si++)
      for (int rep = 0; rep < 40; rep++) {
        const uint32_t sh = (uint32_t)shs[si * (T == ORCH_T_MXFP4 ? 1 : 2)];
        uint32_t words[12];
        double wv[32];
        std::vector<uint8_t> bytes;
        // MXFP4 scales: every E8M0 byte except 255 (inf); others random.
        const int e = T == ORCH_T_MXFP4 ? (es == 255 ? 254 : es) : 0;
        make_block<T>(words, sh, wv, e, bytes);
        float x[32];
        const double mag = ldexp(1.0, (int)(r32() % 40) - 20); // x from 2^-20 to 2^19
        for (int a = 0; a < 32; a++) x[a] = (float)(nd(rng) * mag * ((rep & 7) == 0 && a == 5 ? 1000 : 1));
        uint32_t chunk[16];
        const float inv = stage_chunk(x, kind, chunk);
        const float got = dec16_block_dot<T>(words, sh, reinterpret_cast<const uint4 *>(chunk), inv);
        double ref = 0, absum = 0;
        for (int a = 0; a < 32; a++) {
          ref += wv[a] * (double)x[a];
          absum += fabs(wv[a] * (double)x[a]);
        }
        const double err = fabs((double)got - ref);
        if (absum > 0 && absum < 1e30 && absum > 1e-30) {
          const double rel = err / (absum * u);
          worst = std::max(worst, rel);
          CHECK(err <= 9 * u * absum * 1.0001 + 1e-6 * fabs(ref) + 1e-38, "%s e=%d sh=%u: got %.9g ref %.9g (|err| %.3g, bound %.3g)",
                name, e, sh, got, ref, err, 9 * u * absum);
          if (T != ORCH_T_MXFP4 || (e >= 100 && e <= 150)) {
            se += err * err;
            sr += ref * ref;
          }
        } // else: products below 1e-30 (E8M0 scales near 2^-127 times tiny x): fp32 underflow, not checked

        blocks++;
      }
  // NT = 2 decodes once for two tokens: each token's sums are bit-identical
  // to the NT = 1 dot.
  for (int rep = 0; rep < 2000; rep++) {
    uint32_t words[12];
    double wv[32];
    std::vector<uint8_t> bytes;
    const uint32_t sh = T == ORCH_T_MXFP4 ? r32() % 4 : 2 * (r32() % 2);
    make_block<T>(words, sh, wv, 120 + (int)(r32() % 10), bytes);
    float x0[32], x1[32];
    for (int a = 0; a < 32; a++) {
      x0[a] = (float)nd(rng);
      x1[a] = (float)nd(rng) * 3;
    }
    uint32_t c0[16], c1[16];
    const float i0 = stage_chunk(x0, kind, c0), i1 = stage_chunk(x1, kind, c1);
    const uint4 *xp[2] = {reinterpret_cast<const uint4 *>(c0), reinterpret_cast<const uint4 *>(c1)};
    uint32_t acc[2][2] = {{0, 0}, {0, 0}};
    dec16_block_acc<T, 2>(words, sh, xp, 2, acc);
    const float ws = dec16_wscale<T>(words, sh);
    CHECK(dec16_fold(acc[0], ws, i0) == dec16_block_dot<T>(words, sh, xp[0], i0), "%s NT=2 token 0", name);
    CHECK(dec16_fold(acc[1], ws, i1) == dec16_block_dot<T>(words, sh, xp[1], i1), "%s NT=2 token 1", name);
  }
  printf("%-6s %ld blocks: worst |err| = %.2f u sum|wx| (bound 9); rms relative error of the block sums %.2e\n",
         name, blocks, worst, sqrt(se / sr));
}

// One GEMV row of k = 2880 like the GPU suite's check: relative L2 error over
// 256 rows, the number the tolerance in sdk/ml/cuda/gpu_test.go is set from.
template <int T>
static void gemv_rel_l2(const char *name) {
  const int kind = dec16_traits<T>::kind, k = 2880, nch = k / 32, rows = 256;
  std::normal_distribution<double> nd(0, 1);
  std::vector<float> x(k);
  for (auto &v : x) v = (float)nd(rng);
  std::vector<uint32_t> xs(nch * 16);
  std::vector<float> inv(nch);
  for (int c = 0; c < nch; c++) inv[c] = stage_chunk(&x[32 * c], kind, &xs[16 * c]);
  double num = 0, den = 0;
  for (int r = 0; r < rows; r++) {
    double ref = 0;
    float got = 0;
    for (int c = 0; c < nch; c++) {
      uint32_t words[12];
      double wv[32];
      std::vector<uint8_t> bytes;
      const uint32_t sh = T == ORCH_T_MXFP4 ? r32() % 4 : 2 * (r32() % 2);
      make_block<T>(words, sh, wv, 124 + (int)(r32() % 5), bytes);
      got += dec16_block_dot<T>(words, sh, reinterpret_cast<const uint4 *>(&xs[16 * c]), inv[c]);
      for (int a = 0; a < 32; a++) ref += wv[a] * x[32 * c + a];
    }
    num += ((double)got - ref) * ((double)got - ref);
    den += ref * ref;
  }
  const double rel = sqrt(num / den);
  printf("%-6s GEMV k=%d, %d rows: relative L2 error %.2e\n", name, k, rows, rel);
  CHECK(rel < 1e-3, "%s GEMV relative error %.3g", name, rel);
}

// The GPU suite's TestMoE shape (d=128, ff=96, top-4 of 8 experts, biases,
// clamped SwiGLU) through the emulated MoE v3 arithmetic: gate/up GEMVs, the
// activation (fp32) restaged in fp16 for the down GEMV, weighted combine.
// Relative L2 error over the output against a double reference: the basis of
// the 2e-3 MoE bound in sdk/ml/cuda/gpu_test.go.
static double swiglu_oai(double g, double u) {
  g = std::min(g, 7.0);
  u = std::min(std::max(u, -7.0), 7.0);
  return (u + 1) * g / (1 + exp(-1.702 * g));
}

template <int T>
static double moe_rel_l2(int d, int ff, int n, int topk = 4) {
  const int kind = dec16_traits<T>::kind;
  std::normal_distribution<double> nd(0, 1);
  struct blk { uint32_t w[12]; uint32_t sh; double v[32]; };
  auto mk = [&](int rows, int k) {
    std::vector<blk> m((size_t)rows * (k / 32));
    for (auto &b : m) {
      std::vector<uint8_t> bytes;
      b.sh = T == ORCH_T_MXFP4 ? r32() % 4 : 2 * (r32() % 2);
      make_block<T>(b.w, b.sh, b.v, 124 + (int)(r32() % 5), bytes);
    }
    return m;
  };
  double num = 0, den = 0;
  for (int t = 0; t < n; t++) {
    std::vector<float> x(d);
    for (auto &v : x) v = (float)nd(rng);
    std::vector<uint32_t> xs(d / 32 * 16);
    std::vector<float> xi(d / 32);
    for (int c = 0; c < d / 32; c++) xi[c] = stage_chunk(&x[32 * c], kind, &xs[16 * c]);
    std::vector<double> out_ref(d, 0), out_got(d, 0);
    double wsum = 0;
    std::vector<double> wts(topk);
    for (auto &w : wts) wsum += (w = 0.1 + (r32() % 1000) / 1000.0);
    for (int s = 0; s < topk; s++) {
      auto G = mk(ff, d), U = mk(ff, d), D = mk(d, ff);
      std::vector<float> act(ff);
      std::vector<double> act_ref(ff);
      for (int r = 0; r < ff; r++) {
        const double gb = nd(rng), ub = nd(rng);
        float g = 0, u = 0;
        double gr = 0, ur = 0;
        for (int c = 0; c < d / 32; c++) {
          const blk &bg = G[(size_t)r * (d / 32) + c], &bu = U[(size_t)r * (d / 32) + c];
          g += dec16_block_dot<T>(bg.w, bg.sh, reinterpret_cast<const uint4 *>(&xs[16 * c]), xi[c]);
          u += dec16_block_dot<T>(bu.w, bu.sh, reinterpret_cast<const uint4 *>(&xs[16 * c]), xi[c]);
          for (int a = 0; a < 32; a++) {
            gr += bg.v[a] * x[32 * c + a];
            ur += bu.v[a] * x[32 * c + a];
          }
        }
        act[r] = (float)swiglu_oai((double)(g + (float)gb), (double)(u + (float)ub));
        act_ref[r] = swiglu_oai(gr + gb, ur + ub);
      }
      std::vector<uint32_t> as(ff / 32 * 16);
      std::vector<float> ai(ff / 32);
      for (int c = 0; c < ff / 32; c++) ai[c] = stage_chunk(&act[32 * c], kind, &as[16 * c]);
      for (int r = 0; r < d; r++) {
        const double db = nd(rng);
        float y = 0;
        double yr = 0;
        for (int c = 0; c < ff / 32; c++) {
          const blk &b = D[(size_t)r * (ff / 32) + c];
          y += dec16_block_dot<T>(b.w, b.sh, reinterpret_cast<const uint4 *>(&as[16 * c]), ai[c]);
          for (int a = 0; a < 32; a++) yr += b.v[a] * act_ref[32 * c + a];
        }
        out_got[r] += wts[s] / wsum * (y + db);
        out_ref[r] += wts[s] / wsum * (yr + db);
      }
    }
    for (int r = 0; r < d; r++) {
      num += (out_got[r] - out_ref[r]) * (out_got[r] - out_ref[r]);
      den += out_ref[r] * out_ref[r];
    }
  }
  return sqrt(num / den);
}

template <int T>
static void test_moe(const char *name, bool long_run) {
  double worst = 0;
  for (int rep = 0; rep < 4; rep++) worst = std::max(worst, moe_rel_l2<T>(128, 96, 12));
  printf("%-6s MoE d=128 ff=96 n=12: worst relative L2 error over 4 runs %.2e\n", name, worst);
  CHECK(worst < 3e-3, "%s MoE relative error %.3g", name, worst);
  if (!long_run) return;
  // The GPU suite's small cases (n = 1, 3, 12; top-4 and top-2): spread of the error over many draws.
  for (int n : {1, 3, 12})
    for (int topk : {4, 2}) {
      double w = 0, sum = 0;
      for (int rep = 0; rep < 25; rep++) {
        const double e = moe_rel_l2<T>(128, 96, n, topk);
        w = std::max(w, e);
        sum += e;
      }
      printf("%-6s MoE d=128 ff=96 n=%d top-%d: mean %.2e, max over 25 draws %.2e\n", name, n, topk, sum / 25, w);
      worst = std::max(worst, w);
    }
  for (int rep = 0; rep < 2; rep++) {
    const double wide = moe_rel_l2<T>(3200, 3200, 1 + rep % 2);
    printf("%-6s MoE d=ff=3200 n=%d: %.2e\n", name, 1 + rep % 2, wide);
    worst = std::max(worst, wide);
  }
  CHECK(worst < 6e-3, "%s MoE relative error %.3g", name, worst);
}

int main(int argc, char **argv) {
  const bool long_run = argc > 1 && strcmp(argv[1], "long") == 0; // + the TestMoEWide shape (~1 min)
  test_prmt();
  test_half_conv();
  test_mxfp4_word();
  test_q4_0_word();
  test_q8_0_word();
  test_staging_layout();
  test_block_dot<ORCH_T_MXFP4>("MXFP4");
  test_block_dot<ORCH_T_Q4_0>("Q4_0");
  test_block_dot<ORCH_T_Q8_0>("Q8_0");
  gemv_rel_l2<ORCH_T_MXFP4>("MXFP4");
  gemv_rel_l2<ORCH_T_Q4_0>("Q4_0");
  gemv_rel_l2<ORCH_T_Q8_0>("Q8_0");
  test_moe<ORCH_T_MXFP4>("MXFP4", long_run);
  test_moe<ORCH_T_Q8_0>("Q8_0", long_run);
  if (failures) {
    fprintf(stderr, "dec16_test: %d failures\n", failures);
    return 1;
  }
  printf("dec16_test: PASS\n");
  return 0;
}
