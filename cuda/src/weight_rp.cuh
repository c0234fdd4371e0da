// weight_rp.cuh — (session 12) weights repacked at load time for the one-token GEMVs, included by moe_ffn.cu after
// moe6_mxfp4_word: MXFP4 experts for MoE v10's gate_up10 / down10 (below), Q8_0 matrices for GEMV v5 (the layout at
// the end; quant.cuh ORCH_T_Q8_0R, dec16.cuh dec16_q8_0_word_x). orch_weight_repack fills either copy.
//
// Why: a GGUF MXFP4 block is 17 bytes (an E8M0 scale, then 16 bytes of nibbles), so a lane's block starts at any
// byte: gate_up10 / down10 load it as 5 aligned 32-bit words and funnel-shift every quant word out (session 9's
// ncu: 71% of the L1 -> L2 sectors "excessive", 92 SASS instructions a block). Repacked, a row keeps its nibbles as
// 16-byte aligned blocks and its scales apart: one 16-byte load and one byte load a block, no funnel shift, and each
// quant word stored with its 32 bits permuted so that the fp16 pairs moe6_mxfp4_word makes come out in 9 integer
// instructions instead of 12 (mxfp4_rp_word: one rotate, one select, four masks, three shifts; a search over
// shift / rotate / select / mask programs found none cheaper: no 4 shifts of the mask 0x8E008E00 tile 32 bits).
// The decoded halves are moe6_mxfp4_word's of the original word, so every HFMA2 — and the op's output — is v10's
// bit for bit (cuda/test/moe_emu_test.cpp).
//
// Layout (ORCH_T_MXFP4_DUAL, orch_cuda.h): the tensor's original rows (rows * k/32 * 17 bytes), then, from the next
// multiple of 256 bytes (quant.cuh rp_offset), the repacked rows (rp_row_bytes): nch = k/32 blocks of 16 bytes
// (quant word i of a block = mxfp4_rp_encode(original word i)), then the nch scale bytes, padded to 16 bytes.
#pragma once
#include <stdint.h>

#define ORCH_WEIGHT_RP 1

// Repacked word -> h[0..3] (moe6_mxfp4_word's pairs): h0 = q & M, h1 = (q << 3) & M, with s = the bits K of q and
// the others of q rotated left by 4, h2 = (s << 2) & M, h3 = (s << 9) & M (M = 0x8E008E00: each half's sign and
// three magnitude bits, as moe6_mxfp4_word places them).
constexpr uint32_t MXFP4_RP_M = 0x8E008E00u;
constexpr uint32_t MXFP4_RP_K = 0x20032003u; // the select mask (found with the shifts by the search above)
constexpr int MXFP4_RP_R = 4;                // the rotate
DEC16_HD void mxfp4_rp_word(uint32_t q, uint32_t h[4]) {
  const uint32_t s = moe6_sel(q, moe6_rotl(q, MXFP4_RP_R), MXFP4_RP_K);
  h[0] = q & MXFP4_RP_M;
  h[1] = (q << 3) & MXFP4_RP_M;
  h[2] = (s << 2) & MXFP4_RP_M;
  h[3] = (s << 9) & MXFP4_RP_M;
}

// The bit of the repacked word that bit p (in M) of h[j] comes from.
DEC16_HD int mxfp4_rp_src(int j, int p) {
  if (j == 0) return p;
  if (j == 1) return p - 3;
  const int t = j == 2 ? p - 2 : p - 9; // bit t of s
  return ((MXFP4_RP_K >> t) & 1u) ? t : (t - MXFP4_RP_R + 32) % 32;
}

// Original MXFP4 quant word -> its repacked word (mxfp4_rp_word(mxfp4_rp_encode(q)) = moe6_mxfp4_word(q)).
DEC16_HD uint32_t mxfp4_rp_encode(uint32_t q) {
  uint32_t h[4], r = 0;
  moe6_mxfp4_word(q, h);
  for (int j = 0; j < 4; j++)
    for (int p = 0; p < 32; p++)
      if ((MXFP4_RP_M >> p) & 1u) r |= ((h[j] >> p) & 1u) << mxfp4_rp_src(j, p);
  return r;
}

#if defined(__CUDACC__) || defined(ORCH_EMU)
// One thread per block: src's block (row, c) -> dst's (16 nibble bytes re-encoded, scale byte apart).
__global__ void mxfp4_repack_kernel(uint8_t *__restrict__ dst, const uint8_t *__restrict__ src, int64_t rows,
                                   int64_t k) {
  const int64_t nch = k / 32, rbr = rp_row_bytes(ORCH_T_MXFP4, k);
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * nch) return;
  const int64_t row = i / nch, c = i % nch;
  const uint8_t *b = src + (row * nch + c) * 17;
  uint32_t w[4];
  for (int j = 0; j < 4; j++)
    w[j] = mxfp4_rp_encode((uint32_t)b[1 + 4 * j] | (uint32_t)b[2 + 4 * j] << 8 | (uint32_t)b[3 + 4 * j] << 16 |
                           (uint32_t)b[4 + 4 * j] << 24);
  uint8_t *d = dst + row * rbr;
  *reinterpret_cast<uint4 *>(d + 16 * c) = make_uint4(w[0], w[1], w[2], w[3]);
  d[16 * nch + c] = b[0];
  if (c == 0)
    for (int64_t p = nch; p < rbr - 16 * nch; p++) d[16 * nch + p] = 0; // the padding: defined bytes
}

// A lane's NB repacked blocks of a row (chunks c0 + lane + 32 i; zeros past the row or when !valid).
template <int NB> struct rpblocks {
  uint4 q[NB];
  uint32_t e[NB]; // the E8M0 scale byte
};
template <int NB>
__device__ __forceinline__ void rp_load(rpblocks<NB> &b, const uint8_t *__restrict__ wr, int c0, int lane, int nch,
                                        bool valid) {
#pragma unroll
  for (int i = 0; i < NB; i++) {
    const int c = c0 + lane + 32 * i;
    const bool ok = valid && c < nch;
    b.q[i] = ok ? __ldg(reinterpret_cast<const uint4 *>(wr) + c) : make_uint4(0u, 0u, 0u, 0u);
    b.e[i] = ok ? (uint32_t)__ldg(wr + 16 * (int64_t)nch + c) : 0u;
  }
}
// moe6_block_acc<ORCH_T_MXFP4>'s HFMA2s (same order) on a repacked block.
DEC16_HD void rp_block_acc(const uint4 &q, const uint4 *xh, uint32_t a[2]) {
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    uint32_t h[4];
    mxfp4_rp_word(w[i], h);
    moe6_hfma4(h, xh[i], a[i & 1]);
  }
}
#endif

// Q8_0 (ORCH_T_Q8_0_DUAL): why — a Q8_0 block is 34 bytes (fp16 scale + 32 int8), so GEMV v5 loads it as 9 aligned
// words and funnel-shifts each of its 8 quant words out, then XORs them with 0x80 for the fp16 trick
// (dec16_q8_0_word). Repacked: a row's blocks as 32-byte aligned quants already XOR 0x80 (two 16-byte loads, no
// funnel shift, no XOR), the fp16 scales after them (quant.cuh rp_row_bytes). Same products: bit for bit.
#if defined(__CUDACC__) || defined(ORCH_EMU)
__global__ void q8_repack_kernel(uint8_t *__restrict__ dst, const uint8_t *__restrict__ src, int64_t rows, int64_t k) {
  const int64_t nch = k / 32, rbr = rp_row_bytes(ORCH_T_Q8_0, k);
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * nch) return;
  const int64_t row = i / nch, c = i % nch;
  const uint8_t *b = src + (row * nch + c) * 34;
  uint8_t *d = dst + row * rbr;
  for (int j = 0; j < 32; j++) d[32 * c + j] = (uint8_t)(b[2 + j] ^ 0x80u);
  d[32 * nch + 2 * c] = b[0];
  d[32 * nch + 2 * c + 1] = b[1];
  if (c == 0)
    for (int64_t p = 34 * nch; p < rbr; p++) d[p] = 0; // the padding after the scales: defined bytes
}
#endif

// Fills the repacked half of an ORCH_T_MXFP4_DUAL or ORCH_T_Q8_0_DUAL tensor (orch_cuda.h).
extern "C" int orch_weight_repack(orch_ctx *ctx, void *dst, const void *src, int32_t wtype, int64_t rows, int64_t k) {
  const char *op = "weight_repack";
  ORCH_CHECK_ARG(ctx && dst && src && rows > 0 && k > 0 && k % 32 == 0 && aligned16p(dst), op);
  ORCH_CHECK_ARG(wtype == ORCH_T_MXFP4 || wtype == ORCH_T_Q8_0, op);
  const int64_t blocks = rows * (k / 32);
  if (wtype == ORCH_T_MXFP4)
    DEC16_LAUNCH(mxfp4_repack_kernel, dim3((unsigned)((blocks + 255) / 256)), 256, 0, ctx->stream, (uint8_t *)dst,
                 (const uint8_t *)src, rows, k);
  else
    DEC16_LAUNCH(q8_repack_kernel, dim3((unsigned)((blocks + 255) / 256)), 256, 0, ctx->stream, (uint8_t *)dst,
                 (const uint8_t *)src, rows, k);
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}

#if defined(__CUDACC__) || defined(ORCH_EMU)
// moe6_dot2 / moe10_dot's block access (moe_ffn.cu) on repacked blocks.
template <int NB>
__device__ __forceinline__ void moe6_bacc(const rpblocks<NB> &b, int i, const uint4 *xp, uint32_t a[2]) {
  rp_block_acc(b.q[i], xp, a);
}
template <int NB> __device__ __forceinline__ float moe6_bscale(const rpblocks<NB> &b, int i) {
  return dec16_e8m0(b.e[i]);
}
#endif
