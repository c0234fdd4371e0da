// cupti-trace.c — a CUDA injection library (CUDA_INJECTION64_PATH=libcupti-trace.so) that records every kernel's
// start and end (CUPTI concurrent-kernel activity: kernels of replayed CUDA graphs are one record per node, and PDL
// overlap is kept) into $CUDA_ORCH_TRACE.<pid>.csv as "start_ns,end_ns,gridXxYxZ,blockX,name". The driver calls
// InitializeInjection in every process that initialises CUDA (the adapter plugins inherit the variable from
// orch-host). Used by cuda/scripts/e2e-gpu.sh step trace, summarised by trace-summary.py.
//
// Hand-written because Nsight Systems cannot make a report on the lent machines (its importer misses libdw) and
// CUPTI is what it would use underneath. Records are read by offset from the record's stable prefix (start, end,
// gridX, blockX and name sit at the same offsets in CUpti_ActivityKernel4..8 and later), so one source builds
// against any CUDA 11–13 header. Buffers are written as CUPTI completes them and flushed every 200 ms: Go
// processes exit without running atexit handlers, so only the last fraction of a second can be lost.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static FILE *out;

static void CUPTIAPI buf_req(uint8_t **buf, size_t *size, size_t *max_records) {
  *size = 1 << 20;
  *buf = (uint8_t *)aligned_alloc(8, *size);
  *max_records = 0;
}

static void CUPTIAPI buf_done(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size, size_t valid) {
  (void)ctx, (void)stream, (void)size;
  CUpti_Activity *rec = NULL;
  while (cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
    if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && rec->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
    const uint8_t *r = (const uint8_t *)rec;
    uint64_t start, end;
    int32_t gx, gy, gz, bx;
    const char *name;
    memcpy(&start, r + 16, 8);
    memcpy(&end, r + 24, 8);
    memcpy(&gx, r + 52, 4);
    memcpy(&gy, r + 56, 4);
    memcpy(&gz, r + 60, 4);
    memcpy(&bx, r + 64, 4);
    memcpy(&name, r + 104, sizeof name);
    if (out) fprintf(out, "%llu,%llu,%dx%dx%d,%d,%s\n", (unsigned long long)start, (unsigned long long)end, gx, gy, gz, bx,
                     name ? name : "?");
  }
  if (out) fflush(out);
  free(buf);
}

int InitializeInjection(void) {
  const char *base = getenv("CUDA_ORCH_TRACE");
  if (getenv("CUDA_ORCH_TRACE_DEBUG")) fprintf(stderr, "cupti-trace: InitializeInjection in pid %d\n", (int)getpid());
  if (!base || !*base) return 1;
  char path[4096];
  snprintf(path, sizeof path, "%s.%d.csv", base, (int)getpid());
  out = fopen(path, "w");
  if (!out) return 1;
  if (cuptiActivityRegisterCallbacks(buf_req, buf_done) != CUPTI_SUCCESS ||
      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
    fprintf(stderr, "cupti-trace: could not enable kernel activity\n");
    return 1;
  }
  cuptiActivityFlushPeriod(200);
  return 1;
}
