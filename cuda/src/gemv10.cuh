// gemv10.cuh — GEMV v10 (session 5, issue 7): the one-token (n = 1, 2) Q8_0
// GEMV with v5's arithmetic and the weights brought in by cp.async, per
// warp, in coalesced 16-byte chunks. Included by gemv16.cuh (after v9's
// cp.async helpers). ORCH_CUDA_GEMV=v10 pins it (matmul.cu gemv_route).
//
// Why: v5 (59-80% of the bytes floor at n = 1 on the H100) has each lane load
// its own 34-byte blocks as 9 aligned 32-bit words, the 32 lanes 34 bytes
// apart: every LDG.32 of a warp touches ~9 different 128-byte lines, so one
// round (32 lanes x 3 blocks, 3.2 KB) costs ~250 L1 wavefronts — ~13 bytes
// per wavefront, near the H100's HBM rate at 1 wavefront / clock / SM. And
// each warp loads a round, waits a DRAM latency, computes, loads the next:
// the whole grid drains the memory pipe between rounds (Llama down, k =
// 14336: 5 rounds in one wave, 60% of the floor). v10:
//  - each warp copies its row's next stages (32 lanes x NB blocks of one
//    row: 2,176 bytes for Q8_0, contiguous) with cp.async.cg 16-byte chunks
//    (the 32 lanes cover 512 contiguous bytes per instruction: 4 lines),
//    into a per-warp ring of NBUF stage buffers: NBUF - 1 stages stay in
//    flight while one is computed, so the warp never waits a full latency
//    between rounds;
//  - the lanes then read their blocks' words from shared memory (the same
//    9 words, at the same byte offsets mod 4, as v5 reads from global) and
//    run exactly v5's decode and accumulation (block c = lane + 32 q, q
//    ascending; warp_sum; bias): every y is bit-identical to v5's;
//  - the grid is at most one wave (occupancy x SMs CTAs), sized so that
//    every CTA gets the same number of 8-row groups (within one); CTA b
//    takes groups b, b + grid, ... (one x staging per CTA, the stage ring
//    runs on across its rows);
//  - the folded RMSNorm (gemv_norm.cuh) works as in v5 (NORM).
// Shared memory: the ring (8 warps x NBUF x gemv10_slot bytes) in front of
// v5's staged x (and, NORM, the norm's rows in front of that).
#pragma once
#include <mutex>

constexpr int GEMV10_NB = 2; // blocks per lane per stage

template <int T> __host__ __device__ constexpr int gemv10_slot() { // bytes of one stage buffer (the copy may start 15 bytes early)
  return (32 * GEMV10_NB * type_block_bytes(T) + 15) / 16 * 16 + 16;
}
template <int T, int NBUF> __host__ __device__ constexpr size_t gemv10_ring_bytes() { return (size_t)GEMV16_WARPS * NBUF * gemv10_slot<T>(); }

// Parts of a v10 launch (as gemv5_parts, but counted in 8-row groups).
struct gemv10_parts {
  const uint8_t *w[GEMV_MAX_PARTS];
  const float *bias[GEMV_MAX_PARTS];
  float *y[GEMV_MAX_PARTS];
  int64_t m[GEMV_MAX_PARTS];
  int64_t end[GEMV_MAX_PARTS]; // cumulative 8-row group counts (unused parts: the total)
};

#if defined(__CUDACC__) || defined(ORCH_EMU)
template <int T, int NT, int NBUF, bool NORM>
__device__ __forceinline__ void gemv10_body(uint8_t *ring, uint32_t *xsm, const gemv10_parts &P,
                                            const float *__restrict__ x, int64_t n, int64_t k, int64_t row_bytes,
                                            const gemv_norm_args &na) {
  constexpr int BB = type_block_bytes(T), WORDS = block_words<T>(), SLOT = gemv10_slot<T>();
  constexpr int STAGE = 32 * GEMV10_NB; // blocks per stage
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nt = (int)min((int64_t)NT, n);
  const int64_t nch = k / 32;
  const int rounds = (int)((nch + STAGE - 1) / STAGE); // stages per row
  const int groups = (int)P.end[GEMV_MAX_PARTS - 1];
  float *xinv = reinterpret_cast<float *>(xsm + nt * nch * DEC16_XW);
  uint8_t *myring = ring + (size_t)warp * NBUF * SLOT;

  // Items in order: for the CTA's groups g = blockIdx.x, + gridDim.x, ...
  // (uniform over its warps), the rounds of this warp's row in g; a cursor
  // steps through them (no divisions: the issue and compute sides each keep
  // their own).
  struct cursor {
    int g, rd, slot;
  };
  auto step = [&](cursor &c) {
    c.slot = c.slot + 1 == NBUF ? 0 : c.slot + 1;
    if (++c.rd == rounds) {
      c.rd = 0;
      c.g += gridDim.x;
    }
  };
  struct item_row {
    const uint8_t *w, *wend;
    const float *bias;
    float *y;
    int64_t m, row;
    bool valid;
  };
  auto row_of = [&](int g) {
    const int p = g >= P.end[0] ? (g >= P.end[1] ? 2 : 1) : 0; // selects: a dynamic index would copy P to local memory
    item_row r;
#define GEMV10_PICK(f) (p == 0 ? P.f[0] : p == 1 ? P.f[1] : P.f[2])
    const int64_t g0 = p == 0 ? 0 : p == 1 ? P.end[0] : P.end[1];
    r.w = GEMV10_PICK(w);
    r.bias = GEMV10_PICK(bias);
    r.y = GEMV10_PICK(y);
    r.m = GEMV10_PICK(m);
#undef GEMV10_PICK
    r.wend = r.w + r.m * row_bytes;
    r.row = (g - g0) * GEMV16_WARPS + warp;
    r.valid = r.row < r.m;
    return r;
  };
  // Issues the item at the issue cursor into its ring slot and steps; every
  // lane commits one group per call (empty past the end or for a row past m).
  cursor ic = {(int)blockIdx.x, 0, 0};
  auto issue = [&]() {
    if (ic.g < groups) {
      const item_row r = row_of(ic.g);
      if (r.valid) {
        const int64_t c0 = (int64_t)ic.rd * STAGE;
        const int nb = (int)min((int64_t)STAGE, nch - c0);
        const uint8_t *seg = r.w + r.row * row_bytes + c0 * BB;
        const qg_span sp = qg_stage_span((uint64_t)(uintptr_t)seg, (uint64_t)(uintptr_t)(seg + nb * BB));
        uint8_t *dst = myring + ic.slot * SLOT;
        for (int c = lane; c < sp.chunks; c += 32) {
          const uint64_t addr = sp.a0 + 16 * (uint64_t)c;
          g9_cp_async16(dst + 16 * c, reinterpret_cast<const void *>((uintptr_t)addr),
                        qg_chunk_bytes(addr, (uint64_t)(uintptr_t)r.wend));
        }
      }
      step(ic);
    }
    g9_cp_commit();
  };
  // The weights are never written while a step runs: the first stages are
  // requested before the PDL wait.
#pragma unroll
  for (int s = 0; s < NBUF - 1; s++) issue();
  pdl_wait();
  [[maybe_unused]] unsigned ticket = 0;
  if constexpr (NORM) {
    float *red = reinterpret_cast<float *>(xsm) - (32 + NT * k);
    gemv_norm_prologue<NT>(xsm, xinv, red, red + 32, na, nt, k, dec16_traits<T>::kind);
  } else {
    dec16_stage(xsm, xinv, x, nt, k, dec16_traits<T>::kind);
  }
  __syncthreads();
  if constexpr (NORM) ticket = gemv_norm_take_ticket(na);

  float acc[NT];
#pragma unroll
  for (int j = 0; j < NT; j++) acc[j] = 0.f;
  for (cursor cc = {(int)blockIdx.x, 0, 0}; cc.g < groups; step(cc)) { // uniform over the CTA
    issue(); // NBUF - 1 items ahead, into the slot the previous item used (freed by the __syncwarp that ended it)
    g9_cp_wait<NBUF - 1>(); // this lane's copies of this item have landed
    __syncwarp();           // ... and every lane's
    const int64_t c0 = (int64_t)cc.rd * STAGE;
    const item_row r = row_of(cc.g);
    if (r.valid) {
      const qg_span sp = qg_stage_span((uint64_t)(uintptr_t)(r.w + r.row * row_bytes + c0 * BB), 0);
      const uint8_t *buf = myring + cc.slot * SLOT + sp.off;
#pragma unroll
      for (int i = 0; i < GEMV10_NB; i++) {
        const int64_t c = c0 + lane + 32 * i;
        if (c < nch) {
          const uintptr_t pb = (uintptr_t)(buf + (lane + 32 * i) * BB);
          const uint32_t sh = (uint32_t)(pb & 3);
          const uint32_t *q = reinterpret_cast<const uint32_t *>(pb & ~(uintptr_t)3);
          uint32_t wv[WORDS];
#pragma unroll
          for (int j = 0; j < WORDS; j++) wv[j] = q[j];
          const uint4 *xp[NT];
          uint32_t a[NT][2];
#pragma unroll
          for (int j = 0; j < NT; j++) {
            xp[j] = reinterpret_cast<const uint4 *>(xsm + ((j < nt ? j : 0) * nch + c) * DEC16_XW);
            a[j][0] = a[j][1] = 0u;
          }
          dec16_block_acc<T, NT>(wv, sh, xp, nt, a);
          const float ws = dec16_wscale<T>(wv, sh);
#pragma unroll
          for (int j = 0; j < NT; j++)
            if (j < nt) acc[j] += dec16_fold(a[j], ws, xinv[j * nch + c]);
        }
      }
    }
    __syncwarp(); // every lane is done with this slot before it is refilled
    if (cc.rd == rounds - 1) { // the row's last stage: v5's epilogue
#pragma unroll
      for (int j = 0; j < NT; j++) {
        float s = warp_sum(acc[j]);
        if (lane == 0 && j < nt && r.valid) {
          if (r.bias) s += r.bias[r.row];
          r.y[j * r.m + r.row] = s;
        }
        acc[j] = 0.f;
      }
    }
  }
  if constexpr (NORM) {
    float *red = reinterpret_cast<float *>(xsm) - (32 + NT * k);
    gemv_norm_epilogue<NT>(red, red + 32, na, nt, k, ticket);
  }
}

template <int T, int NT, int NBUF, bool NORM>
__global__ void __launch_bounds__(GEMV16_WARPS * 32)
gemv10_kernel(const gemv10_parts P, const float *__restrict__ x, const gemv_norm_args na, int64_t n, int64_t k,
              int64_t row_bytes) {
  DEC16_DYN_SMEM(uint32_t, gemv10_sm);
  pdl_trigger();
  uint8_t *ring = reinterpret_cast<uint8_t *>(gemv10_sm);
  uint32_t *xsm = gemv10_sm + gemv10_ring_bytes<T, NBUF>() / 4 + (NORM ? 32 + NT * k : 0);
  gemv10_body<T, NT, NBUF, NORM>(ring, xsm, P, x, n, k, row_bytes, na);
}
#endif

// Shared memory of a v10 launch.
template <int T, int NT, int NBUF>
static inline size_t gemv10_smem(int64_t k, bool norm) {
  return gemv10_ring_bytes<T, NBUF>() + (norm ? gemv_norm_smem(k, NT) : 0) + dec16_smem(k, NT);
}
// NBUF: 3 stages per warp where three CTAs per SM still fit, else 2;
// ORCH_CUDA_GEMV10_NBUF=2 or 3 forces it (timing; read once per process).
template <int T, int NT>
static inline int gemv10_nbuf(int64_t k, bool norm) {
  static const int forced = [] {
    const char *e = getenv("ORCH_CUDA_GEMV10_NBUF");
    return e && (e[0] == '2' || e[0] == '3') && !e[1] ? e[0] - '0' : 0;
  }();
  if (forced) return forced;
  return gemv10_smem<T, NT, 3>(k, norm) <= 75 * 1024 ? 3 : 2;
}

// Launches v10 over count parts (w, bias, y, m of P filled in; end set here)
// with x, or (na.res != nullptr) the folded norm of na's rows. Q8_0, n <= 2.
template <int T, int NT, int NBUF>
static void launch_gemv10_nt(cudaStream_t st, gemv10_parts P, int count, const float *x, const gemv_norm_args &na,
                             int64_t n, int64_t k, int64_t rb) {
  const bool norm = na.res != nullptr;
  const size_t sm = gemv10_smem<T, NT, NBUF>(k, norm);
  auto kern = norm ? gemv10_kernel<T, NT, NBUF, true> : gemv10_kernel<T, NT, NBUF, false>;
  if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
  int64_t total = 0;
  for (int p = 0; p < count; p++) {
    total += ceil_div(P.m[p], (int64_t)GEMV16_WARPS);
    P.end[p] = total;
  }
  for (int p = count; p < GEMV_MAX_PARTS; p++) P.end[p] = total;
  // One wave at most: the CTAs that fit on the device at once.
  static int sms = 0;
  if (!sms) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (sms <= 0) sms = 1;
  }
  // CTAs per SM for this kernel and shared-memory size (cached: the query
  // costs host time on every eager launch).
  static std::mutex mu;
  static size_t cached_sm[2] = {0, 0};
  static int cached_occ[2] = {0, 0};
  int occ = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (cached_sm[norm] == sm) occ = cached_occ[norm];
  }
  if (occ <= 0) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, GEMV16_WARPS * 32, sm) != cudaSuccess || occ <= 0) {
      cudaGetLastError();
      occ = 1;
    }
    std::lock_guard<std::mutex> lock(mu);
    cached_sm[norm] = sm;
    cached_occ[norm] = occ;
  }
  // Balanced: every CTA the same number of groups (within one), e.g. Llama
  // down's 512 groups as 256 CTAs of 2 rather than 396 (3 per SM) with a tail
  // of 116 second groups at ~1 CTA per SM.
  const int64_t slots = (int64_t)occ * sms, per = (total + slots - 1) / slots;
  const int64_t grid = (total + per - 1) / per;
  DEC16_LAUNCH_PDL(kern, dim3((unsigned)grid), GEMV16_WARPS * 32, sm, st, P, x, na, n, k, rb);
}
template <int T>
static void launch_gemv10(cudaStream_t st, const gemv10_parts &P, int count, const float *x, const gemv_norm_args &na,
                          int64_t n, int64_t k, int64_t rb) {
  if constexpr (T == ORCH_T_Q8_0) {
    const bool norm = na.res != nullptr;
    if (n == 1) {
      if (gemv10_nbuf<T, 1>(k, norm) == 3) launch_gemv10_nt<T, 1, 3>(st, P, count, x, na, n, k, rb);
      else launch_gemv10_nt<T, 1, 2>(st, P, count, x, na, n, k, rb);
    } else if (n == 2) {
      if (gemv10_nbuf<T, 2>(k, norm) == 3) launch_gemv10_nt<T, 2, 3>(st, P, count, x, na, n, k, rb);
      else launch_gemv10_nt<T, 2, 2>(st, P, count, x, na, n, k, rb);
    }
  }
}
