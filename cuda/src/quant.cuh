// quant.cuh — GGUF block layouts (exactly llama.cpp's) and dequantization of
// one 32-element chunk of a row, the unit every matmul/get_rows kernel uses.
// Chunk c of a row covers elements [32c, 32c+32).
#pragma once
#include "common.cuh"

struct blk_q4_0 { __half d; uint8_t qs[16]; };                 // 18 B / 32
struct blk_q8_0 { __half d; int8_t qs[32]; };                  // 34 B / 32
struct blk_mxfp4 { uint8_t e; uint8_t qs[16]; };               // 17 B / 32
struct blk_q4_K { __half d; __half dmin; uint8_t scales[12]; uint8_t qs[128]; };  // 144 B / 256
struct blk_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; __half d; }; // 210 B / 256

static_assert(sizeof(blk_q4_0) == 18, "q4_0");
static_assert(sizeof(blk_q8_0) == 34, "q8_0");
static_assert(sizeof(blk_mxfp4) == 17, "mxfp4");
static_assert(sizeof(blk_q4_K) == 144, "q4_K");
static_assert(sizeof(blk_q6_K) == 210, "q6_K");

// Elements per block and bytes per block of each type.
__host__ __device__ constexpr int type_block_elems(int t) {
  return (t == ORCH_T_Q4_K || t == ORCH_T_Q6_K) ? 256 : (t == ORCH_T_F32 || t == ORCH_T_F16 || t == ORCH_T_BF16) ? 1 : 32;
}
__host__ __device__ constexpr int type_block_bytes(int t) {
  return t == ORCH_T_F32 ? 4 : t == ORCH_T_F16 ? 2 : t == ORCH_T_BF16 ? 2 : t == ORCH_T_Q4_0 ? 18
       : t == ORCH_T_Q8_0 ? 34 : t == ORCH_T_MXFP4 ? 17 : t == ORCH_T_Q4_K ? 144 : t == ORCH_T_Q6_K ? 210 : 0;
}

static inline bool type_known(int t) { return type_block_bytes(t) != 0; }

// E2M1 value of a nibble, times 2: {0,1,2,3,4,6,8,12} packed in one word
// (a register lookup; an indexed local array would spill to local memory).
__device__ __forceinline__ float e2m1x2(int q) {
  float m = (float)((0xC8643210u >> (4 * (q & 7))) & 0xF);
  return (q & 8) ? -m : m;
}

// 2^(e-127) for an E8M0 byte (e=0 → 2^-127 subnormal; 255 is NaN in OCP, treat as 2^128 → inf like ggml's bit trick).
__device__ __forceinline__ float e8m0(uint8_t e) {
  uint32_t bits = e == 0 ? 0x00400000u : ((uint32_t)e << 23);
  return __uint_as_float(bits);
}

__device__ __forceinline__ void q4k_scale_min(int j, const uint8_t *q, int &d, int &m) {
  if (j < 4) {
    d = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Dequantizes chunk c of a row starting at row (bytes) into v[32].
template <int T>
__device__ __forceinline__ void dequant_chunk(const uint8_t *__restrict__ row, int64_t c, float *v) {
  if constexpr (T == ORCH_T_F32) {
    const float4 *p = reinterpret_cast<const float4 *>(row) + c * 8;
#pragma unroll
    for (int i = 0; i < 8; i++) {
      float4 f = p[i];
      v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
    }
  } else if constexpr (T == ORCH_T_F16) {
    const uint4 *p = reinterpret_cast<const uint4 *>(row) + c * 4;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      uint4 u = p[i];
      const __half2 *h = reinterpret_cast<const __half2 *>(&u);
#pragma unroll
      for (int j = 0; j < 4; j++) {
        float2 f = __half22float2(h[j]);
        v[8 * i + 2 * j] = f.x; v[8 * i + 2 * j + 1] = f.y;
      }
    }
  } else if constexpr (T == ORCH_T_BF16) {
    const uint4 *p = reinterpret_cast<const uint4 *>(row) + c * 4;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      uint4 u = p[i];
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int j = 0; j < 4; j++) {
        v[8 * i + 2 * j] = __uint_as_float(w[j] << 16);
        v[8 * i + 2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
      }
    }
  } else if constexpr (T == ORCH_T_Q8_0) {
    const blk_q8_0 *b = reinterpret_cast<const blk_q8_0 *>(row) + c;
    float d = __half2float(b->d);
#pragma unroll
    for (int j = 0; j < 32; j++) v[j] = d * (float)b->qs[j];
  } else if constexpr (T == ORCH_T_Q4_0) {
    const blk_q4_0 *b = reinterpret_cast<const blk_q4_0 *>(row) + c;
    float d = __half2float(b->d);
#pragma unroll
    for (int j = 0; j < 16; j++) {
      uint8_t q = b->qs[j];
      v[j] = d * (float)((int)(q & 0xF) - 8);
      v[j + 16] = d * (float)((int)(q >> 4) - 8);
    }
  } else if constexpr (T == ORCH_T_MXFP4) {
    const blk_mxfp4 *b = reinterpret_cast<const blk_mxfp4 *>(row) + c;
    float d = 0.5f * e8m0(b->e);
#pragma unroll
    for (int j = 0; j < 16; j++) {
      uint8_t q = b->qs[j];
      v[j] = d * e2m1x2(q & 0xF);
      v[j + 16] = d * e2m1x2(q >> 4);
    }
  } else if constexpr (T == ORCH_T_Q4_K) {
    const blk_q4_K *b = reinterpret_cast<const blk_q4_K *>(row) + (c >> 3);
    int sub = (int)(c & 7);
    int sc, mn;
    q4k_scale_min(sub, b->scales, sc, mn);
    float d = __half2float(b->d) * sc, m = __half2float(b->dmin) * mn;
    const uint8_t *q = b->qs + 32 * (sub >> 1);
    int shift = (sub & 1) * 4;
#pragma unroll
    for (int l = 0; l < 32; l++) v[l] = d * (float)((q[l] >> shift) & 0xF) - m;
  } else if constexpr (T == ORCH_T_Q6_K) {
    const blk_q6_K *b = reinterpret_cast<const blk_q6_K *>(row) + (c >> 3);
    int sub = (int)(c & 7), h = sub >> 2, g = sub & 3;
    const uint8_t *ql = b->ql + 64 * h + ((g & 1) ? 32 : 0);
    const uint8_t *qh = b->qh + 32 * h;
    const int8_t *sc = b->scales + 8 * h + 2 * g;
    int lshift = (g >> 1) * 4, hshift = 2 * g;
    float d = __half2float(b->d);
#pragma unroll
    for (int l = 0; l < 32; l++) {
      int q = (int)(((ql[l] >> lshift) & 0xF) | (((qh[l] >> hshift) & 3) << 4)) - 32;
      v[l] = d * (float)sc[l / 16] * (float)q;
    }
  }
}

// Dot of one Q8_0 / Q4_0 / MXFP4 block (raw bytes b, in registers) with 32
// floats xs (shared memory, 16-byte aligned): the GEMV v3 / fused-MoE unit.
template <int T>
__device__ __forceinline__ float block_scale(const uint8_t *b) {
  if constexpr (T == ORCH_T_MXFP4) return 0.5f * e8m0(b[0]);
  else return __half2float(__ushort_as_half((unsigned short)(b[0] | (b[1] << 8))));
}

template <int T>
__device__ __forceinline__ float block_dot(const uint8_t *b, const float *xs) {
  const float d = block_scale<T>(b);
  float s = 0.f;
  if constexpr (T == ORCH_T_Q8_0) {
#pragma unroll
    for (int i = 0; i < 8; i++) {
      float4 xv = *reinterpret_cast<const float4 *>(xs + 4 * i);
      s += (float)(int8_t)b[2 + 4 * i] * xv.x + (float)(int8_t)b[3 + 4 * i] * xv.y +
           (float)(int8_t)b[4 + 4 * i] * xv.z + (float)(int8_t)b[5 + 4 * i] * xv.w;
    }
  } else {
    constexpr int off = T == ORCH_T_MXFP4 ? 1 : 2;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      float4 lo = *reinterpret_cast<const float4 *>(xs + 4 * i);
      float4 hi = *reinterpret_cast<const float4 *>(xs + 16 + 4 * i);
      float ql[4], qh[4];
#pragma unroll
      for (int j = 0; j < 4; j++) {
        int q = b[off + 4 * i + j];
        if constexpr (T == ORCH_T_MXFP4) {
          ql[j] = e2m1x2(q & 0xF);
          qh[j] = e2m1x2(q >> 4);
        } else {
          ql[j] = (float)((q & 0xF) - 8);
          qh[j] = (float)((q >> 4) - 8);
        }
      }
      s += ql[0] * lo.x + ql[1] * lo.y + ql[2] * lo.z + ql[3] * lo.w + qh[0] * hi.x + qh[1] * hi.y + qh[2] * hi.z +
           qh[3] * hi.w;
    }
  }
  return d * s;
}

// Register-prefetch helpers of GEMV v4 and the fused MoE FFN (moe_ffn.cu).
// A block is loaded with aligned 32-bit loads of the words that cover it
// (MXFP4 17 B -> 5 words, Q4_0 18 B (2-aligned) -> 5, Q8_0 34 B (2-aligned)
// -> 9) and its bytes are extracted with funnel shifts: a first version
// loaded byte by byte (one register per byte), which capped the warps per SM
// and so the bytes in flight. The last word may extend up to 3 bytes past
// the block, never past the aligned word holding its last byte.
// (session 12) Q8_0 rows repacked after the original ones (ORCH_T_Q8_0_DUAL, weight_rp.cuh): the template type of
// GEMV v5's kernels on them (never a type code of the C ABI). A block's 32 quants (each XOR 0x80) are 8 aligned
// words at row + 32 c, its fp16 scale at row + 32 nch + 2 c: wblocks holds the words and the scale in sh.
#ifndef ORCH_T_Q8_0R_DECL
#define ORCH_T_Q8_0R_DECL
constexpr int ORCH_T_Q8_0R = 208;
#endif
// The repacked layouts of ORCH_T_MXFP4_DUAL / ORCH_T_Q8_0_DUAL (t: ORCH_T_MXFP4 or ORCH_T_Q8_0, k % 32 == 0): the
// bytes of a repacked row of k elements (the blocks' 16 / 32 quant bytes, then the 1- / 2-byte scales padded to 16)
// and where the repacked rows of a rows x k tensor start (its original rows' size rounded up to 256).
__host__ __device__ inline int64_t rp_row_bytes(int t, int64_t k) {
  const int64_t nch = k / 32, sb = t == ORCH_T_Q8_0 ? 2 : 1;
  return 16 * sb * nch + ((sb * nch + 15) & ~(int64_t)15);
}
__host__ __device__ inline int64_t rp_offset(int t, int64_t rows, int64_t k) {
  return (rows * (k / 32) * type_block_bytes(t) + 255) & ~(int64_t)255;
}
// The entries' type check: the type becomes Q8_0 for every check and path; true: it was ORCH_T_Q8_0_DUAL.
inline bool q8_dual(int32_t &wtype) {
  if (wtype != ORCH_T_Q8_0_DUAL) return false;
  wtype = ORCH_T_Q8_0;
  return true;
}
template <int T> __host__ __device__ constexpr bool q8_like() { return T == ORCH_T_Q8_0 || T == ORCH_T_Q8_0R; }
template <int T> __host__ __device__ constexpr int block_words() {
  return T == ORCH_T_Q8_0 ? 9 : T == ORCH_T_Q8_0R ? 8 : 5;
}
template <int T, int NB> struct wblocks {
  uint32_t w[NB][block_words<T>()];
  uint32_t sh[NB]; // byte offset of the block in its first word
};

// Loads NB blocks of row wr for this lane: chunks c0 + lane + 32 i (zeros
// past the row, from chunk lim on, or when !valid).
template <int T, int NB>
__device__ __forceinline__ void ffn_load(wblocks<T, NB> &b, const uint8_t *__restrict__ wr, int64_t c0, int lane,
                                         int64_t nch, bool valid, int64_t lim = INT64_MAX) {
  if constexpr (T == ORCH_T_Q8_0R) {
#pragma unroll
    for (int i = 0; i < NB; i++) {
      const int64_t c = c0 + lane + 32 * i;
      const bool ok = valid && c < nch && c < lim;
      const uint4 *q = reinterpret_cast<const uint4 *>(wr + 32 * (ok ? c : 0));
      const uint4 z = make_uint4(0u, 0u, 0u, 0u), a = ok ? __ldg(q) : z, d = ok ? __ldg(q + 1) : z;
      b.w[i][0] = a.x, b.w[i][1] = a.y, b.w[i][2] = a.z, b.w[i][3] = a.w;
      b.w[i][4] = d.x, b.w[i][5] = d.y, b.w[i][6] = d.z, b.w[i][7] = d.w;
      b.sh[i] = ok ? (uint32_t)__ldg(reinterpret_cast<const unsigned short *>(wr + 32 * nch) + c) : 0u;
    }
    return;
  }
  constexpr int BB = type_block_bytes(T);
#pragma unroll
  for (int i = 0; i < NB; i++) {
    const int64_t c = c0 + lane + 32 * i;
    const bool ok = valid && c < nch && c < lim;
    const uintptr_t p = (uintptr_t)(wr + (ok ? c : 0) * BB);
    b.sh[i] = (uint32_t)(p & 3);
    const uint32_t *q = reinterpret_cast<const uint32_t *>(p & ~(uintptr_t)3);
#pragma unroll
    for (int j = 0; j < block_words<T>(); j++) b.w[i][j] = ok ? __ldg(q + j) : 0u;
  }
}

// Dot of the block held in words w (starting sh bytes into w[0]) with xs[32].
template <int T>
__device__ __forceinline__ float wblock_dot(const uint32_t *w, uint32_t sh, const float *xs) {
  float s = 0.f, d;
  if constexpr (T == ORCH_T_Q8_0) {
    d = __half2float(__ushort_as_half((unsigned short)(__funnelshift_r(w[0], w[1], 8 * sh) & 0xffffu)));
#pragma unroll
    for (int i = 0; i < 8; i++) {
      const uint32_t q = __funnelshift_rc(w[i], w[i + 1], 8 * sh + 16);
      float4 xv = *reinterpret_cast<const float4 *>(xs + 4 * i);
      s += (float)(int8_t)(q & 0xff) * xv.x + (float)(int8_t)((q >> 8) & 0xff) * xv.y +
           (float)(int8_t)((q >> 16) & 0xff) * xv.z + (float)(int8_t)(q >> 24) * xv.w;
    }
  } else {
    constexpr uint32_t off = T == ORCH_T_MXFP4 ? 8 : 16; // bits before qs
    if constexpr (T == ORCH_T_MXFP4) d = 0.5f * e8m0((uint8_t)((w[0] >> (8 * sh)) & 0xffu));
    else d = __half2float(__ushort_as_half((unsigned short)(__funnelshift_r(w[0], w[1], 8 * sh) & 0xffffu)));
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const uint32_t q = __funnelshift_rc(w[i], w[i + 1], 8 * sh + off);
      float4 lo = *reinterpret_cast<const float4 *>(xs + 4 * i);
      float4 hi = *reinterpret_cast<const float4 *>(xs + 16 + 4 * i);
      float ql[4], qh[4];
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const int v = (int)((q >> (8 * j)) & 0xffu);
        if constexpr (T == ORCH_T_MXFP4) {
          ql[j] = e2m1x2(v & 0xF);
          qh[j] = e2m1x2(v >> 4);
        } else {
          ql[j] = (float)((v & 0xF) - 8);
          qh[j] = (float)((v >> 4) - 8);
        }
      }
      s += ql[0] * lo.x + ql[1] * lo.y + ql[2] * lo.z + ql[3] * lo.w + qh[0] * hi.x + qh[1] * hi.y + qh[2] * hi.z +
           qh[3] * hi.w;
    }
  }
  return d * s;
}

template <int T, int NB>
__device__ __forceinline__ float ffn_dot(const wblocks<T, NB> &b, const float *xs, int64_t c0, int lane, int64_t nch) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < NB; i++) {
    const int64_t c = c0 + lane + 32 * i;
    if (c < nch) s += wblock_dot<T>(b.w[i], b.sh[i], xs + c * 36);
  }
  return s;
}

// Copies rows x[r*k .. r*k+k) for r in [0, nr) to xs padded to 36 floats per 32.
__device__ __forceinline__ void ffn_stage(float *xs, const float *__restrict__ x, int nr, int64_t k) {
  const int64_t xstride = k / 32 * 36;
  for (int r = 0; r < nr; r++)
    for (int64_t i = threadIdx.x; i < k / 4; i += blockDim.x) {
      int64_t c = i / 8, o = (i % 8) * 4;
      *reinterpret_cast<float4 *>(xs + r * xstride + c * 36 + o) = __ldg(reinterpret_cast<const float4 *>(x + r * k) + i);
    }
}

// Dispatches a templated functor over the supported weight types.
#define ORCH_DISPATCH_TYPE(t, F, ...)                     \
  switch (t) {                                            \
    case ORCH_T_F32: F<ORCH_T_F32>(__VA_ARGS__); break;   \
    case ORCH_T_F16: F<ORCH_T_F16>(__VA_ARGS__); break;   \
    case ORCH_T_BF16: F<ORCH_T_BF16>(__VA_ARGS__); break; \
    case ORCH_T_Q8_0: F<ORCH_T_Q8_0>(__VA_ARGS__); break; \
    case ORCH_T_Q4_0: F<ORCH_T_Q4_0>(__VA_ARGS__); break; \
    case ORCH_T_MXFP4: F<ORCH_T_MXFP4>(__VA_ARGS__); break; \
    case ORCH_T_Q4_K: F<ORCH_T_Q4_K>(__VA_ARGS__); break; \
    case ORCH_T_Q6_K: F<ORCH_T_Q6_K>(__VA_ARGS__); break; \
    default: break;                                       \
  }
