"""Time of one decode step of a whole model, TurboQuant caches against fp16's (issue 15).

At batch 1 a decode step is bound by the host: building the step's graph in Python, then
launching it. This builds a Llama with Llama-3.1-8B's attention shape (32 query heads, 8 KV
heads, head_dim 128; `--layers` layers, small MLP and vocabulary: their host cost per layer
does not depend on width), fills each cache with `--context` random keys and values, and
times per token:
- host: `model(token, cache=cache)` alone (the graph is built, nothing runs);
- encode: `mx.async_eval` of it (MLX turns the graph into launches; GPU only);
- step: host + encode + waiting for the result (GPU only);
- pipelined: mlx-lm's loop, the next step built and launched while the GPU runs this one
  (GPU only);
interleaving fp16 (mlx-lm's caches + mx.fast SDPA) and TurboQuant `kv_bits=4`.
With `--stub` (any machine) the custom kernels are replaced by stubs that only return
arrays of the right shapes, so a CPU measures the Python side of a GPU decode step.

    python benchmarks/decode_step.py [--context 8192] [--layers 8] [--steps 200] [--stub]

`--full-model` keeps Llama-3.1-8B's MLP and vocabulary (random weights, 16 GB at 32 layers):
the pipelined figure is then the decode speed of that model, caches filled without a
prefill. `--configs` picks the caches, named as for `mlx_tq.bench` (fp16, tq<kv_bits>,
tq4-r0: no exact recent window, ...).

`--one-layer` times one attention layer's step alone instead (the cache update and mlx-lm's
attention call, 500 steps): fp16's `KVCache` + `mx.fast` SDPA against a TurboQuant cache.
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
from gpu_bench import RANDOM_MODELS
from mlx_lm.models import llama

import mlx_tq
from mlx_tq import attention, kernels, tools

# The stubs' inputs, held until the next (untimed) evaluation as a real launch's graph holds
# them: a stub that dropped them freed the step's graph inside the timed part.
HELD = []


def stub_kernels():
    def stub(inputs, grid, threadgroup, output_shapes, output_dtypes, **_):
        HELD.append(inputs)
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes, strict=True)]

    kernels.backend = lambda: "cuda"
    kernels.kernel = lambda *a, **k: stub


def llama_model(layers, dtype, small_mlp=True):
    """Llama-3.1-8B's shape with random weights and `layers` layers; with `small_mlp`, its
    attention's shape and little else (a small MLP and vocabulary)."""
    config = dict(RANDOM_MODELS["llama-3.1-8b"][0], num_hidden_layers=layers)
    if small_mlp:
        config.update(intermediate_size=512, vocab_size=1024)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def filled(cache, context, dtype):
    """`cache` holding `context` random tokens (one update per layer, no model)."""
    for c in cache:
        k = mx.random.normal((1, 8, context, 128)).astype(dtype)
        c.update_and_fetch(k, k)
        mx.eval(*[a for a in (c.keys, c.values, getattr(c, "key_scale", None)) if a is not None])
    return cache


def one_layer(args, dtype):
    """us per step of one layer's cache update + mlx-lm's (patched) attention call (with
    `--stub`: building it; else also evaluating it)."""
    import mlx_lm.models.base as base
    from mlx_lm.models.cache import KVCache

    caches = {
        "fp16": KVCache(),
        "tq4": mlx_tq.TurboQuantKVCache(4, 4, smooth_keys=0.5, warmup_tokens=0),
    }
    for c in caches.values():
        filled([c], args.context, dtype)
    if args.stub:
        stub_kernels()
    mlx_tq.patch()
    q, x = mx.random.normal((1, 32, 1, 128)).astype(dtype), mx.random.normal((1, 8, 1, 128))
    x = x.astype(dtype)
    runs = {name: [] for name in caches}
    for _ in range(args.repeats):
        for name, c in caches.items():
            spent = 0.0
            for i in range(500):
                t0 = time.perf_counter()
                k, v = c.update_and_fetch(x, x)
                out = base.scaled_dot_product_attention(q, k, v, c, scale=0.088, mask=None)
                if not args.stub:
                    mx.eval(out)
                spent += time.perf_counter() - t0
                if i % 100 == 99:  # (stubs: bound the unevaluated graph, untimed)
                    HELD.clear()
                    mx.eval(out, c.state)
            runs[name].append(1e6 * spent / 500)
    print(json.dumps({f"{n}_us_per_step": statistics.median(r) for n, r in runs.items()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stub", action="store_true", help="stub kernels (time the host only)")
    parser.add_argument("--one-layer", action="store_true", help="one layer's step alone")
    parser.add_argument("--full-model", action="store_true", help="Llama-3.1-8B's MLP and vocab")
    # Switches of attention.py: off, on, or both (each TurboQuant config also as
    # <config>+<suffix> with the switch on, in the same interleaved run).
    for option, what in (
        ("--mma-merge", "attention.MMA_MERGE: the matrix units' launch merges its splits (CUDA)"),
        ("--fold", "attention.FOLD: a decode step's merge launch quantises its token"),
    ):
        parser.add_argument(
            option, nargs="?", const="on", default="off", choices=["off", "on", "both"], help=what
        )
    parser.add_argument(
        "--configs", type=tools.check_config, nargs="+", default=["fp16", "tq4", "tq4-r0"]
    )
    args = parser.parse_args()
    dtype = mx.float16
    attention.MMA_MERGE = args.mma_merge == "on"
    attention.FOLD = args.fold != "off"
    if args.one_layer:
        return one_layer(args, dtype)
    model = llama_model(args.layers, dtype, small_mlp=not args.full_model)
    # Each config's (MMA_MERGE, FOLD), set while it runs.
    merged = {n: (attention.MMA_MERGE, attention.FOLD) for n in args.configs}
    tq = [n for n in args.configs if n != "fp16"]
    if args.mma_merge == "both":
        merged.update({f"{n}+merge": (True, attention.FOLD) for n in tq})
    if args.fold == "both":
        merged.update({f"{n}+fold": (attention.MMA_MERGE, True) for n in tq})
    caches = {
        n: filled(tools.make_cache(model, n.split("+")[0]), args.context, dtype) for n in merged
    }
    if args.stub:
        stub_kernels()
    mlx_tq.patch()
    token = mx.array([[1]])
    for name, cache in caches.items():  # compile every kernel variant before timing
        attention.MMA_MERGE, attention.FOLD = merged[name]
        for _ in range(2):
            mx.eval(model(token, cache=cache))
    kinds = ("host",) if args.stub else ("host", "encode", "step", "pipelined")
    runs = {name: {kind: [] for kind in kinds} for name in caches}
    for _ in range(args.repeats):  # interleaved, so drift hits both
        for name, cache in caches.items():
            attention.MMA_MERGE, attention.FOLD = merged[name]
            t = dict.fromkeys(kinds, 0.0)
            for i in range(args.steps):
                t0 = time.perf_counter()
                out = model(token, cache=cache)
                t1 = time.perf_counter()
                t["host"] += t1 - t0
                if not args.stub:
                    mx.async_eval(out)
                    t2 = time.perf_counter()
                    mx.eval(out)
                    t["encode"] += t2 - t1
                    t["step"] += time.perf_counter() - t0
                # The caches grow by the steps taken (no trim: a trim refills TurboQuant's
                # exact window from packed rows, which a decode step never does).
                if args.stub and i % 50 == 49:  # bound the unevaluated graph
                    mx.eval([c.state for c in cache])
                    HELD.clear()
            if not args.stub:
                out = model(token, cache=cache)
                mx.async_eval(out)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    nxt = model(token, cache=cache)
                    mx.async_eval(nxt)
                    mx.eval(out)
                    out = nxt
                mx.eval(out)
                t["pipelined"] = time.perf_counter() - t0
            for kind in kinds:
                runs[name][kind].append(1e3 * t[kind] / args.steps)
    report = {
        "device": "stub kernels" if args.stub else str(mx.default_device()),
        "mma_merge": args.mma_merge,
        "fold": args.fold,
        "context": args.context,
        "layers": args.layers,
        **{
            f"{name}_{kind}_ms": statistics.median(v)
            for name, r in runs.items()
            for kind, v in r.items()
        },
    }
    for kind in kinds:
        report[f"{kind}_us_per_layer"] = {
            n: 1e3 * report[f"{n}_{kind}_ms"] / args.layers for n in caches
        }
        for n in caches:
            if n != "fp16" and "fp16" in caches:
                report[f"{kind}_{n}_over_fp16"] = (
                    report[f"{n}_{kind}_ms"] / report[f"fp16_{kind}_ms"]
                )
    if "pipelined" in kinds:  # decode tokens per second of mlx-lm's loop
        report["decode_tok_s"] = {n: 1e3 / report[f"{n}_pipelined_ms"] for n in caches}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
