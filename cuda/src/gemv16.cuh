// gemv16.cuh — the decode GEMVs for Q8_0 / Q4_0 / MXFP4 weights with the fp16
// decode of dec16.cuh: v5 (HFMA2, n <= 8; routed for n <= 2), v6 (opt-in),
// v7 (mma.sync, n <= 8; routed for n = 3..8), v9 (mma.sync with
// cp.async weight tiles and up to 8 token tiles, n <= 64; routed for
// n = 9..64 by the Go side: sdk/ml/cuda/ops.go gemvWideFor), and the split-k
// F32 GEMV for small m. Included by matmul.cu (gemv_route picks the version)
// and by the CPU emulation test cuda/test/decode_emu_test.cpp.
#pragma once
#include <cstring>
#include <type_traits>
#include "quant.cuh"
#include "dec16.cuh"
#include "qgemm.cuh"

constexpr int GEMV16_WARPS = 8;

// v5 GEMV (Q8_0, Q4_0, MXFP4; n <= 8; default): v4's structure (weight
// words loaded before x is staged, 8 warps, R rows per warp) with the fp16
// decode of dec16.cuh: x staged once per CTA in fp16 (power-of-two scale per
// 32), each weight block decoded once to half2 pairs (prmt/LOP3, no int->float
// conversion) and multiplied into half2 partial sums for all n tokens,
// folded into fp32 per block. ORCH_CUDA_GEMV=v4 selects the fp32 v4.
// The rows of CTA `cta` (blockIdx.x of a plain launch): warps own
// rows_per_warp consecutive rows each. With PDL (common.cuh) the first round
// of weight words is loaded before pdl_wait(): weights are never written
// while a step runs; x, bias and y are touched only after the wait.
// x staged per round (XR = 1; ORCH_CUDA_GEMV5_XR=1, session 6): the first
// row's round j stages only the chunks that round reads ([c0, c0 + 32 NB)),
// after issuing that round's weight loads, then syncs; so the staging of x
// (Llama down: 14336 floats per CTA, ~420 instructions per thread, ~57 KB
// from L2, all before the first FMA with XR = 0) is spread over the rounds and
// overlaps each round's DRAM latency instead of sitting serially after the
// PDL wait. Same staged values, same arithmetic: bit-identical to XR = 0.
// XR = 3 (session 16; ORCH_CUDA_GEMV5_STAGGER, gemv5_stagger_env): x staged once
// (as XR = 0), and warp w's first round covers only 32 (w % NB) chunks (one block
// a lane each) where w % NB > 0, so the warps of a grid whose CTAs start together
// (Llama's q/k/v and out projection: every CTA of the first wave at once) end
// their rounds at NB phases instead of one: DRAM sees part of the warps' next
// loads while the rest compute, not a burst and a drain per round. Every lane
// still folds its blocks (chunks lane, lane + 32, ...) one by one in the same
// order: bit-identical to XR = 0.
// Chunk ranges start at multiples of 32 chunks, so each 8-lane group of
// dec16_stage's loop still owns one chunk.
__device__ __forceinline__ void gemv5_stage_range(uint32_t *xh, float *xinv, const float *__restrict__ x, int nr,
                                                  int64_t k, int kind, int64_t ch0, int64_t ch1) {
  const int64_t nch = k / 32, q0 = ch0 * 8, q1 = ch1 * 8;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int r = 0; r < nr; r++)
    for (int64_t base = q0 + (int64_t)warp * 32; base < q1; base += (int64_t)nw * 32) {
      const int64_t i = base + lane;
      const bool ok = i < q1;
      const float4 v = ok ? __ldg(reinterpret_cast<const float4 *>(x + r * k) + i) : make_float4(0.f, 0.f, 0.f, 0.f);
      uint32_t mx = max(max(dec16_absbits(v.x), dec16_absbits(v.y)), max(dec16_absbits(v.z), dec16_absbits(v.w)));
      mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      float sc, inv;
      dec16_chunk_scale(mx, sc, inv);
      if (ok) {
        const int64_t c = i >> 3;
        const int o = (int)(i & 7);
        dec16_put4(xh + (r * nch + c) * DEC16_XW, kind, o, v.x * sc, v.y * sc, v.z * sc, v.w * sc);
        if (o == 0) xinv[r * nch + c] = inv;
      }
    }
}

static inline size_t gemv5_smem(int64_t k, int nt) { return dec16_smem(k, nt); }

// Per-CTA timestamps of the one-token v5 GEMV (orch_gemv_trace; session 6,
// timing only): %globaltimer at CTA start (t0), after the PDL wait (t1),
// after x is staged (t2; XR: the first round's chunks) and at the end (t3,
// after a barrier), with the block and SM index — where the time between two
// dependent GEMVs goes (start latency, wait, staging, tail).
constexpr int GEMV_TRACE_CAP = 1 << 16;
struct gemv_trace_rec {
  unsigned long long t0, t1, t2, t3;
  unsigned blk, sm, pad[2];
};
#if !defined(ORCH_EMU)
__device__ gemv_trace_rec g_gemv_trace[GEMV_TRACE_CAP];
__device__ unsigned g_gemv_trace_n;
static bool g_gemv_trace_on = false; // host: launch the TR = 1 kernels (one token, plain v5)
#endif
__device__ __forceinline__ unsigned long long gemv_gtime() {
#if defined(__CUDA_ARCH__)
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#else
  return 0;
#endif
}

// cp.async (16 bytes, the first `bytes` read, the rest zero-filled) in commit
// groups (v9's weight tiles, the folded norm's partial sums). The CPU emulation lands copies at once unless the test defines
// GEMV9_EMU_CP_ASYNC and provides gemv9_emu_cp_async / _commit / _wait (it
// then lands them as late as each wait allows).
#if defined(ORCH_EMU)
#if defined(GEMV9_EMU_CP_ASYNC)
inline void g9_cp_async16(void *d, const void *s, int bytes) { gemv9_emu_cp_async(d, s, bytes); }
inline void g9_cp_commit() { gemv9_emu_commit(); }
template <int N> inline void g9_cp_wait() { gemv9_emu_wait(N); }
#else
inline void g9_cp_async16(void *d, const void *s, int bytes) {
  memcpy(d, s, (size_t)bytes);
  memset(static_cast<char *>(d) + bytes, 0, (size_t)(16 - bytes));
}
inline void g9_cp_commit() {}
template <int N> inline void g9_cp_wait() {}
#endif
#else
__device__ __forceinline__ void g9_cp_async16(void *d, const void *s, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned a = (unsigned)__cvta_generic_to_shared(d);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(s), "r"(bytes) : "memory");
#else
  for (int i = 0; i < 16; i++) static_cast<uint8_t *>(d)[i] = i < bytes ? static_cast<const uint8_t *>(s)[i] : 0;
#endif
}
__device__ __forceinline__ void g9_cp_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void g9_cp_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif

// ---- The RMSNorm folded into the GEMVs around it (session 8; ORCH_CUDA_NORM_FOLD, sdk/ml/cuda/normfold.go) ----
// Llama's decode layer runs GEMV -> AddRMSNorm -> GEMV twice (attention out -> FFN norm -> gate/up, down -> next
// attention norm -> q/k/v); each norm is a one-CTA kernel with almost no work, all kernel boundary (~8.8 us of
// critical path in the session-8 trace). Folded, without a serial tail and without every consumer CTA re-reading
// the row (both lost before: perf-cuda.md Rounds 6 and 7):
//  - the PRODUCER GEMV (NF = 1; y = x.W, m = dim rows, one row per warp) also adds each output into the residual
//    (res += y: every row has one owner warp), writes xt = res * w (the norm weight) for its rows and one partial
//    sum of res^2 per CTA and token into fixed slots (ss[j * gridDim.x + cta]: no atomics, deterministic);
//  - the CONSUMER GEMVs (NF = 2: merged q/k/v, gate/up + SwiGLU) run on xt as on any x and scale each output by
//    s = rsqrt(sum(ss) / dim + eps) before the bias (the GEMV is linear in x: h = (res * r) * w = r * xt). The
//    partials are copied to shared memory by cp.async right after the PDL wait (no registers held while x is
//    staged, landed by the staging barrier); each warp sums them at the end in one fixed order (lane l: slots l,
//    l + 32, ..., then warp_sum): every warp and CTA gets the same s, run to run the same bits.
// Rounding differs from norm.cu (the sum of squares in another order, the scale applied after the dot rather than
// to x before the fp16 staging); res is bit-identical (one fp32 add of the same y).
struct gemv5_nf {
  float *res = nullptr;       // producer: the residual [n, m] (+= y)
  const float *w = nullptr;   // producer: the norm weight [m]
  float *xt = nullptr;        // producer: res * w [n, m]
  float *ss = nullptr;        // producer writes, consumer reads: nss partial sums of squares per token
  int nss = 0;                // consumer: partials per token (the producer's CTA count)
  float eps = 0.f;            // consumer
  const uint8_t *pf = nullptr; // producer: bytes [pf, pf + pfb) into L2 before its PDL wait (gemv5_l2pf)
  int64_t pfb = 0;
  int pfm = 0; // 1: with an evict_last policy
};
constexpr int GEMV5_NF_MAX = 1024; // consumer: partials per token (shared memory: NT x nss floats)
// Shared floats the fold uses after the staged x (dynamic shared memory): the producer's NT x 8 warp sums, the
// consumer's NT x nss partials.
// (16-byte aligned: the cp.async destinations; 16 bytes of padding in the size.)
static inline size_t gemv5_nf_smem(int nt, int nss, int w = GEMV16_WARPS) {
  return 16 + (size_t)nt * (nss > w ? nss : w) * sizeof(float);
}
__device__ __forceinline__ float *gemv5_nf_sh(uint32_t *xsm, int64_t nch, int NT) {
  return reinterpret_cast<float *>(xsm) + (((int64_t)NT * nch * (DEC16_XW + 1) + 3) & ~(int64_t)3);
}
// Consumer, right after the PDL wait: the nt x nss partials (nss % 4 == 0, ss 16-byte aligned) copied into sh
// with 16-byte cp.async (no registers held while x is staged); gemv5_nf_wait before the staging barrier.
__device__ __forceinline__ void gemv5_nf_issue(const gemv5_nf &F, int nt, float *sh) {
  const int q4 = F.nss / 4;
  for (int q = threadIdx.x; q < nt * q4; q += GEMV16_WARPS * 32) g9_cp_async16(sh + 4 * q, F.ss + 4 * q, 16);
  g9_cp_commit();
}
__device__ __forceinline__ void gemv5_nf_wait() { g9_cp_wait<0>(); }
// Token j's scale (after the staging barrier), the same in every lane, warp and CTA: lane l sums partials l,
// l + 32, ... in order, then warp_sum.
// Four running sums per lane (slots l + 128 i + 32 a go to sum a), added as (s0 + s1) + (s2 + s3): a short
// dependent chain. Consumers call it for all tokens (gemv5_nf_scales) once x is staged, after the second
// round's weight loads are issued where there is one (its latency under theirs), else at the end.
__device__ __forceinline__ float gemv5_nf_scale(const float *sh, int j, int nss, int64_t dim, float eps) {
  const float *p = sh + j * nss;
  const int lane = threadIdx.x & 31;
  float t[4] = {0.f, 0.f, 0.f, 0.f};
  for (int i = lane; i < nss; i += 128) {
#pragma unroll
    for (int a = 0; a < 4; a++)
      if (i + 32 * a < nss) t[a] += p[i + 32 * a];
  }
  const float v = warp_sum((t[0] + t[1]) + (t[2] + t[3]));
  return rsqrtf(v / (float)dim + eps);
}
template <int NT>
__device__ __forceinline__ void gemv5_nf_scales(float (&sc)[NT], const float *sh, int nt, int nss, int64_t dim,
                                                float eps) {
#pragma unroll
  for (int j = 0; j < NT; j++) sc[j] = j < nt ? gemv5_nf_scale(sh, j, nss, dim, eps) : 1.f;
}

// The next GEMV's first weight rows into L2 (session 16; orch_matmul_addnorm_pf, ORCH_CUDA_L2PF): the producer's
// CTAs, after their own first-round loads and BEFORE pdl_wait, ask for [F.pf, F.pf + F.pfb), a 16-byte aligned
// slice each (CTA b: bytes [b * per, (b + 1) * per)). Weights are never written while a step runs. Launched after the
// decode attention (the Go side asks only then), the requests fill the one window of a Llama layer in which DRAM
// is not the bottleneck (the attention is latency-bound) so that the consumer (the gate/up fold) reads that many
// bytes from L2 instead. A hint: no result depends on it. Hopper (CUDA 12+): bulk prefetches of up to 16 KB, one
// thread each; otherwise one prefetch.global.L2 per 32-byte sector.
__device__ __forceinline__ void gemv5_l2pf(const gemv5_nf &F) {
  if (F.pfb <= 0) return;
  const int64_t per = ((F.pfb + gridDim.x - 1) / gridDim.x + 15) & ~(int64_t)15;
  const int64_t b0 = (int64_t)blockIdx.x * per, b1 = min(b0 + per, F.pfb);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDACC_VER_MAJOR__) && __CUDACC_VER_MAJOR__ >= 12
  constexpr int64_t CH = 16 * 1024;
  const int64_t o = b0 + (int64_t)threadIdx.x * CH;
  if (o < b1) {
    const unsigned sz = (unsigned)min(CH, b1 - o); // a multiple of 16: per and pfb are (orch_matmul_addnorm_pf)
    if (F.pfm == 1) {
      uint64_t pol;
      asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
      asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(F.pf + o), "r"(sz), "l"(pol)
                   : "memory");
    } else {
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(F.pf + o), "r"(sz) : "memory");
    }
  }
#elif defined(__CUDA_ARCH__)
  for (int64_t o = b0 + (int64_t)threadIdx.x * 32; o < b1; o += (int64_t)blockDim.x * 32) {
    if (F.pfm == 1) asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(F.pf + o));
    else asm volatile("prefetch.global.L2 [%0];" ::"l"(F.pf + o));
  }
#else
  (void)b0, (void)b1;
#endif
}

// NF: 0 plain, 1 the fold's producer (rows_per_warp 1, accumulate 0, cta = blockIdx.x), 2 its consumer
// (gemv5_nf above; F unused at 0). W: warps per CTA (gemv5_warps; 8, or 16 / 32 for the repacked Q8_0 rows): the
// rows, their arithmetic and the producer's partial sums (one per 8 consecutive warps) do not depend on it.
template <int T, int NT, int NB, int XR = 0, int TR = 0, int NF = 0, int W = GEMV16_WARPS>
__device__ __forceinline__ void gemv5_rows(uint32_t *xsm, int64_t cta, float *__restrict__ y,
                                           const float *__restrict__ x, const uint8_t *__restrict__ w,
                                           const float *__restrict__ bias, int64_t n, int64_t k, int64_t m,
                                           int64_t row_bytes, int accumulate, int rows_per_warp,
                                           const gemv5_nf &F = gemv5_nf{}) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nt = (int)min((int64_t)NT, n);
  const int64_t nch = k / 32;
  float *xinv = reinterpret_cast<float *>(xsm + nt * nch * DEC16_XW);
  float *nfsh = gemv5_nf_sh(xsm, nch, NT);
  float nfres = 0.f, nfw = 0.f; // NF 1: lane j's res of token j at its row, the row's norm weight
  float nfsc[NT];               // NF 2: the tokens' scales
  bool nfscd = false;           // ... computed
  const int64_t row0 = (cta * W + warp) * rows_per_warp;
  bool staged = false;
  unsigned long long tr[3] = {0, 0, 0};
  if constexpr (TR) tr[0] = gemv_gtime();
  for (int r = 0; r < rows_per_warp; r++) {
    const int64_t row = row0 + r;
    const bool valid = row < m;
    const uint8_t *wr = w + (valid ? row : 0) * row_bytes;
    // The row's bias (a weight: constant, so loaded before the PDL wait and the dots; session 14: after them it was
    // one exposed global round trip at the end of every warp, as MoE v10's were: +7% gpt-oss tg128 there).
    const float bv = bias && valid ? __ldg(bias + row) : 0.f;
    float acc[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) acc[j] = 0.f;
    // XR 3: rounds staggered by warp (gemv5_stagger); otherwise every round ends at c0 + 32 NB.
    int64_t ce = XR == 3 && warp % NB ? 32 * (warp % NB) : 32 * NB; // (XR 3 only: dead code otherwise)
    for (int64_t c0 = 0; c0 < nch; c0 = XR == 3 ? ce : c0 + 32 * NB, ce += 32 * NB) {
      const int64_t lim = XR == 3 ? min(ce, nch) : nch; // this round's chunks end before lim
      wblocks<T, NB> b;
      ffn_load<T, NB>(b, wr, c0, lane, nch, valid, lim);
      if constexpr (XR == 1) {
        if (r == 0) { // every round of the first row: uniform over the CTA
          if (c0 == 0) {
            if constexpr (NF == 1) gemv5_l2pf(F);
            pdl_wait();
            if constexpr (TR) tr[1] = gemv_gtime();
            if constexpr (NF == 1)
              if (lane < nt && row0 < m) nfres = F.res[lane * m + row0], nfw = F.w[row0];
            if constexpr (NF == 2) gemv5_nf_issue(F, nt, nfsh);
          }
          gemv5_stage_range(xsm, xinv, x, nt, k, dec16_traits<T>::kind, c0, min(c0 + 32 * NB, nch));
          if constexpr (NF == 2)
            if (c0 == 0) gemv5_nf_wait();
          __syncthreads();
          if constexpr (TR)
            if (c0 == 0) tr[2] = gemv_gtime();
        }
      } else if (!staged) { // first round of the first row: uniform over the CTA
        if constexpr (NF == 1) gemv5_l2pf(F);
        pdl_wait();
        if constexpr (TR) tr[1] = gemv_gtime();
        if constexpr (NF == 1)
          if (lane < nt && row0 < m) nfres = F.res[lane * m + row0], nfw = F.w[row0];
        if constexpr (NF == 2) gemv5_nf_issue(F, nt, nfsh);
        dec16_stage(xsm, xinv, x, nt, k, dec16_traits<T>::kind);
        if constexpr (NF == 2) gemv5_nf_wait();
        __syncthreads();
        if constexpr (TR) tr[2] = gemv_gtime();
        staged = true;
      }
      if constexpr (NF == 2)
        if (c0 > 0 && !nfscd) { // this round's loads in flight (uniform)
          gemv5_nf_scales<NT>(nfsc, nfsh, nt, F.nss, k, F.eps);
          nfscd = true;
        }
#pragma unroll
      for (int i = 0; i < NB; i++) {
        const int64_t c = c0 + lane + 32 * i;
        if (c < lim) {
          const uint4 *xp[NT];
          uint32_t a[NT][2];
#pragma unroll
          for (int j = 0; j < NT; j++) {
            xp[j] = reinterpret_cast<const uint4 *>(xsm + ((j < nt ? j : 0) * nch + c) * DEC16_XW);
            a[j][0] = a[j][1] = 0u;
          }
          dec16_block_acc<T, NT>(b.w[i], b.sh[i], xp, nt, a);
          const float ws = dec16_wscale<T>(b.w[i], b.sh[i]);
#pragma unroll
          for (int j = 0; j < NT; j++)
            if (j < nt) acc[j] += dec16_fold(a[j], ws, xinv[j * nch + c]);
        }
      }
    }
    if constexpr (NF == 1) {
      // y as the plain GEMV writes it; lane j: res += y, xt = res * w and res^2 for token j
      float q = 0.f;
#pragma unroll
      for (int j = 0; j < NT; j++) {
        float s = warp_sum(acc[j]);
        if (j < nt && valid) {
          if (bias) s += bv;
          if (lane == 0) y[j * m + row] = s;
          if (lane == j) {
            const float rn = nfres + s;
            F.res[j * m + row] = rn;
            F.xt[j * m + row] = rn * nfw;
            q = rn * rn;
          }
        }
      }
      if (lane < NT) nfsh[lane * W + warp] = q; // 0 for invalid rows and tokens
    } else {
      if constexpr (NF == 2)
        if (!nfscd) { // one round only
          gemv5_nf_scales<NT>(nfsc, nfsh, nt, F.nss, k, F.eps);
          nfscd = true;
        }
#pragma unroll
      for (int j = 0; j < NT; j++) {
        float s = warp_sum(acc[j]);
        if (lane == 0 && j < nt && valid) {
          if constexpr (NF == 2) s *= nfsc[j];
          if (bias) s += bv;
          float *yp = y + j * m + row;
          *yp = accumulate ? *yp + s : s;
        }
      }
    }
  }
  if constexpr (NF == 1) { // the partial sums of squares, one per 8 warps (G per CTA): their rows in order
    constexpr int G = W / GEMV16_WARPS;
    __syncthreads();
    const int j = (int)threadIdx.x / G, g = (int)threadIdx.x % G;
    // gridDim.x * G = m / 8 slots per token (orch_matmul_addnorm: m % 32 == 0, W <= 32)
    if (j < nt) {
      const float *q = nfsh + j * W + g * GEMV16_WARPS;
      float t = q[0];
#pragma unroll
      for (int w8 = 1; w8 < GEMV16_WARPS; w8++) t += q[w8];
      F.ss[j * gridDim.x * G + cta * G + g] = t;
    }
  }
#if !defined(ORCH_EMU)
  if constexpr (TR) {
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      const unsigned i = atomicAdd(&g_gemv_trace_n, 1u);
      if (i < GEMV_TRACE_CAP) g_gemv_trace[i] = {tr[0], tr[1], tr[2], gemv_gtime(), blockIdx.x, sm, {0u, 0u}};
    }
  }
#endif
}

// The L1 / shared split of the one- and two-token v5 kernels (common.cuh orch_carveout: one split with the decode
// attention's, session 15).
#if defined(ORCH_EMU)
#define ORCH_GEMV_CARVEOUT(kern)
#else
#define ORCH_GEMV_CARVEOUT(kern) orch_apply_carveout(kern)
#endif

// Minimum CTAs per SM for __launch_bounds__: the 8-warp kernels' own (b8; 0 = none given, which is not the same
// as 1: (256, 1) took 68-78 registers where (256) takes 56-62), the wider ones 1024 threads per SM (<= 64
// registers, as the 8-warp kernels at 4 CTAs per SM).
template <int W> constexpr int gemv5_minb(int b8) { return W == GEMV16_WARPS ? b8 : 1024 / (W * 32); }

template <int T, int NT, int NB, int XR = 0, int TR = 0, int W = GEMV16_WARPS>
__global__ void __launch_bounds__(W * 32, gemv5_minb<W>(0))
gemv5_kernel(float *__restrict__ y, const float *__restrict__ x, const uint8_t *__restrict__ w,
             const float *__restrict__ bias, int64_t n, int64_t k, int64_t m, int64_t row_bytes, int accumulate,
             int rows_per_warp) {
  DEC16_DYN_SMEM(uint32_t, xsm); // nt rows of nch staged chunks, then nt*nch 1/scales
  pdl_trigger();
  gemv5_rows<T, NT, NB, XR, TR, 0, W>(xsm, blockIdx.x, y, x, w, bias, n, k, m, row_bytes, accumulate, rows_per_warp);
}
// Multi-weight GEMV v5 (orch_matmul_multi): up to GEMV_MAX_PARTS weights of
// one type with the same x (q, k and v of a layer) in one launch; part p owns
// CTAs [end[p-1], end[p]) and runs exactly gemv5_kernel's code on them, so
// every output is bit-identical to a separate launch.
constexpr int GEMV_MAX_PARTS = 3;
struct gemv5_parts {
  const uint8_t *w[GEMV_MAX_PARTS];
  const float *bias[GEMV_MAX_PARTS];
  float *y[GEMV_MAX_PARTS];
  int64_t m[GEMV_MAX_PARTS];
  int rpw[GEMV_MAX_PARTS];
  unsigned end[GEMV_MAX_PARTS]; // cumulative CTA counts (unused parts: the total)
};

// NF (gemv5_nf): 0, or 2 = the folded norm's consumer (F's ss, nss, eps).
template <int T, int NT, int NB, int XR = 0, int TR = 0, int NF = 0, int W = GEMV16_WARPS>
__device__ __forceinline__ void gemv5_multi_body(const gemv5_parts &P, const float *__restrict__ x, int64_t n,
                                                 int64_t k, int64_t row_bytes, const gemv5_nf &F) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  pdl_trigger();
  // Selects instead of P.x[p]: a dynamic index would copy P to local memory.
  static_assert(GEMV_MAX_PARTS == 3, "part selection below");
  const unsigned b = blockIdx.x;
  const int p = b >= P.end[0] ? (b >= P.end[1] ? 2 : 1) : 0;
#define GEMV5_PICK(f) (p == 0 ? P.f[0] : p == 1 ? P.f[1] : P.f[2])
  const int64_t cta = (int64_t)b - (p == 0 ? 0u : p == 1 ? P.end[0] : P.end[1]);
  gemv5_rows<T, NT, NB, XR, TR, NF, W>(xsm, cta, GEMV5_PICK(y), x, GEMV5_PICK(w), GEMV5_PICK(bias), n, k,
                                       GEMV5_PICK(m), row_bytes, 0, GEMV5_PICK(rpw), F);
#undef GEMV5_PICK
}
template <int T, int NT, int NB, int XR = 0, int TR = 0, int W = GEMV16_WARPS>
__global__ void __launch_bounds__(W * 32, gemv5_minb<W>(0))
gemv5_multi_kernel(const gemv5_parts P, const float *__restrict__ x, int64_t n, int64_t k, int64_t row_bytes) {
  gemv5_multi_body<T, NT, NB, XR, TR, 0, W>(P, x, n, k, row_bytes, gemv5_nf{});
}
// The folded norm's consumer (orch_matmul_multi_nf): x is the producer's xt.
template <int T, int NT, int NB, int XR, int W = GEMV16_WARPS>
__global__ void __launch_bounds__(W * 32, gemv5_minb<W>(4)) // <= 64 registers: 4 CTAs per SM as the plain kernel
gemv5_multi_nf_kernel(const gemv5_parts P, const float *__restrict__ x, int64_t n, int64_t k, int64_t row_bytes,
                      const gemv5_nf F) {
  gemv5_multi_body<T, NT, NB, XR, 0, 2, W>(P, x, n, k, row_bytes, F);
}
// The folded norm's producer (orch_matmul_addnorm): one row per warp, y written (no accumulate).
template <int T, int NT, int NB, int XR, int W = GEMV16_WARPS>
__global__ void __launch_bounds__(W * 32, gemv5_minb<W>(0))
gemv5_nf_kernel(float *__restrict__ y, const float *__restrict__ x, const uint8_t *__restrict__ w,
                const float *__restrict__ bias, int64_t n, int64_t k, int64_t m, int64_t row_bytes, const gemv5_nf F) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  pdl_trigger();
  gemv5_rows<T, NT, NB, XR, 0, 1, W>(xsm, blockIdx.x, y, x, w, bias, n, k, m, row_bytes, 0, 1, F);
}

template <int T, int NT> constexpr int gemv5_nb() { return (q8_like<T>() && NT > 1) || NT > 4 ? 2 : 3; }
// Rows per warp: 2 for the LM heads (m >= 32768), else 1.
static inline int gemv5_rpw(int64_t m) { return m >= 32768 ? 2 : 1; }

// Warps per CTA of the one- and two-token v5 kernels on the repacked Q8_0 rows (session 13), where every part has
// one row per warp (not the LM heads): 8, 16 or 32. x is staged once per CTA (Llama down: 14336 floats, 57 KB from
// L2, a dependent chain of one L2 round trip per float4 a thread: 14 of them at 256 threads, 7 at 512), so wider
// CTAs stage it fewer times per SM and sooner; the producer of the folded norm still writes one partial sum per 8
// warps, so the consumers and the bits do not change. Default (device run 1, H100, TestPerfGEMVVersions): one
// token 32 below k = 4096 (gpt-oss q/k/v 8.8 -> 7.9 us), 16 from it (Llama down 29.9 -> 24.9, the gate/up +
// SwiGLU fold 46.6 -> 44.8; 32 there: 27.4 / 45.5); two tokens 8 below k = 4096 (gpt-oss q/k/v 10.0 vs 11.6 at 16),
// 16 from it (down 45.9 -> 30.2). ORCH_CUDA_GEMV5_W=<w>[@<kmin>] pins w where k >= kmin (default 0), 8 below.
// Read once per process; g_gemv5_w_force (emulation tests) overrides both.
struct gemv5_w_cfg {
  int w = 0; // 0: the default above
  int64_t kmin = 0;
};
static inline gemv5_w_cfg gemv5_w_env() {
  static const gemv5_w_cfg v = [] {
    gemv5_w_cfg c;
    const char *e = getenv("ORCH_CUDA_GEMV5_W");
    if (!e || !*e) return c;
    char *end = nullptr;
    const long w = strtol(e, &end, 10);
    if (w == 8 || w == 16 || w == 32) c.w = (int)w;
    if (end && *end == '@') c.kmin = strtoll(end + 1, nullptr, 10);
    return c;
  }();
  return v;
}
static int g_gemv5_w_force = 0;
template <int T> static inline int gemv5_warps(int64_t k, int nt, bool one_row) {
  if (T != ORCH_T_Q8_0R || !one_row || nt > 2) return GEMV16_WARPS;
  if (g_gemv5_w_force) return g_gemv5_w_force;
  const gemv5_w_cfg c = gemv5_w_env();
  if (c.w) return k >= c.kmin ? c.w : GEMV16_WARPS;
  if (k >= 4096) return 16;
  return nt == 1 ? 32 : GEMV16_WARPS;
}
// f(std::integral_constant<int, W>) for w (the wider kernels exist for the repacked Q8_0 rows at one and two
// tokens only: WIDE false compiles the 8-warp kernel alone).
template <int T, bool WIDE = true, typename F> static void gemv5_with_w(int w, F &&f) {
  if constexpr (T == ORCH_T_Q8_0R && WIDE) {
    if (w == 32) return f(std::integral_constant<int, 32>{});
    if (w == 16) return f(std::integral_constant<int, 16>{});
  }
  f(std::integral_constant<int, GEMV16_WARPS>{});
}

// ORCH_CUDA_GEMV5_XR=1 / =0 pins the float-x staging of the one- and
// two-token v5 kernels (plain, multi, SwiGLU fold) to per round / once for
// every k. Read once per process.
static inline int gemv5_xr_env() {
  static const int v = [] {
    const char *e = getenv("ORCH_CUDA_GEMV5_XR");
    return e && (e[0] == '0' || e[0] == '1') && !e[1] ? e[0] - '0' : -1;
  }();
  return v;
}
// How the one- and two-token v5 kernels stage a float x (their XR template
// argument): 1 per round, 0 dec16_stage's one load at a time (the session-5
// kernel). Default by k: per round from k = 8192 (Llama down, k = 14336: its
// x staging sat after the PDL wait), 0 below. Session 6, device run 3 (H100,
// same call): Llama tg128 231.3 with 1 everywhere vs 226.8 with 0; gpt-oss
// 458.2 with 0 (batched cp.async staging of the float x, 445.5 / 229.6, was
// deleted in session 7; x packed in fp16 by its producer, XR = 2 / 3, in
// session 8).
static inline int gemv5_stage_mode(int64_t k) {
  const int e = gemv5_xr_env();
  return e >= 0 ? e : k >= 8192 ? 1 : 0;
}
// ORCH_CUDA_GEMV5_STAGGER (read once; words, any order): XR = 3 (x staged once, rounds staggered by warp), where
// gemv5_stage_mode says x once (k < 8192, or ORCH_CUDA_GEMV5_XR=0), for "oproj": the norm fold's producer (Llama's
// out projection); "qkv": the fold's merged consumers (q/k/v); "0": none. Unset: oproj,qkv. One token only, where the GEMV has two rounds
// or more (gemv5_sg_ok: staggering a one-round GEMV, gpt-oss's q/k/v at k = 2880, adds a round). Session 16 (H100, same
// call, Llama tg128): run 9 — default 307.8 / 307.7, qkv 311.2, down (the producer at k = 14336) 305.5, down +
// oproj 307.4, down + qkv 309.2, all three 311.3; gpt-oss's q/k/v (one round) 683.1 vs 687.5 / 687.4; run 10 —
// default 307.7 / 307.5, qkv 311.2 / 311.3, qkv + oproj 312.4, all three 310.8; run 11 (the default since) 312.5 /
// 312.5 vs 307.4 off, with the gate/up fold staggered too 286.1 (its XR 3 kernel spilled; deleted with "down").
// Trace (run 13, µs a layer, default vs off): attention 6.7 vs 8.4, out projection 6.8 vs 5.7, down 24.7 vs 25.7,
// q/k/v 10.3 vs 10.3, gate/up 44.7 vs 44.9: the layer 93.2 vs 94.8.
enum { GEMV5_SG_OPROJ = 1, GEMV5_SG_QKV = 2 };
static inline int gemv5_stagger_env() {
  static const int v = [] {
    const char *e = getenv("ORCH_CUDA_GEMV5_STAGGER");
    if (!e || !*e) return GEMV5_SG_OPROJ | GEMV5_SG_QKV;
    return (strstr(e, "oproj") ? GEMV5_SG_OPROJ : 0) | (strstr(e, "qkv") ? GEMV5_SG_QKV : 0);
  }();
  return v;
}
// Whether the one-token GEMV of k with NB blocks a lane per round runs more than one round and
// ORCH_CUDA_GEMV5_STAGGER has `what` (two tokens: not measured, and their staggered q/k/v kernel spills).
static inline bool gemv5_sg_ok(int what, int64_t n, int64_t k, int nb) {
  return n == 1 && (gemv5_stagger_env() & what) && k / 32 > 32 * nb;
}

// XR: gemv5_kernel's staging (0 once, 1 per round), TR: the trace
// (orch_gemv_trace).
template <int T, int NT, int XR, int TR = 0>
static void launch_gemv5_nt_x(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias,
                              int64_t n, int64_t k, int64_t m, int64_t rb, int acc) {
  constexpr int NB = gemv5_nb<T, NT>();
  const int rpw = gemv5_rpw(m);
  const size_t sm = gemv5_smem(k, NT);
  gemv5_with_w<T, (NT <= 2 && !TR)>(gemv5_warps<T>(k, NT, rpw == 1), [&](auto wc) {
    constexpr int W = decltype(wc)::value;
    auto kern = gemv5_kernel<T, NT, NB, XR, TR, W>;
    if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    unsigned gx = (unsigned)ceil_div(m, (int64_t)W * rpw);
    ORCH_GEMV_CARVEOUT(kern);
    DEC16_LAUNCH_PDL(kern, dim3(gx), W * 32, sm, st, y, x, w, bias, n, k, m, rb, acc, rpw);
  });
}
template <int T, int NT>
static void launch_gemv5_nt(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias, int64_t n,
                            int64_t k, int64_t m, int64_t rb, int acc) {
  const int mode = gemv5_stage_mode(k);
#if !defined(ORCH_EMU)
  if constexpr (NT == 1 && T == ORCH_T_Q8_0)
    if (g_gemv_trace_on) {
      if (mode == 1) return launch_gemv5_nt_x<T, NT, 1, 1>(st, y, x, w, bias, n, k, m, rb, acc);
      return launch_gemv5_nt_x<T, NT, 0, 1>(st, y, x, w, bias, n, k, m, rb, acc);
    }
#endif
  if constexpr (NT <= 2)
    if (mode == 1) return launch_gemv5_nt_x<T, NT, 1>(st, y, x, w, bias, n, k, m, rb, acc);
  launch_gemv5_nt_x<T, NT, 0>(st, y, x, w, bias, n, k, m, rb, acc);
}

// P's rows per warp (gemv5_rpw) for its count parts: the largest.
static inline int gemv5_parts_rpw(gemv5_parts &P, int count) {
  int r = 1;
  for (int p = 0; p < count; p++) {
    P.rpw[p] = gemv5_rpw(P.m[p]);
    if (P.rpw[p] > r) r = P.rpw[p];
  }
  return r;
}
// P.end for CTAs of w warps (after gemv5_parts_rpw); returns the CTA count.
static inline unsigned gemv5_parts_end(gemv5_parts &P, int count, int w) {
  unsigned total = 0;
  for (int p = 0; p < count; p++) {
    total += (unsigned)ceil_div(P.m[p], (int64_t)w * P.rpw[p]);
    P.end[p] = total;
  }
  for (int p = count; p < GEMV_MAX_PARTS; p++) P.end[p] = total; // never selected
  return total;
}

// P: count parts filled in (w, bias, y, m); rpw and end are set here. XR as
// launch_gemv5_nt_x, TR: the trace.
template <int T, int NT, int XR, int TR = 0>
static void launch_gemv5_multi_nt_x(cudaStream_t st, gemv5_parts P, int count, const float *x, int64_t n, int64_t k,
                                    int64_t rb) {
  constexpr int NB = gemv5_nb<T, NT>();
  const size_t sm = gemv5_smem(k, NT);
  gemv5_with_w<T, (NT <= 2 && !TR)>(gemv5_warps<T>(k, NT, gemv5_parts_rpw(P, count) == 1), [&](auto wc) {
    constexpr int W = decltype(wc)::value;
    auto kern = gemv5_multi_kernel<T, NT, NB, XR, TR, W>;
    if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    const unsigned total = gemv5_parts_end(P, count, W);
    ORCH_GEMV_CARVEOUT(kern);
    DEC16_LAUNCH_PDL(kern, dim3(total), W * 32, sm, st, P, x, n, k, rb);
  });
}
template <int T, int NT>
static void launch_gemv5_multi_nt(cudaStream_t st, gemv5_parts P, int count, const float *x, int64_t n, int64_t k,
                                  int64_t rb) {
  if constexpr (NT <= 2)
    if (gemv5_stage_mode(k) == 1) return launch_gemv5_multi_nt_x<T, NT, 1>(st, P, count, x, n, k, rb);
  launch_gemv5_multi_nt_x<T, NT, 0>(st, P, count, x, n, k, rb);
}

template <int T>
static void launch_gemv5_multi(cudaStream_t st, const gemv5_parts &P, int count, const float *x, int64_t n, int64_t k,
                               int64_t rb) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4 || T == ORCH_T_Q8_0R) {
    if (n == 1) launch_gemv5_multi_nt<T, 1>(st, P, count, x, n, k, rb);
    else if (n == 2) launch_gemv5_multi_nt<T, 2>(st, P, count, x, n, k, rb);
    else if (n <= 4) launch_gemv5_multi_nt<T, 4>(st, P, count, x, n, k, rb);
    else launch_gemv5_multi_nt<T, 8>(st, P, count, x, n, k, rb);
  }
}

template <int T>
static void launch_gemv5(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias, int64_t n,
                         int64_t k, int64_t m, int64_t rb, int acc) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4 || T == ORCH_T_Q8_0R) {
    if (n == 1) launch_gemv5_nt<T, 1>(st, y, x, w, bias, n, k, m, rb, acc);
    else if (n == 2) launch_gemv5_nt<T, 2>(st, y, x, w, bias, n, k, m, rb, acc);
    else if (n <= 4) launch_gemv5_nt<T, 4>(st, y, x, w, bias, n, k, m, rb, acc);
    else launch_gemv5_nt<T, 8>(st, y, x, w, bias, n, k, m, rb, acc);
  }
}

// The folded norm (gemv5_nf), n = 1, 2 on v5's route (the caller checks; the producer's m < 32768: one row per
// warp). Producer: F.res, F.w, F.xt, F.ss (n * ceil(m / 8) floats); x staged as gemv5_stage_mode says.
template <int T>
static void launch_gemv5_nf_prod(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias,
                                 int64_t n, int64_t k, int64_t m, int64_t rb, const gemv5_nf &F) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4 || T == ORCH_T_Q8_0R) {
    const int mode = gemv5_stage_mode(k);
    auto go = [&](auto nt, auto xr) {
      constexpr int NT = decltype(nt)::value, XR = decltype(xr)::value;
      constexpr int NB = gemv5_nb<T, NT>();
      gemv5_with_w<T>(gemv5_warps<T>(k, NT, true), [&](auto wc) {
        constexpr int W = decltype(wc)::value;
        const size_t sm = gemv5_smem(k, NT) + gemv5_nf_smem(NT, 0, W);
        auto kern = gemv5_nf_kernel<T, NT, NB, XR, W>;
        if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
        ORCH_GEMV_CARVEOUT(kern);
        DEC16_LAUNCH_PDL(kern, dim3((unsigned)ceil_div(m, (int64_t)W)), W * 32, sm, st, y, x, w, bias, n, k, m, rb,
                         F);
      });
    };
    using I0 = std::integral_constant<int, 0>;
    using I1 = std::integral_constant<int, 1>;
    using I2 = std::integral_constant<int, 2>;
    using I3 = std::integral_constant<int, 3>;
    if (mode == 0 && gemv5_sg_ok(GEMV5_SG_OPROJ, n, k, gemv5_nb<T, 1>())) go(I1{}, I3{});
    else if (n == 1) mode == 1 ? go(I1{}, I1{}) : go(I1{}, I0{});
    else mode == 1 ? go(I2{}, I1{}) : go(I2{}, I0{});
  }
}
// Consumer, merged parts (rpw and end set here, as launch_gemv5_multi_nt_x): F.ss, F.nss, F.eps. xr: as
// launch_gemv5_glu.
template <int T>
static void launch_gemv5_multi_nf(cudaStream_t st, gemv5_parts P, int count, const float *x, int64_t n, int64_t k,
                                  int64_t rb, const gemv5_nf &F, int xr = -1) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4 || T == ORCH_T_Q8_0R) {
    const bool one_row = gemv5_parts_rpw(P, count) == 1;
    const int mode = xr < 0 ? gemv5_stage_mode(k) : xr;
    auto go = [&](auto nt, auto xr) {
      constexpr int NT = decltype(nt)::value, XR = decltype(xr)::value;
      constexpr int NB = gemv5_nb<T, NT>();
      gemv5_with_w<T>(gemv5_warps<T>(k, NT, one_row), [&](auto wc) {
        constexpr int W = decltype(wc)::value;
        const unsigned total = gemv5_parts_end(P, count, W);
        const size_t sm = gemv5_smem(k, NT) + gemv5_nf_smem(NT, F.nss);
        auto kern = gemv5_multi_nf_kernel<T, NT, NB, XR, W>;
        if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
        ORCH_GEMV_CARVEOUT(kern);
        DEC16_LAUNCH_PDL(kern, dim3(total), W * 32, sm, st, P, x, n, k, rb, F);
      });
    };
    using I0 = std::integral_constant<int, 0>;
    using I1 = std::integral_constant<int, 1>;
    using I2 = std::integral_constant<int, 2>;
    using I3 = std::integral_constant<int, 3>;
    if (xr < 0 && mode == 0 && one_row && gemv5_sg_ok(GEMV5_SG_QKV, n, k, gemv5_nb<T, 1>())) go(I1{}, I3{});
    else if (n == 1) mode == 1 ? go(I1{}, I1{}) : go(I1{}, I0{});
    else mode == 1 ? go(I2{}, I1{}) : go(I2{}, I0{});
  }
}

// ---- GEMV v5 + SwiGLU (orch_matmul_swiglu; session 6) ----
// Llama's feed-forward runs gate = x.Wg, up = x.Wu (one orch_matmul_multi
// launch) and then SwiGLU(gate, up) as its own launch: a kernel boundary
// (PDL wait + tail, ~3 us measured per boundary in session 5) and a round
// trip of 2 x m floats per token. Here each warp owns gate row r AND up row r:
// per round it loads NB blocks of both rows (both in flight), computes them
// against the one staged x, and lane 0 writes gate, up and
// out = silu(gate) * up. Half as many CTAs as the merged launch, so x is
// staged half as often.
// Bit-identity: each row's sum is exactly gemv5_rows's (per lane the blocks
// c = lane, lane + 32, ... in increasing order whatever NB, then warp_sum,
// then + bias); out is act.cu swiglu_kernel's expression on those floats
// (gemv5_silu_mul below; keep the two the same).
__device__ __forceinline__ float gemv5_silu_mul(float g, float u) { return g / (1.f + expf(-g)) * u; }

struct gemv5_glu_args {
  const uint8_t *wg, *wu;
  const float *bg, *bu;
  float *yg, *yu, *out; // yg / yu: the gate / up outputs as orch_matmul writes them; out may alias either
  int64_t m;
};

// One round of one row: gemv5_rows's inner loop (a function of its own: a
// ternary reference between the gate and up blocks sent them to local memory).
template <int T, int NT, int NB>
__device__ __forceinline__ void gemv5_glu_round(const wblocks<T, NB> &b, float (&acc)[NT], const uint32_t *xsm,
                                                const float *xinv, int64_t c0, int lane, int64_t nch, int nt) {
#pragma unroll
  for (int i = 0; i < NB; i++) {
    const int64_t c = c0 + lane + 32 * i;
    if (c < nch) {
      const uint4 *xp[NT];
      uint32_t a[NT][2];
#pragma unroll
      for (int j = 0; j < NT; j++) {
        xp[j] = reinterpret_cast<const uint4 *>(xsm + ((j < nt ? j : 0) * nch + c) * DEC16_XW);
        a[j][0] = a[j][1] = 0u;
      }
      dec16_block_acc<T, NT>(b.w[i], b.sh[i], xp, nt, a);
      const float ws = dec16_wscale<T>(b.w[i], b.sh[i]);
#pragma unroll
      for (int j = 0; j < NT; j++)
        if (j < nt) acc[j] += dec16_fold(a[j], ws, xinv[j * nch + c]);
    }
  }
}

// NF 2: the folded norm's consumer (gemv5_nf: F.ss, F.nss, F.eps; orch_matmul_swiglu_nf).
template <int T, int NT, int NB, int XR = 0, int NF = 0, int W = GEMV16_WARPS>
__global__ void __launch_bounds__(W * 32, gemv5_minb<W>(4)) // <= 64 registers: 4 CTAs per SM (XR = 1 took 70)
gemv5_glu_kernel(const gemv5_glu_args A, const float *__restrict__ x, int64_t n, int64_t k, int64_t row_bytes,
                 const gemv5_nf F) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nt = (int)min((int64_t)NT, n);
  const int64_t nch = k / 32;
  float *xinv = reinterpret_cast<float *>(xsm + nt * nch * DEC16_XW);
  float *nfsh = gemv5_nf_sh(xsm, nch, NT);
  float nfsc[NT]; // NF 2: the tokens' scales
  bool nfscd = false;
  const int64_t row = (int64_t)blockIdx.x * W + warp;
  const bool valid = row < A.m;
  const uint8_t *wg = A.wg + (valid ? row : 0) * row_bytes, *wu = A.wu + (valid ? row : 0) * row_bytes;
  float accg[NT], accu[NT];
#pragma unroll
  for (int j = 0; j < NT; j++) accg[j] = accu[j] = 0.f;
  for (int64_t c0 = 0; c0 < nch; c0 += 32 * NB) {
    wblocks<T, NB> bg, bu;
    ffn_load<T, NB>(bg, wg, c0, lane, nch, valid);
    ffn_load<T, NB>(bu, wu, c0, lane, nch, valid);
    if constexpr (XR == 1) { // every round (gemv5_rows XR)
      if (c0 == 0) {
        pdl_wait();
        if constexpr (NF == 2) gemv5_nf_issue(F, nt, nfsh);
      }
      gemv5_stage_range(xsm, xinv, x, nt, k, dec16_traits<T>::kind, c0, min(c0 + 32 * NB, nch));
      if constexpr (NF == 2)
        if (c0 == 0) gemv5_nf_wait();
      __syncthreads();
    } else if (c0 == 0) { // uniform over the CTA
      pdl_wait();
      if constexpr (NF == 2) gemv5_nf_issue(F, nt, nfsh);
      dec16_stage(xsm, xinv, x, nt, k, dec16_traits<T>::kind);
      if constexpr (NF == 2) gemv5_nf_wait();
      __syncthreads();
    }
    if constexpr (NF == 2)
      if (c0 > 0 && !nfscd) { // this round's loads in flight (uniform)
        gemv5_nf_scales<NT>(nfsc, nfsh, nt, F.nss, k, F.eps);
        nfscd = true;
      }
    gemv5_glu_round<T, NT, NB>(bg, accg, xsm, xinv, c0, lane, nch, nt);
    gemv5_glu_round<T, NT, NB>(bu, accu, xsm, xinv, c0, lane, nch, nt);
  }
  if constexpr (NF == 2)
    if (!nfscd) gemv5_nf_scales<NT>(nfsc, nfsh, nt, F.nss, k, F.eps); // one round only
#pragma unroll
  for (int j = 0; j < NT; j++) {
    float g = warp_sum(accg[j]), u = warp_sum(accu[j]);
    if constexpr (NF == 2) {
      g *= nfsc[j];
      u *= nfsc[j];
    }
    if (lane == 0 && j < nt && valid) {
      if (A.bg) g += A.bg[row];
      if (A.bu) u += A.bu[row];
      const int64_t o = j * A.m + row;
      A.yg[o] = g;
      A.yu[o] = u;
      A.out[o] = gemv5_silu_mul(g, u);
    }
  }
}

// NB per matrix: v5's NB for Q8_0 at one token is 3; two rows of 3 blocks
// would hold ~60 words of weights per lane, so 2 each (4 blocks in flight:
// 64 registers, 4 CTAs per SM as v5); Q8_0 at two tokens 1 each (NB 2 took
// 77 registers: 3 CTAs per SM).
template <int T, int NT> constexpr int gemv5_glu_nb() { return q8_like<T>() && NT > 1 ? 1 : 2; }

template <int T, int NT, int XR, int NF = 0>
static void launch_gemv5_glu_nt(cudaStream_t st, const gemv5_glu_args &A, const float *x, int64_t n, int64_t k,
                                int64_t rb, const gemv5_nf &F) {
  constexpr int NB = gemv5_glu_nb<T, NT>();
  const size_t sm = gemv5_smem(k, NT) + (NF ? gemv5_nf_smem(NT, F.nss) : 0);
  gemv5_with_w<T>(gemv5_warps<T>(k, NT, true), [&](auto wc) {
    constexpr int W = decltype(wc)::value;
    auto kern = gemv5_glu_kernel<T, NT, NB, XR, NF, W>;
    if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    const unsigned gx = (unsigned)ceil_div(A.m, (int64_t)W);
    ORCH_GEMV_CARVEOUT(kern);
    DEC16_LAUNCH_PDL(kern, dim3(gx), W * 32, sm, st, A, x, n, k, rb, F);
  });
}

// n = 1, 2 (v5's one- and two-token route); the caller checks. xr: how x is
// staged (gemv5_rows's XR: 0, 1), -1: as gemv5_stage_mode. nf: the folded
// norm's consumer (x = xt; F.ss, F.nss, F.eps).
template <int T>
static void launch_gemv5_glu(cudaStream_t st, const gemv5_glu_args &A, const float *x, int64_t n, int64_t k,
                             int64_t rb, int xr = -1, const gemv5_nf *nf = nullptr) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4 || T == ORCH_T_Q8_0R) {
    const int mode = xr < 0 ? gemv5_stage_mode(k) : xr;
    const gemv5_nf F = nf ? *nf : gemv5_nf{};
    auto go = [&](auto nt) {
      constexpr int NT = decltype(nt)::value;
      if (nf) {
        if (mode == 1) launch_gemv5_glu_nt<T, NT, 1, 2>(st, A, x, n, k, rb, F);
        else launch_gemv5_glu_nt<T, NT, 0, 2>(st, A, x, n, k, rb, F);
      } else if (mode == 1) launch_gemv5_glu_nt<T, NT, 1>(st, A, x, n, k, rb, F);
      else launch_gemv5_glu_nt<T, NT, 0>(st, A, x, n, k, rb, F);
    };
    if (n == 1) go(std::integral_constant<int, 1>{});
    else go(std::integral_constant<int, 2>{});
  }
}

// v6 GEMV (opt-in: ORCH_CUDA_GEMV=v6): v5's arithmetic, but a grid of at
// most one wave of CTAs whose warps stride over the rows, with the work items
// (row, round of NB blocks per lane) double-buffered: the next item's weight
// words are loaded before the current one is computed. v4/v5 load a row,
// then compute it, so each warp (and, for m of a few thousand rows, each of
// ~1.2 waves of CTAs) pays a DRAM latency per row in series with its compute.
template <int T, int NT, int NB>
__global__ void __launch_bounds__(GEMV16_WARPS * 32, 2)
gemv6_kernel(float *__restrict__ y, const float *__restrict__ x, const uint8_t *__restrict__ w,
             const float *__restrict__ bias, int64_t n, int64_t k, int64_t m, int64_t row_bytes, int accumulate) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nt = (int)min((int64_t)NT, n);
  const int64_t nch = k / 32;
  float *xinv = reinterpret_cast<float *>(xsm + nt * nch * DEC16_XW);
  const int64_t gw = (int64_t)blockIdx.x * GEMV16_WARPS + warp, nw = (int64_t)gridDim.x * GEMV16_WARPS;
  const int rounds = (int)((nch + 32 * NB - 1) / (32 * NB));
  // Rows of this warp x rounds: < 2^31 for any weight that fits a GPU (m rows of >= 17 bytes each).
  const int items = gw < m ? (int)((m - gw + nw - 1) / nw) * rounds : 0;
  auto load = [&](wblocks<T, NB> &b, int it) {
    const int64_t row = gw + (it / rounds) * nw;
    const bool valid = it < items;
    ffn_load<T, NB>(b, w + (valid ? row : 0) * row_bytes, (int64_t)(it % rounds) * 32 * NB, lane, nch, valid);
  };
  wblocks<T, NB> b0, b1;
  pdl_trigger();
  load(b0, 0); // weights only (never written while a step runs): before the PDL wait
  pdl_wait();
  dec16_stage(xsm, xinv, x, nt, k, dec16_traits<T>::kind);
  __syncthreads();
  float acc[NT];
#pragma unroll
  for (int j = 0; j < NT; j++) acc[j] = 0.f;
  auto compute = [&](const wblocks<T, NB> &b, int it) {
    const int64_t c0 = (int64_t)(it % rounds) * 32 * NB;
#pragma unroll
    for (int i = 0; i < NB; i++) {
      const int64_t c = c0 + lane + 32 * i;
      if (c < nch) {
        const uint4 *xp[NT];
        uint32_t a[NT][2];
#pragma unroll
        for (int j = 0; j < NT; j++) {
          xp[j] = reinterpret_cast<const uint4 *>(xsm + ((j < nt ? j : 0) * nch + c) * DEC16_XW);
          a[j][0] = a[j][1] = 0u;
        }
        dec16_block_acc<T, NT>(b.w[i], b.sh[i], xp, nt, a);
        const float ws = dec16_wscale<T>(b.w[i], b.sh[i]);
#pragma unroll
        for (int j = 0; j < NT; j++)
          if (j < nt) acc[j] += dec16_fold(a[j], ws, xinv[j * nch + c]);
      }
    }
    if (it % rounds == rounds - 1) { // the row is done (uniform over the warp)
      const int64_t row = gw + (it / rounds) * nw;
#pragma unroll
      for (int j = 0; j < NT; j++) {
        float s = warp_sum(acc[j]);
        acc[j] = 0.f;
        if (lane == 0 && j < nt) {
          if (bias) s += bias[row];
          float *yp = y + j * m + row;
          *yp = accumulate ? *yp + s : s;
        }
      }
    }
  };
  for (int it = 0; it < items; it += 2) {
    load(b1, it + 1);
    compute(b0, it);
    if (it + 1 < items) {
      load(b0, it + 2);
      compute(b1, it + 1);
    }
  }
}

template <int T, int NT>
static void launch_gemv6_nt(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias, int64_t n,
                            int64_t k, int64_t m, int64_t rb, int acc) {
  constexpr int NB = T == ORCH_T_Q8_0 ? 2 : 3;
  size_t sm = dec16_smem(k, NT);
  if (sm > 48 * 1024) cudaFuncSetAttribute(gemv6_kernel<T, NT, NB>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
  // At most one wave: resident CTAs per SM x SMs (queried once per process and instantiation).
  static int per_sm = 0, sms = 0;
  if (per_sm == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemv6_kernel<T, NT, NB>, GEMV16_WARPS * 32, sm);
    if (per_sm < 1) per_sm = 1;
    if (sms < 1) sms = 1;
  }
  const int64_t gx = min(ceil_div(m, (int64_t)GEMV16_WARPS), (int64_t)per_sm * sms);
  auto kern = gemv6_kernel<T, NT, NB>;
  DEC16_LAUNCH_PDL(kern, dim3((unsigned)gx), GEMV16_WARPS * 32, sm, st, y, x, w, bias, n, k, m, rb, acc);
}

template <int T>
static void launch_gemv6(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias, int64_t n,
                         int64_t k, int64_t m, int64_t rb, int acc) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4) {
    if (n == 1) launch_gemv6_nt<T, 1>(st, y, x, w, bias, n, k, m, rb, acc);
    else if (n == 2) launch_gemv6_nt<T, 2>(st, y, x, w, bias, n, k, m, rb, acc);
    else if (n <= 4) launch_gemv6_nt<T, 4>(st, y, x, w, bias, n, k, m, rb, acc);
    else launch_gemv6_nt<T, 8>(st, y, x, w, bias, n, k, m, rb, acc);
  }
}


// ---- GEMV v7 (opt-in: ORCH_CUDA_GEMV=v7; Q8_0 / Q4_0 / MXFP4, n <= 8,
// below 32768 rows): tensor cores. v5 at n = 8 is compute-bound (38.6 us
// for Q8_0 2880x5120, 14% of its floor): per block a lane decodes once but
// runs 8 x 16 HFMA2 and 8 folds, and every CTA of 8 rows re-stages all 8
// rows of x. Here:
//  1. gemv7_stage_kernel stages x once per call into global scratch in
//     dec16's layout (fp16 pairs in decoder order, power-of-two scale per
//     chunk; 16 words per (token, chunk)) with the chunk scales transposed
//     (xinv[chunk][8 tokens]);
//  2. gemv7_kernel: a CTA = 16 rows x all of k; its 8 warps split the blocks
//     (NB consecutive blocks per warp per round). In one block, lane (g, t)
//     decodes pairs 4t..4t+3 of rows g and g+8 (dec16's decoders: MXFP4 /
//     Q4_0 word t, Q8_0 words 2t, 2t+1) — exactly the A fragments of two
//     m16n8k16 mmas (pairs 4t, 4t+1 at k = 2t(+1), 2t+8(+9) of the first,
//     4t+2, 4t+3 of the second) — and reads B = staged uint4 t of token g
//     (the same pairs of x). D (fp32, products exact) is folded per block
//     with the weight scales of rows g, g+8 and the chunk scales of tokens
//     2t, 2t+1; the 8 warps' partial sums are added in a fixed order.
// Error: only the fp16 rounding of x (~2e-4 relative; v5 ~4.5e-4).

constexpr int GEMV7_WARPS = 8, GEMV7_NB = 2;

// Bytes of one block a lane (t) of a quad needs: the scale and quant bytes
// [QOFF + Q t, QOFF + Q (t+1)).
template <int T> struct q7_traits;
template <> struct q7_traits<ORCH_T_MXFP4> { static constexpr int QOFF = 1, Q = 4, S = 1; };
template <> struct q7_traits<ORCH_T_Q4_0> { static constexpr int QOFF = 2, Q = 4, S = 2; };
template <> struct q7_traits<ORCH_T_Q8_0> { static constexpr int QOFF = 2, Q = 8, S = 2; };

// The aligned 32-bit words holding those bytes. Only words that hold at least
// one byte of the block are read (a word past a block's quant bytes only when
// they are not word-aligned), so a read never passes the word holding the
// weight's last byte.
template <int T> struct q7_words {
  uint32_t s0, s1, q[q7_traits<T>::Q / 4 + 1];
  uint32_t sh_s, sh_q;
};

template <int T>
__device__ __forceinline__ void q7_load(q7_words<T> &b, const uint8_t *blk, int t, bool ok) {
  constexpr int QOFF = q7_traits<T>::QOFF, Q = q7_traits<T>::Q, S = q7_traits<T>::S;
  const uintptr_t p = (uintptr_t)blk;
  b.sh_s = (uint32_t)(p & 3);
  const uint32_t *ws = reinterpret_cast<const uint32_t *>(p & ~(uintptr_t)3);
  b.s0 = ok ? __ldg(ws) : 0u;
  b.s1 = ok && b.sh_s + S > 4 ? __ldg(ws + 1) : 0u;
  const uintptr_t a = p + QOFF + (uintptr_t)(Q * t);
  b.sh_q = (uint32_t)(a & 3);
  const uint32_t *wq = reinterpret_cast<const uint32_t *>(a & ~(uintptr_t)3);
#pragma unroll
  for (int j = 0; j < Q / 4; j++) b.q[j] = ok ? __ldg(wq + j) : 0u;
  b.q[Q / 4] = ok && b.sh_q ? __ldg(wq + Q / 4) : 0u;
}

// Pairs 4t..4t+3 of the block (h[i] = pair 4t+i, dec16's order) and its scale.
template <int T>
__device__ __forceinline__ float q7_decode(const q7_words<T> &b, uint32_t h[4]) {
  const uint32_t q0 = dec16_funnel_rc(b.q[0], b.q[1], 8 * b.sh_q);
  if constexpr (T == ORCH_T_MXFP4) {
    dec16_mxfp4_word(q0, h);
    return dec16_e8m0((b.s0 >> (8 * b.sh_s)) & 0xFFu);
  } else {
    if constexpr (T == ORCH_T_Q8_0) {
      dec16_q8_0_word(q0, h);
      dec16_q8_0_word(dec16_funnel_rc(b.q[1], b.q[2], 8 * b.sh_q), h + 2);
    } else {
      dec16_q4_0_word(q0, h);
    }
    return dec16_h2f((uint16_t)(dec16_funnel_rc(b.s0, b.s1, 8 * b.sh_s) & 0xFFFFu));
  }
}

// x [n, k] (n <= xst) -> xs[(tok * nch + c) * 16 words] (dec16 pair order for
// kind), xinv[c * xst + tok] (v7: xst = 8; v9: 8 per token tile). One thread
// per float4; 8 consecutive threads own a chunk (k % 32 == 0, so chunks never
// straddle a warp).
static __global__ void __launch_bounds__(256) // static: gemv16.cuh is included by matmul.cu and moe_ffn.cu (moe_oproj.cuh)
gemv7_stage_kernel(uint32_t *__restrict__ xs, float *__restrict__ xinv, const float *__restrict__ x, int64_t n,
                   int64_t k, int kind, int xst) {
  pdl_trigger();
  pdl_wait();
  const int64_t nq = k / 4, nch = k / 32;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const bool ok = i < n * nq;
  const float4 v = ok ? __ldg(reinterpret_cast<const float4 *>(x) + i) : make_float4(0.f, 0.f, 0.f, 0.f);
  uint32_t mx = max(max(dec16_absbits(v.x), dec16_absbits(v.y)), max(dec16_absbits(v.z), dec16_absbits(v.w)));
  mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
  float s, inv;
  dec16_chunk_scale(mx, s, inv);
  if (ok) {
    const int64_t tok = i / nq, q = i % nq, c = q >> 3;
    const int o = (int)(q & 7);
    dec16_put4(xs + (tok * nch + c) * 16, kind, o, v.x * s, v.y * s, v.z * s, v.w * s);
    if (o == 0) xinv[c * xst + tok] = inv;
  }
}

// Rows [16 cta, 16 cta + 16) of y (gemv7_kernel: cta = blockIdx.x) by W
// warps splitting k, one round of loads in flight. (v8, two rounds in flight
// with 4-warp CTAs, measured slower and was deleted in session 5.)
// red: W x 32 lanes x 4 floats of shared memory.
// NF (gemv5_nf, session 8): 0 plain; 1 the folded norm's producer (cta = blockIdx.x, accumulate 0: the reducing
// thread of (row, token) adds y into res, writes xt, and the CTA writes two partial sums of squares per token,
// rows 0-7 and 8-15, into slots 2 cta and 2 cta + 1: the same m / 8 slots as v5's producer); 2 its consumer (x
// staged from xt; outputs scaled before the bias). nf: shared memory after red (16 x 8 floats for the producer,
// the n x nss partials for the consumer) and 8 token scales.
template <int T, int W, int NF = 0>
__device__ __forceinline__ void gemv7_rows(float *red, int64_t cta, float *__restrict__ y, const uint4 *__restrict__ xs,
                                           const float *__restrict__ xinv, const uint8_t *__restrict__ w,
                                           const float *__restrict__ bias, int64_t n, int64_t k, int64_t m,
                                           int64_t row_bytes, int accumulate, const gemv5_nf &F = gemv5_nf{}) {
  constexpr int NB = GEMV7_NB, BB = type_block_bytes(T);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int nt = (int)min((int64_t)8, n);
  const int64_t nch = k / 32;
  const int64_t r0 = cta * 16 + g, r1 = r0 + 8;
  const bool ok0 = r0 < m, ok1 = r1 < m;
  const uint8_t *w0 = w + (ok0 ? r0 : 0) * row_bytes, *w1 = w + (ok1 ? r1 : 0) * row_bytes;
  // A round's loads: the words of NB blocks of rows g and g+8 and the staged
  // x of those blocks. Run 4 measured v7 flat in n (~12 us for Q8_0
  // 2880x5120 at n = 1..8): each warp walks its ~6 rounds load, wait,
  // compute — one DRAM latency per round (v8's two rounds in flight, 4-warp
  // CTAs, did not pay: deleted).
  struct round_buf {
    q7_words<T> b0[NB], b1[NB];
    uint4 X[NB];
    float xi0[NB], xi1[NB];
  };
  auto load_w = [&](round_buf &r, int64_t c0) {
#pragma unroll
    for (int i = 0; i < NB; i++) {
      const int64_t c = c0 + warp * NB + i;
      const bool okc = c < nch;
      q7_load<T>(r.b0[i], w0 + (okc ? c : 0) * BB, t, ok0 && okc);
      q7_load<T>(r.b1[i], w1 + (okc ? c : 0) * BB, t, ok1 && okc);
    }
  };
  // The staged x of the round's blocks, issued with the weight words (one
  // latency per round, not one per dependent load).
  auto load_x = [&](round_buf &r, int64_t c0) {
#pragma unroll
    for (int i = 0; i < NB; i++) {
      const int64_t c = c0 + warp * NB + i;
      const bool okc = c < nch;
      r.X[i] = okc && g < nt ? __ldg(xs + (g * nch + c) * 4 + t) : make_uint4(0u, 0u, 0u, 0u);
      r.xi0[i] = okc && 2 * t < nt ? __ldg(xinv + c * 8 + 2 * t) : 0.f;
      r.xi1[i] = okc && 2 * t + 1 < nt ? __ldg(xinv + c * 8 + 2 * t + 1) : 0.f;
    }
  };
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  auto compute = [&](const round_buf &r, int64_t c0) {
#pragma unroll
    for (int i = 0; i < NB; i++) {
      const int64_t c = c0 + warp * NB + i;
      if (c < nch) { // uniform over the warp: every lane reaches the mma
        uint32_t ha[4], hb[4];
        const float s0 = q7_decode<T>(r.b0[i], ha), s1 = q7_decode<T>(r.b1[i], hb);
        const uint4 Xi = r.X[i];
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        const uint32_t a0[4] = {ha[0], hb[0], ha[1], hb[1]}, bx0[2] = {Xi.x, Xi.y};
        dec16_mma16816(d, a0, bx0);
        const uint32_t a1[4] = {ha[2], hb[2], ha[3], hb[3]}, bx1[2] = {Xi.z, Xi.w};
        dec16_mma16816(d, a1, bx1);
        acc[0] += s0 * r.xi0[i] * d[0];
        acc[1] += s0 * r.xi1[i] * d[1];
        acc[2] += s1 * r.xi0[i] * d[2];
        acc[3] += s1 * r.xi1[i] * d[3];
      }
    }
  };
  constexpr int64_t STEP = W * NB;
  round_buf ra;
  float *nfsh = red + W * 32 * 4 + 8; // NF: after red and the 8 token scales (16-byte aligned)
  float *nfsc = red + W * 32 * 4;
  float nfres = 0.f, nfw = 0.f; // NF 1: the reducing thread's res and norm weight
  // PDL: the first round of weight words (never written while a step runs)
  // is loaded before the wait; the staged x only after it.
  load_w(ra, 0);
  pdl_wait();
  load_x(ra, 0);
  if constexpr (NF == 1)
    if (threadIdx.x < 128) {
      const int64_t R = cta * 16 + (threadIdx.x >> 3);
      const int tok = threadIdx.x & 7;
      if (R < m && tok < nt) nfres = F.res[tok * m + R], nfw = F.w[R];
    }
  if constexpr (NF == 2) gemv5_nf_issue(F, nt, nfsh);
  for (int64_t c0 = 0; c0 < nch; c0 += STEP) {
    if (c0) {
      load_w(ra, c0);
      load_x(ra, c0);
    }
    compute(ra, c0);
  }
  float *rw = red + (warp * 32 + lane) * 4;
#pragma unroll
  for (int e = 0; e < 4; e++) rw[e] = acc[e];
  if constexpr (NF == 2) {
    gemv5_nf_wait();
    __syncthreads();
    if (warp < nt) { // warp j: token j's scale
      const float sc = gemv5_nf_scale(nfsh, warp, F.nss, k, F.eps);
      if (lane == 0) nfsc[warp] = sc;
    }
  }
  __syncthreads();
  float nfq = 0.f; // NF 1: res^2 of this thread's (row, token)
  if (threadIdx.x < 128) { // (row, token) = D element e of lane l, summed over the warps in order
    const int row = threadIdx.x >> 3, tok = threadIdx.x & 7;
    const int l = (row & 7) * 4 + (tok >> 1), e = (row >> 3) * 2 + (tok & 1);
    float s = 0.f;
    for (int v = 0; v < W; v++) s += red[(v * 32 + l) * 4 + e];
    const int64_t R = cta * 16 + row;
    if (R < m && tok < nt) {
      if constexpr (NF == 2) s *= nfsc[tok];
      if (bias) s += bias[R];
      float *yp = y + tok * m + R;
      *yp = accumulate ? *yp + s : s;
      if constexpr (NF == 1) {
        const float rn = nfres + s;
        F.res[tok * m + R] = rn;
        F.xt[tok * m + R] = rn * nfw;
        nfq = rn * rn;
      }
    }
  }
  if constexpr (NF == 1) { // the two partial sums of squares per token: rows 0-7, 8-15 in order
    float *q = red + W * 32 * 4 + 8;
    if (threadIdx.x < 128) q[threadIdx.x] = nfq; // [row][token]
    __syncthreads();
    if (threadIdx.x < 2 * nt) {
      const int tok = threadIdx.x >> 1, half = threadIdx.x & 1;
      float t = q[(8 * half) * 8 + tok];
#pragma unroll
      for (int r = 1; r < 8; r++) t += q[(8 * half + r) * 8 + tok];
      F.ss[tok * 2 * gridDim.x + 2 * cta + half] = t;
    }
  }
}

template <int T, int W>
__global__ void __launch_bounds__(W * 32)
gemv7_kernel(float *__restrict__ y, const uint4 *__restrict__ xs, const float *__restrict__ xinv,
             const uint8_t *__restrict__ w, const float *__restrict__ bias, int64_t n, int64_t k, int64_t m,
             int64_t row_bytes, int accumulate) {
  DEC16_DYN_SMEM(float, red); // W x 32 lanes x 4 partial sums
  pdl_trigger();
  gemv7_rows<T, W>(red, blockIdx.x, y, xs, xinv, w, bias, n, k, m, row_bytes, accumulate);
}

// The folded norm's producer (orch_matmul_addnorm where v7 is the route; gemv7_rows NF 1).
template <int T, int W>
__global__ void __launch_bounds__(W * 32)
gemv7_nf_kernel(float *__restrict__ y, const uint4 *__restrict__ xs, const float *__restrict__ xinv,
                const uint8_t *__restrict__ w, const float *__restrict__ bias, int64_t n, int64_t k, int64_t m,
                int64_t row_bytes, const gemv5_nf F) {
  DEC16_DYN_SMEM(float, red);
  pdl_trigger();
  gemv7_rows<T, W, 1>(red, blockIdx.x, y, xs, xinv, w, bias, n, k, m, row_bytes, 0, F);
}

// Multi-weight v7 (orch_matmul_multi for n where v7 is the route): up to
// GEMV_MAX_PARTS weights of one type with the same x staged once; part p
// owns CTAs [end[p-1], end[p]) (16 rows each) and runs exactly
// gemv7_kernel's code on them: bit-identical to separate launches.
template <int T, int W, int NF = 0>
__global__ void __launch_bounds__(W * 32)
gemv7_multi_kernel(const gemv5_parts P, const uint4 *__restrict__ xs, const float *__restrict__ xinv, int64_t n,
                   int64_t k, int64_t row_bytes, const gemv5_nf F) {
  DEC16_DYN_SMEM(float, red);
  pdl_trigger();
  static_assert(GEMV_MAX_PARTS == 3, "part selection below");
  const unsigned b = blockIdx.x;
  const int p = b >= P.end[0] ? (b >= P.end[1] ? 2 : 1) : 0; // selects: a dynamic P.x[p] would copy P to local memory
#define GEMV7_PICK(f) (p == 0 ? P.f[0] : p == 1 ? P.f[1] : P.f[2])
  const int64_t cta = (int64_t)b - (p == 0 ? 0u : p == 1 ? P.end[0] : P.end[1]);
  gemv7_rows<T, W, NF>(red, cta, GEMV7_PICK(y), xs, xinv, GEMV7_PICK(w), GEMV7_PICK(bias), n, k, GEMV7_PICK(m),
                       row_bytes, 0, F);
#undef GEMV7_PICK
}

// Scratch bytes of v7's staged x for n tokens of k: n * (k/32) * 64 (x) + (k/32) * 32 (scales).
static inline size_t gemv7_scratch(int64_t n, int64_t k) { return (size_t)(n * (k / 32) * 64 + (k / 32) * 32); }

// Stages x (n <= xst tokens of k) into scratch (gemv7_scratch(n, k) bytes for
// xst = 8, gemv9_scratch(n, k) for v9; 16-aligned).
template <int T>
static void launch_gemv7_stage(cudaStream_t st, void *scratch, const float *x, int64_t n, int64_t k, uint32_t *&xs,
                               float *&xinv, int xst = 8) {
  xs = reinterpret_cast<uint32_t *>(scratch);
  xinv = reinterpret_cast<float *>(reinterpret_cast<uint8_t *>(scratch) + n * (k / 32) * 64);
  auto stage = gemv7_stage_kernel;
  DEC16_LAUNCH_PDL(stage, dim3((unsigned)ceil_div(n * (k / 4), 256)), 256, 0, st, xs, xinv, x, n, k,
                   dec16_traits<T>::kind, xst);
}

// nf: the folded norm's producer (gemv7_nf_kernel; F.res, F.w, F.xt, F.ss: n * m / 8 floats; m % 16 == 0;
// acc 0).
template <int T>
static void launch_gemv7(cudaStream_t st, void *scratch, float *y, const float *x, const uint8_t *w, const float *bias,
                         int64_t n, int64_t k, int64_t m, int64_t rb, int acc, const gemv5_nf *nf = nullptr) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4) {
    constexpr int W = GEMV7_WARPS;
    uint32_t *xs;
    float *xinv;
    launch_gemv7_stage<T>(st, scratch, x, n, k, xs, xinv);
    const dim3 grid((unsigned)ceil_div(m, 16));
    if (nf) {
      auto kern = gemv7_nf_kernel<T, W>;
      DEC16_LAUNCH_PDL(kern, grid, W * 32, (W * 32 * 4 + 8 + 128) * sizeof(float), st, y,
                       reinterpret_cast<const uint4 *>(xs), xinv, w, bias, n, k, m, rb, *nf);
      return;
    }
    auto kern = gemv7_kernel<T, W>;
    DEC16_LAUNCH_PDL(kern, grid, W * 32, W * 32 * 4 * sizeof(float), st, y, reinterpret_cast<const uint4 *>(xs), xinv,
                     w, bias, n, k, m, rb, acc);
  }
}

// P: count parts filled in (w, bias, y, m); end is set here. x staged once. nf: the folded norm's consumer
// (x = xt; F.ss, F.nss, F.eps).
template <int T>
static void launch_gemv7_multi(cudaStream_t st, void *scratch, gemv5_parts P, int count, const float *x, int64_t n,
                               int64_t k, int64_t rb, const gemv5_nf *nf = nullptr) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4) {
    constexpr int W = GEMV7_WARPS;
    uint32_t *xs;
    float *xinv;
    launch_gemv7_stage<T>(st, scratch, x, n, k, xs, xinv);
    unsigned total = 0;
    for (int p = 0; p < count; p++) {
      total += (unsigned)ceil_div(P.m[p], (int64_t)16);
      P.end[p] = total;
    }
    for (int p = count; p < GEMV_MAX_PARTS; p++) P.end[p] = total; // never selected
    const gemv5_nf F = nf ? *nf : gemv5_nf{};
    if (nf) {
      auto kern = gemv7_multi_kernel<T, W, 2>;
      DEC16_LAUNCH_PDL(kern, dim3(total), W * 32, (W * 32 * 4 + 8 + n * F.nss) * sizeof(float), st, P,
                       reinterpret_cast<const uint4 *>(xs), xinv, n, k, rb, F);
      return;
    }
    auto kern = gemv7_multi_kernel<T, W>;
    DEC16_LAUNCH_PDL(kern, dim3(total), W * 32, W * 32 * 4 * sizeof(float), st, P, reinterpret_cast<const uint4 *>(xs),
                     xinv, n, k, rb, F);
  }
}

// ---- GEMV v9 (ORCH_CUDA_GEMV=v9; the default route for n <= 64 where it
// applies, matmul.cu gemv_route): v7's tensor-core arithmetic for up to 64
// tokens, with the weights brought in by cp.async. Device runs 4-5 showed v7
// latency-bound, not bandwidth-bound: each warp walks ~6-8 rounds of "load
// 2 blocks x 16 rows into registers, wait a DRAM latency, compute", ~8-26 KB
// in flight per SM where ~36 KB are needed (H200: 4.8 TB/s x ~1 us / 132
// SMs), so Q8_0 2880x5120 took 11.5 us at every n <= 8 (33% of the floor)
// and attn out 4096x2880 (180 CTAs) 14 us; from n = 9 the bf16 WMMA GEMM
// (qgemm tile 1) took 34-70 us. Here:
//  1. A CTA = 16 RG rows x all of k, 4 warps. Its weight bytes (row segments,
//     contiguous in memory per row) are copied global -> shared with 16-byte
//     cp.async in stages of kc blocks (<= GEMV9_STAGE_BYTES per 16 rows), a
//     ring of GEMV9_NBUF stage buffers: the first NBUF stages are requested
//     before the PDL wait (gpt-oss's qkv: its whole tile, 4 x 12.5 KB per
//     CTA), the next one as each stage is consumed — the registers no longer
//     bound the bytes in flight, the shared memory does.
//  2. The warps split each stage's blocks; a lane decodes its pairs of rows
//     g and g+8 from shared memory exactly as v7 (q7_decode: the A fragments
//     of two m16n8k16 mmas) ONCE per block, then runs the two mmas for each
//     of NTL token tiles of 8 (B = staged x of tokens 8j..8j+7, as v7's
//     stage kernel writes it, chunk scales at xinv[c * 8 NTL + token]):
//     the weight bytes and their decode are paid once for up to 64 tokens.
//  3. The warps' partial sums go through shared memory (reusing the stage
//     buffers) and are added in a fixed order; (row, token) outputs of tiles
//     with no token < n are skipped.
//  4. Staged x comes from L2 (global scratch): each warp loads the next
//     block's x fragments before computing the current block. From 17 tokens
//     a CTA holds RG = 2 groups of 16 rows that share every x fragment: at
//     n = 64 one group per CTA would read ~7x the weight bytes of staged x
//     from L2 (Q8_0 2880x5120: 320 CTAs x 368 KB).
// XS (n <= 2, small k): each CTA stages x itself into shared memory (the
// stage kernel's arithmetic, same bits) instead of a separate stage launch
// writing it to global scratch — one launch per GEMV at decode's n = 1.
// Error: v7's (only x's fp16 rounding); every output's sum runs over the
// blocks in the same order for every n, so v9 is bit-identical across tile
// counts and between XS and the global staging (emulation checks both).

constexpr int GEMV9_WARPS = 4;
// Stage size per 16 rows and the ring of stage buffers: GEMV9_NBUF stages in
// flight (the first compute starts after one stage has landed, not the
// whole tile: device run 6's v9 waited for half of it).
constexpr int GEMV9_STAGE_BYTES = 13 * 1024;
constexpr int GEMV9_NBUF = 4;
constexpr int GEMV9_XS_MAX_BYTES = 24 * 1024; // x staged in shared memory up to this size (XS)

// q7_load from shared memory (plain loads; same words, same zeros).
template <int T>
__device__ __forceinline__ void q9_load(q7_words<T> &b, const uint8_t *blk, int t, bool ok) {
  constexpr int QOFF = q7_traits<T>::QOFF, Q = q7_traits<T>::Q, S = q7_traits<T>::S;
  const uintptr_t p = (uintptr_t)blk;
  b.sh_s = (uint32_t)(p & 3);
  const uint32_t *ws = reinterpret_cast<const uint32_t *>(p & ~(uintptr_t)3);
  b.s0 = ok ? ws[0] : 0u;
  b.s1 = ok && b.sh_s + S > 4 ? ws[1] : 0u;
  const uintptr_t a = p + QOFF + (uintptr_t)(Q * t);
  b.sh_q = (uint32_t)(a & 3);
  const uint32_t *wq = reinterpret_cast<const uint32_t *>(a & ~(uintptr_t)3);
#pragma unroll
  for (int j = 0; j < Q / 4; j++) b.q[j] = ok ? wq[j] : 0u;
  b.q[Q / 4] = ok && b.sh_q ? wq[Q / 4] : 0u;
}

// Stage geometry: kc blocks per stage, 16-byte chunks per row slot; rg
// row groups of 16 per CTA (stage budget GEMV9_STAGE_BYTES per group).
struct gemv9_geom {
  int kc, ns, ch; // blocks per stage, stages, chunks per row slot
};
// ORCH_CUDA_GEMV9_STAGE_KB=N (2..48) overrides the stage size (timing; read once per process).
static inline int64_t gemv9_stage_bytes() {
  static const int64_t v = [] {
    const char *e = getenv("ORCH_CUDA_GEMV9_STAGE_KB");
    const int kb = e ? atoi(e) : 0;
    return kb >= 2 && kb <= 48 ? (int64_t)kb * 1024 : (int64_t)GEMV9_STAGE_BYTES;
  }();
  return v;
}
static inline gemv9_geom gemv9_plan(int bb, int64_t nch) {
  const int64_t tile = 16 * nch * bb, sb = gemv9_stage_bytes();
  const int64_t ns0 = (tile + sb - 1) / sb;
  gemv9_geom g;
  g.kc = (int)((nch + ns0 - 1) / ns0);
  g.ns = (int)((nch + g.kc - 1) / g.kc);
  g.ch = (g.kc * bb + 15) / 16 + 1;
  return g;
}
// Bytes of x staged in the v7 layout for n tokens (xst = 8) in shared memory (XS).
DEC16_HD size_t gemv9_xs_bytes(int64_t n, int64_t k) { return (size_t)(n * (k / 32) * 64 + (k / 32) * 32); }
// Dynamic shared memory of a v9 CTA of rg row groups: the stage buffers
// (reused for the warps' partial sums), then (XS) the staged x.
DEC16_HD size_t gemv9_smem(const gemv9_geom &g, int rg, int ntl, bool xs, int64_t n, int64_t k) {
  size_t bufs = (size_t)(g.ns < GEMV9_NBUF ? g.ns : GEMV9_NBUF) * 16 * rg * g.ch * 16;
  const size_t red = (size_t)GEMV9_WARPS * 32 * 4 * rg * ntl * sizeof(float);
  if (red > bufs) bufs = red;
  return bufs + (xs ? gemv9_xs_bytes(n, k) : 0);
}
// Scratch of the global x staging: n * (k/32) * 64 (x) + (k/32) * 8 NTL * 4 (scales).
static inline int gemv9_ntl(int64_t n) { return n <= 8 ? 1 : n <= 16 ? 2 : n <= 32 ? 4 : 8; }
static inline size_t gemv9_scratch(int64_t n, int64_t k) {
  return (size_t)(n * (k / 32) * 64 + (k / 32) * 32 * gemv9_ntl(n));
}

template <bool XS> __device__ __forceinline__ uint4 g9_ldx(const uint4 *p) {
  if constexpr (XS) return *p;
  else return __ldg(p);
}
template <bool XS> __device__ __forceinline__ float g9_ldf(const float *p) {
  if constexpr (XS) return *p;
  else return __ldg(p);
}

// The stage kernel's arithmetic for the whole CTA into shared memory (xst =
// 8): every thread of a warp runs the same iterations (shuffles).
__device__ __forceinline__ void gemv9_stage_smem(uint32_t *xs, float *xinv, const float *__restrict__ x, int64_t n,
                                                 int64_t k, int kind) {
  const int64_t nq = k / 4, nch = k / 32;
  constexpr int B = 4; // float4s per thread in flight per batch (one L2 latency per batch, not per float4)
  for (int64_t base = 0; base < n * nq; base += (int64_t)B * blockDim.x) {
    float4 v[B];
#pragma unroll
    for (int b = 0; b < B; b++) {
      const int64_t i = base + (int64_t)b * blockDim.x + threadIdx.x;
      v[b] = i < n * nq ? __ldg(reinterpret_cast<const float4 *>(x) + i) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int b = 0; b < B; b++) {
      const int64_t i = base + (int64_t)b * blockDim.x + threadIdx.x;
      uint32_t mx = max(max(dec16_absbits(v[b].x), dec16_absbits(v[b].y)), max(dec16_absbits(v[b].z), dec16_absbits(v[b].w)));
      mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      float sc, inv;
      dec16_chunk_scale(mx, sc, inv);
      if (i < n * nq) {
        const int64_t tok = i / nq, q = i % nq, c = q >> 3;
        const int o = (int)(q & 7);
        dec16_put4(xs + (tok * nch + c) * 16, kind, o, v[b].x * sc, v[b].y * sc, v[b].z * sc, v[b].w * sc);
        if (o == 0) xinv[c * 8 + tok] = inv;
      }
    }
  }
}

// One block's x for the NTL token tiles of a lane (g, t): B fragments
// (token 8j + g) and the chunk scales of tokens 8j + 2t, 8j + 2t + 1 (zeros
// past n: staged x holds n tokens only).
template <int NTL> struct g9_xblk {
  uint4 X[NTL];
  float i0[NTL], i1[NTL];
};
template <int NTL, bool XS>
__device__ __forceinline__ void g9_load_x(g9_xblk<NTL> &b, const uint4 *xs, const float *xinv, int xst, int64_t c,
                                          int64_t nch, int64_t n, int g, int t, bool okc) {
#pragma unroll
  for (int j = 0; j < NTL; j++) {
    const int tok = 8 * j + g, tk = 8 * j + 2 * t;
    b.X[j] = okc && tok < n ? g9_ldx<XS>(xs + (tok * nch + c) * 4 + t) : make_uint4(0u, 0u, 0u, 0u);
    b.i0[j] = okc && tk < n ? g9_ldf<XS>(xinv + c * xst + tk) : 0.f;
    b.i1[j] = okc && tk + 1 < n ? g9_ldf<XS>(xinv + c * xst + tk + 1) : 0.f;
  }
}

// Rows [16 RG cta, 16 RG (cta + 1)) of y for n <= 8 NTL tokens (RG row
// groups of 16 per CTA share each x fragment: RG = 2 halves the staged-x
// traffic from L2, which at n = 64 is ~7x the weight bytes with RG = 1).
// sm: gemv9_smem bytes. XS: x (fp32) is staged here into shared memory;
// else xs / xinv hold the stage kernel's output with xinv stride 8 NTL.
// The next block's x is loaded before the current block is computed (one
// L2 latency per stage instead of one per block).
template <int T, int RG, int NTL, bool XS>
__device__ __forceinline__ void gemv9_rows(uint8_t *sm, int64_t cta, float *__restrict__ y, const float *__restrict__ x,
                                           const uint4 *__restrict__ xsg, const float *__restrict__ xinvg,
                                           const uint8_t *__restrict__ w, const uint8_t *w_end,
                                           const float *__restrict__ bias, int64_t n, int64_t k, int64_t m,
                                           int64_t row_bytes, int accumulate, int kc, int ns, int ch) {
  constexpr int W = GEMV9_WARPS, BB = type_block_bytes(T), THREADS = W * 32, R = 16 * RG;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int64_t nch = k / 32;
  const int slot = ch * 16;
  const size_t bufb = (size_t)R * slot;
  const int64_t row0 = cta * R;
  const int rows = (int)min((int64_t)R, m - row0);
  // Issues stage s's copies into buffer s % NBUF; every thread commits one
  // group per call, empty past the last stage, so that "stage s landed" is
  // always wait_group(NBUF - 1) at stage s.
  constexpr int NBUF = GEMV9_NBUF;
  auto issue = [&](int s) {
    if (s >= ns) {
      g9_cp_commit();
      return;
    }
    uint8_t *b = sm + (s % NBUF) * bufb;
    const int64_t c0 = (int64_t)s * kc;
    const int nb = (int)min((int64_t)kc, nch - c0);
    for (int i = tid; i < rows * ch; i += THREADS) {
      const int r = i / ch, c = i - r * ch;
      const uint8_t *seg = w + (row0 + r) * row_bytes + c0 * BB;
      const qg_span sp = qg_stage_span((uint64_t)(uintptr_t)seg, (uint64_t)(uintptr_t)(seg + nb * BB));
      if (c < sp.chunks) {
        const uint64_t addr = sp.a0 + 16 * (uint64_t)c;
        g9_cp_async16(b + r * slot + 16 * c, reinterpret_cast<const void *>((uintptr_t)addr),
                      qg_chunk_bytes(addr, (uint64_t)(uintptr_t)w_end));
      }
    }
    g9_cp_commit();
  };
#pragma unroll
  for (int s = 0; s < NBUF; s++) issue(s); // weights only (never written while a step runs): before the PDL wait
  pdl_wait();
  const uint4 *xs = xsg;
  const float *xinv = xinvg;
  int xst = 8 * NTL;
  if constexpr (XS) {
    uint32_t *xsm = reinterpret_cast<uint32_t *>(sm + gemv9_smem(gemv9_geom{kc, ns, ch}, RG, NTL, false, n, k));
    float *xism = reinterpret_cast<float *>(xsm + n * nch * 16);
    gemv9_stage_smem(xsm, xism, x, n, k, dec16_traits<T>::kind);
    xs = reinterpret_cast<const uint4 *>(xsm);
    xinv = xism;
    xst = 8;
    __syncthreads(); // the staged x is read (prefetched) below, before the first stage's barrier
  }
  float acc[RG][NTL][4];
#pragma unroll
  for (int q = 0; q < RG; q++)
#pragma unroll
    for (int j = 0; j < NTL; j++) acc[q][j][0] = acc[q][j][1] = acc[q][j][2] = acc[q][j][3] = 0.f;
  // A warp's blocks in stage s: c0 + warp + W i, in rounds of U (the U
  // blocks' weights are loaded and decoded before their mmas: independent
  // chains; the folds into acc keep the block order, so U changes no bit).
  // The next round's x (U blocks, every token tile) is loaded before the
  // current round is computed, across stage boundaries too.
  constexpr int U = RG * NTL <= 2 ? 2 : 1;
  g9_xblk<NTL> xb[U];
#pragma unroll
  for (int u = 0; u < U; u++)
    g9_load_x<NTL, XS>(xb[u], xs, xinv, xst, warp + u * W, nch, n, g, t, warp + u * W < min((int64_t)kc, nch));
  for (int s = 0; s < ns; s++) {
    g9_cp_wait<NBUF - 1>();
    __syncthreads(); // stage s visible to every warp
    const uint8_t *b = sm + (s % NBUF) * bufb;
    const int64_t c0 = (int64_t)s * kc;
    const int nb = (int)min((int64_t)kc, nch - c0);
    // Rows g + 16q and g + 8 + 16q of the stage buffer (their segments' offsets in their first chunk).
    const uint8_t *p0[RG], *p1[RG];
#pragma unroll
    for (int q = 0; q < RG; q++) {
      const int r0 = 16 * q + g, r1 = r0 + 8;
      p0[q] = b + r0 * slot + (int)((uintptr_t)(w + (row0 + r0) * row_bytes + c0 * BB) & 15);
      p1[q] = b + r1 * slot + (int)((uintptr_t)(w + (row0 + r1) * row_bytes + c0 * BB) & 15);
    }
    for (int cb = warp; cb < nb; cb += U * W) { // uniform over the warp: every lane reaches the mma
      // The next round: the rest of this stage, else the first round of the next.
      const bool here = cb + U * W < nb;
      const int64_t cn = here ? c0 + cb + U * W : c0 + kc + warp, lim = here ? c0 + nb : min(c0 + 2 * (int64_t)kc, nch);
      g9_xblk<NTL> xn[U];
#pragma unroll
      for (int u = 0; u < U; u++) g9_load_x<NTL, XS>(xn[u], xs, xinv, xst, cn + u * W, nch, n, g, t, cn + u * W < lim);
#pragma unroll
      for (int q = 0; q < RG; q++) {
        uint32_t ha[U][4], hb[U][4];
        float s0[U], s1[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
          const int bi = cb + u * W < nb ? cb + u * W : cb; // (a block past the stage: loaded, never used)
          q7_words<T> w0, w1;
          q9_load<T>(w0, p0[q] + bi * BB, t, 16 * q + g < rows);
          q9_load<T>(w1, p1[q] + bi * BB, t, 16 * q + g + 8 < rows);
          s0[u] = q7_decode<T>(w0, ha[u]);
          s1[u] = q7_decode<T>(w1, hb[u]);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
          if (cb + u * W < nb) { // uniform
            const uint32_t a0[4] = {ha[u][0], hb[u][0], ha[u][1], hb[u][1]},
                           a1[4] = {ha[u][2], hb[u][2], ha[u][3], hb[u][3]};
#pragma unroll
            for (int j = 0; j < NTL; j++) {
              if (8 * j < n) { // uniform
                float d[4] = {0.f, 0.f, 0.f, 0.f};
                const uint32_t bx0[2] = {xb[u].X[j].x, xb[u].X[j].y}, bx1[2] = {xb[u].X[j].z, xb[u].X[j].w};
                dec16_mma16816(d, a0, bx0);
                dec16_mma16816(d, a1, bx1);
                acc[q][j][0] += s0[u] * xb[u].i0[j] * d[0];
                acc[q][j][1] += s0[u] * xb[u].i1[j] * d[1];
                acc[q][j][2] += s1[u] * xb[u].i0[j] * d[2];
                acc[q][j][3] += s1[u] * xb[u].i1[j] * d[3];
              }
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; u++) xb[u] = xn[u];
    }
    __syncthreads(); // every warp is done with buffer s % NBUF
    issue(s + NBUF);
  }
  // Partial sums: red[(((warp * RG + q) * NTL + j) * 32 + lane) * 4 + e] over the (now idle) stage buffers.
  float *red = reinterpret_cast<float *>(sm);
#pragma unroll
  for (int q = 0; q < RG; q++)
#pragma unroll
    for (int j = 0; j < NTL; j++) {
      float *rw = red + (((warp * RG + q) * NTL + j) * 32 + lane) * 4;
#pragma unroll
      for (int e = 0; e < 4; e++) rw[e] = acc[q][j][e];
    }
  __syncthreads();
  for (int i = tid; i < 128 * RG * NTL; i += THREADS) { // (group, tile, row, token) = D element e of lane l
    const int q = i / (128 * NTL), j = (i >> 7) % NTL, row = (i >> 3) & 15, tok8 = i & 7;
    const int l = (row & 7) * 4 + (tok8 >> 1), e = (row >> 3) * 2 + (tok8 & 1);
    const int64_t tok = 8 * j + tok8, Rw = row0 + 16 * q + row;
    if (Rw < m && tok < n) {
      float s = 0.f;
      for (int v = 0; v < W; v++) s += red[(((v * RG + q) * NTL + j) * 32 + l) * 4 + e];
      if (bias) s += bias[Rw];
      float *yp = y + tok * m + Rw;
      *yp = accumulate ? *yp + s : s;
    }
  }
}

template <int T, int RG, int NTL, bool XS>
__global__ void __launch_bounds__(GEMV9_WARPS * 32, RG == 2 || NTL == 8 ? 2 : 4)
gemv9_kernel(float *__restrict__ y, const float *__restrict__ x, const uint4 *__restrict__ xs,
             const float *__restrict__ xinv, const uint8_t *__restrict__ w, const uint8_t *w_end,
             const float *__restrict__ bias, int64_t n, int64_t k, int64_t m, int64_t row_bytes, int accumulate, int kc,
             int ns, int ch) {
  DEC16_DYN_SMEM(uint8_t, sm);
  pdl_trigger();
  gemv9_rows<T, RG, NTL, XS>(sm, blockIdx.x, y, x, xs, xinv, w, w_end, bias, n, k, m, row_bytes, accumulate, kc, ns,
                             ch);
}

// Multi-weight v9 (orch_matmul_multi): part p owns CTAs [end[p-1], end[p])
// and runs exactly gemv9_kernel's code on them (x staged once, or per CTA
// for XS): bit-identical to separate launches.
template <int T, int RG, int NTL, bool XS>
__global__ void __launch_bounds__(GEMV9_WARPS * 32, RG == 2 || NTL == 8 ? 2 : 4)
gemv9_multi_kernel(const gemv5_parts P, const float *__restrict__ x, const uint4 *__restrict__ xs,
                   const float *__restrict__ xinv, int64_t n, int64_t k, int64_t row_bytes, int kc, int ns, int ch) {
  DEC16_DYN_SMEM(uint8_t, sm);
  pdl_trigger();
  static_assert(GEMV_MAX_PARTS == 3, "part selection below");
  const unsigned b = blockIdx.x;
  const int p = b >= P.end[0] ? (b >= P.end[1] ? 2 : 1) : 0; // selects: a dynamic P.x[p] would copy P to local memory
#define GEMV9_PICK(f) (p == 0 ? P.f[0] : p == 1 ? P.f[1] : P.f[2])
  const int64_t cta = (int64_t)b - (p == 0 ? 0u : p == 1 ? P.end[0] : P.end[1]);
  const uint8_t *w = GEMV9_PICK(w);
  const int64_t m = GEMV9_PICK(m);
  gemv9_rows<T, RG, NTL, XS>(sm, cta, GEMV9_PICK(y), x, xs, xinv, w, w + m * row_bytes, GEMV9_PICK(bias), n, k, m,
                             row_bytes, 0, kc, ns, ch);
#undef GEMV9_PICK
}

// Whether v9 stages x per CTA in shared memory (n <= 2 and small enough).
static inline bool gemv9_use_xs(int64_t n, int64_t k) { return n <= 2 && gemv9_xs_bytes(n, k) <= GEMV9_XS_MAX_BYTES; }

// Row groups per CTA: 2 from 17 tokens (4 and 8 token tiles: the staged-x
// traffic dominates), else 1 (more CTAs). ORCH_CUDA_GEMV9_RG=1 / 2 pins it
// (timing; read once per process).
static inline int gemv9_rg(int64_t n) {
  static const int pin = [] {
    const char *e = getenv("ORCH_CUDA_GEMV9_RG");
    return e && (e[0] == '1' || e[0] == '2') && !e[1] ? e[0] - '0' : 0;
  }();
  return pin ? pin : n > 16 ? 2 : 1;
}

template <int T, int RG, int NTL, bool XS>
static void launch_gemv9_t(cudaStream_t st, void *scratch, float *y, const float *x, const uint8_t *w,
                           const float *bias, int64_t n, int64_t k, int64_t m, int64_t rb, int acc) {
  const gemv9_geom g = gemv9_plan(type_block_bytes(T), k / 32);
  const size_t sm = gemv9_smem(g, RG, NTL, XS, n, k);
  auto kern = gemv9_kernel<T, RG, NTL, XS>;
  if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
  uint32_t *xs = nullptr;
  float *xinv = nullptr;
  if constexpr (!XS) launch_gemv7_stage<T>(st, scratch, x, n, k, xs, xinv, 8 * NTL);
  DEC16_LAUNCH_PDL(kern, dim3((unsigned)ceil_div(m, (int64_t)16 * RG)), GEMV9_WARPS * 32, sm, st, y, x,
                   reinterpret_cast<const uint4 *>(xs), xinv, w, w + m * rb, bias, n, k, m, rb, acc, g.kc, g.ns, g.ch);
}

template <int T, int RG, int NTL, bool XS>
static void launch_gemv9_multi_t(cudaStream_t st, void *scratch, gemv5_parts P, int count, const float *x, int64_t n,
                                 int64_t k, int64_t rb) {
  const gemv9_geom g = gemv9_plan(type_block_bytes(T), k / 32);
  const size_t sm = gemv9_smem(g, RG, NTL, XS, n, k);
  auto kern = gemv9_multi_kernel<T, RG, NTL, XS>;
  if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
  uint32_t *xs = nullptr;
  float *xinv = nullptr;
  if constexpr (!XS) launch_gemv7_stage<T>(st, scratch, x, n, k, xs, xinv, 8 * NTL);
  unsigned total = 0;
  for (int p = 0; p < count; p++) {
    total += (unsigned)ceil_div(P.m[p], (int64_t)16 * RG);
    P.end[p] = total;
  }
  for (int p = count; p < GEMV_MAX_PARTS; p++) P.end[p] = total; // never selected
  DEC16_LAUNCH_PDL(kern, dim3(total), GEMV9_WARPS * 32, sm, st, P, x, reinterpret_cast<const uint4 *>(xs), xinv, n, k,
                   rb, g.kc, g.ns, g.ch);
}

// The instance for n tokens: per-CTA x staging (n <= 2, small k; xs_mode 1
// forces it for n <= 8, 0 forbids it: tests), token tiles NTL, row groups RG
// (rg 0: gemv9_rg).
template <int T, template <int, int, int, bool> class F, class... A>
static void gemv9_dispatch(int64_t n, int64_t k, int xs_mode, int rg, A... a) {
  const bool xsm = xs_mode < 0 ? gemv9_use_xs(n, k) : xs_mode == 1 && n <= 8;
  if (rg == 0) rg = gemv9_rg(n);
  if (xsm) F<T, 1, 1, true>::run(a...);
  else if (n <= 8) F<T, 1, 1, false>::run(a...);
  else if (n <= 16 && rg == 1) F<T, 1, 2, false>::run(a...);
  else if (n <= 16) F<T, 2, 2, false>::run(a...);
  else if (n <= 32 && rg == 1) F<T, 1, 4, false>::run(a...);
  else if (n <= 32) F<T, 2, 4, false>::run(a...);
  else if (rg == 1) F<T, 1, 8, false>::run(a...);
  else F<T, 2, 8, false>::run(a...);
}
template <int T, int RG, int NTL, bool XS> struct gemv9_one {
  static void run(cudaStream_t st, void *scr, float *y, const float *x, const uint8_t *w, const float *bias, int64_t n,
                  int64_t k, int64_t m, int64_t rb, int acc) {
    launch_gemv9_t<T, RG, NTL, XS>(st, scr, y, x, w, bias, n, k, m, rb, acc);
  }
};
template <int T, int RG, int NTL, bool XS> struct gemv9_many {
  static void run(cudaStream_t st, void *scr, gemv5_parts P, int count, const float *x, int64_t n, int64_t k,
                  int64_t rb) {
    launch_gemv9_multi_t<T, RG, NTL, XS>(st, scr, P, count, x, n, k, rb);
  }
};

// n <= 64 tokens; scratch: gemv9_scratch(n, k) bytes (unused when x is
// staged per CTA). xs_mode / rg: as gemv9_dispatch (-1 / 0: the routing).
template <int T>
static void launch_gemv9(cudaStream_t st, void *scratch, float *y, const float *x, const uint8_t *w, const float *bias,
                         int64_t n, int64_t k, int64_t m, int64_t rb, int acc, int xs_mode = -1, int rg = 0) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4)
    gemv9_dispatch<T, gemv9_one>(n, k, xs_mode, rg, st, scratch, y, x, w, bias, n, k, m, rb, acc);
}

template <int T>
static void launch_gemv9_multi(cudaStream_t st, void *scratch, gemv5_parts P, int count, const float *x, int64_t n,
                               int64_t k, int64_t rb, int xs_mode = -1, int rg = 0) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4)
    gemv9_dispatch<T, gemv9_many>(n, k, xs_mode, rg, st, scratch, P, count, x, n, k, rb);
}

// F32 weights, small m (routers: gpt-oss 2880 -> 32), n <= 8: the v1 GEMV
// gives each row one warp (8 CTAs of 4 warps for 32 rows), whose lanes walk
// the row in ~3 dependent rounds of loads. Here one CTA of 1024 threads per
// row splits k (one float4 of the row per thread for k <= 4096), then a block
// reduction per token (fixed order: deterministic).
constexpr int GEMVF32_THREADS = 1024;

template <int NT>
__global__ void __launch_bounds__(GEMVF32_THREADS)
gemv_f32_rows_kernel(float *__restrict__ y, const float *__restrict__ x, const float *__restrict__ w,
                     const float *__restrict__ bias, int64_t n, int64_t k, int64_t m, int accumulate) {
  DEC16_DYN_SMEM(float, red); // NT x (GEMVF32_THREADS / 32) partial sums
  // PDL: wait first — an F32 "weight" may be any F32 tensor, possibly one an
  // earlier kernel of the step wrote.
  pdl_trigger();
  pdl_wait();
  const int64_t row = blockIdx.x;
  const int nt = (int)min((int64_t)NT, n);
  const float4 *wr = reinterpret_cast<const float4 *>(w + row * k);
  float acc[NT];
#pragma unroll
  for (int j = 0; j < NT; j++) acc[j] = 0.f;
  // 1024 threads: a row of k <= 4096 is one round of loads (ptxas interleaved
  // the loads of unrolled rounds with the products, one latency per round).
  for (int64_t i = threadIdx.x; i < k / 4; i += GEMVF32_THREADS) {
    const float4 wv = __ldg(wr + i);
#pragma unroll
    for (int j = 0; j < NT; j++)
      if (j < nt) {
        const float4 xv = __ldg(reinterpret_cast<const float4 *>(x + j * k) + i);
        acc[j] += wv.x * xv.x + wv.y * xv.y + wv.z * xv.z + wv.w * xv.w;
      }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < NT; j++) {
    const float s = warp_sum(acc[j]);
    if (lane == 0) red[j * (GEMVF32_THREADS / 32) + warp] = s;
  }
  __syncthreads();
  if (threadIdx.x < nt) {
    const int j = threadIdx.x;
    float s = 0.f;
    for (int v = 0; v < GEMVF32_THREADS / 32; v++) s += red[j * (GEMVF32_THREADS / 32) + v];
    if (bias) s += bias[row];
    float *yp = y + j * m + row;
    *yp = accumulate ? *yp + s : s;
  }
}

template <int NT>
static void launch_gemv_f32_rows_nt(cudaStream_t st, float *y, const float *x, const float *w, const float *bias,
                                    int64_t n, int64_t k, int64_t m, int acc) {
  auto kern = gemv_f32_rows_kernel<NT>;
  DEC16_LAUNCH_PDL(kern, dim3((unsigned)m), GEMVF32_THREADS, (size_t)NT * (GEMVF32_THREADS / 32) * sizeof(float), st, y,
               x, w, bias, n, k, m, acc);
}

// y[j, :] (+)= W x[j] (+ bias) for F32 W [m, k], k % 4 == 0, n <= 8.
static void launch_gemv_f32_rows(cudaStream_t st, float *y, const float *x, const float *w, const float *bias,
                                 int64_t n, int64_t k, int64_t m, int acc) {
  if (n == 1) launch_gemv_f32_rows_nt<1>(st, y, x, w, bias, n, k, m, acc);
  else if (n == 2) launch_gemv_f32_rows_nt<2>(st, y, x, w, bias, n, k, m, acc);
  else if (n <= 4) launch_gemv_f32_rows_nt<4>(st, y, x, w, bias, n, k, m, acc);
  else launch_gemv_f32_rows_nt<8>(st, y, x, w, bias, n, k, m, acc);
}
