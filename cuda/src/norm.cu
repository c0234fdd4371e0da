// norm.cu — RMSNorm and LayerNorm, each optionally fused with the residual
// add (x += add, written back) so the residual stream costs one pass.
#include "common.cuh"
#include "norm_row.cuh"

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

// The same norm with each thread's elements held in registers (dim <= N *
// NORM_THREADS; norm_row.cuh): x (+ add) is read once, instead of once per
// pass (the loop above reads x again for the variance and again for the
// output: two more dependent memory round trips on the decode step's critical
// path, twice per layer). Each thread owns the same elements in the same order
// and every expression is the one above, so the results are bit-identical.
template <bool LAYER, int N>
__global__ void __launch_bounds__(NORM_THREADS)
norm_reg_kernel(float *__restrict__ out, float *__restrict__ x, const float *__restrict__ add,
                const float *__restrict__ w, const float *__restrict__ b, int64_t dim, float eps) {
  __shared__ float sh[32];
  pdl_trigger();
  pdl_wait(); // PDL: everything below reads or writes what earlier kernels use
  norm_reg_row<LAYER, N, false>(out + blockIdx.x * dim, x + blockIdx.x * dim, add ? add + blockIdx.x * dim : nullptr,
                                w, b, dim, eps, sh);
}

// Launches the register version for dim <= 32 * NORM_THREADS (N a multiple
// of 4 covering dim), else the looping one.
template <bool LAYER>
static void launch_norm(cudaStream_t st, int64_t n, float *out, float *x, const float *add, const float *w,
                        const float *b, int64_t dim, float eps) {
  const int64_t per = ceil_div(dim, NORM_THREADS);
  const dim3 grid((unsigned)n), block(NORM_THREADS);
  if (per <= 4) orch_launch_pdl(norm_reg_kernel<LAYER, 4>, grid, block, 0, st, out, x, add, w, b, dim, eps);
  else if (per <= 8) orch_launch_pdl(norm_reg_kernel<LAYER, 8>, grid, block, 0, st, out, x, add, w, b, dim, eps);
  else if (per <= 12) orch_launch_pdl(norm_reg_kernel<LAYER, 12>, grid, block, 0, st, out, x, add, w, b, dim, eps);
  else if (per <= 16) orch_launch_pdl(norm_reg_kernel<LAYER, 16>, grid, block, 0, st, out, x, add, w, b, dim, eps);
  else if (per <= 32) orch_launch_pdl(norm_reg_kernel<LAYER, 32>, grid, block, 0, st, out, x, add, w, b, dim, eps);
  else orch_launch_pdl(norm_kernel<LAYER>, grid, block, 0, st, out, x, add, w, b, dim, eps);
}

extern "C" int orch_rmsnorm(orch_ctx *ctx, float *out, float *x, const float *add, const float *w, int64_t n,
                            int64_t dim, float eps) {
  ORCH_CHECK_ARG(ctx && out && x && n >= 0 && dim > 0 && n < (1ll << 31), "rmsnorm");
  if (n == 0) return ORCH_OK;
  launch_norm<false>(ctx->stream, n, out, x, add, w, nullptr, dim, eps);
  ORCH_LAUNCHED("rmsnorm");
  return ORCH_OK;
}

extern "C" int orch_layernorm(orch_ctx *ctx, float *out, float *x, const float *add, const float *w, const float *b,
                              int64_t n, int64_t dim, float eps) {
  ORCH_CHECK_ARG(ctx && out && x && n >= 0 && dim > 0 && n < (1ll << 31), "layernorm");
  if (n == 0) return ORCH_OK;
  launch_norm<true>(ctx->stream, n, out, x, add, w, b, dim, eps);
  ORCH_LAUNCHED("layernorm");
  return ORCH_OK;
}
