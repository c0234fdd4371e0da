// gemm_q8.cuh — prefill GEMM on raw Q8_0 weights (ORCH_CUDA_PREFILL=v3):
// y[n, m] (+)= x[n, k] · W[m, k]^T (+ bias) with no dequantized copy of W.
//
//  - gq8_prep_x: each token row of x is scaled by a power of two 2^-e (e =
//    exponent of the row's max |x|, so the scaled max is in [1, 2): exact,
//    and no fp16 overflow whatever x's magnitude) and rounded to fp16 into
//    scratch; 2^e is kept per row and applied in the epilogue (a per-token
//    factor comes out of the k-sum exactly).
//  - gq8_gemm: a CTA computes 128 W rows x 128 tokens. Per stage of 64 k
//    (two Q8_0 blocks per row) the raw row segments (68 bytes, 4-byte aligned
//    when k % 64 == 0) and the fp16 x tile go global -> shared with cp.async,
//    3 stages in flight; each thread dequantizes one block from shared memory
//    to fp16 (d * q rounded once to fp16: xor 0x80 and prmt under the
//    exponent of 1024, an exact HSUB2 of 1152, one HMUL2 by d — 11-bit
//    precision, finer than the bf16 cuBLAS path's 8) into a padded fp16 W
//    tile; 8 (16) warps (2 (4) x 4, 64 rows x 32 tokens each) run mma.sync m16n8k16
//    (fp16 in, fp32 accumulate) on ldmatrix fragments. Two barriers per stage.
//    Grid x = token tiles (fastest), so the CTAs sharing a W tile run together
//    and W comes from DRAM about once.
//
// Two tile configurations (Cfg): 128 W rows per CTA (v3) and 256 (v4); and
// gemm_p (v5, below): 128-row tiles, one barrier per stage, the next stage's
// dequantization interleaved with this stage's MMAs.
//
// cuda/test/gemm_q8_emu_test.cpp compiles this header against the CPU CUDA
// emulation (ORCH_EMU: fibers, barriers, mma.sync and ldmatrix by the PTX
// fragment tables, cp.async landing as late as its wait allows) and checks it
// against a float64 reference of the same roundings.
#pragma once
#include "common.cuh"

namespace gq8 {

constexpr int BN = 128, BK = 64, NS = 3;
constexpr int XS = BK + 8;   // halves per shared row (x and W tiles): 144 B, 9 x 16 B
constexpr int RAW_ROW = 68;  // bytes of one W row per stage: two Q8_0 blocks
constexpr int PREP_ROWS = 8; // token rows per prep_x CTA (a warp each)

// Tile configuration by W rows per CTA: 128 (v3: 8 warps, 99.8 KB, two CTAs
// per SM) or 256 (v4: 16 warps, 141 KB, one CTA per SM; each x tile read
// from L2 half as often). Warps are (BM / 64) x 4, each 64 W rows x 32
// tokens; one thread per Q8_0 block of the stage (BM rows x 2 blocks).
template <int BM>
struct Cfg {
  static constexpr int THREADS = 2 * BM;
  static constexpr int WARPS_M = BM / 64;
  static constexpr int XCH = BN * BK * 2 / 16 / THREADS; // 16-byte x chunks per thread per stage
  static constexpr int RAW_BYTES = BM * RAW_ROW;
  static constexpr int X_BYTES = BN * XS * 2;
  static constexpr int STAGE_BYTES = RAW_BYTES + X_BYTES;
  static constexpr int WH_OFF = NS * STAGE_BYTES;
  static constexpr int SMEM = WH_OFF + BM * XS * 2;
  static constexpr int MIN_BLOCKS = BM == 128 ? 2 : 1;
  static_assert(STAGE_BYTES % 16 == 0 && RAW_BYTES % 16 == 0 && WH_OFF % 16 == 0, "16-byte aligned regions");
  static_assert(XCH * 16 * THREADS == BN * BK * 2 && THREADS / 8 * XCH == BN, "x copy tasks");
};
static_assert(Cfg<128>::SMEM == 99840 && Cfg<256>::SMEM == 144384, "shared memory");

// Shapes the kernel takes: Q8_0, k a multiple of 64 (whole stages; row bytes
// a multiple of 4), 4-byte aligned weights, 16-byte aligned x, int-sized dims.
__host__ __device__ inline bool supported(int64_t n, int64_t k, int64_t m, uintptr_t w, uintptr_t x) {
  return n > 0 && k > 0 && m > 0 && k % BK == 0 && (w & 3) == 0 && (x & 15) == 0 && n * k < (1ll << 31) &&
         m < (1ll << 31) && n < (1ll << 31);
}
// Output tiles below which v3 hands the call to v2 (dequantize + cuBLAS): a
// grid of fewer CTAs than ~3/4 of an H100's 132 SMs leaves SMs idle for the
// whole k loop (no split-k here), e.g. gpt-oss k / v (m = 512) at n = 512:
// 16 CTAs. Host-side policy, not a correctness limit.
constexpr int64_t MIN_TILES = 96;
// v4's 256-row tiles run one CTA per SM: taken where they make >= 120 CTAs.
constexpr int64_t MIN_TILES_256 = 120;
__host__ __device__ inline int64_t tiles(int64_t n, int64_t m, int bm) { return ((n + BN - 1) / BN) * ((m + bm - 1) / bm); }
// Scratch bytes: fp16 x [n, k], then n fp32 row factors.
__host__ __device__ inline int64_t scratch_bytes(int64_t n, int64_t k) { return (n * k * 2 + 255) / 256 * 256 + n * 4; }

// ---- device primitives (emulated under ORCH_EMU: the test provides gq8_emu_*) ----
__device__ __forceinline__ void mma16816(float d[4], const unsigned a[4], const unsigned b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(ORCH_EMU)
  emu_mma_m16n8k16(d, a, b);
#endif
}

// ldmatrix .x4: lanes 8i .. 8i+7 give the row addresses of matrix i; lane l
// gets, of matrix i, row l / 4, halves 2 (l % 4) and 2 (l % 4) + 1.
__device__ __forceinline__ void ldsm_x4(unsigned r[4], const __half *p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#elif defined(ORCH_EMU)
  const int lane = threadIdx.x & 31;
  for (int i = 0; i < 4; i++) {
    const __half *rp = (const __half *)__shfl_sync(0xffffffffu, (long long)p, i * 8 + lane / 4);
    std::memcpy(&r[i], rp + 2 * (lane % 4), 4);
  }
#endif
}

#ifdef ORCH_EMU
inline void cp_async16(void *s, const void *g) { gq8_emu_cp_async(s, g, 16); }
inline void cp_async4(void *s, const void *g) { gq8_emu_cp_async(s, g, 4); }
inline void cp_async_commit() { gq8_emu_commit(); }
template <int N>
inline void cp_async_wait() { gq8_emu_wait(N); }
#else
__device__ __forceinline__ void cp_async16(void *s, const void *g) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(s);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async4(void *s, const void *g) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(s);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(a), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

// (d * q) in fp16 for two int8 quants given as fp16 bit patterns 1024 + q + 128
// (v, from the prmt) and d twice (d2): exact subtraction, one rounding.
__device__ __forceinline__ uint32_t deq2(uint32_t v, uint32_t d2) {
  const uint32_t c1152 = 0x64806480u; // fp16 1152 = 1024 + 128, twice
  __half2 hv, hc, hd;
  memcpy(&hv, &v, 4);
  memcpy(&hc, &c1152, 4);
  memcpy(&hd, &d2, 4);
  const __half2 r = __hmul2(__hsub2(hv, hc), hd);
  uint32_t o;
  memcpy(&o, &r, 4);
  return o;
}

// One Q8_0 block (its 34 bytes start at byte 2 of w[0] when h == 0, at byte 2
// of w[8] when h == 1; w holds 9 aligned words) to 32 fp16 values in out[16].
__device__ __forceinline__ void deq_block(const uint32_t w[9], int h, uint32_t out[16]) {
  const uint32_t db = h ? (w[0] >> 16) : (w[0] & 0xffffu);
  const uint32_t d2 = db | (db << 16);
  const uint32_t sh = h ? 32u : 16u;
#pragma unroll
  for (int i = 0; i < 8; i++) {
    const uint32_t q = __funnelshift_rc(w[i], w[i + 1], sh) ^ 0x80808080u;
    out[2 * i] = deq2(__byte_perm(q, 0x64646464u, 0x4140), d2);
    out[2 * i + 1] = deq2(__byte_perm(q, 0x64646464u, 0x4342), d2);
  }
}

// x rows to fp16 scaled by 2^-e per row (scaled max in [1, 2)); f[t] = 2^e.
// One warp per token row; k % 4 == 0, x 16-byte aligned.
__global__ void __launch_bounds__(PREP_ROWS * 32) prep_x(__half *__restrict__ xh, float *__restrict__ f,
                                                          const float *__restrict__ x, int n, int k) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * PREP_ROWS + (threadIdx.x >> 5);
  if (t >= n) return;
  const float4 *xr = reinterpret_cast<const float4 *>(x + (int64_t)t * k);
  float mx = 0.f;
  for (int i = lane; i < k / 4; i += 32) {
    const float4 v = xr[i];
    mx = fmaxf(mx, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_sync(0xffffffffu, mx, lane ^ o));
  // mx = fr * 2^e2, fr in [0.5, 1): scale 2^(1 - e2), kept normal (|e| <= 126).
  int e2 = 0;
  if (mx > 0.f && mx <= 3.4e38f) frexpf(mx, &e2);
  const int e = min(max(e2 - 1, -126), 126);
  const float s = ldexpf(1.f, -e);
  if (lane == 0) f[t] = ldexpf(1.f, e);
  uint2 *o = reinterpret_cast<uint2 *>(xh + (int64_t)t * k);
  for (int i = lane; i < k / 4; i += 32) {
    const float4 v = xr[i];
    const __half2 a = __floats2half2_rn(v.x * s, v.y * s), b = __floats2half2_rn(v.z * s, v.w * s);
    uint2 u;
    memcpy(&u.x, &a, 4);
    memcpy(&u.y, &b, 4);
    o[i] = u;
  }
}

#ifdef ORCH_EMU
#define GQ8_SMEM(name) unsigned char *name = gq8_emu_smem()
#else
#define GQ8_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

// Epilogue of a warp's 64 W rows (from r) x 32 tokens (from t): D rows g,
// g + 8 of each m16 tile, columns (tokens) 2 tig, 2 tig + 1 of each n8 tile;
// y = acc * 2^e(token) (+ bias) (+ y).
__device__ __forceinline__ void epilogue(const float (&accv)[4][4][4], float *__restrict__ y,
                                         const float *__restrict__ xf, const float *__restrict__ bias, int n, int m,
                                         int t, int r, int lane, int acc) {
  const int g = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int nt = 0; nt < 4; nt++) {
#pragma unroll
    for (int j = 0; j < 2; j++) {
      const int T = t + nt * 8 + 2 * tig + j;
      if (T >= n) continue;
      const float fx = xf[T];
#pragma unroll
      for (int mt = 0; mt < 4; mt++) {
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
          const int R = r + mt * 16 + g + 8 * hh;
          if (R >= m) continue;
          float v = accv[mt][nt][2 * hh + j] * fx;
          if (bias) v += bias[R];
          float *yp = y + (int64_t)T * m + R;
          *yp = acc ? *yp + v : v;
        }
      }
    }
  }
}

template <int BM>
__global__ void __launch_bounds__(Cfg<BM>::THREADS, Cfg<BM>::MIN_BLOCKS)
    gemm(float *__restrict__ y, const __half *__restrict__ xh, const float *__restrict__ xf,
         const uint8_t *__restrict__ w, const float *__restrict__ bias, int n, int k, int m, int64_t rb, int acc) {
  using C = Cfg<BM>;
  GQ8_SMEM(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t0 = blockIdx.x * BN, r0 = blockIdx.y * BM;
  const int nk = k / BK;
  // Copy tasks. W: row wr, words [0, 8) (h = 0) or [8, 17) (h = 1) of its
  // 68-byte stage segment (rows past m copy row m - 1: masked at the end).
  const int wr = tid >> 1, h = tid & 1;
  const uint8_t *wsrc = w + (int64_t)min(r0 + wr, m - 1) * rb + 32 * h;
  const int wdst = wr * RAW_ROW + 32 * h;
  // x: XCH chunks of 16 bytes, rows (tid >> 3) + XR i, column chunk tid & 7.
  constexpr int XR = C::THREADS / 8;
  const __half *xsrc = xh + (int64_t)min(t0 + (tid >> 3), n - 1) * k + (tid & 7) * 8;
  int64_t xstep[C::XCH];
#pragma unroll
  for (int i = 0; i < C::XCH; i++)
    xstep[i] = (int64_t)(min(t0 + (tid >> 3) + XR * i, n - 1) - min(t0 + (tid >> 3), n - 1)) * k;
  const int xdst = C::RAW_BYTES + (tid >> 3) * XS * 2 + (tid & 7) * 16;

  auto load_stage = [&](int kt) {
    unsigned char *st = smem + (kt % NS) * C::STAGE_BYTES;
    const uint8_t *ws = wsrc + (int64_t)kt * RAW_ROW;
#pragma unroll
    for (int j = 0; j < 9; j++)
      if (j < 8 + h) cp_async4(st + wdst + 4 * j, ws + 4 * j);
    const __half *xs = xsrc + kt * BK;
#pragma unroll
    for (int i = 0; i < C::XCH; i++) cp_async16(st + xdst + i * XR * XS * 2, xs + xstep[i]);
  };

  float accv[4][4][4];
#pragma unroll
  for (int a = 0; a < 4; a++)
#pragma unroll
    for (int b = 0; b < 4; b++)
#pragma unroll
      for (int c = 0; c < 4; c++) accv[a][b][c] = 0.f;

  load_stage(0);
  cp_async_commit();
  if (nk > 1) load_stage(1);
  cp_async_commit();

  __half *wh = reinterpret_cast<__half *>(smem + C::WH_OFF);
  const int wm0 = (warp % C::WARPS_M) * 64, wn0 = (warp / C::WARPS_M) * 32;
  for (int kt = 0; kt < nk; kt++) {
    cp_async_wait<NS - 2>(); // this thread's copies of stage kt have landed
    __syncthreads();         // everyone's; and every warp is past stage kt-1's MMA (W tile and slot reuse)
    if (kt + 2 < nk) load_stage(kt + 2);
    cp_async_commit();
    const unsigned char *st = smem + (kt % NS) * C::STAGE_BYTES;
    {
      uint32_t wv[9], o[16];
      const uint32_t *rw = reinterpret_cast<const uint32_t *>(st + wr * RAW_ROW) + 8 * h;
#pragma unroll
      for (int i = 0; i < 9; i++) wv[i] = rw[i];
      deq_block(wv, h, o);
      uint4 *dst = reinterpret_cast<uint4 *>(wh + wr * XS + 32 * h);
#pragma unroll
      for (int i = 0; i < 4; i++) dst[i] = make_uint4(o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]);
    }
    __syncthreads();
    const __half *xt = reinterpret_cast<const __half *>(st + C::RAW_BYTES);
#pragma unroll
    for (int ks = 0; ks < BK / 16; ks++) {
      unsigned b[4][2];
#pragma unroll
      for (int p = 0; p < 2; p++) {
        unsigned r[4];
        ldsm_x4(r, xt + (wn0 + p * 16 + (lane >> 4) * 8 + (lane & 7)) * XS + ks * 16 + ((lane >> 3) & 1) * 8);
        b[2 * p][0] = r[0];
        b[2 * p][1] = r[1];
        b[2 * p + 1][0] = r[2];
        b[2 * p + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < 4; mt++) {
        unsigned a[4];
        ldsm_x4(a, wh + (wm0 + mt * 16 + (lane & 15)) * XS + ks * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int nt = 0; nt < 4; nt++) mma16816(accv[mt][nt], a, b[nt]);
      }
    }
  }
  cp_async_wait<0>();
  epilogue(accv, y, xf, bias, n, m, t0 + wn0, r0 + wm0, lane, acc);
}

// ---- v5: one barrier per stage, dequantization inside the MMA loop ----
// Same tiles and arithmetic as gemm<128>, other schedule: the fp16 W tile is
// double-buffered, and while a warp multiplies stage kt from one buffer it
// dequantizes stage kt+1's blocks into the other, a 16-byte chunk after each
// k16 step (the decode's integer/fp16 work interleaves with the HMMAs of the
// same warp instead of a separate phase between two barriers). Raw W runs 3
// stages ahead, x 2 (both in the group of iteration kt-2). x and W tiles are
// unpadded 128-byte rows with 16-byte chunk c of row r at c ^ (r & 7) (the 8
// rows of an ldmatrix fall on distinct bank groups), 105.5 KB: two CTAs/SM.
struct PCfg {
  static constexpr int BM = 128, THREADS = 256, XCH = 4, XR = 32;
  static constexpr int RAW_BYTES = BM * RAW_ROW;    // 8704 per slot
  static constexpr int X_BYTES = BN * BK * 2;       // 16384 per slot
  static constexpr int WH_BYTES = BM * BK * 2;      // 16384 per buffer
  static constexpr int X_OFF = NS * RAW_BYTES;      // 26112
  static constexpr int WH_OFF = X_OFF + NS * X_BYTES; // 75264
  static constexpr int SMEM = WH_OFF + 2 * WH_BYTES;  // 108032
  static_assert(X_OFF % 16 == 0 && WH_OFF % 16 == 0, "16-byte aligned regions");
};

// Halves offset of 8-half chunk c of row r in a swizzled 64-half-row tile.
__host__ __device__ __forceinline__ int swz(int r, int c) { return r * 64 + ((c ^ (r & 7)) << 3); }

// Chunk j (0..3: elements 8j .. 8j+7) of a block as in deq_block.
__device__ __forceinline__ uint4 deq_chunk(const uint32_t w[9], int h, int j) {
  const uint32_t db = h ? (w[0] >> 16) : (w[0] & 0xffffu);
  const uint32_t d2 = db | (db << 16);
  const uint32_t sh = h ? 32u : 16u;
  const uint32_t q0 = __funnelshift_rc(w[2 * j], w[2 * j + 1], sh) ^ 0x80808080u;
  const uint32_t q1 = __funnelshift_rc(w[2 * j + 1], w[2 * j + 2], sh) ^ 0x80808080u;
  return make_uint4(deq2(__byte_perm(q0, 0x64646464u, 0x4140), d2), deq2(__byte_perm(q0, 0x64646464u, 0x4342), d2),
                    deq2(__byte_perm(q1, 0x64646464u, 0x4140), d2), deq2(__byte_perm(q1, 0x64646464u, 0x4342), d2));
}

__global__ void __launch_bounds__(PCfg::THREADS, 2)
    gemm_p(float *__restrict__ y, const __half *__restrict__ xh, const float *__restrict__ xf,
           const uint8_t *__restrict__ w, const float *__restrict__ bias, int n, int k, int m, int64_t rb, int acc) {
  using C = PCfg;
  GQ8_SMEM(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t0 = blockIdx.x * BN, r0 = blockIdx.y * C::BM;
  const int nk = k / BK;
  const int wr = tid >> 1, h = tid & 1;
  const uint8_t *wsrc = w + (int64_t)min(r0 + wr, m - 1) * rb + 32 * h;
  const int wdst = wr * RAW_ROW + 32 * h;
  const __half *xsrc = xh + (int64_t)min(t0 + (tid >> 3), n - 1) * k + (tid & 7) * 8;
  int64_t xstep[C::XCH];
#pragma unroll
  for (int i = 0; i < C::XCH; i++)
    xstep[i] = (int64_t)(min(t0 + (tid >> 3) + C::XR * i, n - 1) - min(t0 + (tid >> 3), n - 1)) * k;
  // rows (tid >> 3) + 32 i all have row & 7 == (tid >> 3) & 7
  const int xdst = C::X_OFF + 2 * swz(tid >> 3, tid & 7);

  auto load_raw = [&](int kt) {
    unsigned char *st = smem + (kt % NS) * C::RAW_BYTES;
    const uint8_t *ws = wsrc + (int64_t)kt * RAW_ROW;
#pragma unroll
    for (int j = 0; j < 9; j++)
      if (j < 8 + h) cp_async4(st + wdst + 4 * j, ws + 4 * j);
  };
  auto load_x = [&](int kt) {
    unsigned char *st = smem + (kt % NS) * C::X_BYTES;
    const __half *xs = xsrc + kt * BK;
#pragma unroll
    for (int i = 0; i < C::XCH; i++) cp_async16(st + xdst + i * C::XR * BK * 2, xs + xstep[i]);
  };
  auto raw_words = [&](int kt, uint32_t wv[9]) {
    const uint32_t *rw = reinterpret_cast<const uint32_t *>(smem + (kt % NS) * C::RAW_BYTES + wr * RAW_ROW) + 8 * h;
#pragma unroll
    for (int i = 0; i < 9; i++) wv[i] = rw[i];
  };
  __half *whb = reinterpret_cast<__half *>(smem + C::WH_OFF);
  auto wh_chunk = [&](int buf, int j) -> uint4 * {
    return reinterpret_cast<uint4 *>(whb + buf * (C::WH_BYTES / 2) + swz(wr, 4 * h + j));
  };

  float accv[4][4][4];
#pragma unroll
  for (int a = 0; a < 4; a++)
#pragma unroll
    for (int b = 0; b < 4; b++)
#pragma unroll
      for (int c = 0; c < 4; c++) accv[a][b][c] = 0.f;

  // Prologue: {raw 0, raw 1, x 0}, {raw 2, x 1}; stage 0 dequantized into buffer 0.
  load_raw(0);
  if (nk > 1) load_raw(1);
  load_x(0);
  cp_async_commit();
  if (nk > 2) load_raw(2);
  if (nk > 1) load_x(1);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  {
    uint32_t wv[9];
    raw_words(0, wv);
#pragma unroll
    for (int j = 0; j < 4; j++) *wh_chunk(0, j) = deq_chunk(wv, h, j);
  }

  const int wm0 = (warp & 1) * 64, wn0 = (warp >> 1) * 32;
  for (int kt = 0; kt < nk; kt++) {
    // Group of iteration kt-2 (x kt, raw kt+1) landed for this thread; the
    // barrier makes everyone's visible, finishes W buffer kt & 1, and puts
    // every warp past stage kt-1 (its x slot, its W buffer, raw slot kt).
    cp_async_wait<1>();
    __syncthreads();
    if (kt + 3 < nk) load_raw(kt + 3);
    if (kt + 2 < nk) load_x(kt + 2);
    cp_async_commit();
    const bool dq = kt + 1 < nk;
    uint32_t wv[9];
    if (dq) raw_words(kt + 1, wv);
    const __half *xt = reinterpret_cast<const __half *>(smem + C::X_OFF + (kt % NS) * C::X_BYTES);
    const __half *wc = whb + (kt & 1) * (C::WH_BYTES / 2);
#pragma unroll
    for (int ks = 0; ks < BK / 16; ks++) {
      unsigned b[4][2];
#pragma unroll
      for (int p = 0; p < 2; p++) {
        unsigned r[4];
        ldsm_x4(r, xt + swz(wn0 + p * 16 + (lane >> 4) * 8 + (lane & 7), 2 * ks + ((lane >> 3) & 1)));
        b[2 * p][0] = r[0];
        b[2 * p][1] = r[1];
        b[2 * p + 1][0] = r[2];
        b[2 * p + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < 4; mt++) {
        unsigned a[4];
        ldsm_x4(a, wc + swz(wm0 + mt * 16 + (lane & 15), 2 * ks + (lane >> 4)));
#pragma unroll
        for (int nt = 0; nt < 4; nt++) mma16816(accv[mt][nt], a, b[nt]);
      }
      if (dq) *wh_chunk((kt + 1) & 1, ks) = deq_chunk(wv, h, ks);
    }
  }
  cp_async_wait<0>();
  epilogue(accv, y, xf, bias, n, m, t0 + wn0, r0 + wm0, lane, acc);
}

#ifdef ORCH_EMU
#define GQ8_LAUNCH(kern, grid, threads, smem, stream, ...) emu_launch(grid, threads, smem, [&] { kern(__VA_ARGS__); })
#else
#define GQ8_LAUNCH(kern, grid, threads, smem, stream, ...) kern<<<grid, threads, smem, stream>>>(__VA_ARGS__)
#endif

// Runs prep_x and the GEMM on st: cfg = 128 or 256 (gemm<cfg>), else gemm_p
// (128-row tiles, v5); scr holds
// scratch_bytes(n, k) (256-byte aligned). The caller checked supported();
// returns a cudaError_t of the launches.
template <int BM>
inline cudaError_t launch_gemm(cudaStream_t st, float *y, const __half *xh, const float *xf, const uint8_t *w,
                               const float *bias, int64_t n, int64_t k, int64_t m, int64_t rb, int acc) {
  using C = Cfg<BM>;
#ifndef ORCH_EMU
  // Every call, as the library's other kernels (cheap; per device, allowed under capture).
  cudaError_t e = cudaFuncSetAttribute(gemm<BM>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (e != cudaSuccess) return e;
#endif
  GQ8_LAUNCH(gemm<BM>, dim3((unsigned)ceil_div(n, BN), (unsigned)ceil_div(m, BM)), C::THREADS, C::SMEM, st, y, xh, xf,
             w, bias, (int)n, (int)k, (int)m, rb, acc);
  return cudaGetLastError();
}

inline cudaError_t run(cudaStream_t st, void *scr, float *y, const float *x, const uint8_t *w, const float *bias,
                       int64_t n, int64_t k, int64_t m, int64_t rb, int acc, int cfg) {
  __half *xh = reinterpret_cast<__half *>(scr);
  float *xf = reinterpret_cast<float *>(reinterpret_cast<char *>(scr) + (n * k * 2 + 255) / 256 * 256);
  GQ8_LAUNCH(prep_x, dim3((unsigned)ceil_div(n, PREP_ROWS)), PREP_ROWS * 32, 0, st, xh, xf, x, (int)n, (int)k);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  if (cfg == 256) return launch_gemm<256>(st, y, xh, xf, w, bias, n, k, m, rb, acc);
  if (cfg == 128) return launch_gemm<128>(st, y, xh, xf, w, bias, n, k, m, rb, acc);
#ifndef ORCH_EMU
  e = cudaFuncSetAttribute(gemm_p, cudaFuncAttributeMaxDynamicSharedMemorySize, PCfg::SMEM);
  if (e != cudaSuccess) return e;
#endif
  GQ8_LAUNCH(gemm_p, dim3((unsigned)ceil_div(n, BN), (unsigned)ceil_div(m, PCfg::BM)), PCfg::THREADS, PCfg::SMEM, st,
             y, xh, xf, w, bias, (int)n, (int)k, (int)m, rb, acc);
  return cudaGetLastError();
}

} // namespace gq8
