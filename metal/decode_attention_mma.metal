// Split-K attention in the rotated space on the matrix units: CUDA only (mma.sync
// m16n8k16, fp16 in, fp32 accumulate; TQ_MMA and the lane exchanges are defined by the CUDA
// prelude and the CPU emulator, not by the Metal one: a Mac runs decode_attention.metal).
// Same inputs, outputs and template constants as decode_attention.metal, but for TILE and R:
// NW SIMD-groups per threadgroup, each SIMD-group one split of the keys, R = 8 query rows.
// Per 32 keys a SIMD-group computes S^T = K Q^T (keys x rows) and O^T += V^T P^T (dims x
// rows) with the packed codes decoded straight into the mma's operand registers: a lane
// reads its own words of each key row (no tile copy, no barrier in the loop) and looks each
// pair of codes up in a table of half2 level pairs (one copy per lane: no bank conflict).
// The dims of the score mma's reduction and of the value mma's rows are permuted so that a
// lane's codes are contiguous bits (the same permutation on both operands; the output is
// written back in order). fp16 cannot overflow: each query row is divided by a power of two
// >= its largest element (its scores multiplied back in fp32), and the weights p * scale_v
// by a running power of two >= the largest value scale seen (the accumulators rescaled when
// it grows, as for the softmax max).
// q: [B, Hq, L, D] T (strided); row = g * L + i of KV head h holds query head h * G + g
// k, v: [B, Hkv, S, WK + 1], [B, Hkv, S, WV + 1] uint32 views (strided along S); KB == VB
// rt: [D, D] float (rotate(x) = x @ rt), when POW2 the signs [D]; scale: [1] float
// qscale: [B, Hkv, 1, D] float (strided), read only when SMOOTH
// k_levels, v_levels: [2^KB] float, the same levels (KB == VB)
// starts: [B] int32, each batch row's first visible key
// o: [B * Hkv, n_splits, GL, D] float, unnormalised; ml: [B * Hkv, n_splits, GL, 2] (max, sum),
// one split per threadgroup (its NW SIMD-groups' splits merged at the end)
constexpr int NT = NW * 32;
constexpr int R = 8;
constexpr int NCH = D / 16;
// A key's lane segment: D / 4 dims, SK bits from bit c * SK; a value's lane span: D / 8
// dims, SV bits from bit g * SV. LK / LV words cover any start, NK / NV hold it aligned.
constexpr int SK = D / 4 * KB;
constexpr int SV = D / 8 * VB;
constexpr int NK = (SK + 31) / 32;
constexpr int NV = (SV + 31) / 32;
constexpr int LK = SK % 32 == 0 ? NK : NK + 1;
constexpr int LV = SV % 32 == 0 ? NV : NV + 1;
constexpr int PAIRS = 1 << (2 * KB);
constexpr int TABLE = PAIRS * 32;
constexpr int QBUF = 2 * R * D;
constexpr int RED = NW * R * D;  // the SIMD-groups' accumulators, merged at the end
constexpr int SMEM = TABLE > QBUF ? (TABLE > RED ? TABLE : RED) : (QBUF > RED ? QBUF : RED);
SHARED uint32_t smem[SMEM];
SHARED float levels[1 << KB];
SHARED float stats[NW * R * 3];  // each SIMD-group's (max, sum, weight) of each row
SHARED_PTR(float) ps = reinterpret_cast<SHARED_PTR(float)>(smem);
SHARED_PTR(float) qs = ps + R * D;

const int n_kv = k_shape[1];
// The last TAIL rows are left out (a cache's exact window, read by the merge).
const int S = k_shape[2] > TAIL ? k_shape[2] - TAIL : 0;
const int G = q_shape[1] / n_kv;
const int L = q_shape[2];
const int GL = G * L;
const int n_splits = NTG.x * NW;  // SIMD-groups over the keys
const int split = TGID.x * NW + WARP;
const int bh = TGID.y;
const int b = bh / n_kv;
const int first = starts[b * starts_strides[0]];
const int h = bh % n_kv;
const int row0 = TGID.z * R;
auto kp = k + b * k_strides[0] + h * k_strides[1];
auto vp = v + b * v_strides[0] + h * v_strides[1];
// (32-bit offsets within a head: S * (WK + 1) < 2^31)
const int k_row = k_strides[2];
const int v_row = v_strides[2];
const int g = LANE / 4;
const int c = LANE % 4;

// Scaled queries in ps, rotated into qs (as decode_attention.metal: every load first).
constexpr int QN = (R * D + NT - 1) / NT;
float qx[QN];
float qf[QN];
bool qin[QN];
UNROLL for (int u = 0; u < QN; ++u) {
  const int f = TID + u * NT;
  const int row = row0 + f / D;
  const int dim = f % D;
  const bool in = f < R * D && row < GL;
  qin[u] = in;
  const auto qi = b * q_strides[0] + (h * G + row / L) * q_strides[1] + (row % L) * q_strides[2];
  qx[u] = static_cast<float>(q[in ? qi + dim * q_strides[3] : 0]);
  qf[u] = SMOOTH ? qscale[b * qscale_strides[0] + h * qscale_strides[1] + dim * qscale_strides[3]] : 1.0f;
  qf[u] *= POW2 ? TQ_SIGN(rt[dim]) : 1.0f;
}
const float q_scale = scale[0];
// (The levels with the queries' loads: the table below is built from threadgroup memory.)
const float level = TID < (1 << KB) ? k_levels[TID] : 0.0f;
if (TID < (1 << KB)) {
  levels[TID] = level;
}
UNROLL for (int u = 0; u < QN; ++u) {
  const int f = TID + u * NT;
  if (f < R * D) {
    ps[f] = qin[u] ? qx[u] * q_scale * qf[u] : 0.0f;
  }
}
BARRIER();
if (POW2) {
  TQ_FWHT(ps, R, TID, NT)
  for (int f = TID; f < R * D; f += NT) {
    qs[f] = ps[f];
  }
} else {
  for (int j = TID; j < D; j += NT) {
    float y[R];
    for (int r = 0; r < R; ++r) {
      y[r] = 0.0f;
    }
    TQ_MATVEC(y, ps, rt, j, R)
    for (int r = 0; r < R; ++r) {
      qs[r * D + j] = y[r];
    }
  }
}
BARRIER();

// The score mma's B operand (Q^T, dims x rows) for row g of the block: chunk j of lane c
// holds dims c * D / 4 + 4j + {0, 1} (k slots 2c, 2c + 1) and + {2, 3} (2c + 8, 2c + 9),
// divided by a power of two >= the row's largest |element|.
float qmax = 0.0f;
for (int d = 0; d < D / 4; ++d) {
  const float a = qs[g * D + c * (D / 4) + d];
  const float m = a < 0.0f ? -a : a;
  qmax = m > qmax ? m : qmax;
}
UNROLL for (int x = 1; x < 4; x *= 2) {
  const float other = TQ_SHFL_XOR(qmax, x);
  qmax = other > qmax ? other : qmax;
}
// 2^e > qmax (1 for a zero row or a non-finite one: its scores come out non-finite anyway).
// 2^e as float bits, e in [-126, 127] (TQ_POW2).
#define TQ_POW2(e) AS_FLOAT(uint32_t((e) + 127) << 23)
const int qe = (int)((AS_UINT(qmax) >> 23) & 255) - 126;
const float qunit = qmax > 0.0f && qmax < 3.0e38f ? TQ_POW2(qe < 127 ? qe : 127) : 1.0f;
const float qinv = 1.0f / qunit;  // (exact: a power of two)
uint32_t qb[NCH][2];
UNROLL for (int j = 0; j < NCH; ++j) {
  const int d = g * D + c * (D / 4) + 4 * j;
  qb[j][0] = TQ_H2(qs[d] * qinv, qs[d + 1] * qinv);
  qb[j][1] = TQ_H2(qs[d + 2] * qinv, qs[d + 3] * qinv);
}
// This lane's score columns are rows 2c and 2c + 1: their units and last keys.
const float unit0 = TQ_SHFL(qunit, 8 * c);
const float unit1 = TQ_SHFL(qunit, 8 * c + 4);
// (Opaque: else the compiler recomputes the remainders in the loop.)
const int last0 = int(TQ_OPAQUE(uint32_t(CAUSAL ? S - L + (row0 + 2 * c) % L : S)));
const int last1 = int(TQ_OPAQUE(uint32_t(CAUSAL ? S - L + (row0 + 2 * c + 1) % L : S)));
BARRIER();
// The pair table: entry e = (level[e % 2^KB], level[e / 2^KB]) as half2, copy LANE at
// word e * 32 + LANE (bank LANE): TQ_ENTRY(x) reads the entry at byte offset x = e * 128 +
// 4 * LANE, formed from the code bits by one shift and one mask (TQ_AT).
// (Four copies a 16-byte store.)
for (int f = TID; f < TABLE / 4; f += NT) {
  const int e = f / 8;
  const uint32_t x = TQ_H2(levels[e & ((1 << KB) - 1)], levels[e >> KB]);
  reinterpret_cast<SHARED_PTR(uint4)>(smem)[f] = uint4{x, x, x, x};
}
BARRIER();

// This SIMD-group's keys: 32 a step (the causal end: the last key a row of the block sees).
const int steps = (S + 31) / 32;
const int per_split = 32 * ((steps + n_splits - 1) / n_splits);
const int begin = split * per_split;
int end = begin + per_split < S ? begin + per_split : S;
int stop = 0;
for (int r = 0; r < R; ++r) {
  const int last = CAUSAL ? S - L + (row0 + r) % L : S;
  stop = row0 + r < GL && last + 1 > stop ? last + 1 : stop;
}
end = CAUSAL && stop < end ? stop : end;

float acc[NCH][4];
UNROLL for (int i = 0; i < NCH; ++i) {
  UNROLL for (int x = 0; x < 4; ++x) {
    acc[i][x] = 0.0f;
  }
}
float m0 = NEG_INF;
float m1 = NEG_INF;
float l0 = 0.0f;
float l1 = 0.0f;
int vexp = -126;  // the weights' unit 2^vexp (vexp in [-126, 128])
// (Opaque, so that the compiler ORs it in with the mask: one LOP3 an entry, not two.)
const uint32_t lane4 = TQ_OPAQUE(4 * LANE);
#define TQ_ENTRY(x) (*reinterpret_cast<SHARED_PTR(uint32_t)>(reinterpret_cast<SHARED_PTR(char)>(smem) + (x)))
// The n-bit field at bit `bit` of words w, shifted to bit `at`.
#define TQ_AT(w, bit, n, at) \
  (((bit) % 32 + (n) > 32) ? TQ_FIELD(w, bit, n) << (at) \
   : (((bit) % 32 >= (at) ? (w)[(bit) / 32] >> ((bit) % 32 - (at)) : (w)[(bit) / 32] << ((at) - (bit) % 32)) & (((1u << (n)) - 1) << (at))))
// This lane's words of a row (a key's segment, a value's span) and the scale words; row
// offsets are unsigned, a key past the end reads the last one (masked below).
const auto k_seg = kp + (c * SK) / 32;
const auto k_scale = kp + WK;
const auto v_span = vp + (g * SV) / 32;
const auto v_scale = vp + WV;
const uint32_t k_last = (end - 1) * k_row;
const uint32_t v_last = (end - 1) * v_row;
// Software-pipelined: a step's loads are issued one step ahead, before the previous step's
// math, so their latency hides behind it (the loop starts a step early and only loads;
// a split without keys runs none: k_last needs end >= 1). The step after the last reads
// the last row again (clamped), unused.
uint32_t nkw[2][2][NK];
float nks[2][2];
float nvs[2][2];
uint32_t nvw[2][4][NV];
for (int t0 = begin < end ? begin - 32 : end; t0 < end; t0 += 32) {
  uint32_t kw[2][2][NK];
  float ks[2][2];
  float vs[2][2];
  uint32_t vw[2][4][NV];
  UNROLL for (int u = 0; u < 2; ++u) {
    UNROLL for (int y = 0; y < 2; ++y) {
      UNROLL for (int w = 0; w < NK; ++w) {
        kw[u][y][w] = nkw[u][y][w];
      }
      ks[u][y] = nks[u][y];
      vs[u][y] = nvs[u][y];
    }
    UNROLL for (int y = 0; y < 4; ++y) {
      UNROLL for (int w = 0; w < NV; ++w) {
        vw[u][y][w] = nvw[u][y][w];
      }
    }
  }
  // The next step's loads. Row offsets: score keys g and g + 8 of each 16 (their value
  // scales too), value keys 2c, 2c + 1, 2c + 8 and 2c + 9.
  const uint32_t k0 = (t0 + 32 + g) * k_row;
  const uint32_t s0 = (t0 + 32 + g) * v_row;
  const uint32_t v0 = (t0 + 32 + 2 * c) * v_row;
  UNROLL for (int u = 0; u < 2; ++u) {
    UNROLL for (int y = 0; y < 2; ++y) {
      uint32_t ka = k0 + (16 * u + 8 * y) * k_row;
      uint32_t sa = s0 + (16 * u + 8 * y) * v_row;
      ka = ka < k_last ? ka : k_last;
      sa = sa < v_last ? sa : v_last;
      const auto kr = k_seg + ka;
      uint32_t raw[LK];
      UNROLL for (int w = 0; w < LK; ++w) {
        raw[w] = kr[w];
      }
      UNROLL for (int w = 0; w < NK; ++w) {
        nkw[u][y][w] = SK % 32 == 0 ? raw[w] : TQ_FUNNEL(raw[w], raw[w + (LK > NK)], (c * SK) % 32);
      }
      nks[u][y] = AS_FLOAT(k_scale[ka]);
      nvs[u][y] = AS_FLOAT(v_scale[sa]);
    }
    UNROLL for (int y = 0; y < 4; ++y) {
      uint32_t va = v0 + (16 * u + (y & 1) + 8 * (y >> 1)) * v_row;
      va = va < v_last ? va : v_last;
      const auto vr = v_span + va;
      uint32_t raw[LV];
      UNROLL for (int w = 0; w < LV; ++w) {
        raw[w] = vr[w];
      }
      UNROLL for (int w = 0; w < NV; ++w) {
        nvw[u][y][w] = SV % 32 == 0 ? raw[w] : TQ_FUNNEL(raw[w], raw[w + (LV > NV)], (g * SV) % 32);
      }
    }
  }
  if (t0 < begin) {
    continue;  // (the first loads only)
  }

  // Scores: s[u][0..3] = key g, rows 2c, 2c + 1; key g + 8, rows 2c, 2c + 1 (tile u).
  float s[2][4];
  UNROLL for (int u = 0; u < 2; ++u) {
    UNROLL for (int x = 0; x < 4; ++x) {
      s[u][x] = 0.0f;
    }
    UNROLL for (int j = 0; j < NCH; ++j) {
      uint32_t a[4];
      a[0] = TQ_ENTRY(TQ_AT(kw[u][0], 2 * j * 2 * KB, 2 * KB, 7) | lane4);
      a[1] = TQ_ENTRY(TQ_AT(kw[u][1], 2 * j * 2 * KB, 2 * KB, 7) | lane4);
      a[2] = TQ_ENTRY(TQ_AT(kw[u][0], (2 * j + 1) * 2 * KB, 2 * KB, 7) | lane4);
      a[3] = TQ_ENTRY(TQ_AT(kw[u][1], (2 * j + 1) * 2 * KB, 2 * KB, 7) | lane4);
      TQ_MMA(s[u], a, qb[j], s[u]);
    }
  }
  // Scaled and masked; the block's max of each row, over the 8 lanes that hold it.
  float mb0 = NEG_INF;
  float mb1 = NEG_INF;
  bool seen[2][4];
  UNROLL for (int u = 0; u < 2; ++u) {
    UNROLL for (int x = 0; x < 4; ++x) {
      const int key = t0 + 16 * u + g + 8 * (x >> 1);
      const bool odd = x & 1;
      seen[u][x] = key < end && key >= first && key <= (odd ? last1 : last0);
      s[u][x] = seen[u][x] ? s[u][x] * ks[u][x >> 1] * (odd ? unit1 : unit0) : NEG_INF;
    }
    mb0 = s[u][0] > mb0 ? s[u][0] : mb0;
    mb0 = s[u][2] > mb0 ? s[u][2] : mb0;
    mb1 = s[u][1] > mb1 ? s[u][1] : mb1;
    mb1 = s[u][3] > mb1 ? s[u][3] : mb1;
  }
  // The largest value scale of the step (over the 8 lanes of each column: all 32 keys).
  // A value row with a non-finite scale spoils the rows that see it (NaN), as in an fp16
  // cache, and adds nothing to the others (its weight 0, not 0 * inf).
  float vmax = 0.0f;
  UNROLL for (int u = 0; u < 2; ++u) {
    UNROLL for (int y = 0; y < 2; ++y) {
      const float a = vs[u][y] < 0.0f ? -vs[u][y] : vs[u][y];
      const bool finite = a < 3.0e38f;
      vmax = finite && a > vmax ? a : vmax;
      vs[u][y] = finite ? vs[u][y] : AS_FLOAT(0x7fc00000u);
    }
  }
  UNROLL for (int x = 4; x < 32; x *= 2) {
    float other = TQ_SHFL_XOR(mb0, x);
    mb0 = other > mb0 ? other : mb0;
    other = TQ_SHFL_XOR(mb1, x);
    mb1 = other > mb1 ? other : mb1;
    other = TQ_SHFL_XOR(vmax, x);
    vmax = other > vmax ? other : vmax;
  }
  const float n0 = mb0 > m0 ? mb0 : m0;
  const float n1 = mb1 > m1 ? mb1 : m1;
  // A row that has seen no key keeps m = -inf; shift by 0 so exp gives 0, not NaN.
  const float sh0 = n0 == NEG_INF ? 0.0f : n0;
  const float sh1 = n1 == NEG_INF ? 0.0f : n1;
  const int ve = vmax > 0.0f ? (int)((AS_UINT(vmax) >> 23) & 255) - 126 : -126;
  const int vnew = ve > vexp ? ve : vexp;
  // (Older weights shrunk below 2^-126 of the new unit: 0.)
  const float shrink = vexp - vnew < -126 ? 0.0f : TQ_POW2(vexp - vnew);
  const float inv = TQ_POW2(vnew < 126 ? -vnew : -126);
  vexp = vnew;
  const float f0 = TQ_EXP(m0 - sh0);
  const float f1 = TQ_EXP(m1 - sh1);
  m0 = n0;
  m1 = n1;
  l0 *= f0;
  l1 *= f1;
  UNROLL for (int i = 0; i < NCH; ++i) {
    acc[i][0] *= f0 * shrink;
    acc[i][1] *= f1 * shrink;
    acc[i][2] *= f0 * shrink;
    acc[i][3] *= f1 * shrink;
  }
  UNROLL for (int u = 0; u < 2; ++u) {
    float pv[4];
    UNROLL for (int x = 0; x < 4; ++x) {
      const float p = TQ_EXP(s[u][x] - (x & 1 ? sh1 : sh0));
      if (x & 1) {
        l1 += p;
      } else {
        l0 += p;
      }
      pv[x] = seen[u][x] ? p * vs[u][x >> 1] * inv : 0.0f;
    }
    // P^T for the value mma: lane (g, c) needs row g of keys 2c, 2c + 1 (b0, b1) and
    // 2c + 8, 2c + 9 (b2, b3), held by lanes (2c, g / 2) and (2c + 1, g / 2).
    const uint32_t even = TQ_H2(pv[0], pv[2]);
    const uint32_t odd = TQ_H2(pv[1], pv[3]);
    const int src = 8 * c + g / 2;
    const uint32_t ea = TQ_SHFL(even, src);
    const uint32_t oa = TQ_SHFL(odd, src);
    const uint32_t eb = TQ_SHFL(even, src + 4);
    const uint32_t ob = TQ_SHFL(odd, src + 4);
    const uint32_t xa = g & 1 ? oa : ea;
    const uint32_t xb = g & 1 ? ob : eb;
    uint32_t pb[2];
    pb[0] = TQ_PERM(xa, xb, 0x5410);
    pb[1] = TQ_PERM(xa, xb, 0x7632);
    // V^T: dim slot g of tile i is dim (D / 8) g + 2i, slot g + 8 the next; a pair holds
    // one dim of keys 2c and 2c + 1 (a0..a3) or 2c + 8 and 2c + 9 (a4..a7).
    // 4 bits: the pairs' codes interleaved a word at a time (x: even dims, y: odd dims;
    // byte b of word w of x = dim 8w + 2b of both keys), then one byte per pair.
    uint32_t xy[2][2][NV];
    if (VB == 4) {
      UNROLL for (int y = 0; y < 2; ++y) {
        UNROLL for (int w = 0; w < NV; ++w) {
          const uint32_t lo = vw[u][2 * y][w];
          const uint32_t hi = vw[u][2 * y + 1][w];
          xy[y][0][w] = (lo & 0x0f0f0f0fu) | ((hi << 4) & 0xf0f0f0f0u);
          xy[y][1][w] = ((lo >> 4) & 0x0f0f0f0fu) | (hi & 0xf0f0f0f0u);
        }
      }
    }
    UNROLL for (int i = 0; i < NCH; ++i) {
      uint32_t a[4];
      UNROLL for (int y = 0; y < 2; ++y) {
        UNROLL for (int z = 0; z < 2; ++z) {
          const int bit = (2 * i + z) * VB;
          if (VB == 4) {
            a[2 * y + z] = TQ_ENTRY(TQ_AT(xy[y][z], 8 * i, 8, 7) | lane4);
          } else {
            const uint32_t lo = TQ_AT(vw[u][2 * y], bit, VB, 7) | lane4;
            a[2 * y + z] = TQ_ENTRY(TQ_AT(vw[u][2 * y + 1], bit, VB, 7 + VB) | lo);
          }
        }
      }
      TQ_MMA(acc[i], a, pb, acc[i]);
    }
  }
}

// The rows' sums over the 8 lanes that hold them.
UNROLL for (int x = 4; x < 32; x *= 2) {
  l0 += TQ_SHFL_XOR(l0, x);
  l1 += TQ_SHFL_XOR(l1, x);
}
// The threadgroup's NW splits merged into one (the merge kernel reads NW times fewer):
// each SIMD-group's rows rescaled to the rows' common max, summed in threadgroup memory.
if (g == 0) {
  stats[(WARP * R + 2 * c) * 3] = m0;
  stats[(WARP * R + 2 * c) * 3 + 1] = l0;
  stats[(WARP * R + 2 * c + 1) * 3] = m1;
  stats[(WARP * R + 2 * c + 1) * 3 + 1] = l1;
}
const float unit = TQ_POW2(vexp < 127 ? vexp : 127);
BARRIER();  // (every SIMD-group done with the table, which the sums overwrite)
float mt0 = NEG_INF;
float mt1 = NEG_INF;
for (int w = 0; w < NW; ++w) {
  const float a = stats[(w * R + 2 * c) * 3];
  const float b = stats[(w * R + 2 * c + 1) * 3];
  mt0 = a > mt0 ? a : mt0;
  mt1 = b > mt1 ? b : mt1;
}
// (A SIMD-group that saw no key adds nothing: its accumulators are 0, its max -inf.)
const float f0 = m0 == NEG_INF ? 0.0f : TQ_EXP(m0 - mt0);
const float f1 = m1 == NEG_INF ? 0.0f : TQ_EXP(m1 - mt1);
if (g == 0) {
  stats[(WARP * R + 2 * c) * 3 + 2] = f0;
  stats[(WARP * R + 2 * c + 1) * 3 + 2] = f1;
}
SHARED_PTR(float) red = reinterpret_cast<SHARED_PTR(float)>(smem);  // [NW][R][D]
UNROLL for (int i = 0; i < NCH; ++i) {
  const int d = (D / 8) * g + 2 * i;
  red[(WARP * R + 2 * c) * D + d] = acc[i][0] * (f0 * unit);
  red[(WARP * R + 2 * c) * D + d + 1] = acc[i][2] * (f0 * unit);
  red[(WARP * R + 2 * c + 1) * D + d] = acc[i][1] * (f1 * unit);
  red[(WARP * R + 2 * c + 1) * D + d + 1] = acc[i][3] * (f1 * unit);
}
BARRIER();
const int rows = GL - row0 < R ? GL - row0 : R;
const int base = (bh * NTG.x + TGID.x) * GL + row0;
for (int f = TID; f < rows * D; f += NT) {
  float sum = 0.0f;
  UNROLL for (int w = 0; w < NW; ++w) {
    sum += red[w * R * D + f];
  }
  o[base * D + f] = sum;
}
if (TID < rows) {
  float lt = 0.0f;
  for (int w = 0; w < NW; ++w) {
    lt += stats[(w * R + TID) * 3 + 2] * stats[(w * R + TID) * 3 + 1];
  }
  // (every SIMD-group's max of the row is in stats: the largest, as mt0 / mt1 above)
  float mt = NEG_INF;
  for (int w = 0; w < NW; ++w) {
    mt = stats[(w * R + TID) * 3] > mt ? stats[(w * R + TID) * 3] : mt;
  }
  ml[(base + TID) * 2] = mt;
  ml[(base + TID) * 2 + 1] = lt;
}
