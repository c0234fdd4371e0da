// prefetch_plan.cuh — index math of the L2 prefetch kernel (prefetch.cu):
// __host__ __device__ helpers so that cuda/test/prefetch_plan_test.cpp checks
// them on the host (no GPU here). A launch covers up to ORCH_PF_MAX_RANGES
// byte ranges, each widened to whole 128-byte lines and cut into units (one
// bulk prefetch instruction or one line prefetch each); unit u of the launch
// maps to one address and size.
#pragma once
#include <stdint.h>

#include "../include/orch_cuda.h"

#if defined(__CUDACC__)
#define PF_HD __host__ __device__ __forceinline__
#else
#define PF_HD inline
#endif

constexpr int64_t PF_LINE = 128;       // bytes per prefetch.global.L2 (and the widening)
constexpr int64_t PF_CHUNK = 16 << 10; // bytes per cp.async.bulk.prefetch.L2 (multiple of 16)

struct pf_args {
  const char *p[ORCH_PF_MAX_RANGES];      // PF_LINE-aligned
  int64_t bytes[ORCH_PF_MAX_RANGES];      // multiples of PF_LINE
  int64_t units[ORCH_PF_MAX_RANGES + 1];  // prefix sums of units per range
  int64_t unit;                           // PF_CHUNK or PF_LINE
  int n;
  int policy; // ORCH_PF_EVICT_LAST bit
  int line;   // 1: prefetch.global.L2 per line (no bulk prefetch)
  int dry;    // 1: issue nothing (ORCH_PF_DRY)
};

// Fills a from ranges: empty or NULL ones dropped, the rest widened to whole
// lines (a cudaMalloc allocation is 256-byte aligned and mapped in whole
// pages, so the widening stays in mapped memory). Returns a->n.
PF_HD int pf_plan(pf_args *a, const orch_pf_range *ranges, int count, int64_t unit) {
  a->n = 0;
  a->unit = unit;
  a->units[0] = 0;
  for (int i = 0; i < count && i < ORCH_PF_MAX_RANGES; i++) {
    if (!ranges[i].ptr || ranges[i].bytes <= 0) continue;
    const uintptr_t s = (uintptr_t)ranges[i].ptr & ~(uintptr_t)(PF_LINE - 1);
    const uintptr_t e =
        ((uintptr_t)ranges[i].ptr + (uintptr_t)ranges[i].bytes + PF_LINE - 1) & ~(uintptr_t)(PF_LINE - 1);
    const int n = a->n;
    a->p[n] = (const char *)s;
    a->bytes[n] = (int64_t)(e - s);
    a->units[n + 1] = a->units[n] + (a->bytes[n] + unit - 1) / unit;
    a->n = n + 1;
  }
  return a->n;
}

// Unit u (< a.units[a.n]): its address and size (<= a.unit, a multiple of PF_LINE).
PF_HD void pf_unit(const pf_args &a, int64_t u, const char **p, int64_t *size) {
  int r = 0;
  while (r + 1 < a.n && u >= a.units[r + 1]) r++;
  const int64_t off = (u - a.units[r]) * a.unit;
  *p = a.p[r] + off;
  const int64_t left = a.bytes[r] - off;
  *size = left < a.unit ? left : a.unit;
}

// CTAs of PF_THREADS for a launch: one per bytes_per_cta, at most max_ctas,
// no more than there are units for, at least 1.
PF_HD int64_t pf_ctas(const pf_args &a, int64_t threads, int64_t bytes_per_cta, int64_t max_ctas) {
  int64_t total = 0;
  for (int i = 0; i < a.n; i++) total += a.bytes[i];
  int64_t c = (total + bytes_per_cta - 1) / bytes_per_cta;
  if (c > max_ctas) c = max_ctas;
  const int64_t need = (a.units[a.n] + threads - 1) / threads;
  if (c > need) c = need;
  return c < 1 ? 1 : c;
}
