// Host test of the run-time NCCL loader (cuda/src/nccl_loader.h):
//   g++ -std=c++17 -Wall -Werror -o /tmp/nccl_loader_test cuda/test/nccl_loader_test.cpp && /tmp/nccl_loader_test
// Runs on the CPU; no CUDA or NCCL needed. Where a C compiler ("cc") exists it
// builds small fake libnccl.so files into a temp dir to check the found /
// missing-symbol / too-old paths; without one those cases are skipped.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unistd.h>

#include "../src/nccl_loader.h"

static int fails = 0;
#define EXPECT(c, ...)          \
  do {                          \
    if (!(c)) {                 \
      std::printf(__VA_ARGS__); \
      std::printf("\n");        \
      fails++;                  \
    }                           \
  } while (0)

using namespace orch_nccl;

// A fake NCCL: every entry comm.cu resolves, version VERSION, without
// ncclCommAbort when NO_ABORT is defined. ncclGetUniqueId fills 0..127.
static const char *kFake = R"(
typedef struct { char internal[128]; } ncclUniqueId;
int ncclGetVersion(int *v) { *v = VERSION; return 0; }
int ncclGetUniqueId(ncclUniqueId *id) { for (int i = 0; i < 128; i++) id->internal[i] = (char)i; return 0; }
int ncclCommInitRank(void **c, int n, ncclUniqueId id, int r) { (void)n; (void)r; *c = (void *)0; return id.internal[5] == 5 ? 0 : 4; }
int ncclAllReduce(const void *s, void *d, unsigned long n, int t, int o, void *c, void *st) { return 0; }
int ncclCommDestroy(void *c) { return 0; }
#ifndef NO_ABORT
int ncclCommAbort(void *c) { return 0; }
#endif
const char *ncclGetErrorString(int r) { return r ? "fake error" : "no error"; }
)";

static std::string dir;

// Builds the fake with flags into dir/name; false when no compiler works.
static bool build_fake(const std::string &name, const std::string &flags) {
  std::string src = dir + "/fake.c";
  FILE *f = std::fopen(src.c_str(), "w");
  if (!f) return false;
  std::fputs(kFake, f);
  std::fclose(f);
  std::string cmd = "cc -shared -fPIC -w " + flags + " -o " + dir + "/" + name + " " + src + " 2>/dev/null";
  return std::system(cmd.c_str()) == 0;
}

int main() {
  // Candidate order: $ORCH_NCCL_LIB first when set, then the two sonames.
  auto c = candidates(nullptr);
  EXPECT(c.size() == 2 && c[0] == "libnccl.so.2" && c[1] == "libnccl.so", "candidates without env");
  c = candidates("");
  EXPECT(c.size() == 2, "an empty ORCH_NCCL_LIB is ignored");
  c = candidates("/opt/x/libnccl.so.2");
  EXPECT(c.size() == 3 && c[0] == "/opt/x/libnccl.so.2" && c[1] == "libnccl.so.2", "candidates with env");

  // Version codes (NCCL_VERSION: X*10000 + Y*100 + Z since 2.9, X*1000 + Y*100 + Z before).
  EXPECT(version_string(22105) == "2.21.5", "22105 -> %s", version_string(22105).c_str());
  EXPECT(version_string(20900) == "2.9.0", "20900 -> %s", version_string(20900).c_str());
  EXPECT(version_string(2804) == "2.8.4", "2804 -> %s", version_string(2804).c_str());

  // NVLS: set to 0 when absent, a value the process already has is kept.
  unsetenv("NCCL_NVLS_ENABLE");
  disable_nvls();
  EXPECT(getenv("NCCL_NVLS_ENABLE") && std::string(getenv("NCCL_NVLS_ENABLE")) == "0", "NVLS not disabled");
  setenv("NCCL_NVLS_ENABLE", "1", 1);
  disable_nvls();
  EXPECT(std::string(getenv("NCCL_NVLS_ENABLE")) == "1", "an explicit NCCL_NVLS_ENABLE was overwritten");

  // Nothing found: every candidate is named in the error.
  Api a;
  std::string err;
  bool ok = load({"/nonexistent/libnccl.so.2", "libnccl-orch-test-none.so"}, &a, &err);
  EXPECT(!ok, "loaded a nonexistent library");
  EXPECT(err.find("/nonexistent/libnccl.so.2") != std::string::npos &&
             err.find("libnccl-orch-test-none.so") != std::string::npos,
         "error does not name the candidates: %s", err.c_str());

  // A library without NCCL's symbols (libm) is refused, naming a missing one.
  ok = load({"libm.so.6"}, &a, &err);
  EXPECT(!ok && err.find("missing symbol ncclGetVersion") != std::string::npos, "libm: ok=%d err=%s", ok,
         err.c_str());

  char tmpl[] = "/tmp/nccl_loader_test.XXXXXX";
  if (!mkdtemp(tmpl)) {
    std::printf("mkdtemp failed\n");
    return 1;
  }
  dir = tmpl;
  if (!build_fake("good.so", "-DVERSION=22105") || !build_fake("noabort.so", "-DVERSION=22105 -DNO_ABORT") ||
      !build_fake("old.so", "-DVERSION=2804")) {
    std::printf("nccl_loader_test: no C compiler (cc): fake-library cases skipped\n");
  } else {
    // Missing symbol and too old: refused; the next candidate is tried.
    ok = load({dir + "/noabort.so", dir + "/old.so", dir + "/good.so"}, &a, &err);
    EXPECT(ok, "good fake not loaded: %s", err.c_str());
    EXPECT(a.path == dir + "/good.so" && a.version == 22105, "loaded %s version %d", a.path.c_str(), a.version);
    EXPECT(a.CommGetAsyncError == nullptr && a.GetLastError == nullptr, "optional symbols should be absent");
    ok = load({dir + "/noabort.so", dir + "/old.so"}, &a, &err);
    EXPECT(!ok && err.find("missing symbol ncclCommAbort") != std::string::npos &&
               err.find("older than 2.9.0") != std::string::npos,
           "noabort/old: ok=%d err=%s", ok, err.c_str());
    // The resolved entries are callable with the declared ABI (id by value).
    ok = load({dir + "/good.so"}, &a, &err);
    EXPECT(ok, "good: %s", err.c_str());
    if (ok) {
      ncclUniqueId id;
      EXPECT(a.GetUniqueId(&id) == ncclSuccess && id.internal[127] == 127, "unique id");
      ncclComm_t comm = nullptr;
      EXPECT(a.CommInitRank(&comm, 2, id, 1) == ncclSuccess, "init with the id by value");
      id.internal[5] = 0;
      EXPECT(a.CommInitRank(&comm, 2, id, 1) == 4, "the fake checks the id it was passed");
      EXPECT(std::string(a.GetErrorString(4)) == "fake error", "error string");
    }
    std::system(("rm -rf " + dir).c_str());
  }
  if (fails) {
    std::printf("nccl_loader_test: %d failures\n", fails);
    return 1;
  }
  std::printf("nccl_loader_test: ok\n");
  return 0;
}
