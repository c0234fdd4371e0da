// common.cuh — shared host/device helpers of liborch_cuda: the context, error
// recording, launch checking, warp/block reductions.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <map>
#include <vector>

#include "../include/orch_cuda.h"

// "vN" in env var name -> N, else def (read when a context is created).
static inline int orch_env_version(const char *name, int def) {
  const char *v = getenv(name);
  if (v && v[0] == 'v' && v[1] >= '1' && v[1] <= '9' && v[2] == 0) return v[1] - '0';
  return def;
}

// A weight's bf16 copy in the bf16 weight cache (orch_bf16_cache,
// matmul_prefill.cu): the quantized weight's bytes, type, row length k and
// row bytes, and the caller's buffer of its rows as bf16 (rows of k).
struct orch_bf16_entry {
  int64_t bytes = 0, k = 0, rb = 0;
  int32_t wtype = 0;
  void *bf16 = nullptr;
};

struct orch_ctx {
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  void *cublas_ws = nullptr;
  size_t cublas_ws_bytes = 0;
  // Scratch for the dequantize-then-cuBLAS GEMM (bf16 weight tile, bf16 x).
  // Grown on demand; old buffers are kept until destroy because a captured
  // graph may still reference them.
  void *scratch = nullptr;
  size_t scratch_bytes = 0;
  std::vector<void *> retired;
  // bf16 weight cache (orch_bf16_cache): weight base address -> its bf16
  // copy; matmul_large multiplies any row range of a registered weight on it.
  std::map<uintptr_t, orch_bf16_entry> bf16_cache;
  // Kernel versions kept for A/B timing: ORCH_CUDA_GEMV=v1..v6 (GEMV for
  // n <= 8; v5 (fp16 decode; plus the split-k F32 GEMV for small m) is the
  // default where it applies, then v4's fp32 path (n <= 4), then v3, else
  // v1; v6 (one-wave double-buffered rows, below 32768 rows) measured slower
  // than v5 in device run 3 and is opt-in; v7 (session 3): tensor-core
  // mma.sync GEMV, routed by n when the variable is unset (gemv_auto); v9
  // (session 4) the tensor-core GEMV for 9..64 tokens; v8 and session 5's
  // v10 were deleted: no faster).
  int gemv = orch_env_version("ORCH_CUDA_GEMV", 5);
  // ORCH_CUDA_GEMV unset: the decode GEMV is routed by n (matmul.cu
  // gemv_route: v7 from n = 3 (Q8_0, Q4_0) / 4 (MXFP4), v5 below); a
  // version set pins it everywhere.
  bool gemv_auto = !getenv("ORCH_CUDA_GEMV") || !getenv("ORCH_CUDA_GEMV")[0];
  // ORCH_CUDA_MOE=v1: MoE through the unfused ops (orch_moe_ffn declines).
  bool moe_v1 = false;
  // Fused MoE FFN version: 6 (default; docs/perf-cuda.md "Round 4: MoE
  // decode") v4 with the bit-placement MXFP4 decode, batched / fixed-scale
  // staging and down's weights prefetched before pdl_wait; 4 fp16 decode with
  // the double-buffered down kernel, v3 fp16 decode, v2 the fp32 kernels, v5
  // v4 + the one-wave double-buffered gate_up kernel (opt-in).
  int moe = orch_env_version("ORCH_CUDA_MOE", 6);
  // ORCH_CUDA_MOE unset: orch_moe_decode runs v10 for 2..8 tokens (session 5:
  // router + top-k in one route kernel; equal to v6 at one token, which keeps
  // v6), orch_moe_ffn_route runs v9 for MXFP4 from 16 tokens (device run 3 of
  // session 4: faster from 16, slower up to 8) and declines below (v6); a
  // version set pins it everywhere (v10 is parsed by moe_ffn.cu: two digits).
  bool moe_auto = !getenv("ORCH_CUDA_MOE") || !getenv("ORCH_CUDA_MOE")[0];
};

// Records msg as the last error (thread-global, mutex-protected).
void orch_set_error(const char *fmt, ...);

// ---- Programmatic dependent launch (PDL, Hopper; docs/perf-cuda.md "Round 4") ----
// A kernel launched by orch_launch_pdl may start while the kernel before it
// in the stream is still running (its CTAs are scheduled as soon as every CTA
// of the previous kernel has run pdl_trigger() or exited). Such a kernel MUST
// call pdl_wait() in every thread before it touches any memory that an
// earlier kernel of the stream writes or reads (read-after-write and
// write-after-read): pdl_wait() returns once the previous grid has completed
// and its memory operations are visible. The only loads allowed before it are
// of memory no kernel ever writes while a step runs (the weights, uploaded
// once before any step). pdl_trigger() lets the next kernel launch early; its
// position does not affect correctness (the dependent's pdl_wait waits for
// this grid's completion, whatever the trigger), only how early the next
// kernel's CTAs occupy SM slots. Both are no-ops on sm_80 (compiled out), in
// the CPU emulation (cuda_emu.h), and when the kernel was launched without the
// attribute.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#elif defined(ORCH_EMU)
  emu_pdl_wait();
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Process-wide PDL switch: on when ORCH_CUDA_PDL is not "0" and the device
// of the last orch_init has compute capability >= 9.0 (set in orch_init;
// orch_set_pdl flips it for A/B timing). Graphs captured before a flip keep
// the launches they were captured with.
extern int g_orch_pdl;
// ORCH_CUDA_CARVEOUT=<percent> (session 15): the preferred L1 / shared split (cudaFuncAttributePreferredShared-
// MemoryCarveout, percent of the largest shared size) of the one- and two-token GEMV v5 kernels (plain, merged, the
// norm fold's producer and consumers, the SwiGLU fold) and of the decode attention (attn_gdr_kernel). The driver
// picks a split per kernel (Llama: ~32 KB for the k = 4096 GEMVs, ~100 KB for down's 38 KB of staged x a CTA, more
// for the attention with its KV0 copies), and a SM's split changes only when no CTA runs on it, so a kernel whose
// split differs from the one before loses the PDL overlap on that SM. Default 43 (~100 KB for all of them; L1 keeps
// ~156 KB for the loads in flight). Device run 5 (H100, same call): Llama tg128 303.9 vs 299.3 / 298.7 with "off";
// gpt-oss 688.7 ± 2.1 vs 690.2 / 689.5 (noise). Every kernel at 43: Llama 304.4, gpt-oss 646.4 (the MoE kernels' L1);
// every kernel at 100: Llama 273, gpt-oss 612; the attention alone at 100: gpt-oss 648 vs 691. "off" or -1: the
// driver's choice. Read once (runtime.cu).
int orch_carveout();

#if !defined(ORCH_EMU)
// Launches kern like kern<<<grid, block, smem, st>>>(args...), with the
// programmatic-stream-serialization attribute when PDL is on (also under
// stream capture: CUDA 12.3+ records a programmatic edge between the two
// kernel nodes). Only for kernels that call pdl_wait() as described above.
// The launch error, if any, is left for cudaGetLastError (ORCH_LAUNCHED).
template <typename... KArgs> static inline void orch_apply_carveout(void (*kern)(KArgs...)) {
  if (const int c = orch_carveout(); c >= 0) cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout, c);
}
template <typename... KArgs, typename... Args>
static inline void orch_launch_pdl(void (*kern)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                                   Args... args) {
  if (!g_orch_pdl) {
    kern<<<grid, block, smem, st>>>(args...);
    return;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = at;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, kern, args...);
}
#endif

#define ORCH_CHECK_ARG(cond, op)                                          \
  do {                                                                    \
    if (!(cond)) {                                                        \
      orch_set_error("%s: invalid argument: %s", op, #cond);              \
      return ORCH_ERR_INVALID;                                            \
    }                                                                     \
  } while (0)

#define ORCH_CUDA(call, op)                                                              \
  do {                                                                                   \
    cudaError_t e_ = (call);                                                             \
    if (e_ != cudaSuccess) {                                                             \
      orch_set_error("%s: %s: %s (%s:%d)", op, #call, cudaGetErrorString(e_), __FILE__, __LINE__); \
      return e_ == cudaErrorMemoryAllocation ? ORCH_ERR_OOM : ORCH_ERR_CUDA;             \
    }                                                                                    \
  } while (0)

// After a kernel launch: any launch error becomes the op's error.
#define ORCH_LAUNCHED(op) ORCH_CUDA(cudaGetLastError(), op)

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grows ctx scratch to at least bytes.
int orch_scratch(orch_ctx *ctx, size_t bytes, void **out);
// The large-n path of orch_matmul (matmul_prefill.cu); rb = bytes per weight row.
int matmul_large(orch_ctx *ctx, float *y, const float *x, const uint8_t *wb, int32_t wtype, const float *bias,
                 int64_t n, int64_t k, int64_t m, int32_t accumulate, int64_t rb);

// gpt-oss's clamped SwiGLU of one (gate, up) pair (ml.SwiGLUOAI): g = min(gate, limit),
// u = clamp(up, -limit, limit), (u + 1) * g * sigmoid(alpha * g).
__device__ __forceinline__ float swiglu_oai(float gate, float up, float alpha, float limit) {
  const float g = fminf(gate, limit);
  const float u = fminf(fmaxf(up, -limit), limit);
  return (u + 1.f) * g / (1.f + expf(-alpha * g));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum; every thread gets the result. blockDim.x multiple of 32, <= 1024.
__device__ __forceinline__ float block_sum(float v, float *sh /* >= 32 floats */) {
  int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  float r = lane < nw ? sh[lane] : 0.f;
  r = warp_sum(r);
  return r;
}

__device__ __forceinline__ float block_max(float v, float *sh) {
  int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  float r = lane < nw ? sh[lane] : -INFINITY;
  r = warp_max(r);
  return r;
}
