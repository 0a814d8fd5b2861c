"""Why does the exact sink hurt pass-key retrieval? (issue 5, a probe; RESULTS.md, "The exact sink
over the whole split".) One needle prompt goes through a `tq<bits>-sink` cache; at the first
decoded token, for each global layer, attention over the raw keys and values the cache was given
is compared with attention over its packed ones, row 0 exact (the sink) or quantised: relative
output error, KL, the sink's attention mass per query head, the score error on row 0.

    python benchmarks/sink_probe.py 3 [1024]   # bits, prompt length (key 43936 at 10%)
"""

import sys
from dataclasses import replace

import mlx.core as mx
import numpy as np

import mlx_tq.attention as att
from mlx_tq.cache import TurboQuantKVCache
from mlx_tq.loading import load
from mlx_tq.needle import make_prompt
from mlx_tq.patch import patch
from mlx_tq.perplexity import parse_config
from mlx_tq.quant import dequantize


def attention(q, keys, values, scale):
    """(probabilities, scores, output) of one decode query over dense keys and values."""
    G = q.shape[1] // keys.shape[1]
    s = (q.astype(mx.float32) * scale) @ mx.repeat(keys, G, axis=1).swapaxes(-1, -2)
    p = mx.softmax(s, axis=-1)
    return p, s, p @ mx.repeat(values, G, axis=1)


def main():
    bits = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    length = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    model, tok = load(None, mx.float32)
    patch()
    prompt = make_prompt(tok, length, 0.1, "43936")
    cache = parse_config(f"tq{bits}-sink").make_cache(model)
    raw = {}  # global layer -> the (keys, values) chunks its cache was given
    for i, c in enumerate(cache):
        if type(c) is TurboQuantKVCache:

            def update(k, v, f=c.update_and_fetch, i=i):
                raw.setdefault(i, []).append((k, v))
                return f(k, v)

            c.update_and_fetch = update
    captured = []  # (queries, keys, values, scale) of each layer's decode step
    original = att.scaled_dot_product_attention

    def capture(q, k, v, scale, mask=None, **kw):
        if q.shape[2] == 1:
            captured.append((q, k, v, scale))
        return original(q, k, v, scale, mask, **kw)

    att.scaled_dot_product_attention = capture
    x = mx.array(prompt)[None]
    for s in range(0, x.shape[1] - 1, 256):
        mx.eval(model.model(x[:, s : min(s + 256, x.shape[1] - 1)], cache=cache))
    mx.eval(model(x[:, -1:], cache=cache))
    print("global layers", sorted(raw))
    for layer, (q, k, v, scale) in enumerate(captured):
        if layer not in raw:
            continue
        K, V = (mx.concatenate([c[j] for c in raw[layer]], axis=2) for j in (0, 1))
        pe, se, oe = attention(q, K.astype(mx.float32), V.astype(mx.float32), scale)
        unsunk = (replace(k, sink=None), replace(v, sink=None))
        for name, (kk, vv) in (("sink exact", (k, v)), ("row 0 quant", unsunk)):
            pq, sq, oq = attention(q, dequantize(kk), dequantize(vv), scale)
            err = float(mx.linalg.norm(oq - oe) / mx.linalg.norm(oe))
            kl = float(mx.sum(pe * (mx.log(pe + 1e-30) - mx.log(pq + 1e-30))) / pe.shape[1])
            row0 = np.array(sq - se)[0, :, 0, 0]
            print(
                f"layer {layer} {name:11s} out err {err:.4f} KL {kl:.4f} "
                f"sink mass exact {np.array(pe)[0, :, 0, 0].round(3)} "
                f"here {np.array(pq)[0, :, 0, 0].round(3)} row-0 score error {row0.round(3)}"
            )


if __name__ == "__main__":
    main()
