// emu_decode_shims.h — the CUDA runtime and intrinsics the decode kernels
// (moe_ffn.cu, moe.cu, gemv16.cuh, rope.cu, norm.cu) need beyond cuda_emu.h,
// shared by decode_emu_test.cpp and moe_emu_test.cpp. Include after
// cuda_emu.h and before the kernel sources.
#pragma once

#define __CUDA_RUNTIME_H__
#define __CUDA_FP16_H__
#define __CUDA_BF16_H__
#define CUBLAS_V2_H_
#define __shared__
#undef __launch_bounds__
#define __launch_bounds__(...)
typedef void *cudaStream_t;
typedef void *cublasHandle_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline const char *cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int *d) {
  *d = 0;
  return cudaSuccess;
}
inline int g_emu_sms = 2; // a small "device": one-wave grids stride over many rows per warp
inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr, int) {
  *v = g_emu_sms;
  return cudaSuccess;
}
template <class F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *n, F, int, size_t) {
  *n = 1;
  return cudaSuccess;
}
template <class U = uint32_t>
inline float __uint_as_float(U u) {
  const uint32_t v = (uint32_t)u;
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
template <class T>
T __ldg(const T *p) {
  return *p;
}
template <class A, class B, class S>
inline uint32_t __funnelshift_r(A lo, B hi, S s) {
  return (uint32_t)((((uint64_t)(uint32_t)hi << 32) | (uint32_t)lo) >> ((uint32_t)s & 31));
}
template <class A, class B, class S>
inline uint32_t __funnelshift_rc(A lo, B hi, S s) {
  return (uint32_t)((((uint64_t)(uint32_t)hi << 32) | (uint32_t)lo) >> ((uint32_t)s < 32 ? (uint32_t)s : 32));
}
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
// Integer shuffle (dec16_stage's chunk max): cuda_emu.h has the float one.
inline unsigned __shfl_xor_sync(unsigned, unsigned v, int m) {
  EmuWarp &w = emu_warp();
  w.u[emu_lane()] = v;
  w.bar.arrive_and_wait();
  unsigned r = w.u[emu_lane() ^ m];
  w.bar.arrive_and_wait();
  return r;
}


// common.cuh's orch_launch_pdl (compiled out under ORCH_EMU) for the
// kernels launched with <<<>>> syntax in the library (rope.cu): a launch that
// also checks every thread calls pdl_wait().
struct orch_ctx;
template <typename... KArgs, typename... Args>
void orch_launch_pdl(void (*kern)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  emu_launch_pdl(grid, (int)block.x, smem, [&] { kern(((KArgs)args)...); });
}
