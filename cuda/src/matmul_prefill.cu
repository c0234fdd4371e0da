// matmul_prefill.cu — the large-n matrix product (prefill; n > 8 tokens, or
// shapes without a decode GEMV) of orch_matmul: F32 weights through cuBLAS in
// fp32; quantized / half weights dequantized to bf16 in scratch and
// multiplied by cuBLAS (bf16 inputs, fp32 accumulate and output).
//
// Versions (ORCH_CUDA_PREFILL, read once per process):
//  - v1: the session-4 path: W in tiles of 32 MiB of bf16 (k = 14336: four
//    cuBLAS calls of m = 1176, each with few output tiles), one thread per
//    32-element chunk in the dequantization, bias added by a separate pass.
//  - v2 (default): W dequantized whole when its bf16 copy fits 128 MiB (every
//    Llama-8B / gpt-oss projection), else in equal tiles under that cap, so
//    cuBLAS sees the whole m; Q8_0 dequantized 8 elements per thread with one
//    16-byte store (coalesced), x converted 4 floats per thread; without
//    accumulate the bias is written into y first and cuBLAS adds into it
//    (beta = 1) instead of a read-modify-write pass afterwards.
//  - v3 (opt-in): Q8_0 with k % 64 == 0 through gq8::gemm (gemm_q8.cuh: raw
//    blocks dequantized in shared memory, fp16 mma.sync, no copy of W);
//    other types and shapes take v2, and so do grids of fewer than
//    gq8::MIN_TILES output tiles (e.g. k / v projections at n = 512) unless
//    ORCH_CUDA_PREFILL_FORCE=1 (tests: the kernel at every shape).
//  - v4 (opt-in): v3 with 256-row tiles (16 warps, one CTA per SM: each x
//    tile crosses L2 -> SM half as often) where the grid has >=
//    gq8::MIN_TILES_256 tiles, else as v3; with ORCH_CUDA_PREFILL_FORCE=1
//    always 256-row tiles.
//  - v5 (opt-in): v3's tiles and routing, gq8::gemm_p's schedule (double-
//    buffered fp16 W tile, one barrier per stage, the next stage's
//    dequantization interleaved with this stage's MMAs, swizzled tiles).
#include "quant.cuh"
#include "gemm_q8.cuh"

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

// v2: Q8_0 rows (contiguous blocks of 34 bytes) to bf16, 8 elements per
// thread: the d of its block and 8 quants as four 2-byte loads (blocks are
// 2-byte aligned), one 16-byte store; a warp covers 8 whole blocks (272
// contiguous bytes in, 512 out). Same arithmetic as dequant_chunk (d * q in
// fp32, rounded to bf16), so the result equals v1's bit for bit.
__global__ void dequant_q8_bf16_v2(uint4 *__restrict__ out, const uint8_t *__restrict__ w, int64_t items) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < items; i += (int64_t)gridDim.x * blockDim.x) {
    const uint8_t *b = w + (i >> 2) * 34;
    const float d = __half2float(*reinterpret_cast<const __half *>(b));
    const uint16_t *q = reinterpret_cast<const uint16_t *>(b + 2 + 8 * (i & 3));
    uint32_t o[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const uint16_t u = __ldg(q + j);
      __nv_bfloat162 h = __floats2bfloat162_rn(d * (float)(int8_t)(u & 0xff), d * (float)(int8_t)(u >> 8));
      o[j] = *reinterpret_cast<uint32_t *>(&h);
    }
    out[i] = make_uint4(o[0], o[1], o[2], o[3]);
  }
}

// v2: x to bf16, 4 floats per thread (n4 = count / 4; 16-byte aligned x).
__global__ void f32_to_bf16_v2(uint2 *__restrict__ out, const float4 *__restrict__ x, int64_t n4) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
    const float4 f = x[i];
    __nv_bfloat162 a = __floats2bfloat162_rn(f.x, f.y), b = __floats2bfloat162_rn(f.z, f.w);
    out[i] = make_uint2(*reinterpret_cast<uint32_t *>(&a), *reinterpret_cast<uint32_t *>(&b));
  }
}

// v2: y[t, :] = b for every token row (cuBLAS then adds W x with beta = 1).
__global__ void fill_bias_rows_kernel(float *__restrict__ y, const float *__restrict__ b, int64_t n, int64_t m) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * m; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = b[i % m];
}

static unsigned grid_for(int64_t work) { return (unsigned)min(ceil_div(work, 256), (int64_t)(132 * 16)); }

// ORCH_CUDA_PREFILL (see the file comment), read once per process.
static int prefill_version() {
  static const int v = orch_env_version("ORCH_CUDA_PREFILL", 2);
  return v;
}

// ORCH_CUDA_PREFILL_FORCE=1: v3 / v4 / v5 take every shape they support (tests).
static bool prefill_force_v3() {
  static const bool f = [] {
    const char *v = getenv("ORCH_CUDA_PREFILL_FORCE");
    return v && v[0] == '1';
  }();
  return f;
}

// Weight rows per dequantized tile: v1 32 MiB of bf16 (at least 64 rows);
// v2 the whole m when m * k * 2 bytes <= cap, else equal tiles under it
// (multiples of 8 rows). Host-only arithmetic.
static int64_t prefill_tile_rows(int version, int64_t m, int64_t k) {
  if (version == 1) {
    int64_t mc = (16ll << 20) / k;
    if (mc < 64) mc = 64;
    if (mc > m) mc = m;
    return (mc + 7) / 8 * 8;
  }
  const int64_t cap = 128ll << 20; // bytes of bf16 W per tile
  int64_t tiles = ceil_div(m * k * 2, cap);
  if (tiles < 1) tiles = 1;
  int64_t mc = (ceil_div(m, tiles) + 7) / 8 * 8;
  if (mc * k * 2 > cap && mc > 8) mc = max((int64_t)8, cap / (k * 2) / 8 * 8);
  return min(mc, m);
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
  const int version = prefill_version();
  if (version >= 3 && wtype == ORCH_T_Q8_0 && gq8::supported(n, k, m, (uintptr_t)wb, (uintptr_t)x)) {
    // v3: 128-row tiles; v4: 256-row tiles where they fill the card, else
    // as v3; v5: the pipelined 128-row kernel. Small grids go on to v2
    // unless forced.
    const bool force = prefill_force_v3();
    int bm = 0;
    if (version == 4 && (force || gq8::tiles(n, m, 256) >= gq8::MIN_TILES_256)) bm = 256;
    else if (force || gq8::tiles(n, m, 128) >= gq8::MIN_TILES) bm = version == 5 ? 1 : 128;
    if (bm) {
      void *scr = nullptr;
      int rc = orch_scratch(ctx, (size_t)gq8::scratch_bytes(n, k), &scr);
      if (rc != ORCH_OK) return rc;
      ORCH_CUDA(gq8::run(ctx->stream, scr, y, x, wb, bias, n, k, m, rb, accumulate, bm), op);
      return ORCH_OK;
    }
  }
  // Prefill: bf16 x once, then weight tiles of mc rows.
  const int64_t mc = prefill_tile_rows(version, m, k);
  size_t xbytes = (size_t)(n * k * 2 + 255) / 256 * 256;
  size_t need = xbytes + (size_t)(mc * k * 2);
  void *scr = nullptr;
  int rc = orch_scratch(ctx, need, &scr);
  if (rc != ORCH_OK) return rc;
  __nv_bfloat16 *xb = (__nv_bfloat16 *)scr;
  __nv_bfloat16 *wt = (__nv_bfloat16 *)((char *)scr + xbytes);
  const bool v2 = version != 1;
  if (v2 && (n * k) % 4 == 0 && ((uintptr_t)x & 15) == 0) {
    f32_to_bf16_v2<<<grid_for(n * k / 4), 256, 0, ctx->stream>>>((uint2 *)xb, (const float4 *)x, n * k / 4);
  } else {
    unsigned blocks = (unsigned)min(ceil_div(n * k, 256), (int64_t)65535);
    f32_to_bf16_kernel<<<blocks, 256, 0, ctx->stream>>>(xb, x, n * k);
  }
  ORCH_LAUNCHED(op);
  // v2 without accumulate: y = bias first, cuBLAS adds into it.
  // (Not when y overlaps the bias: the fill would overwrite it.)
  const bool bias_first = v2 && bias && !accumulate &&
                          ((const char *)bias >= (const char *)(y + n * m) || (const char *)(bias + m) <= (const char *)y);
  if (bias_first) {
    fill_bias_rows_kernel<<<grid_for(n * m), 256, 0, ctx->stream>>>(y, bias, n, m);
    ORCH_LAUNCHED(op);
  }
  const bool q8_v2 = v2 && wtype == ORCH_T_Q8_0 && ((uintptr_t)wb & 1) == 0;
  for (int64_t m0 = 0; m0 < m; m0 += mc) {
    int64_t rows = min(mc, m - m0);
    if (q8_v2) {
      const int64_t items = rows * k / 8;
      dequant_q8_bf16_v2<<<grid_for(items), 256, 0, ctx->stream>>>((uint4 *)wt, wb + m0 * rb, items);
    } else {
      ORCH_DISPATCH_TYPE(wtype, launch_dequant_bf16, ctx->stream, wt, wb + m0 * rb, rows, k, rb);
    }
    ORCH_LAUNCHED(op);
    // Column-major view: Y^T[m, n] = W[m, k] · X^T[k, n].
    cublasStatus_t s = cublasGemmEx(ctx->cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)n, (int)k, &one, wt,
                                    CUDA_R_16BF, (int)k, xb, CUDA_R_16BF, (int)k,
                                    (accumulate || bias_first) ? &one : &zero, y + m0, CUDA_R_32F, (int)m,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) {
      orch_set_error("matmul: cublasGemmEx failed (status %d) m=%lld n=%lld k=%lld", (int)s, (long long)rows,
                     (long long)n, (long long)k);
      return ORCH_ERR_CUDA;
    }
  }
  if (bias && !bias_first) {
    unsigned blocks = (unsigned)min(ceil_div(n * m, 256), (int64_t)65535);
    add_bias_rows_kernel<<<blocks, 256, 0, ctx->stream>>>(y, bias, n, m);
    ORCH_LAUNCHED(op);
  }
  return ORCH_OK;
}
