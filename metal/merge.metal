// Merges the splits of one query row (rescales each to the common max; the splits' maxima
// and weights staged in threadgroup memory by all threads), attends the row's
// recent keys exactly (RECENT), rotates the packed part back (out = z @ rt^T; butterflies
// when D is a power of two, POW2) and casts: one threadgroup of 32 * ceil(D / 32) threads
// per row.
// o: [B * Hkv, n_splits, GL, D] float; ml: [B * Hkv, n_splits, GL, 2] (max, sum)
// rt_t: [D, D] float, the transposed rotation (when POW2 its row 0 [D]); out:
// [B * Hkv, GL, D] T (= [B, Hq, L, D])
// Read when RECENT (strided): q [B, Hq, L, D] T, the queries; kr, vr [B, Hkv, E, D] T, the
// exact keys and values of the last E positions, of which query i of L attends its WINDOW
// newest (the packed splits hold the positions before);
// k_off [B, Hkv, 1, D] float, the keys' offset the packed scores leave out; scale [1] float.
constexpr int NW = (D + 31) / 32;
constexpr int NT = NW * 32;
// At most this many splits (attention.py: MAX_SPLITS).
constexpr int MAX_SPLITS = 1024;
SHARED float z[D];
// Recent keys per chunk (a decode step has window - 1 + L of them).
constexpr int CH = 8;
SHARED float red[NW * CH];
SHARED float sc[CH];
SHARED float ws[MAX_SPLITS];
SHARED float wl[MAX_SPLITS];
SHARED float part[NW];
const int n_splits = ml_shape[1];
const int GL = ml_shape[2];
const int bh = TGID.x / GL;
const int row = TGID.x % GL;
const int d = TID;
// Every load that does not wait for another is issued first, so that their latencies
// overlap: this thread's dim of the query, the keys' offset, the first chunk of recent
// keys and values and of the splits' outputs, and the splits' (max, sum).
const int n_kv = RECENT ? kr_shape[1] : 1;
const int E = RECENT ? kr_shape[2] : 0;
const int L = RECENT ? q_shape[2] : 1;
const int b = bh / n_kv;
const int h = bh % n_kv;
const int i = row % L;
float qd = 0.0f;
float mu = 0.0f;
if (RECENT && d < D) {
  const int head = h * (q_shape[1] / n_kv) + row / L;
  qd = static_cast<float>(
           q[b * q_strides[0] + head * q_strides[1] + i * q_strides[2] + d * q_strides[3]]) *
       scale[0];
  mu = k_off[b * k_off_strides[0] + h * k_off_strides[1] + d * k_off_strides[3]];
}
// This thread's dim of a chunk of recent keys and values, all loads in flight at once.
const auto kp = kr + b * kr_strides[0] + h * kr_strides[1];
const auto vp = vr + b * vr_strides[0] + h * vr_strides[1];
float kd[CH];
float vd[CH];
// With QUANT (merge_quantize.metal), kr and vr hold the window before this step: row e
// reads their row e + 1, and the last (e = E - 1) the step's new key and value.
#ifndef TQ_NEW_K
#define TQ_NEW_K(d) 0.0f
#define TQ_NEW_V(d) 0.0f
#endif
#define TQ_RECENT_CHUNK(e0)                                                               \
  UNROLL for (int e = 0; e < CH; ++e) {                                                   \
    const int r_ = (e0) + e + (QUANT ? 1 : 0);                                            \
    const bool in = d < D && (e0) + e < E;                                                \
    const bool new_ = QUANT && r_ == E;                                                   \
    kd[e] = in && !new_ ? static_cast<float>(kp[r_ * kr_strides[2] + d * kr_strides[3]]) \
                        : (in ? TQ_NEW_K(d) : 0.0f);                                      \
    vd[e] = in && !new_ ? static_cast<float>(vp[r_ * vr_strides[2] + d * vr_strides[3]]) \
                        : (in ? TQ_NEW_V(d) : 0.0f);                                      \
  }
if (RECENT) {
  TQ_RECENT_CHUNK(0)
}
// The first eight splits' outputs (this thread's dim), weighted once the max is known.
const auto op = o + (bh * n_splits * GL + row) * D + d;  // split s at op[s * GL * D]
float o8[8];
UNROLL for (int u = 0; u < 8; ++u) {
  o8[u] = d < D && u < n_splits ? op[u * GL * D] : 0.0f;
}
// The splits' maxima and sums, staged by all threads at once: a loop over the splits in
// each thread waited for one load after another.
const auto mlr = ml + (bh * n_splits * GL + row) * 2;  // split s at mlr[s * GL * 2]
float mt = NEG_INF;
for (int s = TID; s < n_splits; s += NT) {
  const float ms = mlr[s * GL * 2];
  wl[s] = mlr[s * GL * 2 + 1];
  ws[s] = ms;
  mt = ms > mt ? ms : mt;
}
mt = WARP_MAX(mt);
if (LANE == 0) {
  part[WARP] = mt;
}
BARRIER();
float m = NEG_INF;
for (int w = 0; w < NW; ++w) {
  m = part[w] > m ? part[w] : m;
}
BARRIER();
float dt = 0.0f;
for (int s = TID; s < n_splits; s += NT) {
  // A split that saw no key (max -inf) adds nothing.
  const float w = ws[s] == NEG_INF ? 0.0f : EXP(ws[s] - m);
  ws[s] = w;
  dt += w * wl[s];
}
dt = WARP_SUM(dt);
if (LANE == 0) {
  part[WARP] = dt;
}
BARRIER();
float den = 0.0f;
for (int w = 0; w < NW; ++w) {
  den += part[w];
}
float num = 0.0f;
if (d < D) {
  // Eight loads in flight per round.
  float n8[8];
  UNROLL for (int u = 0; u < 8; ++u) {
    n8[u] = u < n_splits ? ws[u] * o8[u] : 0.0f;
  }
  int s = 8;
  for (; s + 8 <= n_splits; s += 8) {
    UNROLL for (int u = 0; u < 8; ++u) {
      n8[u] += ws[s + u] * op[(s + u) * GL * D];
    }
  }
  for (; s < n_splits; ++s) {
    n8[0] += ws[s] * op[s * GL * D];
  }
  num = ((n8[0] + n8[1]) + (n8[2] + n8[3])) + ((n8[4] + n8[5]) + (n8[6] + n8[7]));
}
float ex = 0.0f;  // this thread's dim of the exact values' weighted sum, original space
if (RECENT) {
  // CH keys at a time (the first chunk loaded above): each SIMD-group sums its dims of the
  // CH scores, then CH threads add the groups' sums; online softmax against the splits' max.
  for (int e0 = 0; e0 < E; e0 += CH) {
    const int n = E - e0 < CH ? E - e0 : CH;
    if (e0 > 0) {
      TQ_RECENT_CHUNK(e0)
    }
    UNROLL for (int e = 0; e < CH; ++e) {
      if (e < n) {
        const float p = WARP_SUM(qd * (kd[e] - mu));
        if (LANE == 0) {
          red[WARP * CH + e] = p;
        }
      }
    }
    BARRIER();
    if (TID < n) {
      float s = 0.0f;
      for (int w = 0; w < NW; ++w) {
        s += red[w * CH + TID];
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
      UNROLL for (int e = 0; e < CH; ++e) {
        // A masked key adds nothing, not 0 * a non-finite value.
        if (e < n && sc[e] != NEG_INF) {
          const float p = EXP(sc[e] - shift);
          den += p;
          ex += p * vd[e];
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
#undef TQ_NEW_K
#undef TQ_NEW_V
