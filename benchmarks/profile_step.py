"""Where the host time of a decode step goes: cProfile of `--steps` whole-model decode steps
(Llama-3.1-8B's attention shape, `--layers` layers, small MLP; each step built and
evaluated), per configuration, top functions by own time; then the host time of single
calls (built, not evaluated) of each piece of one TurboQuant layer's step.

    cd benchmarks && python3 profile_step.py [--context 8192] [--layers 32] [--steps 50]

With `--chunk N`: instead, the milliseconds of one N-token prefill chunk appended at
`--context` through the whole model (its real MLP), fp16 cache against TQ4 (median of 5).
"""

import argparse
import cProfile
import io
import pstats
import time

import mlx.core as mx
import mlx_lm.models.base as base
from decode_step import filled, llama_model
from mlx_lm.models.cache import make_prompt_cache as fp16_cache

import mlx_tq


def per_call_us(fn, n=300):
    fn()
    t0 = time.perf_counter()
    outs = [fn() for _ in range(n)]
    dt = (time.perf_counter() - t0) / n * 1e6
    mx.eval(outs)
    return round(dt, 2)


def prefill_chunk(args, dtype):
    from mlx_lm.models.cache import trim_prompt_cache

    model = llama_model(args.layers, dtype, small_mlp=False)
    mlx_tq.patch()
    tokens = mx.random.randint(0, 1000, (1, args.chunk))
    row = {"context": args.context, "chunk": args.chunk, "layers": args.layers}
    for name, make in (
        ("fp16", lambda: fp16_cache(model)),
        ("tq4", lambda: mlx_tq.make_prompt_cache(model, kv_bits=4)),
    ):
        cache = filled(make(), args.context, dtype)
        times = []
        for _ in range(6):
            mx.synchronize()
            t0 = time.perf_counter()
            mx.eval(model(tokens, cache=cache))
            mx.synchronize()
            times.append(time.perf_counter() - t0)
            trim_prompt_cache(cache, args.chunk)
        row[f"{name}_ms"] = round(1e3 * sorted(times[1:])[2], 2)
        del cache
    print(row)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--chunk", type=int, help="time one prefill chunk of this many tokens")
    args = parser.parse_args()
    dtype = mx.float16
    if args.chunk:
        return prefill_chunk(args, dtype)
    model = llama_model(args.layers, dtype)
    mlx_tq.patch()
    token = mx.array([[1]])
    for name, make in (
        ("fp16", lambda: fp16_cache(model)),
        ("tq4", lambda: mlx_tq.make_prompt_cache(model, kv_bits=4)),
    ):
        cache = filled(make(), args.context, dtype)
        for _ in range(3):
            mx.eval(model(token, cache=cache))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            mx.eval(model(token, cache=cache))
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(22)
        print(f"== {name}: {args.steps} steps x {args.layers} layers")
        print("\n".join(out.getvalue().splitlines()[4:]))
    # One layer's pieces, host only (per call, us).
    c = cache[0]
    x = mx.random.normal((1, 8, 1, 128)).astype(dtype)
    q = mx.random.normal((1, 32, 1, 128)).astype(dtype)
    mx.eval(x, q)
    k, v = c.update_and_fetch(x, x)
    mx.eval(c.keys, c.values, c._window)
    from mlx_tq.quant import quantize_kv_rows

    rows = c._rows
    if rows is None:
        return print("(no GPU kernels: the pieces are timed on a GPU only)")
    bits = (c.key_bits, c.value_bits, c.seed)
    pieces = {
        "quantize_kv_rows (window)": lambda: quantize_kv_rows(x, x, *bits, *rows, c._window),
        "quantize_kv_rows": lambda: quantize_kv_rows(x, x, *bits, *rows),
        "attention (patched, step)": lambda: base.scaled_dot_product_attention(
            q, k, v, cache=c, scale=0.088, mask=None
        ),
        "mx.fast sdpa fp16 8K": lambda: mx.fast.scaled_dot_product_attention(
            q, *c._window, scale=0.088
        ),
        "slice": lambda: c.keys[..., :100, :],
        "mx.stack of 2": lambda: mx.stack([x, x]),
    }
    print({name: per_call_us(fn) for name, fn in pieces.items()})


if __name__ == "__main__":
    main()
