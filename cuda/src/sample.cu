// sample.cu — on-GPU token selection: argmax, and per-row seeded temperature / top-k / top-p / min-p sampling
// (orch_sample_rows, sample_rows.cuh). (The one-CTA-a-row orch_sample with ~30 bisection passes per filter was
// deleted in session 8: 116 us a gpt-oss row at T=1 and 1,360 with top_p 0.9, vs 13.3 / 54.5 for sample_rows.)
#include "common.cuh"

constexpr int SAMPLE_THREADS = 1024;

// Best of (v, i) and (ov, oi): the larger value, the lower index on ties (NaN never wins).
__device__ __forceinline__ void argmax_pick(float &v, int64_t &i, float ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

// Block-wide argmax of each thread's (best, bi): the result in thread 0.
__device__ __forceinline__ void argmax_block(float &best, int64_t &bi) {
  for (int o = 16; o > 0; o >>= 1)
    argmax_pick(best, bi, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, bi, o));
  __shared__ float sv[32];
  __shared__ int64_t si[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  if (lane == 0) {
    sv[w] = best;
    si[w] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int j = 1; j < (int)(blockDim.x >> 5); j++) argmax_pick(best, bi, sv[j], si[j]);
}

// One CTA a row (rows beyond ARGMAX_MAX_ROWS, or a vocabulary too small to split).
__global__ void __launch_bounds__(SAMPLE_THREADS) argmax_kernel(int32_t *out, const float *logits, int64_t vocab) {
  pdl_trigger();
  pdl_wait(); // PDL: everything below reads or writes what earlier kernels use
  const float *lr = logits + blockIdx.x * vocab;
  float best = -INFINITY;
  int64_t bi = INT64_MAX;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) argmax_pick(best, bi, lr[i], i);
  argmax_block(best, bi);
  if (threadIdx.x == 0) out[blockIdx.x] = bi == INT64_MAX ? 0 : (int32_t)bi;
}

// Split argmax (session 8): a decode step's one-CTA argmax over gpt-oss's 201,088 logits took 80 us of the ~2 ms
// step (Llama's 128,256: 52 us; CUPTI trace, H100) — one SM streaming 800 KB. Here ARGMAX_SPLIT CTAs a row each
// take a contiguous slice (float4 loads where the row is 16-byte aligned), write their (value, index) partial, and
// the row's last CTA (an atomicInc ticket that wraps back to 0 by itself: graph-safe) picks among the partials in
// slice order. The result is the one-CTA kernel's: the largest value, the lowest index on ties, 0 for a row
// without a number. The tickets and partials are per device (static): argmax ops of one process must not run
// concurrently on two streams of one device (as MoE v10's tickets; orch runs a device's ops on one stream).
constexpr int ARGMAX_SPLIT = 64;
constexpr int ARGMAX_MAX_ROWS = 64;
constexpr int ARGMAX_THREADS = 256;
__device__ unsigned g_argmax_ticket[ARGMAX_MAX_ROWS];
__device__ float g_argmax_val[ARGMAX_MAX_ROWS * ARGMAX_SPLIT];
__device__ int64_t g_argmax_idx[ARGMAX_MAX_ROWS * ARGMAX_SPLIT];

__global__ void __launch_bounds__(ARGMAX_THREADS) argmax_split_kernel(int32_t *out, const float *logits, int64_t vocab) {
  pdl_trigger();
  pdl_wait();
  const int row = blockIdx.y, part = blockIdx.x, P = gridDim.x;
  const float *lr = logits + row * vocab;
  const int64_t per = (vocab / P + 3) & ~(int64_t)3, b0 = min((int64_t)part * per, vocab),
                b1 = part == P - 1 ? vocab : min(b0 + per, vocab);
  float best = -INFINITY;
  int64_t bi = INT64_MAX;
  if (((uintptr_t)(lr + b0) & 15) == 0) {
    const int64_t n4 = (b1 - b0) / 4;
    const float4 *l4 = reinterpret_cast<const float4 *>(lr + b0);
    for (int64_t q = threadIdx.x; q < n4; q += blockDim.x) {
      const float4 v = l4[q];
      const int64_t i = b0 + 4 * q;
      argmax_pick(best, bi, v.x, i);
      argmax_pick(best, bi, v.y, i + 1);
      argmax_pick(best, bi, v.z, i + 2);
      argmax_pick(best, bi, v.w, i + 3);
    }
    for (int64_t i = b0 + 4 * n4 + threadIdx.x; i < b1; i += blockDim.x) argmax_pick(best, bi, lr[i], i);
  } else {
    for (int64_t i = b0 + threadIdx.x; i < b1; i += blockDim.x) argmax_pick(best, bi, lr[i], i);
  }
  argmax_block(best, bi);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    g_argmax_val[row * ARGMAX_SPLIT + part] = best;
    g_argmax_idx[row * ARGMAX_SPLIT + part] = bi;
    __threadfence();
    last = atomicInc(&g_argmax_ticket[row], (unsigned)P - 1) == (unsigned)P - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (threadIdx.x < 32) {
    // lane j reads partials j, j + 32; every partial's index lies in its own slice, so ties resolve by index
    float v = -INFINITY;
    int64_t i = INT64_MAX;
    for (int p = threadIdx.x; p < P; p += 32)
      argmax_pick(v, i, ((volatile float *)g_argmax_val)[row * ARGMAX_SPLIT + p],
                  ((volatile int64_t *)g_argmax_idx)[row * ARGMAX_SPLIT + p]);
    for (int o = 16; o > 0; o >>= 1)
      argmax_pick(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
    if (threadIdx.x == 0) out[row] = i == INT64_MAX ? 0 : (int32_t)i;
  }
}

extern "C" int orch_argmax(orch_ctx *ctx, int32_t *out, const float *logits, int64_t n, int64_t vocab) {
  ORCH_CHECK_ARG(ctx && out && logits && n >= 0 && n <= 65535 && vocab > 0 && vocab < (1ll << 31), "argmax");
  if (!n) return ORCH_OK;
  // split rows: at least 4 float4s per thread of a slice, at most ARGMAX_SPLIT slices
  const int64_t P = min((int64_t)ARGMAX_SPLIT, vocab / (16 * ARGMAX_THREADS));
  if (n <= ARGMAX_MAX_ROWS && P >= 2)
    orch_launch_pdl(argmax_split_kernel, dim3((unsigned)P, (unsigned)n), dim3(ARGMAX_THREADS), 0, ctx->stream, out,
                    logits, vocab);
  else
    orch_launch_pdl(argmax_kernel, dim3((unsigned)n), dim3(SAMPLE_THREADS), 0, ctx->stream, out, logits, vocab);
  ORCH_LAUNCHED("argmax");
  return ORCH_OK;
}

// PDL (session 14): may start while the read kernel before it runs; waits for it before touching memory.
__global__ void step_advance_kernel(int32_t *buf, int64_t seg, uint32_t inc, const int32_t *src,
                                    orch_sample_params *params, int32_t n) {
  pdl_wait();
  const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) {
    buf[i] = src[i];
    for (int s = 1; s < 32; s++)
      if ((inc >> s) & 1u) buf[s * seg + i] += 1;
    if (params && params[i].temperature >= 1e-5f) params[i].counter += 1;
  }
  pdl_trigger();
}

extern "C" int orch_step_advance(orch_ctx *ctx, int32_t *buf, int64_t seg, uint32_t inc, const int32_t *src,
                                 orch_sample_params *params, int32_t n) {
  ORCH_CHECK_ARG(ctx && buf && src && seg >= n && n >= 0 && n <= 65535 && !(inc & 1u), "step_advance");
  if (!n) return ORCH_OK;
  orch_launch_pdl(step_advance_kernel, dim3((unsigned)((n + 127) / 128)), dim3(128), 0, ctx->stream, buf, seg, inc,
                  src, params, n);
  ORCH_LAUNCHED("step_advance");
  return ORCH_OK;
}

// Session 14: a step's tokens into pinned host memory by a kernel instead of a copy-engine memcpy. With the D2H
// copy between the step's argmax and step_advance the device idled ~13 us a decode step (CUPTI, H100; taken for
// the copy engine's setup and the semaphores between the engines); a kernel on the SMs follows the argmax, and
// step_advance (PDL) may start under its tail. It triggers at once: the dependent waits for this grid anyway.
constexpr int READ_THREADS = 256;
__global__ void __launch_bounds__(READ_THREADS) read_i32_kernel(int32_t *dst, const int32_t *src, int64_t n) {
  pdl_trigger();
  pdl_wait();
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = src[i];
}

extern "C" int orch_read_i32_host(orch_ctx *ctx, int32_t *host_dst, const int32_t *src, int64_t n) {
  ORCH_CHECK_ARG(ctx && host_dst && src && n >= 0, "read_i32_host");
  if (!n) return ORCH_OK;
  // orch_host_alloc's cudaMallocHost memory is mapped on every device with unified addressing (all 64-bit
  // platforms orch runs on); its device address comes from cudaHostGetDevicePointer (an error, not a fault, when
  // the memory is not mapped: e.g. not from orch_host_alloc).
  void *d = nullptr;
  ORCH_CUDA(cudaHostGetDevicePointer(&d, host_dst, 0), "read_i32_host");
  const int64_t blocks = min(ceil_div(n, (int64_t)READ_THREADS), (int64_t)1024);
  orch_launch_pdl(read_i32_kernel, dim3((unsigned)blocks), dim3(READ_THREADS), 0, ctx->stream, (int32_t *)d, src, n);
  ORCH_LAUNCHED("read_i32_host");
  return ORCH_OK;
}

#include "sample_rows.cuh"

extern "C" int orch_sample_rows(orch_ctx *ctx, int32_t *out, const float *logits, int64_t n, int64_t vocab,
                                const orch_sample_params *params, int32_t filters) {
  ORCH_CHECK_ARG(ctx && out && logits && params && n >= 0 && vocab > 0 && vocab < (1ll << 31) && filters >= 0 &&
                     filters <= 3,
                 "sample_rows");
  for (int64_t r0 = 0; r0 < n; r0 += SR_MAX_ROWS) {
    const unsigned rows = (unsigned)(n - r0 < SR_MAX_ROWS ? n - r0 : SR_MAX_ROWS);
    const int P = sr_parts(vocab, rows);
    const float *l = logits + r0 * vocab;
    const orch_sample_params *pr = params + r0;
    if (filters > 0) {
      orch_launch_pdl(srows_max_kernel, dim3((unsigned)P, rows), dim3(SR_THREADS), 0, ctx->stream, l, vocab, pr);
      for (int pass = 0; pass < SR_PASSES * (filters - 1); pass++)
        orch_launch_pdl(srows_hist_kernel, dim3((unsigned)P, rows), dim3(SR_THREADS), 0, ctx->stream, l, vocab, pr);
    }
    orch_launch_pdl(srows_draw_kernel, dim3((unsigned)P, rows), dim3(SR_THREADS), 0, ctx->stream, out + r0, l, vocab,
                    pr);
  }
  ORCH_LAUNCHED("sample_rows");
  return ORCH_OK;
}
