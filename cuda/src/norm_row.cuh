// norm_row.cuh — one row of RMSNorm / LayerNorm (with the residual add) by
// one CTA of NORM_THREADS threads, each thread's elements in registers: the
// body of norm.cu's norm_reg_kernel (a header of its own so that the CPU
// emulation, cuda/test/decode_emu_test.cpp, compiles the same expressions).
// CG: read x and add through L2 (__ldcg).
#pragma once
#include "dec16.cuh"

constexpr int NORM_THREADS = 256;

template <bool CG>
__device__ __forceinline__ float norm_ld(const float *p) {
#if defined(__CUDA_ARCH__)
  if constexpr (CG) return __ldcg(p);
#endif
  return *p;
}

// x[i] (+= add[i], written back when add) for i = threadIdx.x + j *
// NORM_THREADS < dim, j < N; out = (x - mean) * rsqrt(var + eps) (* w) (+ b),
// mean 0 for RMSNorm (!LAYER). sh: >= 32 floats of shared memory; every
// thread of the CTA calls it (block reductions). XH (session 7): out also
// packed into xh (a row of dec16_xh_row_bytes(dim); dim % 32 == 0) for the
// GEMV that reads it (weight kind `kind`, dec16_traits): element i is lane
// i % 32 of warp (i / 32) % 8 in its j-th element, so each warp packs whole
// chunks.
template <bool LAYER, int N, bool CG, bool XH = false>
__device__ __forceinline__ void norm_reg_row(float *orow, float *xr, const float *ar, const float *w, const float *b,
                                             int64_t dim, float eps, float *sh, uint8_t *xh = nullptr, int kind = 0) {
  float v[N];
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < N; j++) {
    const int64_t i = threadIdx.x + (int64_t)j * NORM_THREADS;
    v[j] = 0.f;
    if (i < dim) {
      v[j] = norm_ld<CG>(xr + i);
      if (ar) v[j] += norm_ld<CG>(ar + i);
    }
  }
#pragma unroll
  for (int j = 0; j < N; j++) {
    const int64_t i = threadIdx.x + (int64_t)j * NORM_THREADS;
    if (i < dim) {
      if (ar) xr[i] = v[j];
      s += v[j];
    }
  }
  float mean = 0.f;
  if (LAYER) mean = block_sum(s, sh) / (float)dim;
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < N; j++) {
    const int64_t i = threadIdx.x + (int64_t)j * NORM_THREADS;
    if (i < dim) {
      float d = v[j] - mean;
      ss += d * d;
    }
  }
  float var = block_sum(ss, sh) / (float)dim;
  float r = rsqrtf(var + eps);
#pragma unroll
  for (int j = 0; j < N; j++) {
    const int64_t i = threadIdx.x + (int64_t)j * NORM_THREADS;
    if (i < dim) {
      float o = (v[j] - mean) * r;
      if (w) o *= w[i];
      if (b) o += b[i];
      orow[i] = o;
      v[j] = o;
    }
  }
  if constexpr (XH) {
    // dec16_pack_chunk's work with the per-lane part hoisted out of the j loop
    // (device run 1: the generic call per element cost ~50 instructions per
    // thread per j in this single-CTA kernel: ~0.9 us at dim 4096). The same
    // scale, product and rounding: the same bits (decode_emu_test
    // test_norm_xh compares with the float path).
    static_assert(NORM_THREADS % 32 == 0, "whole warps per chunk");
    constexpr int CPJ = NORM_THREADS / 32; // chunks per j
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nch = (int)(dim / 32);
    uint16_t *hb = reinterpret_cast<uint16_t *>(xh + warp * 64) + dec16_xh_index(kind, lane);
    float *ib = reinterpret_cast<float *>(xh + nch * 64) + warp;
#pragma unroll
    for (int j = 0; j < N; j++) {
      if (warp + j * CPJ < nch) { // the warp's chunk: uniform
        uint32_t mx = dec16_absbits(v[j]);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        mx = __reduce_max_sync(0xffffffffu, mx);
#else
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
#endif
        float sc, inv;
        dec16_chunk_scale(mx, sc, inv);
        hb[j * CPJ * 32] = (uint16_t)(dec16_f2h2(v[j] * sc, 0.f) & 0xFFFFu);
        if (lane == 0) ib[j * CPJ] = inv;
      }
    }
  }
}
