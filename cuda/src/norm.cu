// norm.cu — RMSNorm and LayerNorm, each optionally fused with the residual
// add (x += add, written back) so the residual stream costs one pass.
#include "common.cuh"

constexpr int NORM_THREADS = 256;

template <bool LAYER>
__global__ void __launch_bounds__(NORM_THREADS)
norm_kernel(float *__restrict__ out, float *__restrict__ x, const float *__restrict__ add, const float *__restrict__ w,
            const float *__restrict__ b, int64_t dim, float eps) {
  __shared__ float sh[32];
  pdl_trigger();
  pdl_wait(); // PDL: everything below reads or writes what earlier kernels use
  float *xr = x + blockIdx.x * dim;
  const float *ar = add ? add + blockIdx.x * dim : nullptr;
  float *orow = out + blockIdx.x * dim;
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = xr[i];
    if (ar) {
      v += ar[i];
      xr[i] = v;
    }
    s += v;
  }
  float mean = 0.f;
  if (LAYER) mean = block_sum(s, sh) / (float)dim;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = xr[i] - mean;
    ss += v * v;
  }
  float var = block_sum(ss, sh) / (float)dim;
  float r = rsqrtf(var + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = (xr[i] - mean) * r;
    if (w) v *= w[i];
    if (b) v += b[i];
    orow[i] = v;
  }
}

extern "C" int orch_rmsnorm(orch_ctx *ctx, float *out, float *x, const float *add, const float *w, int64_t n,
                            int64_t dim, float eps) {
  ORCH_CHECK_ARG(ctx && out && x && n >= 0 && dim > 0 && n < (1ll << 31), "rmsnorm");
  if (n == 0) return ORCH_OK;
  orch_launch_pdl(norm_kernel<false>, dim3((unsigned)n), dim3(NORM_THREADS), 0, ctx->stream, out, x, add, w,
                  (const float *)nullptr, dim, eps);
  ORCH_LAUNCHED("rmsnorm");
  return ORCH_OK;
}

extern "C" int orch_layernorm(orch_ctx *ctx, float *out, float *x, const float *add, const float *w, const float *b,
                              int64_t n, int64_t dim, float eps) {
  ORCH_CHECK_ARG(ctx && out && x && n >= 0 && dim > 0 && n < (1ll << 31), "layernorm");
  if (n == 0) return ORCH_OK;
  orch_launch_pdl(norm_kernel<true>, dim3((unsigned)n), dim3(NORM_THREADS), 0, ctx->stream, out, x, add, w, b, dim, eps);
  ORCH_LAUNCHED("layernorm");
  return ORCH_OK;
}
