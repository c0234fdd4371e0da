// Host test of moe_wg_layout.cuh (grouped MoE GEMM v4's index math; the CPU
// emulation cannot run wgmma): the 128-byte-swizzle writer against the
// hardware address model read through the descriptor at every k16 step, the
// descriptor fields, the register fragments against the mma.sync m16n8k16
// tables of moe_gemm.cuh, and the gate / up row interleave.
#include <cstdio>
#include <cstdlib>
#include <set>
#include <vector>

#include "../src/moe_wg_layout.cuh"
#include "../src/qgemm.cuh"

static int fails = 0;
#define EXPECT(c, ...)                                     \
  do {                                                     \
    if (!(c)) {                                            \
      if (fails++ < 20) {                                  \
        std::fprintf(stderr, "%s:%d: ", __FILE__, __LINE__); \
        std::fprintf(stderr, __VA_ARGS__);                 \
        std::fprintf(stderr, "\n");                        \
      }                                                    \
    }                                                      \
  } while (0)

int main() {
  // 1. Swizzle: a stage of BN rows x 64 bf16, written by 16-byte chunks at
  // wg_sw128_off, read by the wgmma model at descriptor start base + 32 kk:
  // element (n, 16 kk + k') must come back, at several 1024-aligned bases.
  for (uint32_t base : {0u, 1024u, 5u * 32768u, 0x30000u}) {
    for (int bn : {128, 256}) {
      std::vector<int> mem(bn * 64, -1); // 2-byte units: element id n * 64 + k
      std::set<uint32_t> used;
      for (int n = 0; n < bn; n++)
        for (int c = 0; c < 8; c++) {
          const uint32_t off = wg_sw128_off(n, c);
          EXPECT(off % 16 == 0 && off + 16 <= (uint32_t)bn * 128, "chunk (%d,%d) at %u outside the tile", n, c, off);
          EXPECT(used.insert(off).second, "chunk (%d,%d) overlaps", n, c);
          for (int e = 0; e < 8; e++) mem[(off >> 1) + e] = n * 64 + 8 * c + e;
        }
      for (int kk = 0; kk < 4; kk++) {
        const uint32_t start = base + 32u * kk;
        const uint64_t desc = wg_desc_sw128(start);
        EXPECT((uint32_t)(desc & 0x3FFF) == (start >> 4), "start field");
        EXPECT(((desc >> 16) & 0x3FFF) == 1, "leading byte offset field");
        EXPECT(((desc >> 32) & 0x3FFF) == 64, "stride byte offset field (1024 >> 4)");
        EXPECT(((desc >> 49) & 7) == 0, "base offset field");
        EXPECT((desc >> 62) == 1, "layout type (SWIZZLE_128B)");
        for (int n = 0; n < bn; n++)
          for (int k = 0; k < 16; k++) {
            const uint32_t addr = wg_sw128_hw_addr((uint32_t)(desc & 0x3FFF) << 4, n, k) - base;
            EXPECT(addr < (uint32_t)bn * 128 && addr % 2 == 0, "base %u kk %d (n %d, k %d): address %u", base, kk, n, k, addr);
            if (addr < (uint32_t)bn * 128)
              EXPECT(mem[addr >> 1] == n * 64 + 16 * kk + k, "base %u kk %d: (n %d, k %d) reads element %d", base, kk,
                     n, k, mem[addr >> 1]);
          }
      }
    }
  }
  // 1b. The kernel's copy loop: thread (row n0 = tid / 8 < 32, chunk c)
  // writes rows n0 + 32 u at its row-n0 offset + 4096 u.
  for (uint32_t n = 0; n < 32; n++)
    for (uint32_t c = 0; c < 8; c++)
      for (uint32_t u = 0; u < 8; u++)
        EXPECT(wg_sw128_off(n + 32 * u, c) == wg_sw128_off(n, c) + 4096 * u, "row %u + 32 x %u", n, u);
  // 2. Fragments: per warp the mma.sync m16n8k16 tables (moe_gemm.cuh):
  // A a0 = (g, 2t), a1 = (g+8, 2t), a2 = (g, 2t+8), a3 = (g+8, 2t+8); D d0,d1 = (g, 2t..),
  // d2,d3 = (g+8, 2t..) per n8 block; every element of the 64 x 16 A / 64 x N D
  // tile is owned exactly once across the 128 threads.
  {
    std::vector<int> a_own(64 * 16, 0), d_own(64 * 256, 0);
    for (int w = 0; w < 4; w++)
      for (int lane = 0; lane < 32; lane++) {
        const int g = lane >> 2, t = lane & 3;
        for (int r = 0; r < 4; r++) {
          const int row = wg_a_row(w, lane, r), col = wg_a_col(lane, r);
          EXPECT(row == 16 * w + g + (r == 1 || r == 3 ? 8 : 0) && col == 2 * t + (r >= 2 ? 8 : 0), "A reg %d", r);
          a_own[row * 16 + col]++;
          a_own[row * 16 + col + 1]++;
        }
        for (int z = 0; z < 128; z++) {
          const int row = wg_d_row(w, lane, z), col = wg_d_col(lane, z);
          EXPECT(row == 16 * w + g + 8 * ((z % 4) / 2) && col == 8 * (z / 4) + 2 * t + z % 2, "D reg %d", z);
          d_own[row * 256 + col]++;
        }
      }
    for (int i = 0; i < 64 * 16; i++) EXPECT(a_own[i] == 1, "A element %d owned %d times", i, a_own[i]);
    for (int i = 0; i < 64 * 256; i++) EXPECT(d_own[i] == 1, "D element %d owned %d times", i, d_own[i]);
  }
  // 3. Row map: gate_up CTAs of 128 / 256 tile rows cover BM / 2 ff rows, each
  // once as gate and once as up, and D rows g / g + 8 of a warp are gate / up
  // of the same ff row; down covers BM rows once.
  for (int bm : {128, 256}) {
    const int64_t r0 = 3 * bm / 2;
    std::vector<int> gate(bm / 2, 0), upc(bm / 2, 0);
    for (int i = 0; i < bm; i++) {
      int up = -1;
      const int64_t row = wg_w_row(i, true, r0, &up);
      EXPECT(row >= r0 && row < r0 + bm / 2, "dual row %d -> %lld", i, (long long)row);
      if (row >= r0 && row < r0 + bm / 2) (up ? upc : gate)[row - r0]++;
      if ((i & 15) < 8) {
        int up2 = -1;
        EXPECT(!up && wg_w_row(i + 8, true, r0, &up2) == row && up2 == 1, "tile rows %d / %d not gate / up of one ff row", i,
               i + 8);
      }
      const int64_t drow = wg_w_row(i, false, r0, &up);
      EXPECT(drow == r0 + i && up == 0, "down row %d", i);
    }
    for (int f = 0; f < bm / 2; f++) EXPECT(gate[f] == 1 && upc[f] == 1, "ff row %d: gate %d up %d", f, gate[f], upc[f]);
    // the kernel's epilogue formula: D row (mt, warp wq, g) -> ff row r0 + 32 mt + 8 wq + g
    for (int mt = 0; mt < bm / 64; mt++)
      for (int wq = 0; wq < 4; wq++)
        for (int g = 0; g < 8; g++) {
          int up = -1;
          EXPECT(wg_w_row(64 * mt + 16 * wq + g, true, r0, &up) == r0 + 32 * mt + 8 * wq + g && up == 0,
                 "epilogue row (%d,%d,%d)", mt, wq, g);
        }
  }
  // 4. Hybrid tile plan (tile 36): experts with >= thr pairs in list A
  // (tiles of bn), the rest in list B (tiles of bn2); offsets as the scan;
  // every pair of every expert in exactly one tile; both lists within the
  // route scratch whenever the host's fit check passes.
  {
    const int ne = 32;
    unsigned seed = 12345;
    for (int trial = 0; trial < 200; trial++) {
      int cnt[ne], off[ne + 1], tst[ne + 1], t2 = -1, P = 0;
      for (int e = 0; e < ne; e++) {
        seed = seed * 1103515245u + 12345u;
        const int r = (int)((seed >> 8) % 1000);
        cnt[e] = trial % 3 == 0 ? (r < 300 ? 0 : r % 700) : trial % 3 == 1 ? r % 97 + (e == 3 ? 900 : 0) : 256 + r % 33 - 16;
        P += cnt[e];
      }
      const int t1 = moe_tile_plan2(cnt, ne, 256, 96, 96, off, tst, &t2);
      int ta = 0, tb = 0, o = 0;
      for (int e = 0; e < ne; e++) {
        EXPECT(off[e] == o, "hybrid plan: offset of expert %d", e);
        o += cnt[e];
        const bool big = cnt[e] >= 96;
        EXPECT(tst[e] == (big ? ta : tb), "hybrid plan: expert %d starts at tile %d", e, tst[e]);
        (big ? ta : tb) += (cnt[e] + (big ? 255 : 95)) / (big ? 256 : 96);
      }
      EXPECT(off[ne] == P && t1 == ta && t2 == tb, "hybrid plan totals (%d/%d, %d/%d)", t1, ta, t2, tb);
      EXPECT(t1 <= moe_tiles_bound(P, ne, 256) && t2 <= moe_tiles_bound(P, ne, 96), "hybrid plan within the grid bounds");
    }
  }
  if (fails) {
    std::fprintf(stderr, "moe_wg_layout_test: %d failures\n", fails);
    return 1;
  }
  std::printf("moe_wg_layout_test: ok\n");
  return 0;
}
