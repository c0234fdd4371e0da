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
// bf16 weight cache (session 7, orch_bf16_cache below): a weight registered
// with its bf16 copy (made once by the same dequantization, so the same bf16
// values) is multiplied from that copy: no per-call dequantization, the same
// tiles and cuBLAS calls, so the output is bit-identical to the uncached
// path's. BF16 weights (16-byte aligned) are multiplied in place, never
// copied. The Go side (sdk/ml/cuda/bf16cache.go) owns the buffers and the
// memory policy.
// ORCH_CUDA_PREFILL_CAP=<MiB> sets v2's tile cap (default 128; 32 measured
// mixed on the H100: gate/up n=512 0.157 vs 0.164 ms, down 0.195 vs 0.156).
// ORCH_CUDA_PREFILL_TIMING=dequant / gemm (TestPerfPrefillMatMul only; the
// results are WRONG): skip the cuBLAS calls / the dequantization, to time
// the two halves of v2 separately.
//
// Session 5 also tried a GEMM on the raw Q8_0 blocks (no dequantized copy:
// fp16 mma.sync + ldmatrix, W dequantized in shared memory, 128- / 256-row
// tiles, a one-barrier pipelined schedule): 110-165 TFLOP/s on the H100
// against v2's 260-600 (bound by shared-memory / LSU wavefronts: 4-byte
// cp.async of the 68-byte row segments, ldmatrix), so it was removed; and
// a v2 that dequantized the next row chunk on a second stream while cuBLAS
// ran (no overlap: cuBLAS holds every SM; Llama pp512 11,334 vs 12,292
// tok/s) (docs/perf-cuda.md, Round 6).
#include <string.h>

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

// v2: y[t, :] = b for every token row (cuBLAS then adds W x with beta = 1).
__global__ void fill_bias_rows_kernel(float *__restrict__ y, const float *__restrict__ b, int64_t n, int64_t m) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * m; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = b[i % m];
}

// v2: one launch for the work before the first cuBLAS call: x to bf16 (nx4
// items of 4 floats), y = bias (nb items: rows of m floats), and the
// dequantization of the first Q8_0 chunk (nq items of 8 elements), as the
// three kernels above do it (same arithmetic).
__global__ void prep_v2_kernel(uint2 *__restrict__ xb, const float4 *__restrict__ x, int64_t nx4, float *__restrict__ y,
                               const float *__restrict__ b, int64_t nb, int64_t m, uint4 *__restrict__ wt,
                               const uint8_t *__restrict__ w, int64_t nq) {
  const int64_t total = nx4 + nb + nq;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    if (i < nx4) {
      const float4 f = x[i];
      __nv_bfloat162 a = __floats2bfloat162_rn(f.x, f.y), c = __floats2bfloat162_rn(f.z, f.w);
      xb[i] = make_uint2(*reinterpret_cast<uint32_t *>(&a), *reinterpret_cast<uint32_t *>(&c));
    } else if (i < nx4 + nb) {
      const int64_t j = i - nx4;
      y[j] = b[j % m];
    } else {
      const int64_t j = i - nx4 - nb;
      const uint8_t *blk = w + (j >> 2) * 34;
      const float d = __half2float(*reinterpret_cast<const __half *>(blk));
      const uint16_t *q = reinterpret_cast<const uint16_t *>(blk + 2 + 8 * (j & 3));
      uint32_t o[4];
#pragma unroll
      for (int t = 0; t < 4; t++) {
        const uint16_t u = __ldg(q + t);
        __nv_bfloat162 h = __floats2bfloat162_rn(d * (float)(int8_t)(u & 0xff), d * (float)(int8_t)(u >> 8));
        o[t] = *reinterpret_cast<uint32_t *>(&h);
      }
      wt[j] = make_uint4(o[0], o[1], o[2], o[3]);
    }
  }
}

static unsigned grid_for(int64_t work) { return (unsigned)min(ceil_div(work, 256), (int64_t)(132 * 16)); }

// ORCH_CUDA_PREFILL (see the file comment), read once per process.
static int prefill_version() {
  static const int v = orch_env_version("ORCH_CUDA_PREFILL", 2);
  return v;
}

// ORCH_CUDA_PREFILL_CAP: a positive integer, else def (read once).
static int64_t env_int(const char *name, int64_t def) {
  const char *v = getenv(name);
  if (!v || !v[0]) return def;
  char *end = nullptr;
  const long long x = strtoll(v, &end, 10);
  return (end && *end == 0 && x > 0 && x < (1ll << 20)) ? x : def;
}
static int64_t prefill_cap_bytes() {
  static const int64_t c = env_int("ORCH_CUDA_PREFILL_CAP", 128) << 20;
  return c;
}
// 0 = normal, 1 = dequantization only, 2 = cuBLAS only (ORCH_CUDA_PREFILL_TIMING).
static int prefill_timing() {
  static const int t = [] {
    const char *v = getenv("ORCH_CUDA_PREFILL_TIMING");
    return !v ? 0 : !strcmp(v, "dequant") ? 1 : !strcmp(v, "gemm") ? 2 : 0;
  }();
  return t;
}

// Weight rows per dequantized tile: v1 32 MiB of bf16 (at least 64 rows);
// v2 the whole m when m * k * 2 bytes <= cap, else equal tiles under it
// (multiples of 8 rows). Host-only arithmetic.
static int64_t prefill_tile_rows(int version, int64_t m, int64_t k, int64_t cap) {
  if (version == 1) {
    int64_t mc = (16ll << 20) / k;
    if (mc < 64) mc = 64;
    if (mc > m) mc = m;
    return (mc + 7) / 8 * 8;
  }
  int64_t tiles = ceil_div(m * k * 2, cap);
  if (tiles < 1) tiles = 1;
  int64_t mc = (ceil_div(m, tiles) + 7) / 8 * 8;
  if (mc * k * 2 > cap && mc > 8) mc = max((int64_t)8, cap / (k * 2) / 8 * 8);
  return min(mc, m);
}

// Dequantizes rows [0, mc) of w (rb bytes a row, type wtype) into bf16
// wt[mc, k] as v1 / v2 do it (v2: Q8_0 8 elements a thread; v1 and the other
// types dequant_chunk: the same values bit for bit).
static void dequant_rows(cudaStream_t st, bool v2, __nv_bfloat16 *wt, const uint8_t *w, int32_t wtype, int64_t mc,
                         int64_t k, int64_t rb) {
  if (v2 && wtype == ORCH_T_Q8_0 && ((uintptr_t)w & 1) == 0) {
    const int64_t items = mc * k / 8;
    dequant_q8_bf16_v2<<<grid_for(items), 256, 0, st>>>((uint4 *)wt, w, items);
  } else {
    ORCH_DISPATCH_TYPE(wtype, launch_dequant_bf16, st, wt, w, mc, k, rb);
  }
}

// The bf16 rows of the weight rows [wb, wb + m rb) (type wtype, rows of k):
// a BF16 weight itself (16-byte aligned), else the bf16 weight cache's copy
// when a registered weight holds those rows, else nullptr (dequantize).
static const __nv_bfloat16 *bf16_rows(orch_ctx *ctx, const uint8_t *wb, int32_t wtype, int64_t m, int64_t k,
                                      int64_t rb) {
  if (wtype == ORCH_T_BF16 && ((uintptr_t)wb & 15) == 0) return (const __nv_bfloat16 *)wb;
  const auto &c = ctx->bf16_cache;
  if (c.empty()) return nullptr;
  auto it = c.upper_bound((uintptr_t)wb);
  if (it == c.begin()) return nullptr;
  --it;
  const orch_bf16_entry &e = it->second;
  const uint64_t off = (uint64_t)((uintptr_t)wb - it->first);
  if (e.wtype != wtype || e.k != k || e.rb != rb || off % (uint64_t)rb || (int64_t)off + m * rb > e.bytes) return nullptr;
  return (const __nv_bfloat16 *)e.bf16 + (int64_t)(off / (uint64_t)rb) * k;
}

extern "C" int orch_bf16_cache(orch_ctx *ctx, const void *w, int32_t wtype, int64_t m, int64_t k, void *bf16) {
  const char *op = "bf16_cache";
  ORCH_CHECK_ARG(ctx && w, op);
  if (!bf16) {
    ctx->bf16_cache.erase((uintptr_t)w);
    return ORCH_OK;
  }
  ORCH_CHECK_ARG(m > 0 && k > 0 && ((uintptr_t)bf16 & 15) == 0, op);
  if (wtype == ORCH_T_F32 || wtype == ORCH_T_BF16 || orch_row_bytes(wtype, k) <= 0 || k % 32) {
    orch_set_error("bf16_cache: weight type %d, k=%lld: only quantized / F16 weights with k %% 32 == 0 are cached "
                   "(F32 runs in fp32, BF16 in place)",
                   wtype, (long long)k);
    return ORCH_ERR_UNSUPPORTED;
  }
  const int64_t rb = orch_row_bytes(wtype, k);
  // While ctx's stream is captured (the first step of a graph may be the
  // weight's first large-n use) the fill runs now on a private non-blocking
  // stream (not part of the capture: it reads only the weight) and is waited
  // for, so the graph's matmul reads a finished copy; else on ctx's stream.
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  ORCH_CUDA(cudaStreamIsCapturing(ctx->stream, &cs), op);
  cudaStream_t st = ctx->stream, side = nullptr;
  if (cs != cudaStreamCaptureStatusNone) {
    ORCH_CUDA(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking), op);
    st = side;
  }
  dequant_rows(st, true, (__nv_bfloat16 *)bf16, (const uint8_t *)w, wtype, m, k, rb);
  cudaError_t err = cudaGetLastError();
  if (side) {
    const cudaError_t e2 = cudaStreamSynchronize(side);
    if (err == cudaSuccess) err = e2;
    cudaStreamDestroy(side);
  }
  if (err != cudaSuccess) {
    orch_set_error("bf16_cache: fill failed: %s", cudaGetErrorString(err));
    return ORCH_ERR_CUDA;
  }
  orch_bf16_entry e;
  e.bytes = m * rb;
  e.k = k;
  e.rb = rb;
  e.wtype = wtype;
  e.bf16 = bf16;
  ctx->bf16_cache[(uintptr_t)w] = e;
  return ORCH_OK;
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
  // Prefill: bf16 x once, then weight tiles of mc rows (dequantized into
  // scratch unless W's bf16 rows exist: wc; the same tiles either way).
  const int64_t mc = prefill_tile_rows(version, m, k, prefill_cap_bytes());
  const __nv_bfloat16 *wc = prefill_timing() ? nullptr : bf16_rows(ctx, wb, wtype, m, k, rb);
  size_t xbytes = (size_t)(n * k * 2 + 255) / 256 * 256;
  size_t need = xbytes + (wc ? 0 : (size_t)(mc * k * 2));
  void *scr = nullptr;
  int rc = orch_scratch(ctx, need, &scr);
  if (rc != ORCH_OK) return rc;
  __nv_bfloat16 *xb = (__nv_bfloat16 *)scr;
  __nv_bfloat16 *wt = (__nv_bfloat16 *)((char *)scr + xbytes);
  const bool v2 = version != 1;
  // v2 without accumulate: y = bias first, cuBLAS adds into it.
  // (Not when y overlaps the bias: the fill would overwrite it.)
  const bool bias_first = v2 && bias && !accumulate &&
                          ((const char *)bias >= (const char *)(y + n * m) || (const char *)(bias + m) <= (const char *)y);
  const bool q8_v2 = v2 && !wc && wtype == ORCH_T_Q8_0 && ((uintptr_t)wb & 1) == 0;
  // v2: x, the bias fill and (Q8_0) tile 0's dequantization in one launch.
  const bool fuse0 = q8_v2 && prefill_timing() != 2;
  if (v2 && (n * k) % 4 == 0 && ((uintptr_t)x & 15) == 0) {
    // (The bias fill joins the launch only when y does not overlap x.)
    const bool yx = (const char *)y < (const char *)(x + n * k) && (const char *)x < (const char *)(y + n * m);
    const int64_t nx4 = n * k / 4, nb = bias_first && !yx ? n * m : 0, nq = fuse0 ? min(mc, m) * k / 8 : 0;
    prep_v2_kernel<<<grid_for(nx4 + nb + nq), 256, 0, ctx->stream>>>((uint2 *)xb, (const float4 *)x, nx4, y, bias, nb,
                                                                       m, (uint4 *)wt, wb, nq);
    ORCH_LAUNCHED(op);
    if (bias_first && yx) {
      fill_bias_rows_kernel<<<grid_for(n * m), 256, 0, ctx->stream>>>(y, bias, n, m);
      ORCH_LAUNCHED(op);
    }
  } else {
    unsigned blocks = (unsigned)min(ceil_div(n * k, 256), (int64_t)65535);
    f32_to_bf16_kernel<<<blocks, 256, 0, ctx->stream>>>(xb, x, n * k);
    ORCH_LAUNCHED(op);
    if (bias_first) {
      fill_bias_rows_kernel<<<grid_for(n * m), 256, 0, ctx->stream>>>(y, bias, n, m);
      ORCH_LAUNCHED(op);
    }
  }
  const bool deq0_done = fuse0 && (n * k) % 4 == 0 && ((uintptr_t)x & 15) == 0;
  for (int64_t m0 = 0; m0 < m; m0 += mc) {
    const int64_t rows = min(mc, m - m0);
    if (!wc && prefill_timing() != 2 && !(m0 == 0 && deq0_done)) {
      dequant_rows(ctx->stream, v2, wt, wb + m0 * rb, wtype, rows, k, rb);
      ORCH_LAUNCHED(op);
    }
    if (prefill_timing() == 1) continue;
    // Column-major view: Y^T[m, n] = W[m, k] · X^T[k, n].
    const __nv_bfloat16 *wa = wc ? wc + m0 * k : wt;
    cublasStatus_t s = cublasGemmEx(ctx->cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)n, (int)k, &one, wa,
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
