// dec16.cuh — fp16 decode of GGUF weight blocks for the decode GEMVs (GEMV v5,
// MoE v3): weights are turned into fp16 pairs with a few integer
// instructions and multiplied by x staged in fp16 with HFMA2 (2 MACs per
// instruction), short fp16 partial sums folded into fp32 per block.
//
// Why: the fp32 path decoded each MXFP4 element with ~7 instructions, one of
// them an int->float conversion (I2F runs at 16/clk/SM on sm_90, 1/8 of the
// issue rate), so the expert GEMVs were bound by instruction issue, not by
// memory (docs/perf-cuda.md, "Round 3"). Activations stay 16-bit floats, not
// int8 (design brief: int8 activations move logits 1-20%).
//
// Everything here is __host__ __device__ with a portable host fallback for
// each PTX instruction it uses (prmt, fma.rn.f16x2, ...), so the bit tricks
// are tested exhaustively on the host (cuda/test/dec16_test.cu); nothing is
// hand-derived from an undocumented fragment layout.
//
// x staging ("xh"): each 32-element chunk of x is scaled by a power of two
// 2^-E (E = exponent of the chunk's max |x|, so the scaled max is in [1, 2);
// exact, and no fp16 overflow or underflow whatever the magnitude of x),
// rounded to fp16 (RNE) and stored as 16 half2 words in the order the
// block decoder emits pairs (dec16_xh_index); 2^E is kept as a float per chunk
// and multiplies the block result together with the weight scale.
#pragma once
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if !defined(ORCH_EMU) // cuda/test/cuda_emu.h provides uint4 and the rest
#include <vector_types.h>
#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif
#endif

// Kernel launch and dynamic shared memory, so that the kernels using this
// header also run under the CPU emulation of cuda/test/cuda_emu.h
// (cuda/test/decode_emu_test.cpp). kern must be a single token (an alias of
// a template instance: no commas).
#ifdef ORCH_EMU
#define DEC16_DYN_SMEM(type, name) type *name = reinterpret_cast<type *>(attn_tc::smem)
#define DEC16_LAUNCH(kern, grid, threads, smem, stream, ...) \
  emu_launch(grid, threads, smem, [&] { kern(__VA_ARGS__); })
#define DEC16_LAUNCH_PDL(kern, grid, threads, smem, stream, ...) \
  emu_launch_pdl(grid, threads, smem, [&] { kern(__VA_ARGS__); })
#else
#define DEC16_DYN_SMEM(type, name) extern __shared__ __align__(16) type name[]
#define DEC16_LAUNCH(kern, grid, threads, smem, stream, ...) kern<<<grid, threads, smem, stream>>>(__VA_ARGS__)
// Programmatic dependent launch (common.cuh orch_launch_pdl): only for
// kernels that call pdl_wait() before touching memory earlier kernels use.
#define DEC16_LAUNCH_PDL(kern, grid, threads, smem, stream, ...) \
  orch_launch_pdl(kern, dim3(grid), dim3(threads), (size_t)(smem), stream, __VA_ARGS__)
#endif
#include "../include/orch_cuda.h"

#if defined(__CUDACC__)
#define DEC16_HD __host__ __device__ __forceinline__
#else
#define DEC16_HD inline
#endif

// ---- portable primitives (PTX on the device, emulation on the host) ----

// prmt.b32 (default mode): byte n of the result is byte s[4n+2:4n] of {b,a}
// (a = bytes 0..3, b = bytes 4..7); if s bit 4n+3 is set, the sign (bit 7) of
// that byte is replicated over the result byte instead (PTX ISA, prmt).
DEC16_HD uint32_t dec16_prmt_host(uint32_t a, uint32_t b, uint32_t s) {
  const uint64_t v = ((uint64_t)b << 32) | a;
  uint32_t r = 0;
  for (int n = 0; n < 4; n++) {
    const uint32_t sel = (s >> (4 * n)) & 0xFu;
    uint32_t byte = (uint32_t)(v >> (8 * (sel & 7u))) & 0xFFu;
    if (sel & 8u) byte = (byte & 0x80u) ? 0xFFu : 0u;
    r |= byte << (8 * n);
  }
  return r;
}

DEC16_HD uint32_t dec16_prmt(uint32_t a, uint32_t b, uint32_t s) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s));
  return r;
#else
  return dec16_prmt_host(a, b, s);
#endif
}

// shf.r.clamp: low word of ({hi,lo} >> min(s, 32)).
DEC16_HD uint32_t dec16_funnel_rc(uint32_t lo, uint32_t hi, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_rc(lo, hi, s);
#else
  const uint32_t c = s > 32 ? 32 : s;
  return (uint32_t)((((uint64_t)hi << 32) | lo) >> c);
#endif
}

// IEEE binary16 <-> float on the host (round to nearest even, subnormals,
// overflow to inf, NaN kept): the reference the device instructions follow.
DEC16_HD float dec16_h2f_host(uint16_t h) {
  const uint32_t s = (uint32_t)(h >> 15), e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  float v;
  if (e == 0) v = ldexpf((float)m, -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = ldexpf((float)(m | 0x400u), (int)e - 25);
  return s ? -v : v;
}

// Rounds a double to the nearest binary16 (ties to even).
DEC16_HD uint16_t dec16_d2h_host(double v) {
  if (v != v) return 0x7E00u;
  uint16_t sign = 0;
  if (v < 0 || (v == 0 && signbit(v))) {
    sign = 0x8000u;
    v = -v;
  }
  if (v == 0) return sign;
  int e;
  frexp(v, &e); // v = f * 2^e, f in [0.5, 1): 11 significant bits have quantum 2^(e-11)
  int qe = e - 11;
  if (qe < -24) qe = -24; // subnormal quantum
  const double q = ldexp(1.0, qe);
  double r = nearbyint(v / q) * q; // default rounding mode: to nearest even
  if (r > 65504.0) return (uint16_t)(sign | 0x7C00u);
  // encode the now exactly representable r
  if (r < ldexp(1.0, -14)) return (uint16_t)(sign | (uint16_t)(r / ldexp(1.0, -24)));
  frexp(r, &e);
  const int E = e - 1 + 15; // r in [2^(e-1), 2^e)
  const uint32_t m = (uint32_t)(r / ldexp(1.0, e - 11)) - 0x400u;
  return (uint16_t)(sign | (uint16_t)(E << 10) | (uint16_t)m);
}

DEC16_HD uint32_t dec16_hfma2_host(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r = 0;
  for (int i = 0; i < 2; i++) {
    const int sh = 16 * i;
    // a*b + c with half inputs is exact in double; one rounding, as HFMA2.
    const double v = (double)dec16_h2f_host((uint16_t)(a >> sh)) * (double)dec16_h2f_host((uint16_t)(b >> sh)) +
                     (double)dec16_h2f_host((uint16_t)(c >> sh));
    r |= (uint32_t)dec16_d2h_host(v) << sh;
  }
  return r;
}

// d = a*b + c per half (fma.rn.f16x2; subnormals kept).
DEC16_HD uint32_t dec16_hfma2(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
#else
  return dec16_hfma2_host(a, b, c);
#endif
}

// d = a - b per half (sub.rn.f16x2); used where the result is exact.
DEC16_HD uint32_t dec16_hsub2(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
#else
  uint32_t r = 0;
  for (int i = 0; i < 2; i++) {
    const int sh = 16 * i;
    const double v = (double)dec16_h2f_host((uint16_t)(a >> sh)) - (double)dec16_h2f_host((uint16_t)(b >> sh));
    r |= (uint32_t)dec16_d2h_host(v) << sh;
  }
  return r;
#endif
}

// binary16 bits -> float.
DEC16_HD float dec16_h2f(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  return dec16_h2f_host(h);
#endif
}

// Sum of the two halves of a half2 in fp32 (both converted exactly).
DEC16_HD float dec16_h2sum(uint32_t a) { return dec16_h2f((uint16_t)(a & 0xFFFFu)) + dec16_h2f((uint16_t)(a >> 16)); }

// Two floats to a half2 (round to nearest even; lo in bits 0..15).
DEC16_HD uint32_t dec16_f2h2(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t *>(&h);
#else
  return (uint32_t)dec16_d2h_host(lo) | ((uint32_t)dec16_d2h_host(hi) << 16);
#endif
}

DEC16_HD float dec16_u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}
DEC16_HD uint32_t dec16_f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

// Tensor-core product of one warp (GEMV v7): d[0..3] += A[16x16] * B[16x8]
// with mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 (sm_80+; fp16
// inputs, products exact, fp32 accumulation). Fragments as the PTX ISA
// documents them ("Matrix Fragments for mma.m16n8k16 with floating point
// type"), lane = 4 * group + tig:
//   a[0] = A[group][2tig, 2tig+1]      a[1] = A[group+8][2tig, 2tig+1]
//   a[2] = A[group][2tig+8, 2tig+9]    a[3] = A[group+8][2tig+8, 2tig+9]
//   b[0] = B[2tig, 2tig+1][group]      b[1] = B[2tig+8, 2tig+9][group]
//   d[0], d[1] = D[group][2tig, 2tig+1]   d[2], d[3] = D[group+8][2tig, 2tig+1]
// (low half of each register = the lower column / row index). The CPU
// emulation (cuda_emu.h emu_mma_m16n8k16) gathers the fragments of the whole
// warp by exactly this table.
DEC16_HD void dec16_mma16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(ORCH_EMU)
  emu_mma_m16n8k16(d, a, b);
#elif !defined(__CUDA_ARCH__)
  (void)d, (void)a, (void)b;
  abort(); // a warp-wide instruction: no meaning in plain host code
#endif
}

// ---- weight decoders: one 32-bit word of a block's quants -> half2 pairs ----

// fp16 high bytes of the E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} (their
// low bytes are all zero): an 8-byte table for one prmt.
constexpr uint32_t DEC16_E2M1_LO = 0x3E3C3800u, DEC16_E2M1_HI = 0x46444240u;

// MXFP4 / Q4_0 word q = quant bytes 4w..4w+3 of a block; nibble i of q
// (bits 4i..4i+3) is element 4w+i/2 (i even) or 4w+16+i/2 (i odd). Outputs
// h[i] = half2(nibble i, nibble i+4), i.e. elements
//   h[0] = (4w, 4w+2), h[1] = (4w+16, 4w+18), h[2] = (4w+1, 4w+3), h[3] = (4w+17, 4w+19).
// MXFP4: 2 prmt look up 4 magnitudes each (selectors masked to 3 bits), one
// prmt per pair spreads two of them into the high bytes of a half2 (zero low
// bytes via sign-replicate of a byte whose bit 7 is 0), and one LOP3 per pair
// ORs in the two sign bits (nibble bits 4i+3 and 4i+19 -> 15 and 31).
DEC16_HD void dec16_mxfp4_word(uint32_t q, uint32_t h[4]) {
  const uint32_t m = q & 0x77777777u;
  const uint32_t lo = dec16_prmt(DEC16_E2M1_LO, DEC16_E2M1_HI, m);       // H(nibble 0..3)
  const uint32_t hi = dec16_prmt(DEC16_E2M1_LO, DEC16_E2M1_HI, m >> 16); // H(nibble 4..7)
  h[0] = dec16_prmt(lo, hi, 0x4808u) | ((q << 12) & 0x80008000u);
  h[1] = dec16_prmt(lo, hi, 0x5819u) | ((q << 8) & 0x80008000u);
  h[2] = dec16_prmt(lo, hi, 0x6828u) | ((q << 4) & 0x80008000u);
  h[3] = dec16_prmt(lo, hi, 0x7838u) | (q & 0x80008000u);
}

// Q4_0 (value = nibble - 8): same pair order as MXFP4. 0x6400 | n is the
// fp16 1024 + n; subtracting 1032 is exact.
DEC16_HD void dec16_q4_0_word(uint32_t q, uint32_t h[4]) {
#pragma unroll
  for (int i = 0; i < 4; i++) h[i] = dec16_hsub2(((q >> (4 * i)) & 0x000F000Fu) | 0x64006400u, 0x64086408u);
}

// Q8_0 word q = int8 elements 4w..4w+3 -> h[0] = (4w, 4w+1), h[1] = (4w+2, 4w+3).
// b ^ 0x80 = b + 128 in the low byte under the fp16 exponent of 1024: the
// half is 1024 + 128 + b, exact; subtracting 1152 (0x6480) is exact too.
// dec16_q8_0_word of q = v ^ 0x80808080 (the repacked rows store v).
DEC16_HD void dec16_q8_0_word_x(uint32_t v, uint32_t h[2]) {
  h[0] = dec16_hsub2(dec16_prmt(v, 0x64646464u, 0x5140u), 0x64806480u);
  h[1] = dec16_hsub2(dec16_prmt(v, 0x64646464u, 0x5342u), 0x64806480u);
}
DEC16_HD void dec16_q8_0_word(uint32_t q, uint32_t h[2]) { dec16_q8_0_word_x(q ^ 0x80808080u, h); }

// Position (half index, 0..31) of chunk element a in the staged x chunk for
// weight type kind (0: natural order (Q8_0), 1: MXFP4 / Q4_0 pair order).
DEC16_HD int dec16_xh_index(int kind, int a) {
  if (kind == 0) return a;
  const int w = (a & 15) >> 2, r = a & 3, hi = a >> 4;
  return 8 * w + 4 * (r & 1) + 2 * hi + (r >> 1);
}

// Power-of-two chunk scale from the max |x| of the chunk (its bits, any
// sign): x * scale has max in [1, 2) (clamped so both are normal floats);
// inv = 1/scale is the factor the chunk's dot is multiplied by.
DEC16_HD void dec16_chunk_scale(uint32_t maxbits, float &scale, float &inv) {
  int e = (int)((maxbits >> 23) & 0xFFu);
  e = e < 1 ? 1 : e > 253 ? 253 : e;
  scale = dec16_u2f((uint32_t)(254 - e) << 23);
  inv = dec16_u2f((uint32_t)e << 23);
}

// 2^(e-127) for an E8M0 byte (0 -> 2^-127, 255 -> inf as the fp32 path).
DEC16_HD float dec16_e8m0(uint32_t e) { return dec16_u2f(e == 0 ? 0x00400000u : (e << 23)); }

// ---- block dots ----
// Words w[0..] hold the block starting sh bytes into w[0] (GEMV v4's
// aligned-word loads); xh: the chunk's 4 staged uint4 (16 half2); xinv: its
// 1/scale. Returns scale_w * xinv * sum(w_i * x_i) in fp32.
//
// Each half2 accumulator sums 8 products per half (words 0,2 and 1,3) before
// the fold into fp32: with x scaled to [1, 2) and |E2M1| <= 6 (Q8_0: 127,
// Q4_0: 8), no partial sum can overflow fp16.
template <int T> struct dec16_traits;
template <> struct dec16_traits<ORCH_T_MXFP4> { static constexpr uint32_t off = 8; static constexpr int kind = 1; };
template <> struct dec16_traits<ORCH_T_Q4_0> { static constexpr uint32_t off = 16; static constexpr int kind = 1; };
template <> struct dec16_traits<ORCH_T_Q8_0> { static constexpr uint32_t off = 16; static constexpr int kind = 0; };
#ifndef ORCH_T_Q8_0R_DECL // (quant.cuh: the repacked Q8_0 rows of GEMV v5)
#define ORCH_T_Q8_0R_DECL
constexpr int ORCH_T_Q8_0R = 208;
#endif
template <> struct dec16_traits<ORCH_T_Q8_0R> { static constexpr uint32_t off = 0; static constexpr int kind = 0; };

template <int T>
DEC16_HD float dec16_wscale(const uint32_t *w, uint32_t sh) {
  if constexpr (T == ORCH_T_Q8_0R) return dec16_h2f((uint16_t)sh); // the scale itself (ffn_load)
  else if constexpr (T == ORCH_T_MXFP4) return dec16_e8m0((w[0] >> (8 * sh)) & 0xFFu);
  else return dec16_h2f((uint16_t)(dec16_funnel_rc(w[0], w[1], 8 * sh) & 0xFFFFu));
}

// Raw partial sums (before scales) of one block against the staged x chunks
// of nt <= NT token rows (xh[j]: 4 uint4 each): two half2 accumulators per
// token. The weight is decoded once for all tokens.
template <int T, int NT>
DEC16_HD void dec16_block_acc(const uint32_t *w, uint32_t sh, const uint4 *const *xh, int nt, uint32_t (*a)[2]) {
  constexpr uint32_t off = dec16_traits<T>::off;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    uint32_t h[4];
    if constexpr (T == ORCH_T_Q8_0R) { // aligned words, each quant already XOR 0x80
      dec16_q8_0_word_x(w[2 * i], h);
      dec16_q8_0_word_x(w[2 * i + 1], h + 2);
    } else if constexpr (T == ORCH_T_Q8_0) { // xh[.][i] covers elements 8i..8i+7 = quant words 2i, 2i+1
      dec16_q8_0_word(dec16_funnel_rc(w[2 * i], w[2 * i + 1], 8 * sh + off), h);
      dec16_q8_0_word(dec16_funnel_rc(w[2 * i + 1], w[2 * i + 2], 8 * sh + off), h + 2);
    } else {
      const uint32_t q = dec16_funnel_rc(w[i], w[i + 1], 8 * sh + off);
      if constexpr (T == ORCH_T_MXFP4) dec16_mxfp4_word(q, h);
      else dec16_q4_0_word(q, h);
    }
#pragma unroll
    for (int j = 0; j < NT; j++) {
      if (j < nt) {
        const uint4 x = xh[j][i];
        uint32_t &acc = a[j][i & 1];
        acc = dec16_hfma2(h[0], x.x, acc);
        acc = dec16_hfma2(h[1], x.y, acc);
        acc = dec16_hfma2(h[2], x.z, acc);
        acc = dec16_hfma2(h[3], x.w, acc);
      }
    }
  }
}

// Fold of a token's two accumulators times the weight and x scales.
DEC16_HD float dec16_fold(const uint32_t a[2], float wscale, float xinv) {
  return wscale * xinv * (dec16_h2sum(a[0]) + dec16_h2sum(a[1]));
}

template <int T>
DEC16_HD float dec16_block_dot(const uint32_t *w, uint32_t sh, const uint4 *xh, float xinv) {
  uint32_t a[1][2] = {{0u, 0u}};
  const uint4 *xp[1] = {xh};
  dec16_block_acc<T, 1>(w, sh, xp, 1, a);
  return dec16_fold(a[0], dec16_wscale<T>(w, sh), xinv);
}

// ---- x staging ----
// Staged chunk: DEC16_XW u32 words (16 used: 16 half2; padded so that lanes
// reading consecutive chunks with 16-byte loads hit distinct banks).
constexpr int DEC16_XW = 20;

// Places 4 consecutive elements 4o..4o+3 (o = 0..7) of a chunk, already
// scaled, into the chunk's words (kind as dec16_xh_index).
DEC16_HD void dec16_put4(uint32_t *chunk, int kind, int o, float v0, float v1, float v2, float v3) {
  if (kind == 0) {
    chunk[2 * o] = dec16_f2h2(v0, v1);
    chunk[2 * o + 1] = dec16_f2h2(v2, v3);
  } else {
    const int w = o & 3, hi = o >> 2;
    chunk[4 * w + hi] = dec16_f2h2(v0, v2);
    chunk[4 * w + 2 + hi] = dec16_f2h2(v1, v3);
  }
}

DEC16_HD uint32_t dec16_absbits(float f) { return dec16_f2u(f) & 0x7FFFFFFFu; }

#if defined(__CUDACC__) || defined(ORCH_EMU)
// Stages nr rows of x (row r at x + r*k; k % 32 == 0, x 16-byte aligned)
// for the whole CTA: row r's chunk c at xh + (r*nch + c)*DEC16_XW, its 1/scale
// at xinv[r*nch + c]. Groups of 8 lanes own one chunk (max by shuffles);
// every lane of a warp runs the same iterations. Caller syncs.
__device__ __forceinline__ void dec16_stage(uint32_t *xh, float *xinv, const float *__restrict__ x, int nr,
                                            int64_t k, int kind) {
  const int64_t nch = k / 32, nq = k / 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int r = 0; r < nr; r++)
    for (int64_t base = (int64_t)warp * 32; base < nq; base += (int64_t)nw * 32) {
      const int64_t i = base + lane;
      const bool ok = i < nq;
      const float4 v = ok ? __ldg(reinterpret_cast<const float4 *>(x + r * k) + i) : make_float4(0.f, 0.f, 0.f, 0.f);
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
#endif

// Packed x (session 7): the staged image written once by x's producer (norm.cu
// orch_rmsnorm_xh), so that the GEMV stages it with plain 16-byte copies
// (gemv16.cuh gemv5_stage_xh). Row layout: nch = k / 32 chunks of 64 bytes
// (the chunk's 16 half2 words as dec16_stage stores them, without the
// padding), then nch floats (the chunks' 1/scale); rows dec16_xh_row_bytes
// apart (16-byte multiples).
DEC16_HD size_t dec16_xh_row_bytes(int64_t k) { return ((size_t)(k / 32) * 68 + 15) & ~(size_t)15; }

#if defined(__CUDACC__) || defined(ORCH_EMU)
// One warp packs chunk c of a packed row: lane a holds element a of the
// chunk (v: the float the producer also writes to x). Same scale (integer max
// of |v| bits over the 32 elements, dec16_chunk_scale), same product and
// rounding as dec16_stage on that float: the same bits. All 32 lanes call it.
__device__ __forceinline__ void dec16_pack_chunk(uint8_t *row, int64_t nch, int64_t c, int kind, float v) {
  const int lane = threadIdx.x & 31;
  uint32_t mx = dec16_absbits(v);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  mx = __reduce_max_sync(0xffffffffu, mx); // redux.sync: one instruction for the 5 shuffle steps (same integer max)
#else
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
#endif
  float sc, inv;
  dec16_chunk_scale(mx, sc, inv);
  reinterpret_cast<uint16_t *>(row + c * 64)[dec16_xh_index(kind, lane)] = (uint16_t)(dec16_f2h2(v * sc, 0.f) & 0xFFFFu);
  if (lane == 0) reinterpret_cast<float *>(row + nch * 64)[c] = inv;
}
#endif

// Shared-memory bytes for nr staged rows of k.
static inline size_t dec16_smem(int64_t k, int nr) { return (size_t)nr * (k / 32) * (DEC16_XW * 4 + 4); }
