"""TurboQuant's norm-keeping reconstruction shrinks every inner product with a fixed direction by
E[cos] (its direction errs), so scores are multiplied by ~(1 - d): a softer softmax. This probe
multiplies the stored scale by gamma = 1/E[cos] (keys, values or both; with or without the exact
sink) and measures (issue 5, RESULTS.md: it lost, not built).

    python benchmarks/score_gain.py "" 512 8 4,3 tq,gk,gkv,sink,sink-gk,sink-gkv,gv
    (model or "" for Gemma-3-270M, window, windows (0: all), bits, variants)
"""

import json
import sys

import mlx.core as mx

import mlx_tq.cache as C
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
from mlx_tq.quant import dequantize, quantize


def mean_cos(bits, D, n=20000):
    x = mx.random.normal((n, D), key=mx.random.key(1))
    y = dequantize(quantize(x, bits))
    return float(mx.mean(mx.sum(x * y, -1) / mx.sum(x * x, -1)))


orig = C._TurboQuantMixin._encode


def _encode(self, keys, values):
    k, v = orig(self, keys, values)
    gk, gv = getattr(self, "gains", (1.0, 1.0))

    def g(a, s):
        if s == 1.0:
            return a
        sc = (a[..., -1:].view(mx.float32) * s).view(mx.uint32)
        return mx.concatenate([a[..., :-1], sc], axis=-1)

    return g(k, gk), g(v, gv)


C._TurboQuantMixin._encode = _encode


def cfg(base, gk, gv, name):
    c = parse_config(base)

    def make(model):
        caches = c.make_cache(model)
        for x in caches:
            x.gains = (gk, gv)
        return caches

    return Config(name, make)


model_name = sys.argv[1] if len(sys.argv) > 1 else None
window, nwin = int(sys.argv[2]), int(sys.argv[3])
bits_list = [int(b) for b in sys.argv[4].split(",")]
model, tok = load(model_name, mx.float32)
D = model.args.head_dim if hasattr(model.args, "head_dim") else None
patch()
configs = []
for b in bits_list:
    c = mean_cos(b, D)
    g = 1 / c
    print(f"bits {b} D {D} E[cos] {c:.5f} gamma {g:.5f}", flush=True)
    variants = {
        "tq": cfg(f"tq{b}", 1.0, 1.0, f"tq{b}"),
        "gk": cfg(f"tq{b}", g, 1.0, f"tq{b}-gk"),
        "gkv": cfg(f"tq{b}", g, g, f"tq{b}-gkv"),
        "sink": cfg(f"tq{b}-sink", 1.0, 1.0, f"tq{b}-sink"),
        "sink-gk": cfg(f"tq{b}-sink", g, 1.0, f"tq{b}-sink-gk"),
        "sink-gkv": cfg(f"tq{b}-sink", g, g, f"tq{b}-sink-gkv"),
        "gv": cfg(f"tq{b}", 1.0, g, f"tq{b}-gv"),
    }
    configs += [
        variants[v]
        for v in (
            sys.argv[5].split(",")
            if len(sys.argv) > 5
            else ["tq", "gk", "gkv", "sink-gk", "sink-gkv"]
        )
    ]
windows = load_windows(tok, default_data_path(), window, nwin or None)  # 0: all
res = evaluate(model, windows, [parse_config("fp16")] + configs)
print(format_table(res))
variants = sys.argv[5] if len(sys.argv) > 5 else "all"
with open(f"score_gain_{window}x{nwin}_{sys.argv[4]}_{variants}.json", "w") as f:
    json.dump(res, f, indent=1)
