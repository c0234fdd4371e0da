// matmul.cu — matrix products with GGUF weights read in place:
//  - gemv: n <= 8 tokens (decode). One warp per output row; lanes walk the
//    row's 32-element chunks, dequantize in registers and dot with up to 8
//    token vectors; the weight is read from device memory exactly once.
//    Versions v1..v6 are kept (ORCH_CUDA_GEMV); v5 (Q8_0 / Q4_0 / MXFP4,
//    n <= 8) loads blocks as aligned words before staging x (as v4, n <= 4)
//    and decodes them to fp16 for HFMA2 (dec16.cuh), the default; v6
//    (opt-in, below 32768 rows) adds double-buffered rows over a one-wave
//    grid (slower than v5 on the H100: fewer warps per SM).
//  - gemm: n > 8 (prefill): matmul_large in matmul_prefill.cu.
//  - moe_matmul: the gemv over (token, slot) pairs, each with its expert.
//  - get_rows: embedding lookup of any type.
#include "quant.cuh"
#include "dec16.cuh"
#include "gemv16.cuh"

constexpr int GEMV_WARPS = 4;

extern "C" int64_t orch_row_bytes(int32_t t, int64_t k) {
  if (!type_known(t) || k <= 0) return 0;
  int be = type_block_elems(t);
  if (k % be) return 0;
  return k / be * type_block_bytes(t);
}

// x rows for token j: x + xrow[j]*k. NT tokens per block column.
template <int T, int NT>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_kernel(float *__restrict__ y, const float *__restrict__ x, const uint8_t *__restrict__ w,
            const float *__restrict__ bias, int64_t n, int64_t k, int64_t m, int64_t row_bytes, int accumulate,
            // MoE (ids != nullptr): blockIdx.y is the pair p; NT == 1.
            const int32_t *__restrict__ ids, int n_slots, int x_per_slot, int64_t expert_bytes) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
  if (row >= m) return;
  int64_t t0 = (int64_t)blockIdx.y * NT;
  int nt = (int)min((int64_t)NT, n - t0);
  const uint8_t *wr = w + row * row_bytes;
  const float *bias_row = bias;
  int64_t xrow0 = t0, yrow0 = t0;
  if (ids) {
    int64_t p = blockIdx.y;
    int e = ids[p];
    wr = w + (int64_t)e * expert_bytes + row * row_bytes;
    if (bias) bias_row = bias + (int64_t)e * m;
    xrow0 = x_per_slot ? p : p / n_slots;
    yrow0 = p;
    nt = 1;
  }
  float acc[NT];
#pragma unroll
  for (int j = 0; j < NT; j++) acc[j] = 0.f;
  const int64_t nchunks = k / 32;
  for (int64_t c = lane; c < nchunks; c += 32) {
    float v[32];
    dequant_chunk<T>(wr, c, v);
#pragma unroll
    for (int j = 0; j < NT; j++) {
      if (j < nt) {
        const float4 *xp = reinterpret_cast<const float4 *>(x + (xrow0 + j) * k + c * 32);
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
          float4 xv = __ldg(xp + i);
          s += v[4 * i] * xv.x + v[4 * i + 1] * xv.y + v[4 * i + 2] * xv.z + v[4 * i + 3] * xv.w;
        }
        acc[j] += s;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < NT; j++) {
    float s = warp_sum(acc[j]);
    if (lane == 0 && j < nt) {
      if (bias_row) s += bias_row[row];
      float *yp = y + (yrow0 + j) * m + row;
      *yp = accumulate ? *yp + s : s;
    }
  }
}

// v2 GEMV: the CTA first copies the raw GGUF bytes of its rows (a k-tile of
// them) into shared memory with 16-byte coalesced loads (GGUF blocks are not
// word aligned, so v1's per-lane byte loads left most of the bandwidth
// unused), then each warp dequantizes its row from shared memory.
constexpr int GEMV2_WARPS = 8;
constexpr int GEMV2_TILE_BYTES = 3072; // per row per tile (smem = 8 x (3072 + 32))

// Copies bytes [src, src+len) to dst + (src & 15) (dst 16-aligned), touching
// no global byte outside the range (vector loads only where fully inside).
__device__ __forceinline__ void stage_bytes(uint8_t *dst, const uint8_t *src, int len, int tid, int nthr) {
  uintptr_t a = (uintptr_t)src, e = a + len;
  uintptr_t a16 = (a + 15) & ~(uintptr_t)15, e16 = e & ~(uintptr_t)15;
  uintptr_t base = a & ~(uintptr_t)15;
  if (a16 > e16) { // tiny range inside one 16-byte word
    for (uintptr_t p = a + tid; p < e; p += nthr) dst[p - base] = *(const uint8_t *)p;
    return;
  }
  // All 16-byte copies of the range go out at once: cp.async (sm_80+) needs
  // no registers, so nothing waits until cp.async.wait_all below; a plain
  // load/store loop would wait one DRAM latency per iteration.
  for (uintptr_t p = a16 + (uintptr_t)tid * 16; p < e16; p += (uintptr_t)nthr * 16) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned sdst = (unsigned)__cvta_generic_to_shared(dst + (p - base));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sdst), "l"(p) : "memory");
#else
    *reinterpret_cast<uint4 *>(dst + (p - base)) = __ldg(reinterpret_cast<const uint4 *>(p));
#endif
  }
  for (uintptr_t p = a + tid; p < a16; p += nthr) dst[p - base] = *(const uint8_t *)p;
  for (uintptr_t p = e16 + tid; p < e; p += nthr) dst[p - base] = *(const uint8_t *)p;
}

// Waits for this thread's cp.async copies (call before the CTA barrier).
__device__ __forceinline__ void stage_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

template <int T, int NT>
__global__ void __launch_bounds__(GEMV2_WARPS * 32)
gemv2_kernel(float *__restrict__ y, const float *__restrict__ x, const uint8_t *__restrict__ w,
             const float *__restrict__ bias, int64_t n, int64_t k, int64_t m, int64_t row_bytes, int accumulate,
             const int32_t *__restrict__ ids, int n_slots, int x_per_slot, int64_t expert_bytes, int tile_chunks) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row0 = (int64_t)blockIdx.x * GEMV2_WARPS;
  const int nrows = (int)min((int64_t)GEMV2_WARPS, m - row0);
  int64_t t0 = (int64_t)blockIdx.y * NT;
  int nt = (int)min((int64_t)NT, n - t0);
  const uint8_t *wbase = w;
  const float *bias_row = bias;
  int64_t xrow0 = t0, yrow0 = t0;
  if (ids) {
    int64_t p = blockIdx.y;
    int e = ids[p];
    wbase = w + (int64_t)e * expert_bytes;
    if (bias) bias_row = bias + (int64_t)e * m;
    xrow0 = x_per_slot ? p : p / n_slots;
    yrow0 = p;
    nt = 1;
  }
  constexpr int BE = type_block_elems(T) < 32 ? 32 : type_block_elems(T); // elements per addressable unit
  constexpr int BB = type_block_elems(T) < 32 ? 32 * type_block_bytes(T) : type_block_bytes(T);
  const int64_t nchunks = k / 32;
  const int tile_bytes_max = tile_chunks * 32 / BE * BB;
  const int slot = (tile_bytes_max + 31) & ~15;
  float acc[NT];
#pragma unroll
  for (int j = 0; j < NT; j++) acc[j] = 0.f;
  for (int64_t c0 = 0; c0 < nchunks; c0 += tile_chunks) {
    const int tc = (int)min((int64_t)tile_chunks, nchunks - c0);
    const int64_t off = c0 * 32 / BE * BB;
    const int len = tc * 32 / BE * BB;
    const bool contig = tc == nchunks; // whole rows: the CTA's rows are one contiguous span
    __syncthreads();
    if (contig) {
      stage_bytes(smem, wbase + row0 * row_bytes, nrows * (int)row_bytes, threadIdx.x, blockDim.x);
    } else {
      for (int r = 0; r < nrows; r++)
        stage_bytes(smem + r * slot, wbase + (row0 + r) * row_bytes + off, len, threadIdx.x, blockDim.x);
    }
    stage_wait();
    __syncthreads();
    if (warp < nrows) {
      const uint8_t *src = wbase + (row0 + warp) * row_bytes + off;
      const uint8_t *sr = contig ? smem + ((uintptr_t)(wbase + row0 * row_bytes) & 15) + warp * row_bytes
                                 : smem + warp * slot + ((uintptr_t)src & 15);
      for (int c = lane; c < tc; c += 32) {
        float v[32];
        dequant_chunk<T>(sr, c, v);
#pragma unroll
        for (int j = 0; j < NT; j++) {
          if (j < nt) {
            const float4 *xp = reinterpret_cast<const float4 *>(x + (xrow0 + j) * k + (c0 + c) * 32);
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < 8; i++) {
              float4 xv = __ldg(xp + i);
              s += v[4 * i] * xv.x + v[4 * i + 1] * xv.y + v[4 * i + 2] * xv.z + v[4 * i + 3] * xv.w;
            }
            acc[j] += s;
          }
        }
      }
    }
  }
  if (warp >= nrows) return;
  const int64_t row = row0 + warp;
#pragma unroll
  for (int j = 0; j < NT; j++) {
    float s = warp_sum(acc[j]);
    if (lane == 0 && j < nt) {
      if (bias_row) s += bias_row[row];
      float *yp = y + (yrow0 + j) * m + row;
      *yp = accumulate ? *yp + s : s;
    }
  }
}

// v3 GEMV (Q8_0, Q4_0, MXFP4: one block per 32-element chunk). v1's lanes
// used few registers, so the compiler interleaved each byte load with its use
// and every chunk cost several dependent memory latencies. Here each lane
// first loads two whole blocks into registers (all loads in flight), and x is
// staged once per CTA in shared memory (padded 36 floats per 32 so lanes that
// read different chunks hit different banks).
constexpr int GEMV3_WARPS = 4;

template <int T, int NT>
__global__ void __launch_bounds__(GEMV3_WARPS * 32)
gemv3_kernel(float *__restrict__ y, const float *__restrict__ x, const uint8_t *__restrict__ w,
             const float *__restrict__ bias, int64_t n, int64_t k, int64_t m, int64_t row_bytes, int accumulate,
             const int32_t *__restrict__ ids, int n_slots, int x_per_slot, int64_t expert_bytes) {
  extern __shared__ __align__(16) float xs[]; // NT rows of (k/32)*36 floats
  constexpr int BB = type_block_bytes(T);
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * GEMV3_WARPS + (threadIdx.x >> 5);
  int64_t t0 = (int64_t)blockIdx.y * NT;
  int nt = (int)min((int64_t)NT, n - t0);
  const uint8_t *wbase = w;
  const float *bias_row = bias;
  int64_t xrow0 = t0, yrow0 = t0;
  if (ids) {
    int64_t p = blockIdx.y;
    int e = ids[p];
    wbase = w + (int64_t)e * expert_bytes;
    if (bias) bias_row = bias + (int64_t)e * m;
    xrow0 = x_per_slot ? p : p / n_slots;
    yrow0 = p;
    nt = 1;
  }
  const int64_t nchunks = k / 32;
  const int64_t xstride = nchunks * 36;
  for (int j = 0; j < nt; j++)
    for (int64_t i = threadIdx.x; i < k / 4; i += blockDim.x) {
      int64_t c = i / 8, o = (i % 8) * 4;
      *reinterpret_cast<float4 *>(xs + j * xstride + c * 36 + o) =
          __ldg(reinterpret_cast<const float4 *>(x + (xrow0 + j) * k) + i);
    }
  __syncthreads();
  if (row >= m) return;
  const uint8_t *wr = wbase + row * row_bytes;
  float acc[NT];
#pragma unroll
  for (int j = 0; j < NT; j++) acc[j] = 0.f;
  for (int64_t c = lane; c < nchunks; c += 64) {
    const bool two = c + 32 < nchunks;
    uint8_t b0[BB], b1[BB];
    const uint8_t *p0 = wr + c * BB, *p1 = p0 + 32 * BB;
#pragma unroll
    for (int i = 0; i < BB; i++) {
      b0[i] = __ldg(p0 + i);
      b1[i] = two ? __ldg(p1 + i) : (uint8_t)0;
    }
#pragma unroll
    for (int j = 0; j < NT; j++) {
      if (j < nt) {
        acc[j] += block_dot<T>(b0, xs + j * xstride + c * 36);
        if (two) acc[j] += block_dot<T>(b1, xs + j * xstride + (c + 32) * 36);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < NT; j++) {
    float s = warp_sum(acc[j]);
    if (lane == 0 && j < nt) {
      if (bias_row) s += bias_row[row];
      float *yp = y + (yrow0 + j) * m + row;
      *yp = accumulate ? *yp + s : s;
    }
  }
}

static bool gemv3_type(int t) { return t == ORCH_T_Q8_0 || t == ORCH_T_Q4_0 || t == ORCH_T_MXFP4; }
static size_t gemv3_smem(int64_t k, int nt) { return (size_t)nt * (k / 32) * 36 * sizeof(float); }
constexpr size_t GEMV3_MAX_SMEM = 96 * 1024;

template <int T, int NT>
static void launch_gemv3_nt(cudaStream_t st, dim3 grid, float *y, const float *x, const uint8_t *w, const float *bias,
                            int64_t n, int64_t k, int64_t m, int64_t rb, int acc, const int32_t *ids, int n_slots,
                            int x_per_slot, int64_t expert_bytes) {
  size_t sm = gemv3_smem(k, NT);
  if (sm > 48 * 1024) cudaFuncSetAttribute(gemv3_kernel<T, NT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
  gemv3_kernel<T, NT><<<grid, GEMV3_WARPS * 32, sm, st>>>(y, x, w, bias, n, k, m, rb, acc, ids, n_slots, x_per_slot,
                                                          expert_bytes);
}

template <int T>
static void launch_gemv3(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias, int64_t n,
                         int64_t k, int64_t m, int64_t rb, int acc) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4) {
    unsigned gx = (unsigned)ceil_div(m, GEMV3_WARPS);
    if (n == 1) launch_gemv3_nt<T, 1>(st, dim3(gx, 1), y, x, w, bias, n, k, m, rb, acc, nullptr, 0, 0, 0);
    else if (n == 2) launch_gemv3_nt<T, 2>(st, dim3(gx, 1), y, x, w, bias, n, k, m, rb, acc, nullptr, 0, 0, 0);
    else if (n <= 4) launch_gemv3_nt<T, 4>(st, dim3(gx, 1), y, x, w, bias, n, k, m, rb, acc, nullptr, 0, 0, 0);
    else launch_gemv3_nt<T, 8>(st, dim3(gx, (unsigned)ceil_div(n, 8)), y, x, w, bias, n, k, m, rb, acc, nullptr, 0, 0, 0);
  }
}

template <int T>
static void launch_moe3(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias,
                        const int32_t *ids, int64_t n, int n_slots, int x_per_slot, int64_t k, int64_t m, int64_t rb) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4) {
    dim3 grid((unsigned)ceil_div(m, GEMV3_WARPS), (unsigned)(n * n_slots));
    launch_gemv3_nt<T, 1>(st, grid, y, x, w, bias, n * n_slots, k, m, rb, 0, ids, n_slots, x_per_slot, rb * m);
  }
}

// v4 GEMV (Q8_0, Q4_0, MXFP4; n <= 4): v3 staged x, waited at the barrier
// and only then issued its weight loads, so every CTA paid an L2 latency
// and a DRAM latency in series; and each 4-row CTA re-staged all of x
// (the LM head's 50k CTAs copied ~580 MB of x from L2 into smem, as much as
// the weight itself). v4 issues the first NB blocks per lane of its first
// row before staging x, uses 8 warps per CTA and R rows per warp (R = 4 for
// large m), so x is staged once per 8R rows.
constexpr int GEMV4_WARPS = 8;

template <int T, int NT, int NB>
__global__ void __launch_bounds__(GEMV4_WARPS * 32)
gemv4_kernel(float *__restrict__ y, const float *__restrict__ x, const uint8_t *__restrict__ w,
             const float *__restrict__ bias, int64_t n, int64_t k, int64_t m, int64_t row_bytes, int accumulate,
             int rows_per_warp) {
  extern __shared__ __align__(16) float xs[]; // NT rows of (k/32)*36 floats
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nt = (int)min((int64_t)NT, n);
  const int64_t nch = k / 32, xstride = nch * 36;
  const int64_t row0 = ((int64_t)blockIdx.x * GEMV4_WARPS + warp) * rows_per_warp;
  bool staged = false;
  for (int r = 0; r < rows_per_warp; r++) {
    const int64_t row = row0 + r;
    const bool valid = row < m;
    const uint8_t *wr = w + (valid ? row : 0) * row_bytes;
    float acc[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) acc[j] = 0.f;
    for (int64_t c0 = 0; c0 < nch; c0 += 32 * NB) {
      wblocks<T, NB> b;
      ffn_load<T, NB>(b, wr, c0, lane, nch, valid);
      if (!staged) { // first round of the first row: uniform over the CTA
        for (int j = 0; j < nt; j++)
          for (int64_t i = threadIdx.x; i < k / 4; i += blockDim.x) {
            int64_t c = i / 8, o = (i % 8) * 4;
            *reinterpret_cast<float4 *>(xs + j * xstride + c * 36 + o) =
                __ldg(reinterpret_cast<const float4 *>(x + j * k) + i);
          }
        __syncthreads();
        staged = true;
      }
#pragma unroll
      for (int j = 0; j < NT; j++)
        if (j < nt) acc[j] += ffn_dot<T, NB>(b, xs + j * xstride, c0, lane, nch);
    }
#pragma unroll
    for (int j = 0; j < NT; j++) {
      float s = warp_sum(acc[j]);
      if (lane == 0 && j < nt && valid) {
        if (bias) s += bias[row];
        float *yp = y + j * m + row;
        *yp = accumulate ? *yp + s : s;
      }
    }
  }
}

template <int T, int NT>
static void launch_gemv4_nt(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias, int64_t n,
                            int64_t k, int64_t m, int64_t rb, int acc) {
  constexpr int NB = 3;
  const int rpw = m >= 32768 ? 2 : 1;
  size_t sm = gemv3_smem(k, NT);
  if (sm > 48 * 1024) cudaFuncSetAttribute(gemv4_kernel<T, NT, NB>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
  unsigned gx = (unsigned)ceil_div(m, (int64_t)GEMV4_WARPS * rpw);
  gemv4_kernel<T, NT, NB><<<gx, GEMV4_WARPS * 32, sm, st>>>(y, x, w, bias, n, k, m, rb, acc, rpw);
}

template <int T>
static void launch_gemv4(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias, int64_t n,
                         int64_t k, int64_t m, int64_t rb, int acc) {
  if constexpr (T == ORCH_T_Q8_0 || T == ORCH_T_Q4_0 || T == ORCH_T_MXFP4) {
    if (n == 1) launch_gemv4_nt<T, 1>(st, y, x, w, bias, n, k, m, rb, acc);
    else if (n == 2) launch_gemv4_nt<T, 2>(st, y, x, w, bias, n, k, m, rb, acc);
    else launch_gemv4_nt<T, 4>(st, y, x, w, bias, n, k, m, rb, acc);
  }
}

// Tile in chunks of 32 elements: a multiple of 8 (whole K-quant super-blocks)
// whose bytes fit GEMV2_TILE_BYTES.
static int gemv2_tile_chunks(int t, int64_t k) {
  int be = type_block_elems(t) < 32 ? 32 : type_block_elems(t);
  int bb = type_block_elems(t) < 32 ? 32 * type_block_bytes(t) : type_block_bytes(t);
  int64_t nch = k / 32;
  int64_t per = (int64_t)GEMV2_TILE_BYTES * be / 32 / bb; // chunks that fit
  per = per / 8 * 8;
  if (per < 8) per = 8;
  return (int)min(per, nch);
}

static size_t gemv2_smem(int t, int tile_chunks) {
  int be = type_block_elems(t) < 32 ? 32 : type_block_elems(t);
  int bb = type_block_elems(t) < 32 ? 32 * type_block_bytes(t) : type_block_bytes(t);
  int tb = tile_chunks * 32 / be * bb;
  return (size_t)GEMV2_WARPS * ((tb + 31) & ~15);
}

template <int T, int NT>
static void launch_gemv2_nt(cudaStream_t st, dim3 grid, float *y, const float *x, const uint8_t *w, const float *bias,
                            int64_t n, int64_t k, int64_t m, int64_t rb, int acc, const int32_t *ids, int n_slots,
                            int x_per_slot, int64_t expert_bytes) {
  int tc = gemv2_tile_chunks(T, k);
  size_t sm = gemv2_smem(T, tc);
  if (sm > 48 * 1024) cudaFuncSetAttribute(gemv2_kernel<T, NT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
  gemv2_kernel<T, NT><<<grid, GEMV2_WARPS * 32, sm, st>>>(y, x, w, bias, n, k, m, rb, acc, ids, n_slots, x_per_slot,
                                                          expert_bytes, tc);
}

template <int T>
static void launch_gemv2(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias, int64_t n,
                         int64_t k, int64_t m, int64_t rb, int acc) {
  unsigned gx = (unsigned)ceil_div(m, GEMV2_WARPS);
  if (n == 1) launch_gemv2_nt<T, 1>(st, dim3(gx, 1), y, x, w, bias, n, k, m, rb, acc, nullptr, 0, 0, 0);
  else if (n == 2) launch_gemv2_nt<T, 2>(st, dim3(gx, 1), y, x, w, bias, n, k, m, rb, acc, nullptr, 0, 0, 0);
  else if (n <= 4) launch_gemv2_nt<T, 4>(st, dim3(gx, 1), y, x, w, bias, n, k, m, rb, acc, nullptr, 0, 0, 0);
  else launch_gemv2_nt<T, 8>(st, dim3(gx, (unsigned)ceil_div(n, 8)), y, x, w, bias, n, k, m, rb, acc, nullptr, 0, 0, 0);
}

template <int T>
static void launch_moe2(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias,
                        const int32_t *ids, int64_t n, int n_slots, int x_per_slot, int64_t k, int64_t m, int64_t rb) {
  dim3 grid((unsigned)ceil_div(m, GEMV2_WARPS), (unsigned)(n * n_slots));
  launch_gemv2_nt<T, 1>(st, grid, y, x, w, bias, n * n_slots, k, m, rb, 0, ids, n_slots, x_per_slot, rb * m);
}

template <int T>
static void launch_gemv(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias, int64_t n,
                        int64_t k, int64_t m, int64_t rb, int acc) {
  dim3 block(GEMV_WARPS * 32);
  if (n == 1) {
    dim3 grid((unsigned)ceil_div(m, GEMV_WARPS), 1);
    gemv_kernel<T, 1><<<grid, block, 0, st>>>(y, x, w, bias, n, k, m, rb, acc, nullptr, 0, 0, 0);
  } else if (n == 2) {
    dim3 grid((unsigned)ceil_div(m, GEMV_WARPS), 1);
    gemv_kernel<T, 2><<<grid, block, 0, st>>>(y, x, w, bias, n, k, m, rb, acc, nullptr, 0, 0, 0);
  } else if (n <= 4) {
    dim3 grid((unsigned)ceil_div(m, GEMV_WARPS), 1);
    gemv_kernel<T, 4><<<grid, block, 0, st>>>(y, x, w, bias, n, k, m, rb, acc, nullptr, 0, 0, 0);
  } else {
    dim3 grid((unsigned)ceil_div(m, GEMV_WARPS), (unsigned)ceil_div(n, 8));
    gemv_kernel<T, 8><<<grid, block, 0, st>>>(y, x, w, bias, n, k, m, rb, acc, nullptr, 0, 0, 0);
  }
}

template <int T>
static void launch_moe(cudaStream_t st, float *y, const float *x, const uint8_t *w, const float *bias,
                       const int32_t *ids, int64_t n, int n_slots, int x_per_slot, int64_t k, int64_t m, int64_t rb) {
  dim3 block(GEMV_WARPS * 32);
  dim3 grid((unsigned)ceil_div(m, GEMV_WARPS), (unsigned)(n * n_slots));
  gemv_kernel<T, 1><<<grid, block, 0, st>>>(y, x, w, bias, n * n_slots, k, m, rb, 0, ids, n_slots, x_per_slot,
                                            rb * m);
}

static bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

// Which decode GEMV (n <= 8) runs a MatMul. Device run 4 (H100, v5 vs v7 on
// the same card): v7 (tensor cores) wins from n = 3 for Q8_0 (2880x5120:
// n=4 11.9 vs 21.2 us, n=8 12.3 vs 38.9; n=2 a tie) and from n = 4 for MXFP4
// (n=4 9.3 vs 10.0, n=8 9.3 vs 21.1), v5 below (n=1 Q8_0 10.2 vs 11.8).
// With ORCH_CUDA_GEMV unset (gemv_auto) that is the routing, for every m
// (the LM head too) and k (v7 stages x in global scratch: no shared-memory
// limit on k); ORCH_CUDA_GEMV=vN pins version N where it applies.
enum { GR_F32ROWS, GR_V9, GR_V7, GR_V6, GR_V5, GR_V4, GR_V3, GR_V1, GR_V2, GR_NONE };
// GEMV v9 (gemv16.cuh; session 4): v7's tensor-core arithmetic with the
// weights copied to shared memory by cp.async (the CTA's whole tile in
// flight) and up to 8 token tiles per weight decode, so one GEMV serves
// n <= 64. Routed (ORCH_CUDA_GEMV unset) for n > 8 only (gemv9_auto);
// ORCH_CUDA_GEMV=v9 pins it. orch_matmul keeps its contract (n > 8:
// the dequantize + cuBLAS GEMM); n = 9..64 reaches v9 through
// orch_matmul_multi (count 1 or more), which the Go side calls for those n
// (sdk/ml/cuda/ops.go gemvMaxN mirrors gemv_max_n). With any other version
// pinned, or ORCH_CUDA_GEMM=v1 (the session-2 paths), multi declines n > 8.
static bool gemm_v1_env() {
  static const bool v = [] {
    const char *e = getenv("ORCH_CUDA_GEMM");
    return e && strcmp(e, "v1") == 0;
  }();
  return v;
}
static bool gemv9_on(const orch_ctx *ctx) { return ctx->gemv == 9 || (ctx->gemv_auto && !gemm_v1_env()); }
static int64_t gemv_max_n(const orch_ctx *ctx) { return gemv9_on(ctx) ? 64 : 8; }
// Device run 6 (H100, first v9: .orch-notes/run6-perf-gemv.md): v9 lost to
// v5 / v7 at every n <= 8 (qkv n=1 13.9 vs 8.8 us, n=8 17.1 vs 11.7; Llama
// down n=1 85 vs 30): the session-3 routing stays for n <= 8 unless
// ORCH_CUDA_GEMV=v9 pins it; the Go side picks the 9..64 shapes
// (ops.go gemvWideFor).
static bool gemv9_auto(int64_t n, int64_t m) { return n > 8 && m > 0; }
static int gemv7_min_n(int wtype) { return wtype == ORCH_T_MXFP4 ? 4 : 3; }
static int gemv_route(const orch_ctx *ctx, int wtype, int64_t n, int64_t k, int64_t m, int64_t rb) {
  // v4 and up read whole aligned 32-bit words, up to 3 bytes past a block:
  // only where the weight's end (w is 16-aligned) is word-aligned too.
  const int nt4 = n == 1 ? 1 : n == 2 ? 2 : 4, nt8 = n <= 4 ? nt4 : 8; // token tiles of v4 / v5-v6
  const bool wordok = (m * rb) % 4 == 0 && gemv3_type(wtype);
  const bool f16ok = wordok && dec16_smem(k, nt8) <= GEMV3_MAX_SMEM;
  if (n > 8) return wordok && n <= gemv_max_n(ctx) ? GR_V9 : GR_NONE; // else the GEMM path
  if (ctx->gemv >= 5 && wtype == ORCH_T_F32 && m <= 4096) return GR_F32ROWS;
  if (wordok && (ctx->gemv == 9 || (gemv9_on(ctx) && gemv9_auto(n, m)))) return GR_V9;
  // (v8, opt-in v7 with two rounds of loads in flight, was deleted in session 5: ORCH_CUDA_GEMV=v8 now falls
  // through to the v6 / v5 lines below, as any pinned version without a kernel of its own.)
  if (wordok && (ctx->gemv == 7 || (ctx->gemv_auto && n >= gemv7_min_n(wtype)))) return GR_V7;
  // v6 (opt-in) for m < 32768; the LM head (m = 201088) keeps v5, measured at 100% of its floor.
  if (ctx->gemv >= 6 && f16ok && m < 32768) return GR_V6;
  if (ctx->gemv >= 5 && f16ok) return GR_V5;
  if (ctx->gemv >= 4 && n <= 4 && wordok && gemv3_smem(k, nt4) <= GEMV3_MAX_SMEM) return GR_V4;
  if (ctx->gemv >= 3 && gemv3_type(wtype) && gemv3_smem(k, n == 1 ? 1 : n == 2 ? 2 : n <= 4 ? 4 : 8) <= GEMV3_MAX_SMEM)
    return GR_V3;
  return ctx->gemv != 2 ? GR_V1 : GR_V2;
}

extern "C" int orch_matmul(orch_ctx *ctx, float *y, const float *x, const void *w, int32_t wtype, const float *bias,
                           int64_t n, int64_t k, int64_t m, int32_t accumulate) {
  const char *op = "matmul";
  ORCH_CHECK_ARG(ctx && y && x && w && n >= 0 && k > 0 && m > 0, op);
  const bool q8r = q8_dual(wtype); // ORCH_T_Q8_0_DUAL: GEMV v5 reads the repacked rows
  if (!type_known(wtype)) {
    orch_set_error("matmul: unsupported weight type %d", wtype);
    return ORCH_ERR_UNSUPPORTED;
  }
  if (k % 32 || k % type_block_elems(wtype)) {
    orch_set_error("matmul: k=%lld is not a multiple of 32 / the block size of type %d", (long long)k, wtype);
    return ORCH_ERR_UNSUPPORTED;
  }
  ORCH_CHECK_ARG(aligned16(x) && aligned16(w), op);
  if (n == 0) return ORCH_OK;
  const int64_t rb = orch_row_bytes(wtype, k);
  const uint8_t *wb = (const uint8_t *)w;
  // n > 8: the GEMM below (v9 for 9 <= n <= 64 is reached through
  // orch_matmul_multi, which the Go side calls for it: sdk/ml/cuda/ops.go).
  const int route = n <= 8 ? gemv_route(ctx, wtype, n, k, m, rb) : GR_NONE;
  if (route != GR_NONE) {
    switch (route) {
    case GR_F32ROWS:
      launch_gemv_f32_rows(ctx->stream, y, x, (const float *)w, bias, n, k, m, accumulate);
      break;
    case GR_V7: { // tensor-core GEMV (gemv16.cuh)
      void *scr = nullptr;
      int rc = orch_scratch(ctx, gemv7_scratch(n, k), &scr);
      if (rc != ORCH_OK) return rc;
      ORCH_DISPATCH_TYPE(wtype, launch_gemv7, ctx->stream, scr, y, x, wb, bias, n, k, m, rb, accumulate)
      break;
    }
    case GR_V9: { // v9 (gemv16.cuh): x staged to scratch, or per CTA for n <= 2
      void *scr = nullptr;
      int rc = orch_scratch(ctx, gemv9_scratch(n, k), &scr);
      if (rc != ORCH_OK) return rc;
      ORCH_DISPATCH_TYPE(wtype, launch_gemv9, ctx->stream, scr, y, x, wb, bias, n, k, m, rb, accumulate)
      break;
    }
    case GR_V6: ORCH_DISPATCH_TYPE(wtype, launch_gemv6, ctx->stream, y, x, wb, bias, n, k, m, rb, accumulate); break;
    case GR_V5:
      if (q8r)
        launch_gemv5<ORCH_T_Q8_0R>(ctx->stream, y, x, wb + rp_offset(ORCH_T_Q8_0, m, k), bias, n, k, m,
                                   rp_row_bytes(ORCH_T_Q8_0, k), accumulate);
      else
        ORCH_DISPATCH_TYPE(wtype, launch_gemv5, ctx->stream, y, x, wb, bias, n, k, m, rb, accumulate);
      break;
    case GR_V4: ORCH_DISPATCH_TYPE(wtype, launch_gemv4, ctx->stream, y, x, wb, bias, n, k, m, rb, accumulate); break;
    case GR_V3: ORCH_DISPATCH_TYPE(wtype, launch_gemv3, ctx->stream, y, x, wb, bias, n, k, m, rb, accumulate); break;
    case GR_V1: ORCH_DISPATCH_TYPE(wtype, launch_gemv, ctx->stream, y, x, wb, bias, n, k, m, rb, accumulate); break;
    default: ORCH_DISPATCH_TYPE(wtype, launch_gemv2, ctx->stream, y, x, wb, bias, n, k, m, rb, accumulate); break;
    }
    ORCH_LAUNCHED(op);
    return ORCH_OK;
  }
  // n > 8, or no GEMV for this shape: matmul_prefill.cu.
  return matmul_large(ctx, y, x, wb, wtype, bias, n, k, m, accumulate, rb);
}

extern "C" int orch_matmul_multi(orch_ctx *ctx, const float *x, int32_t wtype, int64_t n, int64_t k, int32_t count,
                                 const orch_gemv_part *parts) {
  const char *op = "matmul_multi";
  ORCH_CHECK_ARG(ctx && x && parts && n >= 0 && k > 0 && count >= 1 && count <= GEMV_MAX_PARTS, op);
  const bool q8r = q8_dual(wtype);
  for (int p = 0; p < count; p++) ORCH_CHECK_ARG(parts[p].w && parts[p].y && parts[p].m > 0, op);
  // Only where orch_matmul would run the same GEMV, v5 or v7, for every part
  // (so that each output is bit-identical to its own orch_matmul);
  // otherwise the caller launches the parts one by one.
  const int64_t rb = orch_row_bytes(wtype, k);
  int route = -1;
  bool ok = n >= 1 && n <= gemv_max_n(ctx) && gemv3_type(wtype) && k % 32 == 0 && aligned16(x);
  gemv5_parts P = {};
  for (int p = 0; ok && p < count; p++) {
    const int r = gemv_route(ctx, wtype, n, k, parts[p].m, rb);
    ok = (r == GR_V5 || r == GR_V7 || r == GR_V9) && (route < 0 || r == route) && aligned16(parts[p].w);
    route = r;
    P.w[p] = (const uint8_t *)parts[p].w;
    P.bias[p] = parts[p].bias;
    P.y[p] = parts[p].y;
    P.m[p] = parts[p].m;
  }
  if (!ok) {
    orch_set_error("matmul_multi: not one v5 / v7 / v9 GEMV path for all parts (type %d, n=%lld, k=%lld)", wtype,
                   (long long)n, (long long)k);
    return ORCH_ERR_UNSUPPORTED;
  }
  if (route == GR_V9) {
    void *scr = nullptr;
    int rc = orch_scratch(ctx, gemv9_scratch(n, k), &scr);
    if (rc != ORCH_OK) return rc;
    ORCH_DISPATCH_TYPE(wtype, launch_gemv9_multi, ctx->stream, scr, P, count, x, n, k, rb)
  } else if (route == GR_V7) {
    void *scr = nullptr;
    int rc = orch_scratch(ctx, gemv7_scratch(n, k), &scr);
    if (rc != ORCH_OK) return rc;
    ORCH_DISPATCH_TYPE(wtype, launch_gemv7_multi, ctx->stream, scr, P, count, x, n, k, rb)
  } else if (q8r) { // the repacked rows
    for (int p = 0; p < count; p++) P.w[p] += rp_offset(ORCH_T_Q8_0, P.m[p], k);
    launch_gemv5_multi<ORCH_T_Q8_0R>(ctx->stream, P, count, x, n, k, rp_row_bytes(ORCH_T_Q8_0, k));
  } else {
    ORCH_DISPATCH_TYPE(wtype, launch_gemv5_multi, ctx->stream, P, count, x, n, k, rb);
  }
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}

// Gate and up GEMVs with the SwiGLU folded in (gemv16.cuh gemv5_glu_kernel):
// only where orch_matmul_multi would run v5 for both parts (n = 1, 2 with
// the default routing), so gate and up are bit-identical to it and out to
// orch_swiglu on them; otherwise ORCH_ERR_UNSUPPORTED and the caller runs
// the three ops. ORCH_CUDA_GLU=0 declines always (A/B timing).
static bool glu_off_env() {
  static const bool v = [] {
    const char *e = getenv("ORCH_CUDA_GLU");
    return e && strcmp(e, "0") == 0;
  }();
  return v;
}

extern "C" int orch_matmul_swiglu(orch_ctx *ctx, const float *x, int32_t wtype, int64_t n, int64_t k,
                                  const orch_gemv_part *gate_up, float *out) {
  const char *op = "matmul_swiglu";
  ORCH_CHECK_ARG(ctx && x && gate_up && out && n >= 0 && k > 0, op);
  const bool q8r = q8_dual(wtype);
  const orch_gemv_part &g = gate_up[0], &u = gate_up[1];
  ORCH_CHECK_ARG(g.w && g.y && u.w && u.y && g.m > 0 && g.m == u.m, op);
  const int64_t rb = orch_row_bytes(wtype, k);
  const bool ok = !glu_off_env() && n >= 1 && n <= 2 && gemv3_type(wtype) && k % 32 == 0 && aligned16(x) &&
                  aligned16(g.w) && aligned16(u.w) && gemv_route(ctx, wtype, n, k, g.m, rb) == GR_V5;
  if (!ok) {
    orch_set_error("matmul_swiglu: not the v5 GEMV (type %d, n=%lld, k=%lld, m=%lld)", wtype, (long long)n,
                   (long long)k, (long long)g.m);
    return ORCH_ERR_UNSUPPORTED;
  }
  gemv5_glu_args A = {(const uint8_t *)g.w, (const uint8_t *)u.w, g.bias, u.bias, g.y, u.y, out, g.m};
  if (q8r) {
    A.wg += rp_offset(ORCH_T_Q8_0, g.m, k), A.wu += rp_offset(ORCH_T_Q8_0, u.m, k);
    launch_gemv5_glu<ORCH_T_Q8_0R>(ctx->stream, A, x, n, k, rp_row_bytes(ORCH_T_Q8_0, k));
  } else {
    ORCH_DISPATCH_TYPE(wtype, launch_gemv5_glu, ctx->stream, A, x, n, k, rb);
  }
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}

// The RMSNorm folded into the one- and two-token v5 GEMVs around it (session 8; gemv16.cuh gemv5_nf, orch_cuda.h).
// Only where orch_matmul / orch_matmul_multi / orch_matmul_swiglu would run v5 (so y, and the consumers' dots,
// are theirs); otherwise ORCH_ERR_UNSUPPORTED, nothing launched, and the caller runs the unfolded ops.
constexpr int64_t NF_MAX_PARTIALS = GEMV5_NF_MAX; // the consumer's limit (rows <= 8 x this)

// ORCH_CUDA_L2PF (read once): how much of the next GEMV's weight orch_matmul_addnorm_pf asks into L2, "MB" or
// "MB,last" (an evict_last policy); 0: none. Default 8,last. Session 16 (H100, same call, Llama tg128): run 1 with
// ORCH_CUDA_ATTN_KV0=k: off 302.5 / 302.6, 4 MB 303.1, 8 303.3, 12 302.7, 16 301.8, 24 299.5 (the prefetches then
// outlast the attention and compete with the projection's loads), 8,last 304.5, 16,last 301.2; run 2 with K and V:
// off 305.8, 4..10,last 307.3-307.4, 12,last 306.2, 8 (no policy) 306.7.
struct l2pf_cfg {
  int64_t bytes;
  int mode;
};
static l2pf_cfg l2pf_env() {
  static const l2pf_cfg c = [] {
    l2pf_cfg r = {8 << 20, 1};
    const char *e = getenv("ORCH_CUDA_L2PF");
    if (!e || !*e) return r;
    r = {0, 0};
    char *end = nullptr;
    const double mb = strtod(e, &end);
    if (end == e || mb < 0 || mb > 1024) return r;
    r.bytes = (int64_t)(mb * 1024 * 1024) & ~(int64_t)15;
    r.mode = strcmp(end, ",last") == 0 ? 1 : 0;
    return r;
  }();
  return c;
}

static int matmul_addnorm(orch_ctx *ctx, float *y, const float *x, const void *w, int32_t wtype, const float *bias,
                          int64_t n, int64_t k, int64_t m, float *res, const float *nw, float *xt, float *ss,
                          const void *pf_w, int32_t pf_wtype, int64_t pf_m, int64_t pf_k) {
  const char *op = pf_w ? "matmul_addnorm_pf" : "matmul_addnorm";
  ORCH_CHECK_ARG(ctx && y && x && w && res && nw && xt && ss && n >= 0 && k > 0 && m > 0, op);
  const bool q8r = q8_dual(wtype);
  const int64_t rb = orch_row_bytes(wtype, k);
  const int route = n >= 1 && n <= 8 ? gemv_route(ctx, wtype, n, k, m, rb) : GR_NONE;
  const bool ok = gemv3_type(wtype) && k % 32 == 0 && aligned16(x) && aligned16(w) && gemv5_rpw(m) == 1 &&
                  m % 32 == 0 && m / GEMV16_WARPS <= NF_MAX_PARTIALS && aligned16(ss) &&
                  ((route == GR_V5 && n <= 2) || route == GR_V7);
  if (!ok) {
    orch_set_error("matmul_addnorm: not the one-row-per-warp v5 or the v7 GEMV (type %d, n=%lld, k=%lld, m=%lld)",
                   wtype, (long long)n, (long long)k, (long long)m);
    return ORCH_ERR_UNSUPPORTED;
  }
  gemv5_nf F;
  F.res = res, F.w = nw, F.xt = xt, F.ss = ss;
  const l2pf_cfg pc = l2pf_env();
  if (pf_w && pc.bytes > 0 && route == GR_V5 && pf_k > 0 && pf_k % 32 == 0 && pf_m > 0) {
    // the rows the next v5 GEMV reads first: its first rows (the repacked ones of a dual weight)
    const uint8_t *base = (const uint8_t *)pf_w;
    int64_t rows_bytes = pf_m * orch_row_bytes(pf_wtype, pf_k);
    if (q8_dual(pf_wtype)) {
      base += rp_offset(ORCH_T_Q8_0, pf_m, pf_k);
      rows_bytes = pf_m * rp_row_bytes(ORCH_T_Q8_0, pf_k);
    }
    if (aligned16(base) && rows_bytes > 0) {
      F.pf = base;
      F.pfb = min(pc.bytes, rows_bytes) & ~(int64_t)15;
      F.pfm = pc.mode;
    }
  }
  if (route == GR_V7) {
    void *scr = nullptr;
    int rc = orch_scratch(ctx, gemv7_scratch(n, k), &scr);
    if (rc != ORCH_OK) return rc;
    ORCH_DISPATCH_TYPE(wtype, launch_gemv7, ctx->stream, scr, y, x, (const uint8_t *)w, bias, n, k, m, rb, 0, &F);
  } else if (q8r) {
    launch_gemv5_nf_prod<ORCH_T_Q8_0R>(ctx->stream, y, x, (const uint8_t *)w + rp_offset(ORCH_T_Q8_0, m, k), bias, n,
                                       k, m, rp_row_bytes(ORCH_T_Q8_0, k), F);
  } else {
    ORCH_DISPATCH_TYPE(wtype, launch_gemv5_nf_prod, ctx->stream, y, x, (const uint8_t *)w, bias, n, k, m, rb, F);
  }
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}

extern "C" int orch_matmul_addnorm(orch_ctx *ctx, float *y, const float *x, const void *w, int32_t wtype,
                                   const float *bias, int64_t n, int64_t k, int64_t m, float *res, const float *nw,
                                   float *xt, float *ss) {
  return matmul_addnorm(ctx, y, x, w, wtype, bias, n, k, m, res, nw, xt, ss, nullptr, 0, 0, 0);
}

extern "C" int orch_matmul_addnorm_pf(orch_ctx *ctx, float *y, const float *x, const void *w, int32_t wtype,
                                      const float *bias, int64_t n, int64_t k, int64_t m, float *res, const float *nw,
                                      float *xt, float *ss, const void *pf_w, int32_t pf_wtype, int64_t pf_m,
                                      int64_t pf_k) {
  ORCH_CHECK_ARG(pf_w && pf_m > 0 && pf_k > 0, "matmul_addnorm_pf");
  return matmul_addnorm(ctx, y, x, w, wtype, bias, n, k, m, res, nw, xt, ss, pf_w, pf_wtype, pf_m, pf_k);
}

// ss: the producer's partials (16-byte aligned, nss % 4 == 0: the consumer copies them in 16-byte pieces).
static bool nf_args_ok(const float *ss, int64_t nss) {
  return ss && aligned16(ss) && nss >= 4 && nss % 4 == 0 && nss <= NF_MAX_PARTIALS;
}

extern "C" int orch_matmul_multi_nf(orch_ctx *ctx, const float *x, int32_t wtype, int64_t n, int64_t k, int32_t count,
                                    const orch_gemv_part *parts, const float *ss, int64_t nss, float eps) {
  const char *op = "matmul_multi_nf";
  ORCH_CHECK_ARG(ctx && x && parts && n >= 0 && k > 0 && count >= 1 && count <= GEMV_MAX_PARTS, op);
  const bool q8r = q8_dual(wtype);
  for (int p = 0; p < count; p++) ORCH_CHECK_ARG(parts[p].w && parts[p].y && parts[p].m > 0, op);
  const int64_t rb = orch_row_bytes(wtype, k);
  bool ok = n >= 1 && n <= 8 && gemv3_type(wtype) && k % 32 == 0 && aligned16(x) && nf_args_ok(ss, nss);
  int route = -1;
  gemv5_parts P = {};
  for (int p = 0; ok && p < count; p++) {
    const int r = gemv_route(ctx, wtype, n, k, parts[p].m, rb);
    ok = ((r == GR_V5 && n <= 2) || r == GR_V7) && (route < 0 || r == route) && aligned16(parts[p].w);
    route = r;
    P.w[p] = (const uint8_t *)parts[p].w;
    P.bias[p] = parts[p].bias;
    P.y[p] = parts[p].y;
    P.m[p] = parts[p].m;
  }
  if (!ok) {
    orch_set_error("matmul_multi_nf: not one v5 / v7 GEMV for all parts, or nss=%lld (type %d, n=%lld, k=%lld)",
                   (long long)nss, wtype, (long long)n, (long long)k);
    return ORCH_ERR_UNSUPPORTED;
  }
  gemv5_nf F;
  F.ss = (float *)ss, F.nss = (int)nss, F.eps = eps;
  if (route == GR_V7) {
    void *scr = nullptr;
    int rc = orch_scratch(ctx, gemv7_scratch(n, k), &scr);
    if (rc != ORCH_OK) return rc;
    ORCH_DISPATCH_TYPE(wtype, launch_gemv7_multi, ctx->stream, scr, P, count, x, n, k, rb, &F)
  } else if (q8r) {
    for (int p = 0; p < count; p++) P.w[p] += rp_offset(ORCH_T_Q8_0, P.m[p], k);
    launch_gemv5_multi_nf<ORCH_T_Q8_0R>(ctx->stream, P, count, x, n, k, rp_row_bytes(ORCH_T_Q8_0, k), F);
  } else {
    ORCH_DISPATCH_TYPE(wtype, launch_gemv5_multi_nf, ctx->stream, P, count, x, n, k, rb, F);
  }
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}

extern "C" int orch_matmul_swiglu_nf(orch_ctx *ctx, const float *x, int32_t wtype, int64_t n, int64_t k,
                                     const orch_gemv_part *gate_up, float *out, const float *ss, int64_t nss,
                                     float eps) {
  const char *op = "matmul_swiglu_nf";
  ORCH_CHECK_ARG(ctx && x && gate_up && out && n >= 0 && k > 0, op);
  const bool q8r = q8_dual(wtype);
  const orch_gemv_part &g = gate_up[0], &u = gate_up[1];
  ORCH_CHECK_ARG(g.w && g.y && u.w && u.y && g.m > 0 && g.m == u.m, op);
  const int64_t rb = orch_row_bytes(wtype, k);
  const bool ok = !glu_off_env() && n >= 1 && n <= 2 && gemv3_type(wtype) && k % 32 == 0 && aligned16(x) &&
                  aligned16(g.w) && aligned16(u.w) && gemv_route(ctx, wtype, n, k, g.m, rb) == GR_V5 &&
                  nf_args_ok(ss, nss);
  if (!ok) {
    orch_set_error("matmul_swiglu_nf: not the v5 GEMV, or nss=%lld (type %d, n=%lld, k=%lld, m=%lld)", (long long)nss,
                   wtype, (long long)n, (long long)k, (long long)g.m);
    return ORCH_ERR_UNSUPPORTED;
  }
  gemv5_glu_args A = {(const uint8_t *)g.w, (const uint8_t *)u.w, g.bias, u.bias, g.y, u.y, out, g.m};
  gemv5_nf F;
  F.ss = (float *)ss, F.nss = (int)nss, F.eps = eps;
  if (q8r) {
    A.wg += rp_offset(ORCH_T_Q8_0, g.m, k), A.wu += rp_offset(ORCH_T_Q8_0, u.m, k);
    launch_gemv5_glu<ORCH_T_Q8_0R>(ctx->stream, A, x, n, k, rp_row_bytes(ORCH_T_Q8_0, k), -1, &F);
  } else {
    ORCH_DISPATCH_TYPE(wtype, launch_gemv5_glu, ctx->stream, A, x, n, k, rb, -1, &F);
  }
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}

// Timing aid (session 6): see orch_cuda.h. The trace kernels run for Q8_0
// at n = 1 on v5's route while on.
extern "C" int orch_gemv_trace(orch_ctx *ctx, int32_t on, void *out, int64_t cap, int64_t *count) {
  const char *op = "gemv_trace";
  ORCH_CHECK_ARG(ctx && cap >= 0 && (cap == 0 || out), op);
  ORCH_CUDA(cudaStreamSynchronize(ctx->stream), op);
  unsigned n = 0;
  ORCH_CUDA(cudaMemcpyFromSymbol(&n, g_gemv_trace_n, sizeof n), op);
  if (count) *count = n;
  const int64_t got = min(min((int64_t)n, (int64_t)GEMV_TRACE_CAP), cap);
  if (got > 0) ORCH_CUDA(cudaMemcpyFromSymbol(out, g_gemv_trace, (size_t)got * sizeof(gemv_trace_rec)), op);
  const unsigned zero = 0;
  ORCH_CUDA(cudaMemcpyToSymbol(g_gemv_trace_n, &zero, sizeof zero), op);
  g_gemv_trace_on = on != 0;
  return ORCH_OK;
}

extern "C" int orch_moe_matmul(orch_ctx *ctx, float *y, const float *x, int32_t x_per_slot, const void *w,
                               int32_t wtype, const float *bias, const int32_t *ids, int64_t n, int32_t n_slots,
                               int64_t k, int64_t m) {
  const char *op = "moe_matmul";
  ORCH_CHECK_ARG(ctx && y && x && w && ids && n >= 0 && n_slots > 0 && k > 0 && m > 0, op);
  if (!type_known(wtype) || k % 32 || k % type_block_elems(wtype)) {
    orch_set_error("moe_matmul: unsupported type %d or k=%lld", wtype, (long long)k);
    return ORCH_ERR_UNSUPPORTED;
  }
  ORCH_CHECK_ARG(aligned16(x) && aligned16(w), op);
  ORCH_CHECK_ARG(n * n_slots <= 65535, op);
  if (n == 0) return ORCH_OK;
  const int64_t rb = orch_row_bytes(wtype, k);
  if (ctx->gemv >= 3 && gemv3_type(wtype) && gemv3_smem(k, 1) <= GEMV3_MAX_SMEM) {
    ORCH_DISPATCH_TYPE(wtype, launch_moe3, ctx->stream, y, x, (const uint8_t *)w, bias, ids, n, n_slots, x_per_slot,
                       k, m, rb);
  } else if (ctx->gemv != 2) {
    ORCH_DISPATCH_TYPE(wtype, launch_moe, ctx->stream, y, x, (const uint8_t *)w, bias, ids, n, n_slots, x_per_slot,
                       k, m, rb);
  } else {
    ORCH_DISPATCH_TYPE(wtype, launch_moe2, ctx->stream, y, x, (const uint8_t *)w, bias, ids, n, n_slots, x_per_slot,
                       k, m, rb);
  }
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}

template <int T>
__global__ void get_rows_kernel(float *__restrict__ out, const uint8_t *__restrict__ table,
                                const int32_t *__restrict__ ids, int64_t n, int64_t dim, int64_t row_bytes,
                                int accumulate) {
  pdl_trigger();
  pdl_wait(); // ids (and out, when accumulating) come from earlier kernels
  const int64_t nch = dim / 32;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * nch; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = i / nch, c = i % nch;
    float v[32];
    dequant_chunk<T>(table + (int64_t)ids[r] * row_bytes, c, v);
    float *o = out + r * dim + c * 32;
#pragma unroll
    for (int j = 0; j < 32; j++) o[j] = accumulate ? o[j] + v[j] : v[j];
  }
}

template <int T>
static void launch_get_rows(cudaStream_t st, float *out, const uint8_t *table, const int32_t *ids, int64_t n,
                            int64_t dim, int64_t rb, int acc) {
  unsigned blocks = (unsigned)min(ceil_div(n * (dim / 32), 128), (int64_t)65535);
  orch_launch_pdl(get_rows_kernel<T>, dim3(blocks), dim3(128), 0, st, out, table, ids, n, dim, rb, acc);
}

extern "C" int orch_get_rows(orch_ctx *ctx, float *out, const void *table, int32_t ttype, const int32_t *ids,
                             int64_t n, int64_t dim, int32_t accumulate) {
  const char *op = "get_rows";
  ORCH_CHECK_ARG(ctx && out && table && ids && n >= 0 && dim > 0, op);
  if (!type_known(ttype) || dim % 32 || dim % type_block_elems(ttype)) {
    orch_set_error("get_rows: unsupported type %d or dim=%lld", ttype, (long long)dim);
    return ORCH_ERR_UNSUPPORTED;
  }
  ORCH_CHECK_ARG(aligned16(table), op);
  if (n == 0) return ORCH_OK;
  ORCH_DISPATCH_TYPE(ttype, launch_get_rows, ctx->stream, out, (const uint8_t *)table, ids, n, dim,
                     orch_row_bytes(ttype, dim), accumulate);
  ORCH_LAUNCHED(op);
  return ORCH_OK;
}
