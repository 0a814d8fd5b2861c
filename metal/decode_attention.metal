// Split-K attention in the rotated space. One threadgroup of TILE threads takes one
// (batch, KV head), one split of the keys and R of the GL = G * L query rows that share
// the KV head, so each packed word is read once for all of them (decode: all rows in one
// block; prefill: many blocks, and no L x S scores held anywhere). The block first
// rotates its queries; then per tile of TILE keys, two barriers: one key per thread for
// the scores (each thread keeps the running max and its own keys' share of the softmax
// sum, so no tile-wide sum is taken), then each SIMD-group accumulates its share of the
// tile's values with each lane owning VE dims of a key. The next tiles' words are loaded
// into registers while the current one is computed.
// q: [B, Hq, L, D] T (strided); row = g * L + i of KV head h holds query head h * G + g
// k, v: [B, Hkv, S, WK + 1], [B, Hkv, S, WV + 1] uint32 views (strided along S)
// rt: [D, D] float (rotate(x) = x @ rt); scale: [1] float
// qscale: [B, Hkv, 1, D] float (strided), read only when SMOOTH: keys stored divided by it
// k_levels, v_levels: [2^KB], [2^VB] float
// starts: [B] int32, each batch row's first visible key (a batch's left padding; else 0)
// o: [B * Hkv, n_splits, GL, D] float, unnormalised; ml: [B * Hkv, n_splits, GL, 2] (max, sum)
constexpr int NW = TILE / 32;
constexpr int RK = WK + 1;
constexpr int RV = WV + 1;
// Value phase: a lane owns VE dims of one key, LPK lanes a key, so a SIMD-group takes KPS
// keys at once (eight 4-bit dims are one word); head dims that do not split so: one key.
constexpr int VE8 = (D + 31) / 32 > 8 ? (D + 31) / 32 : 8;
constexpr bool SPLIT8 = D % VE8 == 0 && 32 % (D / VE8) == 0;
constexpr int VE = SPLIT8 ? VE8 : (D + 31) / 32;
constexpr int LPK = SPLIT8 ? D / VE : 32;
constexpr int KPS = 32 / LPK;
constexpr int KW = TILE / NW;
constexpr int PS = R * (TILE > D ? TILE : D);
SHARED uint32_t ks[TILE * RK];
SHARED uint32_t vs[TILE * RV];
SHARED float4 qs4[R * D / 4];
SHARED float ps[PS];
SHARED float lk[1 << KB];
SHARED float lv[1 << VB];
SHARED float red[NW * R];
SHARED_PTR(float) qs = reinterpret_cast<SHARED_PTR(float)>(qs4);

const int n_kv = k_shape[1];
const int S = k_shape[2];
const int G = q_shape[1] / n_kv;
const int L = q_shape[2];
const int GL = G * L;
const int n_splits = NTG.x;
const int tiles = (S + TILE - 1) / TILE;
const int per_split = TILE * ((tiles + n_splits - 1) / n_splits);
const int split = TGID.x;
const int bh = TGID.y;
const int b = bh / n_kv;
const int first = starts[b];
const int h = bh % n_kv;
const int row0 = TGID.z * R;
auto kp = k + b * k_strides[0] + h * k_strides[1];
auto vp = v + b * v_strides[0] + h * v_strides[1];
const auto k_row = k_strides[2];
const auto v_row = v_strides[2];

// Scaled queries in ps, then rotated into qs: butterflies when D is a power of two (POW2),
// else a mat-vec that reads each column of rt once per block.
for (int f = TID; f < R * D; f += TILE) {
  const int row = row0 + f / D;
  float x = 0.0f;
  if (row < GL) {
    const auto qi = b * q_strides[0] + (h * G + row / L) * q_strides[1] + (row % L) * q_strides[2];
    x = static_cast<float>(q[qi + (f % D) * q_strides[3]]) * scale[0];
    if (SMOOTH) {
      // <q, s * k'> = <q * s, k'>: keys were divided by the channel scale s.
      x *= qscale[b * qscale_strides[0] + h * qscale_strides[1] + (f % D) * qscale_strides[3]];
    }
  }
  // POW2: the sign and 1 / sqrt(D) of the rotation now, the butterflies below.
  ps[f] = POW2 ? x * TQ_SIGN(rt[(f % D) * D]) : x;
}
// Few levels, one per bank: lanes looking up different levels never conflict.
for (int f = TID; f < (1 << KB); f += TILE) {
  lk[f] = k_levels[f];
}
for (int f = TID; f < (1 << VB); f += TILE) {
  lv[f] = v_levels[f];
}
BARRIER();
if (POW2) {
  TQ_FWHT(ps, R, TID, TILE)
  for (int f = TID; f < R * D; f += TILE) {
    qs[f] = ps[f];
  }
} else {
  for (int j = TID; j < D; j += TILE) {
    float y[R];
    for (int r = 0; r < R; ++r) {
      y[r] = 0.0f;
    }
    TQ_MATVEC(y, ps, rt, j, R)
    for (int r = 0; r < R; ++r) {
      qs[r * D + j] = y[r];
    }
  }
}

const int begin = split * per_split;
int end = begin + per_split < S ? begin + per_split : S;
if (CAUSAL) {
  // Stop after the last key any of the block's rows sees (query i sees [0, S - L + i]).
  int stop = 0;
  for (int row = row0; row < row0 + R && row < GL; ++row) {
    stop = S - L + row % L + 1 > stop ? S - L + row % L + 1 : stop;
  }
  end = stop < end ? stop : end;
}
// Keys [t0, t0 + TILE) below `end`, as the words of a tile (words of missing keys: 0).
#define TQ_TILE_LOAD(regs, src, row, RW, t0)                                     \
  UNROLL for (int j_ = 0; j_ < RW; ++j_) {                                       \
    const int f_ = TID + j_ * TILE;                                              \
    const int t_ = f_ / RW;                                                      \
    regs[j_] = (t0) + t_ < end ? src[((t0) + t_) * row + (f_ - t_ * RW)] : 0u;   \
  }
#define TQ_TILE_STORE(dst, regs, RW)                                             \
  UNROLL for (int j_ = 0; j_ < RW; ++j_) {                                       \
    dst[TID + j_ * TILE] = regs[j_];                                             \
  }
// Registers: the keys of the next tile and the values of this one (stored at the middle
// barrier of each tile, when the previous ones are no longer read).
uint32_t rk[RK];
uint32_t rv[RV];
TQ_TILE_LOAD(rk, kp, k_row, RK, begin)
TQ_TILE_STORE(ks, rk, RK)
TQ_TILE_LOAD(rk, kp, k_row, RK, begin + TILE)
TQ_TILE_LOAD(rv, vp, v_row, RV, begin)
float acc[R][VE];
float m[R];  // the running max, the same in every thread
float l[R];  // this thread's keys' share of the running sum
for (int r = 0; r < R; ++r) {
  m[r] = NEG_INF;
  l[r] = 0.0f;
  for (int e = 0; e < VE; ++e) {
    acc[r][e] = 0.0f;
  }
}
BARRIER();

for (int t0 = begin; t0 < end; t0 += TILE) {
  const int nk = end - t0 < TILE ? end - t0 : TILE;
  const int t = TID;
  // The value scale of this thread's key, folded into its weight below.
  const float v_scale = t < nk ? AS_FLOAT(vp[(t0 + t) * v_row + WV]) : 0.0f;
  float s[R];
  {
    for (int r = 0; r < R; ++r) {
      s[r] = 0.0f;
    }
    float scale_k = 0.0f;
    if (t < nk) {
      uint32_t kw[RK];
      UNROLL for (int w = 0; w < RK; ++w) {
        kw[w] = ks[t * RK + w];
      }
      UNROLL for (int d = 0; d < D; d += 4) {
        const float z0 = lk[TQ_FIELD(kw, d * KB, KB)];
        const float z1 = lk[TQ_FIELD(kw, (d + 1) * KB, KB)];
        const float z2 = lk[TQ_FIELD(kw, (d + 2) * KB, KB)];
        const float z3 = lk[TQ_FIELD(kw, (d + 3) * KB, KB)];
        UNROLL for (int r = 0; r < R; ++r) {
          const float4 qv = qs4[r * (D / 4) + d / 4];
          s[r] += qv.x * z0 + qv.y * z1 + qv.z * z2 + qv.w * z3;
        }
      }
      scale_k = AS_FLOAT(kw[WK]);
    }
    for (int r = 0; r < R; ++r) {
      // Causal: query i of L sees keys [0, S - L + i].
      const bool seen =
          t < nk && t0 + t >= first && (!CAUSAL || t0 + t <= S - L + (row0 + r) % L);
      s[r] = seen ? s[r] * scale_k : NEG_INF;
      const float w_max = WARP_MAX(s[r]);
      if (LANE == 0) {
        red[WARP * R + r] = w_max;
      }
    }
  }
  BARRIER();
  TQ_TILE_STORE(ks, rk, RK)
  TQ_TILE_STORE(vs, rv, RV)
  TQ_TILE_LOAD(rk, kp, k_row, RK, t0 + 2 * TILE)
  TQ_TILE_LOAD(rv, vp, v_row, RV, t0 + TILE)
  float alpha[R];
  for (int r = 0; r < R; ++r) {
    float m_new = m[r];
    for (int w = 0; w < NW; ++w) {
      m_new = red[w * R + r] > m_new ? red[w * R + r] : m_new;
    }
    // A row that has seen no key keeps m = -inf; shift by 0 so exp gives 0, not NaN.
    const float shift = m_new == NEG_INF ? 0.0f : m_new;
    alpha[r] = EXP(m[r] - shift);
    m[r] = m_new;
    const float p = EXP(s[r] - shift);
    l[r] = alpha[r] * l[r] + p;
    // A masked key or one past the tile's end adds nothing, not 0 * a non-finite scale.
    ps[t * R + r] = s[r] != NEG_INF ? p * v_scale : 0.0f;
  }
  BARRIER();

  for (int r = 0; r < R; ++r) {
    for (int e = 0; e < VE; ++e) {
      acc[r][e] *= alpha[r];
    }
  }
  const int li = LANE % LPK;
  if (li * VE < D) {
    constexpr uint32_t mask = (1u << VB) - 1;
    // The lane's VE * VB bits: within one word when they divide 32, else a 64-bit window.
    constexpr bool one_word = 32 % (VE * VB) == 0;
    const int bit = li * VE * VB;
    const int t_end = (WARP + 1) * KW < nk ? (WARP + 1) * KW : nk;
    for (int tv = WARP * KW + LANE / LPK; tv < t_end; tv += KPS) {
      uint64_t win = vs[tv * RV + bit / 32];
      if (!one_word) {
        win |= static_cast<uint64_t>(vs[tv * RV + bit / 32 + 1]) << 32;
      }
      win >>= bit % 32;
      float p[R];
      UNROLL for (int r = 0; r < R; ++r) {
        p[r] = ps[tv * R + r];
      }
      UNROLL for (int e = 0; e < VE; ++e) {
        const float z = lv[(win >> (e * VB)) & mask];
        UNROLL for (int r = 0; r < R; ++r) {
          acc[r][e] += p[r] * z;
        }
      }
    }
  }
}
#undef TQ_TILE_LOAD
#undef TQ_TILE_STORE

// The KPS keys a SIMD-group took at once held the same dims: sum them into lanes < LPK.
for (int x = LPK; x < 32; x *= 2) {
  for (int r = 0; r < R; ++r) {
    for (int e = 0; e < VE; ++e) {
      acc[r][e] += SHFL_XOR(acc[r][e], x);
    }
  }
}
for (int r = 0; r < R; ++r) {
  const float l_w = WARP_SUM(l[r]);
  if (LANE == 0) {
    red[WARP * R + r] = l_w;
  }
}
// Sum the SIMD-groups' accumulators in qs, one group at a time.
for (int w = 0; w < NW; ++w) {
  if (WARP == w && LANE < LPK) {
    for (int r = 0; r < R; ++r) {
      for (int e = 0; e < VE; ++e) {
        const int d = LANE * VE + e;
        if (d < D) {
          qs[r * D + d] = (w == 0 ? 0.0f : qs[r * D + d]) + acc[r][e];
        }
      }
    }
  }
  BARRIER();
}
const int base = (bh * n_splits + split) * GL;
for (int f = TID; f < R * D; f += TILE) {
  const int row = row0 + f / D;
  if (row < GL) {
    o[(base + row) * D + f % D] = qs[f];
  }
}
for (int r = 0; r < R; ++r) {
  if (TID == r && row0 + r < GL) {
    float sum = 0.0f;
    for (int w = 0; w < NW; ++w) {
      sum += red[w * R + r];
    }
    ml[(base + row0 + r) * 2] = m[r];
    ml[(base + row0 + r) * 2 + 1] = sum;
  }
}
