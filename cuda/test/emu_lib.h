// emu_lib.h — the liborch_cuda entry points that a kernel source compiled
// into an emulation test (cuda_emu.h) calls but does not define itself.
// Include after the kernel source (it needs quant.cuh's type tables).
#pragma once
#include <cstdarg>
#include <cstdio>

static char g_err[512]; // the last orch_set_error message
void orch_set_error(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(g_err, sizeof g_err, fmt, ap);
  va_end(ap);
}

extern "C" int64_t orch_row_bytes(int32_t t, int64_t k) {
  if (!type_known(t) || k <= 0 || k % type_block_elems(t)) return 0;
  return k / type_block_elems(t) * type_block_bytes(t);
}
