// Merge the splits of one query row (rescale each to the common max), rotate the
// result back (out = z @ rt^T), add the value offset and cast: one threadgroup per row.
// o: [B * Hkv, n_splits, GL, D] float; ml: [B * Hkv, n_splits, GL, 2] (max, sum)
// rt_t: [D, D] float, the transposed rotation; offset: [B * Hkv, D] float, read only when
// OFFSET (without one the caller passes a placeholder that must not be indexed by bh)
// out: [B * Hkv, GL, D] T (= [B, Hq, L, D])
SHARED float z[D];
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
  const float w = EXP(ml[i * 2] - m);
  den += w * ml[i * 2 + 1];
  if (d < D) {
    num += w * o[i * D + d];
  }
}
if (d < D) {
  z[d] = num / den;
}
BARRIER();
if (d < D) {
  float acc = OFFSET ? offset[bh * D + d] : 0.0f;
  for (int j = 0; j < D; j += 8) {
    // Eight loads of rt_t in flight at once, not one latency per element.
    float rjd[8];
    UNROLL for (int u = 0; u < 8; ++u) {
      rjd[u] = rt_t[(j + u) * D + d];
    }
    UNROLL for (int u = 0; u < 8; ++u) {
      acc += z[j + u] * rjd[u];
    }
  }
  out[(bh * GL + row) * D + d] = static_cast<T>(acc);
}
