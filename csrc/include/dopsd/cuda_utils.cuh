// Device helpers of the CUDA kernels: warp / block sums and the launch sizes (SM count of a device).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dopsd::cuda {

constexpr int kThreads = 256;  // threads per block of every kernel

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a team of TEAM threads (a warp, or the whole block); every thread of the team gets the result.
// A block team calls it from uniform control flow (it synchronises the block).
template <int TEAM>
__device__ __forceinline__ float team_sum(float v) {
  v = warp_sum(v);
  if constexpr (TEAM == 32) {
    return v;
  } else {
    static_assert(TEAM == kThreads, "a team is a warp or the whole block");
    __shared__ float warps[kThreads / 32];
    __syncthreads();  // the previous call's readers are done
    if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += warps[w];  // fixed order: deterministic
    return total;
  }
}

inline int sm_count(int device) {
  static int cached[64] = {};
  if (device < 0 || device >= 64) return 132;
  if (!cached[device]) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    cached[device] = n > 0 ? n : 132;
  }
  return cached[device];
}

inline int current_device() {
  int d = 0;
  cudaGetDevice(&d);
  return d;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace dopsd::cuda
