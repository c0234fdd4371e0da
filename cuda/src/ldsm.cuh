// ldsm.cuh — ldmatrix.sync.aligned.m8n8.x4.shared.b16, shared by the
// attention kernel (attention_fa.cuh) and the grouped MoE GEMM v3
// (moe_gemm.cuh), with its semantics in the CPU emulation (cuda_emu.h,
// ORCH_EMU): lanes 8i .. 8i + 7 give the row addresses of matrix i (16-byte
// rows of 8 16-bit elements, 16-byte aligned); lane l gets, of matrix i, row
// l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 (low half: the first) in r[i].
// Self-contained (no common.cuh) because the attention emulation test
// includes attention_fa.cuh on its own.
#pragma once
#include <stdint.h>

__device__ __forceinline__ void orch_ldsm_x4(uint32_t r[4], const void *p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#elif defined(ORCH_EMU)
  const int lane = threadIdx.x & 31;
  for (int i = 0; i < 4; i++) {
    const unsigned char *rp = (const unsigned char *)__shfl_sync(0xffffffffu, (long long)p, i * 8 + lane / 4);
    std::memcpy(&r[i], rp + 4 * (lane % 4), 4);
  }
#endif
}
