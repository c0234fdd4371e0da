// moe_dec10.cuh — MoE v10 (session 5; ORCH_CUDA_MOE=v10, the default for 2..8
// tokens, v6 at one token): the whole MoE decode op at 1..8 tokens in three launches (v6: router GEMV, top-k,
// gate_up, down = four), included by moe_ffn.cu (it uses v6's decoder, dots
// and fixed activation scale).
//  1. moe10_route_kernel: grid (ceil(dim / 64), n). CTA s takes x[64s, 64s+64)
//     of token t: the 32 x 64 router weights (F32, constant: loaded before
//     pdl_wait) dotted into per-slice partial logits, and x's two chunks
//     staged exactly as v6's gate_up stages them (chunk-scaled fp16, times 2^14
//     for MXFP4) into scratch — once per token instead of once per gate_up CTA.
//     The last CTA of a token (atomic ticket, wrapping back to 0 by itself:
//     graph-safe) sums the partials (8 threads per expert, a fixed tree:
//     deterministic), adds the bias and runs v6's top-k (moe_topk32_warp): ids
//     and weights. No separate top-k launch.
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
// Measured (H100, session 5 runs 1-2): n = 1 / 2 / 4 / 8 36.5 / 60.4 / 102.7 /
// 185.8 us vs v6 36.3 / 62.5 / 109.5 / 205.7; gpt-oss x8 +8% end to end.
// Variants tried and removed after run 2 (all bit-identical, all slower or not
// faster): a one-wave streaming gate_up with double-buffered registers (n = 1
// +1 us), grouping the pairs by expert in gate_up and down (n = 1 45.7, n = 8
// 211 us), gate_up rows by 16-byte cp.async into shared memory (= v10 at one
// token, n = 8 194), an L2 prefetch of down's later slots before pdl_wait
// (n = 1 38.0) — see docs/perf-cuda.md "Round 6".
// Session 9 (docs/perf-cuda.md "Round 10"): down10's AN epilogue loads res2 /
// its norm weight right after pdl_wait (cp.async). Tried and removed after
// device runs 2-4 (all bit-identical, all slower): gate_up as a one-wave
// persistent kernel streaming row pairs through per-warp cp.async rings in
// shared memory (2-4 stages, also by cp.async.bulk), down as such a kernel over
// row groups, the route kernel as one 8-CTA thread-block cluster per token
// reducing through DSMEM ("v14"), and a down with a warp per (row, 2 slots),
// all six blocks a lane in flight at once (tg128 -6%).
#pragma once
#include <cstring>
#include <type_traits>

#include "moe_route.cuh"

constexpr int MOE10_MAX_N = 8;  // tokens per op (one ticket each)
constexpr int MOE10_RK = 64;    // router k per route CTA: two staged chunks
constexpr int MOE10_THREADS = 256;
constexpr int MOE10_BPF_SLOTS = 8; // down10's prefetched routing weights / biases (ORCH_CUDA_MOE10_BPF)
constexpr int MOE13_MAX_N = 64; // MoE v13 (moe_dec13.cuh) runs this route kernel for up to 64 tokens

__device__ unsigned g_moe10_ticket[MOE13_MAX_N];
// MoE v13: tokens routed so far (the last token's last CTA groups the pairs by expert; wraps to 0).
__device__ unsigned g_moe13_done;

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

// 4-byte cp.async into shared memory (cp.async.ca) and the wait for all of this
// thread's copies: a load whose value is needed late, without a register held
// until then (the emulation copies at once).
#if defined(__CUDACC__) || defined(ORCH_EMU)
__device__ __forceinline__ void moe10_cp4(void *d, const void *s) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned a = (unsigned)__cvta_generic_to_shared(d);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(a), "l"(s) : "memory");
#else
  memcpy(d, s, 4);
#endif
}
__device__ __forceinline__ void moe10_cp_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}
#endif

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

// The route kernel's parts: 256 threads, thread tid = (expert e = tid >> 3,
// q = tid & 7); whole warps call them.
struct moe10_rwv {
  float4 w0, w1;
};
// This thread's 8 router weights of slice s (constant: may be read before pdl_wait).
__device__ __forceinline__ moe10_rwv moe10_route_w(const float *__restrict__ rw, int s, int dim, int n_exp, int tid) {
  const int e = tid >> 3, k0 = s * MOE10_RK + 8 * (tid & 7);
  const bool ok0 = e < n_exp && k0 < dim, ok1 = e < n_exp && k0 + 4 < dim;
  const float4 z4 = make_float4(0.f, 0.f, 0.f, 0.f);
  moe10_rwv v;
  v.w0 = ok0 ? __ldg(reinterpret_cast<const float4 *>(rw + (int64_t)e * dim + k0)) : z4;
  v.w1 = ok1 ? __ldg(reinterpret_cast<const float4 *>(rw + (int64_t)e * dim + k0 + 4)) : z4;
  return v;
}
// One float4 v of a token's staged row xr (nch chunks) as moe6_stage stages it: elements 4o..4o+3 of chunk c; the 8
// lanes of a chunk (o = lane & 7) share its max. The chunk's 1/scale is stored times rs (1: exact). Whole warps call
// it; a lane with !ok passes zeros and stores nothing.
__device__ __forceinline__ void moe10_stage4(uint32_t *xr, int nch, int c, int o, bool ok, float4 v, int kind, bool b14,
                                             float rs) {
  uint32_t mx = max(max(dec16_absbits(v.x), dec16_absbits(v.y)), max(dec16_absbits(v.z), dec16_absbits(v.w)));
  mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
  float sc, inv;
  dec16_chunk_scale(mx, sc, inv);
  if (ok) {
    dec16_put4(xr + c * DEC16_XW, kind, o, moe6_x14(v.x * sc, b14), moe6_x14(v.y * sc, b14), moe6_x14(v.z * sc, b14),
               moe6_x14(v.w * sc, b14));
    if (o == 0) reinterpret_cast<float *>(xr + nch * DEC16_XW)[c] = inv * rs;
  }
}
// Slice s of token t: partial logits into prow[0 .. n_exp) (the (t, s) row of
// the partials), x's chunks (2s, 2s+1) staged into xg.
// xsl: x[t][s * MOE10_RK ...] (16-byte aligned; global memory, or the
// normalized slice in shared memory when the AddRMSNorm is folded in).
__device__ __forceinline__ void moe10_route_slice(float *__restrict__ prow, uint32_t *__restrict__ xg,
                                                  const float *xsl, const moe10_rwv &w, int s, int t, int dim,
                                                  int n_exp, int kind, int x14, int tid) {
  const int e = tid >> 3, q = tid & 7;
  const int k0 = s * MOE10_RK + 8 * q; // this thread's 8 elements of expert e's row
  const bool ok0 = e < n_exp && k0 < dim, ok1 = e < n_exp && k0 + 4 < dim;
  const float4 z4 = make_float4(0.f, 0.f, 0.f, 0.f);
  const float4 x0 = ok0 ? *reinterpret_cast<const float4 *>(xsl + 8 * q) : z4;
  const float4 x1 = ok1 ? *reinterpret_cast<const float4 *>(xsl + 8 * q + 4) : z4;
  const float4 w0 = w.w0, w1 = w.w1;
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
  if (q == 0 && e < n_exp) prow[e] = acc;
  // Stage the slice's chunks (2s, 2s+1): moe6_stage's values (the 8 lanes of
  // a chunk share its max), written where gate_up10 copies them from.
  const int nch = dim / 32;
  if (tid < 32) {
    const int kk = s * MOE10_RK + 4 * tid;
    const bool ok = tid < 16 && kk < dim;
    const float4 v = ok ? *reinterpret_cast<const float4 *>(xsl + 4 * tid) : z4;
    moe10_stage4(xg + (int64_t)t * moe10_xstride(nch), nch, kk >> 5, tid & 7, ok, v, kind, x14 != 0, 1.f);
  }
}
// Token t's routing from its S partials (written by other CTAs: read through
// L2): thread (e, q) sums slices q, q + 8, ... (all its loads in flight at
// once: one L2 round trip, not S / 8 dependent ones), then the 8 threads of
// expert e add theirs in a fixed tree (deterministic); warp 0 adds the bias
// and runs v6's top-k: ids / wts[r] for rank r < k_slots (any memory space).
// Every thread of the CTA calls it (it syncs); lg: 32 floats of shared memory.
__device__ __forceinline__ void moe10_route_finish(const float *part, const float *__restrict__ rbias, float *lg,
                                                   int32_t *ids, float *wts, int t, int S, int n_exp, int k_slots,
                                                   int tid) {
  // warp 0's router bias (a weight) in flight with the partials below, not a round trip after them (session 14)
  const float rbv = tid < 32 && tid < n_exp && rbias ? rbias[tid] : 0.f;
  if (tid < MOE10_THREADS) {
    const int e = tid >> 3, q = tid & 7;
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
    if (tid < n_exp) v = lg[tid] + (rbias ? rbv : 0.f);
    int id;
    float w;
    moe_topk32_warp(v, tid, n_exp, k_slots, id, w);
    if (tid < k_slots) {
      ids[tid] = id;
      wts[tid] = w;
    }
  }
}

// The post-attention AddRMSNorm folded into the route kernel (S7, opt-in
// ORCH_CUDA_MOE_NORM=1 on the Go side; orch_moe_decode_norm): the MoE input
// x = h = RMSNorm(res + add) * w, res += add written back. Every route CTA
// of token t reads the whole row (res + add, 2 x dim floats from L2) into
// registers exactly as norm.cu's norm_reg_kernel does (thread i owns
// elements i + 256 j, same block_sum, same expressions: h and res are that
// kernel's bits), normalizes its own 64-wide slice into shared memory (and
// writes that slice of h), and routes / stages from it. res is written back
// only by the token's last CTA (after the ticket: every CTA of the token has
// read the row by then; writing it earlier would feed a second add to a later
// CTA).
struct moe10_norm {
  float *res;
  const float *add, *w;
  float *h;
  float eps;
};

// NN: 0 = no norm (x read from global memory); else norm_reg_row's N (dim <=
// NN * MOE10_THREADS, elements per thread in registers).
// part: [n][S][n_exp] partial logits; xg: n rows of xstride words (staged x,
// then xinv); ids / wts: [n][k_slots]. kind / x14: the staging of weight type
// T (dec16_traits<T>::kind, T == MXFP4).
// GROUP (MoE v13; tab, else null): once every token is routed, the pairs grouped by
// expert (moe13_group, moe_dec13.cuh) by the CTA that routes the last token.
__device__ __forceinline__ void moe13_group(int32_t *tab, const int32_t *ids, int np, int n_exp, int tid);
template <int NN, bool GROUP = false>
__global__ void __launch_bounds__(MOE10_THREADS)
moe10_route_kernel(float *__restrict__ part, uint32_t *__restrict__ xg, int32_t *ids, float *__restrict__ wts,
                   const float *x /* = nm.h when NN: not restrict */, const float *__restrict__ rw,
                   const float *__restrict__ rbias, int dim, int n_exp, int k_slots, int kind, int x14,
                   moe10_norm nm, int32_t *tab) {
  MOE10_SHARED unsigned last;
  MOE10_SHARED float lg[32];
  MOE10_SHARED __align__(16) float xs[NN ? MOE10_RK : 4];
  const int s = blockIdx.x, t = blockIdx.y, S = gridDim.x;
  const int tid = threadIdx.x;
  // The router weights are constant (uploaded before any step): read before the wait.
  const moe10_rwv w = moe10_route_w(rw, s, dim, n_exp, tid);
  pdl_wait(); // x comes from the previous kernel; part / xg / ids / wts are read by earlier ones
  pdl_trigger();
  float v[NN ? NN : 1];
  const float *xsl = x + (int64_t)t * dim + s * MOE10_RK;
  if constexpr (NN > 0) {
    float *rr = nm.res + (int64_t)t * dim;
    const float *ar = nm.add + (int64_t)t * dim;
    // norm_reg_row<false, NN, false>'s loads, sum of squares and scale
#pragma unroll
    for (int j = 0; j < NN; j++) {
      const int i = tid + j * MOE10_THREADS;
      v[j] = 0.f;
      if (i < dim) {
        v[j] = rr[i];
        v[j] += ar[i];
      }
    }
    const float mean = 0.f;
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NN; j++) {
      const int i = tid + j * MOE10_THREADS;
      if (i < dim) {
        float d = v[j] - mean;
        ss += d * d;
      }
    }
    float var = block_sum(ss, lg) / (float)dim;
    float r = rsqrtf(var + nm.eps);
    // this CTA's slice [64 s, 64 s + 64): threads (64 s) % 256 .. + 63, element j = s / 4
    const int i = s * MOE10_RK + (tid & (MOE10_RK - 1));
    if ((tid >> 6) == (s & 3)) {
      float vj = 0.f;
#pragma unroll
      for (int j = 0; j < NN; j++)
        if (j == (s >> 2)) vj = v[j];
      float o = (vj - mean) * r;
      o *= nm.w[i < dim ? i : 0];
      xs[tid & (MOE10_RK - 1)] = i < dim ? o : 0.f;
      if (i < dim) nm.h[(int64_t)t * dim + i] = o;
    }
    __syncthreads(); // xs; lg is free again (block_sum's last read was before this)
    xsl = xs;
  }
  moe10_route_slice(part + ((int64_t)t * S + s) * n_exp, xg, xsl, w, s, t, dim, n_exp, kind, x14, tid);
  // The last CTA of token t (ticket) routes it.
  moe10_fence(); // this thread's partial / staged writes before the ticket
  __syncthreads();
  if (tid == 0) last = moe10_ticket(&g_moe10_ticket[t], (unsigned)(S - 1)) == (unsigned)(S - 1);
  __syncthreads();
  if (!last) return; // uniform over the CTA
  moe10_fence();
  if constexpr (NN > 0) { // every CTA of the token has read the row: write the residual back
    float *rr = nm.res + (int64_t)t * dim;
#pragma unroll
    for (int j = 0; j < NN; j++) {
      const int i = tid + j * MOE10_THREADS;
      if (i < dim) rr[i] = v[j];
    }
  }
  moe10_route_finish(part, rbias, lg, ids + t * k_slots, wts + t * k_slots, t, S, n_exp, k_slots, tid);
  if constexpr (GROUP) { // MoE v13: the CTA that routes the last token groups the pairs of the step
    moe10_fence(); // this token's ids before the ticket
    __syncthreads();
    if (tid == 0) last = moe10_ticket(&g_moe13_done, gridDim.y - 1) == gridDim.y - 1;
    __syncthreads();
    if (!last) return; // uniform
    moe10_fence();
    moe13_group(tab, ids, (int)gridDim.y * k_slots, n_exp, tid);
  }
}

// Session 14: lane 0 of each warp copies its row's gate / up biases into shared memory by cp.async right after the
// routing is read (bpf), instead of loading them after the dots: that was one global round trip at the end of every
// warp, holding the CTA's slot from the next of the ~2.7 waves. Same values: bit for bit. Device run 1 (H100, same
// call, with down10's copies below): gpt-oss tg128 668.4 vs 625.5 / 625.2 (ORCH_CUDA_MOE10_BPF=0 gives the old loads).
// act (staged for down: pair p's chunk c at acth words ((p * nch_m + c) *
// DEC16_XW), v6's fixed scale sc) = swiglu(x[t] . gate_e[row] + gb, x[t] .
// up_e[row] + ub), t = blockIdx.z, slot blockIdx.y: v6's gate_up rows and dots
// with x copied from the route kernel's staging.
// RP (session 12): wg / wu are MXFP4 rows repacked (weight_rp.cuh; rb = rp_row_bytes(ORCH_T_MXFP4, k)), same products.
template <int T, int NB, bool RP = false>
__global__ void __launch_bounds__(FFN_WARPS * 32, 4) // <= 64 registers: 32 warps per SM
moe_gate_up10_kernel(uint16_t *__restrict__ acth, const uint4 *xg, const uint8_t *__restrict__ wg,
                     const uint8_t *__restrict__ wu, const float *__restrict__ gb, const float *__restrict__ ub,
                     const int32_t *__restrict__ ids, int n_slots, int k, int m, int64_t rb, float alpha, float limit,
                     float sc, int bpf) {
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
  MOE10_SHARED float gub[FFN_WARPS][2]; // bpf: the row's gate / up biases
  if (bpf && valid && lane == 0) {
    if (gb) moe10_cp4(&gub[threadIdx.x >> 5][0], gb + (int64_t)e * m + row);
    if (ub) moe10_cp4(&gub[threadIdx.x >> 5][1], ub + (int64_t)e * m + row);
  }
  float ag = 0.f, au = 0.f;
  for (int c0 = 0; c0 < nch; c0 += 32 * NB) {
    std::conditional_t<RP, rpblocks<NB>, wblocks<T, NB>> bg, bu;
    if constexpr (RP) {
      rp_load<NB>(bg, wg + off, c0, lane, nch, valid);
      rp_load<NB>(bu, wu + off, c0, lane, nch, valid);
    } else {
      ffn_load<T, NB>(bg, wg + off, c0, lane, nch, valid);
      ffn_load<T, NB>(bu, wu + off, c0, lane, nch, valid);
    }
    if (c0 == 0) { // uniform over the CTA
      moe10_copy<2>(reinterpret_cast<uint4 *>(xsm), xg + (int64_t)blockIdx.z * xs4, xs4);
      __syncthreads();
    }
    moe6_dot2<T, NB>(bg, bu, xsm, xinv, c0, lane, nch, ag, au);
  }
  ag = warp_sum(ag);
  au = warp_sum(au);
  if (valid && lane == 0) {
    if (bpf) moe10_cp_wait_all();
    const float g = ag + (gb ? bpf ? gub[threadIdx.x >> 5][0] : gb[(int64_t)e * m + row] : 0.f);
    const float u = au + (ub ? bpf ? gub[threadIdx.x >> 5][1] : ub[(int64_t)e * m + row] : 0.f);
    const float v = swiglu_oai(g, u, alpha, limit);
    int word, half;
    moe8_half_pos(dec16_traits<T>::kind, row & 31, word, half);
    // moe6_stage_fixed's value: v * sc to fp16
    acth[(((int64_t)p * (m / 32) + row / 32) * DEC16_XW + word) * 2 + half] =
        (uint16_t)(dec16_f2h2(v * sc, 0.f) & 0xFFFFu);
  }
}

// moe6_dot with one 1/scale for every chunk (the fixed activation scale); B as moe6_dot2's.
template <int T, int NB, class B>
__device__ __forceinline__ float moe10_dot(const B &b, const uint32_t *xh, float xinv, int c0, int lane, int nch) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < NB; i++) {
    const int c = c0 + lane + 32 * i;
    if (c < nch) {
      uint32_t a[2] = {0u, 0u};
      moe6_bacc(b, i, reinterpret_cast<const uint4 *>(xh + c * DEC16_XW), a);
      s += dec16_fold(a, moe6_bscale(b, i), xinv);
    }
  }
  return s;
}

// The RMSNorm after the MoE folded into down10's epilogue (session 8, the
// producer half of orch_matmul_addnorm's fold, for the consumer
// orch_matmul_multi_nf): per token t and row r, res[t m + r] += out[t m + r],
// xt[t m + r] = res[t m + r] * w[r], and ss[t (m / 8) + b] = the sum of the
// new res^2 over the CTA's 8 rows (warp order: fixed, deterministic).
struct moe10_addnorm {
  float *res;
  const float *w;
  float *xt, *ss;
};

// out[t, row] = sum_s w[t, s] * (act[t, s] . down_e[row] + db[e, row]): v6's
// down kernel with the staged activation copied in (xinv: v6's 1/scale).
template <int T, int NB, bool AN = false, bool RP = false>
__global__ void __launch_bounds__(FFN_WARPS * 32, 3) // two buffers: <= 80 registers
moe_down10_kernel(float *__restrict__ out, const uint4 *acth, const uint8_t *__restrict__ wd,
                  const float *__restrict__ db, const int32_t *ids /* read before and after the wait */,
                  const float *__restrict__ wts, int n_slots, int k, int m, int64_t rb, float xinv,
                  moe10_addnorm an, int bpf) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  pdl_trigger();
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * FFN_WARPS + (threadIdx.x >> 5);
  const int t = blockIdx.y;
  const bool valid = row < m;
  const int nch = k / 32;
  const int rounds = (nch + 32 * NB - 1) / (32 * NB);
  const int items = n_slots * rounds;
  using WB = std::conditional_t<RP, rpblocks<NB>, wblocks<T, NB>>;
  auto load = [&](WB &b, int it, int e) {
    const int c0 = (it % rounds) * 32 * NB;
    if constexpr (RP) rp_load<NB>(b, wd + ((int64_t)e * m + (valid ? row : 0)) * rb, c0, lane, nch, valid);
    else ffn_load<T, NB>(b, wd + ((int64_t)e * m + (valid ? row : 0)) * rb, c0, lane, nch, valid);
  };
  WB b0, b1;
  const int e0 = moe6_ld_id(ids + (int64_t)t * n_slots);
  const int e1 = items > 1 ? moe6_ld_id(ids + (int64_t)t * n_slots + 1 / rounds) : 0;
  load(b0, 0, e0);
  if (items > 1) load(b1, 1, e1);
  pdl_wait(); // act (and ids / weights, formally) come from the previous kernels
  MOE10_SHARED float anp[FFN_WARPS][2]; // AN: the row's res2 and norm weight, loaded now, used in the epilogue
  if constexpr (AN)
    if (lane == 0) {
      moe10_cp4(&anp[threadIdx.x >> 5][0], an.res + (int64_t)t * m + row);
      moe10_cp4(&anp[threadIdx.x >> 5][1], an.w + row);
    }
  // bpf (session 14; n_slots <= MOE10_BPF_SLOTS): lane 0 copies each slot's routing weight and bias row into shared
  // memory by cp.async now, not one global round trip at the end of every slot (same values).
  MOE10_SHARED float dwb[FFN_WARPS][MOE10_BPF_SLOTS][2];
  if (bpf && lane == 0)
    for (int s = 0; s < n_slots; s++) {
      const int64_t p = (int64_t)t * n_slots + s;
      moe10_cp4(&dwb[threadIdx.x >> 5][s][0], wts + p);
      if (db && valid) moe10_cp4(&dwb[threadIdx.x >> 5][s][1], db + (int64_t)ids[p] * m + row);
    }
  if (ids[(int64_t)t * n_slots] != e0) load(b0, 0, ids[(int64_t)t * n_slots]); // uniform over the CTA
  if (items > 1 && ids[(int64_t)t * n_slots + 1 / rounds] != e1) load(b1, 1, ids[(int64_t)t * n_slots + 1 / rounds]);
  const int cw4 = nch * DEC16_XW / 4; // uint4s per staged pair
  moe10_copy<4>(reinterpret_cast<uint4 *>(xsm), acth + (int64_t)t * n_slots * cw4, n_slots * cw4);
  __syncthreads();
  float res = 0.f, acc = 0.f;
  auto finish = [&](int it, const WB &b) {
    const int s = it / rounds;
    const int c0 = (it % rounds) * 32 * NB;
    acc += moe10_dot<T, NB>(b, xsm + s * nch * DEC16_XW, xinv, c0, lane, nch);
    if (it % rounds == rounds - 1) {
      const int64_t p = (int64_t)t * n_slots + s;
      const float a = warp_sum(acc);
      if (bpf) {
        if (lane == 0) { // (only lane 0's res is used)
          if (s == 0) moe10_cp_wait_all();
          res += dwb[threadIdx.x >> 5][s][0] * (a + (db && valid ? dwb[threadIdx.x >> 5][s][1] : 0.f));
        }
      } else {
        const int e = ids[p];
        res += wts[p] * (a + (db && valid ? db[(int64_t)e * m + row] : 0.f));
      }
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
  if constexpr (AN) { // m % 8 == 0 (caller): every row of the CTA is valid
    MOE10_SHARED float wsq[FFN_WARPS];
    if (lane == 0) {
      moe10_cp_wait_all(); // anp (this thread's copies)
      const int64_t i = (int64_t)t * m + row;
      const float r = anp[threadIdx.x >> 5][0] + res;
      an.res[i] = r;
      an.xt[i] = r * anp[threadIdx.x >> 5][1];
      wsq[threadIdx.x >> 5] = r * r;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float sum = 0.f;
      for (int w = 0; w < FFN_WARPS; w++) sum += wsq[w];
      an.ss[(int64_t)t * (m / FFN_WARPS) + blockIdx.x] = sum;
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

// Scratch: ybuf holds the partial logits (n * S * n_exp floats, rounded up to
// 4) and then the staged x (n * moe10_xstride(dim / 32) words); act holds the
// staged activation (n * n_slots * (ff / 32) * DEC16_XW words).
static int64_t moe10_ybuf_floats(int64_t n, int64_t dim, int n_exp) {
  const int64_t S = (dim + MOE10_RK - 1) / MOE10_RK;
  return ((n * S * n_exp + 3) & ~(int64_t)3) + n * moe10_xstride((int)(dim / 32));
}

// ORCH_CUDA_MOE10_BPF=0 (session 14): gate_up10 / down10 load biases and routing weights after their dots, as
// before (the default copies them early, above). Read once per process; the emulation tests set g_moe10_bpf_force.
static int g_moe10_bpf_force = -1;
static bool moe10_bpf() {
  static const bool v = [] {
    const char *e = getenv("ORCH_CUDA_MOE10_BPF");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return g_moe10_bpf_force >= 0 ? g_moe10_bpf_force != 0 : v;
}

template <int T>
static void launch_decode10(cudaStream_t st, float *out, const float *x, const float *rw, const float *rbias,
                            int n_exp, int32_t *ids, float *wts, const uint8_t *wg, const uint8_t *wu, const float *gb,
                            const float *ub, const uint8_t *wd, const float *db, float *act, float *ybuf, int n,
                            int n_slots, int dim, int ff, float alpha, float limit, int only, const moe10_norm *nm,
                            const moe10_addnorm *an = nullptr, bool rp = false) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4) {
    // rp (ORCH_T_MXFP4_DUAL): gate_up10 / down10 read the repacked rows after the original ones
    rp = rp && T == ORCH_T_MXFP4;
    const int64_t rb_gu = rp ? rp_row_bytes(ORCH_T_MXFP4, dim) : orch_row_bytes(T, dim);
    const int64_t rb_d = rp ? rp_row_bytes(ORCH_T_MXFP4, ff) : orch_row_bytes(T, ff);
    if (rp) {
      wg += rp_offset(ORCH_T_MXFP4, (int64_t)n_exp * ff, dim);
      wu += rp_offset(ORCH_T_MXFP4, (int64_t)n_exp * ff, dim);
      wd += rp_offset(ORCH_T_MXFP4, (int64_t)n_exp * dim, ff);
    }
    const int S = (dim + MOE10_RK - 1) / MOE10_RK;
    float *part = ybuf;
    uint32_t *xg = reinterpret_cast<uint32_t *>(ybuf + (((int64_t)n * S * n_exp + 3) & ~(int64_t)3));
    const float sc = moe6_act_scale<T>(alpha, limit);
    const float dxinv = (T == ORCH_T_MXFP4 ? 16384.f : 1.f) / sc;
    if (!(only & 4)) { // 4: routed and staged by the caller's kernel (orch_moe_decode_oproj)
      const moe10_norm nv = nm ? *nm : moe10_norm{};
      const int per = nm ? (dim + MOE10_THREADS - 1) / MOE10_THREADS : 0; // <= MOE10_NORM_MAX_N (caller)
      auto kern = per == 0 ? moe10_route_kernel<0>
                  : per <= 4 ? moe10_route_kernel<4>
                  : per <= 8 ? moe10_route_kernel<8>
                  : per <= 12 ? moe10_route_kernel<12>
                             : moe10_route_kernel<16>;
      DEC16_LAUNCH_PDL(kern, dim3((unsigned)S, (unsigned)n), MOE10_THREADS, 0, st, part, xg, ids, wts, x, rw, rbias,
                       dim, n_exp, n_slots, dec16_traits<T>::kind, T == ORCH_T_MXFP4 ? 1 : 0, nv, (int32_t *)nullptr);
    }
    if (!(only & 2)) {
      constexpr int NB = gate_up_nb<T>();
      const size_t sm = (size_t)moe10_xstride(dim / 32) * 4;
      auto kern = moe_gate_up10_kernel<T, NB, false>;
      if constexpr (T == ORCH_T_MXFP4)
        if (rp) kern = moe_gate_up10_kernel<T, NB, true>;
      if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
      dim3 grid((unsigned)ceil_div(ff, FFN_WARPS), (unsigned)n_slots, (unsigned)n);
      DEC16_LAUNCH_PDL(kern, grid, FFN_WARPS * 32, sm, st, reinterpret_cast<uint16_t *>(act),
                       reinterpret_cast<const uint4 *>(xg), wg, wu, gb, ub, ids, n_slots, dim, ff, rb_gu, alpha,
                       limit, sc, moe10_bpf() ? 1 : 0);
    }
    if (!(only & 1)) {
      constexpr int NB = down_h_nb<T>();
      const size_t sm = (size_t)n_slots * (ff / 32) * DEC16_XW * 4;
      auto kern = an ? moe_down10_kernel<T, NB, true, false> : moe_down10_kernel<T, NB, false, false>;
      if constexpr (T == ORCH_T_MXFP4)
        if (rp) kern = an ? moe_down10_kernel<T, NB, true, true> : moe_down10_kernel<T, NB, false, true>;
      if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
      dim3 grid((unsigned)ceil_div(dim, FFN_WARPS), (unsigned)n);
      const moe10_addnorm av = an ? *an : moe10_addnorm{};
      DEC16_LAUNCH_PDL(kern, grid, FFN_WARPS * 32, sm, st, out, reinterpret_cast<const uint4 *>(act), wd, db, ids,
                       wts, n_slots, ff, dim, rb_d, dxinv, av, moe10_bpf() && n_slots <= MOE10_BPF_SLOTS ? 1 : 0);
    }
  }
}

// Why orch_moe_decode / orch_moe_decode_norm decline (0: they run), before the pointer checks.
static bool moe10_declines(const orch_ctx *ctx, int64_t n, int32_t router_type, int32_t n_exp, int32_t gu_type,
                           int32_t down_type, int32_t n_slots, int64_t dim, int64_t ff, float alpha, float limit) {
  return ctx->moe_v1 || n < 1 || n > MOE10_MAX_N || router_type != ORCH_T_F32 || n_exp > 32 || gu_type != down_type ||
         !ffn_type(gu_type) || dim % 32 || ff % 32 || ffn_smem(dim, 1) > FFN_MAX_SMEM ||
         (ff * orch_row_bytes(gu_type, dim)) % 4 || (dim * orch_row_bytes(down_type, ff)) % 4 ||
         ffn_smem(ff, n_slots) > FFN_MAX_SMEM || !(act_scale(gu_type, alpha, limit) > 0.f) ||
         // the caller's scratch (ybuf n*n_slots*dim floats, act n*n_slots*ff floats) must hold v10's
         moe10_ybuf_floats(n, dim, n_exp) > n * n_slots * dim || (ff / 32) * DEC16_XW > ff * 2;
}

// MoE v13 (9..64 tokens, expert-major): its kernels and routing.
#include "moe_dec13.cuh"

// The arguments the MoE decode entry points share, and their two launches (after the version choice): the pointer
// alignment check, then v13's or v10's kernels with the optional folds.
struct moe_dec_args {
  float *out;
  const float *x;
  const void *router;
  const float *router_bias;
  int32_t n_exp;
  int32_t *ids;
  float *weights;
  const void *gate, *up;
  int32_t gu_type;
  const float *gate_bias, *up_bias;
  const void *down;
  const float *down_bias;
  float *act, *ybuf;
  int64_t n;
  int32_t n_slots;
  int64_t dim, ff;
  float alpha, limit;
  bool rp = false; // ORCH_T_MXFP4_DUAL weights: v10's kernels read the repacked rows
};
// ORCH_T_MXFP4_DUAL gate / up and down (all three): the types become MXFP4 (the original rows come first, so every
// other kernel reads them as before) and true is returned (v10's kernels read the repacked rows). One of them DUAL:
// unchanged (the type checks decline).
static bool moe_dual(int32_t &gu_type, int32_t &down_type) {
  if (gu_type != ORCH_T_MXFP4_DUAL || down_type != ORCH_T_MXFP4_DUAL) return false;
  gu_type = down_type = ORCH_T_MXFP4;
  return true;
}
static bool moe_dec_aligned(const moe_dec_args &a) {
  return aligned16p(a.x) && aligned16p(a.act) && aligned16p(a.ybuf) && aligned16p(a.router) && aligned16p(a.gate) &&
         aligned16p(a.up) && aligned16p(a.down);
}
static int moe_dec_launch13(orch_ctx *ctx, const char *op, const moe_dec_args &a, const moe10_norm *nm) {
  ORCH_CHECK_ARG(moe_dec_aligned(a), op);
  launch_decode13(ctx->stream, a.out, a.x, (const float *)a.router, a.router_bias, (int)a.n_exp, a.ids, a.weights,
                  (const uint8_t *)a.gate, (const uint8_t *)a.up, a.gate_bias, a.up_bias, (const uint8_t *)a.down,
                  a.down_bias, a.act, a.ybuf, (int)a.n, (int)a.n_slots, (int)a.dim, (int)a.ff, a.alpha, a.limit, nm,
                  moe_only());
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}
static int moe_dec_launch10(orch_ctx *ctx, const char *op, const moe_dec_args &a, int only, const moe10_norm *nm,
                            const moe10_addnorm *an = nullptr) {
  ORCH_CHECK_ARG(moe_dec_aligned(a), op);
  ORCH_DISPATCH_TYPE(a.gu_type, launch_decode10, ctx->stream, a.out, a.x, (const float *)a.router, a.router_bias,
                     (int)a.n_exp, a.ids, a.weights, (const uint8_t *)a.gate, (const uint8_t *)a.up, a.gate_bias,
                     a.up_bias, (const uint8_t *)a.down, a.down_bias, a.act, a.ybuf, (int)a.n, (int)a.n_slots,
                     (int)a.dim, (int)a.ff, a.alpha, a.limit, only, nm, an, a.rp);
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}

extern "C" int orch_moe_decode(orch_ctx *ctx, float *out, const float *x, const void *router, int32_t router_type,
                               const float *router_bias, int32_t n_exp, int32_t *ids, float *weights,
                               const void *gate, const void *up, int32_t gu_type, const float *gate_bias,
                               const float *up_bias, const void *down, int32_t down_type, const float *down_bias,
                               float *act, float *ybuf, int64_t n, int32_t n_slots, int64_t dim, int64_t ff,
                               float alpha, float limit) {
  const char *op = "moe_decode";
  const bool rp = moe_dual(gu_type, down_type);
  ORCH_CHECK_ARG(ctx && out && x && router && ids && weights && gate && up && down && act && ybuf, op);
  ORCH_CHECK_ARG(n >= 0 && n_slots > 0 && n_exp > 0 && n_slots <= n_exp && dim > 0 && ff > 0, op);
  const moe_dec_args a{out,     x,         router,     router_bias, n_exp, ids, weights, gate, up,    gu_type, gate_bias,
                       up_bias, down,      down_bias,  act,         ybuf,  n,   n_slots, dim,  ff,    alpha,   limit, rp};
  // Declines (not an error; the caller runs the router GEMV, orch_moe_topk and
  // orch_moe_ffn / orch_moe_ffn_route): unless pinned to v10 or unpinned with
  // n >= MOE10_AUTO_MIN_N; more than
  // MOE10_MAX_N tokens; a router that is not F32; more than 32 experts (one
  // warp's top-k); gate / up and down of different or unfused types; an
  // infinite SwiGLU limit (no fixed activation scale); where orch_moe_ffn
  // declines.
  if (moe13_on(ctx, n) &&
      !moe13_declines(ctx, n, router_type, n_exp, gu_type, down_type, n_slots, dim, ff, alpha, limit)) {
    return moe_dec_launch13(ctx, op, a, nullptr);
  }
  if (moe13_pinned() || !moe10_on(ctx, n) ||
      moe10_declines(ctx, n, router_type, n_exp, gu_type, down_type, n_slots, dim, ff, alpha, limit))
    return ORCH_ERR_UNSUPPORTED;
  return moe_dec_launch10(ctx, op, a, moe_only(), nullptr);
}

// orch_moe_decode with the AddRMSNorm before it folded into the route kernel
// (moe10_norm above): res += add (written back), x = RMSNorm(res) * norm_w
// (written: the norm's output), then the MoE of x. v10's kernels at 1..8
// tokens whenever ORCH_CUDA_MOE is unset or v10 (one token included: v10 =
// v6 there, and the fold needs v10's route kernel); MoE v13's where
// orch_moe_decode runs v13 (the same route kernel, grouping after it).
constexpr int MOE10_NORM_MAX_N = 16; // elements per thread: dim <= 4096
extern "C" int orch_moe_decode_norm(orch_ctx *ctx, float *out, float *x, float *res, const float *add,
                                    const float *norm_w, float eps, const void *router, int32_t router_type,
                                    const float *router_bias, int32_t n_exp, int32_t *ids, float *weights,
                                    const void *gate, const void *up, int32_t gu_type, const float *gate_bias,
                                    const float *up_bias, const void *down, int32_t down_type, const float *down_bias,
                                    float *act, float *ybuf, int64_t n, int32_t n_slots, int64_t dim, int64_t ff,
                                    float alpha, float limit) {
  const char *op = "moe_decode_norm";
  const bool rp = moe_dual(gu_type, down_type);
  ORCH_CHECK_ARG(ctx && out && x && res && add && norm_w && router && ids && weights && gate && up && down && act &&
                     ybuf,
                 op);
  ORCH_CHECK_ARG(n >= 0 && n_slots > 0 && n_exp > 0 && n_slots <= n_exp && dim > 0 && ff > 0, op);
  const moe_dec_args a{out,     x,         router,     router_bias, n_exp, ids, weights, gate, up,    gu_type, gate_bias,
                       up_bias, down,      down_bias,  act,         ybuf,  n,   n_slots, dim,  ff,    alpha,   limit, rp};
  const moe10_norm nm{res, add, norm_w, x, eps};
  if (moe13_on(ctx, n) && dim <= MOE10_NORM_MAX_N * MOE10_THREADS &&
      !moe13_declines(ctx, n, router_type, n_exp, gu_type, down_type, n_slots, dim, ff, alpha, limit)) {
    return moe_dec_launch13(ctx, op, a, &nm); // MoE v13 with the norm in its route kernel (session 8)
  }
  if (moe13_pinned() || !(ctx->moe_auto || moe10_pinned(ctx)) || dim > MOE10_NORM_MAX_N * MOE10_THREADS ||
      moe10_declines(ctx, n, router_type, n_exp, gu_type, down_type, n_slots, dim, ff, alpha, limit))
    return ORCH_ERR_UNSUPPORTED;
  return moe_dec_launch10(ctx, op, a, moe_only(), &nm);
}

// orch_moe_decode (res == NULL) or orch_moe_decode_norm (res != NULL) under
// v10 with the next RMSNorm's producer half in down10 (moe10_addnorm): res2
// += out, xt = res2 * nw2, ss[t * (dim / 8) + b] = sum of res2^2 over rows
// [8b, 8b + 8) (orch_matmul_addnorm's layout: orch_matmul_multi_nf consumes
// it). Declines (nothing launched) where v10 would not run (as
// orch_moe_decode_norm: unpinned or pinned v10, 1..8 tokens, not where MoE
// v13 runs — e.g. ORCH_CUDA_MOE13_FROM=2 —), for dim % 8,
// dim / 8 > 1024, and under ORCH_CUDA_MOE_ONLY.
extern "C" int orch_moe_decode_addnorm(orch_ctx *ctx, float *out, float *x, float *res, const float *add,
                                       const float *norm_w, float eps, const void *router, int32_t router_type,
                                       const float *router_bias, int32_t n_exp, int32_t *ids, float *weights,
                                       const void *gate, const void *up, int32_t gu_type, const float *gate_bias,
                                       const float *up_bias, const void *down, int32_t down_type,
                                       const float *down_bias, float *act, float *ybuf, int64_t n, int32_t n_slots,
                                       int64_t dim, int64_t ff, float alpha, float limit, float *res2,
                                       const float *nw2, float *xt, float *ss) {
  const char *op = "moe_decode_addnorm";
  const bool rp = moe_dual(gu_type, down_type);
  ORCH_CHECK_ARG(ctx && out && x && router && ids && weights && gate && up && down && act && ybuf && res2 && nw2 &&
                     xt && ss,
                 op);
  ORCH_CHECK_ARG(!res || (add && norm_w), op);
  ORCH_CHECK_ARG(n >= 0 && n_slots > 0 && n_exp > 0 && n_slots <= n_exp && dim > 0 && ff > 0, op);
  if (!(ctx->moe_auto || moe10_pinned(ctx)) || moe13_pinned() ||
      (moe13_on(ctx, n) &&
       !moe13_declines(ctx, n, router_type, n_exp, gu_type, down_type, n_slots, dim, ff, alpha, limit)) ||
      (res && dim > MOE10_NORM_MAX_N * MOE10_THREADS) ||
      dim % FFN_WARPS || dim / FFN_WARPS > 1024 || moe_only() ||
      moe10_declines(ctx, n, router_type, n_exp, gu_type, down_type, n_slots, dim, ff, alpha, limit))
    return ORCH_ERR_UNSUPPORTED;
  const moe10_norm nm{res, add, norm_w, x, eps};
  const moe10_addnorm an{res2, nw2, xt, ss};
  const moe_dec_args a{out,     x,         router,     router_bias, n_exp, ids, weights, gate, up,    gu_type, gate_bias,
                       up_bias, down,      down_bias,  act,         ybuf,  n,   n_slots, dim,  ff,    alpha,   limit, rp};
  return moe_dec_launch10(ctx, op, a, 0, res ? &nm : nullptr, &an);
}

// The attention out projection + AddRMSNorm + MoE at one token (session 10): orch_moe_decode_oproj.
#include "moe_oproj.cuh"
