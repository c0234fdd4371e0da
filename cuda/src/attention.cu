// attention.cu — KV-cache write and causal attention over a paged KV cache
// (block tables), GQA/MHA, sliding window, sinks. One kernel serves decode
// and prefill: a CTA per (query token, head); its warps split the visible
// keys, each warp keeps an online softmax (lanes hold head_dim/32 dims), and
// the warps are merged at the end together with the sink logit.
//
// Head dims: every multiple of 16 from 16 to 256 (ATTN_HEAD_DIMS below; one
// template instance each). A lane holds attn_lane_dims(HD) consecutive dims
// (HD/32 rounded up); for HD not a multiple of 32 the tail lanes/dims are
// masked (attn_dim_ok), e.g. HD 16: lanes 0..15 hold one dim each, HD 80:
// lanes 0..26 hold three (lane 26 only 78, 79). The mapping is host-tested
// in cuda/test/attention_index_test.cpp.
//
// Versions (ORCH_CUDA_ATTN): v1 = attn_kernel (one key at a time per warp);
// v2 = attn2 flash-decoding + combine for every row; default (v3) = as v2,
// but tiles of >= ATTN_TC_MIN_RUN consecutive rows of one sequence (prefill
// chunks) go to the tensor-core kernel of attention_tc.cu (head dims up to
// 128), and the flash-decoding kernels skip those rows.
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "attention_index.cuh"

// attention_tc.cu
bool attn_tc_supports(int head_dim);
int attn_tc_launch(orch_ctx *ctx, const orch_attn_args *a);

// 1, 2 or 3 from ORCH_CUDA_ATTN (read once; v1 is also ctx->attn_v1).
static int attn_env_version() {
  static const int v = [] {
    const char *e = getenv("ORCH_CUDA_ATTN");
    if (e && strcmp(e, "v1") == 0) return 1;
    if (e && strcmp(e, "v2") == 0) return 2;
    return 3;
  }();
  return v;
}

// In the flash-decoding kernels (every warp, before any barrier): whether
// row t is the tensor-core kernel's (then the CTA returns).
__device__ __forceinline__ bool attn_row_taken_by_tc(const orch_attn_args &a, int64_t t) {
  const int lane = threadIdx.x & 31;
  const int64_t t0 = t - t % ATTN_TC_ROWS;
  const bool ok0 = attn_tc_row_ok(a.tok_seq, a.tok_pos, a.n_tok, t0, t0 + lane);
  const bool ok1 = attn_tc_row_ok(a.tok_seq, a.tok_pos, a.n_tok, t0, t0 + 32 + lane);
  const int run = attn_tc_run_from_bits(__ballot_sync(0xffffffffu, ok0), __ballot_sync(0xffffffffu, ok1));
  return attn_tc_takes(run, (int)(t - t0));
}

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
  constexpr int E = attn_lane_dims(HD); // dims per lane
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
    q[e] = attn_dim_ok(HD, lane, e) ? qr[lane * E + e] * a.scale : 0.f;
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
    for (int e = 0; e < E; e++)
      if (attn_dim_ok(HD, lane, e)) s += q[e] * kv_load<KV>(kr + e);
    s = warp_sum(s);
    float mn = fmaxf(m, s);
    float corr = __expf(m - mn), p = __expf(s - mn);
    l = l * corr + p;
#pragma unroll
    for (int e = 0; e < E; e++)
      if (attn_dim_ok(HD, lane, e)) acc[e] = acc[e] * corr + p * kv_load<KV>(vr + e);
    m = mn;
  }
  __shared__ float sm[ATTN_WARPS], sl[ATTN_WARPS];
  __shared__ float sacc[ATTN_WARPS][HD];
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < E; e++)
    if (attn_dim_ok(HD, lane, e)) sacc[warp][lane * E + e] = acc[e];
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
      if (!attn_dim_ok(HD, lane, e)) continue;
      int d = lane * E + e;
      float v = 0.f;
      for (int w = 0; w < ATTN_WARPS; w++) v += sacc[w][d] * f[w];
      o[d] = v * inv;
    }
  }
}


// v2 (flash-decoding): grid (head, token, split). Each split takes a slice of
// the visible keys; inside it a warp scores 32 keys at once (lane = key, the
// q vector in shared memory), keeps an online softmax, and accumulates V with
// lanes over dims. Partial (m, l, acc) go to scratch; attn_combine merges the
// splits with the sink. Replaces v1's one-key-at-a-time warp chain.
template <typename KV, int HD>
__global__ void __launch_bounds__(ATTN_WARPS * 32)
    attn2_kernel(orch_attn_args a, float *part, int splits, int tc_skip) {
  constexpr int E = attn_lane_dims(HD);
  static_assert(HD % 8 == 0, "K rows are read in 16-byte vectors");
  const int h = blockIdx.x, sp = blockIdx.z;
  const int64_t t = blockIdx.y;
  if (tc_skip && attn_row_taken_by_tc(a, t)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kvh = h / (a.n_heads / a.n_kv_heads);
  const int qp = a.tok_pos[t];
  const int32_t *bt = a.block_tables + (int64_t)a.tok_seq[t] * a.max_blocks;
  const KV *kc = (const KV *)a.k_cache;
  const KV *vc = (const KV *)a.v_cache;
  const int64_t slot_stride = (int64_t)a.n_kv_heads * HD;
  __shared__ float qs[HD];
  const float *qr = a.q + t * a.q_stride + (int64_t)h * HD;
  for (int i = threadIdx.x; i < HD; i += blockDim.x) qs[i] = qr[i] * a.scale;
  __syncthreads();
  int start = a.window > 0 ? max(0, qp - a.window + 1) : 0;
  const int span = qp - start + 1;
  const int per = (span + splits - 1) / splits;
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
          uint4 u = k8[i];
          const __half2 *h2 = reinterpret_cast<const __half2 *>(&u);
#pragma unroll
          for (int j = 0; j < 4; j++) {
            float2 f = __half22float2(h2[j]);
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
  __shared__ float sm[ATTN_WARPS], sl[ATTN_WARPS];
  __shared__ float sacc[ATTN_WARPS][HD];
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
    const bool direct = splits == 1;
    float M = -INFINITY;
    for (int w = 0; w < ATTN_WARPS; w++) M = fmaxf(M, sm[w]);
    const float sink = direct && a.sinks ? a.sinks[h] : -INFINITY;
    M = fmaxf(M, sink);
    float L = direct && a.sinks ? __expf(sink - M) : 0.f, f[ATTN_WARPS];
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
      for (int w = 0; w < ATTN_WARPS; w++) v += sacc[w][dd] * f[w];
      o[dd] = v * inv;
    }
  }
}

// Merges the splits of (token, head) with the sink logit: one warp per CTA.
template <int HD>
__global__ void attn_combine_kernel(orch_attn_args a, const float *part, int splits, int tc_skip) {
  constexpr int E = attn_lane_dims(HD);
  const int h = blockIdx.x, lane = threadIdx.x;
  const int64_t t = blockIdx.y;
  if (tc_skip && attn_row_taken_by_tc(a, t)) return;
  const float *pp = part + (t * a.n_heads + h) * (int64_t)splits * (HD + 2);
  float M = a.sinks ? a.sinks[h] : -INFINITY;
  for (int s = 0; s < splits; s++)
    if (pp[s * (HD + 2) + HD + 1] > 0.f) M = fmaxf(M, pp[s * (HD + 2) + HD]);
  float L = a.sinks ? __expf(a.sinks[h] - M) : 0.f;
  float acc[E];
#pragma unroll
  for (int e = 0; e < E; e++) acc[e] = 0.f;
  for (int s = 0; s < splits; s++) {
    const float *ps = pp + s * (HD + 2);
    float ls = ps[HD + 1];
    if (!(ls > 0.f)) continue;
    float f = __expf(ps[HD] - M);
    L += ls * f;
#pragma unroll
    for (int e = 0; e < E; e++)
      if (attn_dim_ok(HD, lane, e)) acc[e] += ps[lane * E + e] * f;
  }
  float inv = 1.f / L;
  float *o = a.out + t * (int64_t)a.n_heads * HD + (int64_t)h * HD;
#pragma unroll
  for (int e = 0; e < E; e++)
    if (attn_dim_ok(HD, lane, e)) o[lane * E + e] = acc[e] * inv;
}

template <typename KV, int HD>
static int launch_attn2(orch_ctx *ctx, const orch_attn_args *a, int tc_skip) {
  int64_t ctas = (int64_t)a->n_heads * a->n_tok;
  int span = a->max_pos > 0 ? a->max_pos : 1;
  if (a->window > 0) span = min(span, a->window);
  int splits = 1;
  if (ctas < 1024) splits = (int)min((int64_t)ceil_div(span, 256), max((int64_t)1, 2048 / ctas));
  splits = max(1, min(splits, 64));
  void *part = nullptr;
  if (splits > 1) {
    int rc = orch_scratch(ctx, (size_t)ctas * splits * (HD + 2) * sizeof(float), &part);
    if (rc != ORCH_OK) return rc;
  }
  dim3 grid((unsigned)a->n_heads, (unsigned)a->n_tok, (unsigned)splits);
  attn2_kernel<KV, HD><<<grid, ATTN_WARPS * 32, 0, ctx->stream>>>(*a, (float *)part, splits, tc_skip);
  ORCH_LAUNCHED("attention");
  if (splits == 1) return ORCH_OK; // attn2 wrote the output
  attn_combine_kernel<HD><<<dim3((unsigned)a->n_heads, (unsigned)a->n_tok), 32, 0, ctx->stream>>>(*a, (const float *)part,
                                                                                                 splits, tc_skip);
  ORCH_LAUNCHED("attention combine");
  return ORCH_OK;
}

template <typename KV, int HD>
static int launch_attn1(orch_ctx *ctx, const orch_attn_args *a) {
  dim3 grid((unsigned)a->n_heads, (unsigned)a->n_tok);
  attn_kernel<KV, HD><<<grid, ATTN_WARPS * 32, 0, ctx->stream>>>(*a);
  ORCH_LAUNCHED("attention");
  return ORCH_OK;
}

// Every supported head dim, one template instance each (multiples of 16 up
// to 256: gpt-oss/llama 64, llama-3.2 128, gemma 256, phi 80/96, the tiny
// test models 16/32).
#define ATTN_HEAD_DIMS(X) \
  X(16) X(32) X(48) X(64) X(80) X(96) X(112) X(128) X(144) X(160) X(176) X(192) X(208) X(224) X(240) X(256)

template <typename KV>
static int launch_attn(orch_ctx *ctx, const orch_attn_args *a) {
  if (!ctx->attn_v1 && attn_env_version() >= 2) {
    int tc = 0;
    if (attn_env_version() >= 3 && a->n_tok >= ATTN_TC_MIN_RUN && attn_tc_supports(a->head_dim)) {
      int rc = attn_tc_launch(ctx, a);
      if (rc == ORCH_OK) tc = 1;
      else if (rc != ORCH_ERR_UNSUPPORTED) return rc;
    }
    switch (a->head_dim) {
#define ATTN_CASE2(H) \
  case H: return launch_attn2<KV, H>(ctx, a, tc);
      ATTN_HEAD_DIMS(ATTN_CASE2)
#undef ATTN_CASE2
      default: break;
    }
  } else {
    switch (a->head_dim) {
#define ATTN_CASE1(H) \
  case H: return launch_attn1<KV, H>(ctx, a);
      ATTN_HEAD_DIMS(ATTN_CASE1)
#undef ATTN_CASE1
      default: break;
    }
  }
  orch_set_error("attention: head_dim %d not supported (a multiple of 16 from 16 to 256)", a->head_dim);
  return ORCH_ERR_UNSUPPORTED;
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
