// moe_dec10.cuh — MoE v10 (session 5, ORCH_CUDA_MOE=v10): the whole MoE
// decode op at 1..8 tokens in three launches (v6: router GEMV, top-k,
// gate_up, down = four), included by moe_ffn.cu (it uses v6's decoder, dots
// and fixed activation scale).
//  1. moe10_route_kernel: grid (ceil(dim / 64), n). CTA s takes x[64s, 64s+64)
//     of token t: the 32 x 64 router weights (F32, constant: loaded before
//     pdl_wait) dotted into per-slice partial logits, and x's two chunks
//     staged exactly as v6's gate_up stages them (chunk-scaled fp16, times 2^14
//     for MXFP4) into scratch — once per token instead of once per gate_up CTA.
//     The last CTA of a token (atomic ticket, wrapping back to 0 by itself:
//     graph-safe) sums the partials in slice order, adds the bias and runs v6's
//     top-k (moe_topk32_warp): ids and weights. No separate top-k launch.
//  2. moe_gate_up10_kernel: v6's gate_up (same rows per warp, same dots) with
//     the staged x copied in (no per-CTA staging: no chunk max, no
//     conversions), and the activation written directly in down's staged form
//     (v6's fixed power-of-two scale, fp16; as v8).
//  3. moe_down10_kernel: v6's down (double-buffered slots, speculative
//     routing read before pdl_wait) with the staged activation copied in (half
//     the L2 bytes of v6's float rows, no conversions).
// Per token and slot, every product, fp16 partial sum and fold is v6's in
// v6's order, so with the same ids and weights the output is v6's bit for bit
// (cuda/test/moe_emu_test.cpp). The router logits are summed in another order
// than orch_matmul's (fp32 rounding only), so near-tied experts may be picked
// differently from v6's path; ids and weights are exact functions of them.
// The ticket counters are per device (static): MoE v10 ops of one process must
// not run concurrently on two streams of the same device (orch runs each
// device's ops on its context's one stream).
#pragma once
#include <cstring>

#include "moe_route.cuh"

constexpr int MOE10_MAX_N = 8;  // tokens per op (one ticket each)
constexpr int MOE10_RK = 64;    // router k per route CTA: two staged chunks
constexpr int MOE10_THREADS = 256;

__device__ unsigned g_moe10_ticket[MOE10_MAX_N];

#if defined(ORCH_EMU)
#define MOE10_SHARED static // one CTA at a time: a static local is the CTA's shared variable
#else
#define MOE10_SHARED __shared__
#endif

// Atomic ticket: returns the old value and wraps to 0 after lim (atomicInc).
__device__ __forceinline__ unsigned moe10_ticket(unsigned *p, unsigned lim) {
#if defined(__CUDA_ARCH__)
  return atomicInc(p, lim);
#else
  const unsigned o = *p; // the emulation runs one CTA at a time
  *p = o >= lim ? 0u : o + 1u;
  return o;
#endif
}
__device__ __forceinline__ void moe10_fence() {
#if defined(__CUDA_ARCH__)
  __threadfence();
#endif
}
// Reads of data written by other CTAs of the same kernel: through L2 (L1 is
// not coherent).
__device__ __forceinline__ float moe10_ldcg(const float *p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}
__device__ __forceinline__ uint4 moe10_ldcg4(const uint4 *p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// ORCH_CUDA_MOE10_PF=1: while gate_up runs, its warps prefetch the routed
// experts' down weights into L2 (prefetch.global.L2, fire and forget), and
// load their own gate / up words with the evict-first (streaming) policy, so
// that gate_up's once-read stream does not push the prefetched lines out:
// down then reads its weights from L2 (gate_up alone keeps DRAM ~60% busy at
// one token — the gaps carry down's bytes).
__device__ __forceinline__ void moe10_prefetch_l2(const void *p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
  (void)p;
#endif
}
__device__ __forceinline__ uint32_t moe10_ldcs(const uint32_t *p) {
#if defined(__CUDA_ARCH__)
  return __ldcs(p);
#else
  return *p;
#endif
}
// ffn_load, with the evict-first policy when CS.
template <int T, int NB, bool CS>
__device__ __forceinline__ void moe10_load(wblocks<T, NB> &b, const uint8_t *__restrict__ wr, int c0, int lane,
                                           int nch, bool valid) {
  if constexpr (!CS) {
    ffn_load<T, NB>(b, wr, c0, lane, nch, valid);
  } else {
    constexpr int BB = type_block_bytes(T);
#pragma unroll
    for (int i = 0; i < NB; i++) {
      const int c = c0 + lane + 32 * i;
      const bool ok = valid && c < nch;
      const uintptr_t p = (uintptr_t)(wr + (int64_t)(ok ? c : 0) * BB);
      b.sh[i] = (uint32_t)(p & 3);
      const uint32_t *q = reinterpret_cast<const uint32_t *>(p & ~(uintptr_t)3);
#pragma unroll
      for (int j = 0; j < block_words<T>(); j++) b.w[i][j] = ok ? moe10_ldcs(q + j) : 0u;
    }
  }
}
// Prefetch bytes [lo, hi) of base into L2, 128-byte lines, threads i0, i0 + step, ...
__device__ __forceinline__ void moe10_prefetch_range(const uint8_t *base, int64_t lo, int64_t hi, int i0, int step) {
  for (int64_t a = lo + (int64_t)i0 * 128; a < hi; a += (int64_t)step * 128) moe10_prefetch_l2(base + a);
}

// Words of one token's staged x: nch chunks of DEC16_XW words, then nch
// 1/scale floats, rounded up to whole uint4s.
DEC16_HD int moe10_xstride(int nch) { return (nch * DEC16_XW + nch + 3) & ~3; }

#if defined(__CUDACC__) || defined(ORCH_EMU)
// n4 uint4s from global src (written by an earlier kernel) into shared dst;
// B loads per thread in flight. Caller syncs.
template <int B> __device__ __forceinline__ void moe10_copy(uint4 *dst, const uint4 *src, int n4) {
  for (int b = (int)threadIdx.x; b < n4; b += B * (int)blockDim.x) {
    uint4 v[B];
#pragma unroll
    for (int j = 0; j < B; j++) {
      const int i = b + j * (int)blockDim.x;
      if (i < n4) v[j] = moe10_ldcg4(src + i);
    }
#pragma unroll
    for (int j = 0; j < B; j++) {
      const int i = b + j * (int)blockDim.x;
      if (i < n4) dst[i] = v[j];
    }
  }
}
#endif

// part: [n][S][n_exp] partial logits; xg: n rows of xstride words (staged x,
// then xinv); ids / wts: [n][k_slots]. kind / x14: the staging of weight type
// T (dec16_traits<T>::kind, T == MXFP4).
__global__ void __launch_bounds__(MOE10_THREADS)
moe10_route_kernel(float *__restrict__ part, uint32_t *__restrict__ xg, int32_t *__restrict__ ids,
                   float *__restrict__ wts, const float *__restrict__ x, const float *__restrict__ rw,
                   const float *__restrict__ rbias, int dim, int n_exp, int k_slots, int kind, int x14) {
  MOE10_SHARED unsigned last;
  const int s = blockIdx.x, t = blockIdx.y, S = gridDim.x;
  const int tid = threadIdx.x, e = tid >> 3, q = tid & 7;
  const int k0 = s * MOE10_RK + 8 * q; // this thread's 8 elements of expert e's row
  const bool ok0 = e < n_exp && k0 < dim, ok1 = e < n_exp && k0 + 4 < dim;
  const float4 z4 = make_float4(0.f, 0.f, 0.f, 0.f);
  // The router weights are constant (uploaded before any step): read before the wait.
  const float4 w0 = ok0 ? __ldg(reinterpret_cast<const float4 *>(rw + (int64_t)e * dim + k0)) : z4;
  const float4 w1 = ok1 ? __ldg(reinterpret_cast<const float4 *>(rw + (int64_t)e * dim + k0 + 4)) : z4;
  pdl_wait(); // x comes from the previous kernel; part / xg / ids / wts are read by earlier ones
  pdl_trigger();
  const float *xt = x + (int64_t)t * dim;
  const float4 x0 = ok0 ? *reinterpret_cast<const float4 *>(xt + k0) : z4;
  const float4 x1 = ok1 ? *reinterpret_cast<const float4 *>(xt + k0 + 4) : z4;
  float acc = w0.x * x0.x;
  acc = fmaf(w0.y, x0.y, acc);
  acc = fmaf(w0.z, x0.z, acc);
  acc = fmaf(w0.w, x0.w, acc);
  acc = fmaf(w1.x, x1.x, acc);
  acc = fmaf(w1.y, x1.y, acc);
  acc = fmaf(w1.z, x1.z, acc);
  acc = fmaf(w1.w, x1.w, acc);
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  acc += __shfl_xor_sync(0xffffffffu, acc, 2);
  acc += __shfl_xor_sync(0xffffffffu, acc, 4);
  if (q == 0 && e < n_exp) part[((int64_t)t * S + s) * n_exp + e] = acc;
  // Stage the slice's chunks (2s, 2s+1): moe6_stage's values (the 8 lanes of
  // a chunk share its max), written where gate_up10 copies them from.
  const int nch = dim / 32;
  if (tid < 32) {
    const int kk = s * MOE10_RK + 4 * tid;
    const bool ok = tid < 16 && kk < dim;
    const float4 v = ok ? *reinterpret_cast<const float4 *>(xt + kk) : z4;
    uint32_t mx = max(max(dec16_absbits(v.x), dec16_absbits(v.y)), max(dec16_absbits(v.z), dec16_absbits(v.w)));
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
    float sc, inv;
    dec16_chunk_scale(mx, sc, inv);
    if (ok) {
      const int c = kk >> 5, o = tid & 7;
      uint32_t *xr = xg + (int64_t)t * moe10_xstride(nch);
      const bool b14 = x14 != 0;
      dec16_put4(xr + c * DEC16_XW, kind, o, moe6_x14(v.x * sc, b14), moe6_x14(v.y * sc, b14),
                 moe6_x14(v.z * sc, b14), moe6_x14(v.w * sc, b14));
      if (o == 0) reinterpret_cast<float *>(xr + nch * DEC16_XW)[c] = inv;
    }
  }
  // The last CTA of token t (ticket) routes it.
  moe10_fence(); // this thread's partial / staged writes before the ticket
  __syncthreads();
  if (tid == 0) last = moe10_ticket(&g_moe10_ticket[t], (unsigned)(S - 1)) == (unsigned)(S - 1);
  __syncthreads();
  if (!last) return; // uniform over the CTA
  moe10_fence();
  // Thread (e, q) sums the partials of slices q, q + 8, ... (all its loads in
  // flight at once: one L2 round trip, not S / 8 dependent ones), then the 8
  // threads of expert e add theirs in a fixed tree: deterministic.
  MOE10_SHARED float lg[32];
  {
    constexpr int JM = 8; // slices per thread in flight (S <= 64: dim <= 4096)
    const float *pp = part + (int64_t)t * S * n_exp + e;
    float pv[JM];
#pragma unroll
    for (int j = 0; j < JM; j++) {
      const int sl = q + 8 * j;
      pv[j] = e < n_exp && sl < S ? moe10_ldcg(pp + (int64_t)sl * n_exp) : 0.f;
    }
    float v = 0.f;
#pragma unroll
    for (int j = 0; j < JM; j++) v += pv[j];
    for (int sl = q + 8 * JM; sl < S; sl += 8) v += e < n_exp ? moe10_ldcg(pp + (int64_t)sl * n_exp) : 0.f;
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    if (q == 0) lg[e] = v;
  }
  __syncthreads();
  if (tid < 32) {
    float v = 0.f;
    if (tid < n_exp) v = lg[tid] + (rbias ? rbias[tid] : 0.f);
    int id;
    float w;
    moe_topk32_warp(v, tid, n_exp, k_slots, id, w);
    if (tid < k_slots) {
      ids[t * k_slots + tid] = id;
      wts[t * k_slots + tid] = w;
    }
  }
}

// act (staged for down: pair p's chunk c at acth words ((p * nch_m + c) *
// DEC16_XW), v6's fixed scale sc) = swiglu(x[t] . gate_e[row] + gb, x[t] .
// up_e[row] + ub), t = blockIdx.z, slot blockIdx.y: v6's gate_up rows and dots
// with x copied from the route kernel's staging.
template <int T, int NB, bool PF>
__global__ void __launch_bounds__(FFN_WARPS * 32, 4) // <= 64 registers: 32 warps per SM
moe_gate_up10_kernel(uint16_t *__restrict__ acth, const uint4 *xg, const uint8_t *__restrict__ wg,
                     const uint8_t *__restrict__ wu, const float *__restrict__ gb, const float *__restrict__ ub,
                     const int32_t *__restrict__ ids, int n_slots, int k, int m, int64_t rb, float alpha, float limit,
                     float sc, const uint8_t *__restrict__ wd, int64_t dbytes) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  pdl_wait(); // ids / staged x come from the route kernel; act is read by earlier ones
  pdl_trigger(); // after the wait: down reads the routing before its own wait (v6)
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * FFN_WARPS + (threadIdx.x >> 5);
  const int p = (int)blockIdx.z * n_slots + (int)blockIdx.y;
  const int e = ids[p];
  const bool valid = row < m;
  const int64_t off = ((int64_t)e * m + (valid ? row : 0)) * rb;
  const int nch = k / 32, xs4 = moe10_xstride(nch) / 4;
  const float *xinv = reinterpret_cast<const float *>(xsm + nch * DEC16_XW);
  float ag = 0.f, au = 0.f;
  for (int c0 = 0; c0 < nch; c0 += 32 * NB) {
    wblocks<T, NB> bg, bu;
    moe10_load<T, NB, PF>(bg, wg + off, c0, lane, nch, valid);
    moe10_load<T, NB, PF>(bu, wu + off, c0, lane, nch, valid);
    if (c0 == 0) { // uniform over the CTA
      if (PF) // this CTA's share of its expert's down matrix
        moe10_prefetch_range(wd + (int64_t)e * dbytes, dbytes * blockIdx.x / gridDim.x,
                             dbytes * (blockIdx.x + 1) / gridDim.x, threadIdx.x, blockDim.x);
      moe10_copy<2>(reinterpret_cast<uint4 *>(xsm), xg + (int64_t)blockIdx.z * xs4, xs4);
      __syncthreads();
    }
    moe6_dot2<T, NB>(bg, bu, xsm, xinv, c0, lane, nch, ag, au);
  }
  ag = warp_sum(ag);
  au = warp_sum(au);
  if (valid && lane == 0) {
    const float g = ag + (gb ? gb[(int64_t)e * m + row] : 0.f);
    const float u = au + (ub ? ub[(int64_t)e * m + row] : 0.f);
    const float v = swiglu_oai(g, u, alpha, limit);
    int word, half;
    moe8_half_pos(dec16_traits<T>::kind, row & 31, word, half);
    // moe6_stage_fixed's value: v * sc to fp16
    acth[(((int64_t)p * (m / 32) + row / 32) * DEC16_XW + word) * 2 + half] =
        (uint16_t)(dec16_f2h2(v * sc, 0.f) & 0xFFFFu);
  }
}

// Streaming gate_up (ORCH_CUDA_MOE10_STREAM=1 under v10): one wave of CTAs
// (2 per SM: <= 128 registers), each warp walking row pairs (pair p, row)
// strided over the grid, double-buffered — the next row pair's gate and up
// words are loaded before the current one is computed — so the weight stream
// does not stop between waves / CTA prologues (v6: 2.7 waves of 8-row CTAs at
// one token, each loading, then computing). v5 tried this with two rounds of
// 2 blocks per lane (70% of the lanes busy in the second round at k = 2880);
// here one round of NB = 3 blocks covers k <= 96 * 32. Same dots and
// activation as gate_up10 (bit-identical); all n tokens' staged x in shared
// memory.
template <int T, int NB, bool PF>
__global__ void __launch_bounds__(FFN_WARPS * 32, 2)
moe_gate_up10s_kernel(uint16_t *__restrict__ acth, const uint4 *xg, const uint8_t *__restrict__ wg,
                      const uint8_t *__restrict__ wu, const float *__restrict__ gb, const float *__restrict__ ub,
                      const int32_t *__restrict__ ids, int n, int n_slots, int k, int m, int64_t rb, float alpha,
                      float limit, float sc, const uint8_t *__restrict__ wd, int64_t dbytes) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  pdl_wait(); // ids / staged x come from the route kernel; act is read by earlier ones
  pdl_trigger();
  const int lane = threadIdx.x & 31;
  const int gw = blockIdx.x * FFN_WARPS + (threadIdx.x >> 5), nw = gridDim.x * FFN_WARPS;
  const int nch = k / 32, xs = moe10_xstride(nch);
  const int total = n * n_slots * m;
  const int cnt = gw < total ? (total - gw + nw - 1) / nw : 0;
  auto load = [&](wblocks<T, NB> &bg, wblocks<T, NB> &bu, int j) {
    const bool valid = j < cnt;
    const int i = valid ? gw + j * nw : 0;
    const int p = i / m, row = i - p * m;
    const int e = ids[p];
    const int64_t off = ((int64_t)e * m + row) * rb;
    moe10_load<T, NB, PF>(bg, wg + off, 0, lane, nch, valid);
    moe10_load<T, NB, PF>(bu, wu + off, 0, lane, nch, valid);
    if (PF && valid) // the share of expert e's down matrix that goes with this row
      moe10_prefetch_range(wd + (int64_t)e * dbytes, dbytes * row / m, dbytes * (row + 1) / m, lane, 32);
  };
  auto compute = [&](const wblocks<T, NB> &bg, const wblocks<T, NB> &bu, int j) {
    const int i = gw + j * nw;
    const int p = i / m, row = i - p * m, t = p / n_slots;
    const uint32_t *xh = xsm + t * xs;
    float ag = 0.f, au = 0.f;
    moe6_dot2<T, NB>(bg, bu, xh, reinterpret_cast<const float *>(xh + nch * DEC16_XW), 0, lane, nch, ag, au);
    ag = warp_sum(ag);
    au = warp_sum(au);
    if (lane == 0) {
      const int e = ids[p];
      const float g = ag + (gb ? gb[(int64_t)e * m + row] : 0.f);
      const float u = au + (ub ? ub[(int64_t)e * m + row] : 0.f);
      const float v = swiglu_oai(g, u, alpha, limit);
      int word, half;
      moe8_half_pos(dec16_traits<T>::kind, row & 31, word, half);
      acth[(((int64_t)p * (m / 32) + row / 32) * DEC16_XW + word) * 2 + half] =
          (uint16_t)(dec16_f2h2(v * sc, 0.f) & 0xFFFFu);
    }
  };
  wblocks<T, NB> g0, u0, g1, u1;
  load(g0, u0, 0);
  moe10_copy<2>(reinterpret_cast<uint4 *>(xsm), xg, n * xs / 4);
  __syncthreads();
  for (int j = 0; j < cnt; j += 2) {
    load(g1, u1, j + 1);
    compute(g0, u0, j);
    if (j + 1 < cnt) {
      load(g0, u0, j + 2);
      compute(g1, u1, j + 1);
    }
  }
}

// Grouped streaming gate_up (ORCH_CUDA_MOE10_STREAM=2 under v10; for n > 1):
// gate_up10s with the row pairs of an expert shared by its tokens — each
// weight row is loaded and decoded once for up to MOE10_GT of the tokens
// routed to that expert (moe8_block_acc: v6's HFMA2s per token), so at n = 8
// (32 pairs, ~21.5 distinct experts) a third fewer rows are read. Each CTA
// buckets the pairs by expert once (warp 0, MOE10_MAX_N tokens at most: lane e
// scans the ids for expert e) into groups q = (expert, up to MOE10_GT pairs);
// work items are (group, row), strided over the one-wave grid. Per token the
// products, partial sums and folds are v6's in v6's order (bit-identical act).
constexpr int MOE10_GT = 4;         // tokens per group (registers: 2 x 30 weight words + 4 x 4 accumulators)
constexpr int MOE10_MAXQ = 32 + 64; // groups: <= n_exp + pairs / MOE10_GT
// ints after the staged x: nq, then per group q: expert, count, MOE10_GT pairs
constexpr int MOE10_QW = 2 + MOE10_GT;
static size_t moe10g_list_bytes(int np) { return (size_t)(4 + MOE10_MAXQ * MOE10_QW + np + 32 * MOE10_MAX_N) * 4; }

// CTA-wide (all threads; syncs): the np pairs bucketed by expert (ids out of
// range — NaN logits only — count as expert 0, as v9), each expert's pairs in
// ascending order cut into groups of <= MOE10_GT: ql[0] = group count, group
// q at ql + 4 + q * MOE10_QW = {expert, count, pairs...}, ascending experts.
// sid: np ints, pl: 32 * MOE10_MAX_N ints of shared scratch. n_exp <= 32.
__device__ __forceinline__ void moe10_groups(const int32_t *__restrict__ ids, int np, int n_exp, int *ql, int *sid,
                                             int *pl) {
  const int lane = threadIdx.x & 31;
  for (int i = threadIdx.x; i < np; i += blockDim.x) {
    const int id = ids[i];
    sid[i] = id >= 0 && id < n_exp ? id : 0;
  }
  __syncthreads();
  if (threadIdx.x < 32) { // lane e: expert e's pairs
    int cnt = 0;
    if (lane < n_exp)
      for (int p = 0; p < np; p++)
        if (sid[p] == lane && cnt < MOE10_MAX_N) pl[lane * MOE10_MAX_N + cnt++] = p;
    const int ng = (cnt + MOE10_GT - 1) / MOE10_GT;
    int off = ng; // inclusive scan of the group counts over the lanes
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_sync(0xffffffffu, off, lane >= o ? lane - o : 0);
      if (lane >= o) off += v;
    }
    off -= ng;
    for (int g = 0; g < ng; g++) {
      int *q = ql + 4 + (off + g) * MOE10_QW;
      const int c = min(MOE10_GT, cnt - g * MOE10_GT);
      q[0] = lane;
      q[1] = c;
      for (int j = 0; j < MOE10_GT; j++) q[2 + j] = j < c ? pl[lane * MOE10_MAX_N + g * MOE10_GT + j] : 0;
    }
    if (lane == 31) ql[0] = off + ng;
  }
  __syncthreads();
}

template <int T, int NB, bool PF>
__global__ void __launch_bounds__(FFN_WARPS * 32, 2)
moe_gate_up10g_kernel(uint16_t *__restrict__ acth, const uint4 *xg, const uint8_t *__restrict__ wg,
                      const uint8_t *__restrict__ wu, const float *__restrict__ gb, const float *__restrict__ ub,
                      const int32_t *__restrict__ ids, int n, int n_slots, int n_exp, int k, int m, int64_t rb,
                      float alpha, float limit, float sc, const uint8_t *__restrict__ wd, int64_t dbytes) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  pdl_wait(); // ids / staged x come from the route kernel; act is read by earlier ones
  pdl_trigger();
  const int lane = threadIdx.x & 31;
  const int gw = blockIdx.x * FFN_WARPS + (threadIdx.x >> 5), nw = gridDim.x * FFN_WARPS;
  const int nch = k / 32, xs = moe10_xstride(nch), np = n * n_slots;
  int *ql = reinterpret_cast<int *>(xsm + n * xs); // nq, pad, groups
  int *sid = ql + 4 + MOE10_MAXQ * MOE10_QW;       // np ids
  int *pl = sid + np;                               // per expert: MOE10_MAX_N pairs
  moe10_copy<2>(reinterpret_cast<uint4 *>(xsm), xg, n * xs / 4);
  moe10_groups(ids, np, n_exp, ql, sid, pl); // syncs (also for the copy)
  const int total = ql[0] * m;
  const int cnt = gw < total ? (total - gw + nw - 1) / nw : 0;
  auto load = [&](wblocks<T, NB> &bg, wblocks<T, NB> &bu, int j) {
    const bool valid = j < cnt;
    const int i = valid ? gw + j * nw : 0;
    const int q = i / m, row = i - q * m;
    const int e = ql[4 + q * MOE10_QW];
    const int64_t off = ((int64_t)e * m + row) * rb;
    moe10_load<T, NB, PF>(bg, wg + off, 0, lane, nch, valid);
    moe10_load<T, NB, PF>(bu, wu + off, 0, lane, nch, valid);
    if (PF && valid) // the share of expert e's down matrix that goes with this row
      moe10_prefetch_range(wd + (int64_t)e * dbytes, dbytes * row / m, dbytes * (row + 1) / m, lane, 32);
  };
  auto compute = [&](const wblocks<T, NB> &bg, const wblocks<T, NB> &bu, int j) {
    const int i = gw + j * nw;
    const int q = i / m, row = i - q * m;
    const int *qq = ql + 4 + q * MOE10_QW;
    const int e = qq[0], nt = qq[1];
    int xo[MOE10_GT]; // token j's staged row, in words
#pragma unroll
    for (int t = 0; t < MOE10_GT; t++) xo[t] = (qq[2 + t] / n_slots) * xs;
    float ag[MOE10_GT], au[MOE10_GT];
#pragma unroll
    for (int t = 0; t < MOE10_GT; t++) ag[t] = au[t] = 0.f;
#pragma unroll
    for (int b = 0; b < NB; b++) {
      const int c = lane + 32 * b;
      if (c < nch) {
        const uint32_t *xb = xsm + c * DEC16_XW;
        uint32_t a[MOE10_GT][2];
        // gate, then up (v6 accumulates both, then folds both: the same values)
#pragma unroll
        for (int t = 0; t < MOE10_GT; t++) a[t][0] = a[t][1] = 0u;
        moe8_block_acc<T, MOE10_GT>(bg.w[b], bg.sh[b], xb, xo, nt, a);
        const float wsg = dec16_wscale<T>(bg.w[b], bg.sh[b]);
#pragma unroll
        for (int t = 0; t < MOE10_GT; t++)
          if (t < nt) ag[t] += dec16_fold(a[t], wsg, reinterpret_cast<const float *>(xsm + xo[t] + nch * DEC16_XW)[c]);
#pragma unroll
        for (int t = 0; t < MOE10_GT; t++) a[t][0] = a[t][1] = 0u;
        moe8_block_acc<T, MOE10_GT>(bu.w[b], bu.sh[b], xb, xo, nt, a);
        const float wsu = dec16_wscale<T>(bu.w[b], bu.sh[b]);
#pragma unroll
        for (int t = 0; t < MOE10_GT; t++)
          if (t < nt) au[t] += dec16_fold(a[t], wsu, reinterpret_cast<const float *>(xsm + xo[t] + nch * DEC16_XW)[c]);
      }
    }
    int word, half;
    moe8_half_pos(dec16_traits<T>::kind, row & 31, word, half);
    const float gbv = gb ? gb[(int64_t)e * m + row] : 0.f, ubv = ub ? ub[(int64_t)e * m + row] : 0.f;
#pragma unroll
    for (int t = 0; t < MOE10_GT; t++) {
      if (t < nt) { // uniform over the warp
        const float g = warp_sum(ag[t]) + gbv, u = warp_sum(au[t]) + ubv;
        if (lane == 0) {
          const float v = swiglu_oai(g, u, alpha, limit);
          acth[(((int64_t)qq[2 + t] * (m / 32) + row / 32) * DEC16_XW + word) * 2 + half] =
              (uint16_t)(dec16_f2h2(v * sc, 0.f) & 0xFFFFu);
        }
      }
    }
  };
  wblocks<T, NB> g0, u0, g1, u1;
  load(g0, u0, 0);
  for (int j = 0; j < cnt; j += 2) {
    load(g1, u1, j + 1);
    compute(g0, u0, j);
    if (j + 1 < cnt) {
      load(g0, u0, j + 2);
      compute(g1, u1, j + 1);
    }
  }
}

// cp.async of 16 bytes (global -> shared; the emulation copies at once).
#if defined(ORCH_EMU)
inline void moe10_cp16(void *d, const void *s) { memcpy(d, s, 16); }
inline void moe10_cp_wait_all() {}
#else
__device__ __forceinline__ void moe10_cp16(void *d, const void *s) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned a = (unsigned)__cvta_generic_to_shared(d);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(s) : "memory");
#else
  *static_cast<uint4 *>(d) = *static_cast<const uint4 *>(s);
#endif
}
__device__ __forceinline__ void moe10_cp_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}
#endif

// The bytes [a, a + len) of global memory into shared dst by 16-byte cp.async
// of the covering aligned range; returns a's offset in dst. The covering
// range must stay inside the tensor (host: tensor size % 16 == 0, base
// 16-aligned). All threads call it.
__device__ __forceinline__ int moe10_cp_range(uint8_t *dst, const uint8_t *a, int64_t len) {
  const uintptr_t lo = (uintptr_t)a & ~(uintptr_t)15, hi = ((uintptr_t)a + (uintptr_t)len + 15) & ~(uintptr_t)15;
  const int n16 = (int)((hi - lo) / 16);
  for (int i = threadIdx.x; i < n16; i += blockDim.x)
    moe10_cp16(dst + 16 * i, reinterpret_cast<const uint8_t *>(lo + 16 * (uintptr_t)i));
  return (int)((uintptr_t)a - lo);
}

// ffn_load's words, from a row in shared memory.
template <int T, int NB>
__device__ __forceinline__ void moe10_lds(wblocks<T, NB> &b, const uint8_t *wr, int c0, int lane, int nch) {
  constexpr int BB = type_block_bytes(T);
#pragma unroll
  for (int i = 0; i < NB; i++) {
    const int c = c0 + lane + 32 * i;
    const bool ok = c < nch;
    const uintptr_t p = (uintptr_t)(wr + (ok ? c : 0) * BB);
    b.sh[i] = (uint32_t)(p & 3);
    const uint32_t *q = reinterpret_cast<const uint32_t *>(p & ~(uintptr_t)3);
#pragma unroll
    for (int j = 0; j < block_words<T>(); j++) b.w[i][j] = ok ? q[j] : 0u;
  }
}

// Coalesced gate_up (ORCH_CUDA_MOE10_STREAM=3): gate_up10's CTAs and dots, but
// the CTA's 8 gate rows and 8 up rows (two contiguous byte ranges) are brought
// into shared memory by 16-byte cp.async — each 128-byte line once, fully
// coalesced — instead of 5 aligned 32-bit loads per block per lane (a warp's
// load instruction then spans ~5 lines at a 17-byte lane stride: ~6x the L1
// wavefronts of the bytes, and 30 load instructions per lane). Each warp then
// reads its row's words from shared memory. Bit-identical to gate_up10.
constexpr int MOE10C_ROWS = FFN_WARPS; // rows per CTA (one per warp)
static size_t moe10c_win(int64_t rb) { return (size_t)((MOE10C_ROWS * rb + 15 + 15) & ~(int64_t)15) + 16; }
template <int T, int NB>
__global__ void __launch_bounds__(FFN_WARPS * 32, 4)
moe_gate_up10c_kernel(uint16_t *__restrict__ acth, const uint4 *xg, const uint8_t *__restrict__ wg,
                      const uint8_t *__restrict__ wu, const float *__restrict__ gb, const float *__restrict__ ub,
                      const int32_t *__restrict__ ids, int n_slots, int k, int m, int64_t rb, float alpha, float limit,
                      float sc, int win) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  pdl_wait(); // ids / staged x come from the route kernel; act is read by earlier ones
  pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r0 = blockIdx.x * MOE10C_ROWS, row = r0 + warp;
  const int p = (int)blockIdx.z * n_slots + (int)blockIdx.y;
  const int e = ids[p];
  const int nrows = min(MOE10C_ROWS, m - r0);
  const int nch = k / 32, xs4 = moe10_xstride(nch) / 4;
  uint8_t *gs = reinterpret_cast<uint8_t *>(xsm + xs4 * 4), *us = gs + win;
  const int64_t off = ((int64_t)e * m + r0) * rb;
  const int og = moe10_cp_range(gs, wg + off, nrows * rb);
  const int ou = moe10_cp_range(us, wu + off, nrows * rb);
  moe10_copy<2>(reinterpret_cast<uint4 *>(xsm), xg + (int64_t)blockIdx.z * xs4, xs4);
  moe10_cp_wait_all();
  __syncthreads();
  if (row >= m) return; // after the barrier; uniform over the warp
  const float *xinv = reinterpret_cast<const float *>(xsm + nch * DEC16_XW);
  float ag = 0.f, au = 0.f;
  for (int c0 = 0; c0 < nch; c0 += 32 * NB) {
    wblocks<T, NB> bg, bu;
    moe10_lds<T, NB>(bg, gs + og + (int64_t)warp * rb, c0, lane, nch);
    moe10_lds<T, NB>(bu, us + ou + (int64_t)warp * rb, c0, lane, nch);
    moe6_dot2<T, NB>(bg, bu, xsm, xinv, c0, lane, nch, ag, au);
  }
  ag = warp_sum(ag);
  au = warp_sum(au);
  if (lane == 0) {
    const float g = ag + (gb ? gb[(int64_t)e * m + row] : 0.f);
    const float u = au + (ub ? ub[(int64_t)e * m + row] : 0.f);
    const float v = swiglu_oai(g, u, alpha, limit);
    int word, half;
    moe8_half_pos(dec16_traits<T>::kind, row & 31, word, half);
    acth[(((int64_t)p * (m / 32) + row / 32) * DEC16_XW + word) * 2 + half] =
        (uint16_t)(dec16_f2h2(v * sc, 0.f) & 0xFFFFu);
  }
}

// Coalesced streaming gate_up (ORCH_CUDA_MOE10_STREAM=4): gate_up10c's
// cp.async row windows, but one wave of CTAs (3 per SM at one token) walking
// units (pair, 8 rows) with two shared-memory buffers: the next unit's 2 x 8
// rows are in flight while the current unit is computed, so the weight stream
// and the decode overlap (v6 / gate_up10 / 10c: each CTA loads, then computes,
// in ~2.7 synchronized waves). Bit-identical to gate_up10.
__device__ __forceinline__ void moe10_cp_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void moe10_cp_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
template <int T, int NB>
__global__ void __launch_bounds__(FFN_WARPS * 32, 3)
moe_gate_up10cs_kernel(uint16_t *__restrict__ acth, const uint4 *xg, const uint8_t *__restrict__ wg,
                       const uint8_t *__restrict__ wu, const float *__restrict__ gb, const float *__restrict__ ub,
                       const int32_t *__restrict__ ids, int n, int n_slots, int k, int m, int64_t rb, float alpha,
                       float limit, float sc, int win) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  pdl_wait(); // ids / staged x come from the route kernel; act is read by earlier ones
  pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nch = k / 32, xs = moe10_xstride(nch);
  uint8_t *wbuf = reinterpret_cast<uint8_t *>(xsm + n * xs); // 2 buffers of (gate, up) windows
  const int nrb = (m + MOE10C_ROWS - 1) / MOE10C_ROWS, units = n * n_slots * nrb;
  const int cnt = (int)blockIdx.x < units ? (units - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x : 0;
  auto issue = [&](int j) { // unit j's rows into buffer j & 1
    const int u = (int)blockIdx.x + j * (int)gridDim.x, p = u / nrb, r0 = (u - p * nrb) * MOE10C_ROWS;
    const int64_t off = ((int64_t)ids[p] * m + r0) * rb, len = (int64_t)min(MOE10C_ROWS, m - r0) * rb;
    uint8_t *b = wbuf + (size_t)(j & 1) * 2 * win;
    moe10_cp_range(b, wg + off, len);
    moe10_cp_range(b + win, wu + off, len);
    moe10_cp_commit();
  };
  moe10_copy<2>(reinterpret_cast<uint4 *>(xsm), xg, n * xs / 4);
  if (cnt > 0) issue(0);
  for (int j = 0; j < cnt; j++) { // uniform over the CTA
    if (j + 1 < cnt) {
      issue(j + 1); // its buffer was last read by unit j - 1 (barrier at the end of that iteration)
      moe10_cp_wait<1>();
    } else {
      moe10_cp_wait<0>();
    }
    __syncthreads();
    const int u = (int)blockIdx.x + j * (int)gridDim.x, p = u / nrb, r0 = (u - p * nrb) * MOE10C_ROWS;
    const int row = r0 + warp, t = p / n_slots;
    if (row < m) { // uniform over the warp
      const int e = ids[p];
      const int64_t off = ((int64_t)e * m + r0) * rb;
      const uint8_t *b = wbuf + (size_t)(j & 1) * 2 * win;
      const int og = (int)((uintptr_t)(wg + off) & 15), ou = (int)((uintptr_t)(wu + off) & 15);
      const uint32_t *xh = xsm + t * xs;
      const float *xinv = reinterpret_cast<const float *>(xh + nch * DEC16_XW);
      float ag = 0.f, au = 0.f;
      for (int c0 = 0; c0 < nch; c0 += 32 * NB) {
        wblocks<T, NB> bg, bu;
        moe10_lds<T, NB>(bg, b + og + (int64_t)warp * rb, c0, lane, nch);
        moe10_lds<T, NB>(bu, b + win + ou + (int64_t)warp * rb, c0, lane, nch);
        moe6_dot2<T, NB>(bg, bu, xh, xinv, c0, lane, nch, ag, au);
      }
      ag = warp_sum(ag);
      au = warp_sum(au);
      if (lane == 0) {
        const float g = ag + (gb ? gb[(int64_t)e * m + row] : 0.f);
        const float uu = au + (ub ? ub[(int64_t)e * m + row] : 0.f);
        const float v = swiglu_oai(g, uu, alpha, limit);
        int word, half;
        moe8_half_pos(dec16_traits<T>::kind, row & 31, word, half);
        acth[(((int64_t)p * (m / 32) + row / 32) * DEC16_XW + word) * 2 + half] =
            (uint16_t)(dec16_f2h2(v * sc, 0.f) & 0xFFFFu);
      }
    }
    __syncthreads(); // buffer j & 1 is refilled by issue(j + 2)
  }
}

// Grouped coalesced streaming gate_up (ORCH_CUDA_MOE10_STREAM=5; for n > 1):
// gate_up10cs over units (expert group of <= MOE10_GT tokens, 8 rows), each
// unit's rows decoded once for the group's tokens (gate_up10g's compute, words
// from shared memory); the grouped down + orch_moe_combine follow (as
// STREAM=2). Bit-identical to gate_up10.
template <int T, int NB>
__global__ void __launch_bounds__(FFN_WARPS * 32, 2)
moe_gate_up10gcs_kernel(uint16_t *__restrict__ acth, const uint4 *xg, const uint8_t *__restrict__ wg,
                        const uint8_t *__restrict__ wu, const float *__restrict__ gb, const float *__restrict__ ub,
                        const int32_t *__restrict__ ids, int n, int n_slots, int n_exp, int k, int m, int64_t rb,
                        float alpha, float limit, float sc, int win) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  pdl_wait(); // ids / staged x come from the route kernel; act is read by earlier ones
  pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nch = k / 32, xs = moe10_xstride(nch), np = n * n_slots;
  uint8_t *wbuf = reinterpret_cast<uint8_t *>(xsm + n * xs); // 2 buffers of (gate, up) windows
  int *ql = reinterpret_cast<int *>(wbuf + 4 * (size_t)win);
  int *sid = ql + 4 + MOE10_MAXQ * MOE10_QW;
  int *pl = sid + np;
  moe10_copy<2>(reinterpret_cast<uint4 *>(xsm), xg, n * xs / 4);
  moe10_groups(ids, np, n_exp, ql, sid, pl); // syncs (also for the copy)
  const int nrb = (m + MOE10C_ROWS - 1) / MOE10C_ROWS, units = ql[0] * nrb;
  const int cnt = (int)blockIdx.x < units ? (units - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x : 0;
  auto issue = [&](int j) { // unit j's rows into buffer j & 1
    const int u = (int)blockIdx.x + j * (int)gridDim.x, q = u / nrb, r0 = (u - q * nrb) * MOE10C_ROWS;
    const int64_t off = ((int64_t)ql[4 + q * MOE10_QW] * m + r0) * rb, len = (int64_t)min(MOE10C_ROWS, m - r0) * rb;
    uint8_t *b = wbuf + (size_t)(j & 1) * 2 * win;
    moe10_cp_range(b, wg + off, len);
    moe10_cp_range(b + win, wu + off, len);
    moe10_cp_commit();
  };
  if (cnt > 0) issue(0);
  for (int j = 0; j < cnt; j++) { // uniform over the CTA
    if (j + 1 < cnt) {
      issue(j + 1);
      moe10_cp_wait<1>();
    } else {
      moe10_cp_wait<0>();
    }
    __syncthreads();
    const int u = (int)blockIdx.x + j * (int)gridDim.x, q = u / nrb, r0 = (u - q * nrb) * MOE10C_ROWS;
    const int row = r0 + warp;
    if (row < m) { // uniform over the warp
      const int *qq = ql + 4 + q * MOE10_QW;
      const int e = qq[0], nt = qq[1];
      const int64_t off = ((int64_t)e * m + r0) * rb;
      const uint8_t *b = wbuf + (size_t)(j & 1) * 2 * win;
      const int og = (int)((uintptr_t)(wg + off) & 15), ou = (int)((uintptr_t)(wu + off) & 15);
      int xo[MOE10_GT];
#pragma unroll
      for (int t = 0; t < MOE10_GT; t++) xo[t] = (qq[2 + t] / n_slots) * xs;
      float ag[MOE10_GT], au[MOE10_GT];
#pragma unroll
      for (int t = 0; t < MOE10_GT; t++) ag[t] = au[t] = 0.f;
      for (int c0 = 0; c0 < nch; c0 += 32 * NB) {
        wblocks<T, NB> bg, bu;
        moe10_lds<T, NB>(bg, b + og + (int64_t)warp * rb, c0, lane, nch);
        moe10_lds<T, NB>(bu, b + win + ou + (int64_t)warp * rb, c0, lane, nch);
#pragma unroll
        for (int i = 0; i < NB; i++) {
          const int c = c0 + lane + 32 * i;
          if (c < nch) {
            const uint32_t *xb = xsm + c * DEC16_XW;
            uint32_t a[MOE10_GT][2];
#pragma unroll
            for (int t = 0; t < MOE10_GT; t++) a[t][0] = a[t][1] = 0u;
            moe8_block_acc<T, MOE10_GT>(bg.w[i], bg.sh[i], xb, xo, nt, a);
            const float wsg = dec16_wscale<T>(bg.w[i], bg.sh[i]);
#pragma unroll
            for (int t = 0; t < MOE10_GT; t++)
              if (t < nt) ag[t] += dec16_fold(a[t], wsg, reinterpret_cast<const float *>(xsm + xo[t] + nch * DEC16_XW)[c]);
#pragma unroll
            for (int t = 0; t < MOE10_GT; t++) a[t][0] = a[t][1] = 0u;
            moe8_block_acc<T, MOE10_GT>(bu.w[i], bu.sh[i], xb, xo, nt, a);
            const float wsu = dec16_wscale<T>(bu.w[i], bu.sh[i]);
#pragma unroll
            for (int t = 0; t < MOE10_GT; t++)
              if (t < nt) au[t] += dec16_fold(a[t], wsu, reinterpret_cast<const float *>(xsm + xo[t] + nch * DEC16_XW)[c]);
          }
        }
      }
      int word, half;
      moe8_half_pos(dec16_traits<T>::kind, row & 31, word, half);
      const float gbv = gb ? gb[(int64_t)e * m + row] : 0.f, ubv = ub ? ub[(int64_t)e * m + row] : 0.f;
#pragma unroll
      for (int t = 0; t < MOE10_GT; t++) {
        if (t < nt) { // uniform over the warp
          const float g = warp_sum(ag[t]) + gbv, uu = warp_sum(au[t]) + ubv;
          if (lane == 0) {
            const float v = swiglu_oai(g, uu, alpha, limit);
            acth[(((int64_t)qq[2 + t] * (m / 32) + row / 32) * DEC16_XW + word) * 2 + half] =
                (uint16_t)(dec16_f2h2(v * sc, 0.f) & 0xFFFFu);
          }
        }
      }
    }
    __syncthreads(); // buffer j & 1 is refilled by issue(j + 2)
  }
}

// moe6_dot with one 1/scale for every chunk (the fixed activation scale).
template <int T, int NB>
__device__ __forceinline__ float moe10_dot(const wblocks<T, NB> &b, const uint32_t *xh, float xinv, int c0, int lane,
                                           int nch) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < NB; i++) {
    const int c = c0 + lane + 32 * i;
    if (c < nch) {
      uint32_t a[2] = {0u, 0u};
      moe6_block_acc<T>(b.w[i], b.sh[i], reinterpret_cast<const uint4 *>(xh + c * DEC16_XW), a);
      s += dec16_fold(a, dec16_wscale<T>(b.w[i], b.sh[i]), xinv);
    }
  }
  return s;
}

// out[t, row] = sum_s w[t, s] * (act[t, s] . down_e[row] + db[e, row]): v6's
// down kernel with the staged activation copied in (xinv: v6's 1/scale).
// DPF (ORCH_CUDA_MOE10_PF bit 2): the rows of items 2.. (registers hold only
// items 0 and 1) are prefetched into L2 before pdl_wait too, from the same
// speculative routing read, so their loads after the wait hit L2.
template <int T, int NB, bool DPF>
__global__ void __launch_bounds__(FFN_WARPS * 32, 3) // two buffers: <= 80 registers
moe_down10_kernel(float *__restrict__ out, const uint4 *acth, const uint8_t *__restrict__ wd,
                  const float *__restrict__ db, const int32_t *ids /* read before and after the wait */,
                  const float *__restrict__ wts, int n_slots, int k, int m, int64_t rb, float xinv) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  pdl_trigger();
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * FFN_WARPS + (threadIdx.x >> 5);
  const int t = blockIdx.y;
  const bool valid = row < m;
  const int nch = k / 32;
  const int rounds = (nch + 32 * NB - 1) / (32 * NB);
  const int items = n_slots * rounds;
  auto load = [&](wblocks<T, NB> &b, int it, int e) {
    const int c0 = (it % rounds) * 32 * NB;
    ffn_load<T, NB>(b, wd + ((int64_t)e * m + (valid ? row : 0)) * rb, c0, lane, nch, valid);
  };
  wblocks<T, NB> b0, b1;
  const int e0 = moe6_ld_id(ids + (int64_t)t * n_slots);
  const int e1 = items > 1 ? moe6_ld_id(ids + (int64_t)t * n_slots + 1 / rounds) : 0;
  load(b0, 0, e0);
  if (items > 1) load(b1, 1, e1);
  if (DPF && valid) {
    constexpr int BB = type_block_bytes(T);
    for (int it = 2; it < items; it++) {
      const int e = moe6_ld_id(ids + (int64_t)t * n_slots + it / rounds);
      const int c0 = (it % rounds) * 32 * NB;
      moe10_prefetch_range(wd + ((int64_t)e * m + row) * rb, (int64_t)c0 * BB, (int64_t)min(nch, c0 + 32 * NB) * BB,
                           lane, 32);
    }
  }
  pdl_wait(); // act (and ids / weights, formally) come from the previous kernels
  if (ids[(int64_t)t * n_slots] != e0) load(b0, 0, ids[(int64_t)t * n_slots]); // uniform over the CTA
  if (items > 1 && ids[(int64_t)t * n_slots + 1 / rounds] != e1) load(b1, 1, ids[(int64_t)t * n_slots + 1 / rounds]);
  const int cw4 = nch * DEC16_XW / 4; // uint4s per staged pair
  moe10_copy<4>(reinterpret_cast<uint4 *>(xsm), acth + (int64_t)t * n_slots * cw4, n_slots * cw4);
  __syncthreads();
  float res = 0.f, acc = 0.f;
  auto finish = [&](int it, const wblocks<T, NB> &b) {
    const int s = it / rounds;
    const int c0 = (it % rounds) * 32 * NB;
    acc += moe10_dot<T, NB>(b, xsm + s * nch * DEC16_XW, xinv, c0, lane, nch);
    if (it % rounds == rounds - 1) {
      const int64_t p = (int64_t)t * n_slots + s;
      const int e = ids[p];
      const float a = warp_sum(acc);
      res += wts[p] * (a + (db && valid ? db[(int64_t)e * m + row] : 0.f));
      acc = 0.f;
    }
  };
  for (int it = 0; it < items; it += 2) {
    finish(it, b0);
    if (it + 2 < items) load(b0, it + 2, ids[(int64_t)t * n_slots + (it + 2) / rounds]);
    if (it + 1 < items) {
      finish(it + 1, b1);
      if (it + 3 < items) load(b1, it + 3, ids[(int64_t)t * n_slots + (it + 3) / rounds]);
    }
  }
  if (valid && lane == 0) out[(int64_t)t * m + row] = res;
}


// Grouped down (ORCH_CUDA_MOE10_STREAM=2, n >= 2): ybuf[p, row] = act[p] .
// down_e[row] + db[e, row] for the pairs p of expert group q (<= MOE10_GT
// tokens routed to e): each down row loaded and decoded once for the group's
// tokens (moe8_block_acc; v6's per-slot value bit for bit), then
// orch_moe_combine sums each token's slots in slot order with the router
// weights (v6's expression from 0: the output is v6's bit for bit). One wave of
// CTAs over units (group, 32 rows): the group's staged activation rows are
// copied into shared memory once per unit, each warp takes 4 rows,
// double-buffered.
constexpr int MOE10_DROWS = 32; // rows per unit (4 per warp)
template <int T, int NB>
__global__ void __launch_bounds__(FFN_WARPS * 32, 2)
moe_down10g_kernel(float *__restrict__ ybuf, const uint4 *acth, const uint8_t *__restrict__ wd,
                   const float *__restrict__ db, const int32_t *__restrict__ ids, int np, int n_exp, int k, int m,
                   int64_t rb, float xinv) {
  DEC16_DYN_SMEM(uint32_t, xsm); // MOE10_GT staged activation rows, then the group table
  pdl_wait(); // act / ids come from the previous kernels; ybuf is read by earlier ones
  pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nch = k / 32, cw = nch * DEC16_XW; // words per staged row
  int *ql = reinterpret_cast<int *>(xsm + MOE10_GT * cw);
  int *sid = ql + 4 + MOE10_MAXQ * MOE10_QW;
  int *pl = sid + np;
  moe10_groups(ids, np, n_exp, ql, sid, pl);
  const int nrb = (m + MOE10_DROWS - 1) / MOE10_DROWS, units = ql[0] * nrb;
  constexpr int RW = MOE10_DROWS / FFN_WARPS; // rows per warp per unit
  for (int u = blockIdx.x; u < units; u += gridDim.x) { // uniform over the CTA
    const int q = u / nrb, r0 = (u - q * nrb) * MOE10_DROWS + warp * RW;
    const int *qq = ql + 4 + q * MOE10_QW;
    const int e = qq[0], nt = qq[1];
    auto load = [&](wblocks<T, NB> &b, int r) {
      const int row = r0 + r;
      const bool valid = row < m;
      ffn_load<T, NB>(b, wd + ((int64_t)e * m + (valid ? row : 0)) * rb, 0, lane, nch, valid);
    };
    wblocks<T, NB> b0, b1;
    load(b0, 0);
    __syncthreads(); // the previous unit's reads of the staged rows are done
    for (int t = 0; t < nt; t++)
      moe10_copy<2>(reinterpret_cast<uint4 *>(xsm + t * cw), acth + (int64_t)qq[2 + t] * (cw / 4), cw / 4);
    __syncthreads();
    int xo[MOE10_GT];
#pragma unroll
    for (int t = 0; t < MOE10_GT; t++) xo[t] = t * cw;
    auto compute = [&](const wblocks<T, NB> &b, int r) {
      const int row = r0 + r;
      float acc[MOE10_GT];
#pragma unroll
      for (int t = 0; t < MOE10_GT; t++) acc[t] = 0.f;
#pragma unroll
      for (int i = 0; i < NB; i++) {
        const int c = lane + 32 * i;
        if (c < nch) {
          uint32_t a[MOE10_GT][2];
#pragma unroll
          for (int t = 0; t < MOE10_GT; t++) a[t][0] = a[t][1] = 0u;
          moe8_block_acc<T, MOE10_GT>(b.w[i], b.sh[i], xsm + c * DEC16_XW, xo, nt, a);
          const float ws = dec16_wscale<T>(b.w[i], b.sh[i]);
#pragma unroll
          for (int t = 0; t < MOE10_GT; t++)
            if (t < nt) acc[t] += dec16_fold(a[t], ws, xinv);
        }
      }
      const float bias = db && row < m ? db[(int64_t)e * m + row] : 0.f;
#pragma unroll
      for (int t = 0; t < MOE10_GT; t++) {
        if (t < nt) { // uniform over the warp
          const float a = warp_sum(0.f + acc[t]); // v6: acc = 0 + (the round's sum), then warp_sum
          if (lane == 0 && row < m) ybuf[(int64_t)qq[2 + t] * m + row] = a + bias;
        }
      }
    };
#pragma unroll
    for (int r = 0; r < RW; r += 2) {
      load(b1, r + 1);
      compute(b0, r);
      if (r + 2 < RW) load(b0, r + 2);
      compute(b1, r + 1);
    }
  }
}

// ---- launch ----
// ORCH_CUDA_MOE=v10 (orch_env_version reads one digit: parsed here).
static bool moe10_pinned(const orch_ctx *ctx) {
  if (ctx->moe >= 10) return ctx->moe == 10;
  const char *v = getenv("ORCH_CUDA_MOE");
  return v && std::strcmp(v, "v10") == 0;
}
// Unpinned (ORCH_CUDA_MOE unset): v10 from MOE10_AUTO_MIN_N tokens (device
// run 1 of session 5, H100: n = 2 / 4 / 8 59 / 101 / 184 us vs v6's 62.5 /
// 109 / 207; n = 1 36.0 vs 36.3: equal, v6 kept there).
constexpr int MOE10_AUTO_MIN_N = 2;
static bool moe10_on(const orch_ctx *ctx, int64_t n) {
  return moe10_pinned(ctx) || (ctx->moe_auto && n >= MOE10_AUTO_MIN_N);
}

// ORCH_CUDA_MOE10_STREAM=1: the streaming gate_up (moe_gate_up10s_kernel);
// 2: the grouped streaming gate_up (moe_gate_up10g_kernel) and from 2 tokens
// the grouped down; 3: the coalesced gate_up (moe_gate_up10c_kernel); 4: the
// coalesced streaming gate_up (moe_gate_up10cs_kernel); 5: its grouped form
// (moe_gate_up10gcs_kernel) and from 2 tokens the grouped down; else gate_up10.
static int moe10_stream() {
  const char *v = getenv("ORCH_CUDA_MOE10_STREAM");
  return v && v[0] >= '1' && v[0] <= '5' && !v[1] ? v[0] - '0' : 0;
}

// ORCH_CUDA_MOE10_PF (bits): 1 gate_up prefetches the down weights into L2
// (and streams its own evict-first); 2 down prefetches the rows of its later
// slots into L2 before pdl_wait; 3 both.
static int moe10_pf() {
  const char *v = getenv("ORCH_CUDA_MOE10_PF");
  return v && v[0] >= '0' && v[0] <= '3' && !v[1] ? v[0] - '0' : 0;
}

// Scratch: ybuf holds the partial logits (n * S * n_exp floats, rounded up to
// 4) and then the staged x (n * moe10_xstride(dim / 32) words); act holds the
// staged activation (n * n_slots * (ff / 32) * DEC16_XW words).
static int64_t moe10_ybuf_floats(int64_t n, int64_t dim, int n_exp) {
  const int64_t S = (dim + MOE10_RK - 1) / MOE10_RK;
  return ((n * S * n_exp + 3) & ~(int64_t)3) + n * moe10_xstride((int)(dim / 32));
}

template <int T>
static void launch_decode10(cudaStream_t st, float *out, const float *x, const float *rw, const float *rbias,
                            int n_exp, int32_t *ids, float *wts, const uint8_t *wg, const uint8_t *wu, const float *gb,
                            const float *ub, const uint8_t *wd, const float *db, float *act, float *ybuf, int n,
                            int n_slots, int dim, int ff, float alpha, float limit, int stream, int pf, int only, bool *combine) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4) {
    const int S = (dim + MOE10_RK - 1) / MOE10_RK;
    float *part = ybuf;
    uint32_t *xg = reinterpret_cast<uint32_t *>(ybuf + (((int64_t)n * S * n_exp + 3) & ~(int64_t)3));
    const float sc = moe6_act_scale<T>(alpha, limit);
    const int64_t gu_bytes = (int64_t)n_exp * ff * orch_row_bytes(T, dim); // cp.async's covering ranges stay inside
    {
      auto kern = moe10_route_kernel;
      DEC16_LAUNCH_PDL(kern, dim3((unsigned)S, (unsigned)n), MOE10_THREADS, 0, st, part, xg, ids, wts, x, rw, rbias,
                       dim, n_exp, n_slots, dec16_traits<T>::kind, T == ORCH_T_MXFP4 ? 1 : 0);
    }
    constexpr int NBG = gate_up_nb<T>();
    if (only & 2) {
      // timing hook (ORCH_CUDA_MOE_ONLY): no gate_up
    } else if (stream == 5 && gu_bytes % 16 == 0 && n_exp <= 32) {
      const int win = (int)moe10c_win(orch_row_bytes(T, dim));
      const size_t sm = (size_t)n * moe10_xstride(dim / 32) * 4 + 4 * (size_t)win + moe10g_list_bytes(n * n_slots);
      auto kern = moe_gate_up10gcs_kernel<T, NBG>;
      if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
      const int64_t units = (int64_t)min(n * n_slots, n_exp + n * n_slots / MOE10_GT) * ceil_div(ff, MOE10C_ROWS);
      static int64_t wave[MOE10_MAX_N + 1];
      if (wave[n] == 0) wave[n] = one_wave(kern, sm);
      const int64_t ctas = std::max((int64_t)1, std::min(wave[n], units));
      DEC16_LAUNCH_PDL(kern, dim3((unsigned)ctas), FFN_WARPS * 32, sm, st, reinterpret_cast<uint16_t *>(act),
                       reinterpret_cast<const uint4 *>(xg), wg, wu, gb, ub, ids, n, n_slots, n_exp, dim, ff,
                       orch_row_bytes(T, dim), alpha, limit, sc, win);
    } else if (stream == 4 && gu_bytes % 16 == 0) {
      const int win = (int)moe10c_win(orch_row_bytes(T, dim));
      const size_t sm = (size_t)n * moe10_xstride(dim / 32) * 4 + 4 * (size_t)win;
      auto kern = moe_gate_up10cs_kernel<T, NBG>;
      if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
      const int64_t units = (int64_t)n * n_slots * ceil_div(ff, MOE10C_ROWS);
      static int64_t wave[MOE10_MAX_N + 1];
      if (wave[n] == 0) wave[n] = one_wave(kern, sm);
      const int64_t ctas = std::max((int64_t)1, std::min(wave[n], units));
      DEC16_LAUNCH_PDL(kern, dim3((unsigned)ctas), FFN_WARPS * 32, sm, st, reinterpret_cast<uint16_t *>(act),
                       reinterpret_cast<const uint4 *>(xg), wg, wu, gb, ub, ids, n, n_slots, dim, ff,
                       orch_row_bytes(T, dim), alpha, limit, sc, win);
    } else if (stream == 3 && gu_bytes % 16 == 0) {
      const int win = (int)moe10c_win(orch_row_bytes(T, dim));
      const size_t sm = (size_t)moe10_xstride(dim / 32) * 4 + 2 * (size_t)win;
      auto kern = moe_gate_up10c_kernel<T, NBG>;
      if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
      dim3 grid((unsigned)ceil_div(ff, MOE10C_ROWS), (unsigned)n_slots, (unsigned)n);
      DEC16_LAUNCH_PDL(kern, grid, FFN_WARPS * 32, sm, st, reinterpret_cast<uint16_t *>(act),
                       reinterpret_cast<const uint4 *>(xg), wg, wu, gb, ub, ids, n_slots, dim, ff,
                       orch_row_bytes(T, dim), alpha, limit, sc, win);
    } else if (stream == 2 && dim / 32 <= 32 * NBG && n_exp <= 32) {
      const size_t sm = (size_t)n * moe10_xstride(dim / 32) * 4 + moe10g_list_bytes(n * n_slots);
      auto kern = (pf & 1) ? moe_gate_up10g_kernel<T, NBG, true> : moe_gate_up10g_kernel<T, NBG, false>;
      if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
      const int64_t items = (int64_t)min(n * n_slots, n_exp + n * n_slots / MOE10_GT) * ff; // upper bound
      static int64_t wave[2][MOE10_MAX_N + 1];
      if (wave[pf & 1][n] == 0) wave[pf & 1][n] = one_wave(kern, sm);
      const int64_t ctas = std::max((int64_t)1, std::min(wave[pf & 1][n], ceil_div(items, (int64_t)FFN_WARPS)));
      DEC16_LAUNCH_PDL(kern, dim3((unsigned)ctas), FFN_WARPS * 32, sm, st, reinterpret_cast<uint16_t *>(act),
                       reinterpret_cast<const uint4 *>(xg), wg, wu, gb, ub, ids, n, n_slots, n_exp, dim, ff,
                       orch_row_bytes(T, dim), alpha, limit, sc, wd, (int64_t)dim * orch_row_bytes(T, ff));
    } else if (stream && dim / 32 <= 32 * NBG) {
      const size_t sm = (size_t)n * moe10_xstride(dim / 32) * 4;
      auto kern = (pf & 1) ? moe_gate_up10s_kernel<T, NBG, true> : moe_gate_up10s_kernel<T, NBG, false>;
      if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
      const int64_t items = (int64_t)n * n_slots * ff;
      static int64_t wave[2][MOE10_MAX_N + 1]; // per process and type (one device per process), by pf, n (smem)
      if (wave[pf & 1][n] == 0) wave[pf & 1][n] = one_wave(kern, sm);
      const int64_t ctas = std::max((int64_t)1, std::min(wave[pf & 1][n], ceil_div(items, (int64_t)FFN_WARPS)));
      DEC16_LAUNCH_PDL(kern, dim3((unsigned)ctas), FFN_WARPS * 32, sm, st, reinterpret_cast<uint16_t *>(act),
                       reinterpret_cast<const uint4 *>(xg), wg, wu, gb, ub, ids, n, n_slots, dim, ff,
                       orch_row_bytes(T, dim), alpha, limit, sc, wd, (int64_t)dim * orch_row_bytes(T, ff));
    } else {
      constexpr int NB = NBG;
      const size_t sm = (size_t)moe10_xstride(dim / 32) * 4;
      auto kern = (pf & 1) ? moe_gate_up10_kernel<T, NB, true> : moe_gate_up10_kernel<T, NB, false>;
      if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
      dim3 grid((unsigned)ceil_div(ff, FFN_WARPS), (unsigned)n_slots, (unsigned)n);
      DEC16_LAUNCH_PDL(kern, grid, FFN_WARPS * 32, sm, st, reinterpret_cast<uint16_t *>(act),
                       reinterpret_cast<const uint4 *>(xg), wg, wu, gb, ub, ids, n_slots, dim, ff,
                       orch_row_bytes(T, dim), alpha, limit, sc, wd, (int64_t)dim * orch_row_bytes(T, ff));
    }
    constexpr int NBD = down_h_nb<T>();
    *combine = !(only & 1) && (stream == 2 || stream == 5) && n >= 2 && ff / 32 <= 32 * NBD && n_exp <= 32;
    if (only & 1) {
      // timing hook (ORCH_CUDA_MOE_ONLY): no down
    } else if (*combine) { // grouped down into ybuf (the route scratch is consumed), then orch_moe_combine (caller)
      const int np = n * n_slots;
      const size_t sm = (size_t)MOE10_GT * (ff / 32) * DEC16_XW * 4 + moe10g_list_bytes(np);
      auto kern = moe_down10g_kernel<T, NBD>;
      if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
      const int64_t units = (int64_t)min(np, n_exp + np / MOE10_GT) * ceil_div(dim, MOE10_DROWS); // upper bound
      static int64_t wave = 0;
      if (wave == 0) wave = one_wave(kern, sm);
      const int64_t ctas = std::max((int64_t)1, std::min(wave, units));
      DEC16_LAUNCH_PDL(kern, dim3((unsigned)ctas), FFN_WARPS * 32, sm, st, ybuf, reinterpret_cast<const uint4 *>(act),
                       wd, db, ids, np, n_exp, ff, dim, orch_row_bytes(T, ff), (T == ORCH_T_MXFP4 ? 16384.f : 1.f) / sc);
    } else {
      constexpr int NB = NBD;
      const size_t sm = (size_t)n_slots * (ff / 32) * DEC16_XW * 4;
      auto kern = (pf & 2) ? moe_down10_kernel<T, NB, true> : moe_down10_kernel<T, NB, false>;
      if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
      dim3 grid((unsigned)ceil_div(dim, FFN_WARPS), (unsigned)n);
      DEC16_LAUNCH_PDL(kern, grid, FFN_WARPS * 32, sm, st, out, reinterpret_cast<const uint4 *>(act), wd, db, ids,
                       wts, n_slots, ff, dim, orch_row_bytes(T, ff), (T == ORCH_T_MXFP4 ? 16384.f : 1.f) / sc);
    }
  }
}

extern "C" int orch_moe_decode(orch_ctx *ctx, float *out, const float *x, const void *router, int32_t router_type,
                               const float *router_bias, int32_t n_exp, int32_t *ids, float *weights,
                               const void *gate, const void *up, int32_t gu_type, const float *gate_bias,
                               const float *up_bias, const void *down, int32_t down_type, const float *down_bias,
                               float *act, float *ybuf, int64_t n, int32_t n_slots, int64_t dim, int64_t ff,
                               float alpha, float limit) {
  const char *op = "moe_decode";
  ORCH_CHECK_ARG(ctx && out && x && router && ids && weights && gate && up && down && act && ybuf, op);
  ORCH_CHECK_ARG(n >= 0 && n_slots > 0 && n_exp > 0 && n_slots <= n_exp && dim > 0 && ff > 0, op);
  // Declines (not an error; the caller runs the router GEMV, orch_moe_topk and
  // orch_moe_ffn / orch_moe_ffn_route): unless pinned to v10 or unpinned with
  // n >= MOE10_AUTO_MIN_N; more than
  // MOE10_MAX_N tokens; a router that is not F32; more than 32 experts (one
  // warp's top-k); gate / up and down of different or unfused types; an
  // infinite SwiGLU limit (no fixed activation scale); where orch_moe_ffn
  // declines.
  if (!moe10_on(ctx, n) || ctx->moe_v1 || n < 1 || n > MOE10_MAX_N || router_type != ORCH_T_F32 || n_exp > 32 ||
      gu_type != down_type || !ffn_type(gu_type) || dim % 32 || ff % 32 || ffn_smem(dim, 1) > FFN_MAX_SMEM ||
      (ff * orch_row_bytes(gu_type, dim)) % 4 || (dim * orch_row_bytes(down_type, ff)) % 4 ||
      ffn_smem(ff, n_slots) > FFN_MAX_SMEM || !(act_scale(gu_type, alpha, limit) > 0.f))
    return ORCH_ERR_UNSUPPORTED;
  // The caller's scratch (ybuf n*n_slots*dim floats, act n*n_slots*ff floats) must hold v10's.
  if (moe10_ybuf_floats(n, dim, n_exp) > n * n_slots * dim || (ff / 32) * DEC16_XW > ff * 2)
    return ORCH_ERR_UNSUPPORTED;
  ORCH_CHECK_ARG(aligned16p(x) && aligned16p(act) && aligned16p(ybuf) && aligned16p(router) && aligned16p(gate) &&
                     aligned16p(up) && aligned16p(down),
                 op);
  bool combine = false;
  ORCH_DISPATCH_TYPE(gu_type, launch_decode10, ctx->stream, out, x, (const float *)router, router_bias, (int)n_exp,
                     ids, weights, (const uint8_t *)gate, (const uint8_t *)up, gate_bias, up_bias,
                     (const uint8_t *)down, down_bias, act, ybuf, (int)n, (int)n_slots, (int)dim, (int)ff, alpha,
                     limit, moe10_stream(), moe10_pf(), moe_only(), &combine);
  ORCH_LAUNCHED(op);
  return combine ? orch_moe_combine(ctx, out, ybuf, weights, n, n_slots, dim, 0) : ORCH_OK;
}
