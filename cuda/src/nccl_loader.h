// nccl_loader.h — finds libnccl at run time with dlopen and resolves the few
// entry points comm.cu uses. Plain C++ (no CUDA, no NCCL headers): the types
// and constants below are declared here, checked against NCCL's
// src/nccl.h.in (ncclUniqueId is 128 bytes passed by value, ncclComm_t an
// opaque pointer, ncclResult_t / ncclDataType_t / ncclRedOp_t int-sized C
// enums with ncclSuccess = 0, ncclInProgress = 7, ncclFloat32 = 7, ncclSum =
// 0; cudaStream_t is a pointer, declared void* here).
//
// Why hand-written rather than linked: liborch_cuda.so must load and run on
// machines without NCCL (one GPU, CI), and no NCCL headers exist where it is
// built. Kept header-only so cuda/test can test it on the host without CUDA.
#pragma once

#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

namespace orch_nccl {

typedef struct ncclComm *ncclComm_t;
enum { kUniqueIdBytes = 128 };
typedef struct {
  char internal[kUniqueIdBytes];
} ncclUniqueId;
static_assert(sizeof(ncclUniqueId) == 128, "ncclUniqueId is NCCL_UNIQUE_ID_BYTES");
typedef int ncclResult_t;
enum { ncclSuccess = 0, ncclInProgress = 7 };
enum { ncclFloat32 = 7 };
enum { ncclSum = 0 };

// Oldest NCCL accepted: 2.9.0 (stream capture of collectives into CUDA graphs,
// and the version encoding X*10000 + Y*100 + Z).
enum { kMinVersion = 20900 };

struct Api {
  void *handle = nullptr;
  std::string path;
  int version = 0; // NCCL_VERSION_CODE, e.g. 22105 for 2.21.5
  ncclResult_t (*GetVersion)(int *) = nullptr;
  ncclResult_t (*GetUniqueId)(ncclUniqueId *) = nullptr;
  ncclResult_t (*CommInitRank)(ncclComm_t *, int, ncclUniqueId, int) = nullptr;
  ncclResult_t (*AllReduce)(const void *, void *, size_t, int, int, ncclComm_t, void *) = nullptr;
  ncclResult_t (*CommDestroy)(ncclComm_t) = nullptr;
  ncclResult_t (*CommAbort)(ncclComm_t) = nullptr;
  const char *(*GetErrorString)(ncclResult_t) = nullptr;
  // Optional (may be null): async error of a communicator (NCCL >= 2.4) and
  // the last error message of a communicator (NCCL >= 2.13).
  ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t *) = nullptr;
  const char *(*GetLastError)(ncclComm_t) = nullptr;
};

// Where libnccl is looked for, in order: $ORCH_NCCL_LIB (env, when set and
// non-empty), then the dynamic loader's search for "libnccl.so.2" and
// "libnccl.so" (LD_LIBRARY_PATH, ldconfig cache, RUNPATH).
inline std::vector<std::string> candidates(const char *env) {
  std::vector<std::string> c;
  if (env && env[0]) c.push_back(env);
  c.push_back("libnccl.so.2");
  c.push_back("libnccl.so");
  return c;
}

// NCCL_VERSION_CODE -> "2.21.5" (codes below 2.9 used X*1000 + Y*100 + Z).
inline std::string version_string(int v) {
  int major, minor, patch;
  if (v >= 10000) {
    major = v / 10000, minor = (v / 100) % 100, patch = v % 100;
  } else {
    major = v / 1000, minor = (v / 100) % 10, patch = v % 100;
  }
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

// NVLink multicast (NVLS) stays off (docs/multi-gpu.md: on shared GPU hosts a
// program using it can take the host's GPUs out of service): the process gets
// NCCL_NVLS_ENABLE=0 unless it already has the variable (setenv overwrite=0).
// Must run before the first NCCL call, which reads NCCL's environment.
inline void disable_nvls() { setenv("NCCL_NVLS_ENABLE", "0", 0); }

// Resolves name in h into *fn; appends to err and returns false when missing.
template <typename F> inline bool sym(void *h, const char *name, F *fn, bool optional, std::string *err) {
  void *p = dlsym(h, name);
  if (!p) {
    if (!optional) *err += std::string(" missing symbol ") + name + ";";
    return optional;
  }
  *fn = reinterpret_cast<F>(p);
  return true;
}

// load opens the first candidate that has every required symbol and a
// version >= kMinVersion; on failure err says what each candidate did.
inline bool load(const std::vector<std::string> &cands, Api *api, std::string *err) {
  err->clear();
  for (const std::string &p : cands) {
    dlerror();
    void *h = dlopen(p.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char *e = dlerror();
      std::string why = e ? e : "dlopen failed";
      *err += (why.find(p) == std::string::npos ? p + ": " + why : why) + "; ";
      continue;
    }
    Api a;
    std::string why;
    bool ok = sym(h, "ncclGetVersion", &a.GetVersion, false, &why);
    ok = sym(h, "ncclGetUniqueId", &a.GetUniqueId, false, &why) && ok;
    ok = sym(h, "ncclCommInitRank", &a.CommInitRank, false, &why) && ok;
    ok = sym(h, "ncclAllReduce", &a.AllReduce, false, &why) && ok;
    ok = sym(h, "ncclCommDestroy", &a.CommDestroy, false, &why) && ok;
    ok = sym(h, "ncclCommAbort", &a.CommAbort, false, &why) && ok;
    ok = sym(h, "ncclGetErrorString", &a.GetErrorString, false, &why) && ok;
    sym(h, "ncclCommGetAsyncError", &a.CommGetAsyncError, true, &why);
    sym(h, "ncclGetLastError", &a.GetLastError, true, &why);
    if (ok) {
      int v = 0;
      if (a.GetVersion(&v) != ncclSuccess) {
        why = " ncclGetVersion failed";
        ok = false;
      } else if (v < kMinVersion) {
        why = " NCCL " + version_string(v) + " is older than 2.9.0 (no CUDA graph capture)";
        ok = false;
      }
      a.version = v;
    }
    if (!ok) {
      *err += p + ":" + why + "; ";
      dlclose(h);
      continue;
    }
    a.handle = h;
    a.path = p;
    *api = a;
    err->clear();
    return true;
  }
  while (!err->empty() && (err->back() == ' ' || err->back() == ';')) err->pop_back();
  return false;
}

} // namespace orch_nccl
