// Host test of the L2 prefetch kernel's index math (cuda/src/prefetch_plan.cuh):
//   g++ -std=c++17 -Wall -Werror -Icuda/include -o /tmp/prefetch_plan_test cuda/test/prefetch_plan_test.cpp
// Runs on the CPU; no CUDA needed. For random ranges (unaligned starts and
// lengths, empty and NULL ones, up to ORCH_PF_MAX_RANGES) and both unit sizes:
// the units the kernel's threads walk cover every byte of every range, are
// 128-byte aligned with sizes that are multiples of 128 (so of the 16 bulk
// prefetch needs) and at most one unit, stay inside the line-rounded range,
// and do not overlap; the CTA count is in [1, max] and never exceeds the units.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <algorithm>
#include <set>
#include <utility>
#include <vector>

#include "../src/prefetch_plan.cuh"

static int fails = 0;
#define EXPECT(c, ...)                \
  do {                                \
    if (!(c)) {                       \
      std::printf(__VA_ARGS__);       \
      std::printf("\n");              \
      if (++fails > 20) std::exit(1); \
    }                                 \
  } while (0)

int main() {
  std::mt19937_64 rng(7);
  for (int it = 0; it < 1500; it++) {
    const int64_t unit = (it & 1) ? PF_LINE : PF_CHUNK;
    const int count = 1 + (int)(rng() % ORCH_PF_MAX_RANGES);
    orch_pf_range r[ORCH_PF_MAX_RANGES];
    uintptr_t base = 0x7f0000000000ull;
    int nonempty = 0;
    for (int i = 0; i < count; i++) {
      base += 256 * (1 + rng() % 100000); // allocation starts are 256-byte aligned
      const uint64_t k = rng() % 8;
      const int64_t bytes = k == 0 ? 0 : k == 1 ? 1 + (int64_t)(rng() % 300) : (int64_t)(rng() % (unit == PF_LINE ? (1 << 20) : (40 << 20)));
      r[i].ptr = (k == 7 && rng() % 4 == 0) ? nullptr : (const void *)(base + rng() % 4096);
      r[i].bytes = bytes;
      if (r[i].ptr && bytes > 0) nonempty++;
      base += (uintptr_t)bytes + 4096;
    }
    pf_args a = {};
    const int n = pf_plan(&a, r, count, unit);
    EXPECT(n == nonempty, "it %d: %d ranges planned, want %d", it, n, nonempty);
    if (n == 0) continue;
    // Walk the units exactly as the kernel does.
    std::set<std::pair<uintptr_t, uintptr_t>> seen;
    std::vector<std::pair<uintptr_t, uintptr_t>> spans;
    for (int64_t u = 0; u < a.units[a.n]; u++) {
      const char *p;
      int64_t size;
      pf_unit(a, u, &p, &size);
      const uintptr_t s = (uintptr_t)p;
      EXPECT(s % PF_LINE == 0 && size > 0 && size % PF_LINE == 0 && size <= unit, "it %d unit %lld: %lx + %lld", it,
             (long long)u, (unsigned long)s, (long long)size);
      spans.push_back({s, s + (uintptr_t)size});
    }
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); i++)
      EXPECT(spans[i].first >= spans[i - 1].second, "it %d: units overlap", it);
    for (int i = 0; i < count; i++) {
      if (!r[i].ptr || r[i].bytes <= 0) continue;
      const uintptr_t s = (uintptr_t)r[i].ptr, e = s + (uintptr_t)r[i].bytes;
      const uintptr_t ls = s & ~(uintptr_t)(PF_LINE - 1), le = (e + PF_LINE - 1) & ~(uintptr_t)(PF_LINE - 1);
      // Covered: the units intersecting [ls, le) tile it exactly.
      uintptr_t at = ls;
      for (auto sp_it = std::lower_bound(spans.begin(), spans.end(), std::make_pair(ls, (uintptr_t)0));
           sp_it != spans.end() && sp_it->first < le; ++sp_it) {
        const auto &sp = *sp_it;
        EXPECT(sp.first == at && sp.second <= le, "it %d range %d: gap or overrun at %lx", it, i, (unsigned long)at);
        at = sp.second;
      }
      EXPECT(at == le, "it %d range %d: covered to %lx of %lx", it, i, (unsigned long)at, (unsigned long)le);
    }
    const int64_t ctas = pf_ctas(a, 128, 256 << 10, 64);
    EXPECT(ctas >= 1 && ctas <= 64 && (ctas == 1 || ctas <= (a.units[a.n] + 127) / 128), "it %d: %lld CTAs", it,
           (long long)ctas);
  }
  if (fails) {
    std::printf("prefetch_plan_test: %d failures\n", fails);
    return 1;
  }
  std::printf("prefetch_plan_test: ok\n");
  return 0;
}
