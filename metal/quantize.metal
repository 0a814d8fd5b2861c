// TurboQuant of ROWS vectors per threadgroup, one thread per coordinate: subtract the
// offset, divide by the channel scale (when SCALE), normalise, rotate, take the nearest
// level, pack LSB-first, append the scale.
// x: [N / P, P, D] T, P rows per offset row; rt: [D, D] float (rotate(x) = x @ rt)
// levels: [2^BITS]; bounds: [2^BITS - 1]; offset, scale: [N / P, D] float (scale read only
// when SCALE); out: [N, W + 1] uint32
constexpr int NW = (D + 31) / 32;
SHARED float us[ROWS * D];
SHARED uint32_t idx_s[ROWS * D];
SHARED float red[ROWS * NW];

const int n_rows = x_shape[0] * x_shape[1];
const int per_offset = x_shape[1];
const int row0 = TGID.x * ROWS;
const int j = TID;

float norm[ROWS];
for (int r = 0; r < ROWS; ++r) {
  const int row = row0 + r;
  float xj = 0.0f;
  if (j < D && row < n_rows) {
    const int c = (row / per_offset) * D + j;
    xj = static_cast<float>(x[row * D + j]) - offset[c];
    if (SCALE) {
      xj /= scale[c];
    }
    us[r * D + j] = xj;
  }
  const float sq = WARP_SUM(xj * xj);
  if (LANE == 0) {
    red[r * NW + WARP] = sq;
  }
}
BARRIER();
for (int r = 0; r < ROWS; ++r) {
  float sq = 0.0f;
  for (int w = 0; w < NW; ++w) {
    sq += red[r * NW + w];
  }
  norm[r] = SQRT(sq);
  if (j < D) {
    us[r * D + j] /= norm[r] > 0.0f ? norm[r] : 1.0f;
  }
}
BARRIER();

// z_j = sqrt(D) (u @ rt)_j: each column of rt is read once for the ROWS vectors.
float z[ROWS];
for (int r = 0; r < ROWS; ++r) {
  z[r] = 0.0f;
}
if (j < D) {
  for (int i = 0; i < D; i += 8) {
    // Eight loads of rt in flight at once, not one latency per element.
    float rij[8];
    UNROLL for (int u = 0; u < 8; ++u) {
      rij[u] = rt[(i + u) * D + j];
    }
    UNROLL for (int u = 0; u < 8; ++u) {
      UNROLL for (int r = 0; r < ROWS; ++r) {
        z[r] += us[r * D + i + u] * rij[u];
      }
    }
  }
}
const float sqrt_d = SQRT(static_cast<float>(D));
for (int r = 0; r < ROWS; ++r) {
  // Binary search over the midpoints, as the reference: idx = #{boundaries < z}.
  uint32_t idx = 0;
  for (int k = BITS - 1; k >= 0; --k) {
    const uint32_t cand = idx + (1u << k);
    idx = z[r] * sqrt_d > bounds[cand - 1] ? cand : idx;
  }
  float lsq = 0.0f;
  if (j < D) {
    idx_s[r * D + j] = idx;
    lsq = levels[idx] * levels[idx];
  }
  lsq = WARP_SUM(lsq);
  if (LANE == 0) {
    red[r * NW + WARP] = lsq;
  }
}
BARRIER();

for (int r = 0; r < ROWS; ++r) {
  const int row = row0 + r;
  if (row >= n_rows) {
    break;
  }
  for (int w = j; w <= W; w += NW * 32) {
    uint32_t word = 0;
    if (w < W) {
      // Elements overlapping bits [32w, 32w + 32) of the row's stream.
      const int last = (32 * w + 31) / BITS < D - 1 ? (32 * w + 31) / BITS : D - 1;
      for (int i = (32 * w) / BITS; i <= last; ++i) {
        const int pos = i * BITS - 32 * w;
        const uint32_t v = idx_s[r * D + i];
        word |= pos >= 0 ? v << pos : v >> -pos;
      }
    } else {
      float lsq = 0.0f;
      for (int k = 0; k < NW; ++k) {
        lsq += red[r * NW + k];
      }
      word = AS_UINT(norm[r] / SQRT(lsq));
    }
    out[row * (W + 1) + w] = word;
  }
}
