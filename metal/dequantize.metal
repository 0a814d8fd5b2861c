// Decodes packed TurboQuant rows in the rotated space into T, for mx.fast SDPA (prefill):
// out = levels[idx] * scale / 2^SHIFT, one thread per element.
// data: [B, H, S, W + 1] uint32 (strided along S); levels: [2^BITS] float; out: [B, H, S, D] T
const int H = data_shape[1];
const int S = data_shape[2];
const int row = TGID.x;  // (b * H + h) * S + s
const int d = TID;
if (d < D) {
  const int s = row % S;
  const int bh = row / S;
  auto p = data + (bh / H) * data_strides[0] + (bh % H) * data_strides[1] + s * data_strides[2];
  const float x = levels[TQ_FIELD(p, d * BITS, BITS)] * AS_FLOAT(p[W]);
  out[static_cast<int64_t>(row) * D + d] = static_cast<T>(x * (1.0f / (1 << SHIFT)));
}
