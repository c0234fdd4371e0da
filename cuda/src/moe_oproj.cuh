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
// W: warps per CTA (moe_oproj_warps; m % W == 0). The partial logits and sums of squares are kept per 8 rows
// whatever W (C = m / 8 slots), so every sum, and the output, is the 8-warp kernel's bit for bit.
template <int TO, int NB, int XR, int W = GEMV16_WARPS>
__global__ void __launch_bounds__(W * 32, gemv5_minb<W>(0))
moe_oproj_kernel(float *__restrict__ y, const float *__restrict__ ox, const uint8_t *__restrict__ ow,
                 const float *__restrict__ obias, int64_t k, int64_t m, int64_t rb, const gemv5_nf F,
                 const moe_oproj_args A) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  MOE10_SHARED unsigned last;
  MOE10_SHARED float lp[W][32];               // each warp's products router[e][row] * xt[row]
  MOE10_SHARED __align__(16) float ssh[GEMV5_NF_MAX]; // last CTA: the sum-of-squares partials
  MOE10_SHARED float lg[32];
  pdl_trigger();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  constexpr int G = W / GEMV16_WARPS;  // 8-row slots per CTA
  const int C = (int)gridDim.x * G;    // slots: m / 8
  const int64_t row = (int64_t)blockIdx.x * W + warp;
  const float rwv = lane < A.n_exp ? __ldg(A.rw + (int64_t)lane * m + row) : 0.f; // constant: before the wait
  gemv5_rows<TO, 1, NB, XR, 0, 1, W>(xsm, blockIdx.x, y, ox, ow, obias, 1, k, m, rb, 0, 1, F);
  // gemv5_rows ends with a barrier after lane 0 of every warp wrote its row's xt (F.xt) and thread g its slot's ssp
  lp[warp][lane] = rwv * F.xt[row];
  __syncthreads();
  if (tid < 32 * G && (tid & 31) < A.n_exp) { // thread (g, e): slot g's 8 warps in order
    const int e = tid & 31, g = tid >> 5;
    float s = lp[g * GEMV16_WARPS][e];
#pragma unroll
    for (int w = 1; w < GEMV16_WARPS; w++) s += lp[g * GEMV16_WARPS + w][e];
    A.part[(int64_t)e * C + blockIdx.x * G + g] = s;
  }
  moe10_fence(); // this thread's y / res / xt / ssp / part writes before the ticket
  __syncthreads();
  if (tid == 0)
    last = moe10_ticket(&g_moe_oproj_ticket, gridDim.x - 1u) == gridDim.x - 1u;
  __syncthreads();
  if (!last) return; // uniform over the CTA
  moe10_fence();
  // Everything below reads other CTAs' writes through L2, all loads issued before the first use: the row's xt (for
  // the staging; dim <= 4096: at most XB float4s a thread), the sums of squares, and the partial logits (thread
  // (e, q) sums float4 slots q, q + 8, ... of expert e's row, C % 4 == 0; one batch of JM for C <= 32 JM).
  constexpr int NT = W * 32, XB = 1024 / NT, SB = GEMV5_NF_MAX / NT, JM = 12;
  // the router bias (a weight) with the tail's first loads, not a round trip of its own after the sums (session 14)
  const float rbv = warp == 0 && lane < A.n_exp && A.rbias ? A.rbias[lane] : 0.f;
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
    if (q == 0 && e < 32) lg[e] = s; // 0 for e >= n_exp
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
    const float v = lane < A.n_exp ? r * lg[lane] + (A.rbias ? rbv : 0.f) : 0.f;
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

// Warps per CTA of moe_oproj_kernel (session 13): 32 by default where dim % 32 == 0, else 8; ORCH_CUDA_OPROJ_W=8 /
// 16 / 32 pins it. x (the attention output, k floats) is staged once per CTA, 90 times instead of 360 at gpt-oss's
// dim 2880, and the last CTA's tail runs on 1024 threads. Device run 6 (H100, same call): gpt-oss tg128 641.8 /
// 640.3 at 32, 640.6 / 639.8 at 16, 634.2 / 635.7 at 8. Read once per process; g_moe_oproj_w_force (emulation
// tests) overrides it.
static int g_moe_oproj_w_force = 0;
static inline int moe_oproj_warps(int64_t m) {
  static const int v = [] {
    const char *e = getenv("ORCH_CUDA_OPROJ_W");
    const int w = e ? atoi(e) : 32;
    return w == 16 || w == 32 ? w : GEMV16_WARPS;
  }();
  const int w = g_moe_oproj_w_force ? g_moe_oproj_w_force : v;
  return m % w == 0 ? w : GEMV16_WARPS;
}

// Blocks a lane a round of the 32-warp CTAs on Q8_0 rows (session 14): 4, so a k = 4096 row (gpt-oss, 128 blocks) is
// one round, all requested before the PDL wait (with 3, a quarter of each row waited for the x staging and the CTAs
// that start late beside attention made two DRAM round trips). Device run 7 (H100, same call): gpt-oss tg128 685.9 /
// 687.5 vs 681.9 / 681.6 with ORCH_CUDA_OPROJ_NB=3 (the old kernels). sm_90a: 64 registers, 4 bytes spill. Same
// blocks per lane in the same order: bit-identical (the emulation compares it with the 8- and 16-warp kernels, which
// keep 3). Read once per process; g_moe_oproj_nb_force (emulation tests) overrides it.
static int g_moe_oproj_nb_force = 0;
static bool moe_oproj_nb4() {
  static const bool v = [] {
    const char *e = getenv("ORCH_CUDA_OPROJ_NB");
    return !(e && std::strcmp(e, "3") == 0);
  }();
  return g_moe_oproj_nb_force ? g_moe_oproj_nb_force == 4 : v;
}

template <int TO>
static void launch_moe_oproj(cudaStream_t st, float *y, const float *ox, const uint8_t *ow, const float *obias,
                             int64_t k, int64_t m, int64_t rb, const gemv5_nf &F, const moe_oproj_args &A) {
  if constexpr (TO == ORCH_T_Q8_0 || TO == ORCH_T_Q4_0 || TO == ORCH_T_MXFP4) {
    constexpr int NB = gemv5_nb<TO, 1>();
    const int w = moe_oproj_warps(m);
    const size_t sm = gemv5_smem(k, 1) + gemv5_nf_smem(1, 0, w);
    auto go = [&](auto kern) {
      if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
      DEC16_LAUNCH_PDL(kern, dim3((unsigned)(m / w)), w * 32, sm, st, y, ox, ow, obias, k, m, rb, F, A);
    };
    // x staged as orch_matmul_addnorm's producer stages it (gemv5_stage_mode)
    const bool xr = gemv5_stage_mode(k) == 1;
    if constexpr (TO == ORCH_T_Q8_0)
      if (w == 32 && !xr && moe_oproj_nb4()) return go(moe_oproj_kernel<TO, 4, 0, 32>);
    if (w == 32) xr ? go(moe_oproj_kernel<TO, NB, 1, 32>) : go(moe_oproj_kernel<TO, NB, 0, 32>);
    else if (w == 16) xr ? go(moe_oproj_kernel<TO, NB, 1, 16>) : go(moe_oproj_kernel<TO, NB, 0, 16>);
    else xr ? go(moe_oproj_kernel<TO, NB, 1>) : go(moe_oproj_kernel<TO, NB, 0>);
  }
}

// ORCH_CUDA_MOE_OPROJ=0 turns orch_moe_decode_oproj off (it declines); read on the first call (-1: unread; the
// emulation test resets it).
static int g_moe_oproj_env = -1;
static bool moe_oproj_off() {
  if (g_moe_oproj_env < 0) {
    const char *v = getenv("ORCH_CUDA_MOE_OPROJ");
    g_moe_oproj_env = v && std::strcmp(v, "0") == 0 ? 0 : 1;
  }
  return g_moe_oproj_env == 0;
}
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
  const bool rp = moe_dual(gu_type, down_type);
  // ORCH_T_Q8_0_DUAL: the projection reads the original rows. On the repacked ones (ORCH_T_Q8_0R) this kernel ran
  // ~1 us slower a layer (TestPerfMoEOProj 51.5-51.6 vs 50.6-50.7 us, H100, session 12 run 4) although the plain
  // GEMV of that shape gained 0.5 us: gpt-oss tg128 lost ~0.5% against the MoE rows repacked alone.
  q8_dual(owtype);
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
  ORCH_DISPATCH_TYPE(owtype, launch_moe_oproj, ctx->stream, y, ox, (const uint8_t *)ow, obias, ok, dim, rb, F, A);
  const moe10_addnorm av{res2, nw2, xt, ss};
  ORCH_DISPATCH_TYPE(gu_type, launch_decode10, ctx->stream, out, x, (const float *)router, router_bias, (int)n_exp, ids,
                     weights, (const uint8_t *)gate, (const uint8_t *)up, gate_bias, up_bias, (const uint8_t *)down,
                     down_bias, act, ybuf, 1, (int)n_slots, (int)dim, (int)ff, alpha, limit, 4, nullptr,
                     an ? &av : nullptr, rp);
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
