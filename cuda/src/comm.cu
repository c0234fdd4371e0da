// comm.cu — tensor-parallel collectives through NCCL (ABI 5). libnccl is
// found at run time (nccl_loader.h), so liborch_cuda.so loads and works
// without it; these entries then answer ORCH_ERR_UNSUPPORTED with a message
// naming every place looked at. One communicator per process and device (one
// process per rank, docs/multi-gpu.md); the all-reduce runs on the context's
// stream, so it is ordered with the ops and recorded into graphs captured on
// that stream (NCCL >= 2.9 supports stream capture).
#include <mutex>
#include <string>

#include "common.cuh"
#include "nccl_loader.h"

using namespace orch_nccl;

struct orch_comm {
  ncclComm_t comm = nullptr;
  int device = 0;
  int rank = 0;
  int size = 0;
};

static std::once_flag g_nccl_once;
static Api g_nccl;
static bool g_nccl_ok = false;
static std::string g_nccl_err;

// The loaded NCCL, or null with the reason recorded as the last error.
static const Api *nccl(const char *op) {
  std::call_once(g_nccl_once, [] {
    disable_nvls(); // before any NCCL call reads the environment
    g_nccl_ok = load(candidates(getenv("ORCH_NCCL_LIB")), &g_nccl, &g_nccl_err);
  });
  if (!g_nccl_ok) {
    orch_set_error("%s: NCCL not available (set ORCH_NCCL_LIB to libnccl.so.2 or add its directory to "
                   "LD_LIBRARY_PATH): %s",
                   op, g_nccl_err.c_str());
    return nullptr;
  }
  return &g_nccl;
}

// Records an NCCL failure of op, with the communicator's last message where
// this NCCL has ncclGetLastError.
static int nccl_fail(const Api *a, const char *op, const char *call, ncclResult_t r, ncclComm_t c) {
  const char *last = (a->GetLastError && c) ? a->GetLastError(c) : nullptr;
  orch_set_error("%s: %s: NCCL error %d: %s%s%s", op, call, r, a->GetErrorString(r), last && last[0] ? ": " : "",
                 last ? last : "");
  return r == 4 /* ncclInvalidArgument */ || r == 5 /* ncclInvalidUsage */ ? ORCH_ERR_INVALID : ORCH_ERR_CUDA;
}

extern "C" int orch_comm_available(orch_ctx *ctx, int32_t *version) {
  (void)ctx;
  ORCH_CHECK_ARG(version, "comm_available");
  *version = 0;
  const Api *a = nccl("comm_available");
  if (!a) return ORCH_ERR_UNSUPPORTED;
  *version = a->version;
  return ORCH_OK;
}

extern "C" int orch_comm_library(char *buf, int64_t n) {
  ORCH_CHECK_ARG(buf && n > 0, "comm_library");
  buf[0] = 0;
  const Api *a = nccl("comm_library");
  if (!a) return ORCH_ERR_UNSUPPORTED;
  strncpy(buf, a->path.c_str(), (size_t)n - 1);
  buf[n - 1] = 0;
  return ORCH_OK;
}

extern "C" int orch_comm_unique_id(orch_ctx *ctx, uint8_t *out) {
  (void)ctx;
  ORCH_CHECK_ARG(out, "comm_unique_id");
  const Api *a = nccl("comm_unique_id");
  if (!a) return ORCH_ERR_UNSUPPORTED;
  ncclUniqueId id;
  ncclResult_t r = a->GetUniqueId(&id);
  if (r != ncclSuccess) return nccl_fail(a, "comm_unique_id", "ncclGetUniqueId", r, nullptr);
  memcpy(out, id.internal, kUniqueIdBytes);
  return ORCH_OK;
}

extern "C" int orch_comm_init(orch_ctx *ctx, const uint8_t *id, int32_t rank, int32_t size, orch_comm **out) {
  ORCH_CHECK_ARG(ctx && id && out, "comm_init");
  ORCH_CHECK_ARG(size >= 1 && rank >= 0 && rank < size, "comm_init");
  *out = nullptr;
  const Api *a = nccl("comm_init");
  if (!a) return ORCH_ERR_UNSUPPORTED;
  // NCCL binds the communicator to the thread's current device.
  ORCH_CUDA(cudaSetDevice(ctx->device), "comm_init");
  ncclUniqueId uid;
  memcpy(uid.internal, id, kUniqueIdBytes);
  ncclComm_t c = nullptr;
  ncclResult_t r = a->CommInitRank(&c, size, uid, rank);
  if (r != ncclSuccess) {
    int rc = nccl_fail(a, "comm_init", "ncclCommInitRank", r, c);
    if (c) a->CommAbort(c);
    return rc;
  }
  // Warm-up on the context's stream: one small and one large all-reduce, so
  // that the group is known to work when this returns, and NCCL's lazy
  // connection setup (NCCL_RUNTIME_CONNECT, on by default since 2.22) for
  // the algorithms these sizes pick happens here and not inside the first
  // graph capture.
  {
    const int64_t big = 1 << 20;
    float *tmp = nullptr;
    cudaError_t e = cudaMalloc(&tmp, big * sizeof(float));
    if (e == cudaSuccess) e = cudaMemsetAsync(tmp, 0, big * sizeof(float), ctx->stream);
    ncclResult_t wr = ncclSuccess;
    if (e == cudaSuccess) wr = a->AllReduce(tmp, tmp, 1, ncclFloat32, ncclSum, c, (void *)ctx->stream);
    if (e == cudaSuccess && wr == ncclSuccess)
      wr = a->AllReduce(tmp, tmp, (size_t)big, ncclFloat32, ncclSum, c, (void *)ctx->stream);
    if (e == cudaSuccess && wr == ncclSuccess) e = cudaStreamSynchronize(ctx->stream);
    if (tmp) cudaFree(tmp);
    if (e != cudaSuccess || wr != ncclSuccess) {
      int rc = wr != ncclSuccess ? nccl_fail(a, "comm_init", "warm-up ncclAllReduce", wr, c) : ORCH_ERR_CUDA;
      if (e != cudaSuccess)
        orch_set_error("comm_init: warm-up all-reduce (rank %d of %d): %s", rank, size, cudaGetErrorString(e));
      a->CommAbort(c);
      return rc;
    }
  }
  orch_comm *oc = new orch_comm();
  oc->comm = c;
  oc->device = ctx->device;
  oc->rank = rank;
  oc->size = size;
  *out = oc;
  return ORCH_OK;
}

extern "C" int orch_comm_allreduce_f32(orch_ctx *ctx, orch_comm *comm, float *buf, int64_t n) {
  ORCH_CHECK_ARG(ctx && comm && comm->comm && n >= 0, "comm_allreduce_f32");
  ORCH_CHECK_ARG(comm->device == ctx->device, "comm_allreduce_f32");
  if (n == 0) return ORCH_OK;
  ORCH_CHECK_ARG(buf, "comm_allreduce_f32");
  const Api *a = nccl("comm_allreduce_f32");
  if (!a) return ORCH_ERR_UNSUPPORTED;
  ORCH_CUDA(cudaSetDevice(ctx->device), "comm_allreduce_f32");
  ncclResult_t r = a->AllReduce(buf, buf, (size_t)n, ncclFloat32, ncclSum, comm->comm, (void *)ctx->stream);
  if (r != ncclSuccess) return nccl_fail(a, "comm_allreduce_f32", "ncclAllReduce", r, comm->comm);
  return ORCH_OK;
}

extern "C" int orch_comm_async_error(orch_comm *comm) {
  ORCH_CHECK_ARG(comm && comm->comm, "comm_async_error");
  const Api *a = nccl("comm_async_error");
  if (!a) return ORCH_ERR_UNSUPPORTED;
  if (!a->CommGetAsyncError) return ORCH_OK;
  ncclResult_t ar = ncclSuccess;
  ncclResult_t r = a->CommGetAsyncError(comm->comm, &ar);
  if (r != ncclSuccess) return nccl_fail(a, "comm_async_error", "ncclCommGetAsyncError", r, comm->comm);
  if (ar != ncclSuccess && ar != ncclInProgress)
    return nccl_fail(a, "comm_async_error", "collective (asynchronous)", ar, comm->comm);
  return ORCH_OK;
}

extern "C" int orch_comm_abort(orch_comm *comm) {
  ORCH_CHECK_ARG(comm, "comm_abort");
  if (!comm->comm) return ORCH_OK;
  const Api *a = nccl("comm_abort");
  if (!a) return ORCH_ERR_UNSUPPORTED;
  cudaSetDevice(comm->device);
  ncclResult_t r = a->CommAbort(comm->comm);
  comm->comm = nullptr; // freed by NCCL even on error; orch_comm_destroy frees the rest
  if (r != ncclSuccess) return nccl_fail(a, "comm_abort", "ncclCommAbort", r, nullptr);
  return ORCH_OK;
}

extern "C" int orch_comm_destroy(orch_comm *comm) {
  if (!comm) return ORCH_OK;
  const Api *a = nccl("comm_destroy");
  int rc = ORCH_OK;
  if (a && comm->comm) {
    cudaSetDevice(comm->device);
    // A communicator with a pending error (a peer died, a transport failed)
    // is aborted: destroying it would wait for collectives that never end.
    ncclResult_t ar = ncclSuccess;
    if (a->CommGetAsyncError) a->CommGetAsyncError(comm->comm, &ar);
    ncclResult_t r;
    if (ar != ncclSuccess && ar != ncclInProgress) {
      r = a->CommAbort(comm->comm);
      if (r != ncclSuccess) rc = nccl_fail(a, "comm_destroy", "ncclCommAbort", r, nullptr);
    } else {
      r = a->CommDestroy(comm->comm);
      if (r != ncclSuccess) rc = nccl_fail(a, "comm_destroy", "ncclCommDestroy", r, nullptr);
    }
  }
  delete comm;
  return rc;
}
