// attention_tc.cu — tensor-core flash attention for prefill chunks: head dim
// 64/128 the register-resident mma.sync kernel of attention_fa.cuh (ldmatrix
// fragments, cp.async double-buffered K/V, two query heads per CTA where the
// group size is even), the other head dims up to 128 the WMMA kernel of
// attention_tc.cuh (below).
//
// WMMA kernel: a CTA takes a tile of ATTN_TC_ROWS (64) consecutive query rows of one
// sequence (the tile's "run", attention_index.cuh) and one query head; its 4
// warps own 16 rows each. Per tile of TC_BK (64) keys: all threads stage K
// and V as fp16 in shared memory (F16 cache: copied; F32 cache: rounded),
// then each warp computes S = Q K^T with WMMA (m16n16k16, fp16 in, fp32
// accumulate) into shared memory, runs the online softmax on its rows in
// fp32 (two lanes per row), writes P as fp16 over its S rows and adds P V
// with WMMA into O, kept in accumulator fragments and rescaled (through
// shared memory) only when a row's max grows by more than e^8. WMMA (documented
// API) rather than hand-laid mma.sync fragments: the fragment layout is
// opaque, which is why S and O go through shared memory. Causal and window
// masks are applied to S; a warp skips key tiles none of its rows can see.
// Rows a tile does not take are left to the flash-decoding kernel, which
// skips exactly the rows taken here (attn_tc_takes).
//
// Error vs the fp32 kernels: q (scaled), K, V (F32 cache) and P are rounded
// to fp16 (2^-11 relative), so outputs move by ~1e-3 relative.
#include "common.cuh"
#include "attention_tc.cuh"
#include "attention_fa.cuh"

namespace {

using namespace attn_tc;

// Head dims of the WMMA kernel (64 and 128 take attention_fa.cuh's).
#define TC_HEAD_DIMS(X) X(16) X(32) X(48) X(80) X(96) X(112)

// Opts every instance into its dynamic shared memory (62 KB at head dim 64,
// 103 KB at 128: over the 48 KB default) once per device. This may run
// while the stream is being captured into a graph, so it switches the
// thread to relaxed capture mode around the calls (the documented way to
// make non-stream calls during a capture). A device that refuses (less
// shared memory than Hopper/Ampere) gets ORCH_ERR_UNSUPPORTED: the caller
// then runs the flash-decoding kernels for every row.
int tc_set_smem_attrs(orch_ctx *ctx) {
  static int state[64]; // per device: 0 not yet, 1 done, 2 refused (races are benign: same result)
  const int dev = ctx->device & 63;
  if (state[dev] == 1) return ORCH_OK;
  if (state[dev] == 2) return ORCH_ERR_UNSUPPORTED;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  ORCH_CUDA(cudaThreadExchangeStreamCaptureMode(&mode), "attention (tensor cores)");
  cudaError_t e = cudaSuccess;
#define TC_ATTR1(KV, H)                                                                                    \
  if (e == cudaSuccess)                                                                                    \
    e = cudaFuncSetAttribute(attn_tc_kernel<KV, H>, cudaFuncAttributeMaxDynamicSharedMemorySize,           \
                             (int)TcLayout<H>::BYTES);
#define TC_ATTR(H) TC_ATTR1(__half, H) TC_ATTR1(float, H)
  TC_HEAD_DIMS(TC_ATTR)
#undef TC_ATTR
#undef TC_ATTR1
  // attention_fa.cuh: 45 / 78 KB at head dim 64 / 128.
#define FA_ATTR1(KV, H, P)                                                                                 \
  if (e == cudaSuccess)                                                                                    \
    e = cudaFuncSetAttribute(attn_fa::attn_fa11_kernel<KV, H, P>, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                             (int)attn_fa::Fa11Smem<H>::BYTES);
#define FA_ATTR(H) FA_ATTR1(__half, H, 1) FA_ATTR1(float, H, 1) FA_ATTR1(__half, H, 2) FA_ATTR1(float, H, 2)
  FA_ATTR(64) FA_ATTR(128)
#undef FA_ATTR
#undef FA_ATTR1
  ORCH_CUDA(cudaThreadExchangeStreamCaptureMode(&mode), "attention (tensor cores)");
  if (e != cudaSuccess) (void)cudaGetLastError(); // not the next launch's error
  state[dev] = e == cudaSuccess ? 1 : 2;
  return e == cudaSuccess ? ORCH_OK : ORCH_ERR_UNSUPPORTED;
}

template <typename KV, int HD>
int launch_tc(orch_ctx *ctx, const orch_attn_args *a) {
  int rc = tc_set_smem_attrs(ctx);
  if (rc != ORCH_OK) return rc;
  if constexpr (HD == 64 || HD == 128) { // ldmatrix + cp.async (attention_fa.cuh)
    using namespace attn_fa;
    const size_t sm = Fa11Smem<HD>::BYTES;
    if ((a->n_heads / a->n_kv_heads) % 2 == 0) { // two heads per CTA
      dim3 grid((unsigned)ceil_div(a->n_tok, FA_BQ), (unsigned)(a->n_heads / 2));
      attn_fa11_kernel<KV, HD, 2><<<grid, 2 * FA_THREADS, sm, ctx->stream>>>(*a);
    } else {
      dim3 grid((unsigned)ceil_div(a->n_tok, FA_BQ), (unsigned)a->n_heads);
      attn_fa11_kernel<KV, HD, 1><<<grid, FA_THREADS, sm, ctx->stream>>>(*a);
    }
    ORCH_LAUNCHED("attention (tensor cores, mma.sync)");
  } else {
    dim3 grid((unsigned)ceil_div(a->n_tok, TC_BQ), (unsigned)a->n_heads);
    attn_tc_kernel<KV, HD><<<grid, TC_WARPS * 32, TcLayout<HD>::BYTES, ctx->stream>>>(*a);
    ORCH_LAUNCHED("attention (tensor cores, WMMA)");
  }
  return ORCH_OK;
}

} // namespace

bool attn_tc_supports(int head_dim) { return head_dim % 16 == 0 && head_dim >= 16 && head_dim <= 128; }

// Launches the tensor-core prefill kernel for the tiles it takes (see
// attention_index.cuh); the caller then runs the flash-decoding kernel with
// tc_skip for the other rows. ORCH_ERR_UNSUPPORTED (no error recorded) when
// the head dim or KV type has no instance.
int attn_tc_launch(orch_ctx *ctx, const orch_attn_args *a) {
  const bool f16 = a->kv_dtype == ORCH_KV_F16;
  if (!f16 && a->kv_dtype != ORCH_KV_F32) return ORCH_ERR_UNSUPPORTED;
  switch (a->head_dim) {
#define TC_CASE(H) \
  case H: return f16 ? launch_tc<__half, H>(ctx, a) : launch_tc<float, H>(ctx, a);
    TC_HEAD_DIMS(TC_CASE) TC_CASE(64) TC_CASE(128)
#undef TC_CASE
    default: return ORCH_ERR_UNSUPPORTED;
  }
}
