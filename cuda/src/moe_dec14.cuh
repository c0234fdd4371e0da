// moe_dec14.cuh — MoE v14 gate_up (session 9, opt-in ORCH_CUDA_MOE14=1): v10's
// gate_up as a one-wave persistent kernel whose warps stream their row pairs
// through a per-warp ring of STG shared-memory stages filled by 16-byte
// cp.async, so that one warp's decode overlaps the loads of its next STG
// row pairs (and the other warps' loads), instead of v10's generations of
// CTAs that load together and then compute together (ncu, session 9 run 1:
// DRAM 46%, issue 51%, 3 local spills a warp, 71% excessive L1->L2 sectors
// from the 5 x 4-byte loads at a 17-byte lane stride).
//
// Work: item q = one (token, slot, row) = the gate row and the up row of
// expert ids[t, s] (2 x rb bytes), q = t * n_slots * m + s * m + row; warp g
// of G = grid x MOE14_W takes items g, g + G, ... (consecutive warps take
// consecutive rows: DRAM locality as v10). A row is copied as the aligned-down
// 16-byte chunks covering [off, off + rb) (off = its byte offset; the last
// chunk reads only up to the 4-byte word holding the row's last byte, as
// ffn_load, the rest zero-filled), so block c of the row starts at byte
// (off & 15) + c * BB of the stage, with the same byte offset within its
// aligned word as in global memory: the lane reads the same 5 words ffn_load
// would, from shared memory, and decodes them with v6's moe6_block_acc. Lane l
// computes chunks l, l + 32, ... in that order and the warp sums as v10: the
// activation is v10's bit for bit (cuda/test/moe_emu_test.cpp). The staged x
// of every token (route kernel) is copied once per CTA.
#pragma once

constexpr int MOE14_W = 8; // warps per CTA
#if defined(ORCH_EMU)
inline int g_moe14_launches[3]; // emulation test hook: v14 gate_up / down / route launches
#endif
constexpr int MOE14_R = 4; // 16-byte copies a lane a row at most: rows up to 2,030 bytes (MXFP4 dim <= 3,808)

// 16-byte cp.async (src 16-aligned; the first `bytes` read, the rest zeroed).
#if defined(ORCH_EMU)
#if defined(GEMV9_EMU_CP_ASYNC) // the test's late-landing copies (decode_emu_test.cpp / moe_emu_test.cpp)
inline void moe14_cp16(void *d, const void *s, int bytes) { gemv9_emu_cp_async(d, s, bytes); }
inline void moe14_commit() { gemv9_emu_commit(); }
template <int N> inline void moe14_wait() { gemv9_emu_wait(N); }
#else
inline void moe14_cp16(void *d, const void *s, int bytes) {
  memcpy(d, s, (size_t)bytes);
  memset(static_cast<char *>(d) + bytes, 0, (size_t)(16 - bytes));
}
inline void moe14_commit() {}
template <int N> inline void moe14_wait() {}
#endif
#else
__device__ __forceinline__ void moe14_cp16(void *d, const void *s, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned a = (unsigned)__cvta_generic_to_shared(d);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(s), "r"(bytes) : "memory");
#else
  for (int i = 0; i < 16; i++) static_cast<uint8_t *>(d)[i] = i < bytes ? static_cast<const uint8_t *>(s)[i] : 0;
#endif
}
__device__ __forceinline__ void moe14_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void moe14_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif

// Bulk copies (ORCH_CUDA_MOE14_BULK=1, gate_up14): lane 0 copies a whole row with one
// cp.async.bulk (PTX 8.0: CUDA 12, sm_90) completing on the stage's mbarrier,
// instead of 32 lanes x 4 cp.async of 16 bytes (~120 of ~790 instructions a
// row pair). Without PTX 8.0 (CUDA 11.8 / sm_80 builds) the lanes copy the row
// synchronously (correct, slow: such builds never run the H100 benches); the
// emulation lands lane 0's copies at its wait (as the cp.async groups).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDACC_VER_MAJOR__) && __CUDACC_VER_MAJOR__ >= 12
#define MOE14_BULK_PTX 1
#endif
#if defined(__CUDACC__) || defined(ORCH_EMU)
// Stage barrier init (lane 0; the warp syncs after).
__device__ __forceinline__ void moe14_bar_init(uint64_t *bar) {
#if defined(MOE14_BULK_PTX)
  const unsigned b = (unsigned)__cvta_generic_to_shared(bar);
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n\tfence.mbarrier_init.release.cluster;" ::"r"(b) : "memory");
#else
  (void)bar;
#endif
}
// Row [src, src + bytes) (16-aligned, bytes % 16 == 0) into dst (two rows: dst2 / src2) on bar; every lane calls it.
__device__ __forceinline__ void moe14_bulk2(uint8_t *dst, const uint8_t *src, uint8_t *dst2, const uint8_t *src2,
                                            int bytes, uint64_t *bar, int lane) {
#if defined(MOE14_BULK_PTX)
  if (lane == 0) {
    const unsigned b = (unsigned)__cvta_generic_to_shared(bar);
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst), d2 = (unsigned)__cvta_generic_to_shared(dst2);
    // the warp's generic reads of the stage (synced before this call) before the async-proxy writes
    asm volatile("fence.proxy.async.shared::cta;\n\t"
                 "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b),
                 "r"(2 * bytes)
                 : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(d),
                 "l"(src), "r"(bytes), "r"(b)
                 : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(d2),
                 "l"(src2), "r"(bytes), "r"(b)
                 : "memory");
  }
#elif defined(ORCH_EMU)
  (void)bar;
  if (lane == 0)
    for (int c = 0; c < bytes; c += 16) {
      moe14_cp16(dst + c, src + c, 16);
      moe14_cp16(dst2 + c, src2 + c, 16);
    }
#else
  (void)bar;
  for (int c = 16 * lane; c < bytes; c += 512) {
    *reinterpret_cast<uint4 *>(dst + c) = *reinterpret_cast<const uint4 *>(src + c);
    *reinterpret_cast<uint4 *>(dst2 + c) = *reinterpret_cast<const uint4 *>(src2 + c);
  }
#endif
}
// After every issue (copies or none): the emulation's group (lane 0's).
__device__ __forceinline__ void moe14_bulk_commit(int lane) {
#if defined(ORCH_EMU)
  if (lane == 0) moe14_commit();
#else
  (void)lane;
#endif
}
// Waits for the stage's copies (phase parity of its k-th use).
template <int STG> __device__ __forceinline__ void moe14_bulk_wait(uint64_t *bar, uint32_t parity, int lane) {
#if defined(MOE14_BULK_PTX)
  (void)lane;
  const unsigned b = (unsigned)__cvta_generic_to_shared(bar);
  for (;;) {
    uint32_t done;
    asm volatile("{\n.reg .pred P1;\nmbarrier.try_wait.parity.shared::cta.b64 P1, [%1], %2;\nselp.u32 %0, 1, 0, P1;\n}"
                 : "=r"(done)
                 : "r"(b), "r"(parity)
                 : "memory");
    if (done) return;
  }
#elif defined(ORCH_EMU)
  (void)bar;
  (void)parity;
  if (lane == 0) moe14_wait<STG - 1>();
#else
  (void)bar;
  (void)parity;
  (void)lane;
#endif
}
#endif

// Bytes of one row's stage slot: the 16-byte chunks covering rb bytes at any offset.
// (off & 15) + rb bytes rounded up to a 4-byte word: at most rb + 18.
static inline int moe14_row_slot(int64_t rb) { return (int)((rb + 18 + 15) / 16 * 16); }
// Dynamic shared memory: n tokens' staged x, then MOE14_W x STG x (gate, up) slots.
static inline size_t moe14_smem(int n, int nch, int64_t rb, int stg) {
  return (size_t)n * moe10_xstride(nch) * 4 + (size_t)MOE14_W * stg * 2 * moe14_row_slot(rb);
}

#if defined(__CUDACC__) || defined(ORCH_EMU)
// acth: v10's staged activation; xg: the route kernel's staged x (n tokens);
// rs: moe14_row_slot(rb). Items I = n * n_slots * m.
// BULK: rows by cp.async.bulk on per-stage mbarriers (MOE14_W x STG x 8 bytes after the ring).
template <int T, int STG, bool BULK>
__global__ void __launch_bounds__(MOE14_W * 32, 3) // <= 80 registers
moe_gate_up14_kernel(uint16_t *__restrict__ acth, const uint4 *xg, const uint8_t *__restrict__ wg,
                     const uint8_t *__restrict__ wu, const float *__restrict__ gb, const float *__restrict__ ub,
                     const int32_t *ids, int n, int n_slots, int k, int m, int64_t rb, int rs, float alpha,
                     float limit, float sc) {
  static_assert(STG >= 2, "a ring of at least two stages");
  constexpr int BB = type_block_bytes(T), BW = block_words<T>(), NB = 3; // NB: blocks a lane a round (unrolled)
  DEC16_DYN_SMEM(uint32_t, xsm);
  pdl_wait(); // ids / staged x come from the route kernel; act is read by earlier ones
  pdl_trigger(); // after the wait: down reads the routing before its own wait (v6)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nch = k / 32, xs4 = moe10_xstride(nch) / 4;
  uint8_t *ring0 = reinterpret_cast<uint8_t *>(xsm + (int64_t)n * xs4 * 4);
  uint8_t *ring = ring0 + (int64_t)warp * STG * 2 * rs;
  uint64_t *bars = reinterpret_cast<uint64_t *>(ring0 + (int64_t)MOE14_W * STG * 2 * rs) + warp * STG;
  if constexpr (BULK) {
    if (lane == 0)
      for (int i = 0; i < STG; i++) moe14_bar_init(bars + i);
    __syncwarp();
  }
  const int G = (int)gridDim.x * MOE14_W, g = (int)blockIdx.x * MOE14_W + warp;
  const int I = n * n_slots * m;
  const int nit = g < I ? (I - 1 - g) / G + 1 : 0;
  // Item cursors (pair p = t * n_slots + s, row): item g + j G, advanced by G without divisions.
  struct cursor {
    int p, row;
  };
  auto advance = [&](cursor &c) {
    c.row += G;
    while (c.row >= m) {
      c.row -= m;
      c.p++;
    }
  };
  cursor ci{0, g}, cc{0, g};
  while (ci.row >= m) { // g >= m only where the grid has more warps than rows
    ci.row -= m;
    ci.p++;
  }
  cc = ci;
  // The next item (ci) into stage j % STG; an empty group past the last (the wait counts stay uniform).
// STG items are in flight: item j + STG is issued into item j's stage once item j is decoded.
  auto issue = [&](int j) {
    if constexpr (BULK) { // whole 16-byte chunks (the tensors end on 16 bytes: launcher)
      if (j < nit) {
        const int64_t off = ((int64_t)ids[ci.p] * m + ci.row) * rb;
        const int64_t a0 = off & ~(int64_t)15;
        const int bytes = (int)((((off + rb + 3) & ~(int64_t)3) - a0 + 15) & ~(int64_t)15);
        uint8_t *d = ring + (j % STG) * 2 * rs;
        moe14_bulk2(d, wg + a0, d + rs, wu + a0, bytes, bars + j % STG, lane);
        advance(ci);
      }
      moe14_bulk_commit(lane);
      return;
    }
    if (j < nit) {
      const int64_t off = ((int64_t)ids[ci.p] * m + ci.row) * rb;
      const int64_t a0 = off & ~(int64_t)15;
      const int rend = (int)(((off + rb + 3) & ~(int64_t)3) - a0); // bytes to copy from a0 (ffn_load's last word)
      uint8_t *d = ring + (j % STG) * 2 * rs + 16 * lane;
      const uint8_t *sgp = wg + a0 + 16 * lane, *sup = wu + a0 + 16 * lane;
#pragma unroll
      for (int i = 0; i < MOE14_R; i++) {
        const int b = rend - 16 * (lane + 32 * i);
        if (b > 0) {
          moe14_cp16(d + 512 * i, sgp + 512 * i, b < 16 ? b : 16);
          moe14_cp16(d + rs + 512 * i, sup + 512 * i, b < 16 ? b : 16);
        }
      }
      advance(ci);
    }
    moe14_commit();
  };
#pragma unroll
  for (int j = 0; j < STG; j++) issue(j); // every stage in flight
  moe10_copy<2>(reinterpret_cast<uint4 *>(xsm), xg, n * xs4); // every token's staged x
  __syncthreads();
  int cs = 0, ct = 0; // cc's slot and token
  for (int j = 0; j < nit; j++) {
    if constexpr (BULK)
      moe14_bulk_wait<STG>(bars + j % STG, (uint32_t)(j / STG) & 1u, lane);
    else
      moe14_wait<STG - 1>(); // item j's copies (this lane's) have landed (items j + 1 .. j + STG - 1 in flight)
    __syncwarp();            // ... every lane's
    const int p = cc.p, row = cc.row;
    while (cs + ct * n_slots < p) { // cc.p's token and slot (p only grows)
      if (++cs == n_slots) {
        cs = 0;
        ct++;
      }
    }
    const int t = ct;
    advance(cc);
    const int e = ids[p];
    const int sh0 = (int)((((int64_t)e * m + row) * rb) & 15);
    const uint32_t *sg = reinterpret_cast<const uint32_t *>(ring + (j % STG) * 2 * rs);
    const uint32_t *su = sg + rs / 4;
    const uint32_t *xh = xsm + (int64_t)t * xs4 * 4;
    const float *xinv = reinterpret_cast<const float *>(xh + nch * DEC16_XW);
    float ag = 0.f, au = 0.f;
    for (int c0 = 0; c0 < nch; c0 += 32 * NB) { // moe6_dot2's blocks in its order
#pragma unroll
      for (int i = 0; i < NB; i++) {
        const int c = c0 + lane + 32 * i;
        if (c < nch) {
          const int bo = sh0 + c * BB, wo = bo >> 2;
          const uint32_t sh = (uint32_t)(bo & 3);
          uint32_t wgw[BW], wuw[BW];
#pragma unroll
          for (int b = 0; b < BW; b++) {
            wgw[b] = sg[wo + b];
            wuw[b] = su[wo + b];
          }
          const uint4 *xp = reinterpret_cast<const uint4 *>(xh + c * DEC16_XW);
          const float xi = xinv[c];
          uint32_t ga[2] = {0u, 0u}, ua[2] = {0u, 0u};
          moe6_block_acc<T>(wgw, sh, xp, ga);
          moe6_block_acc<T>(wuw, sh, xp, ua);
          ag += dec16_fold(ga, dec16_wscale<T>(wgw, sh), xi);
          au += dec16_fold(ua, dec16_wscale<T>(wuw, sh), xi);
        }
      }
    }
    ag = warp_sum(ag);
    au = warp_sum(au);
    __syncwarp();       // every lane is done with item j's stage
    issue(j + STG);     // into item j's stage
    if (lane == 0) { // v10's epilogue
      const float gv = ag + (gb ? gb[(int64_t)e * m + row] : 0.f);
      const float uv = au + (ub ? ub[(int64_t)e * m + row] : 0.f);
      const float v = swiglu_oai(gv, uv, alpha, limit);
      int word, half;
      moe8_half_pos(dec16_traits<T>::kind, row & 31, word, half);
      acth[(((int64_t)p * (m / 32) + row / 32) * DEC16_XW + word) * 2 + half] =
          (uint16_t)(dec16_f2h2(v * sc, 0.f) & 0xFFFFu);
    }
  }
}
#endif

// ---- launch ----
// ORCH_CUDA_MOE14=1: v14's gate_up in v10's launches (orch_moe_decode / _norm /
// _addnorm at 1..8 tokens); ORCH_CUDA_MOE14_STG=2..4 ring stages = row pairs in
// flight a warp (default 2: 55.8 KB a CTA at gpt-oss n = 1, 3-4 CTAs an SM);
// ORCH_CUDA_MOE14_CTAS=N at most N CTAs per SM (default: as many as fit).
static int moe14_env(const char *name, int def) {
  const char *v = getenv(name);
  return v && *v ? atoi(v) : def;
}
// The three v14 kernels' switches (each independent): =1 on (1..8 tokens, where the kernel fits), =0 off,
// unset: on up to MOE14_AUTO_*_MAX_N tokens — 0 (never) until a device run shows the kernel wins.
constexpr int MOE14_AUTO_GU_MAX_N = 0, MOE14_AUTO_DOWN_MAX_N = 0, MOE14_AUTO_ROUTE_MAX_N = 0;
static bool moe14_switch(const char *name, int n, int auto_max) {
  const char *v = getenv(name);
  return v && *v ? atoi(v) == 1 : n <= auto_max;
}
static bool moe14_on(int n) { return moe14_switch("ORCH_CUDA_MOE14", n, MOE14_AUTO_GU_MAX_N); }

// Launches v14's gate_up; false (nothing launched) where it does not fit.
template <int T, int STG>
static bool launch_gate_up14_stg(cudaStream_t st, uint16_t *acth, const uint4 *xg, const uint8_t *wg,
                                 const uint8_t *wu, const float *gb, const float *ub, const int32_t *ids, int n,
                                 int n_slots, int n_exp, int dim, int ff, float alpha, float limit, float sc) {
  const int64_t rb = orch_row_bytes(T, dim);
  const int rs = moe14_row_slot(rb);
  // bulk copies read whole 16-byte chunks: only where the expert tensors end on 16 bytes
  const bool bulk = moe14_env("ORCH_CUDA_MOE14_BULK", 0) == 1 && ((int64_t)n_exp * ff * rb) % 16 == 0;
  const size_t sm = moe14_smem(n, dim / 32, rb, STG) + (bulk ? (size_t)MOE14_W * STG * 8 : 0);
  if (sm > 200 * 1024 || rs > 16 * 32 * MOE14_R) return false;
  auto kern = bulk ? moe_gate_up14_kernel<T, STG, true> : moe_gate_up14_kernel<T, STG, false>;
  if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
  int dev = 0, sms = 0, per = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, kern, MOE14_W * 32, sm);
  const int cap = moe14_env("ORCH_CUDA_MOE14_CTAS", 0);
  if (cap > 0 && per > cap) per = cap;
  if (per < 1 || sms < 1) return false;
  const int64_t items = (int64_t)n * n_slots * ff;
  const int64_t want = (items + MOE14_W - 1) / MOE14_W;
  const int grid = (int)(want < (int64_t)sms * per ? want : (int64_t)sms * per);
#if defined(ORCH_EMU)
  g_moe14_launches[0]++;
#endif
  DEC16_LAUNCH_PDL(kern, dim3((unsigned)grid), MOE14_W * 32, sm, st, acth, xg, wg, wu, gb, ub, ids, n, n_slots, dim, ff, rb, rs,
                   alpha, limit, sc);
  return true;
}
template <int T>
static bool launch_gate_up14(cudaStream_t st, uint16_t *acth, const uint4 *xg, const uint8_t *wg, const uint8_t *wu,
                             const float *gb, const float *ub, const int32_t *ids, int n, int n_slots, int n_exp,
                             int dim, int ff, float alpha, float limit, float sc) {
  switch (moe14_env("ORCH_CUDA_MOE14_STG", 2)) {
    case 3:
      return launch_gate_up14_stg<T, 3>(st, acth, xg, wg, wu, gb, ub, ids, n, n_slots, n_exp, dim, ff, alpha, limit,
                                        sc);
    case 4:
      return launch_gate_up14_stg<T, 4>(st, acth, xg, wg, wu, gb, ub, ids, n, n_slots, n_exp, dim, ff, alpha, limit,
                                        sc);
    default:
      return launch_gate_up14_stg<T, 2>(st, acth, xg, wg, wu, gb, ub, ids, n, n_slots, n_exp, dim, ff, alpha, limit,
                                        sc);
  }
}

// ---- MoE v14 down (opt-in ORCH_CUDA_MOE14_DOWN=1) ----
// v10's down as a one-wave persistent kernel: CTA c of DW warps takes the row
// groups u = c, c + grid, ... (u = t * (m / DW) + b: token t, rows DW b ..
// DW b + DW - 1, one a warp); warp w streams its row's n_slots expert rows
// (item = one slot's row) through a ring of STG shared-memory stages as
// gate_up14 (the first STG items issued before pdl_wait from the
// speculative routing read, v6's moe6_ld_id, and issued again after the wait
// where any of them changed). The staged activation of every token is copied
// once per CTA (fewer CTAs than v10's 360: fewer 28.8 KB copies from L2).
// Per item v10's sums in v10's order (per round of NB blocks a lane, then the
// slot's warp sum, bias and weight, slots in order): the output is v10's bit
// for bit, and so is the AN epilogue (res2 / xt per row, ss per 8 rows in warp
// order: DW = 8, or DW = 16 with two 8-row sums).
#if defined(__CUDACC__) || defined(ORCH_EMU)
template <int T, int STG, int DW, bool AN>
__global__ void __launch_bounds__(DW * 32, DW == 8 ? 3 : 1) // DW = 8: <= 80 registers
moe_down14_kernel(float *__restrict__ out, const uint4 *acth, const uint8_t *__restrict__ wd,
                  const float *__restrict__ db, const int32_t *ids /* read before and after the wait */,
                  const float *__restrict__ wts, int n, int n_slots, int n_exp, int k, int m, int64_t rb, int rs,
                  float xinv, moe10_addnorm an) {
  static_assert(STG >= 2 && DW % 8 == 0, "ring of two stages or more; whole 8-row sums");
  constexpr int BB = type_block_bytes(T), BW = block_words<T>(), NB = T == ORCH_T_Q8_0 ? 2 : 3; // down_h_nb<T>()
  DEC16_DYN_SMEM(uint32_t, xsm);
  pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nch = k / 32, cw4 = nch * DEC16_XW / 4; // uint4s per staged pair
  const int ngr = m / DW;                           // row groups per token (m % DW == 0: caller)
  const int U = n * ngr, gs = (int)gridDim.x;
  const int nu = (int)blockIdx.x < U ? (U - 1 - (int)blockIdx.x) / gs + 1 : 0;
  const int nit = nu * n_slots; // items of every warp of the CTA
  uint8_t *ring = reinterpret_cast<uint8_t *>(xsm + (int64_t)n * n_slots * cw4 * 4) + (int64_t)warp * STG * rs;
  // item j -> (token t, row, slot s); cursors advance without divisions
  struct cursor {
    int t, b, s;
  };
  auto at = [&](int j) {
    const int u = (int)blockIdx.x + (j / n_slots) * gs;
    return cursor{u / ngr, u % ngr, j % n_slots};
  };
  auto advance = [&](cursor &c) {
    if (++c.s == n_slots) {
      c.s = 0;
      c.b += gs;
      while (c.b >= ngr) {
        c.b -= ngr;
        c.t++;
      }
    }
  };
  auto issue_e = [&](int j, const cursor &c, int e) { // item j (cursor c, expert e) into stage j % STG
    const int row = c.b * DW + warp;
    const int64_t off = ((int64_t)e * m + row) * rb;
    const int64_t a0 = off & ~(int64_t)15;
    const int rend = (int)(((off + rb + 3) & ~(int64_t)3) - a0);
    uint8_t *d = ring + (j % STG) * rs + 16 * lane;
    const uint8_t *sp = wd + a0 + 16 * lane;
#pragma unroll
    for (int i = 0; i < MOE14_R; i++) {
      const int b = rend - 16 * (lane + 32 * i);
      if (b > 0) moe14_cp16(d + 512 * i, sp + 512 * i, b < 16 ? b : 16);
    }
  };
  // The first STG items (every stage) before the wait, from the speculative routing (clamped: any stale value is
  // an expert).
  int spec[STG];
#pragma unroll
  for (int j = 0; j < STG; j++) {
    spec[j] = -1;
    if (j < nit) {
      const cursor c = at(j);
      const int e = moe6_ld_id(ids + (int64_t)c.t * n_slots + c.s);
      spec[j] = e < 0 ? 0 : e >= n_exp ? n_exp - 1 : e;
      issue_e(j, c, spec[j]);
    }
    moe14_commit();
  }
  pdl_wait(); // act (and ids / weights, formally) come from the previous kernels
  bool stale = false;
#pragma unroll
  for (int j = 0; j < STG; j++)
    if (j < nit) {
      const cursor c = at(j);
      stale |= ids[(int64_t)c.t * n_slots + c.s] != spec[j];
    }
  if (stale) { // uniform over the warp: land the stale copies, then issue the items again
    moe14_wait<0>();
    __syncwarp();
#pragma unroll
    for (int j = 0; j < STG; j++) {
      if (j < nit) {
        const cursor c = at(j);
        issue_e(j, c, ids[(int64_t)c.t * n_slots + c.s]);
      }
      moe14_commit();
    }
  }
  moe10_copy<4>(reinterpret_cast<uint4 *>(xsm), acth, n * n_slots * cw4);
  __syncthreads();
  cursor ci = at(STG), cc = at(0);
  float res = 0.f;
  for (int j = 0; j < nit; j++) {
    moe14_wait<STG - 1>(); // item j landed (this lane's copies); j + 1 .. j + STG - 1 in flight
    __syncwarp();          // ... every lane's
    const int t = cc.t, row = cc.b * DW + warp, s = cc.s;
    const int b8 = cc.b;
    advance(cc);
    const int64_t p = (int64_t)t * n_slots + s;
    const int e = ids[p];
    const int sh0 = (int)((((int64_t)e * m + row) * rb) & 15);
    const uint32_t *sw = reinterpret_cast<const uint32_t *>(ring + (j % STG) * rs);
    const uint32_t *xh = xsm + p * nch * DEC16_XW;
    float acc = 0.f;
    for (int c0 = 0; c0 < nch; c0 += 32 * NB) { // moe10_dot's rounds, summed into acc as down10
      float sr = 0.f;
#pragma unroll
      for (int i = 0; i < NB; i++) {
        const int c = c0 + lane + 32 * i;
        if (c < nch) {
          const int bo = sh0 + c * BB, wo = bo >> 2;
          const uint32_t sh = (uint32_t)(bo & 3);
          uint32_t w[BW];
#pragma unroll
          for (int q = 0; q < BW; q++) w[q] = sw[wo + q];
          uint32_t a[2] = {0u, 0u};
          moe6_block_acc<T>(w, sh, reinterpret_cast<const uint4 *>(xh + c * DEC16_XW), a);
          sr += dec16_fold(a, dec16_wscale<T>(w, sh), xinv);
        }
      }
      acc += sr;
    }
    const float a = warp_sum(acc);
    __syncwarp(); // every lane is done with item j's stage: item j + STG into it
    if (j + STG < nit) {
      issue_e(j + STG, ci, ids[(int64_t)ci.t * n_slots + ci.s]);
      advance(ci);
    }
    moe14_commit();
    res += wts[p] * (a + (db ? db[(int64_t)e * m + row] : 0.f));
    if (s == n_slots - 1) { // the row is done
      if (lane == 0) out[(int64_t)t * m + row] = res;
      if constexpr (AN) { // down10's epilogue; DW / 8 sums of 8 rows (warp order)
        MOE10_SHARED float wsq[DW];
        if (lane == 0) {
          const int64_t i = (int64_t)t * m + row;
          const float r = an.res[i] + res;
          an.res[i] = r;
          an.xt[i] = r * an.w[row];
          wsq[warp] = r * r;
        }
        __syncthreads(); // every warp of the CTA finishes its row at the same item
        if ((int)threadIdx.x < DW / 8) {
          float sum = 0.f;
          for (int w8 = 0; w8 < 8; w8++) sum += wsq[8 * threadIdx.x + w8];
          an.ss[(int64_t)t * (m / 8) + b8 * (DW / 8) + threadIdx.x] = sum;
        }
        __syncthreads(); // wsq is written again for the next row group
      }
      res = 0.f;
    }
  }
}
#endif

static bool moe14_down_on(int n) { return moe14_switch("ORCH_CUDA_MOE14_DOWN", n, MOE14_AUTO_DOWN_MAX_N); }

// Launches v14's down; false (nothing launched) where it does not fit.
template <int T, int STG, int DW>
static bool launch_down14_stg(cudaStream_t st, float *out, const uint4 *acth, const uint8_t *wd, const float *db,
                              const int32_t *ids, const float *wts, int n, int n_slots, int n_exp, int ff, int dim,
                              float xinv, const moe10_addnorm *an) {
  const int64_t rb = orch_row_bytes(T, ff);
  const int rs = moe14_row_slot(rb);
  const size_t sm = (size_t)n * n_slots * (ff / 32) * DEC16_XW * 4 + (size_t)DW * STG * rs;
  if (dim % DW || sm > 200 * 1024 || rs > 16 * 32 * MOE14_R) return false;
  auto kern = an ? moe_down14_kernel<T, STG, DW, true> : moe_down14_kernel<T, STG, DW, false>;
  if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
  int dev = 0, sms = 0, per = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, kern, DW * 32, sm);
  const int cap = moe14_env("ORCH_CUDA_MOE14_DCTAS", 0);
  if (cap > 0 && per > cap) per = cap;
  if (per < 1 || sms < 1) return false;
  const int64_t units = (int64_t)n * (dim / DW);
  const int grid = (int)(units < (int64_t)sms * per ? units : (int64_t)sms * per);
  const moe10_addnorm av = an ? *an : moe10_addnorm{};
#if defined(ORCH_EMU)
  g_moe14_launches[1]++;
#endif
  DEC16_LAUNCH_PDL(kern, dim3((unsigned)grid), DW * 32, sm, st, out, acth, wd, db, ids, wts, n, n_slots, n_exp, ff,
                   dim, rb, rs, xinv, av);
  return true;
}
// ORCH_CUDA_MOE14_DSTG=2..4 = rows in flight a warp (default 3: at gpt-oss n = 1, 66 KB a CTA of 8 warps, 3 CTAs
// an SM, 396 >= 360 row groups: one group a CTA, 3 of its 4 slot rows issued before pdl_wait; 4: all 4, but 78.5 KB,
// 2 CTAs an SM: 264 CTAs for 360 groups), ORCH_CUDA_MOE14_DCTAS=N CTAs per SM at most.
template <int T>
static bool launch_down14(cudaStream_t st, float *out, const uint4 *acth, const uint8_t *wd, const float *db,
                          const int32_t *ids, const float *wts, int n, int n_slots, int n_exp, int ff, int dim,
                          float xinv, const moe10_addnorm *an) {
  const int stg = moe14_env("ORCH_CUDA_MOE14_DSTG", 3);
#define MOE14_DOWN(S, W) launch_down14_stg<T, S, W>(st, out, acth, wd, db, ids, wts, n, n_slots, n_exp, ff, dim, xinv, an)
  return stg == 2 ? MOE14_DOWN(2, 8) : stg == 4 ? MOE14_DOWN(4, 8) : MOE14_DOWN(3, 8);
#undef MOE14_DOWN
}

// ---- MoE v14 route (opt-in ORCH_CUDA_MOE14_ROUTE=1; sm_90: thread-block clusters) ----
// v10's route kernel with the cross-CTA reduction in distributed shared
// memory instead of global partials + __threadfence + atomic ticket + the last
// CTA's L2 reads: one cluster of MOE14_RC = 8 CTAs per token; CTA r takes the
// 64-wide slices r, r + 8, ... (v10: one CTA a slice; S <= 64, so <= 8 a CTA;
// their router weights loaded before pdl_wait), computes each slice as v10
// (moe10_route_slice: the same partial and the same x staging) into its own
// shared memory, and after a cluster barrier CTA 0 sums them as
// moe10_route_finish does (thread (e, q) adds slices q, q + 8, ... in order —
// all in CTA q's shared memory, index 0, 1, ... — then the same shuffle tree),
// adds the bias and runs v6's top-k: ids and weights are v10's bit for bit.
// With NN (the AddRMSNorm folded in, moe10_norm): every CTA reads the whole
// row as v10's CTAs do, normalizes its slices (h written by the slice's CTA),
// and CTA 0 writes res back after the barrier (every CTA has read the row).
// A second cluster barrier keeps every CTA's shared memory alive until CTA 0
// has read it. No tickets. The CPU emulation runs the CTAs one at a time, rank
// 0 last, with the partials in a static array per rank.
constexpr int MOE14_RC = 8;
#if defined(ORCH_EMU)
inline float g_moe14_cpart[MOE10_MAX_N][MOE14_RC][MOE14_RC][32]; // emulated DSMEM: [token][rank][slice][expert]
#endif

#if defined(__CUDACC__) || defined(ORCH_EMU)
__device__ __forceinline__ int moe14_cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return (int)r;
#elif defined(ORCH_EMU)
  return (int)(gridDim.x - 1 - blockIdx.x); // rank 0 runs last
#else
  return (int)blockIdx.x;
#endif
}
__device__ __forceinline__ void moe14_cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory"); // release / acquire (the defaults)
#elif defined(ORCH_EMU)
  __syncthreads();
#endif
}
// p (this CTA's shared memory) in CTA rank's shared memory.
__device__ __forceinline__ float moe14_ld_dsmem(const float *p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  unsigned ra;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(a), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(ra) : "memory");
  return v;
#else
  (void)rank;
  return *p;
#endif
}

template <int NN>
__global__ void __launch_bounds__(MOE10_THREADS)
moe14_route_kernel(uint32_t *__restrict__ xg, int32_t *ids, float *__restrict__ wts,
                   const float *x /* = nm.h when NN: not restrict */, const float *__restrict__ rw,
                   const float *__restrict__ rbias, int dim, int n_exp, int k_slots, int kind, int x14,
                   moe10_norm nm) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap(); // clusters: sm_90 only (the launcher checks)
#else
  MOE10_SHARED float lg[32];
  MOE10_SHARED __align__(16) float xs[NN ? MOE10_RK : 4];
  const int rank = moe14_cluster_rank(), t = blockIdx.y;
  const int S = (dim + MOE10_RK - 1) / MOE10_RK; // <= 64 (launcher)
  const int tid = threadIdx.x;
#if defined(ORCH_EMU)
  float(*part)[32] = g_moe14_cpart[t][rank];
#else
  __shared__ float part[MOE14_RC][32];
#endif
  moe10_rwv w[MOE14_RC]; // slices rank + 8 j: the router weights are constant (read before the wait)
#pragma unroll
  for (int j = 0; j < MOE14_RC; j++) {
    const int s = rank + MOE14_RC * j;
    if (s < S) w[j] = moe10_route_w(rw, s, dim, n_exp, tid);
  }
  pdl_wait(); // x comes from the previous kernel; xg / ids / wts are read by earlier ones
  pdl_trigger();
  float v[NN ? NN : 1];
  float r = 0.f;
  if constexpr (NN > 0) { // moe10_route_kernel's norm: the whole row in registers, its scale
    const float *rr = nm.res + (int64_t)t * dim;
    const float *ar = nm.add + (int64_t)t * dim;
#pragma unroll
    for (int j = 0; j < NN; j++) {
      const int i = tid + j * MOE10_THREADS;
      v[j] = 0.f;
      if (i < dim) {
        v[j] = rr[i];
        v[j] += ar[i];
      }
    }
    const float mean = 0.f;
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NN; j++) {
      const int i = tid + j * MOE10_THREADS;
      if (i < dim) {
        float d = v[j] - mean;
        ss += d * d;
      }
    }
    float var = block_sum(ss, lg) / (float)dim;
    r = rsqrtf(var + nm.eps);
  }
#pragma unroll
  for (int j = 0; j < MOE14_RC; j++) {
    const int s = rank + MOE14_RC * j;
    if (s >= S) break; // uniform over the CTA
    const float *xsl = x + (int64_t)t * dim + s * MOE10_RK;
    if constexpr (NN > 0) { // slice s: element i = 64 s + (tid & 63) is v[s >> 2] of the threads tid >> 6 == s & 3
      const int i = s * MOE10_RK + (tid & (MOE10_RK - 1));
      if ((tid >> 6) == (s & 3)) {
        float vj = 0.f;
#pragma unroll
        for (int q = 0; q < NN; q++)
          if (q == (s >> 2)) vj = v[q];
        float o = (vj - 0.f) * r;
        o *= nm.w[i < dim ? i : 0];
        xs[tid & (MOE10_RK - 1)] = i < dim ? o : 0.f;
        if (i < dim) nm.h[(int64_t)t * dim + i] = o;
      }
      __syncthreads();
      xsl = xs;
    }
    moe10_route_slice(part[j], xg, xsl, w[j], s, t, dim, n_exp, kind, x14, tid);
    if constexpr (NN > 0) __syncthreads(); // xs is written again for the next slice
  }
  moe14_cluster_sync(); // every CTA's partials (and its reads of the row) done
  if (rank == 0) {
    if constexpr (NN > 0) { // every CTA of the token has read the row: write the residual back
      float *rr = nm.res + (int64_t)t * dim;
#pragma unroll
      for (int j = 0; j < NN; j++) {
        const int i = tid + j * MOE10_THREADS;
        if (i < dim) rr[i] = v[j];
      }
    }
    { // moe10_route_finish's sums, from CTA q's shared memory
      const int e = tid >> 3, q = tid & 7;
      float pv[MOE14_RC];
#pragma unroll
      for (int j = 0; j < MOE14_RC; j++) {
        const int sl = q + MOE14_RC * j;
#if defined(ORCH_EMU)
        pv[j] = e < n_exp && sl < S ? g_moe14_cpart[t][q][j][e] : 0.f;
#else
        pv[j] = e < n_exp && sl < S ? moe14_ld_dsmem(&part[j][e], q) : 0.f;
#endif
      }
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < MOE14_RC; j++) sum += pv[j];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      sum += __shfl_xor_sync(0xffffffffu, sum, 4);
      if (q == 0) lg[e] = sum;
    }
    __syncthreads();
    if (tid < 32) {
      float lv = 0.f;
      if (tid < n_exp) lv = lg[tid] + (rbias ? rbias[tid] : 0.f);
      int id;
      float wv;
      moe_topk32_warp(lv, tid, n_exp, k_slots, id, wv);
      if (tid < k_slots) {
        ids[t * k_slots + tid] = id;
        wts[t * k_slots + tid] = wv;
      }
    }
  }
  moe14_cluster_sync(); // CTA 0 has read every CTA's partials
#endif
}
#endif

static bool moe14_route_on(int n) { return moe14_switch("ORCH_CUDA_MOE14_ROUTE", n, MOE14_AUTO_ROUTE_MAX_N); }

// Launches v14's route kernel (grid (8, n), clusters of 8); false (nothing launched) without cluster support
// (sm < 90) or for dim > 64 * 64.
static bool launch_route14(cudaStream_t st, uint32_t *xg, int32_t *ids, float *wts, const float *x, const float *rw,
                           const float *rbias, int dim, int n_exp, int k_slots, int kind, int x14, int n,
                           const moe10_norm *nm) {
  const int S = (dim + MOE10_RK - 1) / MOE10_RK;
  if (S > MOE14_RC * MOE14_RC || n_exp > 32 || n > MOE10_MAX_N) return false;
  const moe10_norm nv = nm ? *nm : moe10_norm{};
  const int per = nm ? (dim + MOE10_THREADS - 1) / MOE10_THREADS : 0; // <= MOE10_NORM_MAX_N (caller)
  auto kern = per == 0 ? moe14_route_kernel<0>
              : per <= 4 ? moe14_route_kernel<4>
              : per <= 8 ? moe14_route_kernel<8>
              : per <= 12 ? moe14_route_kernel<12>
                         : moe14_route_kernel<16>;
#if defined(ORCH_EMU)
  g_moe14_launches[2]++;
  DEC16_LAUNCH_PDL(kern, dim3((unsigned)MOE14_RC, (unsigned)n), MOE10_THREADS, 0, st, xg, ids, wts, x, rw, rbias, dim,
                   n_exp, k_slots, kind, x14, nv);
  return true;
#else
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (major < 9) return false;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)MOE14_RC, (unsigned)n);
  cfg.blockDim = dim3(MOE10_THREADS);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = st;
  cudaLaunchAttribute at[2];
  at[0].id = cudaLaunchAttributeClusterDimension;
  at[0].val.clusterDim.x = MOE14_RC;
  at[0].val.clusterDim.y = 1;
  at[0].val.clusterDim.z = 1;
  at[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = at;
  cfg.numAttrs = g_orch_pdl ? 2 : 1;
  cudaLaunchKernelEx(&cfg, kern, xg, ids, wts, x, rw, rbias, dim, n_exp, k_slots, kind, x14, nv);
  return true;
#endif
}
