// quant_test_util.h — shared by the emulation tests of the quantized decode
// kernels (decode_emu_test.cpp, moe_emu_test.cpp): the EXPECT counter, random
// valid GGUF blocks with their dequantized values, exactly sized buffers (ASan
// sees a read past the end), relative L2 error and the clamped SwiGLU
// reference. Include after cuda_emu.h, emu_lib.h and the kernel sources.
#pragma once

static int fails = 0;
#define EXPECT(c, ...)                                    \
  do {                                                    \
    if (!(c)) {                                           \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                  \
      std::fprintf(stderr, "\n");                         \
      fails++;                                            \
    }                                                     \
  } while (0)

static std::mt19937 rng(2026);
static const double kE2M1[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
static uint16_t f2h(float f) {
  const __half h = __float2half(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
static double h2d(uint16_t u) { return (double)__half2float(__ushort_as_half(u)); }

// rows x k random valid GGUF blocks (exact byte size, own allocation) and
// their dequantized values.
struct QW {
  uint8_t *bytes = nullptr;
  size_t size = 0;
  std::vector<double> val;
  QW() = default;
  QW(const QW &) = delete;
  ~QW() { std::free(bytes); }
};
static void make_weight(QW &w, int t, int64_t k, int64_t rows) {
  const int64_t rb = orch_row_bytes(t, k);
  w.size = (size_t)(rb * rows);
  w.bytes = (uint8_t *)std::malloc(w.size);
  w.val.assign((size_t)(k * rows), 0.0);
  for (size_t i = 0; i < w.size; i++) w.bytes[i] = (uint8_t)rng();
  const int bb = type_block_bytes(t);
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < k / 32; c++) {
      uint8_t *b = w.bytes + r * rb + c * bb;
      double *v = &w.val[(size_t)(r * k + c * 32)];
      if (t == ORCH_T_MXFP4) {
        b[0] = (uint8_t)(124 + rng() % 5);
        const double d = std::ldexp(1.0, b[0] - 127);
        for (int a = 0; a < 32; a++) {
          const int n = (b[1 + (a & 15)] >> (a >= 16 ? 4 : 0)) & 15;
          v[a] = d * ((n & 8) ? -kE2M1[n & 7] : kE2M1[n & 7]);
        }
      } else {
        const uint16_t hd = f2h(t == ORCH_T_Q8_0 ? 0.01f + 0.02f * (rng() % 1000) / 1000.f
                                                 : 0.05f + 0.2f * (rng() % 1000) / 1000.f);
        std::memcpy(b, &hd, 2);
        const double d = h2d(hd);
        for (int a = 0; a < 32; a++)
          v[a] = t == ORCH_T_Q8_0 ? d * (int8_t)b[2 + a] : d * (((b[2 + (a & 15)] >> (a >= 16 ? 4 : 0)) & 15) - 8);
      }
    }
}

static std::vector<float> randv(size_t n, float scale) {
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<float> v(n);
  for (auto &x : v) x = nd(rng);
  return v;
}

// Exactly sized copies (ASan sees reads past the end).
template <class T>
struct Buf {
  T *p;
  size_t n;
  explicit Buf(const std::vector<T> &v) : p((T *)std::malloc(sizeof(T) * (v.size() ? v.size() : 1))), n(v.size()) {
    std::memcpy(p, v.data(), sizeof(T) * v.size());
  }
  explicit Buf(size_t count, T fill) : p((T *)std::malloc(sizeof(T) * (count ? count : 1))), n(count) {
    for (size_t i = 0; i < count; i++) p[i] = fill;
  }
  Buf(const Buf &) = delete;
  ~Buf() { std::free(p); }
  std::vector<T> vec() const { return std::vector<T>(p, p + n); }
};

static double rel_l2(const std::vector<float> &got, const std::vector<double> &want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); i++) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

static const char *tname(int t) { return t == ORCH_T_MXFP4 ? "MXFP4" : t == ORCH_T_Q8_0 ? "Q8_0" : "Q4_0"; }

static double swiglu(double g, double u, double alpha, double limit) {
  g = std::min(g, limit);
  u = std::min(std::max(u, -limit), limit);
  return (u + 1) * g / (1 + std::exp(-alpha * g));
}

#ifdef ORCH_WEIGHT_RP // the kernel sources include weight_rp.cuh
// A dual copy of w (type t, MXFP4 or Q8_0; rows rows of k): the original bytes, then orch_weight_repack's rows.
struct DualW {
  uint8_t *p = nullptr;
  DualW(const QW &w, int t, int64_t rows, int64_t k) {
    const int64_t off = rp_offset(t, rows, k), total = off + rows * rp_row_bytes(t, k);
    EXPECT(off >= (int64_t)w.size && off % 256 == 0, "dual offset %lld for %zu bytes", (long long)off, w.size);
    p = (uint8_t *)std::aligned_alloc(256, (size_t)((total + 255) & ~(int64_t)255));
    std::memset(p, 0xA5, (size_t)total);
    std::memcpy(p, w.bytes, w.size);
    orch_ctx ctx;
    EXPECT(orch_weight_repack(&ctx, p + off, p, t, rows, k) == ORCH_OK, "weight_repack: %s", g_err);
  }
  DualW(const DualW &) = delete;
  ~DualW() { std::free(p); }
};
#endif
