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

// Lane exchanges and the matrix units, for decode_attention_mma.metal (CUDA only).
#define TQ_SHFL(x, lane) __shfl_sync(0xffffffffu, x, lane)
#define TQ_SHFL_XOR(x, mask) __shfl_xor_sync(0xffffffffu, x, mask)
// Bytes of (x, y) picked by the selector's nibbles (PRMT); bits [s, s + 32) of hi:lo.
#define TQ_PERM(x, y, s) __byte_perm(x, y, s)
#define TQ_FUNNEL(lo, hi, s) __funnelshift_r(lo, hi, s)
#define TQ_H2(lo, hi) tq_h2(lo, hi)
#define TQ_OPAQUE(x) tq_opaque(x)
// exp on the special-function unit (ex2.approx; max relative error ~2^-21 over the softmax's
// range [-88, 0], far below the fp16 rounding of the weights it feeds).
#define TQ_EXP(x) __expf(x)
#define TQ_MMA(d, a, b, c) tq_mma(d, a, b, c)
// For decode_attention_mma_merge.metal: device-wide ordering of a threadgroup's global writes,
// an atomic add returning the old value, and a load from L2 (data other blocks wrote).
#define TQ_FENCE() __threadfence()
#define TQ_ATOMIC_ADD(p, x) atomicAdd(p, x)
#define TQ_LDCG(p) __ldcg(p)

// x, hidden from the optimiser (which would otherwise re-derive it from its parts).
__device__ inline uint32_t tq_opaque(uint32_t x) {
  uint32_t y;
  asm("mov.b32 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

// Two floats as the fp16 pair (lo, hi), rounded to nearest.
__device__ inline uint32_t tq_h2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// d = a b + c for the SIMD-group's 16 x 16 fp16 a, 16 x 8 fp16 b and 16 x 8 float c, in
// PTX's fragment layout (lane = 4 * group + t): a {(g, 2t..2t+1), (g + 8, ..), (g, 2t+8..),
// (g + 8, 2t+8..)}, b {(2t..2t+1, g), (2t+8.., g)}, c {(g, 2t..2t+1), (g + 8, 2t..2t+1)}.
__device__ inline void tq_mma(float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
        "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
#endif
