// Merge the splits of one query row: rescale each split's sum to the common max.
// o: [B * Hkv, n_splits, GL, D] float; ml: [B * Hkv, n_splits, GL, 2] (max, sum)
// sizes: [n_splits, GL]; out: [B * Hkv, GL, D] float, normalised, still rotated
const int n_splits = sizes[0];
const int GL = sizes[1];
const int bh = TGID.y / GL;
const int row = TGID.y % GL;
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
  out[(bh * GL + row) * D + d] = num / den;
}
