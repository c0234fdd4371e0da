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
    float theta = (float)pos[t] * inv_freq[p];
    float s, c;
    sincosf(theta, &s, &c);
    c *= attn_factor;
    s *= attn_factor;
    float *hp = (second ? b.x + t * b.row_stride : a.x + t * a.row_stride) + (int64_t)h * head_dim;
    int i0 = neox ? p : 2 * p, i1 = neox ? p + half : 2 * p + 1;
    float u = hp[i0], v = hp[i1];
    hp[i0] = u * c - v * s;
    hp[i1] = u * s + v * c;
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
