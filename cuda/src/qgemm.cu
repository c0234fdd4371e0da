// qgemm.cu — tensor-core GEMM over raw GGUF weights (Q8_0, Q4_0, MXFP4),
// dequantized tile by tile in shared memory (ABI 4):
//  - orch_qgemm: y[n, m] (+)= x[n, k] . W^T (+ bias), the prefill / multi-
//    stream matmul. Replaces "dequantize the whole W to bf16, then cuBLAS"
//    (matmul.cu), which wrote and re-read 2 bytes per weight element per call.
//  - orch_moe_ffn_grouped: the MoE expert FFN for many tokens: (token, slot)
//    pairs are bucketed by expert on the device (count, scan, scatter: no host
//    sync, so the op can be captured in a CUDA graph), their x rows gathered
//    in that order as bf16, then per expert one GEMM over its rows for gate and
//    up together (+ biases, clamped SwiGLU in the epilogue, bf16 activations
//    in the same order), one for down (+ bias) into a per-pair buffer, and the
//    weighted combine in a fixed order (orch_moe_combine). Each expert's
//    weights are read once per tile of up to BN pairs instead of once per pair.
//    For MXFP4 gate/up/down the two grouped GEMMs are v3 by default
//    (moe_gemm.cuh: mma.sync with the weights decoded into fragments in
//    registers); ORCH_CUDA_MOEGEMM=v1 keeps this file's kernel below.
//
// Kernel (one template for the three uses): a CTA computes a BN (A rows:
// tokens / sorted pairs) x BM (W rows) tile of the output. A is bf16 (x is
// converted once per call, n*k*2 bytes: the A tile is re-read by every CTA
// column, m/BM times, so f32 rows would double that L2 traffic). Per stage of
// KB GGUF blocks (32 k each), NS stages in flight with cp.async:
//   1. the raw bytes of the BM W row segments are copied global -> shared
//      (16-byte chunks; W rows are not 16-byte aligned, so the chunks covering
//      each segment are copied and the segment's offset kept; the chunk at
//      the tensor's end copies only the bytes inside it), and the A tile
//      (bf16 rows, 16-byte aligned) straight into its stage buffer;
//   2. each thread dequantizes whole blocks from shared memory (32-bit word
//      reads + funnel shifts) into the bf16 W tile Ws[BM][BK+8];
//   3. warps multiply with WMMA bf16 16x16x16 fragments, fp32 accumulators
//      (documented fragment semantics; no hand-derived mma layouts).
// The epilogue goes through a per-warp 16x16 shared scratch (bias, accumulate,
// SwiGLU, ragged-edge masks). Every output element's sum runs over k in the
// same order whatever other rows share its tile.
// Precision: MXFP4 -> bf16 is exact; Q8_0 / Q4_0 blocks are rounded to bf16
// (d * q), as the cuBLAS path does; x and the MoE activations are rounded to
// bf16; sums are fp32.
//
// cuda/test/qgemm_emu_test.cpp compiles this file with g++ against a CPU
// emulation of CUDA (ORCH_EMU: fibers per thread, real barriers, WMMA as
// whole tiles, cp.async landing as late as its wait allows) and checks the
// ABI entry points against a float64 reference.
#ifndef ORCH_EMU
#include <mma.h>
#endif

#include "ldsm.cuh"
#include "qgemm.cuh"
#include "quant.cuh"

// MoE GEMM v4's TMA tiles encode a tensor map with the driver's
// cuTensorMapEncodeTiled (CUDA >= 12 headers; found with dlsym at run time).
#if !defined(ORCH_EMU) && defined(__CUDACC_VER_MAJOR__) && __CUDACC_VER_MAJOR__ >= 12
#include <cuda.h>
#include <dlfcn.h>
#define ORCH_MG4_TMA_HOST 1
#endif

#ifdef ORCH_EMU
// The test provides qg_emu_smem / qg_emu_cp_async / qg_emu_commit /
// qg_emu_wait and runs launches through emu_launch.
#define QG_DYN_SMEM(type, name) type *name = reinterpret_cast<type *>(qg_emu_smem())
#define QG_LAUNCH(kern, grid, threads, smem, stream, ...) \
  emu_launch(grid, threads, smem, [&] { kern(__VA_ARGS__); })
#else
#define QG_DYN_SMEM(type, name) extern __shared__ __align__(128) type name[]
#define QG_LAUNCH(kern, grid, threads, smem, stream, ...) kern<<<grid, threads, smem, stream>>>(__VA_ARGS__)
#endif

using namespace nvcuda;

namespace {

template <int BM_, int BN_, int WM_, int WN_, int KB_, int NS_, int THREADS_, int MINB_ = 1>
struct QCfg {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, KB = KB_, NS = NS_, THREADS = THREADS_;
  static constexpr int MINB = MINB_; // CTAs per SM the register budget must allow
  static constexpr int FM = BM / (16 * WM), FN = BN / (16 * WN);
  static constexpr int BK = 32 * KB;  // k elements per stage
  static constexpr int LDS = BK + 8;  // bf16 row stride of Ws / Xs (skews banks)
  static constexpr int WARPS = THREADS / 32;
  static_assert(FM >= 1 && FN >= 1 && FM * 16 * WM == BM && FN * 16 * WN == BN, "tile");
  static_assert(WM * WN <= WARPS, "mma warps");
  static_assert(LDS % 8 == 0, "wmma ldm of 16-bit elements: a multiple of 8 (fragment starts stay 32-byte aligned)");
  static_assert(NS >= 2, "pipeline");
};

// Tile configurations (tile argument of the ABI: 1..4; 0 picks by rows).
// S: few rows (decode of several streams, sparse experts): many CTAs, deep
//    pipeline, helper warps that only copy / dequantize.
using CfgS1 = QCfg<32, 16, 2, 1, 4, 4, 128>;   // 1, dense (FM = 1)
using CfgS2 = QCfg<64, 16, 2, 1, 4, 4, 128>;   // 1, MoE (gate/up pairing needs FM = 2)
using CfgM = QCfg<64, 64, 2, 2, 2, 3, 128>;    // 2
using CfgML = QCfg<128, 64, 4, 2, 2, 3, 256, 2>; // 3
using CfgL = QCfg<128, 128, 4, 2, 2, 4, 256>;  // 4
// 5: the grouped MoE's default above 40 pairs per expert (gpt-oss pp512: ~64
// +- 8 per expert fit one 96-row tile, where 64-row tiles need ~1.5 per
// expert and re-dequantize the expert's rows for each; device run 3: 1.11 vs
// 1.29 ms for tile 3, despite 12-20 bytes of spills at the 128-register cap).
using CfgMW = QCfg<128, 96, 4, 2, 2, 3, 256, 2>;

enum { MODE_DENSE = 0, MODE_DOWN = 1, MODE_GATE_UP = 2 };

struct QArgs {
  void *y;                      // dense: f32 [n, m]; gate_up: bf16 [pairs, m] (sorted order); down: f32 [pairs, m]
  const __nv_bfloat16 *xa;      // A rows of k (dense: token order; grouped: sorted order)
  const uint8_t *w, *w2;        // W (and, gate_up, the up W): [n_exp][m rows of k]
  const uint8_t *w_end, *w2_end;
  const float *bias, *bias2;    // [n_exp, m] or NULL
  int64_t n, k, m, rb, expert_bytes;
  int accumulate;
  // grouped: route scratch (see qgemm.cuh)
  const int32_t *exp_off, *ntiles, *sorted, *tile_e, *tile_r0;
  float alpha, limit;
};

// 16 bytes global -> shared, of which the first `bytes` are read and the rest
// zero-filled; completion by commit groups.
#ifdef ORCH_EMU
inline void cp_async16(void *smem, const void *gmem, int bytes) { qg_emu_cp_async(smem, gmem, bytes); }
inline void cp_async_commit() { qg_emu_commit(); }
template <int N>
inline void cp_async_wait() { qg_emu_wait(N); }
#else
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int bytes) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

__device__ __forceinline__ uint32_t pack_bf16(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t *>(&h);
}

// a * b on two bf16 lanes held as words.
__device__ __forceinline__ uint32_t bf162_mul(uint32_t a, uint32_t b) {
  const __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162 *>(&a), *reinterpret_cast<const __nv_bfloat162 *>(&b));
  return *reinterpret_cast<const uint32_t *>(&r);
}

// Dequantizes the block held in words w (starting sh bytes into w[0]) to 32
// bf16 at dst (16-byte aligned).
template <int T>
__device__ __forceinline__ void dequant_block_bf16(const uint32_t *w, uint32_t sh, __nv_bfloat16 *dst) {
  uint32_t o[16];
  if constexpr (T == ORCH_T_Q8_0) {
    const float d = __half2float(__ushort_as_half((unsigned short)(__funnelshift_r(w[0], w[1], 8 * sh) & 0xffffu)));
#pragma unroll
    for (int i = 0; i < 8; i++) {
      const uint32_t q = __funnelshift_rc(w[i], w[i + 1], 8 * sh + 16);
      o[2 * i] = pack_bf16(d * (float)(int8_t)(q & 0xff), d * (float)(int8_t)((q >> 8) & 0xff));
      o[2 * i + 1] = pack_bf16(d * (float)(int8_t)((q >> 16) & 0xff), d * (float)(int8_t)(q >> 24));
    }
  } else if constexpr (T == ORCH_T_MXFP4) {
    // Table lookups instead of float math (device run 2: the grouped MoE at
    // n=512 was bound by dequantization instructions): __byte_perm picks, for
    // the 4 nibbles of two qs bytes [lo(a), hi(a), lo(b), hi(b)], the low and
    // the high byte of each E2M1 magnitude's bf16 (selector = the nibbles'
    // 3 magnitude bits, masked: prmt's 4th selector bit would sign-replicate),
    // two more assemble the pairs (a, b) of the low and of the high nibbles,
    // the nibble sign bits go to bit 15 of each half, and one bf16x2 multiply
    // by 2^(E-127) scales (exact: at most 3 significant bits times a power of
    // two; E = 0, a subnormal scale, may flush to zero on the device).
    const uint32_t E = (w[0] >> (8 * sh)) & 0xffu;
    const uint32_t sb = E ? E << 7 : 0x0040u;
    const uint32_t scale = sb | (sb << 16);
    constexpr uint32_t TL0 = 0xC0800000u, TL1 = 0xC0804000u; // low bytes of bf16 {0,.5,1,1.5 | 2,3,4,6}
    constexpr uint32_t TH0 = 0x3F3F3F00u, TH1 = 0x40404040u; // high bytes
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const uint32_t q = __funnelshift_rc(w[i], w[i + 1], 8 * sh + 8); // qs bytes 4i..4i+3
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const uint32_t qq = h ? q >> 16 : q & 0xffffu; // bytes a = 4i+2h, b = a+1
        const uint32_t sel = qq & 0x7777u;
        const uint32_t lb = __byte_perm(TL0, TL1, sel), hb = __byte_perm(TH0, TH1, sel);
        // elements (a, a+1) from the low nibbles, (16+a, 17+a) from the high ones
        const uint32_t plo = __byte_perm(lb, hb, 0x6240u) | ((qq << 12) & 0x8000u) | ((qq << 20) & 0x80000000u);
        const uint32_t phi = __byte_perm(lb, hb, 0x7351u) | ((qq << 8) & 0x8000u) | ((qq << 16) & 0x80000000u);
        o[2 * i + h] = bf162_mul(plo, scale);
        o[8 + 2 * i + h] = bf162_mul(phi, scale);
      }
    }
  } else {
    constexpr uint32_t off = 16;
    const float d = __half2float(__ushort_as_half((unsigned short)(__funnelshift_r(w[0], w[1], 8 * sh) & 0xffffu)));
    float lo[16], hi[16];
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const uint32_t q = __funnelshift_rc(w[i], w[i + 1], 8 * sh + off);
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const int v = (int)((q >> (8 * j)) & 0xffu);
        lo[4 * i + j] = d * (float)((v & 0xF) - 8);
        hi[4 * i + j] = d * (float)((v >> 4) - 8);
      }
    }
#pragma unroll
    for (int j = 0; j < 8; j++) {
      o[j] = pack_bf16(lo[2 * j], lo[2 * j + 1]);
      o[8 + j] = pack_bf16(hi[2 * j], hi[2 * j + 1]);
    }
  }
  uint4 *p = reinterpret_cast<uint4 *>(dst);
#pragma unroll
  for (int i = 0; i < 4; i++) p[i] = make_uint4(o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]);
}

// One thread's cp.async copy tasks of a pipeline stage, shared by
// qgemm_kernel and moe_gemm.cuh's v3: the raw bytes of BM W row segments of
// KB blocks (BB bytes each; the CH 16-byte chunks covering a segment, into
// rows of RAWROW bytes) and BN A rows of 32 KB bf16 (into rows of LDS). The
// tasks (rows, pointers, shared-memory offsets) are the same in every stage
// and are set up once, in registers (device run 2: integer index math per
// stage was most of the loop's instructions).
template <int BM, int BN, int KB, int THREADS, int BB, int RAWROW, int LDS>
struct QgStager {
  static constexpr int CH = qg_chunks(BB, KB);
  static constexpr int WPT = (BM * CH + THREADS - 1) / THREADS;     // W chunk copies
  static constexpr int APT = (BN * KB * 4 + THREADS - 1) / THREADS; // A chunk copies
  static_assert(BM * RAWROW < 65536 && BN * LDS < 65536, "packed shared-memory offsets");
  // Packed per task: W copy: smem offset | chunk << 16 | (second matrix) << 24,
  // row pointer (null: no row); A copy: smem offset | first column << 16, row
  // pointer (null: no row).
  const uint8_t *w_row[WPT];
  uint32_t w_pk[WPT];
  const __nv_bfloat16 *a_src[APT];
  uint32_t a_pk[APT];

  // wrow(i, base, end): tile row i's W row (< a.m: it exists), its matrix and
  // that matrix's end; arow[i]: tile row i's A row (-1: none).
  template <class WRow>
  __device__ __forceinline__ QgStager(int tid, const QArgs &a, const int *arow, WRow wrow) {
#pragma unroll
    for (int u = 0; u < WPT; u++) {
      const int q = tid + u * THREADS;
      w_row[u] = nullptr;
      w_pk[u] = 0;
      if (q < BM * CH) {
        const int i = q / CH, c = q % CH;
        const uint8_t *base, *end;
        const int64_t row = wrow(i, base, end);
        if (row < a.m) w_row[u] = base + row * a.rb;
        w_pk[u] = (uint32_t)(i * RAWROW + 16 * c) | (uint32_t)c << 16 | (uint32_t)(end != a.w_end) << 24;
      }
    }
#pragma unroll
    for (int u = 0; u < APT; u++) {
      const int q = tid + u * THREADS;
      a_src[u] = nullptr;
      a_pk[u] = 0;
      if (q < BN * KB * 4) {
        const int i = q / (KB * 4), c = q % (KB * 4);
        const int ar = arow[i];
        if (ar >= 0) a_src[u] = a.xa + (int64_t)ar * a.k; // rows without a pair feed only outputs never stored
        a_pk[u] = (uint32_t)(i * LDS + 8 * c) | (uint32_t)(8 * c) << 16;
      }
    }
  }

  // Issues the copies of stage s (of nstages; nb blocks a row): W raw into
  // raw (this stage's buffer), A into xd (this stage's buffer), and commits
  // them as one group (an empty one past the end, to keep the group count per
  // step uniform). W: the 16-byte chunks covering each row's segment, the one
  // at the tensor's end copied partially. A: columns past k are zero-filled
  // (W is zero there too, but stale shared memory could hold NaN bits).
  __device__ __forceinline__ void issue(int s, int nstages, int64_t nb, uint8_t *dst, __nv_bfloat16 *xd,
                                        const QArgs &a) const {
    if (s < nstages) {
      const int64_t kb0 = (int64_t)s * KB;
      const int nblk = (int)min((int64_t)KB, nb - kb0);
#pragma unroll
      for (int u = 0; u < WPT; u++) {
        if (!w_row[u]) continue;
        const int c = (int)((w_pk[u] >> 16) & 0xffu);
        const uint8_t *seg = w_row[u] + kb0 * BB;
        const qg_span sp = qg_stage_span((uint64_t)seg, (uint64_t)(seg + nblk * BB));
        if (c >= sp.chunks) continue;
        const uint64_t addr = sp.a0 + 16ull * c;
        const int bytes = qg_chunk_bytes(addr, (uint64_t)((w_pk[u] >> 24) ? a.w2_end : a.w_end));
        if (bytes > 0) cp_async16(dst + (w_pk[u] & 0xffffu), reinterpret_cast<const void *>(addr), bytes);
      }
#pragma unroll
      for (int u = 0; u < APT; u++) {
        if (!a_src[u]) continue;
        const int64_t col = kb0 * 32 + (a_pk[u] >> 16);
        cp_async16(xd + (a_pk[u] & 0xffffu), a_src[u] + (col < a.k ? col : 0), col < a.k ? 16 : 0);
      }
    }
    cp_async_commit();
  }
};

// Shared memory: Ws (two buffers when PIPE) | Xs stages | raw W stages (the
// epilogue scratch reuses them) | row maps.
template <int T, class C, bool PIPE>
struct QSmem {
  // Row stride of the raw W stages: an odd number of 16-byte chunks, so that
  // the lanes of a warp (consecutive rows) read words in different banks.
  static constexpr int RAWROW = 16 * (qg_chunks(type_block_bytes(T), C::KB) | 1);
  static constexpr size_t WS = (PIPE ? 2 : 1) * (size_t)C::BM * C::LDS * 2;
  static constexpr size_t XS = (size_t)C::NS * C::BN * C::LDS * 2;
  static constexpr size_t RAW = (size_t)C::NS * C::BM * RAWROW;
  static constexpr size_t EPI = (size_t)C::WARPS * 512 * 4;
  static constexpr size_t RAWU = RAW > EPI ? RAW : EPI;
  static constexpr size_t TOTAL = WS + XS + RAWU + 2 * C::BN * 4;
};

// PIPE (default): one barrier per stage; in the phase after it, MMA warps
// multiply stage s from Ws[s % 2] while every warp dequantizes stage s+1 into
// Ws[(s+1) % 2], so tensor and dequantization work of different warps
// overlap. !PIPE (tile code | 8): dequantize, barrier, multiply, barrier.
template <int T, class C, int MODE, bool PIPE>
__global__ void __launch_bounds__(C::THREADS, C::MINB) qgemm_kernel(const QArgs a) {
  using SM = QSmem<T, C, PIPE>;
  constexpr int BB = type_block_bytes(T), CH = qg_chunks(BB, C::KB), RAWROW = SM::RAWROW;
  constexpr int BM = C::BM, BN = C::BN, KB = C::KB, NS = C::NS, LDS = C::LDS, THREADS = C::THREADS;
  constexpr bool DUAL = MODE == MODE_GATE_UP;
  static_assert(!DUAL || C::FM == 2, "gate/up pairing: fragment 0 = gate rows, 1 = the same up rows");
  static_assert(!PIPE || NS >= 3, "PIPE dequantizes one stage ahead of the multiply");
  QG_DYN_SMEM(uint8_t, smem);
  __nv_bfloat16 *Ws = reinterpret_cast<__nv_bfloat16 *>(smem);
  __nv_bfloat16 *Xs = reinterpret_cast<__nv_bfloat16 *>(smem + SM::WS);
  uint8_t *raw = smem + SM::WS + SM::XS;
  int *arow = reinterpret_cast<int *>(raw + SM::RAWU); // A row of tile row i (-1: none)
  int *orow = arow + BN;                                // output row of tile row i (-1: none)
  const int tid = threadIdx.x;

  // Which rows and which expert this CTA covers.
  int e = 0;
  if constexpr (MODE == MODE_DENSE) {
    const int64_t t0 = (int64_t)blockIdx.y * BN;
    for (int i = tid; i < BN; i += THREADS) {
      const int64_t t = t0 + i;
      arow[i] = orow[i] = t < a.n ? (int)t : -1;
    }
  } else {
    const int ty = blockIdx.y;
    if (ty >= *a.ntiles) return; // uniform: past the routed tiles (the grid is an upper bound)
    e = a.tile_e[ty];
    const int base = a.exp_off[e] + a.tile_r0[ty], lim = a.exp_off[e + 1];
    for (int i = tid; i < BN; i += THREADS) {
      const int pos = base + i;
      arow[i] = pos < lim ? pos : -1;
      orow[i] = pos >= lim ? -1 : MODE == MODE_GATE_UP ? pos : a.sorted[pos];
    }
  }
  const int64_t r0 = (int64_t)blockIdx.x * (DUAL ? BM / 2 : BM); // first W row (of each W when DUAL)
  const uint8_t *wb = a.w + (int64_t)e * a.expert_bytes;
  const uint8_t *wb2 = DUAL ? a.w2 + (int64_t)e * a.expert_bytes : nullptr;
  const int64_t nb = a.k / 32; // blocks per row
  const int nstages = (int)((nb + KB - 1) / KB);

  // Tile row i -> (W, row): DUAL interleaves 16 gate rows and the same 16 up
  // rows per 32, so each warp holds a row's gate and up accumulators.
  auto wrow = [&](int i, const uint8_t *&base, const uint8_t *&end) -> int64_t {
    if constexpr (DUAL) {
      const int band = i >> 5, within = i & 31;
      base = within < 16 ? wb : wb2;
      end = within < 16 ? a.w_end : a.w2_end;
      return r0 + band * 16 + (within & 15);
    } else {
      base = wb;
      end = a.w_end;
      return r0 + i;
    }
  };

  __syncthreads(); // row maps

  // This thread's copy and dequantization tasks are the same in every stage:
  // their rows, pointers and shared-memory offsets are computed once here
  // (device run 2: integer index math per stage was most of the loop's
  // instructions).
  constexpr int DPT = (BM * KB + THREADS - 1) / THREADS;     // blocks to dequantize
  static_assert(BM * LDS < 65536, "packed shared-memory offsets");
  // Copy tasks (QgStager); dequant: W-tile offset | block << 16 (-1: no
  // task), row pointer (null: zeros), computed once as well.
  const QgStager<BM, BN, KB, THREADS, BB, RAWROW, LDS> stg(tid, a, arow, wrow);
  const uint8_t *d_row[DPT];
  int d_pk[DPT];
#pragma unroll
  for (int u = 0; u < DPT; u++) {
    const int q = tid + u * THREADS;
    d_row[u] = nullptr;
    d_pk[u] = -1;
    if (q < BM * KB) {
      const int i = q / KB, j = q % KB;
      const uint8_t *base, *end;
      const int64_t row = wrow(i, base, end);
      if (row < a.m) d_row[u] = base + row * a.rb;
      d_pk[u] = (i * LDS + 32 * j) | j << 16;
    }
  }

  // The copies of stage s: W raw into raw[s % NS], A into Xs[s % NS].
  auto issue = [&](int s) {
    stg.issue(s, nstages, nb, raw + (size_t)(s % NS) * BM * RAWROW, Xs + (size_t)(s % NS) * BN * LDS, a);
  };
  // Dequantizes stage s's raw blocks into the W tile wt (zeros past m / past k).
  auto dequant = [&](int s, __nv_bfloat16 *wt) {
    const int64_t kb0 = (int64_t)s * KB;
    const uint8_t *src = raw + (size_t)(s % NS) * BM * RAWROW;
#pragma unroll
    for (int u = 0; u < DPT; u++) {
      if (d_pk[u] < 0) continue;
      const int off = d_pk[u] & 0xffff, j = d_pk[u] >> 16;
      __nv_bfloat16 *dst = wt + off;
      if (d_row[u] && kb0 + j < nb) {
        const uint8_t *seg = d_row[u] + kb0 * BB;
        const int o = (int)((uintptr_t)seg & 15) + j * BB; // block offset in the staged row
        const int i = off / LDS;
        const uint32_t *wp = reinterpret_cast<const uint32_t *>(src + i * RAWROW + (o & ~3));
        uint32_t wv[block_words<T>()];
#pragma unroll
        for (int z = 0; z < block_words<T>(); z++) wv[z] = wp[z];
        dequant_block_bf16<T>(wv, (uint32_t)(o & 3), dst);
      } else {
        uint4 *p = reinterpret_cast<uint4 *>(dst);
#pragma unroll
        for (int z = 0; z < 4; z++) p[z] = make_uint4(0, 0, 0, 0);
      }
    }
  };

  const int warp = tid >> 5, lane = tid & 31;
  const bool mma_warp = warp < C::WM * C::WN;
  const int wm = warp % C::WM, wn = warp / C::WM;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[C::FN][C::FM];
#pragma unroll
  for (int j = 0; j < C::FN; j++)
#pragma unroll
    for (int i = 0; i < C::FM; i++) wmma::fill_fragment(acc[j][i], 0.f);

  // Stage s's product: W tile wt, A tile Xs[s % NS].
  auto mma = [&](int s, const __nv_bfloat16 *wt) {
    const __nv_bfloat16 *xs = Xs + (size_t)(s % NS) * BN * LDS;
#pragma unroll
    for (int kk = 0; kk < C::BK / 16; kk++) {
      // Hold the W fragments, stream the A ones.
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb[C::FM];
#pragma unroll
      for (int i = 0; i < C::FM; i++)
        wmma::load_matrix_sync(fb[i], wt + (wm * C::FM * 16 + i * 16) * LDS + kk * 16, LDS);
#pragma unroll
      for (int j = 0; j < C::FN; j++) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, xs + (wn * C::FN * 16 + j * 16) * LDS + kk * 16, LDS);
#pragma unroll
        for (int i = 0; i < C::FM; i++) wmma::mma_sync(acc[j][i], fa, fb[i], acc[j][i]);
      }
    }
  };

#pragma unroll
  for (int s = 0; s < NS - 1; s++) issue(s);
  if constexpr (PIPE) {
    __nv_bfloat16 *Ws2 = Ws + BM * LDS;
    cp_async_wait<NS - 2>(); // stage 0
    __syncthreads();
    dequant(0, Ws);
    for (int s = 0; s < nstages; s++) {
      cp_async_wait<NS - 3>(); // this thread's copies of stage s+1 have landed
      __syncthreads(); // stage s+1 visible; Ws[s % 2] (dequant(s)) visible; step s-1's mma and dequant done
      issue(s + NS - 1); // buffers of stage s-1: raw read by dequant(s-1) two steps ago, Xs by mma(s-1)
      if (mma_warp) mma(s, (s & 1) ? Ws2 : Ws);
      if (s + 1 < nstages) dequant(s + 1, (s & 1) ? Ws : Ws2); // the tile mma(s-1) read
    }
  } else {
    for (int s = 0; s < nstages; s++) {
      cp_async_wait<NS - 2>(); // this thread's copies of stage s have landed
      __syncthreads(); // A: everyone's copies visible; step s-1's mma is done with Ws and Xs[(s-1) % NS]
      issue(s + NS - 1); // into the buffers of stage s-1 (raw: read by dequant(s-1), before B of s-1)
      dequant(s, Ws);
      __syncthreads(); // B: Ws ready
      if (mma_warp) mma(s, Ws);
    }
  }
  cp_async_wait<0>();
  __syncthreads(); // the raw buffers become the epilogue scratch
  if (!mma_warp) return;

  float *scr = reinterpret_cast<float *>(raw) + warp * 512;
#pragma unroll
  for (int j = 0; j < C::FN; j++) {
    if constexpr (DUAL) {
      wmma::store_matrix_sync(scr, acc[j][0], 16, wmma::mem_row_major);
      wmma::store_matrix_sync(scr + 256, acc[j][1], 16, wmma::mem_row_major);
      __syncwarp();
      __nv_bfloat16 *act = reinterpret_cast<__nv_bfloat16 *>(a.y);
      for (int q = lane; q < 256; q += 32) {
        const int tl = q >> 4, rl = q & 15;
        const int o = orow[wn * C::FN * 16 + j * 16 + tl];
        const int64_t row = r0 + wm * 16 + rl;
        if (o >= 0 && row < a.m) {
          const float g = scr[q] + (a.bias ? a.bias[(int64_t)e * a.m + row] : 0.f);
          const float u = scr[256 + q] + (a.bias2 ? a.bias2[(int64_t)e * a.m + row] : 0.f);
          act[(int64_t)o * a.m + row] = __float2bfloat16_rn(swiglu_oai(g, u, a.alpha, a.limit));
        }
      }
      __syncwarp();
    } else {
      float *y = reinterpret_cast<float *>(a.y);
#pragma unroll
      for (int i = 0; i < C::FM; i++) {
        wmma::store_matrix_sync(scr, acc[j][i], 16, wmma::mem_row_major);
        __syncwarp();
        for (int q = lane; q < 256; q += 32) {
          const int tl = q >> 4, rl = q & 15;
          const int o = orow[wn * C::FN * 16 + j * 16 + tl];
          const int64_t row = r0 + wm * C::FM * 16 + i * 16 + rl;
          if (o >= 0 && row < a.m) {
            const float v = scr[q] + (a.bias ? a.bias[(int64_t)e * a.m + row] : 0.f);
            float *yp = y + (int64_t)o * a.m + row;
            *yp = a.accumulate ? *yp + v : v;
          }
        }
        __syncwarp();
      }
    }
  }
}

// Opt-in shared memory per block of the current device (227 KB on H100,
// 163 KB on A100): a tile that needs more is declined (the caller falls back).
size_t smem_optin() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return 48 * 1024;
  return (size_t)v;
}

template <int T, class C, int MODE, bool PIPE>
int launch_qgemm_p(cudaStream_t st, const QArgs &a, int64_t rows_w, int64_t gy) {
  constexpr size_t sm = QSmem<T, C, PIPE>::TOTAL;
  static_assert(sm <= 200 * 1024, "shared memory");
  static const size_t optin = smem_optin();
  if (sm > optin) {
    orch_set_error("qgemm: tile needs %zu bytes of shared memory, the device allows %zu", sm, optin);
    return ORCH_ERR_UNSUPPORTED;
  }
  const int64_t gx = ceil_div(rows_w, MODE == MODE_GATE_UP ? C::BM / 2 : C::BM);
  if (sm > 48 * 1024)
    cudaFuncSetAttribute(qgemm_kernel<T, C, MODE, PIPE>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
  void (*kern)(const QArgs) = qgemm_kernel<T, C, MODE, PIPE>;
  QG_LAUNCH(kern, dim3((unsigned)gx, (unsigned)gy), C::THREADS, sm, st, a);
  return ORCH_OK;
}

// Grouped MoE GEMM v3 (mma.sync, MXFP4 decoded into fragments; tile codes
// 17 and 19, ORCH_CUDA_MOEGEMM=v3, the default).
#include "moe_gemm.cuh"
// Grouped MoE GEMM v4 (wgmma, sm_90a; tile codes 30 and 32, ORCH_CUDA_MOEGEMM=v4).
#include "moe_wg.cuh"

// ORCH_CUDA_MOEGEMM=vN, read once per process: 3 makes v3 the grouped MoE's
// kernel when the caller leaves the choice (tile 0) and both weight types are
// MXFP4; 4 (the default since session 7: gpt-oss pp2048 in 2048-token steps
// 33,205 vs 27,326 tok/s with v3, H100) makes it v4 (moe_wg.cuh) above 16
// pairs per expert where the library holds its sm_90a build, else v3; any other version (v1) keeps v1's tiles. (v2, the
// shared-memory-decode step, was deleted after device run 1.)
int moegemm_version() {
  static const int v = orch_env_version("ORCH_CUDA_MOEGEMM", 4);
  return v;
}
// v4's pick by mean pairs per expert (tile 0): v3's 64-pair tile (19) up to
// 16, v3's 96-pair tile (17) up to moegemm4_from(), the hybrid (36) above.
// Session 7, device run 1 (H100, gpt-oss e2e): the hybrid lost at pp512 (64
// pairs per expert: 18,532 vs v3's 19,630 tok/s) and won at pp2048 (256:
// 32,655 vs 27,484), so 64 stays on v3. ORCH_CUDA_MOEGEMM4_FROM=N (pairs per
// expert, read once) moves the border (A/B timing of the crossing).
int64_t moegemm4_from() {
  static const int64_t v = [] {
    const char *e = getenv("ORCH_CUDA_MOEGEMM4_FROM");
    char *end = nullptr;
    const long long x = e && e[0] ? strtoll(e, &end, 10) : -1;
    return (end && *end == 0 && x >= 16 && x < (1ll << 30)) ? (int64_t)x : (int64_t)64;
  }();
  return v;
}
constexpr bool tile_v3(int t) { return mg3_tile_ok(t); }
constexpr bool tile_v4(int t) { return mg4_tile_ok(t); }
// 36: hybrid (session 6, after device run 2: v4 tile 30 is 1.92 ms at n =
// 2048 against v3's 2.38, but its per-tile cost is ~1.5x v3's, so it loses
// on experts with few pairs): per call, experts with >= MG_HYB_THR pairs run
// v4 tile 30, the others v3 tile 17 (two tile lists, four GEMM launches).
constexpr int MG_HYB = 36, MG_HYB_THR = 96;

// The two-barrier schedule is built for the dense GEMM only (A/B timing;
// fewer instantiations): the MoE modes always pipeline.
template <int T, class C, int MODE>
int launch_qgemm(cudaStream_t st, const QArgs &a, int64_t rows_w, int64_t gy, bool pipe) {
  if constexpr (MODE == MODE_DENSE)
    if (!pipe) return launch_qgemm_p<T, C, MODE, false>(st, a, rows_w, gy);
  return launch_qgemm_p<T, C, MODE, true>(st, a, rows_w, gy);
}

// Tile code: bits 0-2 the configuration (1..4), bit 3 (8) the two-barrier
// schedule instead of the pipelined one.
constexpr int bn_of(int tile) {
  return tile == MG_HYB ? 256 : tile_v4(tile) ? mg4_bn(tile) : tile_v3(tile) ? mg3_bn(tile) : (tile & 7) == 1 ? 16 : (tile & 7) == 4 ? 128 : (tile & 7) == 5 ? 96 : 64;
}

// gy: grid rows (token tiles or the MoE tile bound) for this tile's BN.
template <int T, int MODE>
int launch_cfg(cudaStream_t st, const QArgs &a, int tile, int64_t rows_w, int64_t gy) {
  const bool pipe = !(tile & 8);
  switch (tile & 7) {
    case 1:
      if constexpr (MODE == MODE_DENSE) return launch_qgemm<T, CfgS1, MODE>(st, a, rows_w, gy, pipe);
      else return launch_qgemm<T, CfgS2, MODE>(st, a, rows_w, gy, pipe);
    case 2: return launch_qgemm<T, CfgM, MODE>(st, a, rows_w, gy, pipe);
    case 3: return launch_qgemm<T, CfgML, MODE>(st, a, rows_w, gy, pipe);
    case 5: return launch_qgemm<T, CfgMW, MODE>(st, a, rows_w, gy, pipe);
    default: return launch_qgemm<T, CfgL, MODE>(st, a, rows_w, gy, pipe);
  }
}

template <int MODE>
int dispatch(cudaStream_t st, int wtype, const QArgs &a, int tile, int64_t rows_w, int64_t gy) {
  switch (wtype) {
    case ORCH_T_Q8_0: return launch_cfg<ORCH_T_Q8_0, MODE>(st, a, tile, rows_w, gy);
    case ORCH_T_Q4_0: return launch_cfg<ORCH_T_Q4_0, MODE>(st, a, tile, rows_w, gy);
    case ORCH_T_MXFP4: return launch_cfg<ORCH_T_MXFP4, MODE>(st, a, tile, rows_w, gy);
  }
  return ORCH_ERR_UNSUPPORTED;
}

bool tile_ok(int t) { return ((t & ~15) == 0 && (t & 7) <= 5) || tile_v3(t) || tile_v4(t) || t == MG_HYB; } // 0..5, 8..13; v3's, v4's (grouped MoE)
bool qgemm_type(int t) { return t == ORCH_T_Q8_0 || t == ORCH_T_Q4_0 || t == ORCH_T_MXFP4; }
bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

// out[r, :] = bf16(x[src(r), :]) for r < rows (rows of k, k % 8 == 0);
// src(r) = r, or with sorted: sorted[r] / n_slots for r < *count (the routed
// pairs; the grid covers the upper bound).
__global__ void to_bf16_rows_kernel(__nv_bfloat16 *__restrict__ out, const float *__restrict__ x, int64_t rows,
                                    int64_t k, const int32_t *__restrict__ sorted, const int32_t *__restrict__ count,
                                    int n_slots) {
  const int64_t per = k / 8, total = rows * per;
  const int64_t lim = count ? min((int64_t)*count, rows) * per : total;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < lim; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / per, c = i % per;
    const int64_t sr = sorted ? sorted[r] / n_slots : r;
    const float4 *p = reinterpret_cast<const float4 *>(x + sr * k + 8 * c);
    const float4 u = __ldg(p), v = __ldg(p + 1);
    *reinterpret_cast<uint4 *>(out + r * k + 8 * c) =
        make_uint4(pack_bf16(u.x, u.y), pack_bf16(u.z, u.w), pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
  }
}

int launch_to_bf16(cudaStream_t st, __nv_bfloat16 *out, const float *x, int64_t rows, int64_t k,
                   const int32_t *sorted, const int32_t *count, int n_slots) {
  const int64_t work = rows * (k / 8);
  const unsigned blocks = (unsigned)max((int64_t)1, min(ceil_div(work, 256), (int64_t)4096));
  QG_LAUNCH(to_bf16_rows_kernel, dim3(blocks), 256, 0, st, out, x, rows, k, sorted, count, n_slots);
  return ORCH_OK;
}

// Bucketing of (token, slot) pairs by expert, one CTA: counts (shared-memory
// atomics), the tile plan (moe_tile_plan, one thread), then the scatter. The
// order of a bucket's pairs depends on atomic order; no output depends on it
// (each pair's row is computed alone and combined per token in slot order).
// Pairs with an expert id outside [0, n_exp) are dropped (their rows of the
// per-pair buffer are not written).
// bn2 > 0 (hybrid, tile 36): experts with >= thr pairs go to the first tile
// list (tiles of bn), the others to a second one after it (ntiles2 |
// tile_e2[tb2] | tile_r02[tb2], tiles of bn2): moe_tile_plan2.
__global__ void moe_bucket_kernel(int32_t *route, const int32_t *__restrict__ ids, int pairs, int n_exp, int bn,
                                  int64_t tiles_bound, int bn2, int thr, int64_t tb2) {
  QG_DYN_SMEM(int, shb);
  int *cnt = shb, *fill = shb + n_exp, *off = shb + 2 * n_exp, *tst = off + n_exp + 1;
  int32_t *exp_off = route, *ntiles = route + n_exp + 1, *sorted = ntiles + 1;
  int32_t *tile_e = sorted + pairs, *tile_r0 = tile_e + tiles_bound;
  int32_t *ntiles2 = tile_r0 + tiles_bound, *tile_e2 = ntiles2 + 1, *tile_r02 = tile_e2 + tb2;
  for (int e = threadIdx.x; e < n_exp; e += blockDim.x) cnt[e] = fill[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int e = ids[p];
    if (e >= 0 && e < n_exp) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (bn2 > 0) *ntiles = moe_tile_plan2(cnt, n_exp, bn, bn2, thr, off, tst, ntiles2);
    else *ntiles = moe_tile_plan(cnt, n_exp, bn, off, tst);
  }
  __syncthreads();
  for (int e = threadIdx.x; e <= n_exp; e += blockDim.x) exp_off[e] = off[e];
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int e = ids[p];
    if (e >= 0 && e < n_exp) sorted[off[e] + atomicAdd(&fill[e], 1)] = p;
  }
  if (bn2 > 0) {
    for (int e = threadIdx.x; e < n_exp; e += blockDim.x) {
      const bool big = cnt[e] >= thr;
      const int b = big ? bn : bn2;
      int32_t *te = big ? tile_e : tile_e2, *tr = big ? tile_r0 : tile_r02;
      for (int t = 0, r = 0; r < cnt[e]; t++, r += b) {
        te[tst[e] + t] = e;
        tr[tst[e] + t] = r;
      }
    }
    return;
  }
  for (int e = threadIdx.x; e < n_exp; e += blockDim.x)
    for (int t = tst[e], r = 0; t < tst[e + 1]; t++, r += bn) {
      tile_e[t] = e;
      tile_r0[t] = r;
    }
}

// ORCH_CUDA_MOEGEMM_PARTS=1 (timing aid, read once; session 6): each
// orch_moe_ffn_grouped call outside a stream capture records an event after
// each of its launches, waits for them and prints one line to stderr with
// the time of each part (bucketing, gather, gate_up, down, combine), so the
// perf test can account for the whole op (TestMoEGroupedParts).
struct MoeParts {
#ifndef ORCH_EMU
  cudaEvent_t ev[6] = {};
#endif
  int used = 0;
  bool on = false;
  MoeParts(cudaStream_t st) {
#ifndef ORCH_EMU
    static const bool env = getenv("ORCH_CUDA_MOEGEMM_PARTS") && getenv("ORCH_CUDA_MOEGEMM_PARTS")[0] == '1';
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    if (!env || cudaStreamIsCapturing(st, &cs) != cudaSuccess || cs != cudaStreamCaptureStatusNone) return;
    on = true;
    for (auto &e : ev) cudaEventCreate(&e);
#else
    (void)st;
#endif
  }
  void mark(cudaStream_t st) {
#ifndef ORCH_EMU
    if (on && used < 6) cudaEventRecord(ev[used++], st);
#else
    (void)st;
#endif
  }
  // route: the call's exp_off (n_exp + 1 ints): the routing's shape is
  // printed too (experts used, largest, how many with >= 96 pairs).
  void report(int64_t n, int tile, const int32_t *route = nullptr, int n_exp = 0) {
#ifndef ORCH_EMU
    if (!on) return;
    if (used == 6 && cudaEventSynchronize(ev[5]) == cudaSuccess) {
      float t[5];
      for (int i = 0; i < 5; i++) cudaEventElapsedTime(&t[i], ev[i], ev[i + 1]);
      int usedx = 0, big = 0, mx = 0;
      if (route && n_exp > 0 && n_exp <= 4096) {
        static int32_t off[4097];
        if (cudaMemcpy(off, route, sizeof(int32_t) * (n_exp + 1), cudaMemcpyDeviceToHost) == cudaSuccess)
          for (int e = 0; e < n_exp; e++) {
            const int c = off[e + 1] - off[e];
            usedx += c > 0;
            big += c >= 96;
            mx = c > mx ? c : mx;
          }
      }
      fprintf(stderr,
              "orch moe_ffn_grouped parts n=%lld tile=%d: bucket %.1f us, gather %.1f us, gate_up %.1f us, down %.1f "
              "us, combine %.1f us (experts used %d, >= 96 pairs %d, largest %d)\n",
              (long long)n, tile, 1e3 * t[0], 1e3 * t[1], 1e3 * t[2], 1e3 * t[3], 1e3 * t[4], usedx, big, mx);
    }
    for (auto &e : ev) cudaEventDestroy(e);
    on = false;
#else
    (void)n, (void)tile, (void)route, (void)n_exp;
#endif
  }
};

} // namespace

extern "C" int orch_qgemm(orch_ctx *ctx, float *y, const float *x, const void *w, int32_t wtype, const float *bias,
                          int64_t n, int64_t k, int64_t m, int32_t accumulate, void *xbf16, int32_t tile) {
  const char *op = "qgemm";
  ORCH_CHECK_ARG(ctx && y && x && w && xbf16 && n >= 0 && k > 0 && m > 0 && tile_ok(tile), op);
  if (!qgemm_type(wtype) || k % 32) {
    orch_set_error("qgemm: weight type %d / k=%lld not handled (Q8_0, Q4_0, MXFP4; k %% 32 == 0)", wtype, (long long)k);
    return ORCH_ERR_UNSUPPORTED;
  }
  ORCH_CHECK_ARG(aligned16(x) && aligned16(w) && aligned16(xbf16), op);
  // By n, from device run 2 (Q8_0 2880x5120 / 4096x14336): tile 1 is best to
  // n = 16, 1 and 2 tie at 64 (tile 3 there is 25% slower), 2 is best at 512
  // for the small weight and 3 for the large one.
  if ((tile & 7) == 0) tile |= n <= 16 ? 1 : n <= 128 ? 2 : 3;
  const int64_t gy = ceil_div(n, bn_of(tile));
  if (n > INT32_MAX / 2 || gy > 65535 || m > INT32_MAX / 2) {
    orch_set_error("qgemm: n=%lld m=%lld too large for the grid", (long long)n, (long long)m);
    return ORCH_ERR_UNSUPPORTED;
  }
  if (n == 0) return ORCH_OK;
  __nv_bfloat16 *xa = (__nv_bfloat16 *)xbf16;
  launch_to_bf16(ctx->stream, xa, x, n, k, nullptr, nullptr, 1);
  ORCH_LAUNCHED(op);
  QArgs a{};
  a.y = y;
  a.xa = xa;
  a.w = (const uint8_t *)w;
  a.rb = orch_row_bytes(wtype, k);
  a.w_end = a.w + m * a.rb;
  a.bias = bias;
  a.n = n;
  a.k = k;
  a.m = m;
  a.accumulate = accumulate;
  int rc = dispatch<MODE_DENSE>(ctx->stream, wtype, a, tile, m, gy);
  if (rc != ORCH_OK) return rc;
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}

extern "C" int64_t orch_moe_route_ints(int64_t pairs, int32_t n_exp) {
  return pairs < 0 || n_exp <= 0 ? 0 : moe_route_ints(pairs, n_exp);
}

extern "C" int orch_moe_ffn_grouped(orch_ctx *ctx, float *out, const float *x, const int32_t *ids,
                                    const float *weights, const void *gate, const void *up, int32_t gu_type,
                                    const float *gate_bias, const float *up_bias, const void *down, int32_t down_type,
                                    const float *down_bias, int64_t n, int32_t n_slots, int32_t n_exp, int64_t dim,
                                    int64_t ff, float alpha, float limit, void *xg, void *act, float *ybuf,
                                    int32_t *route, int32_t tile) {
  const char *op = "moe_ffn_grouped";
  ORCH_CHECK_ARG(ctx && out && x && ids && weights && gate && up && down && xg && act && ybuf && route, op);
  ORCH_CHECK_ARG(n >= 0 && n_slots > 0 && n_exp > 0 && dim > 0 && ff > 0 && tile_ok(tile), op);
  // n_exp: the bucketing CTA keeps 4*n_exp+2 ints in shared memory (<= 48 KB).
  if (!qgemm_type(gu_type) || !qgemm_type(down_type) || dim % 32 || ff % 32 || n_exp > 2048) {
    orch_set_error("moe_ffn_grouped: types %d/%d, dim=%lld, ff=%lld, %d experts not handled", gu_type, down_type,
                   (long long)dim, (long long)ff, n_exp);
    return ORCH_ERR_UNSUPPORTED;
  }
  ORCH_CHECK_ARG(aligned16(x) && aligned16(xg) && aligned16(act) && aligned16(ybuf) && aligned16(gate) &&
                     aligned16(up) && aligned16(down),
                 op);
  const int64_t pairs = n * n_slots;
  // v3 (moe_gemm.cuh) is built for MXFP4 gate/up and down (gpt-oss); other
  // types take v1's tiles (a v3 tile code then means "by shape").
  const bool mx = gu_type == ORCH_T_MXFP4 && down_type == ORCH_T_MXFP4;
  if (tile == 0 && mx && moegemm_version() == 4 && mg4_available()) {
    // v4 by mean pairs per expert (moegemm4_from): few pairs stay on v3's
    // 64-pair tile, up to the border on v3's 96-pair tile, else the hybrid
    // (v4 for the experts with >= 96 pairs, v3 for the rest; session 6
    // device run 2: v4 alone loses at n = 512, 0.83 vs 0.77 ms, and end to end).
    const int64_t per = pairs / n_exp;
    const int pick = per <= 16 ? 19 : per <= moegemm4_from() ? 17 : MG_HYB;
    if ((pick == MG_HYB ? mg4_smem(30) : mg3_smem(pick)) <= smem_optin()) tile = pick;
  }
  if (tile == 0 && mx && moegemm_version() >= 3) {
    // By mean pairs per expert (device runs 1-2, gpt-oss: n = 64 (8 per
    // expert) 64-pair tiles 0.498 ms, 96 0.519; n = 512 / 2048 96-pair tiles
    // 0.765 / 2.38 ms, 64 0.99 / 2.87; v1 tile 5 1.02 / 1.09 / 3.17).
    const int pick = pairs / n_exp <= 16 ? 19 : 17;
    if (mg3_smem(pick) <= smem_optin()) tile = pick; // else (A100: 163 KB) v1's tiles
  }
  // The hybrid needs v4 and room for both tile lists in the route scratch
  // (sized for one list of 16-pair tiles: fits from ~30 pairs per expert);
  // else v3 tile 17.
  if (tile == MG_HYB &&
      !(mg4_available() && mx &&
        n_exp + 3 + pairs + 2 * moe_tiles_bound(pairs, n_exp, 256) + 2 * moe_tiles_bound(pairs, n_exp, 96) <=
            moe_route_ints(pairs, n_exp)))
    tile = mx ? 17 : 0;
  const bool v3 = tile_v3(tile) || tile_v4(tile) || tile == MG_HYB;
  if (v3 && !mx) tile = 0;
  if (!(v3 && mx) && (tile & 7) == 0) {
    const int64_t per = pairs / n_exp; // mean pairs per expert
    // Device run 3 (gpt-oss shape): n=64 (8 per expert) tile 1 0.70 ms; n=512
    // (64 per expert) tile 5 1.11 ms, 2 1.27, 3 1.29, 4 1.56.
    tile |= per <= 16 ? 1 : per <= 40 ? 2 : 5;
  }
  const int bn = bn_of(tile);
  const int64_t tb = moe_tiles_bound(pairs, n_exp, bn);
  // hybrid: the second tile list (v3, 96 pairs) after the first; both must fit the scratch
  const bool hyb = tile == MG_HYB;
  const int64_t tb2 = hyb ? moe_tiles_bound(pairs, n_exp, 96) : 0;
  if (hyb && n_exp + 2 + pairs + 2 * tb + 1 + 2 * tb2 > moe_route_ints(pairs, n_exp)) {
    orch_set_error("moe_ffn_grouped: hybrid tile lists of %lld pairs do not fit the route scratch", (long long)pairs);
    return ORCH_ERR_INVALID; // unreachable: checked above
  }
  if (pairs > INT32_MAX / 2 || tb > 65535 || ff > INT32_MAX / 2 || dim > INT32_MAX / 2) {
    orch_set_error("moe_ffn_grouped: %lld pairs too many for the grid", (long long)pairs);
    return ORCH_ERR_UNSUPPORTED;
  }
  if (n == 0) return ORCH_OK;
  const int64_t rb_gu = orch_row_bytes(gu_type, dim), rb_dn = orch_row_bytes(down_type, ff);
  // Route layout (qgemm.cuh): exp_off[n_exp+1] | ntiles | sorted[pairs] | tile_e[tb] | tile_r0[tb]
  // (tb for this call's bn; orch_moe_route_ints sizes for bn = 16, the largest bound).
  MoeParts parts(ctx->stream);
  parts.mark(ctx->stream);
  QG_LAUNCH(moe_bucket_kernel, dim3(1), 1024, (size_t)(4 * n_exp + 2) * sizeof(int), ctx->stream, route, ids,
            (int)pairs, n_exp, bn, tb, hyb ? 96 : 0, MG_HYB_THR, tb2);
  ORCH_LAUNCHED(op);
  parts.mark(ctx->stream);
  QArgs a{};
  a.exp_off = route;
  a.ntiles = route + n_exp + 1;
  a.sorted = a.ntiles + 1;
  a.tile_e = a.sorted + pairs;
  a.tile_r0 = a.tile_e + tb;
  a.alpha = alpha;
  a.limit = limit;
  a.n = pairs; // rows of the gathered x / the activations (v4's TMA map)
  // x rows gathered in sorted order, as bf16
  launch_to_bf16(ctx->stream, (__nv_bfloat16 *)xg, x, pairs, dim, a.sorted, route + n_exp, n_slots);
  ORCH_LAUNCHED(op);
  parts.mark(ctx->stream);
  // gate + up (+ biases, clamped SwiGLU) -> act[pos, ff] (bf16, sorted order)
  a.y = act;
  a.xa = (const __nv_bfloat16 *)xg;
  a.w = (const uint8_t *)gate;
  a.w2 = (const uint8_t *)up;
  a.expert_bytes = ff * rb_gu;
  a.w_end = a.w + n_exp * a.expert_bytes;
  a.w2_end = a.w2 + n_exp * a.expert_bytes;
  a.bias = gate_bias;
  a.bias2 = up_bias;
  a.k = dim;
  a.m = ff;
  a.rb = rb_gu;
  // hybrid: the second list's arguments (v3 tile 17)
  auto second = [&](const QArgs &q) {
    QArgs b = q;
    b.ntiles = a.tile_r0 + tb;
    b.tile_e = b.ntiles + 1;
    b.tile_r0 = b.tile_e + tb2;
    return b;
  };
  int rc = hyb              ? launch_moe_gemm4_tile<MODE_GATE_UP>(ctx->stream, a, 30, ff, tb)
           : tile_v4(tile) ? launch_moe_gemm4_tile<MODE_GATE_UP>(ctx->stream, a, tile, ff, tb)
           : tile_v3(tile) ? launch_moe_gemm3_tile<MODE_GATE_UP>(ctx->stream, a, tile, ff, tb)
                           : dispatch<MODE_GATE_UP>(ctx->stream, gu_type, a, tile, ff, tb);
  if (hyb && rc == ORCH_OK) rc = launch_moe_gemm3_tile<MODE_GATE_UP>(ctx->stream, second(a), 17, ff, tb2);
  if (rc != ORCH_OK) return parts.report(n, -1), rc;
  ORCH_LAUNCHED(op);
  parts.mark(ctx->stream);
  // down (+ bias) -> ybuf[pair, dim]
  a.y = ybuf;
  a.xa = (const __nv_bfloat16 *)act;
  a.w = (const uint8_t *)down;
  a.w2 = nullptr;
  a.expert_bytes = dim * rb_dn;
  a.w_end = a.w + n_exp * a.expert_bytes;
  a.w2_end = nullptr;
  a.bias = down_bias;
  a.bias2 = nullptr;
  a.k = ff;
  a.m = dim;
  a.rb = rb_dn;
  rc = hyb              ? launch_moe_gemm4_tile<MODE_DOWN>(ctx->stream, a, 30, dim, tb)
       : tile_v4(tile) ? launch_moe_gemm4_tile<MODE_DOWN>(ctx->stream, a, tile, dim, tb)
       : tile_v3(tile) ? launch_moe_gemm3_tile<MODE_DOWN>(ctx->stream, a, tile, dim, tb)
                       : dispatch<MODE_DOWN>(ctx->stream, down_type, a, tile, dim, tb);
  if (hyb && rc == ORCH_OK) rc = launch_moe_gemm3_tile<MODE_DOWN>(ctx->stream, second(a), 17, dim, tb2);
  if (rc != ORCH_OK) return parts.report(n, -1), rc;
  ORCH_LAUNCHED(op);
  parts.mark(ctx->stream);
  rc = orch_moe_combine(ctx, out, ybuf, weights, n, n_slots, dim, 0);
  parts.mark(ctx->stream);
  parts.report(n, tile, route, n_exp);
  return rc;
}
