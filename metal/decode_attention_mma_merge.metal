// The end of decode_attention_mma.metal's body in the launch that also merges (CUDA only,
// kernels.PARTS): the last threadgroup of a head's block of rows to finish does merge.metal's
// work for the block, so that a layer's decode attention is one launch, not two. Each
// SIMD-group merges one row's splits (their max and sum staged a split a lane, then
// broadcast), attends the row's RECENT exact keys (its WINDOW newest positions; MCAUSAL: the
// mask's causal flag), rotates back and casts into out.
// Further inputs: rt_t, kr, vr, k_off as merge.metal's; counters: [B * Hkv * blocks] int32,
// finished threadgroups, zeroed for each launch (the last threadgroup also sets its slot back).
// Further output: out [B * Hkv, GL, D] T (= [B, Hq, L, D]).
{
  SHARED int is_last;
  TQ_FENCE();  // (this threadgroup's o and ml, seen by whichever threadgroup is last)
  BARRIER();
  const int slot = bh * NTG.z + TGID.z;
  const auto count = const_cast<int*>(reinterpret_cast<const int*>(counters)) + slot;
  if (TID == 0) {
    is_last = TQ_ATOMIC_ADD(count, 1) == int(NTG.x) - 1;
  }
  BARRIER();
  if (!is_last) {
    return;
  }
  TQ_FENCE();
  const int n = NTG.x;
  constexpr int DJ = (D + 31) / 32;  // a lane's dims: LANE + 32 j
  for (int r = WARP; r < rows; r += NW) {
    const int row = row0 + r;
    const auto mlr = ml + (bh * n * GL + row) * 2;  // split s at mlr[s * GL * 2]
    const auto orow = o + (bh * n * GL + row) * D;  // split s at orow[s * GL * D]
    float mt = NEG_INF;
    for (int s = LANE; s < n; s += 32) {
      const float m = TQ_LDCG(mlr + s * GL * 2);
      mt = m > mt ? m : mt;
    }
    mt = WARP_MAX(mt);
    float num[DJ];
    float ex[DJ];
    UNROLL for (int j = 0; j < DJ; ++j) {
      num[j] = 0.0f;
      ex[j] = 0.0f;
    }
    float den = 0.0f;
    for (int s0 = 0; s0 < n; s0 += 32) {
      // 32 splits' weights, one a lane, then broadcast split by split.
      float w = 0.0f;
      if (s0 + LANE < n) {
        const float m = TQ_LDCG(mlr + (s0 + LANE) * GL * 2);
        // A split that saw no key (max -inf) adds nothing.
        w = m == NEG_INF ? 0.0f : EXP(m - mt);
        den += w * TQ_LDCG(mlr + (s0 + LANE) * GL * 2 + 1);
      }
      const int count32 = n - s0 < 32 ? n - s0 : 32;
      for (int t = 0; t < count32; ++t) {
        const float wt = TQ_SHFL(w, t);
        UNROLL for (int j = 0; j < DJ; ++j) {
          const int d = LANE + 32 * j;
          num[j] += d < D ? wt * TQ_LDCG(orow + (s0 + t) * GL * D + d) : 0.0f;
        }
      }
    }
    den = WARP_SUM(den);
    if (RECENT) {
      // Query i of L attends recent rows e >= i + E - L - WINDOW + 1 exactly (its WINDOW
      // newest positions; older ones packed) and, causal, positions up to S - L + i.
      const int E = kr_shape[2];
      const int i = row % L;
      const int head = h * G + row / L;
      const auto qp = q + b * q_strides[0] + head * q_strides[1] + i * q_strides[2];
      const auto krp = kr + b * kr_strides[0] + h * kr_strides[1];
      const auto vrp = vr + b * vr_strides[0] + h * vr_strides[1];
      const auto mp = k_off + b * k_off_strides[0] + h * k_off_strides[1];
      float qd[DJ];
      float mu[DJ];
      UNROLL for (int j = 0; j < DJ; ++j) {
        const int d = LANE + 32 * j;
        qd[j] = d < D ? static_cast<float>(qp[d * q_strides[3]]) * q_scale : 0.0f;
        mu[j] = d < D ? mp[d * k_off_strides[3]] : 0.0f;
      }
      float m = mt;
      for (int e = 0; e < E; ++e) {
        float part = 0.0f;
        float vd[DJ];
        UNROLL for (int j = 0; j < DJ; ++j) {
          const int d = LANE + 32 * j;
          const float kd = d < D ? static_cast<float>(krp[e * kr_strides[2] + d * kr_strides[3]]) : 0.0f;
          vd[j] = d < D ? static_cast<float>(vrp[e * vr_strides[2] + d * vr_strides[3]]) : 0.0f;
          part += qd[j] * (kd - mu[j]);
        }
        const float sc = WARP_SUM(part);
        if (e >= i + E - L - WINDOW + 1 && (!MCAUSAL || e <= E - L + i)) {
          // (A NaN score is no max but spoils the sums, as in an fp16 cache.)
          const float mc = sc > m ? sc : m;
          const float shift = mc == NEG_INF ? 0.0f : mc;
          const float alpha = m == NEG_INF ? 0.0f : EXP(m - shift);
          const float p = EXP(sc - shift);
          den = den * alpha + p;
          UNROLL for (int j = 0; j < DJ; ++j) {
            num[j] *= alpha;
            ex[j] = ex[j] * alpha + p * vd[j];
          }
          m = mc;
        }
      }
    }
    // Back from the rotated space: z @ rt^T.
    float z[DJ];
    if (POW2) {
      // (z H) * s / sqrt(D): butterflies across lanes (h < 32), then across a lane's dims.
      UNROLL for (int hh = 1; hh < 32 && hh < D; hh *= 2) {
        UNROLL for (int j = 0; j < DJ; ++j) {
          const float other = TQ_SHFL_XOR(num[j], hh);
          num[j] = (LANE & hh) ? other - num[j] : num[j] + other;
        }
      }
      UNROLL for (int hj = 1; hj < DJ; hj *= 2) {
        UNROLL for (int j = 0; j < DJ; ++j) {
          if (!(j & hj)) {
            const float a = num[j];
            num[j] = a + num[j + hj];
            num[j + hj] = a - num[j + hj];
          }
        }
      }
      UNROLL for (int j = 0; j < DJ; ++j) {
        const int d = LANE + 32 * j;
        z[j] = d < D ? num[j] * TQ_SIGN(rt_t[d]) : 0.0f;
      }
    } else {
      UNROLL for (int j = 0; j < DJ; ++j) {
        z[j] = 0.0f;
      }
      UNROLL for (int jz = 0; jz < DJ; ++jz) {
        for (int t = 0; t < 32; ++t) {
          const float zi = TQ_SHFL(num[jz], t);
          const int at = 32 * jz + t;
          UNROLL for (int j = 0; j < DJ; ++j) {
            const int d = LANE + 32 * j;
            z[j] += at < D && d < D ? zi * rt_t[at * D + d] : 0.0f;
          }
        }
      }
    }
    UNROLL for (int j = 0; j < DJ; ++j) {
      const int d = LANE + 32 * j;
      if (d < D) {
        out[(bh * GL + row) * D + d] = static_cast<T>((z[j] + ex[j]) / den);
      }
    }
  }
  if (TID == 0) {
    *count = 0;
  }
}
