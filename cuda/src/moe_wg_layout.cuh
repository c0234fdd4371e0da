// moe_wg_layout.cuh — index math of the grouped MoE GEMM v4 (moe_wg.cuh,
// wgmma) in __host__ __device__ helpers, checked on the host by
// cuda/test/moe_wg_layout_test.cpp (no GPU here, and the CPU emulation cannot
// run wgmma): the 128-byte-swizzled K-major shared-memory layout of the
// activation (B) tile, its wgmma matrix descriptor and the hardware's address
// model for it, the wgmma register fragments of A and D, and the CTA's W row
// map (gate / up interleaved by 8 rows).
#pragma once
#include <stdint.h>

#ifdef __CUDACC__
#define WG_HD __host__ __device__ __forceinline__
#else
#define WG_HD inline
#endif

// ---- B tile: rows = pairs (N), 64 bf16 of k per row per stage = 128 bytes ----
// The canonical K-major SWIZZLE_128B layout (PTX ISA "Shared memory matrix
// layout", CUTLASS Layout_K_SW128_Atom): atoms of 8 rows x 128 bytes (1024
// bytes, 1024-aligned), row r of an atom at r * 128, its 16-byte chunk c at
// chunk c ^ (r % 8); atoms stacked along N every 1024 bytes (the stride byte
// offset). Byte offset of (row n, 16-byte chunk c) in a tile:
WG_HD constexpr uint32_t wg_sw128_off(uint32_t n, uint32_t c) { return n * 128u + ((c ^ (n & 7u)) << 4); }

// The wgmma shared-memory matrix descriptor (PTX ISA "Matrix Descriptor
// Format"): bits 0-13 start address >> 4, 16-29 leading byte offset >> 4
// (unused by swizzled K-major layouts; 1 as CUTLASS), 32-45 stride byte offset
// >> 4 (1024: the next 8-row atom), 49-51 base offset (0: atoms 1024-aligned),
// 62-63 layout type (1 = 128-byte swizzle).
WG_HD constexpr uint64_t wg_desc_sw128(uint32_t smem_addr) {
  return (uint64_t)((smem_addr & 0x3FFFFu) >> 4) | (uint64_t)1 << 16 | (uint64_t)(1024u >> 4) << 32 |
         (uint64_t)1 << 62;
}

// The address model of a SWIZZLE_128B K-major operand: element (n, k) of the
// k16 slice that starts at descriptor address `start` (the tile base plus
// 32 bytes per k16 step, as CUTLASS / DeepGEMM advance it) is read at the
// linear address start + (n / 8) * SBO + (n % 8) * 128 + 2 k with address
// bits 4-6 XORed by bits 7-9 (the swizzle acts on absolute shared-memory
// addresses: hence 1024-aligned atoms). The host test checks that this reads
// exactly what the copies put at wg_sw128_off for every (n, k).
WG_HD constexpr uint32_t wg_sw128_hw_addr(uint32_t start, uint32_t n, uint32_t k) {
  const uint32_t lin = start + (n >> 3) * 1024u + (n & 7u) * 128u + 2u * k;
  return lin ^ (((lin >> 7) & 7u) << 4);
}

// ---- register fragments (PTX ISA "Register Fragments" of wgmma m64nNk16) ----
// A (64 x 16 bf16, 4 b32 registers a thread): warp w of the warpgroup holds
// rows 16w .. 16w + 15 in the mma.sync m16n8k16 A layout, lane = 4 g + t:
// register r holds the bf16 pair (row 16w + g + 8 (r & 1), cols 2t + 8 (r >> 1) + {0, 1}).
WG_HD constexpr int wg_a_row(int warp, int lane, int r) { return 16 * warp + (lane >> 2) + 8 * (r & 1); }
WG_HD constexpr int wg_a_col(int lane, int r) { return 2 * (lane & 3) + 8 * (r >> 1); }
// D (64 x N f32, N / 2 registers a thread): d[4 j + z] = (row 16w + g + 8 (z >> 1), col 8 j + 2t + (z & 1)).
WG_HD constexpr int wg_d_row(int warp, int lane, int z) { return 16 * warp + (lane >> 2) + 8 * ((z & 3) >> 1); }
WG_HD constexpr int wg_d_col(int lane, int z) { return 8 * (z >> 2) + 2 * (lane & 3) + (z & 1); }

// ---- the CTA's W rows ----
// Tile row i (0 .. BM-1; warpgroup wg's m64 tile mi covers rows
// 64 (wg * MW + mi) ..) -> (matrix, W row). gate_up (dual): in each 16 rows
// the first 8 are gate rows and the next 8 the same up rows, so a thread's
// D rows g (gate) and g + 8 (up) are the same ff row and SwiGLU pairs d[4j+z]
// with d[4j+z+2]; ff row = r0 + 8 (i / 16) + i % 8 with r0 = the CTA's first
// ff row (BM / 2 per CTA). down: row r0 + i (BM per CTA). up = 1 for the up matrix.
WG_HD int64_t wg_w_row(int i, bool dual, int64_t r0, int *up) {
  *up = dual ? (i >> 3) & 1 : 0;
  return dual ? r0 + 8 * (i >> 4) + (i & 7) : r0 + i;
}
