// qgemm.cuh — index math of the tensor-core GEMM (qgemm.cu) kept in
// __host__ __device__ helpers so that cuda/test/qgemm_plan_test.cpp checks it
// on the host (no GPU here): the 16-byte staging span of a row segment, and
// the MoE tile plan (experts' pair counts -> pair offsets and tile offsets).
#pragma once
#include <stdint.h>

#ifdef __CUDACC__
#define QG_HD __host__ __device__ __forceinline__
#else
#define QG_HD inline
#endif

// 16-byte chunks per W row per pipeline stage: a segment of kb blocks of bb
// bytes starting anywhere is covered by ceil((kb*bb + 15) / 16) aligned
// chunks; one more leaves room for the last block's whole-word reads (a block
// is read as the aligned 32-bit words covering it, up to 3 bytes past it).
QG_HD constexpr int qg_chunks(int bb, int kb) { return (kb * bb + 15) / 16 + 1; }

// The staging span of the byte range [start, end) (addresses): first aligned
// chunk a0, number of chunks, and the offset of start inside the first chunk.
struct qg_span {
  uint64_t a0;
  int chunks;
  int off;
};
QG_HD qg_span qg_stage_span(uint64_t start, uint64_t end) {
  qg_span s;
  s.a0 = start & ~(uint64_t)15;
  s.off = (int)(start - s.a0);
  s.chunks = end > start ? (int)((end - s.a0 + 15) / 16) : 0;
  return s;
}

// Bytes a copy of the chunk at addr may read without passing the tensor's
// end: 16, fewer for the last chunk (the rest of the 16 is zero-filled), 0
// past the end.
QG_HD int qg_chunk_bytes(uint64_t addr, uint64_t tensor_end) {
  return addr >= tensor_end ? 0 : tensor_end - addr >= 16 ? 16 : (int)(tensor_end - addr);
}

// Upper bound of the tiles of bn pairs over all experts (grid size, known on
// the host without reading the routing): sum_e ceil(c_e/bn) <= ceil(P/bn) + n_exp - 1.
QG_HD constexpr int64_t moe_tiles_bound(int64_t pairs, int n_exp, int bn) {
  return (pairs + bn - 1) / bn + n_exp;
}

// From per-expert pair counts: exp_off[e] = first sorted position of expert
// e's pairs (exclusive scan, exp_off[n_exp] = total), tile_start[e] = its
// first tile (tile_start[n_exp] = tile count, returned).
QG_HD int moe_tile_plan(const int *cnt, int n_exp, int bn, int *exp_off, int *tile_start) {
  int off = 0, tiles = 0;
  for (int e = 0; e < n_exp; e++) {
    exp_off[e] = off;
    tile_start[e] = tiles;
    off += cnt[e];
    tiles += (cnt[e] + bn - 1) / bn;
  }
  exp_off[n_exp] = off;
  tile_start[n_exp] = tiles;
  return tiles;
}

// Hybrid plan (tile code 36: MoE GEMM v4 for the experts with >= thr pairs
// in tiles of bn, v3 for the others in tiles of bn2): exp_off as
// moe_tile_plan, tile_start[e] = expert e's first tile in ITS list, *tiles2
// = the second list's tile count; returns the first list's.
QG_HD int moe_tile_plan2(const int *cnt, int n_exp, int bn, int bn2, int thr, int *exp_off, int *tile_start,
                         int *tiles2) {
  int off = 0, ta = 0, tb = 0;
  for (int e = 0; e < n_exp; e++) {
    exp_off[e] = off;
    off += cnt[e];
    if (cnt[e] >= thr) {
      tile_start[e] = ta;
      ta += (cnt[e] + bn - 1) / bn;
    } else {
      tile_start[e] = tb;
      tb += (cnt[e] + bn2 - 1) / bn2;
    }
  }
  exp_off[n_exp] = off;
  tile_start[n_exp] = 0;
  *tiles2 = tb;
  return ta;
}

// Ints of the routing scratch of orch_moe_ffn_grouped for P pairs (sized for
// the smallest tile, 16 pairs): exp_off[n_exp+1], ntiles[1], sorted[P],
// tile_e[TB], tile_r0[TB] with TB = moe_tiles_bound(P, n_exp, 16).
QG_HD constexpr int64_t moe_route_ints(int64_t pairs, int n_exp) {
  return (int64_t)n_exp + 2 + pairs + 2 * moe_tiles_bound(pairs, n_exp, 16);
}
