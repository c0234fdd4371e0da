// moe_dec11.cuh — MoE v11 (session 6; ORCH_CUDA_MOE=v11, opt-in): v10's route
// kernel, then ONE persistent expert kernel for gate_up AND down (v10: two
// kernels), included by moe_ffn.cu after moe_dec10.cuh (it uses v6's / v10's
// dots, decoder, staging and fixed activation scale).
//
// Why (session 5 diagnosis, docs/perf-cuda.md "Round 6"): at one token v10's
// experts are latency / bytes-in-flight bound, not issue-bound: gate_up is 2.7
// waves of CTAs that each load, then compute, then exit (~63% of the DRAM
// rate), down starts only after a kernel boundary (~2 us) and then loads its
// weights (another exposed round trip).
//
// moe_ffn11_kernel: one wave (grid = SMs x CTAs per SM from the occupancy API:
// one CTA of 16 warps per SM at gpt-oss's shape), each warp an independent
// stream of weight ROWS through its own MOE11_R-deep cp.async ring in shared
// memory (one stage = one row's 16-byte-aligned segments): while the warp
// computes a row pair, its next MOE11_R - 2 rows are in flight (16 warps x 5 x
// 1.5 KB = ~120 KB per SM). A warp's row stream is its gate_up rows (phase A:
// unit = one (gate, up) row pair of one (token, slot)) followed by its down rows
// (phase B: one (output row, slot) each), so when a warp finishes phase A its
// phase-B rows (the routing is known since the kernel start) are already in
// flight, and they land while the CTA waits at the grid barrier.
//  - CTA b serves token b % n (the CTAs of a token share its staged x / staged
//    activation in shared memory); phase A's units of a token are dealt to its
//    warps warp-major (warp w of every CTA before warp w + 1: an even SM load);
//    phase B's rows to its CTAs (R = lb, lb + Gt, ...), and each CTA's (row,
//    slot) items to its warps: at gpt-oss's shape and one token <= 6 down rows
//    per warp <= MOE11_R, i.e. ALL of down's weights are requested before the
//    barrier.
//  - Phase A (a token's slots in ascending expert order: shared experts are
//    read by the token groups at about the same time) computes v10's gate_up
//    (same blocks per lane, moe6_dot2, same fold) with x copied from the
//    route kernel's staging, and writes the activation staged for down (v10's
//    format, v6's fixed scale).
//  - Grid barrier (fused mode): arrival counter (atomicInc, wraps to 0 by
//    itself) + generation word; graph-safe (no memset). It is safe only if
//    every CTA is co-resident: the grid is sized from
//    cudaOccupancyMaxActiveBlocksPerMultiprocessor x SMs, nothing else runs
//    on the device's stream meanwhile (orch: one stream per device; kernels
//    before this one finish without waiting on it, kernels after it launch
//    only when all of its CTAs have triggered), and a spin that exceeds ~1 s
//    traps (an error, not a hang). ORCH_CUDA_MOE11_SPLIT=1 (and the CPU
//    emulation, which runs one CTA at a time) runs the two phases as two
//    launches of the same kernel instead (no barrier; for MPS / green
//    contexts, where co-residency is not guaranteed, and for A/B timing).
//  - Phase B copies the token's staged activation (all slots) into shared
//    memory (through L2: written by other CTAs of this kernel), computes v10's
//    per-slot dot (moe10_dot, warp sum) per item into shared partials, then
//    one thread per row forms v10's weighted sum, slots in order.
// Every product, fp16 partial sum, fold and sum is v10's in v10's order: the
// output equals v10's bit for bit (cuda/test/moe_emu_test.cpp, split mode).
// Measured (H100, session 6 run 2): n = 1 / 2 / 4 / 8 47.1 / 74.4 / 126.7 /
// 236.1 us vs v10's 34.6 / 58.1 / 99.7 / 181.8 (split 48.6 at one token, routing
// folded 47.4; tg128 -13%): slower everywhere. Phase A alone (~24.6 us) is
// slower than v10's gate_up (~16) although it keeps ~120 KB per SM in flight:
// the decode (~900 instructions per row pair, ~11 us of issue at IPC 1 per
// scheduler) with 4 warps per scheduler runs at about half v10's IPC — gate_up
// at one token is bound by the decode's instruction latency, not by bytes in
// flight (.orch-notes/S6-moep-round7.md). Opt-in; ORCH_CUDA_MOE11_WIDE=1
// (32 warps, 64 registers) tests that.
// The barrier words are per device (static): MoE v11 ops of one process must
// not run concurrently on two streams of one device (as v10's tickets).
#pragma once

// Kernel shapes (template parameters MOE11_W, MOE11_R below): warps per CTA
// (one CTA per SM: one copy of x / the activation per SM) and row stages per
// warp (ring depth). Default 16 x 7 (<= 128 registers); ORCH_CUDA_MOE11_WIDE=1:
// 32 x 3 (32 warps per SM as v10's gate_up, <= 64 registers, 1 row in flight
// per warp while it computes a pair).
constexpr int MOE11_W16 = 16, MOE11_R16 = 7, MOE11_W32 = 32, MOE11_R32 = 3;

__device__ unsigned g_moe11_bar[2]; // [0] arrivals (wraps to 0), [1] generation
#if defined(ORCH_EMU)
inline int g_moe11_runs = 0; // emulation test hook: v11 expert launches (not v10's fallback)
#endif

// Bytes of one ring stage for rows of rb bytes: the row's 16-byte segments
// (its start may sit up to 15 bytes into the first) plus 16 bytes of slack
// (a block's last 32-bit word may read up to 3 bytes past the row).
DEC16_HD int moe11_stage_bytes(int64_t rb) { return (int)(((15 + rb + 15) / 16) * 16 + 16); }
// Words of the shared x / activation region (a multiple of 4: 16-byte aligned rings).
DEC16_HD int moe11_xa_words(int dim, int ff, int n_slots) {
  const int xw = moe10_xstride(dim / 32), aw = n_slots * (ff / 32) * DEC16_XW;
  return ((xw > aw ? xw : aw) + 3) & ~3;
}
// Units [0, total) dealt to warp wl of Wt: wl, wl + Wt, ...
DEC16_HD int moe11_count(int total, int wl, int Wt) { return wl < total ? (total - wl + Wt - 1) / Wt : 0; }

#if defined(__CUDACC__) || defined(ORCH_EMU)
// One 16-byte segment global -> shared, asynchronously (cp.async.cg: L2 only).
// The emulation copies only the bytes of [lo, hi) (the row): the device
// reads whole aligned segments, which may reach up to 15 bytes past the
// tensor (inside its 16-byte granule: never another page), and AddressSanitizer
// would flag those.
__device__ __forceinline__ void moe11_cp16(uint8_t *dst, const uint8_t *src, const uint8_t *lo, const uint8_t *hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  (void)lo, (void)hi;
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
#elif defined(__CUDA_ARCH__)
  (void)lo, (void)hi;
  *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(src);
#else
  for (int i = 0; i < 16; i++)
    if (src + i >= lo && src + i < hi) dst[i] = src[i];
#endif
}
__device__ __forceinline__ void moe11_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed groups are pending.
template <int N> __device__ __forceinline__ void moe11_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// The warp copies one weight row (rb bytes at row) into stage st (16-byte
// aligned): the row's byte j lands at st + (row & 15) + j.
__device__ __forceinline__ void moe11_fill(uint8_t *st, const uint8_t *row, int64_t rb, int lane) {
  const uintptr_t a = (uintptr_t)row;
  const uint8_t *s0 = reinterpret_cast<const uint8_t *>(a & ~(uintptr_t)15);
  const int nseg = (int)(((int64_t)(a & 15) + rb + 15) >> 4);
  for (int i = lane; i < nseg; i += 32) moe11_cp16(st + 16 * i, s0 + 16 * i, row, row + rb);
}

// ffn_load from a staged row (row = the stage + the row's offset in its first
// segment: the same byte offset within a 32-bit word as in global memory, so
// the same words and sh as ffn_load).
template <int T, int NB>
__device__ __forceinline__ void moe11_lds(wblocks<T, NB> &b, const uint8_t *row, int c0, int lane, int nch) {
  constexpr int BB = type_block_bytes(T);
#pragma unroll
  for (int i = 0; i < NB; i++) {
    const int c = c0 + lane + 32 * i;
    const bool ok = c < nch;
    const uintptr_t p = (uintptr_t)(row + (ok ? c : 0) * BB);
    b.sh[i] = (uint32_t)(p & 3);
    const uint32_t *q = reinterpret_cast<const uint32_t *>(p & ~(uintptr_t)3);
#pragma unroll
    for (int j = 0; j < block_words<T>(); j++) b.w[i][j] = ok ? q[j] : 0u;
  }
}

// Grid-wide barrier of the G co-resident CTAs (fused mode only; see above).
__device__ __forceinline__ void moe11_grid_sync(unsigned G) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  __syncthreads();
  if (threadIdx.x == 0) {
    volatile unsigned *gen = &g_moe11_bar[1];
    const unsigned g0 = *gen; // cannot change before this CTA arrives
    __threadfence();          // this CTA's activation writes before the arrival
    if (atomicInc(&g_moe11_bar[0], G - 1) == G - 1) {
      __threadfence();
      atomicAdd(&g_moe11_bar[1], 1u);
    } else {
      unsigned spins = 0;
      while (*gen == g0) {
        __nanosleep(64);
        if (++spins > (1u << 24)) __trap(); // ~1 s: a CTA never arrived (not co-resident)
      }
    }
    __threadfence();
  }
  __syncthreads();
#else
  (void)G; // the emulation and pre-Volta never run the fused mode (the launcher splits)
#endif
}

// phases: 1 = gate_up only, 2 = down only, 3 = both with the grid barrier
// between them. acth: n * n_slots staged activation rows (v10's layout);
// xg: the route kernel's staged x (moe10_xstride words per token); dxinv:
// down's 1/scale (v10's). Shared memory (moe11_smem): moe11_xa_words words,
// MOE11_W rings of MOE11_R stages of sb bytes, then the down partials (one
// float per (row, slot) of the CTA: moe11_count(dim, lb, Gt) * n_slots).
// ORCH_CUDA_MOE11_ROUTE=1: the route kernel folded in (phases bit 4: the
// router slices, then a grid barrier; bit 8: every CTA sums its token's
// partials and runs the top-k itself — the route kernel's code and order, so
// the same ids and weights).
struct moe11_route {
  float *part;   // [n][S][n_exp] partial logits (v10's scratch)
  uint32_t *xg;  // staged x (v10's scratch)
  int32_t *ids;  // [n][n_slots] outputs (written by the CTAs of rank 0 of each token)
  float *wts;
  const float *x, *rw, *rbias;
  int n_exp, S, kind, x14;
};

template <int T, int NBG, int NBD, int MOE11_W, int MOE11_R>
__global__ void __launch_bounds__(MOE11_W * 32, 1)
moe_ffn11_kernel(float *__restrict__ out, uint16_t *acth, const uint4 *xg, const uint8_t *__restrict__ wg,
                 const uint8_t *__restrict__ wu, const float *__restrict__ gb, const float *__restrict__ ub,
                 const uint8_t *__restrict__ wd, const float *__restrict__ db, const int32_t *ids, const float *wts,
                 int n, int n_slots, int dim, int ff, int64_t rbg, int64_t rbd, float alpha, float limit, float sc,
                 float dxinv, int sb, int phases, moe11_route rt) {
  DEC16_DYN_SMEM(uint32_t, xsm);
  MOE10_SHARED int32_t sids[32], sperm[32];
  MOE10_SHARED float swts[32], slg[32];
  const int G = (int)gridDim.x, b = (int)blockIdx.x;
  const bool fused = (phases & 3) == 3;
  // Router slices (bit 4): two per CTA at a time (256 threads each); the
  // first one's router weights (constant) before the wait.
  const int rtid = (int)(threadIdx.x & 255), task0 = 2 * b + (int)(threadIdx.x >> 8);
  moe10_rwv rw0 = {};
  if ((phases & 4) && task0 < n * rt.S) rw0 = moe10_route_w(rt.rw, task0 % rt.S, dim, rt.n_exp, rtid);
  pdl_wait(); // ids / staged x come from the route kernel; act / out are read by earlier kernels
  if (!fused) pdl_trigger();
  if (phases & 4) {
    for (int task = task0; task < n * rt.S; task += 2 * G) { // whole warps
      const moe10_rwv w = task == task0 ? rw0 : moe10_route_w(rt.rw, task % rt.S, dim, rt.n_exp, rtid);
      moe10_route_slice(rt.part, rt.xg, rt.x, w, task % rt.S, task / rt.S, rt.S, dim, rt.n_exp, rt.kind, rt.x14, rtid);
    }
    if (!(phases & 3)) return; // split: the route launch
    moe11_grid_sync((unsigned)G);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int t = b % n, lb = b / n, Gt = (G - t + n - 1) / n; // token of this CTA; its index among token t's Gt CTAs
  const int Wt = Gt * MOE11_W, wl = warp * Gt + lb;          // phase A: this warp among token t's
  const int32_t *tid = ids + (int64_t)t * n_slots;
  const float *wv = wts + (int64_t)t * n_slots;
  if (phases & 8) { // token t's routing from the partials, in this CTA
    moe10_route_finish(rt.part, rt.rbias, slg, sids, swts, t, rt.S, rt.n_exp, n_slots, (int)threadIdx.x);
    __syncthreads();
    if (lb == 0 && (int)threadIdx.x < n_slots) {
      rt.ids[(int64_t)t * n_slots + threadIdx.x] = sids[threadIdx.x];
      rt.wts[(int64_t)t * n_slots + threadIdx.x] = swts[threadIdx.x];
    }
    tid = sids;
    wv = swts;
  }
  const int nchg = dim / 32, nchd = ff / 32;
  // Phase A units (token t's (slot, row) pairs) are dealt to token t's warps;
  // phase B rows R = lb + i Gt (i < nr) to the CTAs, and their (row, slot)
  // items q = i n_slots + s to the CTA's warps (q = warp + k MOE11_W): at most
  // ceil(nr n_slots / MOE11_W) down rows per warp (gpt-oss at one token: 6 <=
  // MOE11_R — all of a warp's down rows are in flight before the barrier).
  // Phase A takes token t's slots in ascending expert order (sperm: the slot
  // of rank k; ties by slot): the CTA groups of tokens that share an expert
  // read it at about the same time (L2 hits from 2 tokens; the results do not
  // depend on the order).
  if (phases & 1) {
    if ((int)threadIdx.x < n_slots) {
      const int me = tid[threadIdx.x];
      int rank = 0;
      for (int s2 = 0; s2 < n_slots; s2++) {
        const int o = tid[s2];
        rank += (o < me || (o == me && s2 < (int)threadIdx.x)) ? 1 : 0;
      }
      sperm[rank] = (int)threadIdx.x;
    }
    __syncthreads();
  }
  const int nr = moe11_count(dim, lb, Gt);
  const int nA = (phases & 1) ? moe11_count(n_slots * ff, wl, Wt) : 0;
  const int nB = (phases & 2) ? moe11_count(nr * n_slots, warp, MOE11_W) : 0;
  const int itemsA = 2 * nA, items = itemsA + nB;
  uint8_t *rings = reinterpret_cast<uint8_t *>(xsm + moe11_xa_words(dim, ff, n_slots));
  uint8_t *ring = rings + warp * MOE11_R * sb;
  float *part = reinterpret_cast<float *>(rings + MOE11_W * MOE11_R * sb);
  // Row of item it (gate / up rows of phase A, then the down rows of phase B).
  auto row_of = [&](int it, int64_t &rb) -> const uint8_t * {
    if (it < itemsA) {
      const int u = wl + (it >> 1) * Wt, k = u / ff, r = u - k * ff, s = sperm[k];
      rb = rbg;
      return ((it & 1) ? wu : wg) + ((int64_t)tid[s] * ff + r) * rbg;
    }
    const int q = warp + (it - itemsA) * MOE11_W, i = q / n_slots, s = q - i * n_slots;
    rb = rbd;
    return wd + ((int64_t)tid[s] * dim + lb + i * Gt) * rbd;
  };
  auto issue = [&](int it) { // one commit group per item (empty past the end)
    if (it < items) {
      int64_t rb;
      const uint8_t *row = row_of(it, rb);
      moe11_fill(ring + (it % MOE11_R) * sb, row, rb, lane);
    }
    moe11_commit();
  };
#pragma unroll 1
  for (int i = 0; i < MOE11_R; i++) issue(i);
  if (phases & 1) {
    const int xs4 = moe10_xstride(nchg) / 4;
    moe10_copy<2>(reinterpret_cast<uint4 *>(xsm), xg + (int64_t)t * xs4, xs4);
  }
  __syncthreads();
  const float *xinv = reinterpret_cast<const float *>(xsm + nchg * DEC16_XW);
  int it = 0;
#pragma unroll 1
  for (int j = 0; j < nA; j++, it += 2) { // phase A: one (gate, up) row pair per unit
    moe11_wait<MOE11_R - 2>();
    __syncwarp();
    const int u = wl + j * Wt, k = u / ff, r = u - k * ff, s = sperm[k];
    const int e = tid[s];
    const int o = (int)(((uintptr_t)wg + ((int64_t)e * ff + r) * rbg) & 15); // gate and up: 16-byte aligned bases
    const uint8_t *sg = ring + (it % MOE11_R) * sb + o, *su = ring + ((it + 1) % MOE11_R) * sb + o;
    // The biases now, not in the epilogue: their global latency hides behind the dot.
    const float gbv = lane == 0 && gb ? gb[(int64_t)e * ff + r] : 0.f;
    const float ubv = lane == 0 && ub ? ub[(int64_t)e * ff + r] : 0.f;
    float ag = 0.f, au = 0.f;
    for (int c0 = 0; c0 < nchg; c0 += 32 * NBG) {
      wblocks<T, NBG> bg, bu;
      moe11_lds<T, NBG>(bg, sg, c0, lane, nchg);
      moe11_lds<T, NBG>(bu, su, c0, lane, nchg);
      moe6_dot2<T, NBG>(bg, bu, xsm, xinv, c0, lane, nchg, ag, au);
    }
    __syncwarp(); // every lane is done with both stages
    issue(it + MOE11_R);
    issue(it + MOE11_R + 1);
    ag = warp_sum(ag);
    au = warp_sum(au);
    if (lane == 0) { // gate_up10's epilogue
      const float g = ag + gbv;
      const float uu = au + ubv;
      const float v = swiglu_oai(g, uu, alpha, limit);
      int word, half;
      moe8_half_pos(dec16_traits<T>::kind, r & 31, word, half);
      const int64_t p = (int64_t)t * n_slots + s;
      acth[((p * nchd + r / 32) * DEC16_XW + word) * 2 + half] = (uint16_t)(dec16_f2h2(v * sc, 0.f) & 0xFFFFu);
    }
  }
  if (!(phases & 2)) return; // (pending groups: all empty)
  if (fused) {
    moe11_grid_sync((unsigned)G); // every activation written (the rings keep filling meanwhile)
    pdl_trigger();
  } else {
    __syncthreads();
  }
  { // the token's staged activation, all slots (x is no longer read: same region)
    const int cw4 = nchd * DEC16_XW / 4;
    moe10_copy<4>(reinterpret_cast<uint4 *>(xsm), reinterpret_cast<const uint4 *>(acth) + (int64_t)t * n_slots * cw4,
                  n_slots * cw4);
  }
  __syncthreads();
#pragma unroll 1
  for (int j = 0; j < nB; j++, it++) { // phase B: one (row, slot) dot per item: v10's per-slot dot
    moe11_wait<MOE11_R - 1>();
    __syncwarp();
    const int q = warp + j * MOE11_W, i = q / n_slots, s = q - i * n_slots;
    const uint8_t *w = wd + ((int64_t)tid[s] * dim + lb + i * Gt) * rbd;
    const uint8_t *sd = ring + (it % MOE11_R) * sb + (int)((uintptr_t)w & 15);
    float acc = 0.f;
    for (int c0 = 0; c0 < nchd; c0 += 32 * NBD) {
      wblocks<T, NBD> bd;
      moe11_lds<T, NBD>(bd, sd, c0, lane, nchd);
      acc += moe10_dot<T, NBD>(bd, xsm + s * nchd * DEC16_XW, dxinv, c0, lane, nchd);
    }
    __syncwarp();
    issue(it + MOE11_R);
    const float a = warp_sum(acc);
    if (lane == 0) part[q] = a;
  }
  __syncthreads();
  for (int i = (int)threadIdx.x; i < nr; i += (int)blockDim.x) { // v10's weighted sum, slots in order
    const int R = lb + i * Gt;
    float res = 0.f;
    for (int s = 0; s < n_slots; s++) {
      const int e = tid[s];
      res += wv[s] * (part[i * n_slots + s] + (db ? db[(int64_t)e * dim + R] : 0.f));
    }
    out[(int64_t)t * dim + R] = res;
  }
}
#endif

// ---- launch ----
// ORCH_CUDA_MOE=v11 (orch_env_version reads one digit: parsed here).
static bool moe11_pinned() {
  const char *v = getenv("ORCH_CUDA_MOE");
  return v && std::strcmp(v, "v11") == 0;
}
static bool moe11_split() {
#if defined(ORCH_EMU)
  return true; // one CTA at a time: no grid barrier
#else
  const char *v = getenv("ORCH_CUDA_MOE11_SPLIT");
  return v && std::strcmp(v, "1") == 0;
#endif
}
// Shared memory of a grid of g CTAs (the partials: the most rows any CTA takes).
static size_t moe11_smem(int n, int dim, int ff, int n_slots, int sb, int g, int W, int R) {
  const int gt = g / n > 0 ? g / n : 1;
  return (size_t)moe11_xa_words(dim, ff, n_slots) * 4 + (size_t)W * R * sb +
         (size_t)((dim + gt - 1) / gt) * n_slots * 4;
}

static bool moe11_wide() {
  const char *v = getenv("ORCH_CUDA_MOE11_WIDE");
  return v && std::strcmp(v, "1") == 0;
}
static bool moe11_fold() {
  const char *v = getenv("ORCH_CUDA_MOE11_ROUTE");
  return v && std::strcmp(v, "1") == 0;
}

// One wave: CTAs per SM (occupancy API) x SMs, for the shared memory of that
// grid (the partials shrink as the grid grows: a fixed point in <= 3 steps).
// Per process, type and token count (one device per process). False when the
// shared memory does not fit one CTA per SM (v10 runs).
struct moe11_wave {
  int dim, ff, ns, sms, wave;
  size_t sm;
};
template <int T, int MOE11_W, int MOE11_R>
static bool moe11_plan(int n, int n_slots, int dim, int ff, int &wave, size_t &smem, int &sb) {
  constexpr int NBG = gate_up_nb<T>(), NBD = down_h_nb<T>();
  auto kern = moe_ffn11_kernel<T, NBG, NBD, MOE11_W, MOE11_R>;
  const int64_t rbg = orch_row_bytes(T, dim), rbd = orch_row_bytes(T, ff);
  sb = moe11_stage_bytes(rbg > rbd ? rbg : rbd);
  static moe11_wave cache[MOE10_MAX_N + 1];
  static size_t attr_sm = 0; // the largest dynamic shared memory allowed so far
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  moe11_wave &c = cache[n];
  if (c.dim != dim || c.ff != ff || c.ns != n_slots || c.sms != sms) {
    int g = sms > n ? sms : n;
    c = moe11_wave{dim, ff, n_slots, sms, 0, 0};
    for (int step = 0; step < 3 && g >= 1; step++) {
      const size_t sm = moe11_smem(n, dim, ff, n_slots, sb, g, MOE11_W, MOE11_R);
      if (sm > 227 * 1024) break;
      if (sm > attr_sm && cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm) == cudaSuccess)
        attr_sm = sm;
      int per = 0;
      if (sm > attr_sm || cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, kern, MOE11_W * 32, sm) != cudaSuccess)
        per = 0;
      if (per >= 1 && per * sms == g) {
        c.wave = g;
        c.sm = sm;
        break;
      }
      g = per * sms;
    }
    cudaGetLastError(); // a refused attribute / occupancy query: v10 runs
  }
  wave = c.wave;
  smem = c.sm;
  return c.wave >= 1;
}

// Launches v11's expert kernel(s) (after v10's route kernel, or with the
// routing folded in: rt.part != nullptr) on moe11_plan's grid. Fused: one
// wave with the grid barrier(s) (needs a CTA per token); split: one launch per
// phase, no barrier, any grid of at least one CTA per token (the partials
// region is sized for the wave: enough for a larger grid). only: moe_only()'s
// bits (1: no down).
template <int T, int MOE11_W, int MOE11_R>
static void launch_ffn11(cudaStream_t st, int wave, size_t sm, int sb, float *out, uint16_t *acth, const uint4 *xg,
                         const uint8_t *wg, const uint8_t *wu, const float *gb, const float *ub, const uint8_t *wd,
                         const float *db, const int32_t *ids, const float *wts, int n, int n_slots, int dim, int ff,
                         float alpha, float limit, float sc, float dxinv, int only, const moe11_route &rt) {
  constexpr int NBG = gate_up_nb<T>(), NBD = down_h_nb<T>();
  auto kern = moe_ffn11_kernel<T, NBG, NBD, MOE11_W, MOE11_R>;
  const int64_t rbg = orch_row_bytes(T, dim), rbd = orch_row_bytes(T, ff);
  const int fold = rt.part ? 8 : 0;
#if defined(ORCH_EMU)
  g_moe11_runs++;
#endif
  if (!moe11_split() && wave >= n) {
    const int ph = (only & 1 ? 1 : 3) | (fold ? 4 | 8 : 0);
    DEC16_LAUNCH_PDL(kern, dim3((unsigned)wave), MOE11_W * 32, sm, st, out, acth, xg, wg, wu, gb, ub, wd, db, ids, wts,
                     n, n_slots, dim, ff, rbg, rbd, alpha, limit, sc, dxinv, sb, ph, rt);
    return;
  }
  const int g = wave > n ? wave : n;
  if (fold)
    DEC16_LAUNCH_PDL(kern, dim3((unsigned)g), MOE11_W * 32, sm, st, out, acth, xg, wg, wu, gb, ub, wd, db, ids, wts,
                     n, n_slots, dim, ff, rbg, rbd, alpha, limit, sc, dxinv, sb, 4, rt);
  DEC16_LAUNCH_PDL(kern, dim3((unsigned)g), MOE11_W * 32, sm, st, out, acth, xg, wg, wu, gb, ub, wd, db, ids, wts, n,
                   n_slots, dim, ff, rbg, rbd, alpha, limit, sc, dxinv, sb, 1 | fold, rt);
  if (!(only & 1))
    DEC16_LAUNCH_PDL(kern, dim3((unsigned)g), MOE11_W * 32, sm, st, out, acth, xg, wg, wu, gb, ub, wd, db, ids, wts,
                     n, n_slots, dim, ff, rbg, rbd, alpha, limit, sc, dxinv, sb, 2 | fold, rt);
}
