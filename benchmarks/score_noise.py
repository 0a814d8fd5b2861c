"""Experiment: quantisation noise on a key's score, n_j ~ N(0, s_j^2), inflates its softmax weight
by exp(s_j^2 / 2) on average, so thousands of noisy filler keys dilute the few that matter. Subtract
s_j^2 / 2 with s_j^2 = scale^2 |q * key_scale|^2 |k'_j|^2 mse_b / D (k' the stored-space key, whose
norm the norm-corrected scale keeps). Dense reference attention, CPU (issue 5, RESULTS.md: it
lost, not built).

    python benchmarks/score_noise.py "" 512 8 tq4-nc,tq4-sink-nc,tq3-nc,tq3-sink-nc [lambda]
    (model or "" for Gemma-3-270M, window, windows, configs: "-nc" = corrected)
"""

import json
import sys

import mlx.core as mx

import mlx_tq.attention as att
import mlx_tq.cache as C
from mlx_tq.codebook import lloyd_max
from mlx_tq.loading import load
from mlx_tq.patch import patch
from mlx_tq.perplexity import (
    Config,
    default_data_path,
    evaluate,
    format_table,
    load_windows,
    parse_config,
)
from mlx_tq.quant import dequantize

LAM = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
orig = att.scaled_dot_product_attention


def corrected(queries, keys, values, scale, mask=None, **kw):
    if not getattr(keys, "_correct", False):
        return orig(queries, keys, values, scale, mask, **kw)
    B, Hq, L, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    K = dequantize(keys).astype(mx.float32)
    V = dequantize(values).astype(mx.float32)
    kp = K - keys.offset if keys.offset is not None else K
    if keys.channel_scale is not None:
        kp = kp / keys.channel_scale
    n2 = mx.sum(kp * kp, -1)  # (B, Hkv, S)
    if keys.sink is not None:
        n2 = mx.concatenate([mx.zeros_like(n2[..., :1]), n2[..., 1:]], -1)
    q = queries.astype(mx.float32)
    qs = q if keys.channel_scale is None else q * mx.repeat(keys.channel_scale, G, 1)
    q2 = mx.sum(qs * qs, -1, keepdims=True)  # (B, Hq, L, 1)
    var = scale**2 * q2 * mx.repeat(n2, G, 1)[:, :, None, :] * lloyd_max(keys.bits, D)[2] / D
    s = (q * scale) @ mx.repeat(K, G, 1).swapaxes(-1, -2) - LAM * 0.5 * var
    if isinstance(mask, str):
        rows = mx.arange(S - L, S)[:, None]
        s = mx.where(mx.arange(S)[None] <= rows, s, -mx.inf)
    elif mask is not None:
        s = mx.where(mask, s, -mx.inf) if mask.dtype == mx.bool_ else s + mask
    p = mx.softmax(s, -1)
    return (p @ mx.repeat(V, G, 1)).astype(queries.dtype)


att.scaled_dot_product_attention = corrected


orig_wrap = C._TurboQuantMixin._wrap


def _wrap(self, k, v):
    keys, values = orig_wrap(self, k, v)
    if getattr(self, "correct", False):
        object.__setattr__(keys, "_correct", True)
    return keys, values


C._TurboQuantMixin._wrap = _wrap


def cfg(base, name, correct):
    c = parse_config(base)

    def make(model):
        caches = c.make_cache(model)
        for x in caches:
            x.correct = correct
        return caches

    return Config(name, make)


window, nwin = int(sys.argv[2]), int(sys.argv[3])
model, tok = load(sys.argv[1] or None, mx.float32)
patch()
configs = []
for name in sys.argv[4].split(","):
    configs.append(cfg(name.removesuffix("-nc"), name, name.endswith("-nc")))
windows = load_windows(tok, default_data_path(), window, nwin or None)  # 0: all
res = evaluate(model, windows, [parse_config("fp16")] + configs)
print(format_table(res))
json.dump(res, open(f"score_noise_{window}x{nwin}_{sys.argv[4]}_{LAM}.json", "w"), indent=1)
