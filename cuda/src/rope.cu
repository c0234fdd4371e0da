// rope.cu — rotary position embedding, NeoX (rotate halves) and GPT-J
// (adjacent pairs), with a per-dimension inverse-frequency table computed on
// the host (plain, YaRN, llama3, rope_freqs) and an attention factor on
// cos/sin (YaRN's mscale).
#include "common.cuh"

__global__ void rope_kernel(float *x, int64_t row_stride, int64_t n_tok, int n_heads, int head_dim, int rot_dim,
                            const int32_t *pos, const float *inv_freq, float attn_factor, int neox) {
  const int half = rot_dim / 2;
  const int64_t total = n_tok * n_heads * half;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int p = (int)(i % half);
    int64_t th = i / half;
    int h = (int)(th % n_heads);
    int64_t t = th / n_heads;
    float theta = (float)pos[t] * inv_freq[p];
    float s, c;
    sincosf(theta, &s, &c);
    c *= attn_factor;
    s *= attn_factor;
    float *hp = x + t * row_stride + (int64_t)h * head_dim;
    int i0 = neox ? p : 2 * p, i1 = neox ? p + half : 2 * p + 1;
    float a = hp[i0], b = hp[i1];
    hp[i0] = a * c - b * s;
    hp[i1] = a * s + b * c;
  }
}

extern "C" int orch_rope(orch_ctx *ctx, float *x, int64_t row_stride, int64_t n_tok, int32_t n_heads,
                         int32_t head_dim, int32_t rot_dim, const int32_t *pos, const float *inv_freq,
                         float attn_factor, int32_t neox) {
  ORCH_CHECK_ARG(ctx && x && pos && inv_freq && n_tok >= 0 && n_heads > 0 && head_dim > 0, "rope");
  ORCH_CHECK_ARG(rot_dim > 0 && rot_dim <= head_dim && rot_dim % 2 == 0, "rope");
  ORCH_CHECK_ARG(row_stride >= (int64_t)n_heads * head_dim, "rope");
  int64_t total = n_tok * n_heads * (rot_dim / 2);
  if (!total) return ORCH_OK;
  unsigned blocks = (unsigned)min(ceil_div(total, 256), (int64_t)65535);
  rope_kernel<<<blocks, 256, 0, ctx->stream>>>(x, row_stride, n_tok, n_heads, head_dim, rot_dim, pos, inv_freq,
                                               attn_factor, neox);
  ORCH_LAUNCHED("rope");
  return ORCH_OK;
}
