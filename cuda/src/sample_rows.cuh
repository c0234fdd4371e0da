// sample_rows.cuh — per-row token sampling for the decode step (session 8; orch_sample_rows). Included by
// sample.cu after common.cuh (pdl_wait / pdl_trigger), and by cuda/test/sample_emu_test.cpp against cuda_emu.h.
//
// Each row has its own settings (orch_sample_params: temperature, top-k, top-p, min-p, seed, counter), read from
// device memory, so one captured graph serves any mix of greedy and sampled requests and replays fresh draws when
// the host rewrites the params (the counter is the token's index in its request). Several CTAs a row (a contiguous
// slice each, as argmax_split_kernel), the row's last CTA finishing the row (atomicInc ticket wrapping to 0 by
// itself: graph-safe); P = sr_parts(V, rows): 16 elements a thread, more CTAs for few rows (a gpt-oss row alone:
// 128). Launches, all grid (P, rows <= SR_MAX_ROWS):
//  1. srows_max_kernel (only when a row has a filter): the row max M (for the probabilities and min-p).
//  2. srows_hist_kernel, SR_PASSES launches per filter search (top-k, then top-p over the top-k set): a select
//     of the threshold. Each pass histograms (count and probability mass, fixed point 2^-40 of p / p_max,
//     integer atomics: the result does not depend on the order CTAs add in) the candidates left, and the row's
//     last CTA finds the bin where the weight from the top reaches the target (k for top-k; ceil(top_p * mass
//     of the top-k set) for top-p). Pass 1 bins by log-probability, (M - l) / T in steps of 1/16 (bins spread
//     the keys: a radix pass on the float bits put most of a row into a handful of exponent bins, and the
//     shared-memory atomics of a warp serialised on them); passes 2-4 refine inside that bin by the logits'
//     order-preserving 32-bit keys, 11 + 11 + 10 bits (exact), touching only the bin's few elements. A key
//     bin holding one element ends the search early (later passes return at once). The result: threshold
//     keys, kept = key >= thr — the top-k / top-p sets of the host sampler (sdk/engine/sample.go), except that
//     ties at the threshold are all kept (the host keeps exactly k, lower ids first).
//  3. srows_draw_kernel: greedy rows (temperature < 1e-5) take the argmax (largest logit, lowest index on ties,
//     NaN never wins, as argmax_kernel); sampled rows take argmax over kept i of l_i / T + G_i, G_i a Gumbel
//     variable from a counter-based hash of (seed, counter, i): an exact draw from softmax(l / T) restricted to
//     the kept set (Gumbel-max trick), min-p as the logit cut M + T ln(min_p). No sort, no prefix sum, no
//     normalisation; the token is a pure function of (logits, params), whatever the split or the batch.
// Rows whose logits are all -Inf / NaN get token 0 (as the host). A row with a +Inf logit takes the first one.
// The scratch (tickets, partials, histograms, per-row state) is per device (static): sample_rows ops of one
// process must not run concurrently on two streams of one device (as argmax and MoE v10).
#pragma once

#include <stdint.h>

#include "orch_cuda.h"

constexpr int SR_MAX_ROWS = 64;  // rows per launch set (the host function loops over chunks)
constexpr int SR_MAX_SPLIT = 128; // CTAs per row
constexpr int SR_THREADS = 256;
constexpr int SR_BITS = 11, SR_BINS = 1 << SR_BITS;
constexpr float SR_MIN_TEMP = 1e-5f;      // below: greedy (sdk/engine/sample.go minTemperature)
constexpr float SR_MASS_ONE = 1099511627776.f; // 2^40: fixed-point unit of p / p_max in the histograms

enum { SR_DONE = 0, SR_TOPK = 1, SR_TOPP = 2 };
constexpr int SR_PASSES = 4;          // hist launches per search: the log-probability pass + 3 key passes
constexpr float SR_LOG_STEP = 16.f;   // pass 1 bins per unit of (M - l) / T
constexpr int SR_LOG_BINS = SR_BINS;  // (the last bin takes everything below 127.9 / T ... of the max)

// Per-row state between the launches of one sample_rows op.
struct SRowState {
  float mx;                    // row max (filtered rows)
  uint32_t thr;                // kept: key >= thr (0: every logit)
  uint32_t base;               // the current search counts keys >= base only
  uint32_t prefix;             // high bits found so far by the current search
  int32_t resolved;            // how many (key passes)
  int32_t stage;               // SR_DONE, SR_TOPK, SR_TOPP
  int32_t lbin;                // the log-probability bin of the threshold (-1: pass 1 not run yet)
  unsigned long long target;   // weight to reach from the top (0 in SR_TOPP until its first pass)
  unsigned long long above;    // weight of the keys above the prefix's range
};

// Order-preserving key of a float: a > b (numbers) <=> key(a) > key(b).
__host__ __device__ inline uint32_t sr_key(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The float of a key (sr_key's inverse).
__host__ __device__ inline float sr_unkey(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// Pass 1's bin of a candidate l <= M: higher bins hold larger logits (bin SR_LOG_BINS - 1 starts at the max).
__host__ __device__ inline int sr_lbin(float l, float M, float invT) {
  const float d = (M - l) * invT * SR_LOG_STEP; // >= 0; monotone in l
  return d < (float)(SR_LOG_BINS - 1) ? SR_LOG_BINS - 1 - (int)d : 0;
}

__host__ __device__ inline bool sr_greedy(const orch_sample_params &p) { return !(p.temperature >= SR_MIN_TEMP); }
__host__ __device__ inline bool sr_topk(const orch_sample_params &p, int64_t V) { return p.top_k > 0 && p.top_k < V; }
__host__ __device__ inline bool sr_topp(const orch_sample_params &p) { return p.top_p > 0.f && p.top_p < 1.f; }
__host__ __device__ inline bool sr_minp(const orch_sample_params &p) { return p.min_p > 0.f; }
__host__ __device__ inline bool sr_filtered(const orch_sample_params &p, int64_t V) {
  return !sr_greedy(p) && (sr_topk(p, V) || sr_topp(p) || sr_minp(p));
}

__host__ __device__ inline uint64_t sr_mix64(uint64_t z) { // SplitMix64's finalizer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
// The row's stream: element i's 64 random bits are SplitMix64's (i+1)-th output from state base.
__host__ __device__ inline uint64_t sr_base(uint64_t seed, uint64_t counter) {
  return sr_mix64(seed ^ sr_mix64(counter + 0x632BE59BD9B4E019ull));
}
// Natural log and exp: the SFU approximations on the device (lg2 / ex2: ~2^-21 relative; accurate logf / expf
// were most of the draw's instructions), the libm ones on the host (emulation).
__host__ __device__ inline float sr_ln(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  return logf(x);
#endif
}
__host__ __device__ inline float sr_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return expf(x);
#endif
}

// Gumbel(0, 1) noise of element i: -ln(E), E = -ln(1 - u) ~ Exp(1), accurate where E is small (the winners): its
// series u + u^2/2 + u^3/3 + u^4/4 below u = 2^-7 (truncation < u^5/5: 1e-11 relative), -ln(1 - u) above (1 - u
// exact there); u in (0, 1) from 32 random bits (the largest noise is -ln(2^-33) ~ 22.9). ml.SampleGumbel is the
// same variable with libm's log1p.
// (sr_bits: element i's 32 random bits; sr_gumbel_of: the noise of those bits.)
__host__ __device__ inline uint32_t sr_bits(uint64_t base, int64_t i) {
  return (uint32_t)(sr_mix64(base + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull) >> 32);
}
__host__ __device__ inline float sr_gumbel_of(uint32_t bits) {
  const float u = ((float)bits + 0.5f) * 2.3283064365386963e-10f;
  const float e = u < 0.0078125f ? u * (1.f + u * (0.5f + u * (1.f / 3.f + u * 0.25f))) : -sr_ln(1.f - u);
  return -sr_ln(e);
}
__host__ __device__ inline float sr_gumbel(uint64_t base, int64_t i) { return sr_gumbel_of(sr_bits(base, i)); }

// An upper bound of sr_gumbel_of(bits) from the bits' leading zeros, without logs: E = -ln(1 - u) >= u, so the
// noise -ln(E) <= -ln(u), and u >= 2^-(1 + clz) (bits >= 2^(31 - clz)), so -ln(u) <= (1 + clz) ln 2; + 2^-10 for
// the float rounding of u, E and the approximate logs (__logf: ~1e-6 relative; the noise is <= 23). Mostly ~0.7-2:
// the draw skips the logs of an element whose l / T plus this is below the best value seen (exact pruning).
__host__ __device__ inline float sr_gumbel_bound(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  const int z = __clz(bits);
#else
  const int z = bits ? __builtin_clz(bits) : 32;
#endif
  return (float)(1 + z) * 0.69314718f + 0.0009765625f;
}

// No sr_gumbel value exceeds this (u >= 2^-33: -ln(-ln(1 - u)) <= 22.87), so an element whose l / T is more than
// this below the best value so far cannot win (exact pruning: the noise is computed for few elements).
constexpr float SR_GUMBEL_MAX = 23.f;

// Calls f(l, i) for each element i of the slice [b0, b1) this thread owns: float4 loads (four elements a load,
// the next one issued before the current is processed) where the slice is 16-byte aligned, else one at a time.
// (One load at a time left the draw waiting on memory: 13 us at one row, argmax's float4 loop 4.6.)
template <class F>
__device__ __forceinline__ void sr_each(const float *lr, int64_t b0, int64_t b1, F &&f) {
  if (((uintptr_t)(lr + b0) & 15) == 0) {
    const int64_t n4 = (b1 - b0) / 4;
    const float4 *l4 = reinterpret_cast<const float4 *>(lr + b0);
    int64_t q = threadIdx.x;
    float4 v = q < n4 ? l4[q] : float4{0.f, 0.f, 0.f, 0.f};
    for (; q < n4; q += SR_THREADS) {
      const float4 cur = v;
      if (q + SR_THREADS < n4) v = l4[q + SR_THREADS];
      const int64_t i = b0 + 4 * q;
      f(cur.x, i);
      f(cur.y, i + 1);
      f(cur.z, i + 2);
      f(cur.w, i + 3);
    }
    for (int64_t i = b0 + 4 * n4 + threadIdx.x; i < b1; i += SR_THREADS) f(lr[i], i);
  } else {
    for (int64_t i = b0 + threadIdx.x; i < b1; i += SR_THREADS) f(lr[i], i);
  }
}

// The slice [b0, b1) of part `part` of P (as argmax_split_kernel: multiples of 4).
__host__ __device__ inline void sr_slice(int64_t V, int part, int P, int64_t &b0, int64_t &b1) {
  const int64_t per = (V / P + 3) & ~(int64_t)3;
  b0 = part * per < V ? part * per : V;
  b1 = part == P - 1 ? V : (b0 + per < V ? b0 + per : V);
}

__device__ unsigned g_sr_ticket[SR_MAX_ROWS];
__device__ float g_sr_pval[SR_MAX_ROWS * SR_MAX_SPLIT];
__device__ int64_t g_sr_pidx[SR_MAX_ROWS * SR_MAX_SPLIT];
__device__ SRowState g_sr_state[SR_MAX_ROWS];
__device__ unsigned g_sr_cnt[SR_MAX_ROWS * SR_BINS];
__device__ unsigned long long g_sr_mass[SR_MAX_ROWS * SR_BINS];

// Larger value wins, the lower index on ties; NaN never wins.
__device__ __forceinline__ void sr_pick(float &v, int64_t &i, float ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

// Block-wide pick of each thread's (v, i): the result in thread 0.
__device__ __forceinline__ void sr_pick_block(float &v, int64_t &i) {
  __shared__ float sv[SR_THREADS / 32];
  __shared__ int64_t si[SR_THREADS / 32];
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, (long long)i, o);
    sr_pick(v, i, ov, oi);
  }
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  if (lane == 0) {
    sv[w] = v;
    si[w] = i;
  }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int j = 1; j < SR_THREADS / 32; j++) sr_pick(v, i, sv[j], si[j]);
}

// Thread 0 of every CTA of the row: publish, then true in the row's last CTA (all threads).
__device__ __forceinline__ bool sr_last(int row, int P) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicInc(&g_sr_ticket[row], (unsigned)P - 1) == (unsigned)P - 1;
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

__global__ void __launch_bounds__(SR_THREADS)
srows_max_kernel(const float *logits, int64_t V, const orch_sample_params *params) {
  __shared__ float sh[32];
  pdl_trigger();
  pdl_wait();
  const int row = blockIdx.y, part = blockIdx.x, P = gridDim.x;
  const orch_sample_params p = params[row];
  if (!sr_filtered(p, V)) return;
  const float *lr = logits + (int64_t)row * V;
  int64_t b0, b1;
  sr_slice(V, part, P, b0, b1);
  float mx = -INFINITY;
  sr_each(lr, b0, b1, [&](float l, int64_t) { mx = fmaxf(mx, l); });
  // block max (thread 0)
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = mx;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int j = 1; j < SR_THREADS / 32; j++) mx = fmaxf(mx, sh[j]);
    g_sr_pval[row * SR_MAX_SPLIT + part] = mx;
  }
  if (!sr_last(row, P) || threadIdx.x >= 32) return;
  // warp 0: lane j takes partials j, j + 32 (all loads in flight at once; thread 0 alone waited for about a dozen
  // dependent L2 round trips over the 49 partials of a gpt-oss row), then the warp's max (fmaxf of numbers:
  // any order gives the same M)
  float M = -INFINITY;
  for (int j = threadIdx.x; j < P; j += 32) M = fmaxf(M, ((volatile float *)g_sr_pval)[row * SR_MAX_SPLIT + j]);
  for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
  if (threadIdx.x != 0) return;
  SRowState st;
  st.mx = M;
  st.thr = st.base = st.prefix = 0;
  st.resolved = 0;
  st.lbin = -1;
  st.above = 0;
  st.target = sr_topk(p, V) ? (unsigned long long)p.top_k : 0;
  st.stage = sr_topk(p, V) ? SR_TOPK : sr_topp(p) ? SR_TOPP : SR_DONE;
  if (!(M > -INFINITY && M < INFINITY)) st.stage = SR_DONE; // nothing finite, or +Inf logits: no search
  g_sr_state[row] = st;
}

// c += v for a 64-bit shared-memory counter as two native 32-bit atomics: the low word, then the high word plus the
// low word's carry (the 64-bit atomicAdd on shared memory is a compare-and-swap loop on sm_90, retried on every
// collision of a warp's lanes on a bin). The same sum in any order: each wrap of the low word adds 2^32 once.
__device__ __forceinline__ void sr_add64(unsigned long long *c, unsigned long long v) {
  unsigned *w = reinterpret_cast<unsigned *>(c); // little-endian: w[0] the low word
  const unsigned lo = (unsigned)v, hi = (unsigned)(v >> 32);
  const unsigned old = atomicAdd(w, lo);
  const unsigned up = hi + (old + lo < old ? 1u : 0u);
  if (up) atomicAdd(w + 1, up);
}

// One radix pass of the row's current search (see the file comment).
__global__ void __launch_bounds__(SR_THREADS)
srows_hist_kernel(const float *logits, int64_t V, const orch_sample_params *params) {
  __shared__ unsigned s_cnt[SR_BINS];
  __shared__ unsigned long long s_mass[SR_BINS];
  __shared__ unsigned long long s_scan[SR_THREADS];
  __shared__ int s_found;
  __shared__ unsigned long long s_above;
  pdl_trigger();
  pdl_wait();
  const int row = blockIdx.y, part = blockIdx.x, P = gridDim.x;
  const orch_sample_params p = params[row];
  if (!sr_filtered(p, V)) return;
  SRowState st = g_sr_state[row];
  if (st.stage == SR_DONE) return;
  const bool logp = st.lbin < 0; // pass 1
  const int bits = logp ? SR_BITS : 32 - st.resolved < SR_BITS ? 32 - st.resolved : SR_BITS;
  const int shift = logp ? 0 : 32 - st.resolved - bits, nb = 1 << bits;
  for (int b = threadIdx.x; b < nb; b += SR_THREADS) {
    s_cnt[b] = 0;
    s_mass[b] = 0;
  }
  __syncthreads();
  const float *lr = logits + (int64_t)row * V;
  const float invT = 1.f / p.temperature;
  int64_t b0, b1;
  sr_slice(V, part, P, b0, b1);
  sr_each(lr, b0, b1, [&](float l, int64_t) {
    if (!(l > -INFINITY)) return; // -Inf, NaN: never candidates
    const uint32_t k = sr_key(l);
    if (k < st.base) return;
    uint32_t b;
    if (logp) {
      b = (uint32_t)sr_lbin(l, st.mx, invT);
    } else {
      if (sr_lbin(l, st.mx, invT) != st.lbin || (st.resolved > 0 && (k >> (32 - st.resolved)) != st.prefix)) return;
      b = (k >> shift) & (uint32_t)(nb - 1);
    }
    atomicAdd(&s_cnt[b], 1u);
    sr_add64(&s_mass[b], (unsigned long long)(sr_exp((l - st.mx) * invT) * SR_MASS_ONE));
  });
  __syncthreads();
  for (int b = threadIdx.x; b < nb; b += SR_THREADS)
    if (s_cnt[b]) {
      atomicAdd(&g_sr_cnt[row * SR_BINS + b], s_cnt[b]);
      atomicAdd(&g_sr_mass[row * SR_BINS + b], s_mass[b]);
    }
  // Every thread's adds before the ticket: the barrier, then thread 0's fence in sr_last (cooperative groups'
  // grid sync does the same: __syncthreads, then one thread's __threadfence + atomic) — not a fence in every thread
  // (MEMBAR.SC.GPU in each of the CTA's 256 threads, every pass).
  __syncthreads();
  if (!sr_last(row, P)) return;
  // The row's last CTA: take the histogram (and clear it for the next pass), then find the bin. Every bin load of a
  // thread is issued before the first is used (one L2 round trip, not one per pair of bins).
  {
    constexpr int R = SR_BINS / SR_THREADS;
    unsigned c[R];
    unsigned long long m[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
      const int b = (int)threadIdx.x + r * SR_THREADS;
      if (b < nb) {
        c[r] = ((volatile unsigned *)g_sr_cnt)[row * SR_BINS + b];
        m[r] = ((volatile unsigned long long *)g_sr_mass)[row * SR_BINS + b];
      }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
      const int b = (int)threadIdx.x + r * SR_THREADS;
      if (b < nb) {
        s_cnt[b] = c[r];
        s_mass[b] = m[r];
        g_sr_cnt[row * SR_BINS + b] = 0;
        g_sr_mass[row * SR_BINS + b] = 0;
      }
    }
  }
  if (threadIdx.x == 0) s_found = -1;
  __syncthreads();
  const bool count = st.stage == SR_TOPK;
  // thread t owns bins [nb - (t+1) per, nb - t per), scanned from the top
  // (a pass of fewer than 8 bits: one bin a thread, threads past the bins own none)
  const int per = nb >= SR_THREADS ? nb / SR_THREADS : 1, hi = nb - (int)threadIdx.x * per;
  unsigned long long mine = 0;
  for (int b = hi - 1; b >= hi - per && b >= 0; b--) mine += count ? s_cnt[b] : s_mass[b];
  { // inclusive scan over the threads: in the warp by shuffles, then the warps' totals before it (integer sums:
    // the same values in any order; 2 barriers instead of Hillis-Steele's 16)
    __shared__ unsigned long long s_wtot[SR_THREADS / 32];
    const int lane = (int)threadIdx.x & 31, wp = (int)threadIdx.x >> 5;
    unsigned long long inc = mine;
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long y = (unsigned long long)__shfl_sync(0xffffffffu, (long long)inc, (lane - o) & 31);
      if (lane >= o) inc += y;
    }
    if (lane == 31) s_wtot[wp] = inc;
    __syncthreads();
    for (int j = 0; j < wp; j++) inc += s_wtot[j];
    s_scan[threadIdx.x] = inc;
    __syncthreads();
  }
  if (st.stage == SR_TOPP && logp) { // first top-p pass: the kept mass is the whole histogram
    const double t = ceil((double)s_scan[SR_THREADS - 1] * (double)p.top_p);
    st.target = t < 1.0 ? 1ull : (unsigned long long)t;
  }
  const unsigned long long before = st.above + s_scan[threadIdx.x] - mine; // weight above my bins
  if (before < st.target && before + mine >= st.target) {
    unsigned long long cum = before;
    for (int b = hi - 1; b >= hi - per && b >= 0; b--) {
      const unsigned long long w = count ? s_cnt[b] : s_mass[b];
      if (cum + w >= st.target) {
        s_found = b;
        s_above = cum;
        break;
      }
      cum += w;
    }
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  bool done = true;
  uint32_t t = st.base; // no crossing (fewer than k candidates, no mass): keep everything the search counted
  if (s_found >= 0 && logp) {
    st.above = s_above;
    st.lbin = s_found; // the key passes refine inside it
    done = false;
    // The bin's logits lie in (M - (D+1) T/16, M - D T/16], D = SR_LOG_BINS - 1 - bin (up to rounding: a margin of
    // 2^-10 of the scale); their keys share the high bits of that range's two ends, which the key passes then skip
    // (the first key pass used to find them all in one bin). At most 21 so that the three key passes reach 32 bits.
    const float D = (float)(SR_LOG_BINS - 1 - s_found), w = p.temperature / SR_LOG_STEP;
    const float slack = (fabsf(st.mx) + (D + 1.f) * w) * 0.0009765625f;
    const float hi = st.mx - D * w + slack;
    const uint32_t khi = sr_key(hi), klo = s_found == 0 ? 0u : sr_key(st.mx - (D + 1.f) * w - slack);
    int common = 0;
    while (common < 21 && ((khi ^ klo) >> (31 - common)) == 0) common++;
    if (!(hi < INFINITY) || !(w > 0.f)) common = 0;
    st.resolved = common;
    st.prefix = common ? khi >> (32 - common) : 0;
  } else if (s_found >= 0) {
    st.above = s_above;
    st.prefix = (st.prefix << bits) | (uint32_t)s_found;
    st.resolved += bits;
    // One element in the key bin: its keys below it are of lower log bins (or below base): the bin's lowest key
    // would keep those too, so the search goes on to the exact key unless the bin is the whole key range left.
    done = st.resolved == 32;
    const uint32_t lo = st.resolved == 32 ? st.prefix : st.prefix << (32 - st.resolved);
    t = lo > st.base ? lo : st.base;
  }
  if (done) {
    st.thr = t;
    if (st.stage == SR_TOPK && sr_topp(p)) {
      st.stage = SR_TOPP;
      st.base = t;
      st.prefix = 0;
      st.resolved = 0;
      st.lbin = -1;
      st.above = 0;
      st.target = 0;
    } else {
      st.stage = SR_DONE;
    }
  }
  g_sr_state[row] = st;
}

__global__ void __launch_bounds__(SR_THREADS)
srows_draw_kernel(int32_t *out, const float *logits, int64_t V, const orch_sample_params *params) {
  pdl_trigger();
  pdl_wait();
  const int row = blockIdx.y, part = blockIdx.x, P = gridDim.x;
  const orch_sample_params p = params[row];
  const bool greedy = sr_greedy(p);
  const float invT = greedy ? 1.f : 1.f / p.temperature;
  uint32_t thr = 0;
  float cut = -INFINITY;
  if (sr_filtered(p, V)) {
    const SRowState st = g_sr_state[row];
    thr = st.thr;
    if (sr_minp(p)) cut = st.mx + p.temperature * logf(p.min_p);
    if (st.mx == INFINITY) cut = INFINITY; // +Inf logits take all the mass
  }
  const uint64_t base = sr_base(p.seed, p.counter);
  const float *lr = logits + (int64_t)row * V;
  int64_t b0, b1;
  sr_slice(V, part, P, b0, b1);
  float best = -INFINITY;
  int64_t bi = INT64_MAX;
  // The CTA's best value so far (order-preserving key, atomicMax): a lower bound of the slice's winner, so an
  // element whose l / T + SR_GUMBEL_MAX is below it cannot win (the noise is computed for few elements once a
  // likely token has been seen; exact: such an element's value is strictly below the winner's).
  __shared__ unsigned s_best;
  if (threadIdx.x == 0) s_best = sr_key(-INFINITY);
  __syncthreads();
  if (greedy) {
    sr_each(lr, b0, b1, [&](float l, int64_t i) { sr_pick(best, bi, l, i); });
  } else {
    sr_each(lr, b0, b1, [&](float l, int64_t i) {
      if (!(l > -INFINITY) || !(l >= cut) || sr_key(l) < thr) return;
      const float s = l * invT;
      const float floor = fmaxf(best, sr_unkey(*(volatile unsigned *)&s_best));
      if (s + SR_GUMBEL_MAX < floor) return; // cannot win: skip the hash and the logs
      const uint32_t bits = sr_bits(base, i);
      if (s + sr_gumbel_bound(bits) < floor) return; // nor with these bits' noise: skip the logs
      const float v = s + sr_gumbel_of(bits);
      if (v > best || (v == best && i < bi)) {
        best = v;
        bi = i;
        if (v > -INFINITY) atomicMax(&s_best, sr_key(v));
      }
    });
  }
  sr_pick_block(best, bi);
  if (threadIdx.x == 0) {
    g_sr_pval[row * SR_MAX_SPLIT + part] = best;
    g_sr_pidx[row * SR_MAX_SPLIT + part] = bi;
  }
  if (!sr_last(row, P) || threadIdx.x >= 32) return;
  // warp 0: lane j picks among partials j, j + 32, then the warp (as argmax_split_kernel; sr_pick over partials that
  // are never NaN is a total order — larger value, lower index — so any order gives the same token)
  float v = -INFINITY;
  int64_t i = INT64_MAX;
  for (int j = threadIdx.x; j < P; j += 32)
    sr_pick(v, i, ((volatile float *)g_sr_pval)[row * SR_MAX_SPLIT + j],
            ((volatile int64_t *)g_sr_pidx)[row * SR_MAX_SPLIT + j]);
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, (long long)i, o);
    sr_pick(v, i, ov, oi);
  }
  if (threadIdx.x == 0) out[row] = i == INT64_MAX ? 0 : (int32_t)i;
}

// CTAs a row: at least 16 elements a thread, at most SR_MAX_SPLIT — and, for few rows, enough CTAs that the set
// has about SR_TARGET_CTAS (down to 4 elements a thread): the draw and the first histogram pass are latency-bound
// per thread (each element's dependent chain: the noise hash + logs of nearly every element — one is pruned only
// when its bound puts it below the best value seen — or pass 1's exp + shared atomics, behind the slice's
// sequential loads, with 8 warps an SM), and one row of gpt-oss's vocabulary in 49 CTAs left 83 of an H100's 132
// SMs idle.
// (Device run 3 of session 9, H100, gpt-oss tg128 at T=1: 548.2 tok/s vs 535.5 with the session-8 split of 16
// elements a thread; one row's T=1 op 10.8 -> 5.7 us with the warp pick and the log-free bound.)
constexpr int SR_TARGET_CTAS = 256;
__host__ __device__ inline int sr_parts(int64_t V, int64_t n) {
  int64_t P = V / (16 * SR_THREADS);
  const int64_t want = (SR_TARGET_CTAS + n - 1) / (n > 0 ? n : 1), most = V / (4 * SR_THREADS);
  if (P < want) P = want < most ? want : most;
  return P < 1 ? 1 : P > SR_MAX_SPLIT ? SR_MAX_SPLIT : (int)P;
}
