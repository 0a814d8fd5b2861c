// CUDA side of the kernel dialect, passed as the kernel's header (helpers must sit
// outside the generated __global__ function). Warps are 32 lanes, as Apple SIMD-groups.
#ifndef TQ_PRELUDE_CUDA
#define TQ_PRELUDE_CUDA
#define TID threadIdx.x
#define LANE (threadIdx.x & 31u)
#define WARP (threadIdx.x >> 5)
#define TGID blockIdx
#define NTG gridDim
#define SHARED_PTR(type) type*
#define SHARED __shared__
#define BARRIER() __syncthreads()
#define WARP_SUM(x) tq_warp_sum(x)
#define WARP_MAX(x) tq_warp_max(x)
#define AS_UINT(x) __float_as_uint(x)
#define AS_FLOAT(x) __uint_as_float(x)
#define EXP(x) expf(x)
#define SQRT(x) sqrtf(x)
#define NEG_INF (-cuda::std::numeric_limits<float>::infinity())
#define UNROLL _Pragma("unroll")

__device__ inline float tq_warp_sum(float x) {
  for (int i = 16; i > 0; i /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, i);
  }
  return x;
}

__device__ inline float tq_warp_max(float x) {
  for (int i = 16; i > 0; i /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, i));
  }
  return x;
}
#endif
