// attention_fa.cuh — the register-resident tensor-core prefill kernel
// (attention v11 / v12, v12 the default; launched from attention_tc.cu). A
// header of its own so that cuda/test/attention_tc_emu_test.cpp compiles the
// same source on the CPU against cuda_emu.h (its mma.sync and ldmatrix
// emulation gathers the fragments by the PTX ISA table, so the hand-laid
// fragments below are checked there, not assumed).
//
// FlashAttention-2 style, for head dim 64 and 128: a CTA takes the same
// 64-row tiles as v3/v4 (attention_index.cuh: a tile's run of consecutive
// rows of one sequence; the flash-decoding kernels skip exactly these rows)
// and one query head (v11) or two of one kv group (v12); warp w owns rows
// 16w .. 16w + 15. Per 64-key tile:
//  - K and V are staged row-major in shared memory as fp16 (F16 cache:
//    cp.async, double-buffered; F32 cache: loaded, rounded, stored);
//  - S = Q K^T with mma.sync m16n8k16 (fp16 in, fp32 accumulate): Q's
//    A fragments stay in registers for the whole kernel, K's B fragments come
//    from ldmatrix;
//  - the online softmax runs on the S accumulators in registers (a lane holds
//    2 rows x 16 keys; the 4 lanes of a row meet through 2 shuffles), exact
//    per-tile rescale of O (registers: no shared-memory round trip);
//  - P's A fragments are the S accumulators repacked to fp16 pairs (the
//    m16n8k16 C layout of two 8-key tiles is the A layout of one 16-key step),
//    O += P V with V's B fragments from ldmatrix.trans.
// Fragments (lane = 4 * group + tig), as dec16.cuh documents them:
//   a[0] = A[g][2t, 2t+1]  a[1] = A[g+8][2t, 2t+1]  a[2] = A[g][2t+8, +9]  a[3] = A[g+8][2t+8, +9]
//   b[0] = B[2t, 2t+1][g]  b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]  d[2], d[3] = D[g+8][2t, 2t+1]
// Error: q (scaled), K/V (F32 cache) and P rounded to fp16, as v3/v4.
// (v9 / v10, the first register-resident versions with 32-bit fragment loads
// and software-pipelined register staging, were removed in session 5.)
#pragma once

#ifndef ORCH_EMU
#include <cuda_fp16.h>
#endif

#include "../include/orch_cuda.h"
#include "attention_index.cuh"
#include "ldsm.cuh"

namespace attn_fa {

constexpr int FA_BQ = ATTN_TC_ROWS; // query rows per CTA, 16 per warp
constexpr int FA_BK = 64;           // keys per tile
constexpr int FA_WARPS = FA_BQ / 16;
constexpr int FA_THREADS = FA_WARPS * 32;

__device__ __forceinline__ void fa_mma(float d[4], const unsigned a[4], const unsigned b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(ORCH_EMU)
  emu_mma_m16n8k16(d, a, b);
#endif
}

// Two floats as an fp16 pair in one register (lo in the low half).
__device__ __forceinline__ unsigned fa_pack(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned *>(&h);
}

__device__ __forceinline__ uint4 fa_f32x8_to_f16x8(float4 a, float4 b) {
  return make_uint4(fa_pack(a.x, a.y), fa_pack(a.z, a.w), fa_pack(b.x, b.y), fa_pack(b.z, b.w));
}

// ---- v11: ldmatrix fragments, cp.async double-buffered K/V ----
// K and V tiles stay row-major ([key][dim], 8 halves of padding: the 8 rows
// of an 8x8 ldmatrix block fall on distinct 16-byte bank groups); K's B
// fragments come from ldmatrix (one x4 = two k-steps of one 8-key tile), V's
// from ldmatrix.trans (one x4 = two 8-dim tiles of one 16-key step): a quarter
// of the 32-bit fragment loads it replaced (v9). F16 caches stage through cp.async (16-byte
// copies, zero-filled outside the visible keys) into two buffers (the next
// tile lands during this tile's math; dynamic shared memory, 45 / 78 KB at
// head dim 64 / 128), the slots from a block-table cache in shared memory
// (FaBt); F32 caches load, round and store (no overlap).
__device__ __forceinline__ void fa_ldsm_x4_trans(unsigned r[4], const __half *p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#elif defined(ORCH_EMU)
  // Transposed: lane l gets, of matrix i, rows 2 (l % 4) and 2 (l % 4) + 1
  // at column l / 4 (low half: the lower row).
  const int lane = threadIdx.x & 31;
  for (int i = 0; i < 4; i++) {
    const __half *p0 = (const __half *)__shfl_sync(0xffffffffu, (long long)p, i * 8 + 2 * (lane % 4));
    const __half *p1 = (const __half *)__shfl_sync(0xffffffffu, (long long)p, i * 8 + 2 * (lane % 4) + 1);
    unsigned short lo, hi;
    std::memcpy(&lo, p0 + lane / 4, 2);
    std::memcpy(&hi, p1 + lane / 4, 2);
    r[i] = lo | (unsigned)hi << 16;
  }
#endif
}
// 16 bytes global -> shared, asynchronously; zeros when !valid (src unread).
__device__ __forceinline__ void fa_cp16(__half *dst, const void *src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
#else
  if (valid) *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(src);
  else *reinterpret_cast<uint4 *>(dst) = make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void fa_cp_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void fa_cp_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// The CTA's block-table entries in shared memory (v11/v12): the blocks of
// keys kstart .. kend, loaded once at the start when they are at most
// FA_BT_CAP (32k keys at block size 16), so a tile's slots need no dependent
// global load (which stalled every tile's staging by an L2 round trip in v9);
// longer ranges read the global table.
constexpr int FA_BT_CAP = 2048;
struct FaBt {
  const int32_t *g, *s;
  int b0, bs;
  bool cached;
  __device__ __forceinline__ int64_t slot(int kp) const {
    const int b = kp / bs;
    return (int64_t)(cached ? s[b - b0] : g[b]) * bs + kp % bs;
  }
};

// Stages keys kb .. kb + 63 of K and V (row-major, fp16) into Ks / Vs; keys
// outside [klo, khi] are zeros. F16: cp.async (the caller commits / waits);
// F32: loaded, rounded, stored.
template <typename KV, int HD, int THREADS>
__device__ __forceinline__ void fa_stage_rows(__half *Ks, __half *Vs, const KV *kc, const KV *vc, const FaBt &bt,
                                              int64_t slot_stride, int kvh, int kb, int klo, int khi) {
  constexpr int CH = HD / 8, LDK = HD + 8;
#pragma unroll
  for (int i = 0; i < FA_BK * CH / THREADS; i++) {
    // Chunk-fastest: the CH lanes of a key read its row's HD halves as one
    // contiguous run (whole 32-byte sectors; v9's key-fastest order read 16
    // bytes of a different row per lane) and write one contiguous smem row.
    const int it = threadIdx.x + i * THREADS, j = it / CH, c = it % CH, kp = kb + j;
    const bool ok = kp >= klo && kp <= khi;
    int64_t off = 0;
    if (ok) off = bt.slot(kp) * slot_stride + (int64_t)kvh * HD + c * 8;
    if constexpr (sizeof(KV) == 2) {
      fa_cp16(Ks + j * LDK + c * 8, kc + off, ok);
      fa_cp16(Vs + j * LDK + c * 8, vc + off, ok);
    } else {
      uint4 ku = make_uint4(0, 0, 0, 0), vu = ku;
      if (ok) {
        const float4 *k4 = reinterpret_cast<const float4 *>(kc + off), *v4 = reinterpret_cast<const float4 *>(vc + off);
        ku = fa_f32x8_to_f16x8(k4[0], k4[1]);
        vu = fa_f32x8_to_f16x8(v4[0], v4[1]);
      }
      *reinterpret_cast<uint4 *>(Ks + j * LDK + c * 8) = ku;
      *reinterpret_cast<uint4 *>(Vs + j * LDK + c * 8) = vu;
    }
  }
}

// Dynamic shared memory of attn_fa11_kernel: K and V tiles x 2 buffers, then
// the block-table cache (HD 64: 45 KB, HD 128: 78 KB).
template <int HD> struct Fa11Smem {
  static constexpr size_t TILE = (size_t)FA_BK * (HD + 8) * 2; // bytes; a multiple of 128
  static constexpr size_t BT_OFF = 4 * TILE;
  static constexpr size_t BYTES = BT_OFF + FA_BT_CAP * 4;
  static_assert(TILE % 128 == 0, "tile alignment");
};

// v11 / v12: HPC = 1 / 2 query heads per CTA (warps 4 hw .. 4 hw + 3 serve
// head blockIdx.y * HPC + hw, which share one kv head, so each staged K/V
// tile serves HPC heads), ldmatrix fragments and cp.async staging (above).
// v11/v12 launch bounds: head dim 64 at <= 128 registers (4 CTAs/SM for one
// head per CTA, 2 for two).
#ifdef ORCH_EMU
#define ATTN_FA11_BOUNDS(HD, HPC)
#else
#define ATTN_FA11_BOUNDS(HD, HPC) __launch_bounds__(FA_THREADS * (HPC), (HD) <= 64 ? 4 / (HPC) : 1)
#endif
template <typename KV, int HD, int HPC = 1>
__global__ void ATTN_FA11_BOUNDS(HD, HPC) attn_fa11_kernel(orch_attn_args a) {
  constexpr int THREADS = FA_THREADS * HPC;
  constexpr int LDK = HD + 8;
  using SL = Fa11Smem<HD>;
  static_assert(HD % 32 == 0 && (FA_BK * HD / 8) % THREADS == 0, "tiling");
#ifdef ORCH_EMU
  unsigned char *smem = attn_tc::smem; // cuda_emu.h's dynamic shared memory
#else
  extern __shared__ __align__(128) unsigned char smem[];
#endif
  // Buffer b of K / V (computed, not an indexed array: that went to local memory).
  auto Ks = [&](int b) { return reinterpret_cast<__half *>(smem + b * SL::TILE); };
  auto Vs = [&](int b) { return reinterpret_cast<__half *>(smem + (2 + b) * SL::TILE); };
  int32_t *sbt = reinterpret_cast<int32_t *>(smem + SL::BT_OFF);
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) % FA_WARPS; // warp: the row group
  const int64_t t0 = (int64_t)blockIdx.x * FA_BQ;
  const int h = blockIdx.y * HPC + (int)(threadIdx.x >> 5) / FA_WARPS;

  const bool ok0 = attn_tc_row_ok(a.tok_seq, a.tok_pos, a.n_tok, t0, t0 + lane);
  const bool ok1 = attn_tc_row_ok(a.tok_seq, a.tok_pos, a.n_tok, t0, t0 + 32 + lane);
  const int run = attn_tc_run_from_bits(__ballot_sync(0xffffffffu, ok0), __ballot_sync(0xffffffffu, ok1));
  if (!attn_tc_takes(run, 0)) return;

  const int p0 = a.tok_pos[t0];
  const int32_t *bt = a.block_tables + (int64_t)a.tok_seq[t0] * a.max_blocks;
  const int kvh = h / (a.n_heads / a.n_kv_heads);
  const int64_t slot_stride = (int64_t)a.n_kv_heads * HD;
  const int kend = p0 + run - 1;
  const int kstart = a.window > 0 ? max(0, p0 - a.window + 1) : 0;
  const KV *kc = (const KV *)a.k_cache;
  const KV *vc = (const KV *)a.v_cache;

  const int g = lane >> 2, tq = lane & 3;
  const int r0 = warp * 16 + g, r1 = r0 + 8;
  const int qp0 = p0 + r0, qp1 = p0 + r1;
  const bool live0 = r0 < run, live1 = r1 < run;
  const bool warp_live = warp * 16 < run;
  const int wlast = p0 + min(run, warp * 16 + 16) - 1;
  const int wfirst = a.window > 0 ? max(0, p0 + warp * 16 - a.window + 1) : 0;

  FaBt fbt;
  fbt.g = bt;
  fbt.s = sbt;
  fbt.bs = a.block_size;
  fbt.b0 = kstart / a.block_size;
  const int nbt = kend / a.block_size - fbt.b0 + 1;
  fbt.cached = nbt <= FA_BT_CAP;
  if (fbt.cached) {
    for (int i = threadIdx.x; i < nbt; i += THREADS) sbt[i] = bt[fbt.b0 + i];
    __syncthreads();
  }
  fa_stage_rows<KV, HD, THREADS>(Ks(0), Vs(0), kc, vc, fbt, slot_stride, kvh, kstart, kstart, kend);
  fa_cp_commit();

  unsigned qf[HD / 16][4];
  {
    const float *q0 = a.q + (t0 + r0) * a.q_stride + (int64_t)h * HD;
    const float *q1 = a.q + (t0 + r1) * a.q_stride + (int64_t)h * HD;
#pragma unroll
    for (int k = 0; k < HD / 16; k++) {
      const int c0 = k * 16 + 2 * tq, c1 = c0 + 8;
      qf[k][0] = live0 ? fa_pack(q0[c0] * a.scale, q0[c0 + 1] * a.scale) : 0u;
      qf[k][1] = live1 ? fa_pack(q1[c0] * a.scale, q1[c0 + 1] * a.scale) : 0u;
      qf[k][2] = live0 ? fa_pack(q0[c1] * a.scale, q0[c1 + 1] * a.scale) : 0u;
      qf[k][3] = live1 ? fa_pack(q1[c1] * a.scale, q1[c1 + 1] * a.scale) : 0u;
    }
  }

  float o[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  // ldmatrix row addresses (lane's row of its matrix): K x4 = dims +0/+8/+16/+24
  // of one 8-key tile; V x4 (trans) = keys +0/+8 x dims +0/+8 of one 16-key step.
  const int lr = lane & 7, lm = lane >> 3;
  int it = 0;
  for (int kb = kstart; kb <= kend; kb += FA_BK, it++) {
    const int buf = it & 1;
    if (kb + FA_BK <= kend) // the next tile into the other buffer (free: the barrier ending the last iteration)
      fa_stage_rows<KV, HD, THREADS>(Ks(buf ^ 1), Vs(buf ^ 1), kc, vc, fbt, slot_stride, kvh, kb + FA_BK, kstart,
                                     kend);
    fa_cp_commit();
    fa_cp_wait<1>(); // this tile's group has landed
    __syncthreads();
    if (warp_live && kb <= wlast && kb + FA_BK - 1 >= wfirst) {
      const __half *Kt = Ks(buf), *Vt_ = Vs(buf);
      float s[FA_BK / 8][4];
#pragma unroll
      for (int n = 0; n < FA_BK / 8; n++) {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int k = 0; k < HD / 16; k += 2) {
          unsigned b[4];
          orch_ldsm_x4(b, Kt + (n * 8 + lr) * LDK + k * 16 + lm * 8);
          fa_mma(s[n], qf[k], b);
          fa_mma(s[n], qf[k + 1], b + 2);
        }
      }
      const bool whole = kb + FA_BK - 1 <= p0 + warp * 16 && (a.window <= 0 || wlast - kb < a.window) &&
                         warp * 16 + 16 <= run;
      if (!whole) {
#pragma unroll
        for (int n = 0; n < FA_BK / 8; n++)
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const int kp = kb + n * 8 + 2 * tq + (e & 1);
            const int qp = e < 2 ? qp0 : qp1;
            const bool vis = (e < 2 ? live0 : live1) && kp <= qp && (a.window <= 0 || qp - kp < a.window);
            if (!vis) s[n][e] = -INFINITY;
          }
      }
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int n = 0; n < FA_BK / 8; n++) {
        mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
        mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
      }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
      const float base0 = mn0 == -INFINITY ? 0.f : mn0, base1 = mn1 == -INFINITY ? 0.f : mn1;
      const float corr0 = __expf(m0 - base0), corr1 = __expf(m1 - base1);
      m0 = mn0;
      m1 = mn1;
      l0 *= corr0;
      l1 *= corr1;
#pragma unroll
      for (int n = 0; n < HD / 8; n++) {
        o[n][0] *= corr0;
        o[n][1] *= corr0;
        o[n][2] *= corr1;
        o[n][3] *= corr1;
      }
#pragma unroll
      for (int n = 0; n < FA_BK / 8; n++) {
        s[n][0] = __expf(s[n][0] - base0);
        s[n][1] = __expf(s[n][1] - base0);
        s[n][2] = __expf(s[n][2] - base1);
        s[n][3] = __expf(s[n][3] - base1);
        l0 += s[n][0] + s[n][1];
        l1 += s[n][2] + s[n][3];
      }
#pragma unroll
      for (int kk = 0; kk < FA_BK / 16; kk++) {
        const unsigned pa[4] = {fa_pack(s[2 * kk][0], s[2 * kk][1]), fa_pack(s[2 * kk][2], s[2 * kk][3]),
                                fa_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                fa_pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int n = 0; n < HD / 8; n += 2) {
          unsigned b[4];
          fa_ldsm_x4_trans(b, Vt_ + (kk * 16 + (lm & 1) * 8 + lr) * LDK + n * 8 + (lm >> 1) * 8);
          fa_mma(o[n], pa, b);
          fa_mma(o[n + 1], pa, b + 2);
        }
      }
    }
    __syncthreads(); // every warp is done with this buffer before it is refilled
  }
  if (!warp_live) return;
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  float sc0 = 1.f / l0, sc1 = 1.f / l1;
  if (a.sinks) {
    const float sk = a.sinks[h];
    const float M0 = fmaxf(m0, sk), M1 = fmaxf(m1, sk);
    const float e0 = __expf(m0 - M0), e1 = __expf(m1 - M1);
    sc0 = e0 / (l0 * e0 + __expf(sk - M0));
    sc1 = e1 / (l1 * e1 + __expf(sk - M1));
  }
  float *out0 = a.out + (t0 + r0) * (int64_t)a.n_heads * HD + (int64_t)h * HD + 2 * tq;
  float *out1 = a.out + (t0 + r1) * (int64_t)a.n_heads * HD + (int64_t)h * HD + 2 * tq;
#pragma unroll
  for (int n = 0; n < HD / 8; n++) {
    if (live0) *reinterpret_cast<float2 *>(out0 + n * 8) = make_float2(o[n][0] * sc0, o[n][1] * sc0);
    if (live1) *reinterpret_cast<float2 *>(out1 + n * 8) = make_float2(o[n][2] * sc1, o[n][3] * sc1);
  }
}

} // namespace attn_fa
