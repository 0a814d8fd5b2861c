// Just enough of the Metal language for clang++ -fsyntax-only to check the kernel bodies
// as MLX wraps them (address spaces, attributes, SIMD-group functions, bit casts).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define device
#define constant
#define threadgroup

using uint = unsigned int;
struct uint3 {
  uint x, y, z;
};
struct float4 {
  float x, y, z, w;
};
struct half {
  half(float);
  operator float() const;
};
struct bfloat16_t {
  bfloat16_t(float);
  operator float() const;
};

enum class mem_flags { mem_none, mem_device, mem_threadgroup };
void threadgroup_barrier(mem_flags);
float simd_sum(float);
float simd_max(float);

template <typename T, typename U>
T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs equal sizes");
  T y;
  std::memcpy(&y, &x, sizeof(T));
  return y;
}

namespace metal {
using std::exp;
using std::sqrt;
}  // namespace metal
