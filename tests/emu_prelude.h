// The kernel dialect on the CPU, for tests/emulator.py: a threadgroup's threads are
// std::threads, threadgroup memory is static (one threadgroup runs at a time), barriers are
// std::barrier, and SIMD-group sums and maxima exchange through memory between two barriers of
// the group's 32 threads. Slow, but it runs the kernel bodies as written, barriers and all.
#ifndef TQ_PRELUDE_EMU
#define TQ_PRELUDE_EMU
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

struct uint3 {
  unsigned x, y, z;
};
struct float4 {
  float x, y, z, w;
};
struct uint4 {
  uint32_t x, y, z, w;
};
inline thread_local unsigned tq_tid;
inline thread_local uint3 tq_tgid;
inline uint3 tq_ntg;
inline std::barrier<>* tq_block;
inline std::barrier<>* tq_warps[32];
inline float tq_lanes[32][32];

inline float tq_exchange(float x, int op) {
  const unsigned w = tq_tid >> 5, l = tq_tid & 31u;
  tq_lanes[w][l] = x;
  tq_warps[w]->arrive_and_wait();
  float y = tq_lanes[w][0];
  for (int i = 1; i < 32; ++i) {
    y = op == 0 ? y + tq_lanes[w][i] : std::fmax(y, tq_lanes[w][i]);
  }
  tq_warps[w]->arrive_and_wait();
  return y;
}

template <typename T, typename U>
T tq_bits(U x) {
  T y;
  std::memcpy(&y, &x, sizeof(T));
  return y;
}

#define TID tq_tid
#define LANE (tq_tid & 31u)
#define WARP (tq_tid >> 5)
#define TGID tq_tgid
#define NTG tq_ntg
#define SHARED_PTR(type) type*
#define SHARED static
#define BARRIER() tq_block->arrive_and_wait()
#define WARP_SUM(x) tq_exchange(x, 0)
#define WARP_MAX(x) tq_exchange(x, 1)
#define AS_UINT(x) tq_bits<uint32_t>(x)
#define AS_FLOAT(x) tq_bits<float>(x)
#define EXP(x) std::exp(x)
#define SQRT(x) std::sqrt(x)
#define NEG_INF (-std::numeric_limits<float>::infinity())
#define UNROLL

// Lane exchanges and the matrix unit (decode_attention_mma.metal), through memory between
// two barriers of the SIMD-group, as the sums above.
inline uint32_t tq_words[32][32][10];

template <typename X>
X tq_shfl(X x, int lane) {
  static_assert(sizeof(X) == 4);
  const unsigned w = tq_tid >> 5, l = tq_tid & 31u;
  std::memcpy(&tq_words[w][l][0], &x, 4);
  tq_warps[w]->arrive_and_wait();
  X y;
  std::memcpy(&y, &tq_words[w][lane & 31][0], 4);
  tq_warps[w]->arrive_and_wait();
  return y;
}

inline float tq_half(uint32_t bits) {  // the fp16 in the low 16 bits
  _Float16 h;
  const uint16_t b = bits & 0xffffu;
  std::memcpy(&h, &b, 2);
  return float(h);
}

inline uint32_t tq_h2(float lo, float hi) {
  const _Float16 h[2] = {_Float16(lo), _Float16(hi)};
  uint32_t y;
  std::memcpy(&y, h, 4);
  return y;
}

inline uint32_t tq_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t b = uint64_t(x) | (uint64_t(y) << 32);
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) {
    out |= uint32_t((b >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  }
  return out;
}

// d = a b + c in PTX's m16n8k16 fragment layout (prelude_cuda.h), fp16 products summed in
// float (the hardware's order of summation may differ).
inline void tq_mma(float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  const unsigned w = tq_tid >> 5, l = tq_tid & 31u;
  for (int i = 0; i < 4; ++i) tq_words[w][l][i] = a[i];
  for (int i = 0; i < 2; ++i) tq_words[w][l][4 + i] = b[i];
  tq_warps[w]->arrive_and_wait();
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const uint32_t* r = tq_words[w][lane];
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
      A[row][col] = tq_half(r[i]);
      A[row][col + 1] = tq_half(r[i] >> 16);
    }
    for (int i = 0; i < 2; ++i) {
      B[2 * t + 8 * i][g] = tq_half(r[4 + i]);
      B[2 * t + 8 * i + 1][g] = tq_half(r[4 + i] >> 16);
    }
  }
  tq_warps[w]->arrive_and_wait();
  const int g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float sum = c[i];
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    d[i] = sum;
  }
}

#define TQ_SHFL(x, lane) tq_shfl(x, lane)
#define TQ_SHFL_XOR(x, mask) tq_shfl(x, int(LANE ^ (mask)))
#define TQ_PERM(x, y, s) tq_perm(x, y, s)
#define TQ_FUNNEL(lo, hi, s) \
  uint32_t((((uint64_t(hi) << 32) | uint64_t(lo)) >> ((s) & 31)) & 0xffffffffu)
#define TQ_H2(lo, hi) tq_h2(lo, hi)
#define TQ_OPAQUE(x) uint32_t(x)
#define TQ_EXP(x) std::exp(x)
#define TQ_MMA(d, a, b, c) tq_mma(d, a, b, c)
// (One threadgroup runs at a time: plain memory is ordered.)
#define TQ_FENCE() std::atomic_thread_fence(std::memory_order_seq_cst)
#define TQ_ATOMIC_ADD(p, x) __atomic_fetch_add(p, x, __ATOMIC_SEQ_CST)
#define TQ_LDCG(p) (*(p))
#endif
