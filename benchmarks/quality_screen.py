"""Screen of quality options (issue 18, item 3): KL against the fp16 cache over the positions
that attend quantised keys only, every variant on the same windows in one run.

Each window of the WikiText-2 test split is fed in 64-token chunks through the fp16 cache and
through every variant; KL, Δlog-likelihood and top-1 are averaged over the positions from
`--from` on (with the default warm-up of 256 every layer has frozen and quantised by then).

A variant is a `mlx_tq.tools` configuration, then options joined by "+":
- ``q``: query-aware key smoothing (not in the package): the per-channel scale becomes
  s = (std(k) / rms(q))^smooth, rms(q) over the queries that attended the warm-up (per KV head,
  over its query heads), the optimum s^2 ~ sqrt(E k^2 / E q^2) of an isotropic error;
- ``k<b>@global`` / ``k<b>@sliding`` / ``k<b>@0.5.11``: b-bit keys in those layers;
- ``r<W>``: the W most recent tokens of every layer attended exactly (reference only, not in
  the package: a shadow fp16 cache, and attention mixing its scores with the packed ones by
  distance; its bits are counted as W fp16 rows per layer in place of packed ones).

    python benchmarks/quality_screen.py --windows 8 --window 1024 --from 256 \\
        --variants tq4 tq4+q tq4+k5@sliding tq4+r32 [--json out.json]
"""

import argparse
import importlib
import json
import math
import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache

import mlx_tq
from mlx_tq import tools
from mlx_tq.attention import _mask_chunk
from mlx_tq.cache import _TurboQuantMixin
from mlx_tq.perplexity import load_windows
from mlx_tq.quant import TurboQuantized, dequantize, quantize_kv, words_per_row

tq_patch = importlib.import_module("mlx_tq.patch")  # mlx_tq.patch is also a function
DATA = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


def make_variant(model, name):
    base, *options = name.split("+")
    cache = tools.make_cache(model, base)
    layers = [c for c in cache if hasattr(c, "key_bits")]
    for opt in options:
        if opt == "q":
            for c in layers:
                c.query_power = (0, 0)
        elif opt.startswith("k"):
            bits, where = opt[1:].split("@")
            sliding = [hasattr(c, "max_size") for c in layers]
            pick = {
                "global": [not s for s in sliding],
                "sliding": sliding,
            }.get(where) or [str(i) in where.split(".") for i in range(len(layers))]
            for c, p in zip(layers, pick, strict=True):
                if p:
                    c.key_bits = int(bits)
        elif opt.startswith("r"):
            for c in layers:
                _add_recent(c, int(opt[1:]))
        else:
            raise ValueError(f"unknown option {opt!r} in {name!r}")
    return cache


def _add_recent(c, window):
    shadow = RotatingKVCache(c.max_size, c.keep) if hasattr(c, "max_size") else KVCache()
    update = c.update_and_fetch

    def update_and_fetch(keys, values):
        c.exact = shadow.update_and_fetch(keys, values)
        return update(keys, values)

    c.update_and_fetch, c.recent = update_and_fetch, window


def _freeze(self, keys, values):
    """The cache's `_freeze`, then with `q` the held tokens re-quantised with the query-aware
    scale."""
    exact = (self.keys, self.values)
    _plain_freeze(self, keys, values)
    power, n = getattr(self, "query_power", (0, 0))
    if not n or self.key_scale is None:
        return
    s = self.key_scale * (power / n + 1e-12)[:, :, None] ** (-self.smooth_keys / 2)
    self._set_stats(self.key_offset, s / s.mean(axis=-1, keepdims=True), self.stats_tokens)
    if exact[0] is not None:
        self.keys, self.values = quantize_kv(
            *exact, self.key_bits, self.value_bits, self.seed, *self._stats()
        )


_plain_freeze = _TurboQuantMixin._freeze
_TurboQuantMixin._freeze = _freeze


def _attention(queries, keys, values, cache, scale, mask, sinks=None):
    """Records E[q^2] during the warm-up for `q`; attends the keys within `cache.recent`
    positions of each query exactly for `r<W>`."""
    if getattr(cache, "query_power", None) is not None and cache.key_offset is None:
        B, Hq, L, D = queries.shape
        q = queries.astype(mx.float32).reshape(B, cache.keys.shape[1], -1, D)
        power, n = cache.query_power
        cache.query_power = (power + (q * q).sum(axis=2), n + q.shape[2])
    window = getattr(cache, "recent", 0)
    if not window or not isinstance(keys, TurboQuantized):
        return _patched(queries, keys, values, cache, scale, mask, sinks)
    exact_k, exact_v = cache.exact
    B, Hq, L, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    assert exact_k.shape[2] == S, (exact_k.shape, keys.shape)
    q = queries.astype(mx.float32).reshape(B, Hkv, Hq // Hkv, L, D) * scale
    near = (S - L + mx.arange(L)[:, None] - mx.arange(S)[None]) < window

    def split(k):
        return k.astype(mx.float32)[:, :, None]

    scores = mx.where(
        near, q @ split(exact_k).swapaxes(-1, -2), q @ split(dequantize(keys)).swapaxes(-1, -2)
    )
    m = _mask_chunk(mask, L, S, 0, S)
    if m is not None:
        m = mx.broadcast_to(m, (B, Hq, L, S)).reshape(B, Hkv, Hq // Hkv, L, S)
        scores = mx.where(m, scores, -mx.inf) if m.dtype == mx.bool_ else scores + m
    p = mx.softmax(scores, axis=-1)
    out = (p * near) @ split(exact_v) + (p * ~near) @ split(dequantize(values))
    return out.reshape(B, Hq, L, D).astype(queries.dtype)


_patched = tq_patch._attention


def footprint_bits(cache, tokens=None, chunk=64):
    """Bits per element held (at the end of the text fed, or estimated for `tokens` tokens
    fed in chunks of `chunk`: sliding layers then hold max_size + chunk - 1 rows), with each
    recent-window layer's W rows counted as fp16 in place of packed ones."""
    held = elements = 0
    for c in cache:
        if getattr(c, "keys", None) is None or not hasattr(c, "key_bits"):
            continue
        B, H = c.keys.shape[:2]
        D, bits = c.head_dim, (c.key_bits, c.value_bits)
        rows = min(c.offset, c.keys.shape[2]) if tokens is None else tokens
        if tokens is not None and hasattr(c, "max_size"):
            rows = min(tokens, c.max_size + chunk - 1)
        packed = 4 * sum(words_per_row(D, b) for b in bits)
        exact = min(getattr(c, "recent", 0), rows)
        stats = sum(a.nbytes for a in c._stat_arrays())
        held += B * H * ((rows - exact) * packed + exact * 4 * D) + stats
        elements += 2 * B * H * rows * D
    return 8 * held / max(elements, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--skip", type=int, default=0, help="Windows skipped at the start")
    parser.add_argument("--from", dest="start", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=["tq4", "tq4+q"])
    parser.add_argument("--data", default=os.environ.get("MLX_TQ_PPL_DATA", DATA))
    parser.add_argument("--json")
    args = parser.parse_args()
    model, tokenizer = mlx_tq.load()
    windows = load_windows(tokenizer, args.data, args.window, args.skip + args.windows)
    windows = windows[args.skip :]
    mx.random.seed(0)
    mlx_tq.patch()
    tq_patch._swap(tq_patch._attention, _attention)
    names = ["fp16", *args.variants]
    kl, dnll, top1, bits = ({n: [] for n in names} for _ in range(4))
    t0 = time.time()
    for w in range(windows.shape[0]):
        caches = {n: make_variant(model, n) for n in names}
        ref = ref_top = None
        for s in range(0, args.window, args.chunk_size):
            x = windows[w : w + 1, s : s + args.chunk_size]
            y = windows[w, s + 1 : s + args.chunk_size + 1]
            keep = max(0, args.start - s)
            for n in names:
                logits = model(x, cache=caches[n])[0].astype(mx.float32)
                logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                nll = -mx.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
                if ref is None or n == "fp16":
                    ref, ref_top, ref_nll = logp, mx.argmax(logp, axis=-1), nll
                d = mx.sum(mx.exp(ref) * (ref - logp), axis=-1)
                t = mx.argmax(logp, axis=-1) == ref_top
                mx.eval(d, t, nll, ref_nll)
                kl[n].append(np.array(d)[keep:])
                top1[n].append(np.array(t)[keep:])
                dnll[n].append(np.array(nll - ref_nll)[keep:])
            ref = None
        for n in names:
            bits[n] = (footprint_bits(caches[n]), footprint_bits(caches[n], 2048))
        report(args, model, names, kl, dnll, top1, bits, w + 1, time.time() - t0)


def report(args, model, names, kl, dnll, top1, bits, done, seconds):
    """Prints the table so far and rewrites the JSON (a cut-short run keeps its windows)."""
    base = np.concatenate(kl[names[1]]).astype(np.float64)
    results = {}
    for n in names[1:]:
        k, d = np.concatenate(kl[n]).astype(np.float64), np.concatenate(dnll[n]).astype(np.float64)
        results[n] = {
            "kl": k.mean(),
            "kl_se": k.std() / math.sqrt(len(k)),
            # the ratio to the first variant, and the se of the paired per-token difference
            "kl_vs_first": k.mean() / base.mean(),
            "kl_diff_se": (k - base).std() / math.sqrt(len(k)),
            "delta_ppl": math.exp(d.mean()) - 1,
            "delta_ppl_se": math.exp(d.mean()) * d.std() / math.sqrt(len(d)),
            "top1": float(np.concatenate(top1[n]).mean()),
            "bits_per_element": bits[n][0],
            "bits_per_element_2048": bits[n][1],
            "tokens": len(k),
        }
    print(f"{done} windows x {args.window}, positions >= {args.start} ({seconds:.0f} s)")
    print("| variant | bits/elem (at 2,048) | KL ± se | vs first (Δ se) | ΔPPL ± se | top-1 |")
    print("|---|---|---|---|---|---|")
    for n, r in results.items():
        print(
            f"| {n} | {r['bits_per_element']:.3f} ({r['bits_per_element_2048']:.3f}) "
            f"| {r['kl']:.4f} ± {r['kl_se']:.4f} | {r['kl_vs_first']:.3f} ({r['kl_diff_se']:.4f}) "
            f"| {100 * r['delta_ppl']:+.2f}% ± {100 * r['delta_ppl_se']:.2f} "
            f"| {100 * r['top1']:.1f}% |",
            flush=True,
        )
    if args.json:
        info = tools.run_info("quality_screen", tools.model_dtype(model))
        args = vars(args) | {"data": str(args.data), "windows_done": done}
        out = {**info, "args": args, "results": results}
        Path(args["json"]).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
