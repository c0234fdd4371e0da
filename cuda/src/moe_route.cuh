// moe_route.cuh — the top-k routing of one token's logits by one warp
// (n_exp <= 32): used by moe_topk32_kernel (moe.cu, MoE v6) and folded into
// the MoE v7 expert kernels (moe_ffn.cu), which route each token themselves
// instead of waiting for a separate top-k launch. One function, so the ids and
// weights of every caller are the same bits.
#pragma once

// Lane e holds logit e; its rank in the order moe_topk_kernel's rounds pick
// (greater value first, ties to the lower index) comes from 32 independent
// broadcasts, instead of k dependent rounds of a 5-step shuffle arg-max; the k
// selected values are then gathered in rank order (one ballot + shuffle per
// rank) and every lane forms the same p[r] = exp(sel[r] - sel[0]) and their
// sum in rank order — the expressions of moe_topk_kernel, so ids and weights
// are identical for every row without NaN logits (a NaN is never picked here;
// there it could make a round pick nothing). On return, lane r < k holds the
// id (myid) and weight (myw) of rank r. v: this lane's logit (any value when
// lane >= n_exp). Every lane of the warp must call it (uniform k, n_exp).
__device__ __forceinline__ void moe_topk32_warp(float v, int lane, int n_exp, int k, int &myid, float &myw) {
  const bool mine = lane < n_exp;
  if (!mine) v = 0.f;
  int rank = 0;
#pragma unroll
  for (int j = 0; j < 32; j++) {
    const float o = __shfl_sync(0xffffffffu, v, j);
    rank += (j < n_exp && (o > v || (o == v && j < lane))) ? 1 : 0;
  }
  const bool cand = mine && v == v; // NaN: never picked
  float mx = 0.f, sum = 0.f, myp = 0.f;
  myid = 0x7fffffff;
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
  myw = myp / sum;
}
