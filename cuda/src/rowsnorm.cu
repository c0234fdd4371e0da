// rowsnorm.cu — a row gather (orch_get_rows) and the RMSNorm of exactly those
// rows (orch_rmsnorm) in one launch (session 14): a decode step starts with
// the token's embedding row and layer 0's attention norm of it, and ends with
// the gather of the output rows and the output norm; each was two one-CTA
// kernels back to back on the critical path (CUPTI, H100: ~7-9 + ~10 us at the
// start, ~4-5 + ~6-8 us at the end). One CTA per row dequantizes the row into
// shared memory exactly as get_rows_kernel does (dequant_chunk), writes it out
// if asked, then runs norm.cu's register row (norm_reg_row, the body of
// norm_reg_kernel: same element ownership, same expressions, same block_sum)
// on the staged row, so both outputs are bit-identical to the two launches.
#include "common.cuh"
#include "quant.cuh"
#include "norm_row.cuh"

// Widest row: norm_reg_kernel's (32 elements per thread; orch_rmsnorm loops
// beyond it) — 32 KB of staged floats.
constexpr int64_t ROWS_NORM_MAX_DIM = 32 * NORM_THREADS;

template <int T, int N>
__global__ void __launch_bounds__(NORM_THREADS)
rows_norm_kernel(float *__restrict__ xo, float *__restrict__ ho, const uint8_t *__restrict__ table,
                 const int32_t *__restrict__ ids, int64_t dim, int64_t row_bytes, const float *__restrict__ w,
                 float eps) {
  DEC16_DYN_SMEM(float4, rows_norm_sm); // the row: dim floats
  __shared__ float sh[32];
#if defined(__CUDA_ARCH__)
  if (w) // the norm weight is never written while a step runs: fetched before the wait (a hint, no data)
    for (int64_t i = threadIdx.x * 32; i < dim; i += NORM_THREADS * 32)
      asm volatile("prefetch.global.L1 [%0];" ::"l"(w + i));
#endif
  pdl_trigger();
  pdl_wait(); // ids and the table (the gather's: an earlier kernel's output) come from earlier kernels
  const uint8_t *src = table + (int64_t)ids[blockIdx.x] * row_bytes;
  float4 *xr = xo ? reinterpret_cast<float4 *>(xo + blockIdx.x * dim) : nullptr;
  for (int64_t c = threadIdx.x; c < dim / 32; c += NORM_THREADS) {
    float v[32];
    dequant_chunk<T>(src, c, v);
#pragma unroll
    for (int i = 0; i < 8; i++) {
      const float4 f = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
      rows_norm_sm[c * 8 + i] = f;
      if (xr) xr[c * 8 + i] = f;
    }
  }
  __syncthreads();
  norm_reg_row<false, N, false>(ho + blockIdx.x * dim, reinterpret_cast<float *>(rows_norm_sm), nullptr, w, nullptr,
                                dim, eps, sh);
}

static bool rn_aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

// N as launch_norm picks it for dim (norm.cu).
template <int T>
static void launch_rows_norm(cudaStream_t st, float *xo, float *ho, const uint8_t *table, const int32_t *ids,
                             int64_t n, int64_t dim, int64_t rb, const float *w, float eps) {
  const int64_t per = ceil_div(dim, NORM_THREADS);
  const dim3 grid((unsigned)n), block(NORM_THREADS);
  const size_t smem = (size_t)dim * sizeof(float);
  void (*k)(float *, float *, const uint8_t *, const int32_t *, int64_t, int64_t, const float *, float) =
      per <= 4 ? rows_norm_kernel<T, 4>
      : per <= 8 ? rows_norm_kernel<T, 8>
      : per <= 12 ? rows_norm_kernel<T, 12>
      : per <= 16 ? rows_norm_kernel<T, 16>
                  : rows_norm_kernel<T, 32>;
  orch_launch_pdl(k, grid, block, smem, st, xo, ho, table, ids, dim, rb, w, eps);
}

extern "C" int orch_get_rows_rmsnorm(orch_ctx *ctx, float *x_out, float *h_out, const void *table, int32_t ttype,
                                     const int32_t *ids, int64_t n, int64_t dim, const float *w, float eps) {
  const char *op = "get_rows_rmsnorm";
  ORCH_CHECK_ARG(ctx && h_out && table && ids && n >= 0 && dim > 0 && n < (1ll << 31), op);
  if (!type_known(ttype) || dim % 32 || dim % type_block_elems(ttype) || dim > ROWS_NORM_MAX_DIM) {
    orch_set_error("%s: unsupported type %d or dim=%lld", op, ttype, (long long)dim);
    return ORCH_ERR_UNSUPPORTED;
  }
  ORCH_CHECK_ARG(rn_aligned16(table), op);
  if (x_out && x_out != h_out && !rn_aligned16(x_out)) { // the gathered rows are stored as float4
    orch_set_error("%s: x_out not 16-byte aligned", op);
    return ORCH_ERR_UNSUPPORTED;
  }
  if (n == 0) return ORCH_OK;
  if (x_out == h_out) x_out = nullptr; // in place: only the normalised rows
  ORCH_DISPATCH_TYPE(ttype, launch_rows_norm, ctx->stream, x_out, h_out, (const uint8_t *)table, ids, n, dim,
                     orch_row_bytes(ttype, dim), w, eps);
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}
