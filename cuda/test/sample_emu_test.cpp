// CPU emulation test of orch_sample_rows's kernels (cuda/src/sample_rows.cuh, compiled against cuda_emu.h under
// AddressSanitizer). Rows of several CTAs (vocab 8,315: 8 slices for a few rows, 2 from 128 rows), mixed settings in
// one launch set:
//  - the thresholds the radix passes leave (SRowState.thr) against a sort-based reference: top-k keeps the keys
//    >= the k-th largest, top-p the smallest top prefix (by logit) whose probability mass reaches top_p of the
//    top-k set's (mass in float64 here, the kernels' 2^-40 fixed point there: random logits keep the boundary
//    far from a rounding), min-p's cut;
//  - the tokens against the reference draw: argmax over the reference's kept set of l / T + sr_gumbel(...)
//    (the same host/device noise function), so every draw must match exactly; greedy rows against the argmax;
//  - edge rows: all -Inf (token 0), a +Inf logit (the first one), NaN logits (never drawn), top-k >= vocab,
//    ties at the top-k threshold (all kept), top-p of a one-hot row (one key: early exit), k = 1;
//  - a row's token independent of the batch and of the split (1, 2, 3 CTAs a row give sr_parts's 8's tokens);
//  - the scratch is left clean (histograms zero, tickets 0) so the next op (or a graph replay) starts right.
//
//   g++ -std=c++20 -O1 -g -pthread -fsanitize=address -Wno-unknown-pragmas -Icuda/include \
//     -o /tmp/sample_emu cuda/test/sample_emu_test.cpp && /tmp/sample_emu
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda_emu.h"

#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#define INT64_MAX_ INT64_MAX
inline void pdl_wait() { emu_pdl_wait(); }
inline void pdl_trigger() {}
inline void __threadfence() {}
inline unsigned atomicInc(unsigned *a, unsigned lim) { // one CTA at a time, fibers switch at barriers only
  const unsigned old = *a;
  *a = old >= lim ? 0 : old + 1;
  return old;
}
inline unsigned atomicAdd(unsigned *a, unsigned v) {
  const unsigned old = *a;
  *a += v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long *a, unsigned long long v) {
  const unsigned long long old = *a;
  *a += v;
  return old;
}
inline unsigned atomicMax(unsigned *a, unsigned v) {
  const unsigned old = *a;
  *a = old > v ? old : v;
  return old;
}
inline long long __shfl_xor_sync(unsigned m, long long v, int o) {
  return __shfl_sync(m, v, (int)(threadIdx.x & 31) ^ o);
}
inline int64_t __shfl_xor_sync(unsigned m, int64_t v, int o) { return (int64_t)__shfl_xor_sync(m, (long long)v, o); }

#include "../src/sample_rows.cuh"

static int fails = 0;
#define EXPECT(cond, ...)                                                                                            \
  do {                                                                                                               \
    if (!(cond)) {                                                                                                   \
      if (fails++ < 30) {                                                                                            \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                             \
        std::printf(__VA_ARGS__);                                                                                    \
        std::printf("\n");                                                                                           \
      }                                                                                                              \
    }                                                                                                                \
  } while (0)

// Reference kept set: the threshold key (kept: key >= thr) of top-k then top-p, and min-p's cut.
static uint32_t ref_thr(const float *l, int64_t V, const orch_sample_params &p, float mx) {
  std::vector<float> v;
  for (int64_t i = 0; i < V; i++)
    if (l[i] > -INFINITY) v.push_back(l[i]);
  std::sort(v.begin(), v.end(), [](float a, float b) { return a > b; });
  if (v.empty()) return 0;
  size_t keep = v.size();
  uint32_t thr = 0;
  if (sr_topk(p, V) && (size_t)p.top_k < v.size()) {
    thr = sr_key(v[p.top_k - 1]);
    keep = p.top_k;
    while (keep < v.size() && v[keep] == v[p.top_k - 1]) keep++; // ties kept
  }
  if (sr_topp(p)) {
    double tot = 0;
    for (size_t j = 0; j < keep; j++) tot += std::exp(((double)v[j] - mx) / p.temperature);
    double cum = 0;
    for (size_t j = 0; j < keep; j++) {
      cum += std::exp(((double)v[j] - mx) / p.temperature);
      if (cum >= p.top_p * tot) {
        thr = sr_key(v[j]);
        break;
      }
    }
  }
  return thr;
}

static int32_t ref_draw(const float *l, int64_t V, const orch_sample_params &p, uint32_t thr, float mx) {
  if (sr_greedy(p)) {
    float b = -INFINITY;
    int64_t bi = INT64_MAX;
    for (int64_t i = 0; i < V; i++) sr_pick(b, bi, l[i], i);
    return bi == INT64_MAX ? 0 : (int32_t)bi;
  }
  float cut = -INFINITY;
  if (sr_filtered(p, V)) {
    if (sr_minp(p)) cut = mx + p.temperature * logf(p.min_p);
    if (mx == INFINITY) cut = INFINITY;
  }
  const uint64_t base = sr_base(p.seed, p.counter);
  float b = -INFINITY;
  int64_t bi = INT64_MAX;
  for (int64_t i = 0; i < V; i++) {
    if (!(l[i] > -INFINITY) || !(l[i] >= cut) || sr_key(l[i]) < thr) continue;
    sr_pick(b, bi, l[i] * (1.f / p.temperature) + sr_gumbel(base, i), i);
  }
  return bi == INT64_MAX ? 0 : (int32_t)bi;
}

static int filters_of(const std::vector<orch_sample_params> &ps, int64_t V) {
  int f = 0;
  for (auto &p : ps)
    if (sr_filtered(p, V)) f = std::max(f, 1 + (int)sr_topk(p, V) + (int)sr_topp(p));
  return f;
}

static void run_op(std::vector<int32_t> &out, const std::vector<float> &l, int64_t V,
                   const std::vector<orch_sample_params> &ps, int Pforce = 0) {
  const int n = (int)ps.size(), P = Pforce ? Pforce : sr_parts(V, n), filters = filters_of(ps, V);
  out.assign(n, -7);
  const dim3 grid{(unsigned)P, (unsigned)n, 1};
  if (filters > 0) {
    emu_launch_pdl(grid, SR_THREADS, 0, [&] { srows_max_kernel(l.data(), V, ps.data()); });
    for (int pass = 0; pass < SR_PASSES * (filters - 1); pass++)
      emu_launch_pdl(grid, SR_THREADS, 0, [&] { srows_hist_kernel(l.data(), V, ps.data()); });
  }
  emu_launch_pdl(grid, SR_THREADS, 0, [&] { srows_draw_kernel(out.data(), l.data(), V, ps.data()); });
}

int main() {
  const int64_t V = 2 * 4096 + 123; // 8 slices a row (sr_parts: few rows), 2 from 128 rows
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd(0.f, 3.f);
  struct Row {
    const char *name;
    orch_sample_params p;
    int kind; // 0 random, 1 all -Inf, 2 +Inf at two places, 3 NaNs, 4 ties at the k-th, 5 one-hot
  };
  auto P = [](float t, int k, float tp, float mp) {
    orch_sample_params p{};
    p.temperature = t;
    p.top_k = k;
    p.top_p = tp;
    p.min_p = mp;
    return p;
  };
  std::vector<Row> rows = {
      {"greedy", P(0, 0, 1, 0), 0},         {"T=1", P(1, 0, 1, 0), 0},
      {"T=0.7 top_p=0.9", P(0.7f, 0, 0.9f, 0), 0}, {"T=1 top_k=40", P(1, 40, 1, 0), 0},
      {"T=1.2 top_k=300 top_p=0.8", P(1.2f, 300, 0.8f, 0), 0}, {"T=1 min_p=0.05", P(1, 0, 1, 0.05f), 0},
      {"T=0.9 top_k=50 top_p=0.95 min_p=0.02", P(0.9f, 50, 0.95f, 0.02f), 0},
      {"T=1 top_k=1", P(1, 1, 1, 0), 0},     {"T=1 top_k=V", P(1, (int)V, 0.5f, 0), 0},
      {"all -Inf top_p", P(1, 0, 0.9f, 0), 1}, {"all -Inf", P(1, 0, 1, 0), 1},
      {"+Inf top_p", P(1, 5, 0.9f, 0), 2},   {"+Inf", P(1, 0, 1, 0), 2},
      {"NaNs top_k=20", P(1, 20, 1, 0), 3},  {"NaNs greedy", P(0, 0, 1, 0), 3},
      {"ties at k-th", P(1, 7, 1, 0), 4},    {"one-hot top_p", P(0.5f, 0, 0.99f, 0), 5},
      {"T=3 top_p=0.5", P(3, 0, 0.5f, 0), 0},
  };
  const int n = (int)rows.size();
  std::vector<float> l(n * V);
  for (int r = 0; r < n; r++) {
    float *lr = &l[r * V];
    for (int64_t i = 0; i < V; i++) lr[i] = nd(rng);
    for (int j = 0; j < 30; j++) lr[rng() % V] += 8.f; // a head of likely tokens
    switch (rows[r].kind) {
    case 1:
      for (int64_t i = 0; i < V; i++) lr[i] = -INFINITY;
      break;
    case 2:
      lr[9000] = INFINITY;
      lr[200] = INFINITY;
      break;
    case 3:
      for (int j = 0; j < 300; j++) lr[rng() % V] = NAN;
      lr[5000] = NAN;
      break;
    case 4: {
      std::vector<float> s(lr, lr + V);
      std::sort(s.begin(), s.end(), [](float a, float b) { return a > b; });
      for (int64_t i = 0; i < V; i++)
        if (lr[i] < s[6] && lr[i] > s[20]) lr[i] = s[6]; // 7th largest tied with the next 13
      break;
    }
    case 5:
      for (int64_t i = 0; i < V; i++) lr[i] = -50.f;
      lr[4321] = 10.f;
      break;
    }
  }
  std::vector<orch_sample_params> ps(n);
  for (int r = 0; r < n; r++) {
    ps[r] = rows[r].p;
    ps[r].seed = 0x1234567ull * (r + 1);
  }
  std::vector<int32_t> out;
  for (int c = 0; c < 3; c++) { // draws at three token indices (fresh noise each)
    for (int r = 0; r < n; r++) ps[r].counter = 1000 + 17 * c;
    run_op(out, l, V, ps);
    for (int r = 0; r < n; r++) {
      const float *lr = &l[r * V];
      float mx = -INFINITY;
      for (int64_t i = 0; i < V; i++) mx = fmaxf(mx, lr[i]);
      uint32_t thr = 0;
      if (sr_filtered(ps[r], V) && mx > -INFINITY && mx < INFINITY) {
        thr = ref_thr(lr, V, ps[r], mx);
        // the same kept set (an early exit leaves the bin's lowest key, not the element's)
        int64_t got = 0, want = 0;
        for (int64_t i = 0; i < V; i++)
          if (lr[i] > -INFINITY) {
            got += sr_key(lr[i]) >= g_sr_state[r].thr;
            want += sr_key(lr[i]) >= thr;
          }
        EXPECT(got == want, "%s: %lld kept (threshold key %08x), want %lld (%08x)", rows[r].name, (long long)got,
               g_sr_state[r].thr, (long long)want, thr);
        EXPECT(g_sr_state[r].stage == SR_DONE, "%s: search not finished", rows[r].name);
      }
      const int32_t want = ref_draw(lr, V, ps[r], thr, mx);
      EXPECT(out[r] == want, "%s (counter %llu): token %d, want %d", rows[r].name,
             (unsigned long long)ps[r].counter, out[r], want);
      if (rows[r].kind == 1) EXPECT(out[r] == 0, "%s: token %d", rows[r].name, out[r]);
      if (rows[r].kind == 2) EXPECT(out[r] == 200, "%s: token %d", rows[r].name, out[r]);
      if (rows[r].kind == 3) EXPECT(!std::isnan(lr[out[r]]), "%s: NaN drawn", rows[r].name);
      if (rows[r].kind == 5) EXPECT(out[r] == 4321, "%s: token %d", rows[r].name, out[r]);
    }
  }
  // The draws of a sampled row vary with the counter (a fresh draw per token), and greedy rows do not.
  {
    std::vector<int32_t> seen;
    for (int c = 0; c < 8; c++) {
      for (int r = 0; r < n; r++) ps[r].counter = c;
      run_op(out, l, V, ps);
      seen.push_back(out[1]);
    }
    std::sort(seen.begin(), seen.end());
    EXPECT(std::unique(seen.begin(), seen.end()) - seen.begin() >= 3, "T=1: 8 counters gave < 3 tokens");
  }
  // A row's token does not depend on the other rows of the launch (seeded requests in any batch).
  {
    for (int r = 0; r < n; r++) ps[r].counter = 5;
    run_op(out, l, V, ps);
    std::vector<int32_t> all = out;
    for (int r : {2, 6}) {
      std::vector<orch_sample_params> one = {ps[r]};
      std::vector<float> lone(l.begin() + r * V, l.begin() + (r + 1) * V);
      run_op(out, lone, V, one);
      EXPECT(out[0] == all[r], "%s alone: token %d, in the batch %d", rows[r].name, out[0], all[r]);
    }
  }
  // Nor on the split: 1, 2, 3 CTAs a row (odd slices) give sr_parts's tokens (8 CTAs a row here: few rows).
  {
    for (int r = 0; r < n; r++) ps[r].counter = 9;
    EXPECT(sr_parts(V, n) == 8 && sr_parts(V, 64) == 4 && sr_parts(V, 256) == 2, "sr_parts %d / %d / %d",
           sr_parts(V, n), sr_parts(V, 64), sr_parts(V, 256));
    run_op(out, l, V, ps);
    const std::vector<int32_t> all = out;
    for (int Pf : {1, 2, 3}) {
      run_op(out, l, V, ps, Pf);
      for (int r = 0; r < n; r++)
        EXPECT(out[r] == all[r], "%s, %d CTAs: token %d, want %d", rows[r].name, Pf, out[r], all[r]);
    }
  }
  for (int i = 0; i < SR_MAX_ROWS * SR_BINS; i++) {
    EXPECT(g_sr_cnt[i] == 0 && g_sr_mass[i] == 0, "histogram bin %d left dirty", i);
    if (g_sr_cnt[i] || g_sr_mass[i]) break;
  }
  for (float f : {-INFINITY, -3.5f, -0.f, 0.f, 1e-30f, 2.f, INFINITY}) EXPECT(sr_unkey(sr_key(f)) == f, "unkey(key(%g))", f);
  for (int i = 0; i < SR_MAX_ROWS; i++) EXPECT(g_sr_ticket[i] == 0, "ticket %d left at %u", i, g_sr_ticket[i]);
  if (fails) {
    std::printf("%d failures\n", fails);
    return 1;
  }
  std::printf("sample_rows emulation: ok (%d rows x 3 draws + checks)\n", n);
  return 0;
}
