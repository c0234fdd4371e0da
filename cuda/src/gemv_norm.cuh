// gemv_norm.cuh — the RMSNorm folded into the prologue of the one-token
// GEMV v5 (session 5, issue 7): orch_matmul_multi_norm runs
//
//   if (add) res += add;  dst = rmsnorm(res) * nw;  y_p = dst . W_p^T + b_p
//
// in one launch instead of orch_rmsnorm + orch_matmul(_multi): two launches
// a layer fewer on the decode step (Llama: attention norm -> q/k/v, FFN norm
// -> gate/up; gpt-oss: attention norm -> q/k/v; the output norm -> LM head).
//
// Design (written up in .orch-notes/S5-dec-round6.md):
//  - Every CTA recomputes the norm of the (one or two) rows itself, after
//    pdl_wait and after its first round of weight words is in flight: it
//    reads res (+ add) once into shared memory (nt * k floats), sums the
//    squares in exactly norm_reg_kernel's order (thread t owns elements
//    t + 256 j, j ascending; fmaf; block_sum over 8 warps), so the scale is
//    bit-identical to orch_rmsnorm's; then stages x = (v * r) * nw[i] with
//    dec16_stage's arithmetic. Every staged value, hence every y, is
//    bit-identical to the two-launch path (the CTA has 256 threads, as the
//    norm kernel: GEMV16_WARPS * 32 == NORM_THREADS).
//  - The writes (res = res + add, the residual stream; dst, which other ops
//    read — gpt-oss's MoE reads h; the output norm is in place, dst == res)
//    must not land while another CTA still reads res: each CTA takes an
//    atomic ticket after its reads (fence first); the CTA that took the last
//    ticket (every other CTA has read res) writes res and dst from its shared
//    copy after its own rows (so the atomic's round trip overlaps the GEMV)
//    and resets the ticket to zero for the next launch. Tickets live in
//    a device array (no allocation under graph capture), one slot per
//    context (matmul.cu gemv_norm_ticket).
// Why not the producer (o-projection / down GEMV) writing the residual and
// the norm in a last-CTA epilogue: that tail is serial (one CTA normalises
// the whole row after the whole GEMV), and gpt-oss's attention-norm producer
// is the MoE kernel (not this file's); the consumer prologue is parallel and
// needs nothing from the producer.
#pragma once

constexpr int GEMV_NORM_THREADS = 256; // == norm.cu NORM_THREADS and GEMV16_WARPS * 32

struct gemv_norm_args {
  float *res;          // the rows normalised (n x k); written back (= res + add) when add != nullptr
  const float *add;    // may be nullptr
  const float *nw;     // norm weight (k)
  float *dst;          // normalised rows (n x k); may alias res
  unsigned *ticket;    // zero before the launch; the last CTA resets it
  float eps;
};

#if defined(__CUDACC__) || defined(ORCH_EMU)
// The square sum of one row in norm_reg_kernel's order (thread t: elements
// t + 256 j, ascending j), also storing v = res (+ add) into vs. Shared by
// norm.cu (orch_rmsnorm) so that both compute the same float.
__device__ __forceinline__ float rms_sq_step(float ss, float v) { return fmaf(v, v, ss); }

// Stages nr rows of the normalised x for the whole CTA as dec16_stage does
// (same chunk layout, scale and rounding), from the raw rows in vs and the
// per-row inverse RMS rr; w: the norm weight.
template <int NT>
__device__ __forceinline__ void gemv_norm_stage_x(uint32_t *xh, float *xinv, const float *vs, const float (&rr)[NT],
                                                  const float *__restrict__ w, int nr, int64_t k, int kind) {
  const int64_t nch = k / 32, nq = k / 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int r = 0; r < NT; r++) {
    if (r >= nr) break;
    const float rs = rr[r];
    for (int64_t base = (int64_t)warp * 32; base < nq; base += (int64_t)nw * 32) {
      const int64_t i = base + lane;
      const bool ok = i < nq;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (ok) {
        const float4 a = reinterpret_cast<const float4 *>(vs + r * k)[i];
        const float4 g = __ldg(reinterpret_cast<const float4 *>(w) + i);
        // norm_reg_kernel: o = (v - mean) * r with mean = 0, then o *= w[i]
        v = make_float4((a.x * rs) * g.x, (a.y * rs) * g.y, (a.z * rs) * g.z, (a.w * rs) * g.w);
      }
      uint32_t mx = max(max(dec16_absbits(v.x), dec16_absbits(v.y)), max(dec16_absbits(v.z), dec16_absbits(v.w)));
      mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      float s, inv;
      dec16_chunk_scale(mx, s, inv);
      if (ok) {
        const int64_t c = i >> 3;
        const int o = (int)(i & 7);
        dec16_put4(xh + (r * nch + c) * DEC16_XW, kind, o, v.x * s, v.y * s, v.z * s, v.w * s);
        if (o == 0) xinv[r * nch + c] = inv;
      }
    }
  }
}

// The prologue: called by every thread of the CTA after pdl_wait (uniform).
// red: >= 32 floats of shared memory (red[16 + r]: row r's inverse RMS for
// the epilogue); vs: nr * k floats. Stages the normalised rows into xh /
// xinv (dec16_stage's layout); the caller syncs, then takes the ticket.
template <int NT>
__device__ __forceinline__ void gemv_norm_prologue(uint32_t *xh, float *xinv, float *red, float *vs,
                                                       const gemv_norm_args &a, int nr, int64_t k, int kind) {
  const int tid = threadIdx.x;
  float rr[NT];
#pragma unroll
  for (int r = 0; r < NT; r++) {
    rr[r] = 0.f;
    if (r >= nr) continue;
    const float *xr = a.res + r * k;
    const float *ar = a.add ? a.add + r * k : nullptr;
    float ss = 0.f;
    for (int64_t i = tid; i < k; i += GEMV_NORM_THREADS) {
      float v = xr[i];
      if (ar) v += ar[i];
      vs[r * k + i] = v;
      ss = rms_sq_step(ss, v);
    }
    const float var = block_sum(ss, red) / (float)k;
    rr[r] = rsqrtf(var + a.eps);
  }
  if (tid == 0)
#pragma unroll
    for (int r = 0; r < NT; r++) red[16 + r] = rr[r];
  gemv_norm_stage_x<NT>(xh, xinv, vs, rr, a.nw, nr, k, kind);
}

// After the barrier that follows the prologue (every thread's reads of res /
// add are done): thread 0 takes the CTA's ticket (fence first; only warp 0
// waits for the fence, and for the atomic's result only in the epilogue).
__device__ __forceinline__ unsigned gemv_norm_take_ticket(const gemv_norm_args &a) {
  unsigned t = 0;
  if (threadIdx.x == 0) {
    __threadfence();
    t = atomicAdd(a.ticket, 1u);
  }
  return t;
}

// The epilogue, after the CTA's rows (every thread, uniform): the CTA that
// took the last ticket (every other CTA has read res) writes res (= res +
// add) and dst from its shared copy and resets the ticket.
template <int NT>
__device__ __forceinline__ void gemv_norm_epilogue(float *red, const float *vs, const gemv_norm_args &a, int nr,
                                                   int64_t k, unsigned ticket) {
  const int tid = threadIdx.x;
  __syncthreads(); // red[16 + r] (and red[31] below) written by thread 0 before any read
  if (tid == 0) {
    const bool last = ticket == gridDim.x - 1;
    if (last) atomicExch(a.ticket, 0u);
    red[31] = last ? 1.f : 0.f;
  }
  __syncthreads();
  if (red[31] == 0.f) return;
#pragma unroll
  for (int r = 0; r < NT; r++) {
    if (r >= nr) break;
    const float rs = red[16 + r];
    for (int64_t i = tid; i < k; i += GEMV_NORM_THREADS) {
      const float v = vs[r * k + i];
      if (a.add) a.res[r * k + i] = v;
      a.dst[r * k + i] = (v * rs) * a.nw[i]; // norm_reg_kernel's expression
    }
  }
}
#endif

// Shared-memory bytes in front of the staged x: the reduction scratch and
// the raw rows (keeps the staged x 16-byte aligned: k % 32 == 0).
static inline size_t gemv_norm_smem(int64_t k, int nr) { return (size_t)(32 + nr * k) * sizeof(float); }
