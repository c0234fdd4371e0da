// rope.cu — rotary position embedding, NeoX (rotate halves) and GPT-J
// (adjacent pairs), with a per-dimension inverse-frequency table computed on
// the host (plain, YaRN, llama3, rope_freqs) and an attention factor on
// cos/sin (YaRN's mscale).
#include "common.cuh"

#define ROPE_KERNELS
#include "rope.cuh"

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
