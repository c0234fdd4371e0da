// attention_index.cuh — index math of the attention kernels, host+device so
// that cuda/test/attn_index_test.cu can check it on the CPU.
#pragma once

#ifdef __CUDACC__
#define ORCH_HD __host__ __device__ __forceinline__
#else
#define ORCH_HD inline
#endif

// Dims of a head held by one lane of a warp: head_dim/32 rounded up.
ORCH_HD constexpr int attn_lane_dims(int hd) { return (hd + 31) / 32; }

// Whether dim e of lane `lane` (dim lane*attn_lane_dims(hd)+e) exists.
// Constant-true for head dims that are multiples of 32.
ORCH_HD constexpr bool attn_dim_ok(int hd, int lane, int e) {
  return hd % 32 == 0 || lane * attn_lane_dims(hd) + e < hd;
}
