// Host test of the attention kernels' index math (cuda/src/attention_index.cuh):
//   g++ -std=c++17 -Wall -Werror -o /tmp/attn_index_test cuda/test/attention_index_test.cpp && /tmp/attn_index_test
// Runs on the CPU; no CUDA needed.
#include <cstdio>
#include <vector>

#include "../src/attention_index.cuh"

static int fails = 0;
#define EXPECT(c, ...)            \
  do {                            \
    if (!(c)) {                   \
      std::printf(__VA_ARGS__);   \
      std::printf("\n");          \
      fails++;                    \
    }                             \
  } while (0)

int main() {
  // Every supported head dim: the (lane, e) -> lane*E+e map with attn_dim_ok
  // covers each dim exactly once, and nothing past the head.
  for (int hd = 16; hd <= 256; hd += 16) {
    const int E = attn_lane_dims(hd);
    EXPECT(E * 32 >= hd && (E - 1) * 32 < hd, "hd %d: E %d does not cover", hd, E);
    std::vector<int> seen(hd, 0);
    for (int lane = 0; lane < 32; lane++)
      for (int e = 0; e < E; e++) {
        int d = lane * E + e;
        if (!attn_dim_ok(hd, lane, e)) {
          EXPECT(d >= hd, "hd %d: lane %d e %d (dim %d) masked but inside the head", hd, lane, e, d);
          continue;
        }
        EXPECT(d < hd, "hd %d: lane %d e %d -> dim %d outside", hd, lane, e, d);
        if (d < hd) seen[d]++;
      }
    for (int d = 0; d < hd; d++) EXPECT(seen[d] == 1, "hd %d: dim %d held %d times", hd, d, seen[d]);
  }
  // v6 depth-adaptive splits: for every span and grid, the used splits
  // cover the span exactly once (split sp holds keys [sp*per, min((sp+1)*per,
  // span)), all non-empty), fit the grid, and are whole multiples of gran.
  for (int gran : {32, 128})
    for (int splits = 1; splits <= 128; splits++)
      for (int span = 1; span <= 20000; span += span < 600 ? 1 : 97) {
        const int per = attn_split_per(span, splits, gran), used = attn_split_used(span, per);
        EXPECT(per % gran == 0 && per >= gran, "span %d splits %d: per %d", span, splits, per);
        EXPECT(used >= 1 && used <= splits, "span %d splits %d: used %d", span, splits, used);
        EXPECT((used - 1) * per < span && used * per >= span, "span %d splits %d: %d x %d", span, splits, used, per);
        // Fewest splits: one fewer gran step per split would not fit the grid.
        EXPECT(per == gran || (long long)(per - gran) * splits < span, "span %d splits %d: per %d too big", span,
               splits, per);
      }
  EXPECT(attn_span(0, 0) == 1 && attn_span(99, 0) == 100 && attn_span(99, 128) == 100 && attn_span(200, 128) == 128,
         "attn_span");
  // The host grid: gpt-oss decode (8 kv heads, one token), context 8320 and
  // 131072; 64 streams; a window layer; no keys.
  EXPECT(attn_grid_splits(8, 8320, 128, 4096, 128) == 65, "grid 8320");
  EXPECT(attn_grid_splits(8, 131072, 128, 4096, 128) == 128, "grid 131072");
  EXPECT(attn_grid_splits(512, 8320, 128, 4096, 128) == 8, "grid 64 streams");
  EXPECT(attn_grid_splits(8, 128, 128, 4096, 128) == 1, "grid window");
  EXPECT(attn_grid_splits(8192, 8320, 128, 4096, 128) == 1, "grid big batch");
  EXPECT(attn_grid_splits(8, 0, 128, 4096, 128) == 1, "grid empty");
  // Heads per CTA: full layers keep the whole group, window layers spread.
  EXPECT(attn_gd_heads_per_cta(8, 64, 1, 65, 256) == 8, "gc full");
  EXPECT(attn_gd_heads_per_cta(8, 64, 1, 1, 256) == 1, "gc window");
  EXPECT(attn_gd_heads_per_cta(8, 64, 64, 1, 256) == 8, "gc window 64 streams");
  EXPECT(attn_gd_heads_per_cta(6, 48, 1, 65, 256) == 2, "gc group 6");
  EXPECT(attn_gd_heads_per_cta(7, 28, 1, 128, 256) == 1, "gc group 7");
  EXPECT(attn_gd_heads_per_cta(4, 32, 1, 65, 256) == 4, "gc llama");
  if (fails) {
    std::printf("attention_index_test: %d failures\n", fails);
    return 1;
  }
  std::printf("attention_index_test: ok\n");
  return 0;
}
