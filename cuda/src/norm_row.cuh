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
// thread of the CTA calls it (block reductions).
template <bool LAYER, int N, bool CG>
__device__ __forceinline__ void norm_reg_row(float *orow, float *xr, const float *ar, const float *w, const float *b,
                                             int64_t dim, float eps, float *sh) {
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
    }
  }
}
