// moe_wg.cuh — grouped MoE expert GEMM v4 on wgmma (sm_90a; tile codes 30
// and 32 of orch_moe_ffn_grouped, and the v4 half of the hybrid 36,
// ORCH_CUDA_MOEGEMM=v4; session 6, issue 7).
// Included by qgemm.cu inside its anonymous namespace after moe_gemm.cuh: it
// reuses QArgs, the cp.async wrappers, v3's MXFP4 pair decode (mx_pair_bf16)
// and the route (bucketing, gather, tile plan, combine). MXFP4 weights only.
//
// Versus v3 (mma.sync m16n8k16, 384 W rows x 96 pairs a CTA): v3's time is
// mostly a per-tile cost (session 5 fit: ~16 us of whole-GPU time each time
// an expert's 13.2 MB are streamed and decoded, 2/3 of n = 512 and ~65% of
// n = 2048), so v4 makes the tiles of pairs wider:
//  - wgmma.mma_async m64nNk16 (bf16 -> f32) with A = the W rows FROM
//    REGISTERS: the register A fragment of wgmma is, per warp w of the
//    warpgroup, mma.sync's m16n8k16 A fragment of rows 16w..16w+15, so v3's
//    decode (each lane decodes the MXFP4 bytes of its own fragment straight
//    into registers) carries over unchanged; one decoded weight now feeds up
//    to N = 256 pairs (v3: 96), and the MMA runs asynchronously while the
//    warp decodes the next stage (A fragments double-buffered, wait_group 1);
//  - B = the pairs' activations (bf16, K-major) from shared memory in the
//    canonical 128-byte-swizzle layout (moe_wg_layout.cuh), loaded with
//    cp.async 16-byte chunks (the W bytes as v3);
//  - N is picked per CTA from the tile's pair count (4 steps of BN / 4), so
//    a ragged last tile of an expert does not pay for BN columns;
//  - CTA = 2 consumer warpgroups (256 threads), each MW m64 tiles of W rows:
//    tile 30 = MW 1, BN 256 (128 W rows x 256 pairs); tile 32 = the same with
//    B loaded by TMA. (Session 7 deleted tile 31 = MW 2, BN 128, its TMA
//    twin 33 and the two-CTA TMA-multicast clusters 34 / 35: none was faster
//    than 30 in session 6's device runs.) gate_up: each 16 W rows are 8 gate rows then the same
//    8 up rows, so D rows g and g + 8 of a thread are gate and up of one ff
//    row and the clamped SwiGLU (v3's swiglu_oai) runs on the accumulators.
//  - 5 stages of 64 k (2 MXFP4 blocks), prefetch distance 3 (stage s - 1's
//    B may still be read by the in-flight wgmma while s is decoded).
// Everything index-like (swizzle, descriptor, fragments, row map) is in
// moe_wg_layout.cuh and checked on the host (cuda/test/moe_wg_layout_test.cpp);
// the CPU emulation cannot run wgmma, so the kernel itself is checked on the
// device against the float64 reference (TestMoEGrouped tiles 30 / 32 / 36) and
// against v1 (TestPerfMoEPrefill).
// Built only where __CUDA_ARCH_FEAT_SM90_ALL is defined (CUDA >= 12, -arch
// sm_90a); elsewhere the kernel is an empty stub and mg4_available() is false,
// so tile 0 keeps v3 and an explicit 30 / 32 returns ORCH_ERR_UNSUPPORTED.
#pragma once
#include "moe_wg_layout.cuh"
#include "moe_wg_mma.cuh"

template <int MW_, int BN_>
struct Mg4Cfg {
  static constexpr int MW = MW_, BN = BN_, WGS = 2, THREADS = WGS * 128, BM = WGS * MW * 64;
  static constexpr int KB = 2, BK = 32 * KB, NS = 5, D = NS - 2; // D: stages in flight ahead
  static constexpr int NSTEP = BN / 4;                               // N granularity of a CTA's wgmma
  static_assert(BK == 64, "one 128-byte swizzle row of bf16 per stage");
  static_assert(MW * BN / 2 <= 128, "accumulators");
  static_assert(NSTEP % 32 == 0, "N steps");
};

template <int MW_, int BN_>
struct Mg4Smem {
  using C = Mg4Cfg<MW_, BN_>;
  static constexpr int RAWROW = 16 * (qg_chunks(type_block_bytes(ORCH_T_MXFP4), C::KB) | 1);
  static constexpr size_t XS1 = (size_t)C::BN * 128;       // one B stage (whole 1024-byte atoms)
  static constexpr size_t RAW1 = (size_t)C::BM * RAWROW;   // one raw W stage
  static constexpr size_t TOTAL = 1024 + C::NS * (XS1 + RAW1) + 2 * C::BN * 4 + C::NS * 8; // + alignment slack, mbarriers
  static_assert(XS1 % 1024 == 0, "atoms");
};

// A CUtensorMap (128 opaque bytes, 64-aligned) as the kernel sees it; the
// type exists in every build, the encoder only with CUDA >= 12 (mg4_tmap).
struct alignas(64) Mg4Tmap {
  uint64_t w[16];
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// mbarrier / TMA (B of tile 32): one barrier a stage, armed by thread 0
// with the stage's byte count, completed by the TMA loads' transactions.
__device__ __forceinline__ void mb_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mb_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Bounded: a TMA that never completes (a mistake here, untestable off the
// device) must not hang the process and the test suite behind it: after
// ~2^31 clocks (~1 s) the wait gives up and the result is garbage, which the
// GPU tests report as an error.
__device__ __forceinline__ void mb_wait(uint32_t bar, uint32_t parity) {
  const long long t0 = clock64();
  for (;;) {
    uint32_t done;
    asm volatile("{\n.reg .pred P1;\nmbarrier.try_wait.parity.shared::cta.b64 P1, [%1], %2;\nselp.u32 %0, 1, 0, P1;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
    if (done || clock64() - t0 > (1ll << 31)) return;
  }
}
// Box (64 k, rows) at (k c0, row c1) of the 2D bf16 tensor map -> dst (128-byte swizzled).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const Mg4Tmap *tm, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tm)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async wrote B through the generic proxy; wgmma reads it through the async proxy.
__device__ __forceinline__ void wg_fence_proxy() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Pins the accumulators in place (CUTLASS's warpgroup_fence_operand): without
// it ptxas sees the zero-init moves / epilogue reads float into the wgmma
// pipeline and serializes every wgmma (C7515); with it, 0 warnings.
template <int CAP>
__device__ __forceinline__ void wg_pin(float (&d)[CAP]) {
#pragma unroll
  for (int i = 0; i < CAP; i++) asm volatile("" : "+f"(d[i])::"memory");
}
// One k16 step of a warpgroup's m64 tile over N = nsel * BN / 4 pairs.
template <int BN, int CAP>
__device__ __forceinline__ void mg4_mma(int nsel, float (&d)[CAP], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (BN == 256) {
    switch (nsel) {
      case 1: wg_mma_n64(d, a, desc); break;
      case 2: wg_mma_n128(d, a, desc); break;
      case 3: wg_mma_n192(d, a, desc); break;
      default: wg_mma_n256(d, a, desc); break;
    }
  } else {
    static_assert(BN == 256, "BN: tile 30 / 32 only (session 7)");
  }
}
#endif

// TMA: B (the pairs' activations) through cp.async.bulk.tensor (tmb: a 2D
// map over the bf16 rows, box 64 k x NSTEP rows, 128-byte swizzle: the same
// layout as the cp.async path writes), nsel boxes a stage issued by thread 0,
// completion on a per-stage mbarrier; else 16-byte cp.async by all threads.
template <int MODE, int MW, int BN, bool TMA>
__global__ void __launch_bounds__(Mg4Cfg<MW, BN>::THREADS, 1)
    moe_gemm4_kernel(const QArgs a, const __grid_constant__ Mg4Tmap tmb) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Mg4Cfg<MW, BN>;
  using SM = Mg4Smem<MW, BN>;
  constexpr int BB = type_block_bytes(ORCH_T_MXFP4), CH = qg_chunks(BB, C::KB), RAWROW = SM::RAWROW;
  constexpr int BM = C::BM, KB = C::KB, NS = C::NS, D = C::D, THREADS = C::THREADS;
  constexpr bool DUAL = MODE == MODE_GATE_UP;
  extern __shared__ __align__(16) uint8_t mg4_dsm[]; // 16, not 1024: the runtime guarantees no more, so the
  // compiler must not fold the alignment fix below
  // SW128 atoms must sit on 1024-byte shared-memory addresses.
  const uint32_t s0 = (uint32_t)__cvta_generic_to_shared(mg4_dsm);
  uint8_t *smem = mg4_dsm + ((1024u - (s0 & 1023u)) & 1023u);
  uint8_t *xs = smem;
  const uint32_t sxs = (uint32_t)__cvta_generic_to_shared(xs);
  uint8_t *raw = smem + NS * SM::XS1;
  int *arow = reinterpret_cast<int *>(raw + NS * SM::RAW1);
  int *orow = arow + BN;
  const uint32_t sbar = (uint32_t)__cvta_generic_to_shared(orow + BN); // NS mbarriers (8-aligned)
  const int tid = threadIdx.x;

  const int ty = blockIdx.y;
  if (ty >= *a.ntiles) return; // uniform
  const int e = a.tile_e[ty];
  const int base = a.exp_off[e] + a.tile_r0[ty], lim = a.exp_off[e + 1];
  const int cnt = min(BN, lim - base);
  for (int i = tid; i < BN; i += THREADS) {
    const int pos = base + i;
    arow[i] = pos < lim ? pos : -1;
    orow[i] = pos >= lim ? -1 : DUAL ? pos : a.sorted[pos];
  }
  if (TMA && tid == 0) {
#pragma unroll
    for (int i = 0; i < NS; i++) mb_init(sbar + 8 * i, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); // (the PTX form; a CTA is its own cluster)
  }
  const int nsel = min(4, (cnt + C::NSTEP - 1) / C::NSTEP); // N = nsel * NSTEP
  const int64_t r0 = (int64_t)blockIdx.x * (DUAL ? BM / 2 : BM);
  const uint8_t *wb = a.w + (int64_t)e * a.expert_bytes;
  const uint8_t *wb2 = DUAL ? a.w2 + (int64_t)e * a.expert_bytes : nullptr;
  const int64_t nb = a.k / 32;
  const int nstages = (int)((nb + KB - 1) / KB);
  __syncthreads(); // row maps, mbarriers

  // W copy tasks (as v3): BM rows x CH 16-byte chunks a stage.
  constexpr int WPT = BM * CH / THREADS;
  static_assert(WPT * THREADS == BM * CH, "W copy tasks");
  const uint8_t *w_row[WPT];
  uint32_t w_pk[WPT];
#pragma unroll
  for (int u = 0; u < WPT; u++) {
    const int q = tid + u * THREADS, i = q / CH, c = q % CH;
    int up;
    const int64_t row = wg_w_row(i, DUAL, r0, &up);
    w_row[u] = row < a.m ? (up ? wb2 : wb) + row * a.rb : nullptr;
    w_pk[u] = (uint32_t)(i * RAWROW + 16 * c) | (uint32_t)c << 16 | (uint32_t)up << 24;
  }
  // B copy tasks: BN rows x 8 chunks (64 bf16) a stage; this thread's chunk
  // is tid % 8 of rows tid / 8 + 32 u: source pointers computed once (SASS of
  // the first version: ~140 of ~520 instructions a warp issued per stage were
  // these copies' 64-bit address math); destinations u * 4096 apart.
  constexpr int BPT = BN * 8 / THREADS;
  const int bc = tid & 7;
  const uint32_t b_dst = wg_sw128_off((uint32_t)(tid >> 3), (uint32_t)bc);
  static_assert(wg_sw128_off(32, 0) == 4096 && wg_sw128_off(33, 1) == 4096 + wg_sw128_off(1, 1), "rows 32 apart: same swizzle phase");
  const __nv_bfloat16 *b_src[BPT];
#pragma unroll
  for (int u = 0; u < BPT; u++) {
    const int ar = arow[(tid >> 3) + 32 * u];
    b_src[u] = ar >= 0 ? a.xa + (int64_t)ar * a.k + 8 * bc : nullptr;
  }

  auto issue = [&](int s) {
    if (s < nstages) {
      const int64_t kb0 = (int64_t)s * KB;
      const int nblk = (int)min((int64_t)KB, nb - kb0);
      uint8_t *dst = raw + (size_t)(s % NS) * SM::RAW1;
      // Chunk c of the 16-aligned span from the stage's segment start, always
      // (v3 skips the chunks past the segment; copying them reads bytes of
      // the same tensor that the decode never uses), cut at the tensor's end.
#pragma unroll
      for (int u = 0; u < WPT; u++) {
        if (!w_row[u]) continue;
        const uint64_t addr = ((uint64_t)(w_row[u] + kb0 * BB) & ~(uint64_t)15) + ((w_pk[u] >> 12) & 0xff0u);
        const int bytes = qg_chunk_bytes(addr, (uint64_t)((w_pk[u] >> 24) ? a.w2_end : a.w_end));
        if (bytes > 0) cp_async16(dst + (w_pk[u] & 0xffffu), reinterpret_cast<const void *>(addr), bytes);
      }
      (void)nblk;
      if constexpr (TMA) {
        if (tid == 0) {
          const uint32_t bar = sbar + 8 * (s % NS), xd = sxs + (uint32_t)((s % NS) * SM::XS1);
          mb_expect_tx(bar, (uint32_t)(nsel * C::NSTEP * 128)); // all boxes, whoever loads them
          for (int j = 0; j < nsel; j++)
            tma_load_2d(xd + (uint32_t)(j * C::NSTEP * 128), &tmb, bar, (int)(kb0 * 32), base + j * C::NSTEP);
        }
      } else {
        uint8_t *xd = xs + (size_t)(s % NS) * SM::XS1 + b_dst;
        const int64_t col = kb0 * 32; // + 8 bc, in b_src
        const bool colok = col + 8 * bc < a.k;
#pragma unroll
        for (int u = 0; u < BPT; u++) {
          if (!b_src[u]) continue;
          cp_async16(xd + 4096 * u, b_src[u] + (colok ? col : 0), colok ? 16 : 0);
        }
      }
    }
    cp_async_commit();
  };

  const int warp = tid >> 5, lane = tid & 31, wg = warp >> 2, wq = warp & 3, g = lane >> 2, t = lane & 3;
  // This warpgroup's rows all past m (the last CTA column): it only copies.
  const bool active = (DUAL ? r0 + wg * MW * 32 : r0 + wg * MW * 64) < a.m;
  // This lane's rows: m64 tile mi, D / A row g + 8 h of warp wq.
  int r_off[MW][2];
  uint32_t r_lo4[MW][2];
#pragma unroll
  for (int mi = 0; mi < MW; mi++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int i = (wg * MW + mi) * 64 + 16 * wq + g + 8 * h;
      int up;
      const int64_t row = wg_w_row(i, DUAL, r0, &up);
      r_off[mi][h] = i * RAWROW;
      r_lo4[mi][h] = row < a.m ? (uint32_t)((uintptr_t)((up ? wb2 : wb) + row * a.rb) & 15) : 0u;
    }
  float acc[MW][BN / 2];
#pragma unroll
  for (int mi = 0; mi < MW; mi++)
#pragma unroll
    for (int z = 0; z < BN / 2; z++) acc[mi][z] = 0.f;
#pragma unroll
  for (int mi = 0; mi < MW; mi++) wg_pin(acc[mi]);

  // Stage s's blocks -> this lane's A fragments af[mi][k16 step][register]
  // (v3's decode: low nibbles = the block's first k16 step, high = second).
  auto decode = [&](int s, uint32_t (&af)[MW][2 * KB][4]) {
    const uint8_t *rs = raw + (size_t)(s % NS) * SM::RAW1;
#pragma unroll
    for (int mi = 0; mi < MW; mi++)
#pragma unroll
      for (int h = 0; h < 2; h++)
#pragma unroll
        for (int j = 0; j < KB; j++) {
          const uint8_t *bp = rs + r_off[mi][h] + ((r_lo4[mi][h] + (uint32_t)(KB * BB) * (uint32_t)s) & 15u) + BB * j;
          const uint32_t E = bp[0];
          const uint32_t sb = E ? E << 7 : 0x0040u;
          const uint32_t scale = sb | (sb << 16);
          const uint32_t qa = (uint32_t)bp[1 + 2 * t] | (uint32_t)bp[2 + 2 * t] << 8;
          const uint32_t qb = (uint32_t)bp[9 + 2 * t] | (uint32_t)bp[10 + 2 * t] << 8;
          mx_pair_bf16(qa, scale, af[mi][2 * j][h], af[mi][2 * j + 1][h]);
          mx_pair_bf16(qb, scale, af[mi][2 * j][2 + h], af[mi][2 * j + 1][2 + h]);
        }
  };
  auto step = [&](int s, uint32_t (&af)[MW][2 * KB][4]) {
    cp_async_wait<D - 1>();      // this thread's copies of stage s have landed
    if (!TMA) wg_fence_proxy();  // ... and are visible to wgmma's (async proxy) reads
    __syncthreads();             // everyone's; stage s-2's decode and wgmma done (wait_group 1 below)
    issue(s + D);                // into stage s-2's buffers
    if (active) {
      const int nblk = (int)min((int64_t)KB, nb - (int64_t)s * KB);
      decode(s, af);
      if (TMA) mb_wait(sbar + 8 * (s % NS), (uint32_t)((s / NS) & 1)); // stage s's B has landed
#pragma unroll
      for (int mi = 0; mi < MW; mi++) wg_pin(acc[mi]);
      wg_fence();
      const uint32_t xb = sxs + (uint32_t)((s % NS) * SM::XS1);
#pragma unroll
      for (int kk = 0; kk < 2 * KB; kk++) {
        if (kk >= 2 * nblk) break; // uniform: the last stage of an odd block count
        const uint64_t desc = wg_desc_sw128(xb + 32u * kk);
#pragma unroll
        for (int mi = 0; mi < MW; mi++) mg4_mma<BN>(nsel, acc[mi], af[mi][kk], desc);
      }
      wg_commit();
      wg_wait<1>(); // stage s-1's MMAs done: its A registers and B buffer are free
#pragma unroll
      for (int mi = 0; mi < MW; mi++) wg_pin(acc[mi]);
    }
  };

#pragma unroll
  for (int s = 0; s < D; s++) issue(s);
  uint32_t af0[MW][2 * KB][4], af1[MW][2 * KB][4];
  int s = 0;
  for (; s + 1 < nstages; s += 2) {
    step(s, af0);
    step(s + 1, af1);
  }
  if (s < nstages) step(s, af0);
  cp_async_wait<0>();
  if (!active) return;
  wg_wait<0>();
#pragma unroll
  for (int mi = 0; mi < MW; mi++) wg_pin(acc[mi]);

  // Epilogue: d[4j + z] = (row 16 wq + g + 8 (z >> 1), pair 8 j + 2 t + (z & 1)).
#pragma unroll
  for (int mi = 0; mi < MW; mi++)
#pragma unroll
    for (int j = 0; j < BN / 8; j++) {
      if (j * 8 >= cnt) break;
#pragma unroll
      for (int z = 0; z < 4; z++) {
        if (DUAL && z >= 2) break;
        const int col = j * 8 + 2 * t + (z & 1);
        const int o = col < cnt ? orow[col] : -1;
        if (o < 0) continue;
        if constexpr (DUAL) {
          const int64_t row = r0 + (wg * MW + mi) * 32 + 8 * wq + g;
          if (row >= a.m) continue;
          const float gv = acc[mi][4 * j + z] + (a.bias ? a.bias[(int64_t)e * a.m + row] : 0.f);
          const float uv = acc[mi][4 * j + z + 2] + (a.bias2 ? a.bias2[(int64_t)e * a.m + row] : 0.f);
          reinterpret_cast<__nv_bfloat16 *>(a.y)[(int64_t)o * a.m + row] =
              __float2bfloat16_rn(swiglu_oai(gv, uv, a.alpha, a.limit));
        } else {
          const int64_t row = r0 + (wg * MW + mi) * 64 + 16 * wq + g + 8 * (z >> 1);
          if (row >= a.m) continue;
          const float v = acc[mi][4 * j + z] + (a.bias ? a.bias[(int64_t)e * a.m + row] : 0.f);
          float *yp = reinterpret_cast<float *>(a.y) + (int64_t)o * a.m + row;
          *yp = a.accumulate ? *yp + v : v;
        }
      }
    }
#else
  (void)a; // not built for sm_90a: mg4_available() is false and nothing launches this
#endif
}

// Tile codes of v4: 30 = 128 W rows x 256 pairs (MW 1), 32 = the same with
// B loaded by TMA (31 / 33 / 34 / 35 were deleted in session 7).
constexpr bool mg4_tile_ok(int tile) { return tile == 30 || tile == 32; }
constexpr int mg4_bn(int) { return 256; }
constexpr size_t mg4_smem(int) { return Mg4Smem<1, 256>::TOTAL; }

// Whether this library holds the sm_90a build of v4 for the current device:
// the stub that other targets compile has no accumulators, the real kernel
// well over 128 registers (cudaFuncGetAttributes: no stream work, so this is
// safe inside a graph capture).
bool mg4_available() {
#ifdef ORCH_EMU
  return false;
#else
  static const bool ok = [] {
    cudaFuncAttributes fa{};
    if (cudaFuncGetAttributes(&fa, moe_gemm4_kernel<MODE_DOWN, 1, 256, false>) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return fa.numRegs >= 128;
  }();
  return ok;
#endif
}

// The TMA map of B: a.xa as rows of a.k bf16, a.n rows (the pairs), box 64 k
// x box_rows, 128-byte swizzle, zero fill outside. False where the driver's
// encoder is not at hand (built with CUDA < 12, or no libcuda symbol).
bool mg4_tmap(Mg4Tmap *m, const QArgs &a, int box_rows) {
#if defined(ORCH_MG4_TMA_HOST)
  using Enc = CUresult (*)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *,
                           const cuuint64_t *, const cuuint32_t *, const cuuint32_t *, CUtensorMapInterleave,
                           CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  // dlsym instead of cudaGetDriverEntryPoint (renamed / versioned across CUDA 12 .. 13).
  static const Enc enc = [] {
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!h) h = dlopen("libcuda.so.1", RTLD_NOW);
    return h ? reinterpret_cast<Enc>(dlsym(h, "cuTensorMapEncodeTiled")) : (Enc) nullptr;
  }();
  // CUDA 13 declares CUtensorMap with a larger alignment than CUDA 12's 64 (the device built with 13 failed a
  // static_assert here): encode into a real CUtensorMap and copy its 128 bytes into the 64-aligned kernel parameter
  // (TMA needs the descriptor 64-byte aligned); a size mismatch turns the TMA tiles off instead of failing the build.
  static_assert(sizeof(Mg4Tmap) == 128, "Mg4Tmap is 16 qwords");
  if (!enc || a.n <= 0 || sizeof(CUtensorMap) != sizeof(Mg4Tmap)) return false;
  const cuuint64_t dims[2] = {(cuuint64_t)a.k, (cuuint64_t)a.n};
  const cuuint64_t strides[1] = {(cuuint64_t)a.k * 2};
  const cuuint32_t box[2] = {64, (cuuint32_t)box_rows};
  const cuuint32_t es[2] = {1, 1};
  CUtensorMap tm;
  if (enc(&tm, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<__nv_bfloat16 *>(a.xa), dims, strides, box, es,
          CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return false;
  memcpy(m, &tm, sizeof(Mg4Tmap));
  return true;
#else
  (void)m, (void)a, (void)box_rows;
  return false;
#endif
}

template <int MODE, int MW, int BN, bool TMA>
int launch_moe_gemm4(cudaStream_t st, const QArgs &a, int64_t rows_w, int64_t gy) {
  using C = Mg4Cfg<MW, BN>;
  constexpr size_t sm = Mg4Smem<MW, BN>::TOTAL;
  static_assert(sm <= 227 * 1024, "shared memory");
  static const size_t optin = smem_optin();
  if (!mg4_available()) {
    orch_set_error("moe_gemm v4: not built for this device (needs CUDA >= 12 and sm_90a)");
    return ORCH_ERR_UNSUPPORTED;
  }
  if (sm > optin) {
    orch_set_error("moe_gemm v4: tile needs %zu bytes of shared memory, the device allows %zu", sm, optin);
    return ORCH_ERR_UNSUPPORTED;
  }
  Mg4Tmap tm{};
  if (TMA && !mg4_tmap(&tm, a, C::NSTEP)) {
    orch_set_error("moe_gemm v4 (TMA): could not encode the activations' tensor map");
    return ORCH_ERR_UNSUPPORTED;
  }
  const int64_t gx = ceil_div(rows_w, MODE == MODE_GATE_UP ? C::BM / 2 : C::BM);
  cudaFuncSetAttribute(moe_gemm4_kernel<MODE, MW, BN, TMA>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
  void (*kern)(const QArgs, const Mg4Tmap) = moe_gemm4_kernel<MODE, MW, BN, TMA>;
  QG_LAUNCH(kern, dim3((unsigned)gx, (unsigned)gy), C::THREADS, sm, st, a, tm);
  return ORCH_OK;
}

template <int MODE>
int launch_moe_gemm4_tile(cudaStream_t st, const QArgs &a, int tile, int64_t rows_w, int64_t gy) {
  switch (tile) {
    case 30: return launch_moe_gemm4<MODE, 1, 256, false>(st, a, rows_w, gy);
    default: return launch_moe_gemm4<MODE, 1, 256, true>(st, a, rows_w, gy);
  }
}
