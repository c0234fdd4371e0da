// moe_oproj.cuh — (session 10) one token's attention out projection, the AddRMSNorm after it and MoE v10 in three
// launches (orch_moe_decode_oproj), included at the end of moe_dec10.cuh. Before: the projection GEMV, then
// orch_moe_decode_norm's route kernel (every route CTA re-reads res + add and block-reduces the whole row), gate_up10,
// down10. Here the route kernel is gone:
//  - moe_oproj_kernel runs orch_matmul_addnorm's one-token producer (gemv5_rows NF 1: y = ox . W^T + b, res += y,
//    x = xt = res * norm_w, the CTA's sum of res^2 into ssp[cta]) and, per row, the router's partial logits of xt:
//    the router is linear, so logits = r * (router . xt) + bias with r = rsqrt(sum res^2 / dim + eps). Lane e of a
//    warp multiplies router[e][row] (constant: loaded before the PDL wait) by its row's xt; thread e sums the CTA's 8
//    warps in order into part[e][cta]. The last CTA (fence + wrapping ticket, as moe10_route_kernel) sums the
//    partials in a fixed order (deterministic), computes r exactly as the norm fold's consumers do (gemv5_nf_scale),
//    runs v10's top-k (ids / weights) and stages xt for gate_up10 as moe10_route_slice stages x, each chunk's 1/scale
//    times r (gate_up10's dots are linear in it: r * (w . xt) = w . h).
//  - gate_up10 and down10 as launch_decode10 launches them (the AN epilogue when res2 .. ss are given).
// y, res, x and ssp are orch_matmul_addnorm's bits (cuda/test/moe_oproj_emu_test.cpp); the logits and the staged x
// differ from orch_moe_decode_norm's by fp32 / fp16 rounding only (h is staged as r * xt, not as (res * r) * w).
// Scratch: part [n_exp][C] (C = dim / 8 CTAs) in act (gate_up10 writes act later), the staged x where launch_decode10
// puts it in ybuf, ssp after it. The ticket is per device, as v10's.
// Mode 2 (opt-in ORCH_CUDA_MOE_OPROJ=2, below): no last-CTA tail; the producer adds fixed-point partials into 33
// global sums, every gate_up CTA routes and stages x itself, down zeroes the sums (ids / out within fp32 rounding of
// mode 1's; cuda/test/moe_oproj_emu_test.cpp).
#pragma once
#include <cstddef>

#include "gemv16.cuh"

__device__ unsigned g_moe_oproj_ticket;

struct moe_oproj_args {
  const float *rw;    // router [n_exp][m] F32
  const float *rbias; // [n_exp] or null
  float *part;        // [n_exp][C] partial logits
  uint32_t *xg;       // the staged x (moe10_xstride(m / 32) words)
  int32_t *ids;
  float *wts;
  int n_exp, k_slots, kind, x14; // kind / x14: the staging of the MoE weight type (moe10_route_kernel's)
};

__device__ __forceinline__ float4 moe_oproj_ldcg4(const float *p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(reinterpret_cast<const float4 *>(p));
#else
  return *reinterpret_cast<const float4 *>(p);
#endif
}

// m = dim rows (m % 32 == 0, m / 8 <= GEMV5_NF_MAX: every row valid), one per warp; k = the projection's input.
template <int TO, int NB, int XR>
__global__ void __launch_bounds__(GEMV16_WARPS * 32)
moe_oproj_kernel(float *__restrict__ y, const float *__restrict__ ox, const uint8_t *__restrict__ ow,
                 const float *__restrict__ obias, int64_t k, int64_t m, int64_t rb, const gemv5_nf F,
                 const moe_oproj_args A) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  MOE10_SHARED unsigned last;
  MOE10_SHARED float lp[GEMV16_WARPS][32];    // each warp's products router[e][row] * xt[row]
  MOE10_SHARED __align__(16) float ssh[GEMV5_NF_MAX]; // last CTA: the sum-of-squares partials
  MOE10_SHARED float lg[32];
  pdl_trigger();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int C = (int)gridDim.x;
  const int64_t row = (int64_t)blockIdx.x * GEMV16_WARPS + warp;
  const float rwv = lane < A.n_exp ? __ldg(A.rw + (int64_t)lane * m + row) : 0.f; // constant: before the wait
  gemv5_rows<TO, 1, NB, XR, 0, 1>(xsm, blockIdx.x, y, ox, ow, obias, 1, k, m, rb, 0, 1, F);
  // gemv5_rows ends with a barrier after lane 0 of every warp wrote its row's xt (F.xt) and thread 0 ssp[cta]
  lp[warp][lane] = rwv * F.xt[row];
  __syncthreads();
  if (tid < A.n_exp) {
    float s = lp[0][tid];
#pragma unroll
    for (int w = 1; w < GEMV16_WARPS; w++) s += lp[w][tid];
    A.part[(int64_t)tid * C + blockIdx.x] = s;
  }
  moe10_fence(); // this thread's y / res / xt / ssp / part writes before the ticket
  __syncthreads();
  if (tid == 0) last = moe10_ticket(&g_moe_oproj_ticket, (unsigned)(C - 1)) == (unsigned)(C - 1);
  __syncthreads();
  if (!last) return; // uniform over the CTA
  moe10_fence();
  // Everything below reads other CTAs' writes through L2, all loads issued before the first use: the row's xt (for
  // the staging; dim <= 4096: at most XB float4s a thread), the sums of squares, and the partial logits (thread
  // (e, q) sums float4 slots q, q + 8, ... of expert e's row, C % 4 == 0; one batch of JM for C <= 32 JM).
  constexpr int NT = GEMV16_WARPS * 32, XB = 4, SB = GEMV5_NF_MAX / NT, JM = 12;
  static_assert(XB * NT * 4 >= MOE10_NORM_MAX_N * MOE10_THREADS, "the entry declines dim > 4096");
  const int n4 = (int)(m / 4), nch = (int)(m / 32);
  float4 xv[XB];
#pragma unroll
  for (int j = 0; j < XB; j++) {
    const int i = j * NT + tid;
    xv[j] = i < n4 ? moe_oproj_ldcg4(F.xt + 4 * i) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  {
    float sv[SB];
#pragma unroll
    for (int j = 0; j < SB; j++) {
      const int i = j * NT + tid;
      sv[j] = i < C ? moe10_ldcg(F.ss + i) : 0.f;
    }
    const int e = tid >> 3, q = tid & 7, C4 = C / 4;
    const float *pe = A.part + (int64_t)(e < A.n_exp ? e : 0) * C;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j0 = q; j0 < C4; j0 += 8 * JM) {
      float4 v[JM];
#pragma unroll
      for (int j = 0; j < JM; j++) {
        const int i = j0 + 8 * j;
        v[j] = e < A.n_exp && i < C4 ? moe_oproj_ldcg4(pe + 4 * i) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int j = 0; j < JM; j++) {
        acc.x += v[j].x;
        acc.y += v[j].y;
        acc.z += v[j].z;
        acc.w += v[j].w;
      }
    }
    float s = (acc.x + acc.y) + (acc.z + acc.w);
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    s += __shfl_xor_sync(0xffffffffu, s, 4);
    if (q == 0) lg[e] = s; // 0 for e >= n_exp
#pragma unroll
    for (int j = 0; j < SB; j++) {
      const int i = j * NT + tid;
      if (i < C) ssh[i] = sv[j];
    }
  }
  __syncthreads();
  // r as the fold's consumers compute it (every warp: the same bits); warp 0 routes.
  const float r = gemv5_nf_scale(ssh, 0, C, m, F.eps);
  if (warp == 0) {
    const float v = lane < A.n_exp ? r * lg[lane] + (A.rbias ? A.rbias[lane] : 0.f) : 0.f;
    int id;
    float w;
    moe_topk32_warp(v, lane, A.n_exp, A.k_slots, id, w);
    if (lane < A.k_slots) {
      A.ids[lane] = id;
      A.wts[lane] = w;
    }
  }
  // xt staged for gate_up10 (moe10_route_slice's values, each chunk's 1/scale times r): float4 i by thread i mod 256.
  const bool b14 = A.x14 != 0;
#pragma unroll
  for (int j = 0; j < XB; j++) {
    const int i0 = j * NT + warp * 32, i = i0 + lane;
    if (i0 < n4) moe10_stage4(A.xg, nch, i >> 3, i & 7, i < n4, xv[j], A.kind, b14, r); // uniform over the warp
  }
}

// ---- mode 2 (opt-in ORCH_CUDA_MOE_OPROJ=2): no last-CTA tail ----
// The producer adds each CTA's 32 partial logits and its sum of squares into g_moe_oproj_acc (moe_dec10.cuh) as
// 64-bit fixed point (RED: no fence, no ticket; integer sums are exact and order-independent: deterministic).
// gate_up's every CTA then reads the 33 sums and the xt row (one L2 round), computes r, the logits and v10's top-k
// (the same bits in every CTA), stages xt into its shared memory as moe_oproj_kernel's tail stages it, and runs
// gate_up10's dots with its slot's expert; CTA (0, 0) writes ids / weights for down10, which zeroes the sums (ZACC).
// Scales (powers of two: the conversions are exact up to the one rounding to an integer):
//  - logits 2^32: |router . xt| < 2^31 (2.1e9; gpt-oss: |xt| <= ~1e4, |router| << 1: < ~1e6), error <= C * 2^-33
//    (4e-8 at C = 360) before r;
//  - sum of squares 2^20: sum res^2 < 2^43 (8.8e12: 2,880 values of |res| up to 5.5e4), error <= C * 2^-21 on the
//    sum, i.e. <= 2^-24 (6e-8) on the mean square r's rsqrt sees next to eps (1e-5 for gpt-oss).
// Each addend is rounded per CTA, so the sums are exact functions of the CTA partials (not of the add order).
constexpr float MOE_OPROJ_LG_SCALE = 4294967296.f, MOE_OPROJ_LG_INV = 1.f / 4294967296.f;
constexpr float MOE_OPROJ_SS_SCALE = 1048576.f, MOE_OPROJ_SS_INV = 1.f / 1048576.f;

__device__ __forceinline__ long long moe_oproj_fix(float v, float s) {
#if defined(__CUDA_ARCH__)
  return __float2ll_rn(v * s);
#else
  return llrintf(v * s); // round to nearest even: __float2ll_rn
#endif
}
__device__ __forceinline__ void moe_oproj_red(unsigned long long *p, long long v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(p, (unsigned long long)v); // result unused: RED (two's complement: signed sums wrap exactly)
#else
  *p += (unsigned long long)v; // the emulation runs one CTA at a time
#endif
}
__device__ __forceinline__ float moe_oproj_unfix(unsigned long long v, float inv) {
#if defined(__CUDA_ARCH__)
  return __ll2float_rn((long long)v) * inv;
#else
  return (float)(long long)v * inv;
#endif
}
__device__ __forceinline__ unsigned long long moe_oproj_ldcg8(const unsigned long long *p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// moe_oproj_kernel's projection and partial logits, then the 33 REDs (threads 0 .. n_exp - 1 and 32).
template <int TO, int NB, int XR>
__global__ void __launch_bounds__(GEMV16_WARPS * 32)
moe_oproj2_kernel(float *__restrict__ y, const float *__restrict__ ox, const uint8_t *__restrict__ ow,
                  const float *__restrict__ obias, int64_t k, int64_t m, int64_t rb, const gemv5_nf F,
                  const float *__restrict__ rw, int n_exp) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  MOE10_SHARED float lp[GEMV16_WARPS][32];
  pdl_trigger();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row = (int64_t)blockIdx.x * GEMV16_WARPS + warp;
  const float rwv = lane < n_exp ? __ldg(rw + (int64_t)lane * m + row) : 0.f; // constant: before the wait
  gemv5_rows<TO, 1, NB, XR, 0, 1>(xsm, blockIdx.x, y, ox, ow, obias, 1, k, m, rb, 0, 1, F);
  lp[warp][lane] = rwv * F.xt[row];
  __syncthreads(); // lp; thread 0's F.ss[cta] (gemv5_rows) for thread 32
  if (tid < n_exp) {
    float s = lp[0][tid];
#pragma unroll
    for (int w = 1; w < GEMV16_WARPS; w++) s += lp[w][tid];
    moe_oproj_red(g_moe_oproj_acc + tid, moe_oproj_fix(s, MOE_OPROJ_LG_SCALE));
  } else if (tid == 32) {
    moe_oproj_red(g_moe_oproj_acc + 32, moe_oproj_fix(F.ss[blockIdx.x], MOE_OPROJ_SS_SCALE));
  }
}

// gate_up10 (one token) with the routing and x staging above in front; grid (ceil(m / 8), n_slots).
// xt: the producer's row (k floats, k <= 4096, k % 32 == 0); ids / wts as the route kernel writes them.
template <int T, int NB>
__global__ void __launch_bounds__(FFN_WARPS * 32, 4) // <= 64 registers: 32 warps per SM
moe_gate_up_oproj_kernel(uint16_t *__restrict__ acth, const float *xt, const uint8_t *__restrict__ wg,
                         const uint8_t *__restrict__ wu, const float *__restrict__ gb, const float *__restrict__ ub,
                         const float *__restrict__ rbias, int32_t *ids, float *wts, int n_exp, int n_slots, int k,
                         int m, int64_t rb, float alpha, float limit, float sc, float eps) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  MOE10_SHARED int sid[32];
  constexpr int NT = FFN_WARPS * 32, XB = 4;
  static_assert(XB * NT * 4 >= MOE10_NORM_MAX_N * MOE10_THREADS, "the entry declines dim > 4096");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float bias = warp == 0 && lane < n_exp && rbias ? __ldg(rbias + lane) : 0.f; // constant: before the wait
  pdl_wait(); // the sums and xt come from the producer; act is read by earlier ones
  pdl_trigger(); // after the wait: down reads the routing before its own wait (v6)
  const int n4 = k / 4, nch = k / 32;
  // one L2 round: xt, the sum of squares, warp 0 the 32 logit sums
  float4 xv[XB];
#pragma unroll
  for (int j = 0; j < XB; j++) {
    const int i = j * NT + tid;
    xv[j] = i < n4 ? moe_oproj_ldcg4(xt + 4 * i) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  const unsigned long long sacc = moe_oproj_ldcg8(g_moe_oproj_acc + 32);
  const unsigned long long lacc = warp == 0 ? moe_oproj_ldcg8(g_moe_oproj_acc + lane) : 0ull;
  const float r = rsqrtf(moe_oproj_unfix(sacc, MOE_OPROJ_SS_INV) / (float)k + eps); // gemv5_nf_scale's expression
  if (warp == 0) {
    const float v = lane < n_exp ? r * moe_oproj_unfix(lacc, MOE_OPROJ_LG_INV) + bias : 0.f;
    int id;
    float w;
    moe_topk32_warp(v, lane, n_exp, n_slots, id, w);
    if (lane < n_slots) {
      sid[lane] = id;
      if (blockIdx.x == 0 && blockIdx.y == 0) {
        ids[lane] = id;
        wts[lane] = w;
      }
    }
  }
  // xt staged as moe_oproj_kernel's tail stages it (each chunk's 1/scale times r): float4 i by thread i mod 256
  constexpr bool b14 = T == ORCH_T_MXFP4;
#pragma unroll
  for (int j = 0; j < XB; j++) {
    const int i0 = j * NT + warp * 32, i = i0 + lane;
    if (i0 < n4) moe10_stage4(xsm, nch, i >> 3, i & 7, i < n4, xv[j], dec16_traits<T>::kind, b14, r); // warp-uniform
  }
  __syncthreads(); // sid, the staged x
  const int row = blockIdx.x * FFN_WARPS + warp;
  const int p = (int)blockIdx.y;
  const int e = sid[p];
  const bool valid = row < m;
  const int64_t off = ((int64_t)e * m + (valid ? row : 0)) * rb;
  const float *xinv = reinterpret_cast<const float *>(xsm + nch * DEC16_XW);
  float ag = 0.f, au = 0.f;
  for (int c0 = 0; c0 < nch; c0 += 32 * NB) {
    wblocks<T, NB> bg, bu;
    ffn_load<T, NB>(bg, wg + off, c0, lane, nch, valid);
    ffn_load<T, NB>(bu, wu + off, c0, lane, nch, valid);
    moe6_dot2<T, NB>(bg, bu, xsm, xinv, c0, lane, nch, ag, au);
  }
  ag = warp_sum(ag);
  au = warp_sum(au);
  if (valid && lane == 0) { // gate_up10's epilogue
    const float g = ag + (gb ? gb[(int64_t)e * m + row] : 0.f);
    const float u = au + (ub ? ub[(int64_t)e * m + row] : 0.f);
    const float v = swiglu_oai(g, u, alpha, limit);
    int word, half;
    moe8_half_pos(dec16_traits<T>::kind, row & 31, word, half);
    acth[(((int64_t)p * (m / 32) + row / 32) * DEC16_XW + word) * 2 + half] =
        (uint16_t)(dec16_f2h2(v * sc, 0.f) & 0xFFFFu);
  }
}

template <int TO>
static void launch_moe_oproj2(cudaStream_t st, float *y, const float *ox, const uint8_t *ow, const float *obias,
                              int64_t k, int64_t m, int64_t rb, const gemv5_nf &F, const float *rw, int n_exp) {
  if constexpr (TO == ORCH_T_Q8_0 || TO == ORCH_T_Q4_0 || TO == ORCH_T_MXFP4) {
    constexpr int NB = gemv5_nb<TO, 1>();
    const size_t sm = gemv5_smem(k, 1) + gemv5_nf_smem(1, 0);
    auto go = [&](auto kern) {
      if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
      DEC16_LAUNCH_PDL(kern, dim3((unsigned)(m / GEMV16_WARPS)), GEMV16_WARPS * 32, sm, st, y, ox, ow, obias, k, m, rb,
                       F, rw, n_exp);
    };
    if (gemv5_stage_mode(k) == 1) go(moe_oproj2_kernel<TO, NB, 1>);
    else go(moe_oproj2_kernel<TO, NB, 0>);
  }
}
template <int T>
static void launch_gate_up_oproj(cudaStream_t st, float *act, const float *xt, const uint8_t *wg, const uint8_t *wu,
                                 const float *gb, const float *ub, const float *rbias, int32_t *ids, float *wts,
                                 int n_exp, int n_slots, int dim, int ff, float alpha, float limit, float eps) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4) {
    constexpr int NB = gate_up_nb<T>();
    const size_t sm = (size_t)moe10_xstride(dim / 32) * 4;
    auto kern = moe_gate_up_oproj_kernel<T, NB>;
    if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    dim3 grid((unsigned)ceil_div(ff, FFN_WARPS), (unsigned)n_slots, 1u);
    DEC16_LAUNCH_PDL(kern, grid, FFN_WARPS * 32, sm, st, reinterpret_cast<uint16_t *>(act), xt, wg, wu, gb, ub, rbias,
                     ids, wts, n_exp, n_slots, dim, ff, orch_row_bytes(T, dim), alpha, limit,
                     moe6_act_scale<T>(alpha, limit), eps);
  }
}

template <int TO>
static void launch_moe_oproj(cudaStream_t st, float *y, const float *ox, const uint8_t *ow, const float *obias,
                             int64_t k, int64_t m, int64_t rb, const gemv5_nf &F, const moe_oproj_args &A) {
  if constexpr (TO == ORCH_T_Q8_0 || TO == ORCH_T_Q4_0 || TO == ORCH_T_MXFP4) {
    constexpr int NB = gemv5_nb<TO, 1>();
    const size_t sm = gemv5_smem(k, 1) + gemv5_nf_smem(1, 0);
    auto go = [&](auto kern) {
      if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
      DEC16_LAUNCH_PDL(kern, dim3((unsigned)(m / GEMV16_WARPS)), GEMV16_WARPS * 32, sm, st, y, ox, ow, obias, k, m, rb,
                       F, A);
    };
    // x staged as orch_matmul_addnorm's producer stages it (gemv5_stage_mode)
    if (gemv5_stage_mode(k) == 1) go(moe_oproj_kernel<TO, NB, 1>);
    else go(moe_oproj_kernel<TO, NB, 0>);
  }
}

// ORCH_CUDA_MOE_OPROJ=0 turns orch_moe_decode_oproj off (it declines), =2 runs mode 2 (fixed-point sums, routing in
// gate_up), anything else mode 1 (the last-CTA tail); read on the first call (-1: unread; the emulation test sets it).
static int g_moe_oproj_env = -1;
static int moe_oproj_mode() {
  if (g_moe_oproj_env < 0) {
    const char *v = getenv("ORCH_CUDA_MOE_OPROJ");
    g_moe_oproj_env = v && std::strcmp(v, "0") == 0 ? 0 : v && std::strcmp(v, "2") == 0 ? 2 : 1;
  }
  return g_moe_oproj_env;
}
static bool moe_oproj_off() { return moe_oproj_mode() == 0; }
constexpr size_t MOE_OPROJ_MAX_SMEM = 96 * 1024; // matmul.cu GEMV3_MAX_SMEM: v5's limit on the staged x

extern "C" int orch_moe_decode_oproj(orch_ctx *ctx, const float *ox, const void *ow, int32_t owtype,
                                     const float *obias, int64_t ok, float *y, float *out, float *x, float *res,
                                     const float *norm_w, float eps, const void *router, int32_t router_type,
                                     const float *router_bias, int32_t n_exp, int32_t *ids, float *weights,
                                     const void *gate, const void *up, int32_t gu_type, const float *gate_bias,
                                     const float *up_bias, const void *down, int32_t down_type,
                                     const float *down_bias, float *act, float *ybuf, int64_t n, int32_t n_slots,
                                     int64_t dim, int64_t ff, float alpha, float limit, float *res2,
                                     const float *nw2, float *xt, float *ss) {
  const char *op = "moe_decode_oproj";
  ORCH_CHECK_ARG(ctx && ox && ow && y && out && x && res && norm_w && router && ids && weights && gate && up && down &&
                     act && ybuf,
                 op);
  const bool an = res2 != nullptr;
  ORCH_CHECK_ARG(an == (nw2 != nullptr) && an == (xt != nullptr) && an == (ss != nullptr), op);
  ORCH_CHECK_ARG(n >= 0 && n_slots > 0 && n_exp > 0 && n_slots <= n_exp && dim > 0 && ff > 0 && ok > 0, op);
  // Declines (nothing launched; the caller runs the projection and orch_moe_decode_norm / _addnorm): where
  // orch_moe_decode_addnorm (with the norm) declines — which covers orch_moe_decode_norm's declines at one token —,
  // n != 1, where orch_matmul would not run v5's one-token GEMV (ctx->gemv == 5: unpinned or v5) with one row per
  // warp, where the scratch cannot hold the partials, for unaligned pointers, and under ORCH_CUDA_MOE_OPROJ=0.
  const int64_t rb = orch_row_bytes(owtype, ok);
  const int64_t C = dim / FFN_WARPS; // the projection's CTAs
  const int64_t ssp_off = moe10_ybuf_floats(1, dim, n_exp);
  if (n != 1 || moe_oproj_off() || !(ctx->moe_auto || moe10_pinned(ctx)) || moe13_pinned() ||
      (moe13_on(ctx, n) &&
       !moe13_declines(ctx, n, router_type, n_exp, gu_type, down_type, n_slots, dim, ff, alpha, limit)) ||
      dim > MOE10_NORM_MAX_N * MOE10_THREADS || dim % FFN_WARPS || C > GEMV5_NF_MAX || moe_only() ||
      moe10_declines(ctx, n, router_type, n_exp, gu_type, down_type, n_slots, dim, ff, alpha, limit) ||
      !ffn_type(owtype) || ok % 32 || rb <= 0 || ctx->gemv != 5 || (dim * rb) % 4 ||
      gemv5_smem(ok, 1) > MOE_OPROJ_MAX_SMEM || gemv5_rpw(dim) != 1 ||
      (int64_t)n_exp * C > n * n_slots * ff || ssp_off + C > n * n_slots * dim ||
      !aligned16p(ox) || !aligned16p(ow) || !aligned16p(x) || !aligned16p(act) || !aligned16p(ybuf) ||
      !aligned16p(router) || !aligned16p(gate) || !aligned16p(up) || !aligned16p(down)) {
    return ORCH_ERR_UNSUPPORTED; // (no error recorded: as the other MoE decode entries)
  }
  const int S = (int)((dim + MOE10_RK - 1) / MOE10_RK);
  uint32_t *xg = reinterpret_cast<uint32_t *>(ybuf + (((int64_t)S * n_exp + 3) & ~(int64_t)3)); // launch_decode10's
  gemv5_nf F;
  F.res = res, F.w = norm_w, F.xt = x, F.ss = ybuf + ssp_off, F.eps = eps;
  moe_oproj_args A;
  A.rw = (const float *)router, A.rbias = router_bias, A.part = act, A.xg = xg, A.ids = ids, A.wts = weights;
  A.n_exp = n_exp, A.k_slots = n_slots;
  A.kind = gu_type == ORCH_T_Q8_0 ? dec16_traits<ORCH_T_Q8_0>::kind : dec16_traits<ORCH_T_MXFP4>::kind; // Q4_0: = MXFP4
  A.x14 = gu_type == ORCH_T_MXFP4 ? 1 : 0;
  const moe10_addnorm av{res2, nw2, xt, ss};
  if (moe_oproj_mode() == 2) { // F.ss: the producer's per-CTA partials still land in the scratch (unused)
    ORCH_DISPATCH_TYPE(owtype, launch_moe_oproj2, ctx->stream, y, ox, (const uint8_t *)ow, obias, ok, dim, rb, F,
                       (const float *)router, (int)n_exp);
    ORCH_DISPATCH_TYPE(gu_type, launch_gate_up_oproj, ctx->stream, act, x, (const uint8_t *)gate, (const uint8_t *)up,
                       gate_bias, up_bias, router_bias, ids, weights, (int)n_exp, (int)n_slots, (int)dim, (int)ff,
                       alpha, limit, eps);
    ORCH_DISPATCH_TYPE(gu_type, launch_decode10, ctx->stream, out, x, (const float *)router, router_bias, (int)n_exp,
                       ids, weights, (const uint8_t *)gate, (const uint8_t *)up, gate_bias, up_bias,
                       (const uint8_t *)down, down_bias, act, ybuf, 1, (int)n_slots, (int)dim, (int)ff, alpha, limit,
                       4 | 2, nullptr, an ? &av : nullptr, true);
    ORCH_LAUNCHED(op);
    return ORCH_OK;
  }
  ORCH_DISPATCH_TYPE(owtype, launch_moe_oproj, ctx->stream, y, ox, (const uint8_t *)ow, obias, ok, dim, rb, F, A);
  ORCH_DISPATCH_TYPE(gu_type, launch_decode10, ctx->stream, out, x, (const float *)router, router_bias, (int)n_exp, ids,
                     weights, (const uint8_t *)gate, (const uint8_t *)up, gate_bias, up_bias, (const uint8_t *)down,
                     down_bias, act, ybuf, 1, (int)n_slots, (int)dim, (int)ff, alpha, limit, 4, nullptr,
                     an ? &av : nullptr);
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}

// The struct form for Go (purego passes at most 32 integer arguments): the same call.
static_assert(sizeof(orch_moe_oproj_args) == 264 && offsetof(orch_moe_oproj_args, ss) == 184 &&
                  offsetof(orch_moe_oproj_args, ok) == 192 && offsetof(orch_moe_oproj_args, ff) == 216 &&
                  offsetof(orch_moe_oproj_args, owtype) == 224 && offsetof(orch_moe_oproj_args, n_slots) == 244 &&
                  offsetof(orch_moe_oproj_args, eps) == 248 && offsetof(orch_moe_oproj_args, limit) == 256,
              "the Go mirror: sdk/ml/cuda/lib.go oprojArgs");
extern "C" int orch_moe_decode_oproj_args(orch_ctx *ctx, const orch_moe_oproj_args *a) {
  ORCH_CHECK_ARG(a, "moe_decode_oproj");
  return orch_moe_decode_oproj(ctx, a->ox, a->ow, a->owtype, a->obias, a->ok, a->y, a->out, a->x, a->res, a->norm_w,
                               a->eps, a->router, a->router_type, a->router_bias, a->n_exp, a->ids, a->weights, a->gate,
                               a->up, a->gu_type, a->gate_bias, a->up_bias, a->down, a->down_type, a->down_bias, a->act,
                               a->ybuf, a->n, a->n_slots, a->dim, a->ff, a->alpha, a->limit, a->res2, a->nw2, a->xt,
                               a->ss);
}
