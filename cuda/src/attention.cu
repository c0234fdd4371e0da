// attention.cu — KV-cache write and causal attention over a paged KV cache
// (block tables), GQA/MHA, sliding window, sinks. One kernel serves decode
// and prefill: a CTA per (query token, head); its warps split the visible
// keys, each warp keeps an online softmax (lanes hold head_dim/32 dims), and
// the warps are merged at the end together with the sink logit.
#include "common.cuh"

template <typename KV> __device__ __forceinline__ float kv_load(const KV *p);
template <> __device__ __forceinline__ float kv_load<float>(const float *p) { return *p; }
template <> __device__ __forceinline__ float kv_load<__half>(const __half *p) { return __half2float(*p); }
template <typename KV> __device__ __forceinline__ KV kv_store(float v);
template <> __device__ __forceinline__ float kv_store<float>(float v) { return v; }
template <> __device__ __forceinline__ __half kv_store<__half>(float v) { return __float2half(v); }

template <typename KV>
__global__ void kv_write_kernel(KV *kc, KV *vc, const float *k, const float *v, int64_t ks, int64_t vs,
                                const int32_t *slots, int64_t n_tok, int nkv, int hd) {
  const int64_t per = (int64_t)nkv * hd;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_tok * per; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t t = i / per, j = i % per;
    int64_t dst = (int64_t)slots[t] * per + j;
    kc[dst] = kv_store<KV>(k[t * ks + j]);
    vc[dst] = kv_store<KV>(v[t * vs + j]);
  }
}

extern "C" int orch_kv_write(orch_ctx *ctx, void *k_cache, void *v_cache, int32_t kv_dtype, const float *k,
                             const float *v, int64_t k_stride, int64_t v_stride, const int32_t *slots, int64_t n_tok,
                             int32_t n_kv_heads, int32_t head_dim) {
  ORCH_CHECK_ARG(ctx && k_cache && v_cache && k && v && slots && n_tok >= 0 && n_kv_heads > 0 && head_dim > 0,
                 "kv_write");
  ORCH_CHECK_ARG(kv_dtype == ORCH_KV_F32 || kv_dtype == ORCH_KV_F16, "kv_write");
  int64_t total = n_tok * n_kv_heads * head_dim;
  if (!total) return ORCH_OK;
  unsigned blocks = (unsigned)min(ceil_div(total, 256), (int64_t)65535);
  if (kv_dtype == ORCH_KV_F32)
    kv_write_kernel<float><<<blocks, 256, 0, ctx->stream>>>((float *)k_cache, (float *)v_cache, k, v, k_stride,
                                                           v_stride, slots, n_tok, n_kv_heads, head_dim);
  else
    kv_write_kernel<__half><<<blocks, 256, 0, ctx->stream>>>((__half *)k_cache, (__half *)v_cache, k, v, k_stride,
                                                            v_stride, slots, n_tok, n_kv_heads, head_dim);
  ORCH_LAUNCHED("kv_write");
  return ORCH_OK;
}

constexpr int ATTN_WARPS = 4;

template <typename KV, int HD>
__global__ void __launch_bounds__(ATTN_WARPS * 32) attn_kernel(orch_attn_args a) {
  constexpr int E = HD / 32; // dims per lane
  const int h = blockIdx.x;
  const int64_t t = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kvh = h / (a.n_heads / a.n_kv_heads);
  const int qp = a.tok_pos[t];
  const int seq = a.tok_seq[t];
  const int32_t *bt = a.block_tables + (int64_t)seq * a.max_blocks;
  const KV *kc = (const KV *)a.k_cache;
  const KV *vc = (const KV *)a.v_cache;
  const int64_t slot_stride = (int64_t)a.n_kv_heads * HD;

  float q[E], acc[E];
  const float *qr = a.q + t * a.q_stride + (int64_t)h * HD;
#pragma unroll
  for (int e = 0; e < E; e++) {
    q[e] = qr[lane * E + e] * a.scale;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  int start = 0;
  if (a.window > 0) start = max(0, qp - a.window + 1);
  for (int kp = start + warp; kp <= qp; kp += ATTN_WARPS) {
    int64_t slot = (int64_t)bt[kp / a.block_size] * a.block_size + kp % a.block_size;
    const KV *kr = kc + slot * slot_stride + (int64_t)kvh * HD + lane * E;
    const KV *vr = vc + slot * slot_stride + (int64_t)kvh * HD + lane * E;
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < E; e++) s += q[e] * kv_load<KV>(kr + e);
    s = warp_sum(s);
    float mn = fmaxf(m, s);
    float corr = __expf(m - mn), p = __expf(s - mn);
    l = l * corr + p;
#pragma unroll
    for (int e = 0; e < E; e++) acc[e] = acc[e] * corr + p * kv_load<KV>(vr + e);
    m = mn;
  }
  __shared__ float sm[ATTN_WARPS], sl[ATTN_WARPS];
  __shared__ float sacc[ATTN_WARPS][HD];
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < E; e++) sacc[warp][lane * E + e] = acc[e];
  __syncthreads();
  if (warp == 0) {
    float M = -INFINITY;
    for (int w = 0; w < ATTN_WARPS; w++) M = fmaxf(M, sm[w]);
    float sink = a.sinks ? a.sinks[h] : -INFINITY;
    M = fmaxf(M, sink);
    float L = a.sinks ? __expf(sink - M) : 0.f;
    float f[ATTN_WARPS];
    for (int w = 0; w < ATTN_WARPS; w++) {
      f[w] = sl[w] > 0.f ? __expf(sm[w] - M) : 0.f;
      L += sl[w] * f[w];
    }
    float inv = 1.f / L;
    float *o = a.out + t * (int64_t)a.n_heads * HD + (int64_t)h * HD;
#pragma unroll
    for (int e = 0; e < E; e++) {
      int d = lane * E + e;
      float v = 0.f;
      for (int w = 0; w < ATTN_WARPS; w++) v += sacc[w][d] * f[w];
      o[d] = v * inv;
    }
  }
}

template <typename KV>
static int launch_attn(orch_ctx *ctx, const orch_attn_args *a) {
  dim3 grid((unsigned)a->n_heads, (unsigned)a->n_tok);
  switch (a->head_dim) {
    case 64: attn_kernel<KV, 64><<<grid, ATTN_WARPS * 32, 0, ctx->stream>>>(*a); break;
    case 128: attn_kernel<KV, 128><<<grid, ATTN_WARPS * 32, 0, ctx->stream>>>(*a); break;
    case 256: attn_kernel<KV, 256><<<grid, ATTN_WARPS * 32, 0, ctx->stream>>>(*a); break;
    default:
      orch_set_error("attention: head_dim %d not supported (64, 128, 256)", a->head_dim);
      return ORCH_ERR_UNSUPPORTED;
  }
  ORCH_LAUNCHED("attention");
  return ORCH_OK;
}

extern "C" int orch_attention(orch_ctx *ctx, const orch_attn_args *a) {
  ORCH_CHECK_ARG(ctx && a, "attention");
  ORCH_CHECK_ARG(a->out && a->q && a->k_cache && a->v_cache && a->tok_seq && a->tok_pos && a->block_tables,
                 "attention");
  ORCH_CHECK_ARG(a->n_tok >= 0 && a->n_tok <= 65535 && a->n_heads > 0 && a->n_kv_heads > 0, "attention");
  ORCH_CHECK_ARG(a->n_heads % a->n_kv_heads == 0 && a->block_size > 0 && a->max_blocks > 0, "attention");
  ORCH_CHECK_ARG(a->q_stride >= (int64_t)a->n_heads * a->head_dim, "attention");
  if (a->n_tok == 0) return ORCH_OK;
  if (a->kv_dtype == ORCH_KV_F32) return launch_attn<float>(ctx, a);
  if (a->kv_dtype == ORCH_KV_F16) return launch_attn<__half>(ctx, a);
  orch_set_error("attention: kv_dtype %d not supported", a->kv_dtype);
  return ORCH_ERR_UNSUPPORTED;
}
