// Merges the splits of one query row (rescales each to the common max), attends the row's
// recent keys exactly (RECENT), rotates the packed part back (out = z @ rt^T; butterflies
// when D is a power of two, POW2) and casts: one threadgroup of 32 * ceil(D / 32) threads
// per row.
// o: [B * Hkv, n_splits, GL, D] float; ml: [B * Hkv, n_splits, GL, 2] (max, sum)
// rt_t: [D, D] float, the transposed rotation; out: [B * Hkv, GL, D] T (= [B, Hq, L, D])
// Read when RECENT (strided): q [B, Hq, L, D] T, the queries; kr, vr [B, Hkv, E, D] T, the
// exact keys and values of the last E positions, of which query i of L attends its WINDOW
// newest (the packed splits hold the positions before);
// k_off [B, Hkv, 1, D] float, the keys' offset the packed scores leave out; scale [1] float.
constexpr int NW = (D + 31) / 32;
SHARED float z[D];
SHARED float red[NW * 32];
SHARED float sc[32];
const int n_splits = ml_shape[1];
const int GL = ml_shape[2];
const int bh = TGID.x / GL;
const int row = TGID.x % GL;
const int d = TID;
float m = NEG_INF;
for (int s = 0; s < n_splits; ++s) {
  const float ms = ml[((bh * n_splits + s) * GL + row) * 2];
  m = ms > m ? ms : m;
}
float num = 0.0f;
float den = 0.0f;
for (int s = 0; s < n_splits; ++s) {
  const int i = (bh * n_splits + s) * GL + row;
  // A split that saw no key (max -inf) adds nothing.
  const float w = ml[i * 2] == NEG_INF ? 0.0f : EXP(ml[i * 2] - m);
  den += w * ml[i * 2 + 1];
  if (d < D) {
    num += w * o[i * D + d];
  }
}
float ex = 0.0f;  // this thread's dim of the exact values' weighted sum, original space
if (RECENT) {
  const int n_kv = kr_shape[1];
  const int E = kr_shape[2];
  const int L = q_shape[2];
  const int b = bh / n_kv;
  const int h = bh % n_kv;
  const int i = row % L;
  const auto kp = kr + b * kr_strides[0] + h * kr_strides[1];
  const auto vp = vr + b * vr_strides[0] + h * vr_strides[1];
  float qd = 0.0f;
  float mu = 0.0f;
  if (d < D) {
    const int head = h * (q_shape[1] / n_kv) + row / L;
    qd = static_cast<float>(
             q[b * q_strides[0] + head * q_strides[1] + i * q_strides[2] + d * q_strides[3]]) *
         scale[0];
    mu = k_off[b * k_off_strides[0] + h * k_off_strides[1] + d * k_off_strides[3]];
  }
  // 32 keys at a time: each SIMD-group sums its dims of the 32 scores, then 32 threads
  // add the groups' sums; online softmax against the splits' max.
  for (int e0 = 0; e0 < E; e0 += 32) {
    const int n = E - e0 < 32 ? E - e0 : 32;
    for (int e = 0; e < n; ++e) {
      float p = 0.0f;
      if (d < D) {
        p = qd * (static_cast<float>(kp[(e0 + e) * kr_strides[2] + d * kr_strides[3]]) - mu);
      }
      p = WARP_SUM(p);
      if (LANE == 0) {
        red[WARP * 32 + e] = p;
      }
    }
    BARRIER();
    if (TID < n) {
      float s = 0.0f;
      for (int w = 0; w < NW; ++w) {
        s += red[w * 32 + TID];
      }
      // Query i of L attends recent rows e >= i + c exactly, c = E - L - WINDOW + 1 (its
      // WINDOW newest positions; older ones packed) and, causal, positions up to S - L + i:
      // row e sits at S - E + e.
      const int e = e0 + TID;
      sc[TID] = e >= i + E - L - WINDOW + 1 && (!CAUSAL || e <= E - L + i) ? s : NEG_INF;
    }
    BARRIER();
    float mc = m;
    bool seen = false;
    for (int e = 0; e < n; ++e) {
      mc = sc[e] > mc ? sc[e] : mc;
      seen = seen || sc[e] != NEG_INF;
    }
    if (seen) {
      // (A NaN score is no max but spoils the sums, as in an fp16 cache.)
      const float shift = mc == NEG_INF ? 0.0f : mc;
      const float alpha = m == NEG_INF ? 0.0f : EXP(m - shift);
      num *= alpha;
      den *= alpha;
      ex *= alpha;
      m = mc;
      for (int e = 0; e < n; ++e) {
        // A masked key adds nothing, not 0 * a non-finite value.
        if (sc[e] != NEG_INF) {
          const float p = EXP(sc[e] - shift);
          den += p;
          if (d < D) {
            ex += p * static_cast<float>(vp[(e0 + e) * vr_strides[2] + d * vr_strides[3]]);
          }
        }
      }
    }
    BARRIER();
  }
}
if (POW2) {
  // z @ rt^T = (z H) * s / sqrt(D): butterflies, then the signs (rt^T[0][d] = rt[d][0]).
  z[d] = num;
  BARRIER();
  TQ_FWHT(z, 1, d, D)
  out[(bh * GL + row) * D + d] = static_cast<T>((z[d] * TQ_SIGN(rt_t[d]) + ex) / den);
} else {
  if (d < D) {
    z[d] = num;
  }
  BARRIER();
  if (d < D) {
    float acc[1] = {0.0f};
    TQ_MATVEC(acc, z, rt_t, d, 1)
    out[(bh * GL + row) * D + d] = static_cast<T>((acc[0] + ex) / den);
  }
}
