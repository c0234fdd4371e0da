// attention.cu — KV-cache write and causal attention over a paged KV cache
// (block tables), GQA/MHA, sliding window, sinks: the host side (argument
// checks, version and kernel choice, launches). The fp32 kernels are in
// attention_kernels.cuh (v1: a CTA per (query token, head), warps split the
// keys one at a time; v2 flash-decoding: + a split over keys, 32 keys per
// warp step, and a combine), the tensor-core prefill kernel in
// attention_tc.cuh / attention_tc.cu.
//
// Head dims: every multiple of 16 from 16 to 256 (ATTN_HEAD_DIMS below; one
// template instance each). A lane holds attn_lane_dims(HD) consecutive dims
// (HD/32 rounded up); for HD not a multiple of 32 the tail lanes/dims are
// masked (attn_dim_ok), e.g. HD 16: lanes 0..15 hold one dim each, HD 80:
// lanes 0..26 hold three (lane 26 only 78, 79). The mapping is host-tested
// in cuda/test/attention_index_test.cpp.
//
// Paths (session 7: the opt-in versions v1..v8 and v11 were deleted with
// their switches; ORCH_CUDA_ATTN is no longer read here):
//  - prefill chunks (tiles of >= ATTN_TC_MIN_RUN consecutive rows of one
//    sequence; attention_index.cuh) go to the tensor-core kernels of
//    attention_tc.cu: head dim 64/128 the register-resident mma.sync kernel
//    (attention_fa.cuh: ldmatrix fragments, cp.async double-buffered K/V, two
//    query heads per CTA where the group size is even, else one), the other
//    head dims up to 128 the WMMA kernel (attention_tc.cuh, O in registers);
//  - every other row (decode rows, short chunks, head dims > 128): depth-
//    adaptive flash-decoding. The grid is sized from max_pos (a captured
//    decode graph passes the context length), but each row's split of the
//    keys comes from its actual span on the device (attn_split_* in
//    attention_index.cuh: unused splits exit, one used split writes the
//    output, the combine reads only the used ones), through the GQA-grouped
//    kernel attn_gd7_kernel (head dim 64/128, 1/2/4/8 query heads per CTA, V
//    rows loaded in batches ahead of use, launch bounds for 4 CTAs/SM,
//    programmatic dependent launch with the KV write and the combine) or,
//    for the other head dims, attn2 with the adaptive split; then
//    attn_combine6 where the grid has splits.
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "attention_kernels.cuh"

using namespace attn_k;

// attention_tc.cu
bool attn_tc_supports(int head_dim);
int attn_tc_launch(orch_ctx *ctx, const orch_attn_args *a);

template <typename KV> __device__ __forceinline__ KV kv_store(float v);
template <> __device__ __forceinline__ float kv_store<float>(float v) { return v; }
template <> __device__ __forceinline__ __half kv_store<__half>(float v) { return __float2half(v); }

template <typename KV>
__global__ void kv_write_kernel(KV *kc, KV *vc, const float *k, const float *v, int64_t ks, int64_t vs,
                                const int32_t *slots, int64_t n_tok, int nkv, int hd) {
  pdl_wait();
  pdl_trigger();
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
    orch_launch_pdl(kv_write_kernel<float>, dim3(blocks), dim3(256), 0, ctx->stream, (float *)k_cache,
                    (float *)v_cache, k, v, k_stride, v_stride, slots, n_tok, (int)n_kv_heads, (int)head_dim);
  else
    orch_launch_pdl(kv_write_kernel<__half>, dim3(blocks), dim3(256), 0, ctx->stream, (__half *)k_cache,
                    (__half *)v_cache, k, v, k_stride, v_stride, slots, n_tok, (int)n_kv_heads, (int)head_dim);
  ORCH_LAUNCHED("kv_write");
  return ORCH_OK;
}

// Row CTAs of the flash-decoding grid after the tensor-core kernel took its
// tiles: a CTA takes a chunk of ceil(n_tok / 256) consecutive rows instead of
// one CTA per row (an exiting CTA still costs its launch: 131k of them per
// layer at a 2048-token chunk), checking each 64-row tile it touches once.
constexpr int ATTN_TC_V2_ROW_CTAS = 256;

// v6: depth-adaptive flash-decoding for the rows the tensor-core kernel does
// not take. The grid (fixed at capture) is sized from max_pos as before, but
// the kernels size each row's work from its actual span (attention_index.cuh,
// attn_split_*): unused splits exit at once, one used split writes the
// output, and attn_combine6 merges only the used ones. Split budget as v5
// (grouped: ~4096 CTAs) and v4 (per head: ~2048 CTAs); the combine's lanes
// hold at most ATTN_GD_MAX_SPLITS splits.
template <int HD>
static int launch_combine6(orch_ctx *ctx, const orch_attn_args *a, const float *part, int splits, int tc_skip,
                           bool pdl = false) {
  const dim3 grid((unsigned)a->n_heads, (unsigned)a->n_tok);
  if (pdl)
    orch_launch_pdl(attn_combine6_kernel<HD>, grid, dim3(32), 0, ctx->stream, *a, part, splits, (int)ATTN_GD_GRAN,
                    tc_skip);
  else
    attn_combine6_kernel<HD><<<grid, 32, 0, ctx->stream>>>(*a, part, splits, ATTN_GD_GRAN, tc_skip);
  ORCH_LAUNCHED("attention combine (v6)");
  return ORCH_OK;
}

static int attn_span_max(const orch_attn_args *a) {
  int span = a->max_pos > 0 ? a->max_pos : 1;
  if (a->window > 0) span = min(span, a->window);
  return span;
}

template <typename KV, int HD, int GC>
static int launch_attn_gd(orch_ctx *ctx, const orch_attn_args *a, int tc_skip, int splits) {
  void *part = nullptr;
  if (splits > 1) {
    int rc = orch_scratch(ctx, (size_t)a->n_heads * a->n_tok * splits * (HD + 2) * sizeof(float), &part);
    if (rc != ORCH_OK) return rc;
  }
  const int64_t rows = tc_skip ? min(a->n_tok, (int64_t)ATTN_TC_V2_ROW_CTAS) : a->n_tok;
  dim3 grid((unsigned)(a->n_heads / GC), (unsigned)rows, (unsigned)splits);
  orch_launch_pdl(attn_gd7_kernel<KV, HD, GC>, grid, dim3(ATTN_WARPS * 32), 0, ctx->stream, *a, (float *)part,
                  splits, tc_skip);
  ORCH_LAUNCHED("attention (grouped)");
  if (splits == 1) return ORCH_OK;
  return launch_combine6<HD>(ctx, a, (const float *)part, splits, tc_skip, true);
}

// CTAs of the grid below which the grouped kernel serves fewer heads per CTA.
constexpr int ATTN_GD_MIN_CTAS = 256;

// The grouped v6 kernel's instances: head dim 64/128, 1/2/4/8 heads per CTA
// (any group size they divide); -1 = none.
template <typename KV>
static int launch_attn_gd_any(orch_ctx *ctx, const orch_attn_args *a, int tc_skip) {
  if (a->head_dim != 64 && a->head_dim != 128) return -1;
  const int G = a->n_heads / a->n_kv_heads;
  const int64_t rows = tc_skip ? min(a->n_tok, (int64_t)ATTN_TC_V2_ROW_CTAS) : a->n_tok;
  const int splits = attn_grid_splits((int64_t)a->n_kv_heads * a->n_tok, attn_span_max(a), ATTN_GD_GRAN, 4096,
                                      ATTN_GD_MAX_SPLITS);
  const int gc = attn_gd_heads_per_cta(G, a->n_heads, rows, splits, ATTN_GD_MIN_CTAS);
#define GD_CASE(H, GG) \
  if (a->head_dim == H && gc == GG) return launch_attn_gd<KV, H, GG>(ctx, a, tc_skip, splits);
  GD_CASE(64, 1) GD_CASE(64, 2) GD_CASE(64, 4) GD_CASE(64, 8)
  GD_CASE(128, 1) GD_CASE(128, 2) GD_CASE(128, 4) GD_CASE(128, 8)
#undef GD_CASE
  return -1;
}

// v6 for the other head dims: attn2 with the depth-adaptive split.
template <typename KV, int HD>
static int launch_attn2_adaptive(orch_ctx *ctx, const orch_attn_args *a, int tc_skip) {
  const int64_t ctas = (int64_t)a->n_heads * a->n_tok;
  const int splits = attn_grid_splits(ctas, attn_span_max(a), ATTN_GD_GRAN, 2048, 64);
  void *part = nullptr;
  if (splits > 1) {
    int rc = orch_scratch(ctx, (size_t)ctas * splits * (HD + 2) * sizeof(float), &part);
    if (rc != ORCH_OK) return rc;
  }
  const int64_t rows = tc_skip ? min(a->n_tok, (int64_t)ATTN_TC_V2_ROW_CTAS) : a->n_tok;
  dim3 grid((unsigned)a->n_heads, (unsigned)rows, (unsigned)splits);
  attn2_kernel<KV, HD><<<grid, ATTN_WARPS * 32, 0, ctx->stream>>>(*a, (float *)part, splits, tc_skip, ATTN_GD_GRAN);
  ORCH_LAUNCHED("attention (v6)");
  if (splits == 1) return ORCH_OK;
  return launch_combine6<HD>(ctx, a, (const float *)part, splits, tc_skip);
}

// Every supported head dim, one template instance each (multiples of 16 up
// to 256: gpt-oss/llama 64, llama-3.2 128, gemma 256, phi 80/96, the tiny
// test models 16/32).
#define ATTN_HEAD_DIMS(X) \
  X(16) X(32) X(48) X(64) X(80) X(96) X(112) X(128) X(144) X(160) X(176) X(192) X(208) X(224) X(240) X(256)

template <typename KV>
static int launch_attn(orch_ctx *ctx, const orch_attn_args *a) {
  int tc = 0;
  if (a->n_tok >= ATTN_TC_MIN_RUN && attn_tc_supports(a->head_dim)) {
    const int rc = attn_tc_launch(ctx, a);
    if (rc == ORCH_OK) tc = 1;
    else if (rc != ORCH_ERR_UNSUPPORTED) return rc;
  }
  const int rc = launch_attn_gd_any<KV>(ctx, a, tc);
  if (rc != -1) return rc;
  switch (a->head_dim) {
#define ATTN_CASE(H) \
  case H: return launch_attn2_adaptive<KV, H>(ctx, a, tc);
    ATTN_HEAD_DIMS(ATTN_CASE)
#undef ATTN_CASE
    default: break;
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

// The folded RoPE + KV write (attn_gdr_kernel; orch_attention_rope): the
// grouped kernel's grid and head grouping (launch_attn_gd_any's choice), one
// row per CTA, then the combine where the grid has splits.
template <typename KV, int HD, int GC>
static int launch_attn_gdr(orch_ctx *ctx, const orch_attn_args *a, const orch_attn_rope_args *r, int splits) {
  void *part = nullptr;
  if (splits > 1) {
    int rc = orch_scratch(ctx, (size_t)a->n_heads * a->n_tok * splits * (HD + 2) * sizeof(float), &part);
    if (rc != ORCH_OK) return rc;
  }
  dim3 grid((unsigned)(a->n_heads / GC), (unsigned)a->n_tok, (unsigned)splits);
  // ORCH_CUDA_ATTN_PREFETCH=0: no L2 prefetch of the keys before pdl_wait (A/B; read once)
  static const int prefetch = [] {
    const char *e = getenv("ORCH_CUDA_ATTN_PREFETCH");
    return e && strcmp(e, "0") == 0 ? 0 : 1;
  }();
  // ORCH_CUDA_ATTN_KV0 (read once): the first key step's rows copied into shared memory before pdl_wait
  // (attn_kv0_copy). Unset / "auto": K and V where their copies take <= 48 KB (head dim 64 fp16: 34 KB) or, with
  // the GEMVs' shared split (ORCH_CUDA_CARVEOUT, ~98 KB at 43%), <= 72 KB (128 fp16: 67.6 KB, beside two 12 KB
  // out-projection CTAs); else K where it takes <= 48 KB; else off (fp32 at 128); "k": K; "kv": K and V; "0": off.
  // Device run 3 of session 15 (H100, same call, driver splits): gpt-oss tg128 690.7 (K and V) vs 683.5 off; Llama
  // 298.7 (K) vs 297.4 / 297.6 off, 281.7 with "kv" (its split then differed from the out projection's, whose CTAs
  // no longer started beside it). Session 16 runs 1-2 (H100, the shared split): Llama 305.1 / 305.8 with "kv" vs
  // 302.5 / 303.1 with K.
  static const int kv0_env = [] {
    const char *e = getenv("ORCH_CUDA_ATTN_KV0");
    if (!e || !*e || strcmp(e, "auto") == 0) return -1;
    return strcmp(e, "kv") == 0 ? 2 : strcmp(e, "k") == 0 ? 1 : 0;
  }();
  constexpr int kvb = (int)sizeof(KV);
  int kv0 = kv0_env;
  if (kv0 < 0) {
    const int kv_max = orch_carveout() >= 43 ? 72 * 1024 : 48 * 1024;
    kv0 = attn_kv0_bytes(HD, kvb, 2) <= kv_max ? 2 : attn_kv0_bytes(HD, kvb, 1) <= 48 * 1024 ? 1 : 0;
  }
  const int smem = attn_kv0_bytes(HD, kvb, kv0);
  if (smem && smem + sizeof(AttnGdrSmem<KV, HD, GC>) + 1024 > 48 * 1024) { // the static part counts (1 KB: margin)
    const cudaError_t attr =
        cudaFuncSetAttribute(attn_gdr_kernel<KV, HD, GC>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (attr != cudaSuccess) {
      orch_set_error("attention_rope: %d bytes of shared memory (ORCH_CUDA_ATTN_KV0): %s", smem,
                     cudaGetErrorString(attr));
      return ORCH_ERR_CUDA;
    }
  }
  orch_apply_carveout(attn_gdr_kernel<KV, HD, GC>); // the GEMVs' split (common.cuh)
  orch_launch_pdl(attn_gdr_kernel<KV, HD, GC>, grid, dim3(ATTN_WARPS * 32), (size_t)smem, ctx->stream, *a, *r,
                  (float *)part, splits, prefetch, kv0);
  ORCH_LAUNCHED("attention (RoPE + KV write folded)");
  if (splits == 1) return ORCH_OK;
  return launch_combine6<HD>(ctx, a, (const float *)part, splits, 0, true);
}

template <typename KV>
static int launch_attn_rope(orch_ctx *ctx, const orch_attn_args *a, const orch_attn_rope_args *r) {
  const int G = a->n_heads / a->n_kv_heads;
  const int splits = attn_grid_splits((int64_t)a->n_kv_heads * a->n_tok, attn_span_max(a), ATTN_GD_GRAN, 4096,
                                      ATTN_GD_MAX_SPLITS);
  const int gc = attn_gd_heads_per_cta(G, a->n_heads, a->n_tok, splits, ATTN_GD_MIN_CTAS);
#define GDR_CASE(H, GG) \
  if (a->head_dim == H && gc == GG) return launch_attn_gdr<KV, H, GG>(ctx, a, r, splits);
  GDR_CASE(64, 1) GDR_CASE(64, 2) GDR_CASE(64, 4) GDR_CASE(64, 8)
  GDR_CASE(128, 1) GDR_CASE(128, 2) GDR_CASE(128, 4) GDR_CASE(128, 8)
#undef GDR_CASE
  return ORCH_ERR_UNSUPPORTED;
}

extern "C" int orch_attention_rope(orch_ctx *ctx, const orch_attn_args *a, const orch_attn_rope_args *r) {
  const char *op = "attention_rope";
  ORCH_CHECK_ARG(ctx && a && r, op);
  ORCH_CHECK_ARG(a->out && a->q && a->k_cache && a->v_cache && a->tok_seq && a->tok_pos && a->block_tables, op);
  ORCH_CHECK_ARG(a->n_tok >= 0 && a->n_tok <= 65535 && a->n_heads > 0 && a->n_kv_heads > 0, op);
  ORCH_CHECK_ARG(a->n_heads % a->n_kv_heads == 0 && a->block_size > 0 && a->max_blocks > 0, op);
  ORCH_CHECK_ARG(a->q_stride >= (int64_t)a->n_heads * a->head_dim, op);
  ORCH_CHECK_ARG(r->k && r->v && r->slots && r->inv_freq, op);
  ORCH_CHECK_ARG(r->rot_dim > 0 && r->rot_dim <= a->head_dim && r->rot_dim % 2 == 0, op);
  ORCH_CHECK_ARG(r->k_stride >= (int64_t)a->n_kv_heads * a->head_dim &&
                     r->v_stride >= (int64_t)a->n_kv_heads * a->head_dim,
                 op);
  if (a->n_tok == 0) return ORCH_OK;
  if (a->n_tok > ATTN_ROPE_MAX_TOK || (a->head_dim != 64 && a->head_dim != 128)) return ORCH_ERR_UNSUPPORTED;
  if (a->kv_dtype == ORCH_KV_F32) return launch_attn_rope<float>(ctx, a, r);
  if (a->kv_dtype == ORCH_KV_F16) return launch_attn_rope<__half>(ctx, a, r);
  return ORCH_ERR_UNSUPPORTED;
}
