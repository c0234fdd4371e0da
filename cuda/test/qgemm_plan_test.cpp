// Host test of the tensor-core GEMM's index math (cuda/src/qgemm.cuh):
//   g++ -std=c++17 -Wall -Werror -o /tmp/qgemm_plan_test cuda/test/qgemm_plan_test.cpp && /tmp/qgemm_plan_test
// Runs on the CPU; no CUDA needed.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../src/qgemm.cuh"

static int fails = 0;
#define EXPECT(c, ...)          \
  do {                          \
    if (!(c)) {                 \
      std::printf(__VA_ARGS__); \
      std::printf("\n");        \
      if (++fails > 20) std::exit(1); \
    }                           \
  } while (0)

// Staging of W row segments: for every block type (bytes per block, words the
// kernel reads per block), blocks per stage, row length, tensor and stage, the
// chunks fit the per-row buffer, the copies cover every byte of the segment,
// never pass the tensor's end, and each block's word reads stay in the buffer.
static void test_spans() {
  struct ty { const char *name; int bb, words; };
  const ty types[] = {{"Q8_0", 34, 9}, {"Q4_0", 18, 5}, {"MXFP4", 17, 5}};
  for (const ty &t : types)
    for (int kb : {2, 4}) {
      const int ch = qg_chunks(t.bb, kb);
      for (int nb : {1, 2, 3, 5, 7, 90, 91, 128}) {
        const uint64_t rb = (uint64_t)nb * t.bb;
        for (int rows : {1, 3, 17}) {
          const uint64_t base = 4096; // tensors are 16-byte aligned
          const uint64_t end = base + rows * rb;
          for (int r = 0; r < rows; r++)
            for (int kb0 = 0; kb0 < nb; kb0 += kb) {
              const int nblk = nb - kb0 < kb ? nb - kb0 : kb;
              const uint64_t seg = base + r * rb + (uint64_t)kb0 * t.bb, segEnd = seg + (uint64_t)nblk * t.bb;
              const qg_span sp = qg_stage_span(seg, segEnd);
              EXPECT(sp.chunks <= ch, "%s kb %d nb %d row %d kb0 %d: %d chunks > %d", t.name, kb, nb, r, kb0,
                     sp.chunks, ch);
              EXPECT(sp.a0 % 16 == 0 && sp.a0 + sp.off == seg, "%s: span start", t.name);
              std::vector<int> got(sp.chunks * 16, 0);
              for (int c = 0; c < sp.chunks; c++) {
                const uint64_t addr = sp.a0 + 16ull * c;
                const int b = qg_chunk_bytes(addr, end);
                EXPECT(addr + b <= end, "%s: chunk reads past the tensor", t.name);
                for (int i = 0; i < b; i++) got[c * 16 + i] = 1;
              }
              for (uint64_t a = seg; a < segEnd; a++)
                EXPECT(got[a - sp.a0], "%s kb %d nb %d row %d kb0 %d: byte %llu not copied", t.name, kb, nb, r, kb0,
                       (unsigned long long)(a - seg));
              for (int j = 0; j < nblk; j++) {
                const int o = sp.off + j * t.bb, w0 = o & ~3;
                EXPECT((o & 3) == 0 || t.bb == 17 || (o & 1) == 0, "%s: Q8_0/Q4_0 blocks are 2-aligned", t.name);
                EXPECT(w0 + 4 * t.words >= o + t.bb, "%s: words do not cover block (o %d)", t.name, o);
                EXPECT(w0 + 4 * t.words <= 16 * ch, "%s kb %d: block %d words end %d past the row buffer %d",
                       t.name, kb, j, w0 + 4 * t.words, 16 * ch);
              }
            }
        }
      }
    }
  EXPECT(qg_chunk_bytes(100, 100) == 0 && qg_chunk_bytes(96, 100) == 4 && qg_chunk_bytes(64, 100) == 16,
         "chunk bytes at the end");
}

// MoE tile plan: tiles never exceed the host bound, each sorted position is
// covered by exactly one tile of its own expert, the route scratch fits.
static void test_plan() {
  std::mt19937 rng(7);
  for (int iter = 0; iter < 2000; iter++) {
    const int n_exp = 1 + (int)(rng() % 64), n_slots = 1 + (int)(rng() % 4);
    const int n = (int)(rng() % 300);
    const int pairs = n * n_slots;
    std::vector<int> cnt(n_exp, 0);
    const int mode = iter % 3; // uniform, skewed (one hot expert), few experts used
    for (int p = 0; p < pairs; p++) {
      int e = (int)(rng() % n_exp);
      if (mode == 1 && rng() % 4 != 0) e = 0;
      if (mode == 2) e = (int)(rng() % 3) * (n_exp / 3);
      cnt[e]++;
    }
    for (int bn : {16, 64, 128}) {
      std::vector<int> off(n_exp + 1), tst(n_exp + 1);
      const int tiles = moe_tile_plan(cnt.data(), n_exp, bn, off.data(), tst.data());
      const int64_t bound = moe_tiles_bound(pairs, n_exp, bn);
      EXPECT(tiles <= bound, "tiles %d > bound %lld", tiles, (long long)bound);
      EXPECT(off[n_exp] == pairs && tst[n_exp] == tiles, "totals");
      EXPECT((int64_t)n_exp + 2 + pairs + 2 * bound <= moe_route_ints(pairs, n_exp), "route scratch too small");
      std::vector<int> cover(pairs, 0);
      for (int e = 0; e < n_exp; e++)
        for (int t = tst[e], r = 0; t < tst[e + 1]; t++, r += bn) {
          EXPECT(r < cnt[e], "empty tile %d of expert %d", t, e);
          for (int i = 0; i < bn && r + i < cnt[e]; i++) cover[off[e] + r + i]++;
        }
      for (int p = 0; p < pairs; p++) EXPECT(cover[p] == 1, "position %d covered %d times", p, cover[p]);
    }
  }
}

int main() {
  test_spans();
  test_plan();
  if (fails) {
    std::printf("qgemm_plan_test: %d failures\n", fails);
    return 1;
  }
  std::printf("qgemm_plan_test: ok\n");
  return 0;
}
