// TurboQuant of keys and values in one launch, ROWS vectors per threadgroup, one thread
// per coordinate: keys minus their offset and divided by the channel scale (when SCALE),
// then normalise, rotate, take the nearest level, pack LSB-first, append the scale.
// Threadgroups [0, blocks) take key rows, [blocks, 2 * blocks) value rows.
// k, v: [B, H, P, D] T, P rows per offset row; rt: [D, D] float (rotate(x) = x @ rt),
// when POW2 its column 0 [D]
// k_levels, k_bounds: [2^KB], [2^KB - 1] float; v_levels, v_bounds: the same for VB
// offset, scale: [B * H, D] float, for keys (scale read only when SCALE)
// k_out, v_out: [N, WK + 1], [N, WV + 1] uint32
// When RW > 0 (one token per row, N = B * H): k_win, v_win [N, RW, D] T, a cache's exact
// window of keys and values, oldest row first; k_win_out, v_win_out the same shifted by one
// row, the new vector last (read and written only when RW > 0)
// (quantize_shared.metal declares its threadgroup memory and q_first, the first
// threadgroup that quantises: 0 here, after the merging ones in merge_quantize.)
const int per_offset = k_shape[2];
// Element j of row `row` (of B * H * P) of the keys or values, read with their strides (a
// model's keys are often a transposed view, which merge_quantize reads in place).
#define TQ_QX(s, row)                                                                     \
  (((row) / per_offset / k_shape[1]) * (s)[0] + ((row) / per_offset % k_shape[1]) * (s)[1] + \
   ((row) % per_offset) * (s)[2] + j * (s)[3])
const int n_rows = k_shape[0] * k_shape[1] * per_offset;
const int blocks = (n_rows + ROWS - 1) / ROWS;
const int tg = static_cast<int>(TGID.x) - q_first;
const bool is_v = tg >= blocks;
const int row0 = (tg - (is_v ? blocks : 0)) * ROWS;
const int bits = is_v ? VB : KB;
const int W = is_v ? WV : WK;
auto levels = is_v ? v_levels : k_levels;
auto bounds = is_v ? v_bounds : k_bounds;
auto out = is_v ? v_out : k_out;
const int j = TID;
// The codebook in threadgroup memory, and this coordinate's rotation sign, loaded at once:
// the search below reads a level per step.
for (int f = j; f < (1 << bits); f += QNW * 32) {
  q_lev[f] = levels[f];
  q_bnd[f] = f + 1 < (1 << bits) ? bounds[f] : 0.0f;
}
const float sign = POW2 && j < D ? TQ_SIGN(rt[j]) : 0.0f;

float norm[ROWS];
for (int r = 0; r < ROWS; ++r) {
  const int row = row0 + r;
  float xj = 0.0f;
  if (j < D && row < n_rows) {
    xj = static_cast<float>(is_v ? v[TQ_QX(v_strides, row)] : k[TQ_QX(k_strides, row)]);
    if (!is_v) {
      const int c = (row / per_offset) * D + j;
      xj -= offset[c];
      if (SCALE) {
        xj /= scale[c];
      }
    }
    q_us[r * D + j] = xj;
  }
  const float sq = WARP_SUM(xj * xj);
  if (LANE == 0) {
    q_red[r * QNW + WARP] = sq;
  }
}
BARRIER();
for (int r = 0; r < ROWS; ++r) {
  float sq = 0.0f;
  for (int w = 0; w < QNW; ++w) {
    sq += q_red[r * QNW + w];
  }
  norm[r] = SQRT(sq);
  if (j < D) {
    q_us[r * D + j] /= norm[r] > 0.0f ? norm[r] : 1.0f;
  }
}
BARRIER();

// z_j = sqrt(D) (u @ rt)_j: butterflies when D is a power of two (POW2), else a mat-vec
// that reads each column of rt once for the ROWS vectors.
float z[ROWS];
for (int r = 0; r < ROWS; ++r) {
  z[r] = 0.0f;
}
if (POW2) {
  // The signs and 1 / sqrt(D) of the rotation, then butterflies (threads == D).
  for (int r = 0; r < ROWS; ++r) {
    q_us[r * D + j] *= sign;
  }
  BARRIER();
  TQ_FWHT(q_us, ROWS, j, D)
  for (int r = 0; r < ROWS; ++r) {
    z[r] = q_us[r * D + j];
  }
} else if (j < D) {
  TQ_MATVEC(z, q_us, rt, j, ROWS)
}
const float sqrt_d = SQRT(static_cast<float>(D));
for (int r = 0; r < ROWS; ++r) {
  // Binary search over the midpoints, as the reference: idx = #{boundaries < z}.
  uint32_t idx = 0;
  for (int b = bits - 1; b >= 0; --b) {
    const uint32_t cand = idx + (1u << b);
    idx = z[r] * sqrt_d > q_bnd[cand - 1] ? cand : idx;
  }
  float lsq = 0.0f;
  if (j < D) {
    q_idx[r * D + j] = idx;
    lsq = q_lev[idx] * q_lev[idx];
  }
  lsq = WARP_SUM(lsq);
  if (LANE == 0) {
    q_red[r * QNW + WARP] = lsq;
  }
}
BARRIER();

for (int r = 0; r < ROWS; ++r) {
  const int row = row0 + r;
  if (row >= n_rows) {
    break;
  }
  for (int w = j; w <= W; w += QNW * 32) {
    uint32_t word = 0;
    if (w < W) {
      // Elements overlapping bits [32w, 32w + 32) of the row's stream.
      const int last = (32 * w + 31) / bits < D - 1 ? (32 * w + 31) / bits : D - 1;
      for (int i = (32 * w) / bits; i <= last; ++i) {
        const int pos = i * bits - 32 * w;
        const uint32_t val = q_idx[r * D + i];
        word |= pos >= 0 ? val << pos : val >> -pos;
      }
    } else {
      float lsq = 0.0f;
      for (int k2 = 0; k2 < QNW; ++k2) {
        lsq += q_red[r * QNW + k2];
      }
      word = AS_UINT(norm[r] / SQRT(lsq));
    }
    out[row * (W + 1) + w] = word;
  }
}
if (RW > 0 && j < D) {
  auto win = is_v ? v_win : k_win;
  auto win_out = is_v ? v_win_out : k_win_out;
  for (int r = 0; r < ROWS && row0 + r < n_rows; ++r) {
    const int base = (row0 + r) * RW;
    for (int w = 0; w + 1 < RW; ++w) {
      win_out[(base + w) * D + j] = win[(base + w + 1) * D + j];
    }
    win_out[(base + RW - 1) * D + j] = is_v ? v[TQ_QX(v_strides, row0 + r)] : k[TQ_QX(k_strides, row0 + r)];
  }
}
