// rope.cu — rotary position embedding, NeoX (rotate halves) and GPT-J
// (adjacent pairs), with a per-dimension inverse-frequency table computed on
// the host (plain, YaRN, llama3, rope_freqs) and an attention factor on
// cos/sin (YaRN's mscale).
#include "common.cuh"

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
  float theta = (float)pos * inv_freq[p];
  float s, c;
  sincosf(theta, &s, &c);
  c *= attn_factor;
  s *= attn_factor;
  rope_pair r;
  r.i0 = neox ? p : 2 * p;
  r.i1 = neox ? p + half : 2 * p + 1;
  const float u = hp[r.i0], v = hp[r.i1];
  r.r0 = u * c - v * s;
  r.r1 = u * s + v * c;
  hp[r.i0] = r.r0;
  hp[r.i1] = r.r1;
  return r;
}

__global__ void rope_kernel(rope_set a, rope_set b, int64_t n_tok, int head_dim, int rot_dim, const int32_t *pos,
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

static int rope_launch(orch_ctx *ctx, rope_set a, rope_set b, int64_t n_tok, int32_t head_dim, int32_t rot_dim,
                       const int32_t *pos, const float *inv_freq, float attn_factor, int32_t neox, const char *op) {
  ORCH_CHECK_ARG(ctx && a.x && pos && inv_freq && n_tok >= 0 && a.n_heads > 0 && b.n_heads >= 0 && head_dim > 0, op);
  ORCH_CHECK_ARG(rot_dim > 0 && rot_dim <= head_dim && rot_dim % 2 == 0, op);
  ORCH_CHECK_ARG(a.row_stride >= (int64_t)a.n_heads * head_dim, op);
  ORCH_CHECK_ARG(b.n_heads == 0 || (b.x && b.row_stride >= (int64_t)b.n_heads * head_dim), op);
  int64_t total = n_tok * (a.n_heads + b.n_heads) * (rot_dim / 2);
  if (!total) return ORCH_OK;
  unsigned blocks = (unsigned)min(ceil_div(total, 256), (int64_t)65535);
  orch_launch_pdl(rope_kernel, dim3(blocks), dim3(256), 0, ctx->stream, a, b, n_tok, head_dim, rot_dim, pos, inv_freq,
                  attn_factor, neox);
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}

extern "C" int orch_rope(orch_ctx *ctx, float *x, int64_t row_stride, int64_t n_tok, int32_t n_heads,
                         int32_t head_dim, int32_t rot_dim, const int32_t *pos, const float *inv_freq,
                         float attn_factor, int32_t neox) {
  return rope_launch(ctx, rope_set{x, row_stride, n_heads}, rope_set{nullptr, 0, 0}, n_tok, head_dim, rot_dim, pos,
                     inv_freq, attn_factor, neox, "rope");
}

extern "C" int orch_rope2(orch_ctx *ctx, float *x0, int64_t row_stride0, int32_t n_heads0, float *x1,
                          int64_t row_stride1, int32_t n_heads1, int64_t n_tok, int32_t head_dim, int32_t rot_dim,
                          const int32_t *pos, const float *inv_freq, float attn_factor, int32_t neox) {
  ORCH_CHECK_ARG(x1 && n_heads1 > 0, "rope2");
  return rope_launch(ctx, rope_set{x0, row_stride0, n_heads0}, rope_set{x1, row_stride1, n_heads1}, n_tok, head_dim,
                     rot_dim, pos, inv_freq, attn_factor, neox, "rope2");
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

extern "C" int orch_rope_kv(orch_ctx *ctx, float *q, int64_t q_stride, int32_t q_heads, float *k, int64_t k_stride,
                            int32_t kv_heads, const float *v, int64_t v_stride, void *k_cache, void *v_cache,
                            int32_t kv_dtype, const int32_t *slots, int64_t n_tok, int32_t head_dim, int32_t rot_dim,
                            const int32_t *pos, const float *inv_freq, float attn_factor, int32_t neox) {
  const char *op = "rope_kv";
  ORCH_CHECK_ARG(ctx && q && k && v && k_cache && v_cache && slots && pos && inv_freq && n_tok >= 0, op);
  ORCH_CHECK_ARG(q_heads > 0 && kv_heads > 0 && head_dim > 0 && rot_dim > 0 && rot_dim <= head_dim && rot_dim % 2 == 0,
                 op);
  ORCH_CHECK_ARG(q_stride >= (int64_t)q_heads * head_dim && k_stride >= (int64_t)kv_heads * head_dim &&
                     v_stride >= (int64_t)kv_heads * head_dim,
                 op);
  ORCH_CHECK_ARG(kv_dtype == ORCH_KV_F32 || kv_dtype == ORCH_KV_F16, op);
  const int64_t total = n_tok * ((int64_t)q_heads * (rot_dim / 2) + (int64_t)kv_heads * (rot_dim / 2) +
                                 (int64_t)kv_heads * (head_dim - rot_dim) + (int64_t)kv_heads * head_dim);
  if (!total) return ORCH_OK;
  const unsigned blocks = (unsigned)min(ceil_div(total, 256), (int64_t)65535);
  const rope_set qs{q, q_stride, q_heads}, ks{k, k_stride, kv_heads};
  if (kv_dtype == ORCH_KV_F32)
    orch_launch_pdl(rope_kv_kernel<float>, dim3(blocks), dim3(256), 0, ctx->stream, qs, ks, v, v_stride,
                    (float *)k_cache, (float *)v_cache, slots, n_tok, head_dim, rot_dim, pos, inv_freq, attn_factor,
                    neox);
  else
    orch_launch_pdl(rope_kv_kernel<__half>, dim3(blocks), dim3(256), 0, ctx->stream, qs, ks, v, v_stride,
                    (__half *)k_cache, (__half *)v_cache, slots, n_tok, head_dim, rot_dim, pos, inv_freq, attn_factor,
                    neox);
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}
