"""Where a prefill's peak memory goes: fp16 vs TurboQuant caches on a random-weights model.

`bench generate` reported TurboQuant's prefill peak at 8,192 tokens of Llama-3.1-8B's shape as
6.24 GB in one H100 run and 17.15 GB in another (same kernels). This feeds the prompt in
mlx-lm's way (chunks, then `mx.eval` of the caches' states) and records each chunk's peak above
what was held before it, per configuration, in two orders; then the same with the output of
every `mx.fast.scaled_dot_product_attention` evaluated at once (one layer's attention at a
time); then one layer's SDPA alone, on contiguous keys and on a slice of a larger buffer.

    python benchmarks/prefill_memory.py --context 8192 --out DIR
"""

import argparse
import gc
import json
import time
from pathlib import Path

import mlx.core as mx
from gpu_bench import default_dtype, random_model

from mlx_tq.patch import patch
from mlx_tq.tools import make_cache

GB = 1e9


def peak_above_held(compute) -> float:
    """GB that `compute()` (which evaluates its own work) peaks above what was held before."""
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    compute()
    return round((mx.get_peak_memory() - base) / GB, 3)


def prefill(model, cache, tokens, step):
    """Per-chunk peaks (GB above what was held before the chunk) and seconds."""
    peaks = []
    tic = time.perf_counter()
    for s in range(0, tokens.size, step):
        gc.collect()

        def chunk(s=s):
            model(tokens[None, s : s + step], cache=cache)
            mx.eval([c.state for c in cache])

        peaks.append(peak_above_held(chunk))
    return peaks, time.perf_counter() - tic


def sdpa_alone(dtype, L, S, Hq=32, Hkv=8, D=128, pad=256):
    """One layer's SDPA (causal) on contiguous K/V and on a view of a padded buffer."""
    q = mx.random.normal((1, Hq, L, D)).astype(dtype)
    kv = [mx.random.normal((1, Hkv, S + pad, D)).astype(dtype) for _ in range(2)]
    out = {}
    for name, (k, v) in {
        "contiguous": [mx.contiguous(x[:, :, :S]) for x in kv],
        "view": [x[:, :, :S] for x in kv],
    }.items():
        mx.eval(q, k, v)
        out[name] = peak_above_held(
            lambda k=k, v=v: mx.eval(
                mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal")
            )
        )
    out["scores_fp32_GB"] = Hq * L * S * 4 / GB
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--step", type=int, default=2048)
    p.add_argument("--out", default=".")
    args = p.parse_args()
    dtype = default_dtype()
    model = random_model(args.model, dtype)
    patch()
    tokens = mx.random.randint(0, 1000, (args.context,))
    report = {"device": str(mx.default_device()), "dtype": str(dtype), **vars(args)}
    report["sdpa_alone"] = sdpa_alone(dtype, args.step, args.context)
    print(json.dumps(report["sdpa_alone"]), flush=True)
    runs = []
    fast_sdpa = mx.fast.scaled_dot_product_attention
    for eager in (False, True):
        if eager:
            # Every attention output evaluated at once: one layer's temporaries at a time.
            def sdpa(*a, **k):
                out = fast_sdpa(*a, **k)
                mx.eval(out)
                return out

            mx.fast.scaled_dot_product_attention = sdpa
        for name in ("tq4", "fp16", "tq4", "fp16"):
            cache = make_cache(model, name)
            peaks, seconds = prefill(model, cache, tokens, args.step)
            kv = sum(c.nbytes for c in cache) / GB
            run = {"config": name, "eager_sdpa": eager, "chunk_peaks_GB": peaks}
            run |= {"kv_GB": round(kv, 3), "seconds": round(seconds, 2)}
            print(json.dumps(run), flush=True)
            runs.append(run)
            del cache
        mx.fast.scaled_dot_product_attention = fast_sdpa
    report["runs"] = runs
    Path(args.out, "prefill_memory.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
