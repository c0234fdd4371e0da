// matmul_prefill.cu — the large-n matrix product (prefill; n > 8 tokens, or
// shapes without a decode GEMV) of orch_matmul: F32 weights through cuBLAS in
// fp32; quantized / half weights dequantized tile by tile to bf16 in scratch
// and multiplied by cuBLAS (bf16 inputs, fp32 accumulate and output).
#include "quant.cuh"

// Dequantize rows [0, mc) of w into bf16 out[mc, k].
template <int T>
__global__ void dequant_bf16_kernel(__nv_bfloat16 *__restrict__ out, const uint8_t *__restrict__ w, int64_t mc,
                                    int64_t k, int64_t row_bytes) {
  const int64_t nch = k / 32;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < mc * nch; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = i / nch, c = i % nch;
    float v[32];
    dequant_chunk<T>(w + r * row_bytes, c, v);
    __nv_bfloat162 *o = reinterpret_cast<__nv_bfloat162 *>(out + r * k + c * 32);
#pragma unroll
    for (int j = 0; j < 16; j++) o[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
  }
}

template <int T>
static void launch_dequant_bf16(cudaStream_t st, __nv_bfloat16 *out, const uint8_t *w, int64_t mc, int64_t k,
                                int64_t rb) {
  int64_t work = mc * (k / 32);
  unsigned blocks = (unsigned)min(ceil_div(work, 256), (int64_t)65535);
  dequant_bf16_kernel<T><<<blocks, 256, 0, st>>>(out, w, mc, k, rb);
}

__global__ void f32_to_bf16_kernel(__nv_bfloat16 *__restrict__ out, const float *__restrict__ x, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = __float2bfloat16(x[i]);
}

__global__ void add_bias_rows_kernel(float *__restrict__ y, const float *__restrict__ b, int64_t n, int64_t m) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * m; i += (int64_t)gridDim.x * blockDim.x)
    y[i] += b[i % m];
}

// matmul_large: y[n, m] (+)= x[n, k] · W[m, k]^T (+ bias) for orch_matmul when
// no GEMV takes the shape. rb = bytes per weight row.
int matmul_large(orch_ctx *ctx, float *y, const float *x, const uint8_t *wb, int32_t wtype, const float *bias,
                 int64_t n, int64_t k, int64_t m, int32_t accumulate, int64_t rb) {
  const char *op = "matmul";
  const void *w = wb;
  const float one = 1.f, zero = 0.f;
  if (wtype == ORCH_T_F32) {
    // Full-precision weights (routers, small heads): plain fp32 GEMM, no
    // dequantization and no bf16 rounding (router logits pick experts).
    cublasStatus_t s = cublasGemmEx(ctx->cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)n, (int)k, &one, w,
                                    CUDA_R_32F, (int)k, x, CUDA_R_32F, (int)k, accumulate ? &one : &zero, y,
                                    CUDA_R_32F, (int)m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) {
      orch_set_error("matmul: cublasGemmEx f32 failed (status %d)", (int)s);
      return ORCH_ERR_CUDA;
    }
    if (bias) {
      unsigned blocks = (unsigned)min(ceil_div(n * m, 256), (int64_t)65535);
      add_bias_rows_kernel<<<blocks, 256, 0, ctx->stream>>>(y, bias, n, m);
      ORCH_LAUNCHED(op);
    }
    return ORCH_OK;
  }
  // Prefill: bf16 x once, then weight tiles of mc rows.
  const int64_t tile_elems = 16ll << 20; // 32 MiB of bf16 per weight tile
  int64_t mc = tile_elems / k;
  if (mc < 64) mc = 64;
  if (mc > m) mc = m;
  mc = (mc + 7) / 8 * 8;
  size_t xbytes = (size_t)(n * k * 2 + 255) / 256 * 256;
  size_t need = xbytes + (size_t)(mc * k * 2);
  void *scr = nullptr;
  int rc = orch_scratch(ctx, need, &scr);
  if (rc != ORCH_OK) return rc;
  __nv_bfloat16 *xb = (__nv_bfloat16 *)scr;
  __nv_bfloat16 *wt = (__nv_bfloat16 *)((char *)scr + xbytes);
  {
    unsigned blocks = (unsigned)min(ceil_div(n * k, 256), (int64_t)65535);
    f32_to_bf16_kernel<<<blocks, 256, 0, ctx->stream>>>(xb, x, n * k);
    ORCH_LAUNCHED(op);
  }
  for (int64_t m0 = 0; m0 < m; m0 += mc) {
    int64_t rows = min(mc, m - m0);
    ORCH_DISPATCH_TYPE(wtype, launch_dequant_bf16, ctx->stream, wt, wb + m0 * rb, rows, k, rb);
    ORCH_LAUNCHED(op);
    // Column-major view: Y^T[m, n] = W[m, k] · X^T[k, n].
    cublasStatus_t s = cublasGemmEx(ctx->cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)n, (int)k, &one, wt,
                                    CUDA_R_16BF, (int)k, xb, CUDA_R_16BF, (int)k, accumulate ? &one : &zero,
                                    y + m0, CUDA_R_32F, (int)m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) {
      orch_set_error("matmul: cublasGemmEx failed (status %d) m=%lld n=%lld k=%lld", (int)s, (long long)rows,
                     (long long)n, (long long)k);
      return ORCH_ERR_CUDA;
    }
  }
  if (bias) {
    unsigned blocks = (unsigned)min(ceil_div(n * m, 256), (int64_t)65535);
    add_bias_rows_kernel<<<blocks, 256, 0, ctx->stream>>>(y, bias, n, m);
    ORCH_LAUNCHED(op);
  }
  return ORCH_OK;
}
