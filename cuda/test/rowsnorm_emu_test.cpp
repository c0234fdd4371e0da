// CPU emulation test of orch_get_rows_rmsnorm (cuda/src/rowsnorm.cu, session
// 14) through cuda/test/cuda_emu.h: for F32, F16, Q8_0, Q4_0 and MXFP4 tables,
// dim 2880 / 4096 (and 256, 8192: the smallest and widest register rows),
// 1 and 3 rows, x kept / not kept / in place, the gathered rows are exactly
// dequant_chunk's values (get_rows_kernel's) and the normalised rows exactly
// norm.cu's launch on them (orch_rmsnorm's kernel), bit for bit; every thread
// waits for PDL; the declines (dim > 8192, dim % 32, a misaligned x_out) launch
// nothing.
//
//   g++ -std=c++20 -O1 -g -fsanitize=address -Wno-unknown-pragmas -Icuda/include \
//     -o /tmp/rowsnorm_emu cuda/test/rowsnorm_emu_test.cpp && /tmp/rowsnorm_emu
#include <random>

#include "cuda_emu.h"

#include "emu_decode_shims.h"

inline float rsqrtf(float v) { return 1.f / std::sqrt(v); } // any function: the same in both kernels

// The kernels' static __shared__ arrays: one CTA at a time (cuda_emu.h).
#define warp_sum common_warp_sum
#define warp_max common_warp_max
#undef __shared__
#define __shared__ static
#include "../src/norm.cu"
#include "../src/rowsnorm.cu"
#undef __shared__
#define __shared__
#undef warp_sum
#undef warp_max
#include "emu_lib.h"

#include "quant_test_util.h"

static const char *type_name(int t) {
  return t == ORCH_T_F32 ? "F32" : t == ORCH_T_F16 ? "F16" : tname(t);
}

// A random table of rows of dim elements of type t (exactly sized).
static std::vector<uint8_t> make_table(int t, int64_t dim, int64_t rows) {
  const int64_t rb = orch_row_bytes(t, dim);
  std::vector<uint8_t> b((size_t)(rb * rows));
  if (t == ORCH_T_F32) {
    const auto v = randv((size_t)(dim * rows), 1.f);
    std::memcpy(b.data(), v.data(), b.size());
  } else if (t == ORCH_T_F16) {
    const auto v = randv((size_t)(dim * rows), 1.f);
    for (size_t i = 0; i < v.size(); i++) {
      const uint16_t h = f2h(v[i]);
      std::memcpy(&b[2 * i], &h, 2);
    }
  } else {
    QW w;
    make_weight(w, t, dim, rows);
    std::memcpy(b.data(), w.bytes, b.size());
  }
  return b;
}

// mode 0: x kept apart, 1: x not kept, 2: in place.
template <int T>
static void test_rows_norm(int64_t dim, int64_t n, int mode) {
  const int64_t vocab = 7, rb = orch_row_bytes(T, dim);
  const auto tv = make_table(T, dim, vocab);
  Buf<uint8_t> table(tv);
  std::vector<int32_t> idv((size_t)n);
  for (auto &i : idv) i = (int32_t)(rng() % vocab);
  idv[(size_t)(n - 1)] = (int32_t)(vocab - 1);
  Buf<int32_t> ids(idv);
  Buf<float> w(randv((size_t)dim, 1.f));
  // the two launches: get_rows' values (dequant_chunk per 32-element chunk) and norm.cu's kernel on them
  Buf<float> x0((size_t)(n * dim), NAN), h0((size_t)(n * dim), NAN);
  for (int64_t r = 0; r < n; r++)
    for (int64_t c = 0; c < dim / 32; c++) dequant_chunk<T>(table.p + (int64_t)idv[(size_t)r] * rb, c, x0.p + r * dim + c * 32);
  launch_norm<false>(nullptr, n, h0.p, x0.p, nullptr, w.p, nullptr, dim, 1e-5f);
  Buf<float> x1((size_t)(n * dim), NAN), h1((size_t)(n * dim), NAN);
  float *xo = mode == 0 ? x1.p : mode == 2 ? h1.p : nullptr;
  orch_ctx ctx;
  const int rc = orch_get_rows_rmsnorm(&ctx, xo, h1.p, table.p, T, ids.p, n, dim, w.p, 1e-5f);
  EXPECT(rc == ORCH_OK, "rows_norm %s dim=%lld: rc %d (%s)", type_name(T), (long long)dim, rc, g_err);
  EXPECT(std::memcmp(h1.p, h0.p, h0.n * 4) == 0, "rows_norm %s dim=%lld n=%lld mode=%d: h differs from the two launches",
         type_name(T), (long long)dim, (long long)n, mode);
  if (mode == 0)
    EXPECT(std::memcmp(x1.p, x0.p, x0.n * 4) == 0, "rows_norm %s dim=%lld n=%lld: x differs from get_rows", type_name(T),
           (long long)dim, (long long)n);
  if (mode == 1)
    for (size_t i = 0; i < x1.n; i++)
      if (!std::isnan(x1.p[i])) {
        EXPECT(false, "rows_norm %s: x written while not kept", type_name(T));
        break;
      }
  std::printf("rows_norm %-5s dim=%-4lld n=%lld %-8s: bit-identical to get_rows + rmsnorm\n", type_name(T), (long long)dim,
              (long long)n, mode == 0 ? "x kept" : mode == 1 ? "x not" : "in place");
}

static void test_declines() {
  Buf<float> x((size_t)(2 * 8224), NAN), h((size_t)8224, NAN), w((size_t)8224, 1.f);
  Buf<int32_t> ids(std::vector<int32_t>{0});
  Buf<float> table((size_t)8224, 1.f);
  orch_ctx ctx;
  EXPECT(orch_get_rows_rmsnorm(&ctx, x.p, h.p, table.p, ORCH_T_F32, ids.p, 1, 8224, w.p, 1e-5f) ==
             ORCH_ERR_UNSUPPORTED, "dim 8224 not declined");
  EXPECT(orch_get_rows_rmsnorm(&ctx, x.p, h.p, table.p, ORCH_T_F32, ids.p, 1, 48, w.p, 1e-5f) == ORCH_ERR_UNSUPPORTED,
         "dim 48 not declined");
  EXPECT(orch_get_rows_rmsnorm(&ctx, x.p + 1, h.p, table.p, ORCH_T_F32, ids.p, 1, 64, w.p, 1e-5f) ==
             ORCH_ERR_UNSUPPORTED, "misaligned x_out not declined");
  for (size_t i = 0; i < h.n; i++)
    if (!std::isnan(h.p[i]) || !std::isnan(x.p[i])) {
      EXPECT(false, "a declined call wrote its output");
      break;
    }
  std::printf("rows_norm declines dim > 8192, dim %% 32, misaligned x_out: nothing written\n");
}

int main() {
  for (int mode = 0; mode < 3; mode++)
    for (int64_t n : {1, 3}) {
      for (int64_t dim : {2880, 4096}) {
        test_rows_norm<ORCH_T_F32>(dim, n, mode);
        test_rows_norm<ORCH_T_F16>(dim, n, mode);
        test_rows_norm<ORCH_T_Q8_0>(dim, n, mode);
        test_rows_norm<ORCH_T_Q4_0>(dim, n, mode);
        test_rows_norm<ORCH_T_MXFP4>(dim, n, mode);
      }
    }
  test_rows_norm<ORCH_T_Q8_0>(256, 2, 0);
  test_rows_norm<ORCH_T_F32>(8192, 1, 0);
  test_declines();
  if (fails) {
    std::fprintf(stderr, "rowsnorm_emu_test: %d failures\n", fails);
    return 1;
  }
  std::printf("rowsnorm_emu_test: PASS\n");
  return 0;
}
