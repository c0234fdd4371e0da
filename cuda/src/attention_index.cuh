// attention_index.cuh — index math of the attention kernels, host+device so
// that cuda/test/attention_index_test.cpp can check it on the CPU.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#define ORCH_HD __host__ __device__ __forceinline__
#else
#define ORCH_HD inline
#endif

// Dims of a head held by one lane of a warp: head_dim/32 rounded up.
ORCH_HD constexpr int attn_lane_dims(int hd) { return (hd + 31) / 32; }

// Whether dim e of lane `lane` (dim lane*attn_lane_dims(hd)+e) exists.
// Constant-true for head dims that are multiples of 32.
ORCH_HD constexpr bool attn_dim_ok(int hd, int lane, int e) {
  return hd % 32 == 0 || lane * attn_lane_dims(hd) + e < hd;
}

// ---- tensor-core prefill (attention_tc.cu) row routing ----
// Query rows are taken in tiles of ATTN_TC_ROWS consecutive batch rows
// starting at t0 = t - t % ATTN_TC_ROWS. The tile's "run" is the longest
// prefix t0, t0+1, ... of rows of the same sequence at consecutive
// positions (a prefill chunk). A tile whose run has >= ATTN_TC_MIN_RUN rows
// is done by the tensor-core kernel (rows r < run); every other row by the
// flash-decoding kernel, which skips exactly the rows the former took. Both
// kernels compute the run from the same device arrays with attn_tc_run.
constexpr int ATTN_TC_ROWS = 64;
constexpr int ATTN_TC_MIN_RUN = 16;

// Whether row t continues the run that starts at t0.
ORCH_HD bool attn_tc_row_ok(const int32_t *seq, const int32_t *pos, int64_t n_tok, int64_t t0, int64_t t) {
  return t < n_tok && seq[t] == seq[t0] && (int64_t)pos[t] == (int64_t)pos[t0] + (t - t0);
}

// Run length from the ballots of rows t0+lane (lo) and t0+32+lane (hi):
// the number of leading set bits of the 64-bit mask hi:lo.
ORCH_HD int attn_tc_run_from_bits(uint32_t lo, uint32_t hi) {
  int r = 0;
  while (r < 32 && ((lo >> r) & 1u)) r++;
  if (r < 32) return r;
  while (r < 64 && ((hi >> (r - 32)) & 1u)) r++;
  return r;
}

// Whether row r (0-based in its tile) of a tile with run `run` is the
// tensor-core kernel's.
ORCH_HD bool attn_tc_takes(int run, int r) { return run >= ATTN_TC_MIN_RUN && r < run; }

// ---- depth-adaptive decode splits ----
// A flash-decoding grid has `splits` CTAs per (row, head group), fixed when
// the launch is made (and captured in a graph) from an upper bound of the
// span (Batch.MaxPos: the context length in a captured decode step). The
// kernel sizes the work from the row's ACTUAL span instead: every used split
// takes `per` keys (span / splits rounded up to `gran`, a whole number of
// 32-key warp steps per CTA), the first attn_split_used(span, per) splits
// run, the others exit at once, one used split writes the output itself
// (no combine), and the combine reads only the used splits. So a short row
// in a grid sized for a long context costs one or a few CTAs, not `splits`
// CTAs of one key each plus a combine over all of them.

// Keys visible to the query at position qp: qp + 1, or the last `window`.
ORCH_HD int attn_span(int qp, int window) { return window > 0 && qp + 1 > window ? window : qp + 1; }

// Keys per used split (a multiple of gran; >= gran).
ORCH_HD int attn_split_per(int span, int splits, int gran) {
  const int per = (span + splits - 1) / splits;
  return (per + gran - 1) / gran * gran;
}

// Splits that hold keys (1 .. splits for span >= 1).
ORCH_HD int attn_split_used(int span, int per) { return (span + per - 1) / per; }

// Host: splits of a flash-decoding grid of `ctas` (row, head group) CTAs for rows of at
// most span_max keys: enough gran-key splits to cover span_max, at most
// budget / ctas (so a one-token decode fills the GPU and a big batch does not
// multiply its CTAs), 1 .. cap.
inline int attn_grid_splits(long long ctas, long long span_max, int gran, long long budget, int cap) {
  if (ctas <= 0 || span_max <= 0) return 1;
  long long s = (span_max + gran - 1) / gran;
  const long long b = budget / ctas;
  if (s > b) s = b;
  if (s > cap) s = cap;
  return s < 1 ? 1 : (int)s;
}

// Host: query heads per CTA of the grouped kernel (attn_gd7): the largest of 8, 4,
// 2, 1 that divides the group size g while the grid keeps >= min_ctas CTAs
// (n_heads / gc x rows x splits); 1 if none does. A CTA reads its kv head's
// K/V once for all its heads, so fewer, fatter CTAs read less; a short grid
// (window layers: one split) needs more CTAs to fill the GPU.
inline int attn_gd_heads_per_cta(int g, int n_heads, long long rows, int splits, long long min_ctas) {
  for (int gc = 8; gc > 1; gc /= 2)
    if (g % gc == 0 && (long long)(n_heads / gc) * rows * splits >= min_ctas) return gc;
  return 1;
}
