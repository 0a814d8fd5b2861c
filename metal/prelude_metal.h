// Metal side of the kernel dialect. Prepended to each body: MLX adds to the signature
// the Metal attributes that the body names, so they must appear in the body's text.
#define TID thread_index_in_threadgroup
#define LANE thread_index_in_simdgroup
#define WARP simdgroup_index_in_threadgroup
#define TGID threadgroup_position_in_grid
#define NTG threadgroups_per_grid
#define SHARED_PTR(type) threadgroup type*
#define SHARED threadgroup
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define WARP_SUM(x) simd_sum(x)
#define WARP_MAX(x) simd_max(x)
#define AS_UINT(x) as_type<uint32_t>(x)
#define AS_FLOAT(x) as_type<float>(x)
#define EXP(x) metal::exp(x)
#define SQRT(x) metal::sqrt(x)
#define NEG_INF (-INFINITY)
#define UNROLL _Pragma("clang loop unroll(full)")
