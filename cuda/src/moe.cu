// moe.cu — MoE routing (top-k over router logits, softmax over the k
// selected, as gpt-oss) and the weighted combine of the expert outputs.
// The expert matmuls themselves are orch_moe_matmul in matmul.cu.
#include "common.cuh"
#include "moe_route.cuh"

constexpr int TOPK_MAX = 16;

// One warp per row; k rounds of a warp arg-max (n_exp is small: 32..256).
__global__ void moe_topk_kernel(int32_t *ids, float *wts, const float *logits, int64_t n, int n_exp, int k) {
  pdl_trigger();
  pdl_wait();
  int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  int lane = threadIdx.x & 31;
  if (row >= n) return;
  const float *lr = logits + row * n_exp;
  float sel[TOPK_MAX];
  int seli[TOPK_MAX];
  // Bitmask of taken experts, per lane for the experts it owns (lane + 32j, up to 8 per lane).
  uint32_t taken = 0;
  for (int r = 0; r < k; r++) {
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int j = 0, e = lane; e < n_exp; j++, e += 32) {
      if (taken & (1u << j)) continue;
      float v = lr[e];
      if (v > best || (v == best && e < bi)) {
        best = v;
        bi = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      float ov = __shfl_xor_sync(0xffffffffu, best, o);
      int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > best || (ov == best && oi < bi)) {
        best = ov;
        bi = oi;
      }
    }
    if (bi != 0x7fffffff && (bi & 31) == lane) taken |= 1u << (bi >> 5);
    sel[r] = best;
    seli[r] = bi;
  }
  if (lane == 0) {
    float mx = sel[0], sum = 0.f;
    float p[TOPK_MAX];
    for (int r = 0; r < k; r++) {
      p[r] = __expf(sel[r] - mx);
      sum += p[r];
    }
    for (int r = 0; r < k; r++) {
      ids[row * k + r] = seli[r];
      wts[row * k + r] = p[r] / sum;
    }
  }
}

// MoE v6 routing for n_exp <= 32 (gpt-oss: 32): one warp per row,
// moe_topk32_warp (moe_route.cuh: lane ranks instead of k dependent rounds of
// a shuffle arg-max; ids and weights identical to moe_topk_kernel's for every
// row without NaN logits). Checked against moe_topk_kernel in
// cuda/test/moe_emu_test.cpp.
__global__ void moe_topk32_kernel(int32_t *ids, float *wts, const float *logits, int64_t n, int n_exp, int k) {
  pdl_trigger();
  pdl_wait();
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= n) return; // uniform over the warp
  const float v = lane < n_exp ? logits[row * n_exp + lane] : 0.f;
  int myid;
  float myw;
  moe_topk32_warp(v, lane, n_exp, k, myid, myw);
  if (lane < k) {
    ids[row * k + lane] = myid;
    wts[row * k + lane] = myw;
  }
}

extern "C" int orch_moe_topk(orch_ctx *ctx, int32_t *ids, float *weights, const float *logits, int64_t n,
                             int32_t n_exp, int32_t k) {
  ORCH_CHECK_ARG(ctx && ids && weights && logits && n >= 0, "moe_topk");
  ORCH_CHECK_ARG(n_exp > 0 && n_exp <= 32 * 32 && k > 0 && k <= TOPK_MAX && k <= n_exp, "moe_topk");
  if (!n) return ORCH_OK;
  const int warps = 4;
  if (ctx->moe >= 6 && n_exp <= 32) {
    orch_launch_pdl(moe_topk32_kernel, dim3((unsigned)ceil_div(n, warps)), dim3(warps * 32), 0, ctx->stream, ids,
                    weights, logits, n, n_exp, k);
    ORCH_LAUNCHED("moe_topk");
    return ORCH_OK;
  }
  orch_launch_pdl(moe_topk_kernel, dim3((unsigned)ceil_div(n, warps)), dim3(warps * 32), 0, ctx->stream, ids, weights,
                  logits, n, n_exp, k);
  ORCH_LAUNCHED("moe_topk");
  return ORCH_OK;
}

__global__ void moe_combine_kernel(float *out, const float *y, const float *w, int64_t n, int k, int64_t dim,
                                   int accumulate) {
  pdl_trigger();
  pdl_wait();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * dim; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t t = i / dim, d = i % dim;
    float s = 0.f;
    for (int j = 0; j < k; j++) s += w[t * k + j] * y[(t * k + j) * dim + d];
    out[i] = accumulate ? out[i] + s : s;
  }
}

extern "C" int orch_moe_combine(orch_ctx *ctx, float *out, const float *y, const float *w, int64_t n, int32_t k,
                                int64_t dim, int32_t accumulate) {
  ORCH_CHECK_ARG(ctx && out && y && w && n >= 0 && k > 0 && dim > 0, "moe_combine");
  if (!n) return ORCH_OK;
  unsigned blocks = (unsigned)min(ceil_div(n * dim, 256), (int64_t)65535);
  orch_launch_pdl(moe_combine_kernel, dim3(blocks), dim3(256), 0, ctx->stream, out, y, w, n, k, dim, accumulate);
  ORCH_LAUNCHED("moe_combine");
  return ORCH_OK;
}
