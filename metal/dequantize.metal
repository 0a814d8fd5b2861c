// Decodes packed TurboQuant rows in the rotated space into T, for mx.fast SDPA (prefill):
// out = (levels[idx] * scale (+ offset when OFFSET)) / 2^SHIFT, one thread per element.
// data: [B, H, S, W + 1] uint32 (strided along S); levels: [2^BITS] float
// offset: [B * H, D] float, the rotated offset (read only when OFFSET); out: [B, H, S, D] T
const int H = data_shape[1];
const int S = data_shape[2];
const int row = TGID.x;  // (b * H + h) * S + s
const int d = TID;
if (d < D) {
  const int s = row % S;
  const int bh = row / S;
  auto p = data + (bh / H) * data_strides[0] + (bh % H) * data_strides[1] + s * data_strides[2];
  const int bit = d * BITS;
  uint32_t idx = p[bit / 32] >> (bit % 32);
  if (bit % 32 + BITS > 32) {
    idx |= p[bit / 32 + 1] << (32 - bit % 32);
  }
  idx &= (1u << BITS) - 1;
  float x = levels[idx] * AS_FLOAT(p[W]);
  if (OFFSET) {
    x += offset[bh * D + d];
  }
  out[static_cast<int64_t>(row) * D + d] = static_cast<T>(x * (1.0f / (1 << SHIFT)));
}
