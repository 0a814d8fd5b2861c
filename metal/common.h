// Helpers shared by the kernel bodies; macros, so that they work in any address space.
#ifndef TQ_COMMON
#define TQ_COMMON
// The n-bit field at bit `bit` of the LSB-first stream in words w (it may straddle two).
#define TQ_FIELD(w, bit, n)                                                      \
  ((((bit) % 32 + (n) > 32)                                                      \
        ? ((w)[(bit) / 32] >> ((bit) % 32)) | ((w)[(bit) / 32 + 1] << (32 - (bit) % 32)) \
        : ((w)[(bit) / 32] >> ((bit) % 32))) &                                   \
   ((1u << (n)) - 1))
// y[r] += (x[r] @ m)[j] for the NR rows x[r] of D floats and the [D, D] matrix m, with
// eight loads of m in flight at once (not one latency per element).
#define TQ_MATVEC(y, x, m, j, NR)                                                \
  for (int i_ = 0; i_ < D; i_ += 8) {                                            \
    float m_[8];                                                                 \
    UNROLL for (int u_ = 0; u_ < 8; ++u_) {                                      \
      m_[u_] = (m)[(i_ + u_) * D + (j)];                                         \
    }                                                                            \
    UNROLL for (int u_ = 0; u_ < 8; ++u_) {                                      \
      UNROLL for (int r_ = 0; r_ < (NR); ++r_) {                                 \
        (y)[r_] += (x)[r_ * D + i_ + u_] * m_[u_];                               \
      }                                                                          \
    }                                                                            \
  }
#endif
