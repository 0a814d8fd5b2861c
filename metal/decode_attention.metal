// Split-K attention in the rotated space. One threadgroup of T threads takes one
// (batch, KV head), one split of the keys and R of the GL = G * L query rows that share
// the KV head, so each packed word is read once for all of them (decode: all of them;
// prefill: many row blocks, no L x S scores held anywhere). Per tile of T keys:
// one key per thread for the scores, online softmax per row, then each SIMD-group
// accumulates a quarter of the tile's values with each lane owning E dims.
// q: [B * Hkv, GL, D] float, rotated and scaled; row = g * L + i
// k, v: [B, Hkv, S, WK + 1], [B, Hkv, S, WV + 1] uint32 views (strided along S)
// k_levels, v_levels: [2^KB], [2^VB] float; sizes: [S, keys per split, GL, L]
// o: [B * Hkv, n_splits, GL, D] float, unnormalised; ml: [B * Hkv, n_splits, GL, 2] (max, sum)
constexpr int NW = T / 32;
constexpr int E = (D + 31) / 32;
constexpr int RK = WK + 1;
constexpr int RV = WV + 1;
SHARED uint32_t ks[T * RK];
SHARED uint32_t vs[T * RV];
SHARED float qs[R * D];
SHARED float ps[R * T];
SHARED float lk[1 << KB];
SHARED float lv[1 << VB];
SHARED float m_s[R];
SHARED float l_s[R];
SHARED float a_s[R];

const int S = sizes[0];
const int per_split = sizes[1];
const int GL = sizes[2];
const int L = sizes[3];
const int n_splits = (S + per_split - 1) / per_split;
const int split = TGID.x;
const int bh = TGID.y;
const int row0 = TGID.z * R;
const int n_kv = k_shape[1];
auto kp = k + (bh / n_kv) * k_strides[0] + (bh % n_kv) * k_strides[1];
auto vp = v + (bh / n_kv) * v_strides[0] + (bh % n_kv) * v_strides[1];
const auto k_row = k_strides[2];
const auto v_row = v_strides[2];

for (int f = TID; f < R * D; f += T) {
  const int row = row0 + f / D;
  qs[f] = row < GL ? q[(bh * GL + row) * D + f % D] : 0.0f;
}
for (int f = TID; f < (1 << KB); f += T) {
  lk[f] = k_levels[f];
}
for (int f = TID; f < (1 << VB); f += T) {
  lv[f] = v_levels[f];
}
if (TID < R) {
  m_s[TID] = NEG_INF;
  l_s[TID] = 0.0f;
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
if (CAUSAL) {
  // Stop after the last key any of the block's rows sees (query i sees [0, S - L + i]).
  int stop = 0;
  for (int row = row0; row < row0 + R && row < GL; ++row) {
    stop = S - L + row % L + 1 > stop ? S - L + row % L + 1 : stop;
  }
  end = stop < end ? stop : end;
}
for (int t0 = begin; t0 < end; t0 += T) {
  const int nk = end - t0 < T ? end - t0 : T;
  // Coalesced copy of the tile: consecutive threads read consecutive words.
  for (int f = TID; f < nk * RK; f += T) {
    const int t = f / RK;
    ks[f] = kp[(t0 + t) * k_row + (f - t * RK)];
  }
  for (int f = TID; f < nk * RV; f += T) {
    const int t = f / RV;
    vs[f] = vp[(t0 + t) * v_row + (f - t * RV)];
  }
  BARRIER();

  {
    const int t = TID;
    float sc[R];
    for (int r = 0; r < R; ++r) {
      sc[r] = 0.0f;
    }
    if (t < nk) {
      UNROLL for (int d = 0; d < D; ++d) {
        constexpr uint32_t mask = (1u << KB) - 1;
        const int bit = d * KB;
        uint32_t w = ks[t * RK + bit / 32] >> (bit % 32);
        if (bit % 32 + KB > 32) {
          w |= ks[t * RK + bit / 32 + 1] << (32 - bit % 32);
        }
        const float z = lk[w & mask];
        UNROLL for (int r = 0; r < R; ++r) {
          sc[r] += qs[r * D + d] * z;
        }
      }
    }
    const float scale = t < nk ? AS_FLOAT(ks[t * RK + WK]) : 0.0f;
    for (int r = 0; r < R; ++r) {
      // Causal: query i of L sees keys [0, S - L + i].
      const bool seen = t < nk && (!CAUSAL || t0 + t <= S - L + (row0 + r) % L);
      ps[r * T + t] = seen ? sc[r] * scale : NEG_INF;
    }
  }
  BARRIER();

  for (int r = WARP; r < R; r += NW) {
    float mt = NEG_INF;
    for (int t = LANE; t < T; t += 32) {
      mt = ps[r * T + t] > mt ? ps[r * T + t] : mt;
    }
    mt = WARP_MAX(mt);
    const float m_old = m_s[r];
    const float m_new = mt > m_old ? mt : m_old;
    // A row that has seen no key keeps m = -inf; shift by 0 so exp gives 0, not NaN.
    const float shift = m_new == NEG_INF ? 0.0f : m_new;
    float sum = 0.0f;
    for (int t = LANE; t < T; t += 32) {
      const float p = EXP(ps[r * T + t] - shift);
      sum += p;
      // Fold the value scale into the weight; skip it past the tile's end (stale words).
      ps[r * T + t] = t < nk ? p * AS_FLOAT(vs[t * RV + WV]) : 0.0f;
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
    const int bit = LANE * E * VB;
    const int t_end = (WARP + 1) * (T / NW) < nk ? (WARP + 1) * (T / NW) : nk;
    for (int t = WARP * (T / NW); t < t_end; ++t) {
      // A 64-bit window holds the lane's E * VB <= 32 bits wherever they start.
      const uint64_t lo = vs[t * RV + bit / 32];
      const uint64_t hi = vs[t * RV + bit / 32 + 1];
      const uint64_t win = (lo | (hi << 32)) >> (bit % 32);
      UNROLL for (int e = 0; e < E; ++e) {
        const float z = lv[(win >> (e * VB)) & mask];
        UNROLL for (int r = 0; r < R; ++r) {
          acc[r][e] += ps[r * T + t] * z;
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
for (int f = TID; f < R * D; f += T) {
  const int row = row0 + f / D;
  if (row < GL) {
    o[(base + row) * D + f % D] = qs[f];
  }
}
if (TID < R && row0 + TID < GL) {
  ml[(base + row0 + TID) * 2] = m_s[TID];
  ml[(base + row0 + TID) * 2 + 1] = l_s[TID];
}
