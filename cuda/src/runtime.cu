// runtime.cu — context, memory, copies, streams, CUDA graphs and events.
#include <mutex>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"

static std::mutex g_err_mu;
static char g_err[1024] = "";

void orch_set_error(const char *fmt, ...) {
  std::lock_guard<std::mutex> lk(g_err_mu);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_err, sizeof g_err, fmt, ap);
  va_end(ap);
}

extern "C" int orch_abi_version(void) { return ORCH_ABI_VERSION; }

int g_orch_pdl = 0;
int orch_carveout() {
  static const int v = [] {
    const char *e = getenv("ORCH_CUDA_CARVEOUT");
    if (!e || !*e) return 43;
    if (strcmp(e, "off") == 0) return -1;
    char *end = nullptr;
    const long c = strtol(e, &end, 10);
    return end != e && !*end && c >= 0 && c <= 100 ? (int)c : -1;
  }();
  return v;
}

__global__ void pdl_probe_kernel(int *n) {
  pdl_trigger();
  pdl_wait();
  if (threadIdx.x == 0) atomicAdd(n, 1);
}

// Whether PDL launches work here, eagerly and captured into a graph: two
// dependent launches each way on a scratch stream, counted on the device.
// Probed once per process and device; any failure turns PDL off with one
// line on stderr (a driver or runtime without programmatic edges in graphs
// must not break every decode graph).
static bool pdl_probe(int device) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 9) return false;
  static std::mutex mu;
  static int probed[64];   // 0 unknown, 1 works, 2 does not
  std::lock_guard<std::mutex> lk(mu);
  if (device < 0 || device >= 64) return false;
  if (probed[device]) return probed[device] == 1;
  const char *why = nullptr;
  cudaStream_t s = nullptr;
  int *d = nullptr, h = 0;
  cudaGraph_t g = nullptr;
  cudaGraphExec_t ex = nullptr;
  const int was = g_orch_pdl;
  g_orch_pdl = 1;
  if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess || cudaMalloc(&d, sizeof(int)) != cudaSuccess ||
      cudaMemsetAsync(d, 0, sizeof(int), s) != cudaSuccess) {
    why = "setup";
  } else {
    orch_launch_pdl(pdl_probe_kernel, dim3(2), dim3(32), 0, s, d);
    orch_launch_pdl(pdl_probe_kernel, dim3(2), dim3(32), 0, s, d);
    if (cudaGetLastError() != cudaSuccess || cudaStreamSynchronize(s) != cudaSuccess) why = "eager launch";
  }
  if (!why) {
    if (cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
      why = "capture";
    } else {
      orch_launch_pdl(pdl_probe_kernel, dim3(2), dim3(32), 0, s, d);
      orch_launch_pdl(pdl_probe_kernel, dim3(2), dim3(32), 0, s, d);
      const cudaError_t le = cudaGetLastError();
      if (cudaStreamEndCapture(s, &g) != cudaSuccess || le != cudaSuccess) why = "captured launch";
      else if (cudaGraphInstantiateWithFlags(&ex, g, 0) != cudaSuccess) why = "graph instantiate";
      else if (cudaGraphLaunch(ex, s) != cudaSuccess || cudaStreamSynchronize(s) != cudaSuccess) why = "graph launch";
    }
  }
  if (!why && (cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost) != cudaSuccess || h != 8)) why = "wrong count";
  if (ex) cudaGraphExecDestroy(ex);
  if (g) cudaGraphDestroy(g);
  if (d) cudaFree(d);
  if (s) cudaStreamDestroy(s);
  cudaGetLastError(); // a failed probe leaves no error behind
  g_orch_pdl = was;
  probed[device] = why ? 2 : 1;
  if (why)
    fprintf(stderr, "liborch_cuda: programmatic dependent launch disabled on device %d (probe failed: %s)\n", device,
            why);
  return !why;
}

// PDL is available from compute capability 9.0 (Hopper) on, where the probe passes.
static bool pdl_device_ok(int device) { return pdl_probe(device); }

extern "C" int orch_set_pdl(orch_ctx *ctx, int32_t on, int32_t *was) {
  ORCH_CHECK_ARG(ctx, "set_pdl");
  if (was) *was = g_orch_pdl;
  g_orch_pdl = on && pdl_device_ok(ctx->device) ? 1 : 0;
  return ORCH_OK;
}

extern "C" int orch_last_error(char *buf, int64_t n) {
  if (!buf || n <= 0) return ORCH_ERR_INVALID;
  std::lock_guard<std::mutex> lk(g_err_mu);
  strncpy(buf, g_err, (size_t)n - 1);
  buf[n - 1] = 0;
  return ORCH_OK;
}

extern "C" int orch_device_count(int32_t *count) {
  ORCH_CHECK_ARG(count, "device_count");
  int c = 0;
  cudaError_t e = cudaGetDeviceCount(&c);
  if (e != cudaSuccess || c == 0) {
    *count = 0;
    orch_set_error("device_count: no CUDA device: %s", e == cudaSuccess ? "0 devices" : cudaGetErrorString(e));
    return ORCH_ERR_NO_DEVICE;
  }
  *count = c;
  return ORCH_OK;
}

extern "C" int orch_init(int32_t device, orch_ctx **out) {
  ORCH_CHECK_ARG(out, "init");
  int32_t count = 0;
  int rc = orch_device_count(&count);
  if (rc != ORCH_OK) return rc;
  ORCH_CHECK_ARG(device >= 0 && device < count, "init");
  ORCH_CUDA(cudaSetDevice(device), "init");
  orch_ctx *c = new orch_ctx();
  c->device = device;
  cudaError_t e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
  if (e != cudaSuccess) {
    orch_set_error("init: cudaStreamCreate: %s", cudaGetErrorString(e));
    delete c;
    return ORCH_ERR_CUDA;
  }
  if (cublasCreate(&c->cublas) != CUBLAS_STATUS_SUCCESS) {
    orch_set_error("init: cublasCreate failed");
    cudaStreamDestroy(c->stream);
    delete c;
    return ORCH_ERR_CUDA;
  }
  cublasSetStream(c->cublas, c->stream);
  // A fixed workspace makes cuBLAS safe inside graph capture.
  c->cublas_ws_bytes = 32u << 20;
  if (cudaMalloc(&c->cublas_ws, c->cublas_ws_bytes) != cudaSuccess) {
    orch_set_error("init: cublas workspace: out of memory");
    cublasDestroy(c->cublas);
    cudaStreamDestroy(c->stream);
    delete c;
    return ORCH_ERR_OOM;
  }
  cublasSetWorkspace(c->cublas, c->cublas_ws, c->cublas_ws_bytes);
  cublasSetMathMode(c->cublas, CUBLAS_DEFAULT_MATH);
  const char *gv = getenv("ORCH_CUDA_GEMV");
  if (gv && strcmp(gv, "v1") == 0) c->gemv = 1;
  if (gv && strcmp(gv, "v2") == 0) c->gemv = 2;
  if (gv && strcmp(gv, "v3") == 0) c->gemv = 3;
  const char *mv = getenv("ORCH_CUDA_MOE");
  c->moe_v1 = mv && strcmp(mv, "v1") == 0;
  // Programmatic dependent launch of the decode kernels: on by default on
  // Hopper; ORCH_CUDA_PDL=0 turns it off (A/B on the same card).
  const char *pv = getenv("ORCH_CUDA_PDL");
  g_orch_pdl = !(pv && strcmp(pv, "0") == 0) && pdl_device_ok(device) ? 1 : 0;
  *out = c;
  return ORCH_OK;
}

extern "C" int orch_destroy(orch_ctx *ctx) {
  if (!ctx) return ORCH_OK;
  cudaSetDevice(ctx->device);
  cudaStreamSynchronize(ctx->stream);
  for (void *p : ctx->retired) cudaFree(p);
  if (ctx->scratch) cudaFree(ctx->scratch);
  if (ctx->cublas) cublasDestroy(ctx->cublas);
  if (ctx->cublas_ws) cudaFree(ctx->cublas_ws);
  if (ctx->stream) cudaStreamDestroy(ctx->stream);
  delete ctx;
  return ORCH_OK;
}

int orch_scratch(orch_ctx *ctx, size_t bytes, void **out) {
  if (bytes > ctx->scratch_bytes) {
    if (ctx->scratch) ctx->retired.push_back(ctx->scratch);
    ctx->scratch = nullptr;
    ctx->scratch_bytes = 0;
    size_t want = bytes + bytes / 4;
    ORCH_CUDA(cudaMalloc(&ctx->scratch, want), "scratch");
    ctx->scratch_bytes = want;
  }
  *out = ctx->scratch;
  return ORCH_OK;
}

extern "C" int orch_device_info(orch_ctx *ctx, char *name, int64_t name_len, int32_t *cc, int32_t *sm_count,
                                int64_t *free_bytes, int64_t *total_bytes) {
  ORCH_CHECK_ARG(ctx, "device_info");
  cudaDeviceProp p;
  ORCH_CUDA(cudaGetDeviceProperties(&p, ctx->device), "device_info");
  if (name && name_len > 0) {
    strncpy(name, p.name, (size_t)name_len - 1);
    name[name_len - 1] = 0;
  }
  if (cc) *cc = p.major * 10 + p.minor;
  if (sm_count) *sm_count = p.multiProcessorCount;
  size_t f = 0, t = 0;
  ORCH_CUDA(cudaSetDevice(ctx->device), "device_info");
  ORCH_CUDA(cudaMemGetInfo(&f, &t), "device_info");
  if (free_bytes) *free_bytes = (int64_t)f;
  if (total_bytes) *total_bytes = (int64_t)t;
  return ORCH_OK;
}

extern "C" int orch_malloc(orch_ctx *ctx, int64_t bytes, void **out) {
  ORCH_CHECK_ARG(ctx && out && bytes >= 0, "malloc");
  *out = nullptr;
  if (bytes == 0) bytes = 1;
  cudaError_t e = cudaMalloc(out, (size_t)bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    size_t f = 0, t = 0;
    cudaMemGetInfo(&f, &t);
    orch_set_error("malloc: %lld bytes: %s (free %zu of %zu)", (long long)bytes, cudaGetErrorString(e), f, t);
    return e == cudaErrorMemoryAllocation ? ORCH_ERR_OOM : ORCH_ERR_CUDA;
  }
  return ORCH_OK;
}

extern "C" int orch_free(orch_ctx *ctx, void *p) {
  (void)ctx;
  if (!p) return ORCH_OK;
  ORCH_CUDA(cudaFree(p), "free");
  return ORCH_OK;
}

extern "C" int orch_host_alloc(int64_t bytes, void **out) {
  ORCH_CHECK_ARG(out && bytes > 0, "host_alloc");
  cudaError_t e = cudaMallocHost(out, (size_t)bytes);
  if (e != cudaSuccess) {
    orch_set_error("host_alloc: %lld bytes: %s", (long long)bytes, cudaGetErrorString(e));
    return ORCH_ERR_OOM;
  }
  return ORCH_OK;
}

extern "C" int orch_host_free(void *p) {
  if (!p) return ORCH_OK;
  ORCH_CUDA(cudaFreeHost(p), "host_free");
  return ORCH_OK;
}

extern "C" int orch_memcpy_h2d(orch_ctx *ctx, void *dst, const void *src, int64_t bytes) {
  ORCH_CHECK_ARG(ctx && dst && src && bytes >= 0, "memcpy_h2d");
  if (bytes == 0) return ORCH_OK;
  ORCH_CUDA(cudaMemcpyAsync(dst, src, (size_t)bytes, cudaMemcpyHostToDevice, ctx->stream), "memcpy_h2d");
  return ORCH_OK;
}

extern "C" int orch_memcpy_d2d(orch_ctx *ctx, void *dst, const void *src, int64_t bytes) {
  ORCH_CHECK_ARG(ctx && dst && src && bytes >= 0, "memcpy_d2d");
  if (bytes == 0) return ORCH_OK;
  ORCH_CUDA(cudaMemcpyAsync(dst, src, (size_t)bytes, cudaMemcpyDeviceToDevice, ctx->stream), "memcpy_d2d");
  return ORCH_OK;
}

// The copy is queued on the stream behind the pending work (a decode step's
// graph) and waited for with it: one wait, the copy starting as the last kernel
// ends (session 10; was a stream sync, then a synchronous cudaMemcpy: device run
// 8 on an H100 measured no difference end to end, gpt-oss 574.6 / 570.9 vs 578.7
// / 572.2 tok/s with the old path — kept as the one wait).
extern "C" int orch_memcpy_d2h(orch_ctx *ctx, void *dst, const void *src, int64_t bytes) {
  ORCH_CHECK_ARG(ctx && dst && src && bytes >= 0, "memcpy_d2h");
  if (bytes == 0) return ORCH_OK;
  ORCH_CUDA(cudaMemcpyAsync(dst, src, (size_t)bytes, cudaMemcpyDeviceToHost, ctx->stream), "memcpy_d2h");
  ORCH_CUDA(cudaStreamSynchronize(ctx->stream), "memcpy_d2h (wait)");
  return ORCH_OK;
}

// Queued behind the stream's pending work; returns at once. dst must be pinned host memory (orch_host_alloc) so
// that the copy runs when the stream reaches it; the caller records an event after it and waits on that
// (orch_event_sync) before reading dst (session 11: the runner launches the next decode step before it reads this
// one's tokens).
extern "C" int orch_memcpy_d2h_async(orch_ctx *ctx, void *dst, const void *src, int64_t bytes) {
  ORCH_CHECK_ARG(ctx && dst && src && bytes >= 0, "memcpy_d2h_async");
  if (bytes == 0) return ORCH_OK;
  ORCH_CUDA(cudaMemcpyAsync(dst, src, (size_t)bytes, cudaMemcpyDeviceToHost, ctx->stream), "memcpy_d2h_async");
  return ORCH_OK;
}

extern "C" int orch_memset(orch_ctx *ctx, void *dst, int32_t v, int64_t bytes) {
  ORCH_CHECK_ARG(ctx && dst && bytes >= 0, "memset");
  if (bytes == 0) return ORCH_OK;
  ORCH_CUDA(cudaMemsetAsync(dst, v, (size_t)bytes, ctx->stream), "memset");
  return ORCH_OK;
}

__global__ void fill_f32_kernel(float *p, float v, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = v;
}

extern "C" int orch_fill_f32(orch_ctx *ctx, float *dst, float value, int64_t n) {
  ORCH_CHECK_ARG(ctx && dst && n >= 0, "fill_f32");
  if (n == 0) return ORCH_OK;
  int blocks = (int)(ceil_div(n, 256) < 4096 ? ceil_div(n, 256) : 4096);
  fill_f32_kernel<<<blocks, 256, 0, ctx->stream>>>(dst, value, n);
  ORCH_LAUNCHED("fill_f32");
  return ORCH_OK;
}

extern "C" int orch_sync(orch_ctx *ctx) {
  ORCH_CHECK_ARG(ctx, "sync");
  ORCH_CUDA(cudaStreamSynchronize(ctx->stream), "sync");
  return ORCH_OK;
}

extern "C" int orch_graph_begin(orch_ctx *ctx) {
  ORCH_CHECK_ARG(ctx, "graph_begin");
  // Relaxed: the GEMM path may grow its scratch (cudaMalloc) while capturing.
  ORCH_CUDA(cudaStreamBeginCapture(ctx->stream, cudaStreamCaptureModeRelaxed), "graph_begin");
  return ORCH_OK;
}

extern "C" int orch_graph_end(orch_ctx *ctx, void **graph_exec) {
  ORCH_CHECK_ARG(ctx && graph_exec, "graph_end");
  cudaGraph_t g = nullptr;
  ORCH_CUDA(cudaStreamEndCapture(ctx->stream, &g), "graph_end");
  cudaGraphExec_t ex = nullptr;
  cudaError_t e = cudaGraphInstantiateWithFlags(&ex, g, 0);
  cudaGraphDestroy(g);
  if (e != cudaSuccess) {
    orch_set_error("graph_end: cudaGraphInstantiateWithFlags: %s", cudaGetErrorString(e));
    return ORCH_ERR_CUDA;
  }
  *graph_exec = (void *)ex;
  return ORCH_OK;
}

extern "C" int orch_graph_launch(orch_ctx *ctx, void *graph_exec) {
  ORCH_CHECK_ARG(ctx && graph_exec, "graph_launch");
  ORCH_CUDA(cudaGraphLaunch((cudaGraphExec_t)graph_exec, ctx->stream), "graph_launch");
  return ORCH_OK;
}

extern "C" int orch_graph_destroy(void *graph_exec) {
  if (!graph_exec) return ORCH_OK;
  ORCH_CUDA(cudaGraphExecDestroy((cudaGraphExec_t)graph_exec), "graph_destroy");
  return ORCH_OK;
}

extern "C" int orch_event_create(void **ev) {
  ORCH_CHECK_ARG(ev, "event_create");
  cudaEvent_t e;
  ORCH_CUDA(cudaEventCreate(&e), "event_create");
  *ev = (void *)e;
  return ORCH_OK;
}

extern "C" int orch_event_destroy(void *ev) {
  if (!ev) return ORCH_OK;
  ORCH_CUDA(cudaEventDestroy((cudaEvent_t)ev), "event_destroy");
  return ORCH_OK;
}

extern "C" int orch_event_record(orch_ctx *ctx, void *ev) {
  ORCH_CHECK_ARG(ctx && ev, "event_record");
  // While the stream is being captured, a plain record only orders the
  // capture; cudaEventRecordExternal makes it an event-record node that
  // stamps the event on every replay (op timing in graphs, optime.go).
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  ORCH_CUDA(cudaStreamIsCapturing(ctx->stream, &cs), "event_record");
  if (cs == cudaStreamCaptureStatusActive)
    ORCH_CUDA(cudaEventRecordWithFlags((cudaEvent_t)ev, ctx->stream, cudaEventRecordExternal), "event_record");
  else
    ORCH_CUDA(cudaEventRecord((cudaEvent_t)ev, ctx->stream), "event_record");
  return ORCH_OK;
}

// Blocks until the work before ev's last record has run (its error, e.g. a failed kernel's, is returned).
extern "C" int orch_event_sync(void *ev) {
  ORCH_CHECK_ARG(ev, "event_sync");
  ORCH_CUDA(cudaEventSynchronize((cudaEvent_t)ev), "event_sync");
  return ORCH_OK;
}

extern "C" int orch_event_elapsed(void *ev0, void *ev1, float *ms) {
  ORCH_CHECK_ARG(ev0 && ev1 && ms, "event_elapsed");
  ORCH_CUDA(cudaEventSynchronize((cudaEvent_t)ev1), "event_elapsed");
  ORCH_CUDA(cudaEventElapsedTime(ms, (cudaEvent_t)ev0, (cudaEvent_t)ev1), "event_elapsed");
  return ORCH_OK;
}
