// moe_dec13.cuh — MoE v13 (session 8; ORCH_CUDA_MOE=v13 pins it for 2..64
// tokens; unpinned it runs from 9 tokens to 64 — ORCH_CUDA_MOE13_FROM=N from
// N, =0 never): the MXFP4 MoE decode op at 9..64 tokens with each touched expert's
// weights read from DRAM once for all its tokens. Included by moe_ffn.cu
// after moe_dec10.cuh (it uses v10's route kernel and v9's fragment decode).
//
// Why not v9 (the 16..40-token route in session 7; 0.52 ms at 16 tokens, 27%
// of its bytes floor): every v9 CTA (16 rows of one expert) first groups the
// step's pairs itself (warp 0 scans all ids twice after pdl_wait, the other
// warps wait at a barrier), then runs 3 dependent rounds of register loads
// per warp (a DRAM round trip each) with 2 CTAs of 128 registers per SM, and
// repeats all weight loads for each further tile of 8 tokens; ~22 waves of
// such latency-bound CTAs. Here:
//  1. v10's route kernel (router GEMV + top-k per token, x staged once per
//     token, chunk-scaled fp16 for the fragment decoder) is run for up to 64
//     tokens, and the CTA that routes the last token (a second ticket) groups
//     the pairs by expert once per step (moe13_group: a table of the used
//     experts, their pair counts and pair lists in ascending pair order);
//  2. gate_up13: CTA = 16 rows of gate and of up of one used expert (two
//     contiguous, 16-byte aligned 24 KB ranges at gpt-oss's shape) copied into
//     shared memory with cp.async at once (one DRAM round trip, 49 KB in
//     flight per CTA, 3 CTAs per SM), then v9's fragment scheme from shared
//     memory: lane (g, t) decodes word t of rows g, g + 8 (the A fragments of
//     two m16n8k16 mmas) once per block and multiplies it into up to 2 tiles
//     of 8 tokens (B = staged x from L2/L1); more than 16 tokens: further
//     passes over the same shared tile (no second DRAM read); the 8 warps'
//     partial sums added in v9's fixed order; SwiGLU, activation staged for
//     down (v9's fixed scale);
//  3. down13: the same for 16 down rows (24 KB), the expert and its weight
//     copy issued BEFORE pdl_wait (the table is two launches old: gate_up13
//     triggers after its own wait; re-checked after the wait), per-pair rows
//     into ybuf; the last CTA of each 16-row tile (a ticket per tile over the
//     used experts) sums the slots of every token for its rows: orch_moe_combine's
//     expression and order (no combine launch).
// Per (token, slot), every product, fold and sum is v9's (moe9_mma_fold, same
// block order per warp, same cross-warp order): with the same ids and weights
// the output is v9's bit for bit (cuda/test/moe_emu_test.cpp test_decode13).
#pragma once
#include <cstdlib>
#include <cstring>

constexpr int MOE13_W = 8;   // warps per CTA (v9's k split)
// Tiles of 8 tokens per pass over the shared weights. Run 1 (H100) had 2 with the B fragments loaded block by
// block: ~12.5 us per touched expert (~1 TB/s), each warp waiting out an L2 round trip per block; now 1 tile with
// the B fragments of a whole round (v9's 4 / 8 blocks a warp) loaded before its mmas.
constexpr int MOE13_TT = 1;
// Table (ints, at the end of the staged activation in act): [0] used experts
// U, [1 + j] the j-th used expert (ascending id), [33 + j] its first list
// index, [65 + j] its pair count, then the list of pairs (p = t * k + s).
constexpr int MOE13_TAB_E = 1, MOE13_TAB_OFF = 33, MOE13_TAB_CNT = 65, MOE13_TAB_LIST = 97;
constexpr int MOE13_MAX_PAIRS = 256; // one route thread per pair in moe13_group

// Lanes of the warp holding the same v (__match_any_sync; a shuffle loop in the emulation).
__device__ __forceinline__ unsigned moe13_match(int v) {
#if defined(__CUDA_ARCH__)
  return __match_any_sync(0xffffffffu, v);
#else
  unsigned m = 0;
  for (int j = 0; j < 32; j++) m |= (__shfl_sync(0xffffffffu, v, j) == v ? 1u : 0u) << j;
  return m;
#endif
}

// Groups the np pairs of ids (written by other CTAs: read through L2) by
// expert into tab; ids out of range count as expert 0 (only NaN logits give
// them, with weight 0), as v9's moe8_bucket. Every thread of the CTA calls it
// (it syncs); np <= MOE13_MAX_PAIRS = threads, n_exp <= 32.
__device__ __forceinline__ void moe13_group(int32_t *tab, const int32_t *ids, int np, int n_exp, int tid) {
  MOE10_SHARED int wc[MOE10_THREADS / 32][32]; // pairs per (warp, expert)
  MOE10_SHARED int eoff[32];                   // list offset of each expert
  const int lane = tid & 31, warp = tid >> 5;
  const bool valid = tid < np;
  int id = -1;
  if (valid) {
#if defined(__CUDA_ARCH__)
    id = __ldcg(ids + tid);
#else
    id = ids[tid];
#endif
    id = id >= 0 && id < n_exp ? id : 0;
  }
  wc[warp][lane] = 0;
  __syncthreads();
  const unsigned m = moe13_match(id);
  const int rank_w = __popc(m & ((1u << lane) - 1u));
  if (valid && rank_w == 0) wc[warp][id] = __popc(m);
  __syncthreads();
  if (warp == 0) {
    int c = 0, before = 0;
    for (int w = 0; w < MOE10_THREADS / 32; w++) c += wc[w][lane];
    // exclusive prefix over the experts (lane order), one shuffle per lane
    for (int j = 0; j < 32; j++) {
      const int cj = __shfl_sync(0xffffffffu, c, j);
      before += j < lane ? cj : 0;
    }
    const unsigned used = __ballot_sync(0xffffffffu, c > 0);
    const int jj = __popc(used & ((1u << lane) - 1u));
    eoff[lane] = before;
    if (lane == 0) tab[0] = __popc(used);
    if (c > 0) {
      tab[MOE13_TAB_E + jj] = lane;
      tab[MOE13_TAB_OFF + jj] = before;
      tab[MOE13_TAB_CNT + jj] = c;
    }
  }
  __syncthreads();
  if (valid) {
    int base = eoff[id];
    for (int w = 0; w < warp; w++) base += wc[w][id];
    tab[MOE13_TAB_LIST + base + rank_w] = tid;
  }
}

// ---- cp.async (16 bytes global -> shared; a plain copy in the emulation) ----
__device__ __forceinline__ void moe13_cp16(void *dst, const void *src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
#else
  std::memcpy(dst, src, 16);
#endif
}
__device__ __forceinline__ void moe13_cp_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
__device__ __forceinline__ void moe13_cp_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}
// n16 16-byte pieces from src (16-byte aligned) to dst, by the whole CTA.
__device__ __forceinline__ void moe13_copy_tile(uint8_t *dst, const uint8_t *src, int n16) {
  for (int i = (int)threadIdx.x; i < n16; i += (int)blockDim.x) moe13_cp16(dst + 16 * i, src + 16 * i);
}

// moe9_load from shared memory: the block's first byte at byte offset o of
// the 16-byte aligned tile w (its words), sh = o & 3. Word indices on the
// shared array (no integer address casts: those made generic LD.E loads).
__device__ __forceinline__ void moe13_lds(moe9_blk &b, const uint32_t *w, int o, uint32_t sh, int t) {
  const int iq = (o + 1 + 4 * t) >> 2;
  b.s = w[o >> 2];
  b.q0 = w[iq];
  b.q1 = sh != 3 ? w[iq + 1] : 0u;
}

// Shared memory of gate_up13 / down13: nmat weight tiles of 16 rows (16-byte
// multiples), then the cross-warp partials (MOE13_TT tiles x 8 warps x 32
// lanes x nred floats), then the CTA's pair list (MOE13_MAX_N ints).
static size_t moe13_smem(int64_t rb, int nmat, int nred) {
  return (size_t)nmat * 16 * rb + (size_t)MOE13_TT * MOE13_W * 32 * nred * 4 + MOE13_MAX_N * 4;
}

// cp.async.wait_group with the number of newer groups that may stay in flight (0..2; more: wait for all).
__device__ __forceinline__ void moe13_cp_wait_n(int newer) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (newer >= 2) asm volatile("cp.async.wait_group 2;" ::: "memory");
  else if (newer == 1) asm volatile("cp.async.wait_group 1;" ::: "memory");
  else asm volatile("cp.async.wait_group 0;" ::: "memory");
#else
  (void)newer;
#endif
}
// ORCH_CUDA_MOE13_PIPE=1 (opt-in): gate_up13 copies its tiles in one
// commit group per round of v9's blocks (32 blocks: the 16-byte pieces that
// hold round q's bytes of each of the 32 rows, a piece shared with round q-1
// copied with round q-1), and computes round q once its group has landed.
// Pieces of round q of the 2 x 16 rows (tile offsets; rb: row bytes) from
// blocks [b0, b1): row i's bytes [i rb + b0 BB, i rb + b1 BB); its first
// piece is skipped when it starts inside round q-1's last piece, and a row's
// last piece, when it holds the next row's first bytes, goes with that row's
// round 0 (every piece is copied once, in the earliest round that needs it).
__device__ __forceinline__ void moe13_copy_round(uint8_t *sg, uint8_t *su, const uint8_t *g, const uint8_t *u, int rb,
                                                 int b0, int b1, int nch) {
  constexpr int BB = type_block_bytes(ORCH_T_MXFP4);
  const int lane = (int)threadIdx.x & 31, warp = (int)threadIdx.x >> 5;
  for (int i = warp; i < 32; i += MOE13_W) { // rows: gate 0..15, up 16..31
    const int r = i & 15;
    const int lo = r * rb + b0 * BB, hi = r * rb + (b1 < nch ? b1 * BB : rb); // last round: to the row's end
    // the last piece of a row's last round, when it also holds the next row's start, goes with that row's round 0
    const bool shared_end = b1 >= nch && r < 15 && (hi & 15) != 0;
    const int p0 = (b0 == 0 || (lo & 15) == 0) ? lo >> 4 : (lo >> 4) + 1, p1 = ((hi - 1) >> 4) - (shared_end ? 1 : 0);
    uint8_t *d = i < 16 ? sg : su;
    const uint8_t *src = i < 16 ? g : u;
    for (int p = p0 + lane; p <= p1; p += 32) moe13_cp16(d + 16 * p, src + 16 * p);
  }
}

// gate_up: rows [16 bx, 16 bx + 16) of the y-th used expert; x staged by the
// route kernel (token t at xg + t * xs words: chunks, then 1/scales).
template <bool PIPE>
__global__ void __launch_bounds__(MOE13_W * 32, 3)
moe_gate_up13_kernel(uint16_t *__restrict__ acth, const uint32_t *xg, int xs, const uint8_t *__restrict__ wg,
                     const uint8_t *__restrict__ wu, const float *__restrict__ gb, const float *__restrict__ ub,
                     const int32_t *tab, int n_slots, int k, int m, int rb, float alpha, float limit, float sc) {
  DEC16_DYN_SMEM(uint8_t, sm);
  pdl_wait(); // the table and staged x come from the route kernel; act is read by earlier kernels
  pdl_trigger(); // after the wait: down13 reads the table before its own wait
  const int y = (int)blockIdx.y;
  // the header entries together (one L2 round trip; entries y >= U are in the table, unused)
  const int used = tab[0], e = tab[MOE13_TAB_E + y], off = tab[MOE13_TAB_OFF + y], cnt0 = tab[MOE13_TAB_CNT + y];
  if (y >= used) return; // uniform
  const int cnt = min(cnt0, MOE13_MAX_N); // more only with NaN logits (ids clamped to 0)
  const int tb = 16 * rb; // tile bytes (a multiple of 16: k % 32 == 0)
  uint8_t *sg = sm, *su = sm + tb;
  float *red = reinterpret_cast<float *>(sm + 2 * tb);
  int *list = reinterpret_cast<int *>(red + MOE13_TT * MOE13_W * 32 * 8);
  const int64_t base = ((int64_t)e * m + (int64_t)blockIdx.x * 16) * rb;
  const int nch = k / 32;
  constexpr int BB = type_block_bytes(ORCH_T_MXFP4), NB = MOE9_NB, RB = MOE13_W * NB; // RB: blocks per round
  const int rounds = (nch + RB - 1) / RB;
  if constexpr (PIPE) {
    for (int q = 0; q < rounds; q++) {
      moe13_copy_round(sg, su, wg + base, wu + base, rb, q * RB, (q + 1) * RB, nch);
      moe13_cp_commit();
    }
  } else {
    moe13_copy_tile(sg, wg + base, tb / 16);
    moe13_copy_tile(su, wu + base, tb / 16);
    moe13_cp_commit();
  }
  const int tid = (int)threadIdx.x;
  if (tid < cnt) list[tid] = tab[MOE13_TAB_LIST + off + tid];
  // the epilogue's biases (thread: row (tid >> 3) & 15)
  const int R = (int)blockIdx.x * 16 + ((tid >> 3) & 15);
  const float gbv = gb ? gb[(int64_t)e * m + R] : 0.f, ubv = ub ? ub[(int64_t)e * m + R] : 0.f;
  if constexpr (!PIPE) moe13_cp_wait();
  __syncthreads(); // list (and, without PIPE, the tiles)
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const float *xinv0 = reinterpret_cast<const float *>(xg) + nch * DEC16_XW; // token 0's 1/scales
  for (int t0 = 0; t0 < cnt; t0 += 8 * MOE13_TT) {
    int xo[MOE13_TT], ta0[MOE13_TT], ta1[MOE13_TT], nt[MOE13_TT]; // 32-bit offsets: fewer registers than pointers
#pragma unroll
    for (int j = 0; j < MOE13_TT; j++) {
      nt[j] = min(8, max(0, cnt - t0 - 8 * j));
      const int tk = g < nt[j] ? list[t0 + 8 * j + g] / n_slots : 0;
      xo[j] = tk * (xs / 4) + t; // uint4s
      ta0[j] = (2 * t < nt[j] ? list[t0 + 8 * j + 2 * t] / n_slots : 0) * xs;
      ta1[j] = (2 * t + 1 < nt[j] ? list[t0 + 8 * j + 2 * t + 1] / n_slots : 0) * xs;
    }
    float ag[MOE13_TT][4], au[MOE13_TT][4];
#pragma unroll
    for (int j = 0; j < MOE13_TT; j++)
#pragma unroll
      for (int q = 0; q < 4; q++) ag[j][q] = au[j][q] = 0.f;
    for (int c0 = 0; c0 < nch; c0 += RB) { // v9's blocks per warp, in v9's order
      if (PIPE && t0 == 0) { // round c0 / RB's group (uniform over the CTA)
        moe13_cp_wait_n(rounds - 1 - c0 / RB);
        __syncthreads();
      }
      uint4 X[NB][MOE13_TT];
      float xi0[NB][MOE13_TT], xi1[NB][MOE13_TT];
#pragma unroll
      for (int i = 0; i < NB; i++) { // the round's B fragments and chunk scales first (L2 / L1), as v9
        const int c = c0 + warp * NB + i;
        const bool okc = c < nch;
#pragma unroll
        for (int j = 0; j < MOE13_TT; j++) {
          const bool ok = okc && nt[j] > 0;
          X[i][j] = ok && g < nt[j] ? __ldg(reinterpret_cast<const uint4 *>(xg) + xo[j] + c * (DEC16_XW / 4))
                                    : make_uint4(0u, 0u, 0u, 0u);
          xi0[i][j] = ok && 2 * t < nt[j] ? __ldg(xinv0 + ta0[j] + c) : 0.f;
          xi1[i][j] = ok && 2 * t + 1 < nt[j] ? __ldg(xinv0 + ta1[j] + c) : 0.f;
        }
      }
#pragma unroll
      for (int i = 0; i < NB; i++) {
        const int c = c0 + warp * NB + i;
        if (c < nch) { // uniform over the warp
          const int o = g * rb + c * BB;
          const uint32_t sh = (uint32_t)o & 3u;
#pragma unroll
          for (int mat = 0; mat < 2; mat++) { // gate, then up: one decoded pair of rows live at a time
            const uint32_t *w = reinterpret_cast<const uint32_t *>(mat ? su : sg);
            moe9_blk b0, b1;
            uint32_t ha[4], hb[4];
            moe13_lds(b0, w, o, sh, t);
            moe13_lds(b1, w, o + 8 * rb, sh, t);
            const float s0 = moe9_decode(b0, sh, ha), s1 = moe9_decode(b1, sh, hb);
#pragma unroll
            for (int j = 0; j < MOE13_TT; j++)
              if (nt[j] > 0) moe9_mma_fold(mat ? au[j] : ag[j], ha, hb, s0, s1, X[i][j], xi0[i][j], xi1[i][j]); // uniform
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < MOE13_TT; j++) {
      float *rw = red + ((j * MOE13_W + warp) * 32 + lane) * 8;
#pragma unroll
      for (int q = 0; q < 4; q++) {
        rw[q] = ag[j][q];
        rw[4 + q] = au[j][q];
      }
    }
    __syncthreads();
    { // thread (tile j, row, token): D element of lane l, summed over the warps in v9's order
      const int j = tid >> 7, row = (tid >> 3) & 15, tok = tid & 7;
      const int l = (row & 7) * 4 + (tok >> 1), jj = (row >> 3) * 2 + (tok & 1);
      if (j < MOE13_TT && tok < nt[j]) {
        float sg2 = 0.f, su2 = 0.f;
        for (int v = 0; v < MOE13_W; v++) {
          sg2 += red[((j * MOE13_W + v) * 32 + l) * 8 + jj];
          su2 += red[((j * MOE13_W + v) * 32 + l) * 8 + 4 + jj];
        }
        const int p = list[t0 + 8 * j + tok];
        const float v = swiglu_oai(sg2 + gbv, su2 + ubv, alpha, limit);
        int word, half;
        moe8_half_pos(1, R & 31, word, half);
        acth[(((int64_t)p * (m / 32) + R / 32) * DEC16_XW + word) * 2 + half] =
            (uint16_t)(dec16_f2h2(v * sc, 0.f) & 0xFFFFu);
      }
    }
    __syncthreads(); // red reused by the next pass
  }
}

// Table reads of down13 before its pdl_wait (through L2; re-checked after it).
#if defined(ORCH_EMU)
inline int g_moe13_stale_e = -1; // emulation test hook: >= 0 makes every speculative expert read return this
#endif
__device__ __forceinline__ int moe13_ld_tab(const int32_t *p, bool expert) {
#if defined(__CUDA_ARCH__)
  (void)expert;
  return __ldcg(p);
#elif defined(ORCH_EMU)
  return expert && g_moe13_stale_e >= 0 ? g_moe13_stale_e : *p;
#else
  (void)expert;
  return *p;
#endif
}

// Row tiles of down13 (one combine ticket each): dim <= 16 * MOE13_MAX_TILES.
constexpr int MOE13_MAX_TILES = 256;
__device__ unsigned g_moe13_tile[MOE13_MAX_TILES];

// down: ybuf[p, R] = act[p] . down_e[R] + db[e, R] for rows [16 bx, 16 bx + 16) of the y-th used expert; the
// last CTA of the row tile (ticket over the used experts) then writes out[t, R] = sum_s w[t, s] ybuf[t k + s, R]
// for every token (orch_moe_combine's expression and order: its bits).
__global__ void __launch_bounds__(MOE13_W * 32, 4)
moe_down13_kernel(float *__restrict__ out, float *ybuf, const uint4 *acth, const uint8_t *__restrict__ wd,
                  const float *__restrict__ db, const int32_t *tab /* read before and after the wait */,
                  const float *__restrict__ wts, int n_tok, int n_slots, int k, int m, int rb, float xinv) {
  DEC16_DYN_SMEM(uint8_t, sm);
  MOE10_SHARED unsigned last;
  pdl_trigger();
  const int y = (int)blockIdx.y, tid = (int)threadIdx.x;
  const int tb = 16 * rb;
  uint8_t *sw = sm;
  float *red = reinterpret_cast<float *>(sm + tb);
  int *list = reinterpret_cast<int *>(red + MOE13_TT * MOE13_W * 32 * 4);
  // The table is complete here (gate_up13 triggered this launch after its own
  // wait for the route kernel): the weight copy starts before the wait.
  const int y_ok = y < moe13_ld_tab(tab, false);
  const int e0 = y_ok ? moe13_ld_tab(tab + MOE13_TAB_E + y, true) : 0;
  if (y_ok) moe13_copy_tile(sw, wd + ((int64_t)e0 * m + (int64_t)blockIdx.x * 16) * rb, tb / 16);
  moe13_cp_commit();
  pdl_wait(); // act comes from gate_up13
  const bool used = y < tab[0];
  const int e = used ? tab[MOE13_TAB_E + y] : 0;
  if (!used || !y_ok || e != e0) { // uniform over the CTA: not taken unless the early read was stale
    moe13_cp_wait();
    __syncthreads();
    if (!used) return;
    moe13_copy_tile(sw, wd + ((int64_t)e * m + (int64_t)blockIdx.x * 16) * rb, tb / 16);
    moe13_cp_commit();
  }
  const int off = tab[MOE13_TAB_OFF + y], cnt = min(tab[MOE13_TAB_CNT + y], MOE13_MAX_N);
  if (tid < cnt) list[tid] = tab[MOE13_TAB_LIST + off + tid];
  const int R = (int)blockIdx.x * 16 + ((tid >> 3) & 15);
  const float dbv = db ? db[(int64_t)e * m + R] : 0.f;
  moe13_cp_wait();
  __syncthreads();
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int nch = k / 32;
  constexpr int BB = type_block_bytes(ORCH_T_MXFP4), NB = 2 * MOE9_NB; // v9's down: twice gate_up's blocks a round
  for (int t0 = 0; t0 < cnt; t0 += 8 * MOE13_TT) {
    int xo[MOE13_TT], nt[MOE13_TT];
#pragma unroll
    for (int j = 0; j < MOE13_TT; j++) {
      nt[j] = min(8, max(0, cnt - t0 - 8 * j));
      const int pb = g < nt[j] ? list[t0 + 8 * j + g] : 0;
      xo[j] = pb * nch * (DEC16_XW / 4) + t;
    }
    float acc[MOE13_TT][4];
#pragma unroll
    for (int j = 0; j < MOE13_TT; j++)
#pragma unroll
      for (int q = 0; q < 4; q++) acc[j][q] = 0.f;
    for (int c0 = 0; c0 < nch; c0 += MOE13_W * NB) {
      uint4 X[NB][MOE13_TT];
#pragma unroll
      for (int i = 0; i < NB; i++) { // the round's B fragments first (L2), as v9
        const int c = c0 + warp * NB + i;
#pragma unroll
        for (int j = 0; j < MOE13_TT; j++)
          X[i][j] = c < nch && g < nt[j] ? acth[xo[j] + c * (DEC16_XW / 4)] : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int i = 0; i < NB; i++) {
        const int c = c0 + warp * NB + i;
        if (c < nch) {
          const int o = g * rb + c * BB;
          const uint32_t sh = (uint32_t)o & 3u;
          moe9_blk b0, b1;
          uint32_t ha[4], hb[4];
          moe13_lds(b0, reinterpret_cast<const uint32_t *>(sw), o, sh, t);
          moe13_lds(b1, reinterpret_cast<const uint32_t *>(sw), o + 8 * rb, sh, t);
          const float s0 = moe9_decode(b0, sh, ha), s1 = moe9_decode(b1, sh, hb);
#pragma unroll
          for (int j = 0; j < MOE13_TT; j++) {
            if (nt[j] == 0) continue;
            moe9_mma_fold(acc[j], ha, hb, s0, s1, X[i][j], 2 * t < nt[j] ? xinv : 0.f, 2 * t + 1 < nt[j] ? xinv : 0.f);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < MOE13_TT; j++) {
      float *rw = red + ((j * MOE13_W + warp) * 32 + lane) * 4;
#pragma unroll
      for (int q = 0; q < 4; q++) rw[q] = acc[j][q];
    }
    __syncthreads();
    {
      const int j = tid >> 7, row = (tid >> 3) & 15, tok = tid & 7;
      const int l = (row & 7) * 4 + (tok >> 1), jj = (row >> 3) * 2 + (tok & 1);
      if (j < MOE13_TT && tok < nt[j]) {
        float s = 0.f;
        for (int v = 0; v < MOE13_W; v++) s += red[((j * MOE13_W + v) * 32 + l) * 4 + jj];
        ybuf[(int64_t)list[t0 + 8 * j + tok] * m + R] = s + dbv;
      }
    }
    __syncthreads();
  }
  // The combine of this row tile, by its last CTA.
  moe10_fence(); // this thread's ybuf rows before the ticket
  __syncthreads();
  if (tid == 0) last = moe10_ticket(&g_moe13_tile[blockIdx.x], (unsigned)(tab[0] - 1)) == (unsigned)(tab[0] - 1);
  __syncthreads();
  if (!last) return; // uniform
  moe10_fence();
  for (int i = tid; i < n_tok * 16; i += (int)blockDim.x) {
    const int tt = i >> 4, r = (int)blockIdx.x * 16 + (i & 15);
    float v = 0.f;
    for (int j = 0; j < n_slots; j++)
      v += wts[tt * n_slots + j] * moe10_ldcg(ybuf + ((int64_t)tt * n_slots + j) * m + r);
    out[(int64_t)tt * m + r] = v;
  }
}

// ---- routing and launch ----
static bool moe13_pinned() {
  const char *v = getenv("ORCH_CUDA_MOE");
  return v && std::strcmp(v, "v13") == 0;
}
// Unpinned: v13 from ORCH_CUDA_MOE13_FROM tokens; unset: from 9 (the
// default since session 8: device runs 1-2, H100, gpt-oss x16 / x32 / x64
// +13 / +12 / +8% tok/s; v10 keeps 1..8); 0 (or any value < 2): never (the
// session-7 route: v6 per pair / v9 / the grouped GEMM).
constexpr int MOE13_AUTO_FROM = 9;
static int moe13_auto_from() {
  const char *v = getenv("ORCH_CUDA_MOE13_FROM");
  if (!v || !v[0]) return MOE13_AUTO_FROM;
  const int f = atoi(v);
  return f >= 2 ? f : MOE13_MAX_N + 1;
}
static bool moe13_pipe() {
  const char *v = getenv("ORCH_CUDA_MOE13_PIPE");
  return v && std::strcmp(v, "1") == 0;
}
static bool moe13_on(const orch_ctx *ctx, int64_t n) {
  return moe13_pinned() ? n >= 2 : ctx->moe_auto && n >= moe13_auto_from();
}

// Scratch (the caller's): ybuf (n * n_slots * dim floats): the route
// kernel's partial logits and staged x, then (after gate_up13) the per-pair
// down rows; act (n * n_slots * ff floats): the staged activation, then the table.
static int64_t moe13_tab_word(int64_t np, int64_t ff) { return np * (ff / 32) * DEC16_XW; }

static bool moe13_declines(const orch_ctx *ctx, int64_t n, int32_t router_type, int32_t n_exp, int32_t gu_type,
                           int32_t down_type, int32_t n_slots, int64_t dim, int64_t ff, float alpha, float limit) {
  const int64_t np = n * n_slots;
  return ctx->moe_v1 || n < 2 || n > MOE13_MAX_N || np > MOE13_MAX_PAIRS || router_type != ORCH_T_F32 ||
         n_exp > 32 || gu_type != ORCH_T_MXFP4 || down_type != ORCH_T_MXFP4 || dim % 32 || ff % 32 ||
         dim > 16 * MOE10_THREADS || dim > 16 * MOE13_MAX_TILES || !(act_scale(gu_type, alpha, limit) > 0.f) ||
         moe13_smem(orch_row_bytes(ORCH_T_MXFP4, dim), 2, 8) > 200 * 1024 ||
         moe13_smem(orch_row_bytes(ORCH_T_MXFP4, ff), 1, 4) > 200 * 1024 ||
         moe10_ybuf_floats(n, dim, n_exp) > np * dim ||
         moe13_tab_word(np, ff) + MOE13_TAB_LIST + np > np * ff;
}

static void launch_decode13(cudaStream_t st, float *out, const float *x, const float *rw, const float *rbias,
                            int n_exp, int32_t *ids, float *wts, const uint8_t *wg, const uint8_t *wu, const float *gb,
                            const float *ub, const uint8_t *wd, const float *db, float *act, float *ybuf, int n,
                            int n_slots, int dim, int ff, float alpha, float limit, const moe10_norm *nm,
                            int only) {
  constexpr int T = ORCH_T_MXFP4;
  const int S = (dim + MOE10_RK - 1) / MOE10_RK, np = n * n_slots;
  float *part = ybuf;
  uint32_t *xg = reinterpret_cast<uint32_t *>(ybuf + (((int64_t)n * S * n_exp + 3) & ~(int64_t)3));
  int32_t *tab = reinterpret_cast<int32_t *>(act) + moe13_tab_word(np, ff);
  const float sc = moe6_act_scale<T>(alpha, limit);
  const unsigned ge = (unsigned)min(np, n_exp);
  {
    // x staged for the fragment decoder: kind 1, unscaled (v9's staging); nm: the AddRMSNorm folded in (as v10's)
    const moe10_norm nv = nm ? *nm : moe10_norm{};
    const int per = nm ? (dim + MOE10_THREADS - 1) / MOE10_THREADS : 0; // <= MOE10_NORM_MAX_N (caller)
    auto kern = per == 0 ? moe10_route_kernel<0, true>
                : per <= 4 ? moe10_route_kernel<4, true>
                : per <= 8 ? moe10_route_kernel<8, true>
                : per <= 12 ? moe10_route_kernel<12, true>
                           : moe10_route_kernel<16, true>;
    DEC16_LAUNCH_PDL(kern, dim3((unsigned)S, (unsigned)n), MOE10_THREADS, 0, st, part, xg, ids, wts, x, rw, rbias, dim,
                     n_exp, n_slots, 1, 0, nv, tab);
  }
  // ORCH_CUDA_MOE_ONLY (moe_only, timing hook): =route the route kernel alone, =gate_up without down13 (down13
  // re-reads the table after its wait, so it could even run without gate_up13 before it; not offered)
  if (!(only & 2)) {
    const int rb = (int)orch_row_bytes(T, dim);
    const size_t sm = moe13_smem(rb, 2, 8);
    auto kern = moe13_pipe() ? moe_gate_up13_kernel<true> : moe_gate_up13_kernel<false>;
    if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    DEC16_LAUNCH_PDL(kern, dim3((unsigned)(ff / 16), ge), MOE13_W * 32, sm, st, reinterpret_cast<uint16_t *>(act), xg,
                     moe10_xstride(dim / 32), wg, wu, gb, ub, tab, n_slots, dim, ff, rb, alpha, limit, sc);
  }
  if (!(only & 1)) {
    const int rb = (int)orch_row_bytes(T, ff);
    const size_t sm = moe13_smem(rb, 1, 4);
    auto kern = moe_down13_kernel;
    if (sm > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    DEC16_LAUNCH_PDL(kern, dim3((unsigned)(dim / 16), ge), MOE13_W * 32, sm, st, out, ybuf,
                     reinterpret_cast<const uint4 *>(act), wd, db, tab, wts, n, n_slots, ff, dim, rb, 1.f / sc);
  }
}
