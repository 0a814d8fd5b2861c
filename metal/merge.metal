// Merge the splits of one query row (rescale each to the common max), rotate the
// result back (out = z @ rt^T), add the value offset and cast: one threadgroup per row.
// o: [B * Hkv, n_splits, GL, D] float; ml: [B * Hkv, n_splits, GL, 2] (max, sum)
// rt_t: [D, D] float, the transposed rotation; offset: [B * Hkv, D] float, read only when
// OFFSET (without one the caller passes a placeholder that must not be indexed by bh)
// SINK: row 0 of the keys/values was left out of the splits and is exact here:
// q: [B, Hq, L, D] T; sk, sv: [B * Hkv, D] float, the sink key and value in the stored
// space (before the rotation; the key divided by qscale when SMOOTH); qscale: [B * Hkv, D]
// float; scale: [1] float. Its score is scale * <q * qscale, sk>, and its value enters
// after the rotation back (R^T is linear). Without SINK these are placeholders, not read.
// out: [B * Hkv, GL, D] T (= [B, Hq, L, D])
SHARED float z[D];
SHARED float red[(D + 31) / 32];
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
float s0 = NEG_INF;
if (SINK) {
  float part = 0.0f;
  if (d < D) {
    const float qd = static_cast<float>(q[(bh * GL + row) * D + d]);
    part = qd * (SMOOTH ? qscale[bh * D + d] : 1.0f) * sk[bh * D + d];
  }
  part = WARP_SUM(part);
  if (LANE == 0) {
    red[WARP] = part;
  }
  BARRIER();
  float dot = 0.0f;
  for (int w = 0; w < (D + 31) / 32; ++w) {
    dot += red[w];
  }
  s0 = dot * scale[0];
  m = s0 > m ? s0 : m;
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
const float w0 = SINK ? EXP(s0 - m) : 0.0f;
den += w0;
if (d < D) {
  z[d] = num;
}
BARRIER();
if (d < D) {
  float acc = 0.0f;
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
  if (SINK) {
    acc += w0 * sv[bh * D + d];
  }
  acc = acc / den + (OFFSET ? offset[bh * D + d] : 0.0f);
  out[(bh * GL + row) * D + d] = static_cast<T>(acc);
}
