// attention_kernels.cuh — the fp32 flash-decoding kernels of attention.cu
// (the grouped decode kernel attn_gd7 for head dims 64/128, attn2 for the
// others, and the combine of their split partials; see there). A header of its own so that
// cuda/test/attention_emu_test.cpp can compile the same kernel source on the
// CPU against an emulation of the CUDA features it uses. Included after
// common.cuh (warp_sum, warp_max).
#pragma once

#ifndef ORCH_EMU
#include <cuda_fp16.h>
#endif

#include "../include/orch_cuda.h"
#include "attention_index.cuh"
#include "rope.cuh"

namespace attn_k {

template <typename KV> __device__ __forceinline__ float kv_load(const KV *p);
template <> __device__ __forceinline__ float kv_load<float>(const float *p) { return *p; }
template <> __device__ __forceinline__ float kv_load<__half>(const __half *p) { return __half2float(*p); }

// Two fp16 packed in a 32-bit word (low half first) as floats, without
// taking an address (which put the loaded uint4 in local memory).
__device__ __forceinline__ float2 attn_h2f2(unsigned w) {
  return make_float2(__half2float(__ushort_as_half((unsigned short)(w & 0xffffu))),
                     __half2float(__ushort_as_half((unsigned short)(w >> 16))));
}

// In the flash-decoding kernels (every warp, before any barrier): whether
// row t is the tensor-core kernel's (then the CTA returns).
__device__ __forceinline__ int attn_tc_tile_run(const orch_attn_args &a, int64_t t0) {
  const int lane = threadIdx.x & 31;
  const bool ok0 = attn_tc_row_ok(a.tok_seq, a.tok_pos, a.n_tok, t0, t0 + lane);
  const bool ok1 = attn_tc_row_ok(a.tok_seq, a.tok_pos, a.n_tok, t0, t0 + 32 + lane);
  return attn_tc_run_from_bits(__ballot_sync(0xffffffffu, ok0), __ballot_sync(0xffffffffu, ok1));
}
__device__ __forceinline__ bool attn_row_taken_by_tc(const orch_attn_args &a, int64_t t) {
  const int64_t t0 = t - t % ATTN_TC_ROWS;
  return attn_tc_takes(attn_tc_tile_run(a, t0), (int)(t - t0));
}

// Rows of a flash-decoding CTA: a contiguous chunk [r0, r1) of
// ceil(n_tok / gridDim.y) rows (one row when gridDim.y = n_tok). With tc_skip
// the tile's run is computed once per tile the chunk touches, not per row.
struct AttnRows {
  int64_t r0, r1, t0 = -1;
  int run = 0;
  __device__ __forceinline__ AttnRows(const orch_attn_args &a) {
    const int64_t per = (a.n_tok + gridDim.y - 1) / gridDim.y;
    r0 = (int64_t)blockIdx.y * per;
    r1 = min(a.n_tok, r0 + per);
  }
  // Whether row t is the tensor-core kernel's (uniform over the CTA).
  __device__ __forceinline__ bool taken(const orch_attn_args &a, int64_t t) {
    const int64_t tt = t - t % ATTN_TC_ROWS;
    if (tt != t0) {
      run = attn_tc_tile_run(a, tt);
      t0 = tt;
    }
    return attn_tc_takes(run, (int)(t - tt));
  }
};

constexpr int ATTN_WARPS = 4;

// attn2 (flash-decoding, the head dims without a grouped instance): grid
// (head, row, split). Each used split takes a slice of the visible keys
// (depth-adaptive, as attn_gd_body); inside it a warp scores 32 keys at once
// (lane = key, the q vector in shared memory), keeps an online softmax, and
// accumulates V with lanes over dims. Partial (m, l, acc) go to scratch;
// attn_combine6 merges the splits with the sink (one used split: the CTA
// writes the output). A CTA takes a chunk of consecutive rows
// (AttnRows: one row unless the tensor-core kernel ran; then fewer CTAs, as
// most rows are skipped and an exiting CTA still costs its launch).
template <typename KV, int HD>
__global__ void __launch_bounds__(ATTN_WARPS * 32)
    attn2_kernel(orch_attn_args a, float *part, int splits, int tc_skip, int gran) {
  constexpr int E = attn_lane_dims(HD);
  static_assert(HD % 8 == 0, "K rows are read in 16-byte vectors");
  const int h = blockIdx.x, sp = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kvh = h / (a.n_heads / a.n_kv_heads);
  const KV *kc = (const KV *)a.k_cache;
  const KV *vc = (const KV *)a.v_cache;
  const int64_t slot_stride = (int64_t)a.n_kv_heads * HD;
  __shared__ float qs[HD];
  __shared__ float sm[ATTN_WARPS], sl[ATTN_WARPS];
  __shared__ float sacc[ATTN_WARPS][HD];
  // No barrier between rows is needed: every warp passes the merge barrier
  // of a row before any writes qs of the next, and warp 0 (the only reader of
  // sm/sl/sacc) reaches the next row's q barrier only after its merge.
  AttnRows rows(a);
  for (int64_t t = rows.r0; t < rows.r1; t++) {
    if (tc_skip && rows.taken(a, t)) continue; // uniform over the CTA
    const int qp = a.tok_pos[t];
    const int32_t *bt = a.block_tables + (int64_t)a.tok_seq[t] * a.max_blocks;
    int start = a.window > 0 ? max(0, qp - a.window + 1) : 0;
    const int span = qp - start + 1;
    // Splits sized from this row's span (attention_index.cuh); unused ones
    // skip the row.
    const int per = attn_split_per(span, splits, gran);
    const int used = attn_split_used(span, per);
    if (sp >= used) continue; // uniform over the CTA, before any barrier of the row
    const float *qr = a.q + t * a.q_stride + (int64_t)h * HD;
    for (int i = threadIdx.x; i < HD; i += blockDim.x) qs[i] = qr[i] * a.scale;
    __syncthreads();
    const int k0 = start + sp * per, k1 = min(k0 + per, qp + 1);
    float m = -INFINITY, l = 0.f, acc[E];
#pragma unroll
    for (int e = 0; e < E; e++) acc[e] = 0.f;
    for (int base = k0 + warp * 32; base < k1; base += ATTN_WARPS * 32) {
      const int kp = base + lane;
      const bool ok = kp < k1;
      int64_t slot = 0;
      float s = -INFINITY;
      if (ok) {
        slot = (int64_t)bt[kp / a.block_size] * a.block_size + kp % a.block_size;
        const KV *kr = kc + slot * slot_stride + (int64_t)kvh * HD;
        float d = 0.f;
        if constexpr (sizeof(KV) == 4) {
          const float4 *k4 = reinterpret_cast<const float4 *>(kr);
#pragma unroll
          for (int i = 0; i < HD / 4; i++) {
            float4 kv = k4[i];
            d += qs[4 * i] * kv.x + qs[4 * i + 1] * kv.y + qs[4 * i + 2] * kv.z + qs[4 * i + 3] * kv.w;
          }
        } else {
          const uint4 *k8 = reinterpret_cast<const uint4 *>(kr);
#pragma unroll
          for (int i = 0; i < HD / 8; i++) {
            const uint4 u = k8[i];
            const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
              const float2 f = attn_h2f2(w[j]);
              d += qs[8 * i + 2 * j] * f.x + qs[8 * i + 2 * j + 1] * f.y;
            }
          }
        }
        s = d;
      }
      const float mc = warp_max(s);
      const float mn = fmaxf(m, mc);
      const float corr = __expf(m - mn); // m = -inf first: 0
      const float p = ok ? __expf(s - mn) : 0.f;
      l = l * corr + warp_sum(p);
#pragma unroll
      for (int e = 0; e < E; e++) acc[e] *= corr;
      m = mn;
      const int cnt = min(32, k1 - base);
      for (int j = 0; j < cnt; j++) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
        const int64_t sj = __shfl_sync(0xffffffffu, slot, j);
        const KV *vr = vc + sj * slot_stride + (int64_t)kvh * HD + lane * E;
#pragma unroll
        for (int e = 0; e < E; e++)
          if (attn_dim_ok(HD, lane, e)) acc[e] += pj * kv_load<KV>(vr + e);
      }
    }
    if (lane == 0) {
      sm[warp] = m;
      sl[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < E; e++)
      if (attn_dim_ok(HD, lane, e)) sacc[warp][lane * E + e] = acc[e];
    __syncthreads();
    if (warp == 0) {
      // One split: this CTA saw every key, so it applies the sink and writes
      // the output itself (no combine launch). Else partials for the combine.
      const bool direct = used == 1;
      float M = -INFINITY;
#pragma unroll
      for (int w = 0; w < ATTN_WARPS; w++) M = fmaxf(M, sm[w]);
      const float sink = direct && a.sinks ? a.sinks[h] : -INFINITY;
      M = fmaxf(M, sink);
      float L = direct && a.sinks ? __expf(sink - M) : 0.f, f[ATTN_WARPS];
#pragma unroll
      for (int w = 0; w < ATTN_WARPS; w++) {
        f[w] = sl[w] > 0.f ? __expf(sm[w] - M) : 0.f;
        L += sl[w] * f[w];
      }
      float *o, inv = 1.f;
      if (direct) {
        o = a.out + t * (int64_t)a.n_heads * HD + (int64_t)h * HD;
        inv = 1.f / L;
      } else {
        o = part + ((t * a.n_heads + h) * (int64_t)splits + sp) * (HD + 2);
        if (lane == 0) {
          o[HD] = M;
          o[HD + 1] = L;
        }
      }
#pragma unroll
      for (int e = 0; e < E; e++) {
        if (!attn_dim_ok(HD, lane, e)) continue;
        int dd = lane * E + e;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; w++) v += sacc[w][dd] * f[w];
        o[dd] = v * inv;
      }
    }
  } // rows
}

// ---- v6: depth-adaptive GQA-grouped flash-decoding ----
// Keys per used split are a multiple of ATTN_GD_GRAN (one 32-key step per
// warp); the grid has at most ATTN_GD_MAX_SPLITS splits (the combine's lanes
// hold 4 splits each).
constexpr int ATTN_GD_GRAN = ATTN_WARPS * 32;
constexpr int ATTN_GD_MAX_SPLITS = 128;

// KV0 (attn_gdr_kernel, ORCH_CUDA_ATTN_KV0): the K rows (kv0 = 1) or K and V rows (2) of the first key step of
// every warp (the CTA's first ATTN_GD_GRAN keys) in dynamic shared memory. A K row is read whole by its key's lane:
// 16 bytes of padding a row put the 8 lanes of a 16-byte load phase on distinct banks. V rows are read by all lanes.
ORCH_HD int attn_kv0_ks(int hd, int kv_bytes) { return hd * kv_bytes + 16; }
ORCH_HD int attn_kv0_bytes(int hd, int kv_bytes, int kv0) {
  return kv0 ? ATTN_GD_GRAN * (attn_kv0_ks(hd, kv_bytes) + (kv0 == 2 ? hd * kv_bytes : 0)) : 0;
}

// One lane's E dims of one V row as loaded (raw: fp16 pairs stay packed), so
// a warp can issue the loads of many rows before it uses any of them.
template <typename KV, int E> struct AttnVRow;
template <int E> struct AttnVRow<__half, E> {
  static_assert(E % 2 == 0, "fp16 pairs");
  unsigned w[E / 2];
  __device__ __forceinline__ void load(const __half *p) {
#pragma unroll
    for (int i = 0; i < E / 2; i++) w[i] = reinterpret_cast<const unsigned *>(p)[i];
  }
  __device__ __forceinline__ float get(int e) const {
    const float2 f = attn_h2f2(w[e / 2]);
    return e % 2 ? f.y : f.x;
  }
};
template <int E> struct AttnVRow<float, E> {
  static_assert(E % 2 == 0, "float2 loads");
  float f[E];
  __device__ __forceinline__ void load(const float *p) {
    if constexpr (E % 4 == 0) {
#pragma unroll
      for (int i = 0; i < E / 4; i++) {
        const float4 x = reinterpret_cast<const float4 *>(p)[i];
        f[4 * i] = x.x, f[4 * i + 1] = x.y, f[4 * i + 2] = x.z, f[4 * i + 3] = x.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < E / 2; i++) {
        const float2 x = reinterpret_cast<const float2 *>(p)[i];
        f[2 * i] = x.x, f[2 * i + 1] = x.y;
      }
    }
  }
  __device__ __forceinline__ float get(int e) const { return f[e]; }
};

// Shared memory of the grouped decode kernel, sized for GC heads per CTA.
// p first, for its 16-byte loads.
template <int HD, int GC> struct __align__(16) AttnGdSmem {
  float p[ATTN_WARPS][GC][32]; // p of a key step
  float qs[GC][HD];
  float sm[ATTN_WARPS][GC], sl[ATTN_WARPS][GC];
  float sacc[ATTN_WARPS][GC][HD];
  float sink[GC]; // the heads' sinks (attention weights, constant): loaded with q or before the PDL wait, not in the merge
};

// The folded RoPE + KV write (attn_gdr_kernel): up to ATTN_ROPE_MAX_TOK
// tokens per launch; the new rows of the CTA's sequence whose positions lie
// in its keys are staged in shared memory as the cache would hold them (k
// rotated, then both converted to the cache type), and the key loop reads
// those rows from there instead of the cache (which another CTA of this
// grid writes).
constexpr int ATTN_ROPE_MAX_TOK = 8;
template <typename KV, int HD, int GC> struct __align__(16) AttnGdrSmem : AttnGdSmem<HD, GC> {
  KV nk[ATTN_ROPE_MAX_TOK][HD]; // staged new rows (kv head of the CTA): k rotated, as stored
  KV nv[ATTN_ROPE_MAX_TOK][HD];
  int npos[ATTN_ROPE_MAX_TOK], nrow[ATTN_ROPE_MAX_TOK];
  int nnew;
};
template <typename KV> __device__ __forceinline__ KV attn_kv_store(float v);
template <> __device__ __forceinline__ float attn_kv_store<float>(float v) { return v; }
template <> __device__ __forceinline__ __half attn_kv_store<__half>(float v) { return __float2half(v); }

// One row's keys [k0, k1) for HC query heads h0 .. h0 + HC - 1 (sharing kv
// head kvh): the output (direct: this CTA holds every key of the row; sink
// included) or the partial (m, l, acc) of split slot sp; the body of
// attn_gd7_kernel. V chunks of half the rows at 8 heads per CTA, for the
// 128-register cap of the launch bounds, and the probabilities of a key
// step go through shared memory (one 16-byte broadcast load per 4 keys and
// head) instead of one shuffle per key and head (HC x 32 shuffles per step;
// a shuffle issues at a quarter of the FMA rate). Starts with a barrier-free
// q load and ends after the merge's reads of S (see attn_gd_body for why no
// barrier is needed between rows).
// ROPE (attn_gdr_kernel): S.qs already holds the rotated q (loaded by the
// kernel before its first barrier), and the K / V rows of keys staged in S
// (new rows of this batch) are read from S: a lane carries its key's K and V
// row pointers (generic: the cache or S) instead of its slot.
// KV0 (ROPE): the keys [k0, kend) were copied before pdl_wait into kv0 (attn_kv0_copy: K rows at stride
// attn_kv0_ks, then, with kv0v, V rows), and their lanes read them from there.
template <typename KV, int HD, int HC, bool ROPE = false, typename SM>
__device__ __forceinline__ void attn_gd_row(const orch_attn_args &a, SM &S, int64_t t, int seq, int h0, int kvh,
                                            int k0, int k1, bool direct, float *part, int splits, int sp,
                                            int kend = 0, const unsigned char *kv0 = nullptr,
                                            bool kv0v = false) {
  constexpr int E = attn_lane_dims(HD);
  static_assert(HD % 64 == 0, "lanes hold whole, even numbers of dims");
  // V rows per chunk: <= 32 registers of raw V per lane.
  constexpr int VW = E * (int)sizeof(KV) / 4;
  constexpr int VCH = (VW >= 4 ? 8 : VW >= 2 ? 16 : 32) / (HC >= 8 ? 2 : 1);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const KV *kc = (const KV *)a.k_cache;
  const KV *vc = (const KV *)a.v_cache;
  const int64_t slot_stride = (int64_t)a.n_kv_heads * HD;
  const int32_t *bt = a.block_tables + (int64_t)seq * a.max_blocks;
  // The slot of this lane's key of the warp's first step: its block-table
  // load is in flight with the q loads (not after the barrier: one memory
  // latency fewer on a short row's chain).
  auto key_slot = [&](int base) {
    const int kp = base + lane;
    const int kk = kp < k1 ? kp : base; // a valid key: its V is finite, and p = 0
    return (int64_t)bt[kk / a.block_size] * a.block_size + kk % a.block_size;
  };
  // ROPE: this lane's key's K and V rows for kv head kvh (staged or cached).
  auto key_rows = [&](int base, const KV *&kr, const KV *&vr, bool first) { // first: the warp's first step (kv0)
    const int kp = base + lane;
    const int kk = kp < k1 ? kp : base;
    int j = -1;
    if constexpr (ROPE) {
      for (int i = 0; i < S.nnew; i++)
        if (S.npos[i] == kk) j = i;
    }
    if (j >= 0) {
      if constexpr (ROPE) {
        kr = S.nk[j];
        vr = S.nv[j];
      }
    } else if (ROPE && first && kk < kend) { // copied before the wait (kk - k0: the CTA's row; only first steps)
      kr = reinterpret_cast<const KV *>(kv0 + (kk - k0) * attn_kv0_ks(HD, sizeof(KV)));
      if (kv0v)
        vr = reinterpret_cast<const KV *>(kv0 + ATTN_GD_GRAN * attn_kv0_ks(HD, sizeof(KV)) +
                                          (kk - k0) * HD * (int)sizeof(KV));
      else
        vr = vc + ((int64_t)bt[kk / a.block_size] * a.block_size + kk % a.block_size) * slot_stride +
             (int64_t)kvh * HD;
    } else {
      const int64_t sl = (int64_t)bt[kk / a.block_size] * a.block_size + kk % a.block_size;
      kr = kc + sl * slot_stride + (int64_t)kvh * HD;
      vr = vc + sl * slot_stride + (int64_t)kvh * HD;
    }
  };
  const int b0 = k0 + warp * 32;
  const int64_t slot0 = !ROPE && b0 < k1 ? key_slot(b0) : 0;
  const KV *kr0 = kc, *vr0 = vc; // ROPE
  if constexpr (ROPE) {
    if (b0 < k1) key_rows(b0, kr0, vr0, true);
  }
  if constexpr (!ROPE) {
    const float *qr = a.q + t * a.q_stride + (int64_t)h0 * HD;
    for (int i = threadIdx.x; i < HC * HD; i += blockDim.x) S.qs[i / HD][i % HD] = qr[i] * a.scale;
    if (threadIdx.x < HC) S.sink[threadIdx.x] = a.sinks ? a.sinks[h0 + threadIdx.x] : -INFINITY; // with q's loads
  }
  __syncthreads();
  float m[HC], l[HC], acc[HC][E];
#pragma unroll
  for (int g = 0; g < HC; g++) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < E; e++) acc[g][e] = 0.f;
  }
  for (int base = b0; base < k1; base += ATTN_WARPS * 32) {
    const bool ok = base + lane < k1;
    const int64_t slot = ROPE ? 0 : base == b0 ? slot0 : key_slot(base);
    const int cnt = min(32, k1 - base);
    const KV *krr = kr0, *vrow = vr0; // ROPE: this lane's key's K and V rows
    if constexpr (ROPE) {
      if (base != b0) key_rows(base, krr, vrow, false);
    }
    AttnVRow<KV, E> v[VCH];
#pragma unroll
    for (int j = 0; j < VCH; j++) {
      if constexpr (ROPE) {
        v[j].load((const KV *)__shfl_sync(0xffffffffu, (long long)vrow, j) + lane * E);
      } else {
        const int64_t sj = __shfl_sync(0xffffffffu, slot, j);
        v[j].load(vc + sj * slot_stride + (int64_t)kvh * HD + lane * E);
      }
    }
    const KV *kr = ROPE ? krr : kc + slot * slot_stride + (int64_t)kvh * HD;
    float s[HC];
#pragma unroll
    for (int g = 0; g < HC; g++) s[g] = 0.f;
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
      float kf[8];
      if constexpr (sizeof(KV) == 4) {
        const float4 *k4 = reinterpret_cast<const float4 *>(kr) + 2 * i;
        const float4 x = k4[0], y = k4[1];
        kf[0] = x.x, kf[1] = x.y, kf[2] = x.z, kf[3] = x.w, kf[4] = y.x, kf[5] = y.y, kf[6] = y.z, kf[7] = y.w;
      } else {
        const uint4 u = reinterpret_cast<const uint4 *>(kr)[i];
        const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
          const float2 f = attn_h2f2(w[j]);
          kf[2 * j] = f.x, kf[2 * j + 1] = f.y;
        }
      }
#pragma unroll
      for (int g = 0; g < HC; g++)
#pragma unroll
        for (int j = 0; j < 8; j++) s[g] += S.qs[g][8 * i + j] * kf[j];
    }
    float p[HC];
#pragma unroll
    for (int g = 0; g < HC; g++) {
      const float sg = ok ? s[g] : -INFINITY;
      const float mn = fmaxf(m[g], warp_max(sg));
      const float corr = __expf(m[g] - mn); // m = -inf first: 0
      p[g] = ok ? __expf(sg - mn) : 0.f;
      l[g] = l[g] * corr + warp_sum(p[g]);
#pragma unroll
      for (int e = 0; e < E; e++) acc[g][e] *= corr;
      m[g] = mn;
    }
#pragma unroll
    for (int g = 0; g < HC; g++) S.p[warp][g][lane] = p[g];
    __syncwarp();
#pragma unroll
    for (int c = 0; c < 32; c += VCH) {
      if (c >= cnt) break; // uniform
      if (c > 0) {
#pragma unroll
        for (int j = 0; j < VCH; j++) {
          if constexpr (ROPE) {
            v[j].load((const KV *)__shfl_sync(0xffffffffu, (long long)vrow, c + j) + lane * E);
          } else {
            const int64_t sj = __shfl_sync(0xffffffffu, slot, c + j);
            v[j].load(vc + sj * slot_stride + (int64_t)kvh * HD + lane * E);
          }
        }
      }
#pragma unroll
      for (int j4 = 0; j4 < VCH; j4 += 4) {
#pragma unroll
        for (int g = 0; g < HC; g++) {
          const float4 p4 = *reinterpret_cast<const float4 *>(&S.p[warp][g][c + j4]);
          const float pj[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
          for (int jj = 0; jj < 4; jj++)
#pragma unroll
            for (int e = 0; e < E; e++) acc[g][e] += pj[jj] * v[j4 + jj].get(e);
        }
      }
    }
    __syncwarp(); // every lane read S.p before the next step writes it
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < HC; g++) {
      S.sm[warp][g] = m[g];
      S.sl[warp][g] = l[g];
    }
  }
#pragma unroll
  for (int g = 0; g < HC; g++)
#pragma unroll
    for (int e = 0; e < E; e++) S.sacc[warp][g][lane * E + e] = acc[g][e];
  __syncthreads();
  // Merge: warp w handles heads w, w + ATTN_WARPS, ... of the CTA.
  for (int g = warp; g < HC; g += ATTN_WARPS) {
    const int h = h0 + g;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; w++) M = fmaxf(M, S.sm[w][g]);
    const float sink = direct && a.sinks ? S.sink[g] : -INFINITY;
    M = fmaxf(M, sink);
    float L = direct && a.sinks ? __expf(sink - M) : 0.f, f[ATTN_WARPS];
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; w++) {
      f[w] = S.sl[w][g] > 0.f ? __expf(S.sm[w][g] - M) : 0.f;
      L += S.sl[w][g] * f[w];
    }
    float *o, inv = 1.f;
    if (direct) {
      o = a.out + t * (int64_t)a.n_heads * HD + (int64_t)h * HD;
      inv = 1.f / L;
    } else {
      o = part + ((t * a.n_heads + h) * (int64_t)splits + sp) * (HD + 2);
      if (lane == 0) {
        o[HD] = M;
        o[HD + 1] = L;
      }
    }
#pragma unroll
    for (int e = 0; e < E; e++) {
      const int dd = lane * E + e;
      float vv = 0.f;
#pragma unroll
      for (int w = 0; w < ATTN_WARPS; w++) vv += S.sacc[w][g][dd] * f[w];
      o[dd] = vv * inv;
    }
  }
}

// v6 (depth-adaptive GQA-grouped flash-decoding): grid (n_heads / GC, row,
// split). A CTA serves GC consecutive query heads that share one kv head
// (GC divides the group size G = n_heads / n_kv_heads, read at run time), so
// K/V are read G / GC times per kv head (once for GC = G). Besides:
//  - the split of the keys comes from the row's actual span on the device
//    (attn_split_per / attn_split_used with ATTN_GD_GRAN), not from the grid:
//    a grid captured for the context length costs a short row one CTA per
//    head group (which writes the output, sink included) and no combine work;
//  - all 32 lanes of a key step hold a valid key (the tail lanes repeat the
//    step's first key with p = 0), so the V rows of a step are loaded
//    unconditionally, in chunks of VCH rows issued before they are used (the
//    first chunk before the K dot product): one memory latency per step
//    instead of one per key of a serial V loop.
// Partials use attn2's layout (per query head, `splits` = gridDim.z slots);
// attn_combine6 merges the used ones. The body of attn_gd7_kernel. (v5, v6's
// kernel without the launch bounds / PDL, and v8's single-launch variant
// were deleted in session 7.)
template <typename KV, int HD, int GC>
__device__ __forceinline__ void attn_gd_body(const orch_attn_args &a, float *part, int splits, int tc_skip) {
  const int G = a.n_heads / a.n_kv_heads;
  const int h0 = blockIdx.x * GC, kvh = h0 / G, sp = blockIdx.z;
  __shared__ AttnGdSmem<HD, GC> S;
  // Rows as in attn2 (no barrier needed between rows, same argument).
  AttnRows rows(a);
  for (int64_t t = rows.r0; t < rows.r1; t++) {
    if (tc_skip && rows.taken(a, t)) continue; // uniform over the CTA
    const int qp = a.tok_pos[t], seq = a.tok_seq[t]; // (both loads in flight together)
    const int span = attn_span(qp, a.window), start = qp + 1 - span;
    const int per = attn_split_per(span, splits, ATTN_GD_GRAN);
    const int used = attn_split_used(span, per);
    if (sp >= used) continue; // uniform: this split has no keys of this row
    const int k0 = start + sp * per, k1 = min(k0 + per, qp + 1);
    attn_gd_row<KV, HD, GC>(a, S, t, seq, h0, kvh, k0, k1, used == 1, part, splits, sp);
  } // rows
}

// v7 = v6 with (a) launch bounds for 4 CTAs/SM at >= 4 heads per CTA (v6's
// 8-head instance takes ~168 registers: 3 CTAs/SM, so the 520 working CTAs of
// a depth-8192 decode step run as 1.3 waves; capped at 128 it spills ~40-60
// bytes) and (b) programmatic dependent launch (common.cuh pdl_wait: every
// thread waits before touching memory; the launch and prologue overlap the
// previous kernel's tail).
#ifdef ORCH_EMU
#define ATTN_GD7_BOUNDS(GC)
#else
#define ATTN_GD7_BOUNDS(GC) __launch_bounds__(ATTN_WARPS * 32, (GC) >= 4 ? 4 : 3)
#endif
template <typename KV, int HD, int GC>
__global__ void ATTN_GD7_BOUNDS(GC) attn_gd7_kernel(orch_attn_args a, float *part, int splits, int tc_skip) {
  pdl_wait();
  pdl_trigger();
  attn_gd_body<KV, HD, GC>(a, part, splits, tc_skip);
}

// RoPE of q and k + the KV write folded into the decode attention
// (orch_attention_rope; default, ORCH_CUDA_ATTN_ROPE=0 off): attn_gd7_kernel's grid, work
// split and arithmetic, for batches of <= ATTN_ROPE_MAX_TOK rows (one row per
// CTA: no tensor-core rows) from the unrotated q / k / v of the GEMVs:
//  - the CTA's q heads are rotated as they are loaded (rope_elem: the bits
//    orch_rope_kv writes back), before the first barrier, with the row scan;
//  - the rows of the batch of this CTA's sequence whose positions are among
//    its keys (the row itself in the last used split; more for a multi-token
//    row of one sequence) are staged in shared memory, k rotated, both as the
//    cache type, and read from there by the key loop;
//  - the first head group of each kv head, in the split that holds the row's
//    own position, writes the row's k / v of that kv head to the cache at
//    slots[t] (what orch_rope_kv stores). No CTA of this grid reads a cache
//    slot that this grid writes: a row's new positions come from the stage.
// So out and the caches are bit-identical to orch_rope_kv + orch_attention;
// q and k stay unrotated in memory.
// The K / V rows of the keys a decode CTA of attn_gdr_kernel will read, into L2 BEFORE pdl_wait (session 8): they
// were written by earlier steps, and the row's position, sequence and block table are step inputs copied in before
// the step's first kernel, so nothing the previous kernels of this step write is touched. The loads then hit L2
// instead of paying DRAM latency after the q/k/v GEMV. A slot this grid is about to write (the row's own
// position) may be prefetched too: L2 is where every SM's write lands, so a later read still sees the new data.
// One key per thread, at most blockDim.x keys of the CTA's split (all of them at the depths a 4096-CTA grid
// splits into 32..256-key slices).
__device__ __forceinline__ void attn_prefetch_l2(const void *p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
  (void)p;
#endif
}
template <typename KV, int HD>
__device__ __forceinline__ void attn_gdr_prefetch(const orch_attn_args &a, int seq, int kvh, int k0, int k1, bool pk,
                                                  bool pv) {
  const int kk = k0 + (int)threadIdx.x;
  if (kk >= k1) return;
  const int64_t sl = (int64_t)a.block_tables[(int64_t)seq * a.max_blocks + kk / a.block_size] * a.block_size +
                     kk % a.block_size;
  const int64_t off = (sl * a.n_kv_heads + kvh) * HD;
  constexpr int LINES = (HD * (int)sizeof(KV) + 127) / 128;
#pragma unroll
  for (int i = 0; i < LINES; i++) {
    if (pk) attn_prefetch_l2((const char *)((const KV *)a.k_cache + off) + 128 * i);
    if (pv) attn_prefetch_l2((const char *)((const KV *)a.v_cache + off) + 128 * i);
  }
}

// KV0 (session 15): the rows of the keys [k0, kend) of the CTA's first ATTN_GD_GRAN (every warp's first key step)
// copied into shared memory by cp.async BEFORE pdl_wait, for the same reason as the prefetch (cached rows of
// earlier steps, constant during this one; kend excludes every position this step writes), so that the key loop's
// first step after the wait reads K (and V) there: no L2 round trip for K, and with V (kv0v) none for either V chunk.
// A warp copies its own 32 rows, 16 bytes a lane, consecutive lanes along a row; the kernel waits for them before
// its first barrier. (Emulation: ATTN_EMU_PRE_WAIT_READ, if defined, sees each source.)
#ifdef ORCH_EMU
#define ATTN_KV0_SMEM attn_tc::smem // cuda_emu.h's dynamic shared memory
#else
extern __shared__ __align__(16) unsigned char attn_kv0_smem[];
#define ATTN_KV0_SMEM attn_kv0_smem
#endif
__device__ __forceinline__ void attn_cp16(void *dst, const void *src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
#else
#ifdef ATTN_EMU_PRE_WAIT_READ
  ATTN_EMU_PRE_WAIT_READ(src, 16);
#endif
  *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(src);
#endif
}
__device__ __forceinline__ void attn_cp_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}
template <typename KV, int HD>
__device__ __forceinline__ void attn_kv0_copy(const orch_attn_args &a, unsigned char *kv0, int seq, int kvh, int k0,
                                              int kend, bool v) {
  constexpr int CH = HD * (int)sizeof(KV) / 16; // 16-byte pieces of a row
  constexpr int KS = HD * (int)sizeof(KV) + 16; // attn_kv0_ks
  const int lane = threadIdx.x & 31, r0 = threadIdx.x & ~31;
  const int kk = k0 + (int)threadIdx.x; // this lane's key: row threadIdx.x
  int64_t off = -1;                     // its row's byte offset in the caches
  if (kk < kend)
    off = (((int64_t)a.block_tables[(int64_t)seq * a.max_blocks + kk / a.block_size] * a.block_size +
            kk % a.block_size) * a.n_kv_heads + kvh) * (HD * (int)sizeof(KV));
#pragma unroll 4
  for (int i = lane; i < 32 * CH; i += 32) {
    const int r = i / CH, c = 16 * (i % CH);
    const int64_t o = __shfl_sync(0xffffffffu, (long long)off, r);
    if (o < 0) continue;
    attn_cp16(kv0 + (r0 + r) * KS + c, (const char *)a.k_cache + o + c);
    if (v) attn_cp16(kv0 + ATTN_GD_GRAN * KS + (r0 + r) * (HD * (int)sizeof(KV)) + c, (const char *)a.v_cache + o + c);
  }
}

template <typename KV, int HD, int GC>
__global__ void ATTN_GD7_BOUNDS(GC)
    attn_gdr_kernel(orch_attn_args a, orch_attn_rope_args r, float *part, int splits, int prefetch, int kv0) {
  const int G = a.n_heads / a.n_kv_heads;
  const int h0 = blockIdx.x * GC, kvh = h0 / G, sp = blockIdx.z;
  __shared__ AttnGdrSmem<KV, HD, GC> S;
  // the row's position, sequence and split are step inputs (read before pdl_wait, see attn_gdr_prefetch)
  const int64_t t = blockIdx.y;
  const int qp = a.tok_pos[t], seq = a.tok_seq[t];
  const int span = attn_span(qp, a.window), start = qp + 1 - span;
  const int per = attn_split_per(span, splits, ATTN_GD_GRAN);
  const int used = attn_split_used(span, per);
  const int k0 = start + sp * per, k1 = min(k0 + per, qp + 1);
  if (prefetch && kv0 < 2 && sp < used) // qp: the staged row
    attn_gdr_prefetch<KV, HD>(a, seq, kvh, k0, min(k1, qp), kv0 == 0, true);
  int kend = k0; // kv0: keys [k0, kend) copied before the wait
  if (kv0 && sp < used) {
    int lim = min(k1, k0 + ATTN_GD_GRAN);
    for (int u = 0; u < a.n_tok; u++) // positions this step writes: every new row of the sequence (qp included)
      if (a.tok_seq[u] == seq) lim = min(lim, a.tok_pos[u]);
    kend = max(k0, lim);
    attn_kv0_copy<KV, HD>(a, ATTN_KV0_SMEM, seq, kvh, k0, kend, kv0 == 2);
  }
  if (threadIdx.x < GC) S.sink[threadIdx.x] = a.sinks ? a.sinks[h0 + threadIdx.x] : -INFINITY; // constant: before the wait
  pdl_wait();
  pdl_trigger();
  if (sp >= used) return; // uniform: this split has no keys of this row
  { // q of the CTA's heads, rotated (in flight with the row scan below)
    const float *qr = a.q + t * a.q_stride + (int64_t)h0 * HD;
    for (int i = threadIdx.x; i < GC * HD; i += blockDim.x)
      S.qs[i / HD][i % HD] =
          rope_elem(qr + (i / HD) * HD, i % HD, r.rot_dim, qp, r.inv_freq, r.attn_factor, r.neox) * a.scale;
  }
  // Stages new row j (batch row u at position pu) for this CTA's kv head: k rotated, both as the cache holds them.
  auto stage = [&](int j, int64_t u, int pu, int i) {
    S.nk[j][i] = attn_kv_store<KV>(
        rope_elem(r.k + u * r.k_stride + (int64_t)kvh * HD, i, r.rot_dim, pu, r.inv_freq, r.attn_factor, r.neox));
    S.nv[j][i] = attn_kv_store<KV>(r.v[u * r.v_stride + (int64_t)kvh * HD + i]);
  };
  // The row's own position is among the keys of its last used split: staged first (slot 0), with the scan.
  const int own = sp == used - 1 ? 1 : 0;
  if (own)
    for (int i = threadIdx.x; i < HD; i += blockDim.x) stage(0, t, qp, i);
  if (threadIdx.x < 32) { // the batch's other rows of this sequence among the keys: lane u checks row u (n_tok <= 8)
    const int u = threadIdx.x;
    int pu = 0;
    bool in = false;
    if (u < a.n_tok && u != t) {
      pu = a.tok_pos[u];
      in = a.tok_seq[u] == seq && pu >= k0 && pu < k1;
    }
    const unsigned m = __ballot_sync(0xffffffffu, in);
    if (in) {
      const int j = own + __popc(m & ((1u << u) - 1u));
      S.npos[j] = pu;
      S.nrow[j] = u;
    }
    if (u == 0) {
      S.nnew = own + __popc(m);
      if (own) {
        S.npos[0] = qp;
        S.nrow[0] = (int)t;
      }
    }
  }
  if (kv0) attn_cp_wait_all(); // this thread's copies (made visible to its warp by the barrier)
  __syncthreads();
  const int nnew = S.nnew;
  if (nnew > own) { // uniform: a multi-token row of one sequence
    for (int i = threadIdx.x; i < (nnew - own) * HD; i += blockDim.x) {
      const int j = own + i / HD;
      stage(j, S.nrow[j], S.npos[j], i % HD);
    }
    __syncthreads();
  }
  if (own && h0 % G == 0) { // the KV write of (row t, kv head kvh): slot 0
    KV *kc = (KV *)a.k_cache + (int64_t)r.slots[t] * a.n_kv_heads * HD + (int64_t)kvh * HD;
    KV *vc = (KV *)a.v_cache + (int64_t)r.slots[t] * a.n_kv_heads * HD + (int64_t)kvh * HD;
    for (int d = threadIdx.x; d < HD; d += blockDim.x) {
      kc[d] = S.nk[0][d];
      vc[d] = S.nv[0][d];
    }
  }
  attn_gd_row<KV, HD, GC, true>(a, S, t, seq, h0, kvh, k0, k1, used == 1, part, splits, sp, kend, ATTN_KV0_SMEM,
                                kv0 == 2);
}

// The weights of a combine of `used` split partials of (row t, head h) with
// the sink: lane j of the result holds f of splits j, 32 + j, ... (f[r]) and
// the returned L (sum over the splits of l * f, plus the sink's term); M is
// the max over the splits' m and the sink. One warp; used <= ATTN_GD_MAX_SPLITS.
template <int HD>
__device__ __forceinline__ float attn_combine_weights(const orch_attn_args &a, const float *pp, int used, int h,
                                                      float (&f)[ATTN_GD_MAX_SPLITS / 32]) {
  constexpr int R = ATTN_GD_MAX_SPLITS / 32;
  const int lane = threadIdx.x & 31;
  float ms[R], ls[R], M = a.sinks ? a.sinks[h] : -INFINITY;
#pragma unroll
  for (int r = 0; r < R; r++) {
    const int s = r * 32 + lane;
    ms[r] = s < used ? pp[s * (HD + 2) + HD] : -INFINITY;
    ls[r] = s < used ? pp[s * (HD + 2) + HD + 1] : 0.f;
    if (ls[r] > 0.f) M = fmaxf(M, ms[r]);
  }
  M = warp_max(M);
  float L = 0.f;
#pragma unroll
  for (int r = 0; r < R; r++) {
    f[r] = ls[r] > 0.f ? __expf(ms[r] - M) : 0.f;
    L += ls[r] * f[r];
  }
  return warp_sum(L) + (a.sinks ? __expf(a.sinks[h] - M) : 0.f);
}

// v6 combine: grid (head, row), one warp. Merges only the splits the split
// kernel used for this row (same attn_split_* on the same device arrays;
// gran = the split kernel's granularity) with the sink; a row with one used
// split was written by the split kernel and is skipped. The lanes read the
// (M, L) of 4 splits each at once (splits <= ATTN_GD_MAX_SPLITS), and the
// partial rows are read in unrolled runs so that many loads are in flight
// (not one dependent step per split).
template <int HD>
__global__ void attn_combine6_kernel(orch_attn_args a, const float *part, int splits, int gran, int tc_skip) {
  constexpr int E = attn_lane_dims(HD);
  constexpr int R = ATTN_GD_MAX_SPLITS / 32;
  pdl_trigger(); // the out projection's CTAs launch now and stream their weights while this runs (session 8: without
                 // it, every layer's out GEMV after a combine started cold, ~3 us (gpt-oss) / ~6 us (Llama) later)
  pdl_wait();    // launched with PDL after attn_gd7 (a no-op after attn2)
  const int h = blockIdx.x, lane = threadIdx.x;
  const int64_t t = blockIdx.y;
  if (tc_skip && attn_row_taken_by_tc(a, t)) return;
  const int span = attn_span(a.tok_pos[t], a.window);
  const int used = attn_split_used(span, attn_split_per(span, splits, gran));
  if (used <= 1) return; // written by the split kernel
  const float *pp = part + (t * a.n_heads + h) * (int64_t)splits * (HD + 2);
  float f[R];
  const float L = attn_combine_weights<HD>(a, pp, used, h, f);
  float acc[E];
#pragma unroll
  for (int e = 0; e < E; e++) acc[e] = 0.f;
#pragma unroll
  for (int r = 0; r < R; r++) {
    if (r * 32 >= used) break;
    const int n = min(32, used - r * 32);
#pragma unroll 8
    for (int j = 0; j < n; j++) {
      const float fj = __shfl_sync(0xffffffffu, f[r], j);
      const float *ps = pp + (r * 32 + j) * (HD + 2);
#pragma unroll
      for (int e = 0; e < E; e++)
        if (attn_dim_ok(HD, lane, e)) acc[e] += ps[lane * E + e] * fj;
    }
  }
  const float inv = 1.f / L;
  float *o = a.out + t * (int64_t)a.n_heads * HD + (int64_t)h * HD;
#pragma unroll
  for (int e = 0; e < E; e++)
    if (attn_dim_ok(HD, lane, e)) o[lane * E + e] = acc[e] * inv;
}

} // namespace attn_k
