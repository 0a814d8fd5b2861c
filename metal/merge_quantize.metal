// merge.metal's launch that also quantises a decode step's new key and value (quantize.metal
// folded in: a layer's step makes one launch fewer). Threadgroups [0, q_first) merge as
// merge.metal, the exact window kr, vr [B, Hkv, W, D] T from before this step (contiguous)
// and the step's key and value k_new, v_new [B, Hkv, 1, D] T (strided) its newest row; the
// 2 * B * Hkv after them quantise k_new and v_new as quantize.metal (ROWS 1, RW = W) into
// k_out, v_out [B * Hkv, WK + 1], [B * Hkv, WV + 1] uint32 and shift the window into
// k_win_out, v_win_out [B, Hkv, W, D] T.
// qc: float, the constants: rt (D floats when POW2, else D * D), k_levels, k_bounds,
// v_levels, v_bounds (2^KB, 2^KB - 1, 2^VB, 2^VB - 1), rt_t (as rt), the attention's scale;
// k_off: [B, Hkv, 1, D] float, contiguous; qscale: [B * Hkv, D] float, the keys' channel
// scale (read when SCALE).
constexpr int RTN = POW2 ? D : D * D;
const auto rt_t = qc + RTN + 2 * (1 << KB) - 1 + 2 * (1 << VB) - 1;
const auto scale = rt_t + RTN;
#define TQ_NEW_K(d)                                                                    \
  static_cast<float>(                                                                  \
      k_new[b * k_new_strides[0] + h * k_new_strides[1] + (d) * k_new_strides[3]])
#define TQ_NEW_V(d)                                                                    \
  static_cast<float>(                                                                  \
      v_new[b * v_new_strides[0] + h * v_new_strides[1] + (d) * v_new_strides[3]])
if (static_cast<int>(TGID.x) >= ml_shape[0] * ml_shape[2]) {
  const int q_first = ml_shape[0] * ml_shape[2];
  const auto k = k_new;
  const auto v = v_new;
  const auto k_shape = k_new_shape;
  const auto k_strides = k_new_strides;
  const auto v_strides = v_new_strides;
  const auto rt = qc;
  const auto k_levels = qc + RTN;
  const auto k_bounds = k_levels + (1 << KB);
  const auto v_levels = k_bounds + (1 << KB) - 1;
  const auto v_bounds = v_levels + (1 << VB);
  const auto offset = k_off;
  const auto scale = qscale;
  const auto k_win = kr;
  const auto v_win = vr;
