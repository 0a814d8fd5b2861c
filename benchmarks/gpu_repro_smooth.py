"""Diagnosis (H100): fused attention vs float64 truth with smoothed keys and L > 1.

Seen on the H100 (2026-11-22, first session): with smoothed keys and L > 1 (causal prefill)
the fused kernel disagreed with the reference by 0.3-350x relative, differently from run to
run; L = 1 agreed. This script separates the suspects, each against a float64 NumPy truth
computed from the dequantised keys and values:

  fused/smooth      the kernel on q * s (computed by _smooth_queries, lazily)
  fused/pre-eval    the kernel on q * s evaluated beforehand, keys without channel_scale
  fused/temp        the kernel on a lazily computed q (q * 1.0), keys without channel_scale
  fused/persistent  the kernel on an evaluated q, keys without channel_scale
  ops               the plain-MLX reference

Run on the GPU as in ../shared/gpu/README.md: python3 benchmarks/gpu_repro_smooth.py
"""

from dataclasses import replace

import mlx.core as mx
import numpy as np

import mlx_tq.attention as A
from mlx_tq import patch
from mlx_tq.cache import TurboQuantKVCache
from mlx_tq.quant import dequantize, quantize_rows, quantize_rows_ops


def truth(q, keys, values, scale, causal):
    k = np.array(dequantize(keys).astype(mx.float32), np.float64)
    v = np.array(dequantize(values).astype(mx.float32), np.float64)
    qn = np.array(q.astype(mx.float32), np.float64)
    B, Hq, L, D = qn.shape
    G = Hq // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = qn @ k.swapaxes(-1, -2) * scale
    S = k.shape[2]
    if causal:
        s = np.where(np.arange(S)[None] <= np.arange(S - L, S)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def rel(a, b):
    a = np.array(a.astype(mx.float32), np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


patch()
mx.random.seed(0)
# The smoothed cache quantises k / s, a float32 array: check the kernel on float32 rows.
for D in (64, 128, 256):
    x = mx.random.normal((1, 2, 777, D)) * mx.linspace(0.1, 5, D)
    off = mx.mean(x, axis=2, keepdims=True)
    for rep in range(2):
        a, b = quantize_rows(x, 4, 0, off), quantize_rows_ops(x, 4, 0, off)
        same = (a[..., :-1] == b[..., :-1]).mean().item()
        sa, sb = a[..., -1:].view(mx.float32), b[..., -1:].view(mx.float32)
        print(f"quantise float32 D={D} rep={rep}: words equal {same:.5f}, "
              f"scale rel {(mx.abs(sa - sb).max() / mx.abs(sb).max()).item():.2e}", flush=True)
for D, Hq, Hkv, S, L, sm in [
    (128, 12, 2, 2048, 64, 0.5),
    (128, 12, 2, 2048, 64, 0.0),
    (128, 8, 2, 300, 5, 0.5),
    (128, 32, 8, 4097, 1, 0.5),
    (256, 4, 1, 1000, 37, 0.5),
]:
    c = TurboQuantKVCache(4, 4, smooth_keys=sm)
    k = (mx.random.normal((1, Hkv, S, D)) * mx.linspace(0.1, 5, D) + 2).astype(mx.float16)
    v = mx.random.normal((1, Hkv, S, D)).astype(mx.float16)
    keys, values = c.update_and_fetch(k, v)
    c._pending = False
    q = mx.random.normal((1, Hq, L, D)).astype(mx.float16)
    mx.eval(keys.data, values.data, keys.offset, q)
    if keys.channel_scale is not None:
        mx.eval(keys.channel_scale)
    causal = L > 1
    mask = "causal" if causal else None
    scale = D**-0.5
    t = truth(q, keys, values, scale, causal)
    plain = replace(keys, channel_scale=None)
    qs = A._smooth_queries(q, keys)
    mx.eval(qs)
    row = f"D={D} Hq={Hq} Hkv={Hkv} S={S} L={L} smooth={sm}:"
    for rep in range(3):
        res = {
            "fused/smooth": A._fused_attention(A._smooth_queries(q, keys), keys, values, scale, causal),
            "fused/pre-eval": A._fused_attention(qs, plain, values, scale, causal),
            "fused/temp": A._fused_attention(qs * 1.0, plain, values, scale, causal),
            "fused/persistent-unsmoothed-q": A._fused_attention(q, plain, values, scale, causal),
            "ops": A.scaled_dot_product_attention_ops(q, keys, values, scale, mask),
        }
        if sm == 0:
            del res["fused/persistent-unsmoothed-q"]
            res["fused/temp"] = A._fused_attention(q * 1.0, keys, values, scale, causal)
            res["fused/pre-eval"] = A._fused_attention(q, keys, values, scale, causal)
        out = {name: rel(a, t) for name, a in res.items()}
        if sm:
            # Unsmoothed q on the smoothed codes is a different function: compare to its own truth.
            out["fused/persistent-unsmoothed-q"] = rel(
                res["fused/persistent-unsmoothed-q"], truth(q, plain, values, scale, causal)
            )
        print(row, rep, " ".join(f"{n}={e:.2e}" for n, e in out.items()), flush=True)
