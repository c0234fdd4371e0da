// moe.cu — MoE routing (top-k over router logits, softmax over the k
// selected, as gpt-oss) and the weighted combine of the expert outputs.
// The expert matmuls themselves are orch_moe_matmul in matmul.cu.
#include "common.cuh"

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

// MoE v6 routing for n_exp <= 32 (gpt-oss: 32): lane e holds logit e; its
// rank in the order moe_topk_kernel's rounds pick (greater value first, ties
// to the lower index) comes from 32 independent broadcasts, instead of k
// dependent rounds of a 5-step shuffle arg-max; the k selected values are then
// gathered in rank order (one ballot + shuffle per rank) and every lane forms
// the same p[r] = exp(sel[r] - sel[0]) and their sum in rank order — the
// expressions of moe_topk_kernel, so ids and weights are identical for every
// row without NaN logits (a NaN is never picked here; there it could make a
// round pick nothing). Checked against moe_topk_kernel in cuda/test/moe_emu_test.cpp.
__global__ void moe_topk32_kernel(int32_t *ids, float *wts, const float *logits, int64_t n, int n_exp, int k) {
  pdl_trigger();
  pdl_wait();
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= n) return; // uniform over the warp
  const bool mine = lane < n_exp;
  const float v = mine ? logits[row * n_exp + lane] : 0.f;
  int rank = 0;
#pragma unroll
  for (int j = 0; j < 32; j++) {
    const float o = __shfl_sync(0xffffffffu, v, j);
    rank += (j < n_exp && (o > v || (o == v && j < lane))) ? 1 : 0;
  }
  const bool cand = mine && v == v; // NaN: never picked
  float mx = 0.f, sum = 0.f, myp = 0.f;
  int myid = 0x7fffffff;
  for (int r = 0; r < k; r++) {
    const unsigned b = __ballot_sync(0xffffffffu, cand && rank == r);
    const int src = b ? __ffs((int)b) - 1 : 0;
    const float sv = b ? __shfl_sync(0xffffffffu, v, src) : -INFINITY; // b is uniform; none left: as moe_topk_kernel
    if (r == 0) mx = sv;
    const float p = __expf(sv - mx);
    sum += p;
    if (lane == r) {
      myp = p;
      myid = b ? src : 0x7fffffff;
    }
  }
  if (lane < k) {
    ids[row * k + lane] = myid;
    wts[row * k + lane] = myp / sum;
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
