// rope.cuh — the RoPE kernels of rope.cu and the per-element rotation the
// folded decode attention (attention_kernels.cuh, fuse.go foldAttnRoPE) uses:
// one header so that every path rotates with the same arithmetic (bit-
// identical), and so that cuda/test/attention_emu_test.cpp can run
// rope_kv_kernel on the CPU. Included after common.cuh (pdl_wait).
#pragma once

#ifndef ORCH_EMU
#include <cuda_fp16.h>
#endif
#include <stdint.h>

// The two outputs of a rotated pair (u, v) by (c, s): u c - v s and u s + v c,
// with the fused multiply-adds spelled out (__fmaf_rn / __fmul_rn are never
// contracted differently), so that every kernel that rotates (rope_kernel,
// rope_kv_kernel, attention.cu's folded decode kernel) computes the same bits.
__device__ __forceinline__ float rope_mix0(float u, float v, float c, float s) {
  return __fmaf_rn(u, c, -__fmul_rn(v, s));
}
__device__ __forceinline__ float rope_mix1(float u, float v, float c, float s) {
  return __fmaf_rn(u, s, __fmul_rn(v, c));
}

// cos and sin of pos * inv_freq[p], scaled by attn_factor.
__device__ __forceinline__ void rope_cs(int32_t pos, const float *inv_freq, int p, float attn_factor, float &c,
                                        float &s) {
  const float theta = (float)pos * inv_freq[p];
  sincosf(theta, &s, &c);
  c *= attn_factor;
  s *= attn_factor;
}

// Element d of head row x (unrotated) after RoPE at position pos: what
// rope_rotate writes there (dims >= rot_dim unchanged).
__device__ __forceinline__ float rope_elem(const float *x, int d, int rot_dim, int32_t pos, const float *inv_freq,
                                           float attn_factor, int neox) {
  if (d >= rot_dim) return x[d];
  const int half = rot_dim / 2;
  const bool first = neox ? d < half : (d & 1) == 0;
  const int p = neox ? (first ? d : d - half) : d >> 1;
  const int i0 = neox ? p : 2 * p, i1 = neox ? p + half : 2 * p + 1;
  float c, s;
  rope_cs(pos, inv_freq, p, attn_factor, c, s);
  const float u = x[i0], v = x[i1];
  return first ? rope_mix0(u, v, c, s) : rope_mix1(u, v, c, s);
}

// The kernels (rope.cu and the emulation test define ROPE_KERNELS; the
// attention kernels only need the helpers above).
#ifdef ROPE_KERNELS
// One or two tensors (a, then b) with the same positions and parameters:
// orch_rope launches it with b empty, orch_rope2 with q and k; every element
// runs the same code either way (bit-identical results).
struct rope_set {
  float *x;
  int64_t row_stride;
  int n_heads;
};

// rope_pair / rope_rotate: pair p of one head row hp rotated in place by the
// angle pos * inv_freq[p] (cos and sin scaled by attn_factor; NeoX pairs p and
// p + half, GPT-J pairs 2p and 2p + 1). Shared by rope_kernel and
// rope_kv_kernel so that both compute the same bits.
struct rope_pair {
  int i0, i1;
  float r0, r1;
};
__device__ __forceinline__ rope_pair rope_rotate(float *hp, int p, int half, int32_t pos, const float *inv_freq,
                                                 float attn_factor, int neox) {
  float c, s;
  rope_cs(pos, inv_freq, p, attn_factor, c, s);
  rope_pair r;
  r.i0 = neox ? p : 2 * p;
  r.i1 = neox ? p + half : 2 * p + 1;
  const float u = hp[r.i0], v = hp[r.i1];
  r.r0 = rope_mix0(u, v, c, s);
  r.r1 = rope_mix1(u, v, c, s);
  hp[r.i0] = r.r0;
  hp[r.i1] = r.r1;
  return r;
}

static __global__ void rope_kernel(rope_set a, rope_set b, int64_t n_tok, int head_dim, int rot_dim, const int32_t *pos,
                            const float *inv_freq, float attn_factor, int neox) {
  pdl_trigger();
  pdl_wait();
  const int half = rot_dim / 2;
  const int64_t ta = n_tok * a.n_heads * half;
  const int64_t total = ta + n_tok * b.n_heads * half;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < total; g += (int64_t)gridDim.x * blockDim.x) {
    const bool second = g >= ta;
    const int64_t i = second ? g - ta : g;
    const int n_heads = second ? b.n_heads : a.n_heads;
    int p = (int)(i % half);
    int64_t th = i / half;
    int h = (int)(th % n_heads);
    int64_t t = th / n_heads;
    float *hp = (second ? b.x + t * b.row_stride : a.x + t * a.row_stride) + (int64_t)h * head_dim;
    rope_rotate(hp, p, half, pos[t], inv_freq, attn_factor, neox);
  }
}

// RoPE of q and k (as orch_rope2) fused with the KV-cache write of the
// rotated k and of v (as attention.cu's orch_kv_write): one launch instead of
// two. Work items, in one grid-stride loop: q pairs, k pairs (rotated, written
// back and stored), k's unrotated dims (stored), v elements (stored). Same
// arithmetic as the separate kernels (the stored k is the float the separate
// RoPE writes; F16 caches convert with __float2half, round to nearest).
template <typename KV> __device__ __forceinline__ KV rope_kv_store(float v);
template <> __device__ __forceinline__ float rope_kv_store<float>(float v) { return v; }
template <> __device__ __forceinline__ __half rope_kv_store<__half>(float v) { return __float2half(v); }

template <typename KV>
__global__ void rope_kv_kernel(rope_set q, rope_set k, const float *v, int64_t v_stride, KV *kc, KV *vc,
                               const int32_t *slots, int64_t n_tok, int head_dim, int rot_dim, const int32_t *pos,
                               const float *inv_freq, float attn_factor, int neox) {
  pdl_trigger();
  pdl_wait();
  const int half = rot_dim / 2, nkv = k.n_heads;
  const int64_t per = (int64_t)nkv * head_dim;
  const int64_t tq = n_tok * q.n_heads * half, tk = n_tok * nkv * half, tr = n_tok * nkv * (head_dim - rot_dim),
                tv = n_tok * per;
  const int64_t total = tq + tk + tr + tv;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < total; g += (int64_t)gridDim.x * blockDim.x) {
    if (g < tq + tk) { // rotate a pair of q or k (orch_rope's code)
      const bool second = g >= tq;
      const int64_t i = second ? g - tq : g;
      const int n_heads = second ? k.n_heads : q.n_heads;
      int p = (int)(i % half);
      int64_t th = i / half;
      int h = (int)(th % n_heads);
      int64_t t = th / n_heads;
      float *hp = (second ? k.x + t * k.row_stride : q.x + t * q.row_stride) + (int64_t)h * head_dim;
      const rope_pair r = rope_rotate(hp, p, half, pos[t], inv_freq, attn_factor, neox);
      if (second) {
        const int64_t dst = (int64_t)slots[t] * per + (int64_t)h * head_dim;
        kc[dst + r.i0] = rope_kv_store<KV>(r.r0);
        kc[dst + r.i1] = rope_kv_store<KV>(r.r1);
      }
    } else if (g < tq + tk + tr) { // k dims past rot_dim: stored as they are
      const int64_t i = g - tq - tk;
      const int nr = head_dim - rot_dim;
      const int d = rot_dim + (int)(i % nr);
      const int64_t th = i / nr;
      const int h = (int)(th % nkv);
      const int64_t t = th / nkv;
      kc[(int64_t)slots[t] * per + (int64_t)h * head_dim + d] =
          rope_kv_store<KV>(k.x[t * k.row_stride + (int64_t)h * head_dim + d]);
    } else { // v
      const int64_t i = g - tq - tk - tr;
      const int64_t t = i / per, j = i % per;
      vc[(int64_t)slots[t] * per + j] = rope_kv_store<KV>(v[t * v_stride + j]);
    }
  }
}
#endif // ROPE_KERNELS
