// Helpers shared by the kernel bodies; macros, so that they work in any address space.
#ifndef TQ_COMMON
#define TQ_COMMON
// The n-bit field at bit `bit` of the LSB-first stream in words w (it may straddle two).
#define TQ_FIELD(w, bit, n)                                                      \
  ((((bit) % 32 + (n) > 32)                                                      \
        ? ((w)[(bit) / 32] >> ((bit) % 32)) | ((w)[(bit) / 32 + 1] << (32 - (bit) % 32)) \
        : ((w)[(bit) / 32] >> ((bit) % 32))) &                                   \
   ((1u << (n)) - 1))
// dst[f] = word f of n rows of RW words, row i at src + i * row: a coalesced copy by nt
// threads (consecutive threads, consecutive words), eight loads in flight per thread (a
// load then its store per word waited one memory latency per word); adjacent rows (row ==
// RW, a cache's) need no per-word row arithmetic.
#define TQ_COPY_ROWS(dst, src, n, RW, row, tid, nt)                             \
  for (int f0_ = (tid); f0_ < (n) * (RW); f0_ += 8 * (nt)) {                     \
    uint32_t w_[8];                                                              \
    if ((row) == (RW)) {                                                         \
      UNROLL for (int u_ = 0; u_ < 8; ++u_) {                                    \
        const int f_ = f0_ + u_ * (nt);                                          \
        w_[u_] = f_ < (n) * (RW) ? (src)[f_] : 0u;                               \
      }                                                                          \
    } else {                                                                     \
      UNROLL for (int u_ = 0; u_ < 8; ++u_) {                                    \
        const int f_ = f0_ + u_ * (nt);                                          \
        w_[u_] = f_ < (n) * (RW) ? (src)[(f_ / (RW)) * (row) + f_ % (RW)] : 0u;  \
      }                                                                          \
    }                                                                            \
    UNROLL for (int u_ = 0; u_ < 8; ++u_) {                                      \
      if (f0_ + u_ * (nt) < (n) * (RW)) {                                        \
        (dst)[f0_ + u_ * (nt)] = w_[u_];                                         \
      }                                                                          \
    }                                                                            \
  }
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
// Rows x[r] (r < NR) of D floats, D a power of two, in place: x <- x @ rt for the
// rotation rt = diag(s) H / sqrt(D) (H: Sylvester Hadamard, symmetric), when each x[r][i]
// already carries s_i / sqrt(D): log2(D) butterfly stages shared by n threads (O(D log D),
// not the D^2 of TQ_MATVEC). All threads of the group must run it.
#define TQ_FWHT(x, NR, tid, n)                                                   \
  for (int h_ = 1; h_ < D; h_ *= 2) {                                            \
    for (int f_ = (tid); f_ < (NR) * D / 2; f_ += (n)) {                         \
      const int p_ = f_ % (D / 2);                                               \
      const int i_ = (f_ / (D / 2)) * D + (p_ / h_) * 2 * h_ + p_ % h_;          \
      const float a_ = (x)[i_];                                                  \
      const float b_ = (x)[i_ + h_];                                             \
      (x)[i_] = a_ + b_;                                                         \
      (x)[i_ + h_] = a_ - b_;                                                    \
    }                                                                            \
    BARRIER();                                                                   \
  }
// s_i / sqrt(D) of that rotation from rt[i][0] = s_i / sqrt(D) (column 0 of H is all ones).
#define TQ_SIGN(rt_i0) ((rt_i0) > 0.0f ? 1.0f / SQRT(float(D)) : -1.0f / SQRT(float(D)))
#endif
