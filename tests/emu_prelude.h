// The kernel dialect on the CPU, for tests/emulator.py: a threadgroup's threads are
// std::threads, threadgroup memory is static (one threadgroup runs at a time), barriers are
// std::barrier, and SIMD-group sums and maxima exchange through memory between two barriers of
// the group's 32 threads. Slow, but it runs the kernel bodies as written, barriers and all.
#ifndef TQ_PRELUDE_EMU
#define TQ_PRELUDE_EMU
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
#endif
