// prefetch.cu — L2 prefetch of upcoming decode weights inside a captured
// graph (issue 7, session 6; docs/perf-cuda.md "Round 7").
//
// One-token decode is a dependent chain of small kernels; some links (decode
// attention at short depth, RoPE + KV write, the norms) move almost no DRAM
// bytes, so DRAM idles while they run. A prefetch node pulls the weight of a
// later GEMV into L2 meanwhile, so that GEMV reads L2 instead of DRAM.
//
// Mechanism (the graph is captured from one stream; no graph-node API, whose
// signatures differ between CUDA 12 and 13): while ctx's stream is captured,
// orch_pf_mark records a ring event after each op (a capture-time marker, no
// node). orch_pf_l2 makes a side stream wait on the event of an earlier op
// (the "anchor") and launches the prefetch kernel there: a node that depends
// on the anchor op only and has no successors, so it runs concurrently with
// the ops after the anchor and delays none of them. orch_graph_end joins the
// side stream back (an event on its last node) before ending the capture, as
// stream capture requires; the joined prefetches are leaves of the graph.
// Side-stream launches are chained (each prefetch node also depends on the
// previous prefetch node): a prefetch kernel only issues requests and exits,
// so that costs ~nothing and keeps one join.
//
// The kernel: sm_90 + CUDA >= 12 issues cp.async.bulk.prefetch.L2 (one
// instruction per PF_CHUNK bytes, executed by the SM's TMA unit; optionally
// with an L2::evict_last cache policy from createpolicy); elsewhere (nvcc
// 11.8, sm_80) a prefetch.global.L2 per 128-byte line. Neither returns data
// to the SM nor changes memory: results are bit-identical with and without.
#include <mutex>
#include <unordered_map>

#include "common.cuh"
#include "prefetch_plan.cuh"

namespace {

constexpr int PF_RING = 32; // marks kept: the largest anchor distance
constexpr int PF_THREADS = 128;
constexpr int64_t PF_MAX_CTAS = 64;
constexpr int64_t PF_BYTES_PER_CTA = 256 << 10;

struct pf_state {
  cudaStream_t side = nullptr;
  cudaEvent_t ring[PF_RING] = {};
  cudaEvent_t join = nullptr;
  int64_t marks = 0;   // marks recorded in the current capture
  bool joined = false; // the side stream joined the current capture
};

std::mutex g_pf_mu;
std::unordered_map<orch_ctx *, pf_state *> g_pf;

pf_state *pf_get(orch_ctx *ctx) {
  std::lock_guard<std::mutex> lk(g_pf_mu);
  auto it = g_pf.find(ctx);
  return it == g_pf.end() ? nullptr : it->second;
}

bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(s, &cs) == cudaSuccess && cs == cudaStreamCaptureStatusActive;
}

__global__ void __launch_bounds__(PF_THREADS) l2_prefetch_kernel(pf_args a) {
  if (a.dry) return; // ORCH_PF_DRY: the node without its requests (cost of the graph fork alone)
  const int64_t total = a.units[a.n];
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDACC_VER_MAJOR__) && __CUDACC_VER_MAJOR__ >= 12
  if (!a.line) {
    uint64_t pol = 0;
    if (a.policy & ORCH_PF_EVICT_LAST) asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
    for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < total; u += stride) {
      const char *p;
      int64_t size;
      pf_unit(a, u, &p, &size);
      if (a.policy & ORCH_PF_EVICT_LAST)
        asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(p), "r"((uint32_t)size),
                     "l"(pol)
                     : "memory");
      else
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"((uint32_t)size) : "memory");
    }
    return;
  }
#endif
  for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < total; u += stride) {
    const char *p;
    int64_t size;
    pf_unit(a, u, &p, &size);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (a.policy & ORCH_PF_EVICT_LAST)
      asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p) : "memory");
    else
      asm volatile("prefetch.global.L2 [%0];" ::"l"(p) : "memory");
#else
    (void)p;
#endif
  }
}

// Busy-waits ns nanoseconds (one warp): the "idle link" of the prefetch perf
// test (like decode attention at short depth: little DRAM traffic). trigger:
// lets the next (PDL-launched) kernel start at once, as the decode kernels
// do, so that its CTAs load their first weights while this one spins.
__global__ void spin_kernel(int64_t ns, int trigger) {
  if (trigger) pdl_trigger();
  pdl_wait();
  uint64_t t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while ((int64_t)(t - t0) < ns);
}

// Whether this build and device have cp.async.bulk.prefetch.L2 (sm_90, CUDA >= 12).
bool bulk_available(int device) {
#if defined(__CUDACC_VER_MAJOR__) && __CUDACC_VER_MAJOR__ >= 12
  int major = 0;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9;
#else
  (void)device;
  return false;
#endif
}

// Launches one prefetch kernel for ranges on st; *launched says whether
// there was anything to prefetch.
int pf_launch(orch_ctx *ctx, cudaStream_t st, const orch_pf_range *ranges, int32_t count, int32_t flags,
              bool *launched, const char *op) {
  *launched = false;
  pf_args a = {};
  const bool line = (flags & ORCH_PF_LINES) || !bulk_available(ctx->device);
  if (pf_plan(&a, ranges, count, line ? PF_LINE : PF_CHUNK) == 0) return ORCH_OK;
  a.policy = flags & ORCH_PF_EVICT_LAST;
  a.line = line;
  a.dry = (flags & ORCH_PF_DRY) != 0;
  const int64_t max_ctas = (flags >> ORCH_PF_CTAS_SHIFT) & 0xff; // 0: the default
  const int64_t ctas = pf_ctas(a, PF_THREADS, PF_BYTES_PER_CTA, max_ctas ? max_ctas : PF_MAX_CTAS);
  l2_prefetch_kernel<<<(unsigned)ctas, PF_THREADS, 0, st>>>(a);
  ORCH_LAUNCHED(op);
  *launched = true;
  return ORCH_OK;
}

} // namespace

extern "C" int orch_pf_init(orch_ctx *ctx) {
  ORCH_CHECK_ARG(ctx, "pf_init");
  if (pf_get(ctx)) return ORCH_OK;
  ORCH_CHECK_ARG(!capturing(ctx->stream), "pf_init");
  ORCH_CUDA(cudaSetDevice(ctx->device), "pf_init");
  pf_state *s = new pf_state();
  cudaError_t e = cudaStreamCreateWithFlags(&s->side, cudaStreamNonBlocking);
  for (int i = 0; e == cudaSuccess && i < PF_RING; i++) e = cudaEventCreateWithFlags(&s->ring[i], cudaEventDisableTiming);
  if (e == cudaSuccess) e = cudaEventCreateWithFlags(&s->join, cudaEventDisableTiming);
  if (e == cudaSuccess) { // load the kernel now, not first inside a capture
    pf_args a = {};
    l2_prefetch_kernel<<<1, PF_THREADS, 0, s->side>>>(a);
    e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaStreamSynchronize(s->side);
  }
  if (e != cudaSuccess) {
    orch_set_error("pf_init: %s", cudaGetErrorString(e));
    for (int i = 0; i < PF_RING; i++)
      if (s->ring[i]) cudaEventDestroy(s->ring[i]);
    if (s->join) cudaEventDestroy(s->join);
    if (s->side) cudaStreamDestroy(s->side);
    delete s;
    return ORCH_ERR_CUDA;
  }
  std::lock_guard<std::mutex> lk(g_pf_mu);
  g_pf[ctx] = s;
  return ORCH_OK;
}

// Called by orch_destroy.
void orch_pf_release(orch_ctx *ctx) {
  pf_state *s = nullptr;
  {
    std::lock_guard<std::mutex> lk(g_pf_mu);
    auto it = g_pf.find(ctx);
    if (it == g_pf.end()) return;
    s = it->second;
    g_pf.erase(it);
  }
  cudaStreamSynchronize(s->side);
  for (int i = 0; i < PF_RING; i++) cudaEventDestroy(s->ring[i]);
  cudaEventDestroy(s->join);
  cudaStreamDestroy(s->side);
  delete s;
}

// Called by orch_graph_begin after the capture began.
void orch_pf_capture_begin(orch_ctx *ctx) {
  if (pf_state *s = pf_get(ctx)) {
    s->marks = 0;
    s->joined = false;
  }
}

// Called by orch_graph_end before the capture ends: joins the side stream.
int orch_pf_capture_end(orch_ctx *ctx) {
  pf_state *s = pf_get(ctx);
  if (!s || !s->joined) return ORCH_OK;
  s->joined = false;
  ORCH_CUDA(cudaEventRecord(s->join, s->side), "graph_end (prefetch join)");
  ORCH_CUDA(cudaStreamWaitEvent(ctx->stream, s->join, 0), "graph_end (prefetch join)");
  return ORCH_OK;
}

extern "C" int orch_pf_mark(orch_ctx *ctx, int64_t *marks) {
  ORCH_CHECK_ARG(ctx, "pf_mark");
  pf_state *s = pf_get(ctx);
  if (!s) {
    orch_set_error("pf_mark: orch_pf_init was not called");
    return ORCH_ERR_INVALID;
  }
  if (capturing(ctx->stream)) {
    ORCH_CUDA(cudaEventRecord(s->ring[s->marks % PF_RING], ctx->stream), "pf_mark");
    s->marks++;
  }
  if (marks) *marks = s->marks;
  return ORCH_OK;
}

extern "C" int orch_pf_l2(orch_ctx *ctx, int64_t anchor, const orch_pf_range *ranges, int32_t count, int32_t flags,
                          int32_t *added) {
  ORCH_CHECK_ARG(ctx && (ranges || count == 0) && count >= 0 && count <= ORCH_PF_MAX_RANGES, "pf_l2");
  if (added) *added = 0;
  pf_state *s = pf_get(ctx);
  if (!s) {
    orch_set_error("pf_l2: orch_pf_init was not called");
    return ORCH_ERR_INVALID;
  }
  if (!capturing(ctx->stream)) return ORCH_OK; // only inside a captured graph
  ORCH_CHECK_ARG(anchor <= s->marks, "pf_l2");
  if (anchor < 1 || s->marks - anchor >= PF_RING) return ORCH_OK; // no such mark (any more): no prefetch
  ORCH_CUDA(cudaStreamWaitEvent(s->side, s->ring[(anchor - 1) % PF_RING], 0), "pf_l2");
  s->joined = true; // from here the side stream is part of the capture: orch_graph_end joins it
  bool launched = false;
  const int rc = pf_launch(ctx, s->side, ranges, count, flags, &launched, "pf_l2");
  if (added) *added = launched ? 1 : 0;
  return rc;
}

extern "C" int orch_spin(orch_ctx *ctx, int64_t ns, int32_t trigger) {
  ORCH_CHECK_ARG(ctx && ns >= 0, "spin");
  orch_launch_pdl(spin_kernel, dim3(1), dim3(32), 0, ctx->stream, ns, trigger ? 1 : 0);
  ORCH_LAUNCHED("spin");
  return ORCH_OK;
}
