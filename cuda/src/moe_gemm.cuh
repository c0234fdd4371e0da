// moe_gemm.cuh — grouped MoE expert GEMM v3 (ORCH_CUDA_MOEGEMM=v3, the
// default; tile codes 17 and 19 of orch_moe_ffn_grouped; session 5, issue 7).
// Included by qgemm.cu inside its anonymous namespace: it reuses qgemm.cu's
// QArgs, cp.async wrappers and the route (bucketing, gather, tile plan,
// combine); only the GEMM kernel is new. MXFP4 weights only (gpt-oss).
//
// Versus v1 (qgemm_kernel: W dequantized into a bf16 shared-memory tile, WMMA
// 16x16x16 from it):
//  - mma.sync m16n8k16 bf16 (fp32 accumulate). W rows are the A operand (M),
//    pairs the B operand (N, 8 per mma): a tile's n8 blocks past its pair
//    count are skipped (warp-uniform), where v1 computed all 96 columns;
//  - the MXFP4 bytes (cp.async-staged raw, as v1) are decoded by each warp
//    straight into its A fragments in registers: no bf16 W tile, no A
//    fragment loads (v2, which decoded into shared memory and read A with
//    ldmatrix, measured 1.03 ms at n = 512 against v3's 0.77: deleted);
//  - 384 W rows (gate_up: 192 gate + the same 192 up rows) per CTA, 12 warps
//    of 32 rows each across all the tile's pairs; pair rows (bf16) through
//    ldmatrix.x4 from padded shared memory (rows of BK + 8 bf16: 144 bytes,
//    an odd number of 16-byte units, so the 8 row addresses of an 8x8 block
//    hit distinct bank groups); activations re-read from L2 m / 384 times
//    (v1: m / 128);
//  - the epilogue runs on the accumulators in registers: a warp's two m16
//    tiles are the same 16 ff rows of gate and of up (bands of 32 tile rows),
//    so the clamped SwiGLU pairs element d[i] of one with d[i] of the other.
// Fragment layouts (PTX ISA, lane = 4 g + t), as attention_fa.cuh:
//   A (16 x 16, row-major): a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16 x 8, the pair rows [n][k]): b0 = B[k 2t..][n g], b1 = B[k 2t+8..][n g]
//   D: d0, d1 = D[g][2t, 2t+1], d2, d3 = D[g+8][2t, 2t+1]
// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i; lane l gets
// of matrix i row l / 4, elements 2 (l % 4), +1 -> register i; B's x4 takes
// (n-block j, k 0-7), (j, k 8-15), (j', k 0-7), (j', k 8-15) = the b0, b1 of
// two n-blocks.
// The CPU emulation (cuda/test/qgemm_emu_test.cpp) runs this source with
// ldmatrix and mma done lane by lane from these tables, so the layouts are
// checked, not assumed.
#pragma once

// ---- fragment primitives ----
__device__ __forceinline__ void mg_mma_bf16(float d[4], const uint32_t a[4], const uint32_t b0, const uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(ORCH_EMU)
  // The warp's fragments gathered by the table above; products and sums in
  // double, rounded once (the hardware's order is unspecified).
  EmuMmaExchange &x = g_emu_mma[threadIdx.x >> 5];
  const int lane = threadIdx.x & 31;
  for (int i = 0; i < 4; i++) x.a[lane][i] = a[i];
  x.b[lane][0] = b0;
  x.b[lane][1] = b1;
  emu_warp().bar.arrive_and_wait();
  auto bf = [](uint32_t w, int hi) {
    const uint32_t u = (hi ? w >> 16 : w & 0xffffu) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return (double)f;
  };
  auto A = [&](int row, int col) {
    return bf(x.a[4 * (row & 7) + ((col & 7) >> 1)][(row >> 3) + 2 * (col >> 3)], col & 1);
  };
  auto B = [&](int row, int col) { return bf(x.b[4 * col + ((row & 7) >> 1)][row >> 3], row & 1); };
  const int g = lane >> 2, t = lane & 3;
  float r[4];
  for (int i = 0; i < 4; i++) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    double s = d[i];
    for (int kk = 0; kk < 16; kk++) s += A(row, kk) * B(kk, col);
    r[i] = (float)s;
  }
  emu_warp().bar.arrive_and_wait();
  for (int i = 0; i < 4; i++) d[i] = r[i];
#endif
}

// ldmatrix x4 (orch_ldsm_x4, ldsm.cuh); the emulation also checks that the
// row addresses are 16-byte aligned and inside the dynamic shared memory.
__device__ __forceinline__ void mg_ldsm_x4(uint32_t r[4], const __nv_bfloat16 *p) {
#ifdef ORCH_EMU
  const unsigned char *c = (const unsigned char *)p;
  CHECK(((uintptr_t)p & 15) == 0, "ldmatrix row address %p not 16-byte aligned", (const void *)p);
  CHECK(c >= attn_tc::smem && c + 16 <= attn_tc::smem + g_smem_bytes, "ldmatrix row outside shared memory");
#endif
  orch_ldsm_x4(r, p);
}

// ---- v3: MXFP4 decoded straight into A fragments ----
// A CTA is 384 W rows (gate_up: 192 gate + the same 192 up rows) x 96 pairs,
// 12 warps, each owning a band of 32 tile rows (16 gate, 16 up) across ALL
// of the tile's pairs (no N split). As a warp is the only reader of its rows,
// it decodes the raw MXFP4 bytes (cp.async-staged, NS = 4 stages) directly
// into its mma A fragments in registers: no bf16 W tile in shared memory, no
// A ldmatrix (v2's shared-memory traffic was about as large as its tensor
// time). Lane (g, t) needs of each of its rows (g, g + 8 of each m16 tile)
// per 32-element block the scale byte and qs bytes {2t, 2t+1} and
// {2t+8, 2t+9}: their low nibbles are A elements k = 2t.. and 2t+8.. of the
// block's first k16 step, their high nibbles the same of the second (MXFP4:
// element j < 16 is the low nibble of qs[j], element 16 + j its high nibble).
// Activations are re-read from L2 m / 384 times (v2: m / 192). Only B (pair
// rows) goes through ldmatrix: one x4 per two n8 blocks and k16 step.
// BN_: pairs per tile (tile 17: 96, 19: 64): the accumulators are
// 2 x BN_/8 x 4 of the 168 registers a thread may have; an expert with more
// pairs takes another tile (its rows streamed and decoded again).
// Measured variants deleted after device run 2 (n = 16 / 64 / 512 / 2048 ms;
// tile 17: 0.53 / 0.52 / 0.765 / 2.38): 80 pairs (0.77 at 512, 2.73 at
// 2048), 192-row CTAs two per SM (0.50 / 0.52 / 0.749 / 2.64), the next
// block's decode pipelined against the MMAs (0.67 / 0.67 / 0.763 / 2.71), the
// L2::256B prefetch-size hint on the W copies (no change: 0.768 / 2.38), plus
// prefetch.global.L2 ahead (0.84 at 512), 4 blocks a stage (0.84, 2.53).
template <int BN_>
struct Mg3Cfg {
  static constexpr int BM = 384, BN = BN_, KB = 2, NS = 4, WARPS = 12, THREADS = WARPS * 32;
  static constexpr int BK = 32 * KB, LDS = BK + 8, NT = BN / 8;
  static_assert(BM == WARPS * 32 && NT % 2 == 0, "tile");
  static_assert((LDS * 2) % 16 == 0 && ((LDS * 2 / 16) & 1), "ldmatrix rows: 16-byte aligned, odd 16-byte stride");
};

template <int T, int BN_>
struct Mg3Smem {
  using C = Mg3Cfg<BN_>;
  static constexpr int RAWROW = 16 * (qg_chunks(type_block_bytes(T), C::KB) | 1);
  static constexpr size_t XS = (size_t)C::NS * C::BN * C::LDS * 2;
  static constexpr size_t RAW = (size_t)C::NS * C::BM * RAWROW;
  static constexpr size_t TOTAL = XS + RAW + 2 * C::BN * 4;
};

// Two MXFP4 qs bytes (qq: byte a low, byte b high) -> the bf16 pairs
// (lo(a), lo(b)) and (hi(a), hi(b)) times the block scale (bf16x2 words);
// the table decode of dequant_block_bf16.
__device__ __forceinline__ void mx_pair_bf16(uint32_t qq, uint32_t scale, uint32_t &lo, uint32_t &hi) {
  constexpr uint32_t TL0 = 0xC0800000u, TL1 = 0xC0804000u, TH0 = 0x3F3F3F00u, TH1 = 0x40404040u;
  const uint32_t sel = qq & 0x7777u;
  const uint32_t lb = __byte_perm(TL0, TL1, sel), hb = __byte_perm(TH0, TH1, sel);
  const uint32_t plo = __byte_perm(lb, hb, 0x6240u) | ((qq << 12) & 0x8000u) | ((qq << 20) & 0x80000000u);
  const uint32_t phi = __byte_perm(lb, hb, 0x7351u) | ((qq << 8) & 0x8000u) | ((qq << 16) & 0x80000000u);
  lo = bf162_mul(plo, scale);
  hi = bf162_mul(phi, scale);
}

template <int MODE, int BN_>
__global__ void __launch_bounds__(Mg3Cfg<BN_>::THREADS, 1) moe_gemm3_kernel(const QArgs a) {
  using C = Mg3Cfg<BN_>;
  constexpr int T = ORCH_T_MXFP4;
  using SM = Mg3Smem<T, BN_>;
  constexpr int BB = type_block_bytes(T), CH = qg_chunks(BB, C::KB), RAWROW = SM::RAWROW;
  constexpr int BM = C::BM, BN = C::BN, KB = C::KB, NS = C::NS, LDS = C::LDS, THREADS = C::THREADS;
  constexpr bool DUAL = MODE == MODE_GATE_UP;
  QG_DYN_SMEM(uint8_t, smem);
  __nv_bfloat16 *Xs = reinterpret_cast<__nv_bfloat16 *>(smem);
  uint8_t *raw = smem + SM::XS;
  int *arow = reinterpret_cast<int *>(raw + SM::RAW);
  int *orow = arow + BN;
  const int tid = threadIdx.x;

  const int ty = blockIdx.y;
  if (ty >= *a.ntiles) return;
  const int e = a.tile_e[ty];
  const int base = a.exp_off[e] + a.tile_r0[ty], lim = a.exp_off[e + 1];
  const int cnt = min(BN, lim - base);
  for (int i = tid; i < BN; i += THREADS) {
    const int pos = base + i;
    arow[i] = pos < lim ? pos : -1;
    orow[i] = pos >= lim ? -1 : DUAL ? pos : a.sorted[pos];
  }
  const int64_t r0 = (int64_t)blockIdx.x * (DUAL ? BM / 2 : BM);
  const uint8_t *wb = a.w + (int64_t)e * a.expert_bytes;
  const uint8_t *wb2 = DUAL ? a.w2 + (int64_t)e * a.expert_bytes : nullptr;
  const int64_t nb = a.k / 32;
  const int nstages = (int)((nb + KB - 1) / KB);
  auto wrow = [&](int i, const uint8_t *&wbase, const uint8_t *&wend) -> int64_t {
    if constexpr (DUAL) {
      const int band = i >> 5, within = i & 31;
      wbase = within < 16 ? wb : wb2;
      wend = within < 16 ? a.w_end : a.w2_end;
      return r0 + band * 16 + (within & 15);
    } else {
      wbase = wb;
      wend = a.w_end;
      return r0 + i;
    }
  };
  __syncthreads(); // row maps

  // Copy tasks of a stage (qgemm.cu's QgStager, as the v1 kernel).
  const QgStager<BM, BN, KB, THREADS, BB, RAWROW, LDS> stg(tid, a, arow, wrow);
  auto issue = [&](int s) {
    stg.issue(s, nstages, nb, raw + (size_t)(s % NS) * BM * RAWROW, Xs + (size_t)(s % NS) * BN * LDS, a);
  };

  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  // This warp's rows all past m (the last CTA column): it only copies.
  const bool active = (DUAL ? r0 + warp * 16 : r0 + warp * 32) < a.m;
  // This lane's 4 rows (m16 tile i, +8 h): offset in a raw stage and the low
  // 4 address bits of the row start (a stage's segment starts
  // (lo4 + KB * 17 * s) % 16 bytes into its first chunk). Rows past m read stale bytes:
  // they only feed output rows that are never stored.
  int r_off[2][2];
  uint32_t r_lo4[2][2];
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int ti = warp * 32 + i * 16 + g + 8 * h;
      const uint8_t *wbase, *wend;
      const int64_t row = wrow(ti, wbase, wend);
      r_off[i][h] = ti * RAWROW;
      r_lo4[i][h] = row < a.m ? (uint32_t)((uintptr_t)(wbase + row * a.rb) & 15) : 0u;
    }
  const int b_off = ((lane >> 4) * 8 + (lane & 7)) * LDS + ((lane >> 3) & 1) * 8;
  float acc[2][C::NT][4];
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int j = 0; j < C::NT; j++)
#pragma unroll
      for (int z = 0; z < 4; z++) acc[i][j][z] = 0.f;

  // Block j of stage s -> this lane's A fragments of both k16 steps,
  // af[m16 tile][k16 step][register].
  auto decode = [&](int s, int j, uint32_t (&af)[2][2][4]) {
    const uint8_t *rs = raw + (size_t)(s % NS) * BM * RAWROW;
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const uint8_t *bp = rs + r_off[i][h] + ((r_lo4[i][h] + (uint32_t)(KB * BB) * (uint32_t)s) & 15u) + BB * j;
        const uint32_t E = bp[0];
        const uint32_t sb = E ? E << 7 : 0x0040u;
        const uint32_t scale = sb | (sb << 16);
        const uint32_t qa = (uint32_t)bp[1 + 2 * t] | (uint32_t)bp[2 + 2 * t] << 8;
        const uint32_t qb = (uint32_t)bp[9 + 2 * t] | (uint32_t)bp[10 + 2 * t] << 8;
        // row g (h = 0): registers 0 (k 2t) and 2 (k 2t + 8); row g + 8: 1 and 3
        mx_pair_bf16(qa, scale, af[i][0][h], af[i][1][h]);
        mx_pair_bf16(qb, scale, af[i][0][2 + h], af[i][1][2 + h]);
      }
  };
  // The MMAs of block j of stage s over the tile's live n8 blocks (dead
  // pairs of n-blocks branched over, warp-uniform): per pair of n-blocks both
  // k16 steps' B fragments (two ldmatrix in flight), then up to 8 MMAs.
  auto mmas = [&](int s, int j, const uint32_t (&af)[2][2][4]) {
    const __nv_bfloat16 *xs = Xs + (size_t)(s % NS) * BN * LDS;
#pragma unroll
    for (int jp = 0; jp < C::NT / 2; jp++) {
      if (jp * 16 >= cnt) break; // uniform
      uint32_t bf[2][4];
#pragma unroll
      for (int kk = 0; kk < 2; kk++) mg_ldsm_x4(bf[kk], xs + b_off + jp * 16 * LDS + j * 32 + kk * 16);
      const bool second = jp * 16 + 8 < cnt;
#pragma unroll
      for (int kk = 0; kk < 2; kk++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
          mg_mma_bf16(acc[i][2 * jp], af[i][kk], bf[kk][0], bf[kk][1]);
          if (second) mg_mma_bf16(acc[i][2 * jp + 1], af[i][kk], bf[kk][2], bf[kk][3]);
        }
    }
  };

#pragma unroll
  for (int s = 0; s < NS - 1; s++) issue(s);
  for (int s = 0; s < nstages; s++) {
    cp_async_wait<NS - 2>(); // this thread's copies of stage s have landed
    __syncthreads();         // everyone's visible; step s-1's reads of buffer (s-1) % NS done
    issue(s + NS - 1);
    if (active) {
      const int nblk = (int)min((int64_t)KB, nb - (int64_t)s * KB);
#pragma unroll
      for (int j = 0; j < KB; j++) {
        if (j >= nblk) break; // uniform: the last stage of a k that is not a multiple of BK
        uint32_t af[2][2][4];
        decode(s, j, af);
        mmas(s, j, af);
      }
    }
  }
  cp_async_wait<0>();
  if (!active) return;

  // Epilogue: lane (g, t) holds rows g, g + 8 of each m16 tile at pairs
  // 8 j + 2t, + 1 of n-block j.
#pragma unroll
  for (int j = 0; j < C::NT; j++) {
    if (j * 8 >= cnt) break;
#pragma unroll
    for (int z = 0; z < 4; z++) {
      const int col = j * 8 + 2 * t + (z & 1);
      const int o = col < cnt ? orow[col] : -1;
      if (o < 0) continue;
      if constexpr (DUAL) {
        const int64_t row = r0 + warp * 16 + g + 8 * (z >> 1);
        if (row >= a.m) continue;
        const float gv = acc[0][j][z] + (a.bias ? a.bias[(int64_t)e * a.m + row] : 0.f);
        const float uv = acc[1][j][z] + (a.bias2 ? a.bias2[(int64_t)e * a.m + row] : 0.f);
        reinterpret_cast<__nv_bfloat16 *>(a.y)[(int64_t)o * a.m + row] =
            __float2bfloat16_rn(swiglu_oai(gv, uv, a.alpha, a.limit));
      } else {
#pragma unroll
        for (int i = 0; i < 2; i++) {
          const int64_t row = r0 + warp * 32 + i * 16 + g + 8 * (z >> 1);
          if (row >= a.m) continue;
          const float v = acc[i][j][z] + (a.bias ? a.bias[(int64_t)e * a.m + row] : 0.f);
          float *yp = reinterpret_cast<float *>(a.y) + (int64_t)o * a.m + row;
          *yp = a.accumulate ? *yp + v : v;
        }
      }
    }
  }
}

template <int MODE, int BN_>
int launch_moe_gemm3(cudaStream_t st, const QArgs &a, int64_t rows_w, int64_t gy) {
  using C = Mg3Cfg<BN_>;
  constexpr size_t sm = Mg3Smem<ORCH_T_MXFP4, BN_>::TOTAL;
  static_assert(sm <= 200 * 1024, "shared memory");
  static const size_t optin = smem_optin();
  if (sm > optin) {
    orch_set_error("moe_gemm v3: tile needs %zu bytes of shared memory, the device allows %zu", sm, optin);
    return ORCH_ERR_UNSUPPORTED;
  }
  const int64_t gx = ceil_div(rows_w, MODE == MODE_GATE_UP ? C::BM / 2 : C::BM);
  cudaFuncSetAttribute(moe_gemm3_kernel<MODE, BN_>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
  void (*kern)(const QArgs) = moe_gemm3_kernel<MODE, BN_>;
  QG_LAUNCH(kern, dim3((unsigned)gx, (unsigned)gy), C::THREADS, sm, st, a);
  return ORCH_OK;
}

// Tile codes of v3: 17 = 96 pairs a tile, 19 = 64.
constexpr bool mg3_tile_ok(int tile) { return tile == 17 || tile == 19; }
constexpr int mg3_bn(int tile) { return tile == 17 ? 96 : 64; }
// Dynamic shared memory of a v3 tile's CTA (bytes).
constexpr size_t mg3_smem(int tile) {
  return tile == 17 ? Mg3Smem<ORCH_T_MXFP4, 96>::TOTAL : Mg3Smem<ORCH_T_MXFP4, 64>::TOTAL;
}
template <int MODE>
int launch_moe_gemm3_tile(cudaStream_t st, const QArgs &a, int tile, int64_t rows_w, int64_t gy) {
  return tile == 17 ? launch_moe_gemm3<MODE, 96>(st, a, rows_w, gy) : launch_moe_gemm3<MODE, 64>(st, a, rows_w, gy);
}
