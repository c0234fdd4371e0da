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
