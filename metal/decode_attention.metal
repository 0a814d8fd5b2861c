// Split-K attention in the rotated space. One threadgroup of TILE threads takes one
// (batch, KV head), one split of the keys and R of the GL = G * L query rows that share
// the KV head, so each packed word is read once for all of them (decode: all rows in one
// block; prefill: many blocks, and no L x S scores held anywhere). The block first
// rotates its queries; then per tile of TILE keys: one key per thread for the scores,
// online softmax per row, and each SIMD-group accumulates its share of the tile's
// values with each lane owning E dims.
// q: [B, Hq, L, D] T (strided); row = g * L + i of KV head h holds query head h * G + g
// k, v: [B, Hkv, S, WK + 1], [B, Hkv, S, WV + 1] uint32 views (strided along S)
// rt: [D, D] float (rotate(x) = x @ rt), when POW2 its column 0 [D]; scale: [1] float
// qscale: [B, Hkv, 1, D] float (strided), read only when SMOOTH: keys stored divided by it
// k_levels, v_levels: [2^KB], [2^VB] float
// starts: [B] int32, each batch row's first visible key (a batch's left padding; else 0)
// o: [B * Hkv, n_splits, GL, D] float, unnormalised; ml: [B * Hkv, n_splits, GL, 2] (max, sum)
constexpr int NW = TILE / 32;
constexpr int E = (D + 31) / 32;
constexpr int RK = WK + 1;
constexpr int RV = WV + 1;
constexpr int PS = R * (TILE > D ? TILE : D);
SHARED uint32_t ks[TILE * RK];
SHARED uint32_t vs[TILE * RV];
SHARED float4 qs4[R * D / 4];
SHARED float ps[PS];
SHARED float lk[1 << KB];
SHARED float lv[1 << VB];
SHARED float m_s[R];
SHARED float l_s[R];
SHARED float a_s[R];
SHARED_PTR(float) qs = reinterpret_cast<SHARED_PTR(float)>(qs4);

const int n_kv = k_shape[1];
// The last TAIL rows are left out (a cache's exact window, read by the merge).
const int S = k_shape[2] > TAIL ? k_shape[2] - TAIL : 0;
const int G = q_shape[1] / n_kv;
const int L = q_shape[2];
const int GL = G * L;
const int n_splits = NTG.x;
const int tiles = (S + TILE - 1) / TILE;
const int per_split = TILE * ((tiles + n_splits - 1) / n_splits);
const int split = TGID.x;
const int bh = TGID.y;
const int b = bh / n_kv;
const int first = starts[b * starts_strides[0]];
const int h = bh % n_kv;
const int row0 = TGID.z * R;
auto kp = k + b * k_strides[0] + h * k_strides[1];
auto vp = v + b * v_strides[0] + h * v_strides[1];
const auto k_row = k_strides[2];
const auto v_row = v_strides[2];

// Scaled queries in ps, then rotated into qs: butterflies when D is a power of two (POW2),
// else a mat-vec that reads each column of rt once per block. Every load of this thread's
// QN elements is issued before any is used: one memory latency, not one per element (at
// 8,192 keys the loads one after another were half of the kernel's time on an H200).
constexpr int QN = (R * D + TILE - 1) / TILE;
float qx[QN];
float qf[QN];
bool qin[QN];
UNROLL for (int u = 0; u < QN; ++u) {
  const int f = TID + u * TILE;
  const int row = row0 + f / D;
  const int dim = f % D;
  // (No branch around the loads: the compiler then issues them all before the first use.)
  const bool in = f < R * D && row < GL;
  qin[u] = in;
  const auto qi = b * q_strides[0] + (h * G + row / L) * q_strides[1] + (row % L) * q_strides[2];
  qx[u] = static_cast<float>(q[in ? qi + dim * q_strides[3] : 0]);
  // <q, s * k'> = <q * s, k'>: keys were divided by the channel scale s.
  qf[u] = SMOOTH ? qscale[b * qscale_strides[0] + h * qscale_strides[1] + dim * qscale_strides[3]] : 1.0f;
  // POW2: the sign and 1 / sqrt(D) of the rotation now, the butterflies below.
  qf[u] *= POW2 ? TQ_SIGN(rt[dim]) : 1.0f;
}
const float q_scale = scale[0];
UNROLL for (int u = 0; u < QN; ++u) {
  const int f = TID + u * TILE;
  if (f < R * D) {
    ps[f] = qin[u] ? qx[u] * q_scale * qf[u] : 0.0f;
  }
}
// Few levels, one per bank: lanes looking up different levels never conflict.
for (int f = TID; f < (1 << KB); f += TILE) {
  lk[f] = k_levels[f];
}
for (int f = TID; f < (1 << VB); f += TILE) {
  lv[f] = v_levels[f];
}
if (TID < R) {
  m_s[TID] = NEG_INF;
  l_s[TID] = 0.0f;
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
float acc[R][E];
for (int r = 0; r < R; ++r) {
  for (int e = 0; e < E; ++e) {
    acc[r][e] = 0.0f;
  }
}
BARRIER();

const int begin = split * per_split;
int end = begin + per_split < S ? begin + per_split : S;
// The last key each of the block's rows sees (causal: query i of L sees [0, S - L + i]);
// causal, the block stops after the last key any of its rows sees.
int last[R];
int stop = 0;
for (int r = 0; r < R; ++r) {
  last[r] = CAUSAL ? S - L + (row0 + r) % L : S;
  stop = row0 + r < GL && last[r] + 1 > stop ? last[r] + 1 : stop;
}
end = CAUSAL && stop < end ? stop : end;
for (int t0 = begin; t0 < end; t0 += TILE) {
  const int nk = end - t0 < TILE ? end - t0 : TILE;
  TQ_COPY_ROWS(ks, kp + t0 * k_row, nk, RK, k_row, TID, TILE)
  TQ_COPY_ROWS(vs, vp + t0 * v_row, nk, RV, v_row, TID, TILE)
  BARRIER();

  {
    const int t = TID;
    float sc[R];
    for (int r = 0; r < R; ++r) {
      sc[r] = 0.0f;
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
          // One fused multiply-add per product (a sum of products first costs one more).
          const float4 qv = qs4[r * (D / 4) + d / 4];
          sc[r] += qv.x * z0;
          sc[r] += qv.y * z1;
          sc[r] += qv.z * z2;
          sc[r] += qv.w * z3;
        }
      }
      scale_k = AS_FLOAT(kw[WK]);
    }
    for (int r = 0; r < R; ++r) {
      const bool seen = t < nk && t0 + t >= first && t0 + t <= last[r];
      ps[r * TILE + t] = seen ? sc[r] * scale_k : NEG_INF;
    }
  }
  BARRIER();

  for (int r = WARP; r < R; r += NW) {
    float mt = NEG_INF;
    for (int t = LANE; t < TILE; t += 32) {
      mt = ps[r * TILE + t] > mt ? ps[r * TILE + t] : mt;
    }
    mt = WARP_MAX(mt);
    const float m_old = m_s[r];
    const float m_new = mt > m_old ? mt : m_old;
    // A row that has seen no key keeps m = -inf; shift by 0 so exp gives 0, not NaN.
    const float shift = m_new == NEG_INF ? 0.0f : m_new;
    float sum = 0.0f;
    for (int t = LANE; t < TILE; t += 32) {
      const float p = EXP(ps[r * TILE + t] - shift);
      sum += p;
      // Fold the value scale into the weight; a masked key or one past the tile's end
      // (stale words) adds nothing, not 0 * a non-finite scale.
      const bool seen = t < nk && ps[r * TILE + t] != NEG_INF;
      ps[r * TILE + t] = seen ? p * AS_FLOAT(vs[t * RV + WV]) : 0.0f;
    }
    sum = WARP_SUM(sum);
    if (LANE == 0) {
      const float alpha = EXP(m_old - shift);
      a_s[r] = alpha;
      l_s[r] = alpha * l_s[r] + sum;
      m_s[r] = m_new;
    }
  }
  BARRIER();

  for (int r = 0; r < R; ++r) {
    for (int e = 0; e < E; ++e) {
      acc[r][e] *= a_s[r];
    }
  }
  if (LANE * E < D) {
    constexpr uint32_t mask = (1u << VB) - 1;
    // The lane's E * VB bits: within one word when they divide 32 (32-bit shifts), else
    // a 64-bit window.
    constexpr bool one_word = 32 % (E * VB) == 0;
    const int bit = LANE * E * VB;
    const int t_end = (WARP + 1) * (TILE / NW) < nk ? (WARP + 1) * (TILE / NW) : nk;
    for (int t = WARP * (TILE / NW); t < t_end; ++t) {
      float p[R];
      UNROLL for (int r = 0; r < R; ++r) {
        p[r] = ps[r * TILE + t];
      }
      float z[E];
      if (one_word) {
        const uint32_t win = vs[t * RV + bit / 32] >> (bit % 32);
        UNROLL for (int e = 0; e < E; ++e) {
          z[e] = lv[(win >> (e * VB)) & mask];
        }
      } else {
        uint64_t win = vs[t * RV + bit / 32];
        win |= static_cast<uint64_t>(vs[t * RV + bit / 32 + 1]) << 32;
        win >>= bit % 32;
        UNROLL for (int e = 0; e < E; ++e) {
          z[e] = lv[(win >> (e * VB)) & mask];
        }
      }
      UNROLL for (int e = 0; e < E; ++e) {
        UNROLL for (int r = 0; r < R; ++r) {
          acc[r][e] += p[r] * z[e];
        }
      }
    }
  }
  BARRIER();
}

// Sum the SIMD-groups' accumulators in qs, one group at a time.
for (int w = 0; w < NW; ++w) {
  if (WARP == w) {
    for (int r = 0; r < R; ++r) {
      for (int e = 0; e < E; ++e) {
        const int d = LANE * E + e;
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
if (TID < R && row0 + TID < GL) {
  ml[(base + row0 + TID) * 2] = m_s[TID];
  ml[(base + row0 + TID) * 2 + 1] = l_s[TID];
}
