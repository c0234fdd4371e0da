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
// Versions (ORCH_CUDA_ATTN; default ATTN_DEFAULT_VERSION): v1 = attn_kernel
// (one key at a time per warp); v2 = attn2 flash-decoding (+ combine) for
// every row; v3 = as v2, but tiles of >= ATTN_TC_MIN_RUN consecutive rows of
// one sequence (prefill chunks) go to the tensor-core kernel of
// attention_tc.cu (head dims up to 128; O in shared memory), and the
// flash-decoding kernels skip those rows; v4 = v3 with O in registers and
// lazy rescaling; v5 = v4 with the GQA-grouped flash-decoding kernel
// (attn_gq_kernel: K/V read once per kv head) for the other rows, where it
// has an instance (head dim 64/128, group 1/2/4/8); v6 = v4 with
// depth-adaptive flash-decoding for the other rows: the grid is still sized
// from max_pos (a captured decode graph passes the context length), but each
// row's split of the keys comes from its actual span on the device
// (attn_split_* in attention_index.cuh: unused splits exit, one used split
// writes the output, the combine reads only the used ones), through the
// grouped kernel attn_gd_kernel (head dim 64/128, 1/2/4/8 query heads per
// CTA, V rows loaded in batches ahead of use) or, for the other head dims,
// attn2 with the adaptive split; v7 = v6 with launch bounds for 4
// CTAs/SM on the grouped kernel and programmatic dependent launch for the
// KV write, the grouped kernel and the combine (attn_gd7_kernel); v8
// (opt-in) = v7 in one launch (attn_gd8_kernel): a short row's heads spread
// over the grid's idle split CTAs, and the last CTA of a (row, head group)
// merges the splits (an atomic ticket) instead of a combine launch; v11
// (opt-in) = v7 with the register-resident mma.sync prefill kernel
// (attention_fa.cuh: ldmatrix fragments, cp.async double-buffered K/V
// staging, attn_fa11_kernel) for head dim 64/128; v12 (the default) = v11
// with two query heads per prefill CTA (one staged K/V tile serves both)
// where the group size is even. v9 / v10 (session 4's first steps towards
// v11 / v12, software-pipelined register staging) were removed in session 5.
#include <stdlib.h>
#include <string.h>

#include <mutex>
#include <unordered_map>

#include "common.cuh"
#include "attention_kernels.cuh"

using namespace attn_k;

// attention_tc.cu
bool attn_tc_supports(int head_dim);
int attn_tc_launch(orch_ctx *ctx, const orch_attn_args *a, int mode);

// ORCH_CUDA_ATTN v1..v8, v11, v12 as their numbers (read once; v1 is also ctx->attn_v1);
// unset or unknown: ATTN_DEFAULT_VERSION.
constexpr int ATTN_DEFAULT_VERSION = 12; // session 4: v7's decode (run 0: tg128 +0.8%, @ d8192 +3.6% over v6) + v12's
                                          // prefill (run 3: n=2048 0.25 vs 0.50 ms gpt-oss, 0.26 vs 0.56 ms Llama)
static int attn_env_version() {
  static const int v = [] {
    const char *e = getenv("ORCH_CUDA_ATTN");
    if (e && strcmp(e, "v1") == 0) return 1;
    if (e && strcmp(e, "v2") == 0) return 2;
    if (e && strcmp(e, "v3") == 0) return 3;
    if (e && strcmp(e, "v4") == 0) return 4;
    if (e && strcmp(e, "v5") == 0) return 5;
    if (e && strcmp(e, "v6") == 0) return 6;
    if (e && strcmp(e, "v7") == 0) return 7;
    if (e && strcmp(e, "v8") == 0) return 8;
    if (e && strcmp(e, "v11") == 0) return 11;
    if (e && strcmp(e, "v12") == 0) return 12;
    return ATTN_DEFAULT_VERSION;
  }();
  return v;
}

template <typename KV> __device__ __forceinline__ KV kv_store(float v);
template <> __device__ __forceinline__ float kv_store<float>(float v) { return v; }
template <> __device__ __forceinline__ __half kv_store<__half>(float v) { return __float2half(v); }

template <typename KV>
__global__ void kv_write_kernel(KV *kc, KV *vc, const float *k, const float *v, int64_t ks, int64_t vs,
                                const int32_t *slots, int64_t n_tok, int nkv, int hd) {
  pdl_wait(); // v7 launches it with PDL (a no-op otherwise)
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
  const bool pdl = attn_env_version() >= 7 && !ctx->attn_v1;
  if (kv_dtype == ORCH_KV_F32) {
    if (pdl)
      orch_launch_pdl(kv_write_kernel<float>, dim3(blocks), dim3(256), 0, ctx->stream, (float *)k_cache,
                      (float *)v_cache, k, v, k_stride, v_stride, slots, n_tok, (int)n_kv_heads, (int)head_dim);
    else
      kv_write_kernel<float><<<blocks, 256, 0, ctx->stream>>>((float *)k_cache, (float *)v_cache, k, v, k_stride,
                                                             v_stride, slots, n_tok, n_kv_heads, head_dim);
  } else {
    if (pdl)
      orch_launch_pdl(kv_write_kernel<__half>, dim3(blocks), dim3(256), 0, ctx->stream, (__half *)k_cache,
                      (__half *)v_cache, k, v, k_stride, v_stride, slots, n_tok, (int)n_kv_heads, (int)head_dim);
    else
      kv_write_kernel<__half><<<blocks, 256, 0, ctx->stream>>>((__half *)k_cache, (__half *)v_cache, k, v, k_stride,
                                                              v_stride, slots, n_tok, n_kv_heads, head_dim);
  }
  ORCH_LAUNCHED("kv_write");
  return ORCH_OK;
}

constexpr int ATTN_TC_V2_ROW_CTAS = 256;

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
  // After the tensor-core kernel most rows are skipped: a CTA takes a chunk
  // of ceil(n_tok / 256) consecutive rows instead of one CTA per row (an
  // exiting CTA still costs its launch: 131k of them per layer at a
  // 2048-token chunk), checking each 64-row tile it touches once.
  const int64_t rows = tc_skip ? min(a->n_tok, (int64_t)ATTN_TC_V2_ROW_CTAS) : a->n_tok;
  dim3 grid((unsigned)a->n_heads, (unsigned)rows, (unsigned)splits);
  attn2_kernel<KV, HD><<<grid, ATTN_WARPS * 32, 0, ctx->stream>>>(*a, (float *)part, splits, tc_skip);
  ORCH_LAUNCHED("attention");
  if (splits == 1) return ORCH_OK; // attn2 wrote the output
  attn_combine_kernel<HD><<<dim3((unsigned)a->n_heads, (unsigned)a->n_tok), 32, 0, ctx->stream>>>(*a, (const float *)part,
                                                                                                 splits, tc_skip);
  ORCH_LAUNCHED("attention combine");
  return ORCH_OK;
}

// v5: the GQA-grouped flash-decoding kernel for the rows the tensor-core
// kernel does not take. Splits target 128 keys each (a CTA now carries G
// heads' work: more, shorter splits keep the GPU busy at one token).
template <typename KV, int HD, int G>
static int launch_attn_gq(orch_ctx *ctx, const orch_attn_args *a, int tc_skip) {
  const int64_t ctas = (int64_t)a->n_kv_heads * a->n_tok;
  int span = a->max_pos > 0 ? a->max_pos : 1;
  if (a->window > 0) span = min(span, a->window);
  int splits = 1;
  if (ctas < 1024) splits = (int)min((int64_t)ceil_div(span, 128), max((int64_t)1, 4096 / ctas));
  splits = max(1, min(splits, 128));
  void *part = nullptr;
  if (splits > 1) {
    int rc = orch_scratch(ctx, (size_t)a->n_heads * a->n_tok * splits * (HD + 2) * sizeof(float), &part);
    if (rc != ORCH_OK) return rc;
  }
  const int64_t rows = tc_skip ? min(a->n_tok, (int64_t)ATTN_TC_V2_ROW_CTAS) : a->n_tok;
  dim3 grid((unsigned)a->n_kv_heads, (unsigned)rows, (unsigned)splits);
  attn_gq_kernel<KV, HD, G><<<grid, ATTN_WARPS * 32, 0, ctx->stream>>>(*a, (float *)part, splits, tc_skip);
  ORCH_LAUNCHED("attention (grouped)");
  if (splits == 1) return ORCH_OK;
  attn_combine_kernel<HD><<<dim3((unsigned)a->n_heads, (unsigned)a->n_tok), 32, 0, ctx->stream>>>(*a, (const float *)part,
                                                                                                 splits, tc_skip);
  ORCH_LAUNCHED("attention combine");
  return ORCH_OK;
}

// The grouped kernel's instances: head dim 64/128, group 1/2/4/8; -1 = none.
template <typename KV>
static int launch_attn_gq_any(orch_ctx *ctx, const orch_attn_args *a, int tc_skip) {
  const int G = a->n_heads / a->n_kv_heads;
#define GQ_CASE(H, GG) \
  if (a->head_dim == H && G == GG) return launch_attn_gq<KV, H, GG>(ctx, a, tc_skip);
  GQ_CASE(64, 1) GQ_CASE(64, 2) GQ_CASE(64, 4) GQ_CASE(64, 8)
  GQ_CASE(128, 1) GQ_CASE(128, 2) GQ_CASE(128, 4) GQ_CASE(128, 8)
#undef GQ_CASE
  return -1;
}

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

// v8's tickets (attn_gd8_kernel): one counter per (row, head group), zero
// between launches (the kernel's last CTA of a group resets its counter). A
// device array (zero when the module loads, per device; no allocation, so
// nothing to do under graph capture), in ATTN8_SLOTS slots of ATTN8_TICKETS:
// a context gets a slot on its first v8 launch, round-robin, so up to
// ATTN8_SLOTS contexts of one device may run attention concurrently (one
// stream each). A launch needing more than ATTN8_TICKETS counters (n_tok x
// head groups; only grids with splits, i.e. < 2048 (row, kv head) pairs, use
// them) takes the v7 path.
constexpr int ATTN8_SLOTS = 16, ATTN8_TICKETS = 8192;
__device__ unsigned g_attn8_tickets[ATTN8_SLOTS * ATTN8_TICKETS];

static unsigned *attn8_tickets(orch_ctx *ctx) {
  static std::mutex mu;
  static std::unordered_map<orch_ctx *, std::pair<int, unsigned *>> slots; // ctx -> (device, tickets)
  static int next = 0;
  std::lock_guard<std::mutex> lock(mu);
  auto it = slots.find(ctx);
  if (it != slots.end() && it->second.first == ctx->device) return it->second.second;
  void *base = nullptr;
  int cur = ctx->device;
  cudaGetDevice(&cur);
  if (cur != ctx->device) cudaSetDevice(ctx->device); // the symbol's copy on the context's device
  const cudaError_t e = cudaGetSymbolAddress(&base, g_attn8_tickets);
  if (cur != ctx->device) cudaSetDevice(cur);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return nullptr; // the caller takes the v7 path
  }
  unsigned *t = (unsigned *)base + (size_t)(next++ % ATTN8_SLOTS) * ATTN8_TICKETS;
  slots[ctx] = {ctx->device, t};
  return t;
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
  if (attn_env_version() == 8 && splits > 1 && a->n_tok * (a->n_heads / GC) <= ATTN8_TICKETS) {
    if (unsigned *tk = attn8_tickets(ctx)) {
      orch_launch_pdl(attn_gd8_kernel<KV, HD, GC>, grid, dim3(ATTN_WARPS * 32), 0, ctx->stream, *a, (float *)part,
                      splits, tc_skip, tk);
      ORCH_LAUNCHED("attention (v8 single-launch)");
      return ORCH_OK;
    }
  }
  const bool v7 = attn_env_version() >= 7;
  if (v7)
    orch_launch_pdl(attn_gd7_kernel<KV, HD, GC>, grid, dim3(ATTN_WARPS * 32), 0, ctx->stream, *a, (float *)part,
                    splits, tc_skip);
  else
    attn_gd_kernel<KV, HD, GC><<<grid, ATTN_WARPS * 32, 0, ctx->stream>>>(*a, (float *)part, splits, tc_skip);
  ORCH_LAUNCHED("attention (v6 grouped)");
  if (splits == 1) return ORCH_OK;
  return launch_combine6<HD>(ctx, a, (const float *)part, splits, tc_skip, v7);
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
      const int v = attn_env_version();
      const int mode = v >= 12   ? ATTN_TC_FA12
                       : v == 11 ? ATTN_TC_FA11
                       : v >= 4  ? ATTN_TC_OREG
                                 : ATTN_TC_SMEM;
      int rc = attn_tc_launch(ctx, a, mode);
      if (rc == ORCH_OK) tc = 1;
      else if (rc != ORCH_ERR_UNSUPPORTED) return rc;
    }
    if (attn_env_version() >= 6) {
      int rc = launch_attn_gd_any<KV>(ctx, a, tc);
      if (rc != -1) return rc;
      switch (a->head_dim) {
#define ATTN_CASE6(H) \
  case H: return launch_attn2_adaptive<KV, H>(ctx, a, tc);
        ATTN_HEAD_DIMS(ATTN_CASE6)
#undef ATTN_CASE6
        default: break;
      }
    } else if (attn_env_version() == 5) {
      int rc = launch_attn_gq_any<KV>(ctx, a, tc);
      if (rc != -1) return rc;
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
