// Merges the splits of one query row (rescales each to the common max), rotates the
// result back (out = z @ rt^T; butterflies when D is a power of two, POW2) and casts:
// one threadgroup of 32 * ceil(D / 32) threads per row.
// o: [B * Hkv, n_splits, GL, D] float; ml: [B * Hkv, n_splits, GL, 2] (max, sum)
// rt_t: [D, D] float, the transposed rotation; out: [B * Hkv, GL, D] T (= [B, Hq, L, D])
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
if (POW2) {
  // z @ rt^T = (z H) * s / sqrt(D): butterflies, then the signs (rt^T[0][d] = rt[d][0]).
  z[d] = num;
  BARRIER();
  TQ_FWHT(z, 1, d, D)
  out[(bh * GL + row) * D + d] = static_cast<T>(z[d] * TQ_SIGN(rt_t[d]) / den);
} else {
  if (d < D) {
    z[d] = num;
  }
  BARRIER();
  if (d < D) {
    float acc[1] = {0.0f};
    TQ_MATVEC(acc, z, rt_t, d, 1)
    out[(bh * GL + row) * D + d] = static_cast<T>(acc[0] / den);
  }
}
