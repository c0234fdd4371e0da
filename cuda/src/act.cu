// act.cu — elementwise ops: add, bias, scale, GELU (tanh), SwiGLU and the
// clamped gpt-oss SwiGLU.
#include "common.cuh"

static unsigned grid_for(int64_t n) { return (unsigned)min(ceil_div(n, 256), (int64_t)65535); }

#define GRID_LOOP(i, n) \
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

__global__ void add_kernel(float *out, const float *a, const float *b, int64_t n) {
  pdl_trigger();
  pdl_wait();
  GRID_LOOP(i, n) out[i] = a[i] + b[i];
}
__global__ void add_bias_kernel(float *y, const float *b, int64_t n, int64_t dim) {
  GRID_LOOP(i, n * dim) y[i] += b[i % dim];
}
__global__ void scale_kernel(float *out, const float *x, float s, int64_t n) {
  GRID_LOOP(i, n) out[i] = x[i] * s;
}
__global__ void gelu_kernel(float *out, const float *x, int64_t n) {
  const float c = 0.7978845608028654f; // sqrt(2/pi)
  GRID_LOOP(i, n) {
    float v = x[i];
    out[i] = 0.5f * v * (1.f + tanhf(c * (v + 0.044715f * v * v * v)));
  }
}
__global__ void swiglu_kernel(float *out, const float *g, const float *u, int64_t n, int64_t dim, int64_t gs,
                              int64_t us) {
  GRID_LOOP(i, n * dim) {
    int64_t r = i / dim, c = i % dim;
    float gv = g[r * gs + c];
    out[i] = gv / (1.f + expf(-gv)) * u[r * us + c];
  }
}
__global__ void swiglu_oai_kernel(float *out, const float *g, const float *u, int64_t n, int64_t dim, int64_t gs,
                                  int64_t us, float alpha, float limit) {
  GRID_LOOP(i, n * dim) {
    int64_t r = i / dim, c = i % dim;
    out[i] = swiglu_oai(g[r * gs + c], u[r * us + c], alpha, limit);
  }
}

extern "C" int orch_add(orch_ctx *ctx, float *out, const float *a, const float *b, int64_t n) {
  ORCH_CHECK_ARG(ctx && out && a && b && n >= 0, "add");
  if (!n) return ORCH_OK;
  orch_launch_pdl(add_kernel, dim3(grid_for(n)), dim3(256), 0, ctx->stream, out, a, b, n);
  ORCH_LAUNCHED("add");
  return ORCH_OK;
}
extern "C" int orch_add_bias(orch_ctx *ctx, float *y, const float *bias, int64_t n, int64_t dim) {
  ORCH_CHECK_ARG(ctx && y && bias && n >= 0 && dim > 0, "add_bias");
  if (!n) return ORCH_OK;
  add_bias_kernel<<<grid_for(n * dim), 256, 0, ctx->stream>>>(y, bias, n, dim);
  ORCH_LAUNCHED("add_bias");
  return ORCH_OK;
}
extern "C" int orch_scale(orch_ctx *ctx, float *out, const float *x, float s, int64_t n) {
  ORCH_CHECK_ARG(ctx && out && x && n >= 0, "scale");
  if (!n) return ORCH_OK;
  scale_kernel<<<grid_for(n), 256, 0, ctx->stream>>>(out, x, s, n);
  ORCH_LAUNCHED("scale");
  return ORCH_OK;
}
extern "C" int orch_gelu(orch_ctx *ctx, float *out, const float *x, int64_t n) {
  ORCH_CHECK_ARG(ctx && out && x && n >= 0, "gelu");
  if (!n) return ORCH_OK;
  gelu_kernel<<<grid_for(n), 256, 0, ctx->stream>>>(out, x, n);
  ORCH_LAUNCHED("gelu");
  return ORCH_OK;
}
extern "C" int orch_swiglu(orch_ctx *ctx, float *out, const float *gate, const float *up, int64_t n, int64_t dim,
                           int64_t gate_stride, int64_t up_stride) {
  ORCH_CHECK_ARG(ctx && out && gate && up && n >= 0 && dim > 0 && gate_stride >= dim && up_stride >= dim, "swiglu");
  if (!n) return ORCH_OK;
  swiglu_kernel<<<grid_for(n * dim), 256, 0, ctx->stream>>>(out, gate, up, n, dim, gate_stride, up_stride);
  ORCH_LAUNCHED("swiglu");
  return ORCH_OK;
}
extern "C" int orch_swiglu_oai(orch_ctx *ctx, float *out, const float *gate, const float *up, int64_t n, int64_t dim,
                               int64_t gate_stride, int64_t up_stride, float alpha, float limit) {
  ORCH_CHECK_ARG(ctx && out && gate && up && n >= 0 && dim > 0 && gate_stride >= dim && up_stride >= dim,
                 "swiglu_oai");
  if (!n) return ORCH_OK;
  swiglu_oai_kernel<<<grid_for(n * dim), 256, 0, ctx->stream>>>(out, gate, up, n, dim, gate_stride, up_stride, alpha,
                                                                limit);
  ORCH_LAUNCHED("swiglu_oai");
  return ORCH_OK;
}
