// attention_tc.cuh — the tensor-core prefill kernel of attention_tc.cu (see
// there). A header of its own so that cuda/test/attention_tc_emu_test.cpp can
// compile the same kernel source on the CPU against an emulation of the few
// CUDA features it uses (threads, barriers, shuffles, WMMA, fp16).
#pragma once

#ifndef ORCH_EMU
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include "../include/orch_cuda.h"
#include "attention_index.cuh"

namespace attn_tc {

using namespace nvcuda;


constexpr int TC_BQ = ATTN_TC_ROWS; // query rows per CTA, 16 per warp
constexpr int TC_BK = 64;           // keys per tile
constexpr int TC_WARPS = TC_BQ / 16;

constexpr size_t align128(size_t b) { return (b + 127) / 128 * 128; }

// Shared-memory layout. Leading dims are padded so that rows start on
// different banks and stay multiples of 8 halfs / 4 floats (WMMA ldm rule);
// every fragment pointer below is 32-byte aligned (WMMA's 256-bit rule).
template <int HD>
struct TcLayout {
  static constexpr int LDQ = HD + 8;    // halfs: Q tile [TC_BQ][LDQ]
  static constexpr int LDK = HD + 8;    // halfs: K and V tiles [TC_BK][LDK]
  static constexpr int LDS = TC_BK + 4; // floats: S [TC_BQ][LDS]
  static constexpr int LDP = 2 * LDS;   // halfs: P overwrites S row by row
  static constexpr int LDO = HD + 4;    // floats: O [TC_BQ][LDO]
  static constexpr size_t Q_OFF = 0;
  static constexpr size_t K_OFF = Q_OFF + align128((size_t)TC_BQ * LDQ * 2);
  static constexpr size_t V_OFF = K_OFF + align128((size_t)TC_BK * LDK * 2);
  static constexpr size_t S_OFF = V_OFF + align128((size_t)TC_BK * LDK * 2);
  static constexpr size_t O_OFF = S_OFF + align128((size_t)TC_BQ * LDS * 4);
  static constexpr size_t BYTES = O_OFF + align128((size_t)TC_BQ * LDO * 4);
  static_assert(HD % 16 == 0 && LDQ % 8 == 0 && LDK % 8 == 0 && LDP % 8 == 0, "half ldm");
  static_assert(LDS % 4 == 0 && LDO % 4 == 0, "float ldm");
  static_assert((16 * LDQ * 2) % 32 == 0 && (16 * LDK * 2) % 32 == 0 && (16 * LDS * 4) % 32 == 0 &&
                    (16 * LDO * 4) % 32 == 0,
                "16-row fragment offsets stay 32-byte aligned");
};

__device__ __forceinline__ uint4 f32x8_to_f16x8(float4 a, float4 b) {
  uint4 u;
  __half2 *h = reinterpret_cast<__half2 *>(&u);
  h[0] = __floats2half2_rn(a.x, a.y);
  h[1] = __floats2half2_rn(a.z, a.w);
  h[2] = __floats2half2_rn(b.x, b.y);
  h[3] = __floats2half2_rn(b.z, b.w);
  return u;
}

// Stages keys kb .. kb+TC_BK-1 of K and V as fp16 rows; keys outside
// [klo, khi] are zeros (never garbage: a masked key's P is 0 and 0*NaN = NaN).
template <typename KV, int HD>
__device__ __forceinline__ void tc_load_kv(__half *Ks, __half *Vs, const KV *kc, const KV *vc, const int32_t *bt,
                                           int block_size, int64_t slot_stride, int kvh, int kb, int klo, int khi) {
  constexpr int CH = HD / 8; // 8-element chunks per key row
  constexpr int LDK = TcLayout<HD>::LDK;
  for (int i = threadIdx.x; i < TC_BK * CH; i += TC_WARPS * 32) {
    const int j = i / CH, c = i % CH;
    const int kp = kb + j;
    uint4 ku = make_uint4(0, 0, 0, 0), vu = ku;
    if (kp >= klo && kp <= khi) {
      const int64_t slot = (int64_t)bt[kp / block_size] * block_size + kp % block_size;
      const int64_t off = slot * slot_stride + (int64_t)kvh * HD + c * 8;
      if constexpr (sizeof(KV) == 2) {
        ku = *reinterpret_cast<const uint4 *>(kc + off);
        vu = *reinterpret_cast<const uint4 *>(vc + off);
      } else {
        const float4 *k4 = reinterpret_cast<const float4 *>(kc + off);
        const float4 *v4 = reinterpret_cast<const float4 *>(vc + off);
        ku = f32x8_to_f16x8(k4[0], k4[1]);
        vu = f32x8_to_f16x8(v4[0], v4[1]);
      }
    }
    *reinterpret_cast<uint4 *>(Ks + j * LDK + c * 8) = ku;
    *reinterpret_cast<uint4 *>(Vs + j * LDK + c * 8) = vu;
  }
}

// Lazy rescaling: a row keeps its running max m until a tile's max
// exceeds it by more than TC_RESCALE (natural-log units), so P = exp(s - m)
// stays <= e^8 (fine in fp16 and fp32) and most tiles need no rescale.
constexpr float TC_RESCALE = 8.f;

// O stays in accumulator fragments across tiles; only when some row of the
// warp moves its max (lazy, above) do the fragments go through shared memory
// for the per-row rescale (fragment layouts are opaque, so a row can only be
// scaled in memory). (The variant with O in shared memory, ORCH_CUDA_ATTN=v3,
// was deleted in session 7.)
template <typename KV, int HD>
__global__ void __launch_bounds__(TC_WARPS * 32) attn_tc_kernel(orch_attn_args a) {
  using L = TcLayout<HD>;
  extern __shared__ __align__(128) unsigned char smem[];
  __half *Qs = reinterpret_cast<__half *>(smem + L::Q_OFF);
  __half *Ks = reinterpret_cast<__half *>(smem + L::K_OFF);
  __half *Vs = reinterpret_cast<__half *>(smem + L::V_OFF);
  float *Ss = reinterpret_cast<float *>(smem + L::S_OFF);
  float *Os = reinterpret_cast<float *>(smem + L::O_OFF);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t0 = (int64_t)blockIdx.x * TC_BQ;
  const int h = blockIdx.y;

  // The tile's run (every warp computes the same value: a uniform exit).
  const bool ok0 = attn_tc_row_ok(a.tok_seq, a.tok_pos, a.n_tok, t0, t0 + lane);
  const bool ok1 = attn_tc_row_ok(a.tok_seq, a.tok_pos, a.n_tok, t0, t0 + 32 + lane);
  const int run = attn_tc_run_from_bits(__ballot_sync(0xffffffffu, ok0), __ballot_sync(0xffffffffu, ok1));
  if (!attn_tc_takes(run, 0)) return;

  const int p0 = a.tok_pos[t0];
  const int32_t *bt = a.block_tables + (int64_t)a.tok_seq[t0] * a.max_blocks;
  const int kvh = h / (a.n_heads / a.n_kv_heads);
  const int64_t slot_stride = (int64_t)a.n_kv_heads * HD;
  const int kend = p0 + run - 1; // the last key any row of the tile sees
  const int kstart = a.window > 0 ? max(0, p0 - a.window + 1) : 0;

  // Unrolled so that several q loads are in flight per thread (a rolled loop
  // waits one global latency per element).
#pragma unroll 8
  for (int i = threadIdx.x; i < TC_BQ * HD; i += TC_WARPS * 32) {
    const int r = i / HD, d = i % HD;
    const float v = r < run ? a.q[(t0 + r) * a.q_stride + (int64_t)h * HD + d] * a.scale : 0.f;
    Qs[r * L::LDQ + d] = __float2half(v);
  }
  __syncthreads();

  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> qf[HD / 16];
#pragma unroll
  for (int k = 0; k < HD / 16; k++) wmma::load_matrix_sync(qf[k], Qs + warp * 16 * L::LDQ + k * 16, L::LDQ);

  // Softmax: lane holds row rr of the warp's 16, keys hh*32 .. hh*32+31.
  const int rr = lane >> 1, hh = lane & 1;
  const int qrow = warp * 16 + rr;
  const int qp = p0 + qrow;
  const bool row_live = qrow < run;
  const bool warp_live = warp * 16 < run;
  const int wlast = p0 + min(run, warp * 16 + 16) - 1;                 // last key the warp's rows see
  const int wfirst = a.window > 0 ? max(0, p0 + warp * 16 - a.window + 1) : 0; // first one
  float *Sw = Ss + warp * 16 * L::LDS;
  float *Ow = Os + warp * 16 * L::LDO;
  float m = -INFINITY, l = 0.f;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> of[HD / 16];
#pragma unroll
  for (int n = 0; n < HD / 16; n++) wmma::fill_fragment(of[n], 0.f);

  for (int kb = kstart; kb <= kend; kb += TC_BK) {
    __syncthreads(); // every warp is done with the previous K/V tile
    tc_load_kv<KV, HD>(Ks, Vs, (const KV *)a.k_cache, (const KV *)a.v_cache, bt, a.block_size, slot_stride, kvh, kb,
                       kstart, kend);
    __syncthreads();
    if (!warp_live || kb > wlast || kb + TC_BK - 1 < wfirst) continue;

    // S = Q K^T (16 x TC_BK per warp).
#pragma unroll
    for (int n = 0; n < TC_BK / 16; n++) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
      wmma::fill_fragment(sf, 0.f);
#pragma unroll
      for (int k = 0; k < HD / 16; k++) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> kf;
        wmma::load_matrix_sync(kf, Ks + n * 16 * L::LDK + k * 16, L::LDK);
        wmma::mma_sync(sf, qf[k], kf, sf);
      }
      wmma::store_matrix_sync(Sw + n * 16, sf, L::LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of row rr over this tile.
    float s[32];
    const float *srow = Sw + rr * L::LDS + hh * 32;
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 32; j++) {
      const int kp = kb + hh * 32 + j;
      const bool vis = row_live && kp >= kstart && kp <= qp && (a.window <= 0 || qp - kp < a.window);
      s[j] = vis ? srow[j] : -INFINITY;
      mx = fmaxf(mx, s[j]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const __half *Pw = reinterpret_cast<const __half *>(Sw);
    __half *prow = reinterpret_cast<__half *>(Sw + rr * L::LDS) + hh * 32;
    float *orow = Ow + rr * L::LDO + hh * (HD / 2);
    // Lazy rescale (both lanes of a row see the same m and mx). m = -inf
    // (nothing visible yet) and a finite mx: need, corr = 0.
    const bool need = mx > m + TC_RESCALE;
    if (__any_sync(0xffffffffu, need)) {
#pragma unroll
      for (int n = 0; n < HD / 16; n++) wmma::store_matrix_sync(Ow + n * 16, of[n], L::LDO, wmma::mem_row_major);
      __syncwarp();
      const float corr = need ? __expf(m - mx) : 1.f;
      if (need) m = mx;
      l *= corr;
#pragma unroll
      for (int d = 0; d < HD / 2; d++) orow[d] *= corr;
      __syncwarp();
#pragma unroll
      for (int n = 0; n < HD / 16; n++) wmma::load_matrix_sync(of[n], Ow + n * 16, L::LDO, wmma::mem_row_major);
    }
    const float base = m == -INFINITY ? 0.f : m; // no visible key yet: p = 0
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < 32; j++) {
      s[j] = __expf(s[j] - base);
      sum += s[j];
    }
    l += sum + __shfl_xor_sync(0xffffffffu, sum, 1);
    __syncwarp(); // both lanes of every row have read S before P overwrites it
#pragma unroll
    for (int j = 0; j < 32; j += 2) *reinterpret_cast<__half2 *>(prow + j) = __floats2half2_rn(s[j], s[j + 1]);
    __syncwarp();
    // O += P V, each P fragment loaded once.
#pragma unroll
    for (int k = 0; k < TC_BK / 16; k++) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> pf;
      wmma::load_matrix_sync(pf, Pw + k * 16, L::LDP);
#pragma unroll
      for (int n = 0; n < HD / 16; n++) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> vf;
        wmma::load_matrix_sync(vf, Vs + k * 16 * L::LDK + n * 16, L::LDK);
        wmma::mma_sync(of[n], pf, vf, of[n]);
      }
    }
    __syncwarp(); // P (over S) is read before the next tile's S store
  }
  if (!warp_live) return;
#pragma unroll
  for (int n = 0; n < HD / 16; n++) wmma::store_matrix_sync(Ow + n * 16, of[n], L::LDO, wmma::mem_row_major);
  __syncwarp();

  // out = O / (l + sink term), stable in the max of m and the sink.
  float sc;
  if (a.sinks) {
    const float sk = a.sinks[h];
    const float M = fmaxf(m, sk);
    const float e = __expf(m - M);
    sc = e / (l * e + __expf(sk - M));
  } else {
    sc = 1.f / l;
  }
  for (int r = 0; r < 16; r++) {
    const float rs = __shfl_sync(0xffffffffu, sc, 2 * r);
    const int q = warp * 16 + r;
    if (q >= run) break; // uniform over the warp
    float *o = a.out + (t0 + q) * (int64_t)a.n_heads * HD + (int64_t)h * HD;
    for (int d = lane; d < HD; d += 32) o[d] = Ow[r * L::LDO + d] * rs;
  }
}

} // namespace attn_tc
