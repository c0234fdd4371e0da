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
  if (fails) {
    std::printf("attention_index_test: %d failures\n", fails);
    return 1;
  }
  std::printf("attention_index_test: ok\n");
  return 0;
}
