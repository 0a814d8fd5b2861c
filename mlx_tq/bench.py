"""Speed and memory benchmarks: `mlx_tq.bench generate`, `mlx_tq.bench attention`.

generate: prefill N tokens then decode M with each KV cache (mlx-lm's fp16 and affine caches,
TurboQuant); prompt and decode tok/s, peak memory and KV bytes, medians over repeats.
attention: one decode step of attention over N keys, fused TurboQuant vs fp16 SDPA vs
mlx-lm's quantized SDPA. check: the GPU targets, from a generate JSON.
"""

import argparse
import gc
import importlib
import json
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import mlx_lm.models.cache as lm_cache
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from . import kernels
from .attention import scaled_dot_product_attention
from .cache import make_prompt_cache
from .loading import load
from .patch import patch
from .quant import quantize

DEFAULT_CONFIGS = ["fp16", "affine8", "affine4", "tq4", "tq3", "k4v3"]
DEFAULT_CONTEXTS = [1024, 4096, 16384]
DEFAULT_DECODE_TOKENS = 32
DEFAULT_REPEATS = 2
DEFAULT_PREFILL_STEP_SIZE = 2048
WARMUP_TOKENS = 256
DEFAULT_KEYS = [4096, 32768, 131072]
DEFAULT_HEADS = 32
DEFAULT_KV_HEADS = 8
DEFAULT_HEAD_DIM = 128
DEFAULT_RUNS = 50
DEFAULT_WARMUP = 10
QUICK = {"contexts": [256, 1024], "decode_tokens": 8, "repeats": 1, "keys": [1024, 4096], "runs": 5}
CONFIG_PATTERN = r"fp16|affine\d|tq\d|k\dv\d"
AFFINE_GROUP_SIZE = 64
PROMPT_SEED = 0
# TQ4 decode speed / fp16 at a context length, and the share of fp16 KV bytes the TQ4 peak
# must save at 32K.
DECODE_TARGETS = {8192: 1.0, 32768: 1.3}
MEMORY_TARGET = (32768, 0.7)

# Real shapes, random weights (the GPU machine cannot fetch real ones): (config, weight bits).
RANDOM_MODELS = {
    "llama-3.1-8b": (
        {
            "model_type": "llama",
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rms_norm_eps": 1e-5,
            "vocab_size": 128256,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "max_position_embeddings": 131072,
            "tie_word_embeddings": False,
        },
        4,
    ),
    "qwen2.5-1.5b": (
        {
            "model_type": "qwen2",
            "hidden_size": 1536,
            "num_hidden_layers": 28,
            "intermediate_size": 8960,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "vocab_size": 151936,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": True,
        },
        None,
    ),
    # For tests and smoke runs.
    "tiny": (
        {
            "model_type": "llama",
            "hidden_size": 256,
            "num_hidden_layers": 2,
            "intermediate_size": 512,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "rms_norm_eps": 1e-5,
            "vocab_size": 1024,
            "tie_word_embeddings": True,
        },
        None,
    ),
}


def default_dtype():
    return mx.float16 if mx.default_device() == mx.gpu else mx.float32


def device_name() -> str:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return f"{mx.default_device()}: {info.get('device_name', platform.processor())}"


def header(mode: str, dtype) -> dict:
    return {
        "mode": mode,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "kernel_backend": kernels.backend(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "dtype": str(dtype).removeprefix("mlx.core."),
    }


def random_model(name: str, dtype):
    """An mlx-lm model of a real shape with random weights (speed does not depend on them)."""
    config, bits = RANDOM_MODELS[name]
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    # Lazy until the eval, so the float32 initial weights never exist all at once.
    model.set_dtype(dtype)
    if bits is not None:
        nn.quantize(model, group_size=64, bits=bits)
    mx.eval(model.parameters())
    return model


def make_cache(model, name: str) -> list:
    """The cache of a configuration: ``fp16`` (mlx-lm's default caches, in the model's dtype),
    ``affine<b>`` (mlx-lm's ``QuantizedKVCache``, group 64, in place of each plain ``KVCache``,
    as ``to_quantized`` does; sliding-window layers stay, mlx-lm cannot quantise them),
    ``tq<b>`` or ``k<kb>v<vb>`` (`make_prompt_cache`), optionally ``-sink`` (``exact_sink``;
    ``tq<b>-nosink`` turns a preset's off)."""
    if name == "fp16":
        return lm_cache.make_prompt_cache(model)
    if m := re.fullmatch(r"affine(\d)", name):
        return [
            lm_cache.QuantizedKVCache(group_size=AFFINE_GROUP_SIZE, bits=int(m[1]))
            if type(c) is lm_cache.KVCache
            else c
            for c in lm_cache.make_prompt_cache(model)
        ]
    if m := re.fullmatch(r"tq(\d)", name):
        return make_prompt_cache(model, kv_bits=int(m[1]))
    if m := re.fullmatch(r"k(\d)v(\d)", name):
        return make_prompt_cache(model, key_bits=int(m[1]), value_bits=int(m[2]))
    raise ValueError(
        f"unknown configuration {name!r}: use fp16, affine<b>, tq<b> or k<b>v<b> "
        "(the last two optionally with -sink)"
    )


def timed_generate(model, prompt, cache, decode_tokens, prefill_step_size):
    """Feeds `prompt` through `cache` and decodes `decode_tokens` greedily, timed as mlx-lm's
    `stream_generate` does. Returns prompt seconds, decode tok/s (the tokens after the
    first) and the last token."""
    tic = time.perf_counter()
    steps = generate_step(
        prompt,
        model,
        max_tokens=decode_tokens,
        prompt_cache=cache,
        prefill_step_size=prefill_step_size,
    )
    tokens = []
    for token, _ in steps:
        if not tokens:
            prompt_time = time.perf_counter() - tic
            # The prefill's peak (it includes the first decode step, already queued).
            prefill_peak = mx.get_peak_memory()
            mx.reset_peak_memory()
            tic = time.perf_counter()
        tokens.append(token)
    decode_tps = (decode_tokens - 1) / (time.perf_counter() - tic)
    # generate_step has queued one more step: let it finish before the next run starts.
    mx.synchronize()
    return prompt_time, decode_tps, tokens[-1], (prefill_peak, mx.get_peak_memory())


def measure(model, name, prompt, kept, args) -> dict:
    """One run of configuration `name`: prefill `prompt` and decode into a new cache, or
    (when `kept` has one) decode on from the kept cache, with no second prefill."""
    r = {}
    if name in kept:
        cache, token = kept[name]
        _, r["decode_tps"], token, _ = timed_generate(
            model, mx.array([token]), cache, args.decode_tokens, 1
        )
    else:
        cache = make_cache(model, name)
        gc.collect()
        mx.clear_cache()
        held = mx.get_active_memory()
        mx.reset_peak_memory()
        seconds, r["decode_tps"], token, peaks = timed_generate(
            model, prompt, cache, args.decode_tokens, args.prefill_step_size
        )
        r["prompt_tps"] = prompt.size / seconds
        # As if alone: the weights, not the other configurations' kept caches.
        weights = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
        r["prefill_peak_memory"], r["decode_peak_memory"] = (p - held + weights for p in peaks)
        r["peak_memory"] = max(r["prefill_peak_memory"], r["decode_peak_memory"])
        r["kv_bytes"] = sum(c.nbytes for c in cache)
    kept[name] = cache, token
    return r


def describe(cache: list) -> str:
    """What a configuration's cache is, e.g. "TurboQuant K4/V4, key smoothing 0.5"."""
    for c in cache:
        if hasattr(c, "key_bits"):
            smooth = getattr(c, "smooth_keys", 0)
            return (
                f"TurboQuant K{c.key_bits}/V{c.value_bits}"
                + (f", key smoothing {smooth}" if smooth else "")
                + (", exact sink" if getattr(c, "exact_sink", False) else "")
            )
        if hasattr(c, "bits"):
            return f"mlx-lm QuantizedKVCache {c.bits}-bit, group {c.group_size}"
    return "mlx-lm " + ", ".join(sorted({type(c).__name__ for c in cache}))


def summarize(runs: list[dict], dtype_bytes: int) -> list[dict]:
    """Medians per (context, config), with fp16 KV bytes and ratios to the fp16 row."""
    keys = list(dict.fromkeys((r["context"], r["config"]) for r in runs))
    rows = []
    for context, config in keys:
        mine = [r for r in runs if r["context"] == context and r["config"] == config]
        row = {"context": context, "config": config, "repeats": len(mine)}
        for field in (
            "prompt_tps",
            "decode_tps",
            "peak_memory",
            "prefill_peak_memory",
            "decode_peak_memory",
            "kv_bytes",
        ):
            row[field] = statistics.median(r[field] for r in mine if field in r)
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["context"] == row["context"] and r["config"] == "fp16")
        # The fp16 row holds the model's dtype (float32 on CPU): scale it to 2 bytes.
        row["fp16_kv_bytes"] = base["kv_bytes"] * 2 // dtype_bytes
        row["fp16_peak_memory"] = base["peak_memory"]
        row["decode_vs_fp16"] = row["decode_tps"] / base["decode_tps"]
        row["kv_vs_fp16"] = row["kv_bytes"] / row["fp16_kv_bytes"]
    return rows


def generate_table(rows: list[dict]) -> str:
    lines = [
        "| context | config | prompt tok/s | decode tok/s | decode / fp16 | peak GB | "
        "prefill / decode peak GB | KV MB | KV / fp16 bytes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['config']} | {r['prompt_tps']:.1f} | {r['decode_tps']:.2f} | "
            f"{r['decode_vs_fp16']:.2f} | {r['peak_memory'] / 1e9:.3f} | "
            f"{r['prefill_peak_memory'] / 1e9:.3f} / {r['decode_peak_memory'] / 1e9:.3f} | "
            f"{r['kv_bytes'] / 1e6:.1f} | {r['kv_vs_fp16']:.3f} |"
        )
    return "\n".join(lines)


def check_targets(report: dict) -> list[str]:
    """The GPU targets for TQ4 against fp16, one line each, from a generate report."""
    rows = {(r["context"], r["config"]): r for r in report["results"]}
    lines = []
    for context, target in DECODE_TARGETS.items():
        if (context, "tq4") in rows and (context, "fp16") in rows:
            ratio = rows[context, "tq4"]["decode_vs_fp16"]
            verdict = "PASS" if ratio >= target else "FAIL"
            lines.append(
                f"{verdict} decode at {context}: TQ4 {ratio:.2f}x fp16 tok/s (target >= {target})"
            )
        else:
            lines.append(f"n/a  decode at {context}: no tq4 and fp16 rows at that context")
    context, share = MEMORY_TARGET
    if (context, "tq4") in rows and (context, "fp16") in rows:
        tq4, fp16 = rows[context, "tq4"], rows[context, "fp16"]
        saved = (fp16["peak_memory"] - tq4["peak_memory"]) / tq4["fp16_kv_bytes"]
        verdict = "PASS" if saved >= share else "FAIL"
        lines.append(
            f"{verdict} memory at {context}: TQ4 peak {tq4['peak_memory'] / 1e9:.3f} GB vs fp16 "
            f"{fp16['peak_memory'] / 1e9:.3f} GB saves {saved:.0%} of the fp16 KV bytes "
            f"({tq4['fp16_kv_bytes'] / 1e9:.3f} GB; target >= {share:.0%})"
        )
    else:
        lines.append(f"n/a  memory at {context}: no tq4 and fp16 rows at that context")
    return lines


def plot(path: str, report: dict):
    """Decode tok/s and peak memory (generate) or latency (attention) against context length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}", file=sys.stderr)
        return
    rows = report["results"]
    title = f"{report.get('model', 'attention')} on {report['device']}, {report['dtype']}"
    if report["mode"] == "generate":
        panels = [("decode_tps", "decode tok/s", 1), ("peak_memory", "peak memory (GB)", 1e9)]
        x_field, x_label, series = "context", "context length (tokens)", "config"
    else:
        panels = [("ms", "attention time per decode step (ms)", 1)]
        x_field, x_label, series = "keys", "keys", "method"
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (field, label, unit) in zip(axes[0], panels, strict=True):
        for name in dict.fromkeys(r[series] for r in rows):
            mine = [r for r in rows if r[series] == name]
            ax.plot([r[x_field] for r in mine], [r[field] / unit for r in mine], "o-", label=name)
        ax.set_xscale("log")
        xs = sorted({r[x_field] for r in rows})
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        if report["mode"] == "attention":
            ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict, json_path: str | None):
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)


def generate(args):
    dtype = getattr(mx, args.dtype) if args.dtype else default_dtype()
    if args.random_model:
        model_name = f"{args.random_model} (random weights)"
        model = random_model(args.random_model, dtype)
    else:
        model_name = args.model or "gemma3-270m"
        model = load(args.model, dtype=dtype)[0]
    patch()
    vocab = model.args.vocab_size
    report = {
        **header("generate", dtype),
        "model": model_name,
        "weights_bytes": sum(a.nbytes for _, a in tree_flatten(model.parameters())),
        "prompt": f"random token ids (seed {PROMPT_SEED}): speed does not depend on the text",
        "decode_tokens": args.decode_tokens,
        "prefill_step_size": args.prefill_step_size,
        "configs": args.configs,
        "contexts": args.contexts,
        "runs": [],
    }
    if args.random_model:
        report["note"] = "random weights of the real shape: speed does not depend on their values"
    print(f"{model_name}; {report['device']}; {report['dtype']}; {report['prompt']}", flush=True)
    prompts = {
        n: mx.random.randint(0, vocab, (n,), key=mx.random.key(PROMPT_SEED + n))
        for n in args.contexts
    }
    report["cache_settings"] = {name: describe(make_cache(model, name)) for name in args.configs}
    report["errors"] = []

    def failed(name, context, e):
        # mlx-lm's QuantizedKVCache fails on some backends (quantized_matmul shapes on CUDA):
        # report it and go on with the other configurations.
        if name == "fp16":
            raise e
        report["errors"].append({"context": context, "config": name, "error": str(e)})
        print(f"context {context}, config {name}: failed: {e}", file=sys.stderr, flush=True)

    # Warm-up: compile every configuration's kernels before timing.
    warm = mx.random.randint(0, vocab, (min(*args.contexts, WARMUP_TOKENS),))
    broken = set()
    for name in args.configs:
        try:
            timed_generate(model, warm, make_cache(model, name), 2, args.prefill_step_size)
        except Exception as e:
            failed(name, warm.size, e)
            broken.add(name)
    for context in args.contexts:
        kept, skip = {}, set(broken)
        for repeat in range(args.repeats):
            # Rotate the order each repeat so no configuration always runs first.
            k = repeat % len(args.configs)
            for name in args.configs[k:] + args.configs[:k]:
                if name in skip:
                    continue
                r = {"context": context, "config": name, "repeat": repeat}
                try:
                    r.update(measure(model, name, prompts[context], kept, args))
                except Exception as e:
                    failed(name, context, e)
                    skip.add(name)
                    continue
                report["runs"].append(r)
                print(
                    ", ".join(
                        f"{f} {v:.4g}" if isinstance(v, float) else f"{f} {v}" for f, v in r.items()
                    ),
                    file=sys.stderr,
                    flush=True,
                )
                report["results"] = summarize(report["runs"], dtype.size)
                write(report, args.json)
    report["targets"] = check_targets(report)
    write(report, args.json)
    return report


def median_ms(fn, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        mx.eval(fn())
    mx.synchronize()
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times)


def attention(args):
    dtype = getattr(mx, args.dtype) if args.dtype else default_dtype()
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    scale = D**-0.5
    time_it = partial(median_ms, warmup=args.warmup, runs=args.runs)
    report = {**header("attention", dtype), "B": 1, "heads": H, "kv_heads": Hkv, "head_dim": D}
    report.update(warmup=args.warmup, runs=args.runs, results=[])
    print(f"{report['device']}; {report['dtype']}; kernels: {report['kernel_backend']}", flush=True)
    for N in args.keys:
        q = mx.random.normal((1, H, 1, D)).astype(dtype)
        k, v = (mx.random.normal((1, Hkv, N, D)).astype(dtype) for _ in range(2))
        # mlx-lm scales its queries in place: give it a copy of its own.
        q_lm = mx.array(q)
        offset = mx.mean(k.astype(mx.float32), axis=2, keepdims=True)
        mx.eval(q, k, v, q_lm, offset)
        base = "fp16" if dtype == mx.float16 else report["dtype"]
        methods = {base: partial(mx.fast.scaled_dot_product_attention, q, k, v, scale=scale)}
        for bits in (8, 4):
            qk, qv = (mx.quantize(a, group_size=AFFINE_GROUP_SIZE, bits=bits) for a in (k, v))
            methods[f"mlx-lm affine{bits}"] = partial(
                quantized_scaled_dot_product_attention, q_lm, qk, qv, scale, None, bits=bits
            )
        for kb, vb in ((4, 4), (3, 3), (4, 3)):
            tk = quantize(k, kb, offset=offset, check_finite=False)
            tv = quantize(v, vb, check_finite=False)
            mx.eval(tk.data, tv.data)
            name = f"tq{kb}" if kb == vb else f"k{kb}v{vb}"
            methods[name] = partial(scaled_dot_product_attention, q, tk, tv, scale)
        for method, fn in methods.items():
            ms = time_it(fn)
            report["results"].append({"keys": N, "method": method, "ms": ms})
            print(f"keys {N} {method}: {ms:.3f} ms", file=sys.stderr, flush=True)
        write(report, args.json)
    return report


def attention_table(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| keys | " + " | ".join(f"{m} ms" for m in methods) + " |"]
    lines.append("|---:|" + "---:|" * len(methods))
    for N in dict.fromkeys(r["keys"] for r in rows):
        ms = {r["method"]: r["ms"] for r in rows if r["keys"] == N}
        lines.append(f"| {N} | " + " | ".join(f"{ms[m]:.3f}" for m in methods) + " |")
    return "\n".join(lines)


def setup_arg_parser():
    parser = argparse.ArgumentParser(description="TurboQuant speed and memory benchmarks.")
    sub = parser.add_subparsers(dest="mode", required=True)
    gen = sub.add_parser("generate", help="prefill + decode tok/s and peak memory per KV cache")
    att = sub.add_parser("attention", help="decode attention kernels over N keys")
    chk = sub.add_parser("check", help="print the GPU target checks of a generate JSON")
    chk.add_argument("report", help="JSON written by `mlx_tq.bench generate --json`")
    for p, mode in ((gen, "generate"), (att, "attention")):
        p.add_argument(
            "--json", default=f"bench_{mode}.json", help="Write the results to this JSON file"
        )
        p.add_argument(
            "--plot",
            default=None,
            help="Write a plot to this PNG (needs matplotlib; default: the JSON's name, .png)",
        )
        p.add_argument(
            "--dtype",
            choices=["float16", "bfloat16", "float32"],
            default=None,
            help="Activations and fp16 baseline dtype (default: float16 on GPU, float32 on CPU)",
        )
        p.add_argument("--quick", action="store_true", help="A small run (a few minutes on CPU)")
    model = gen.add_mutually_exclusive_group()
    model.add_argument(
        "--model", default=None, help="HF repo, local mlx folder or .gguf (default: Gemma-3-270M)"
    )
    model.add_argument(
        "--random-model",
        choices=list(RANDOM_MODELS),
        default=None,
        help="A real model's shape with random weights (llama-3.1-8b: 4-bit weights)",
    )
    gen.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS)
    gen.add_argument("--decode-tokens", type=int, default=DEFAULT_DECODE_TOKENS)
    gen.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    gen.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    gen.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE)
    att.add_argument("--keys", type=int, nargs="+", default=DEFAULT_KEYS)
    att.add_argument("--heads", type=int, default=DEFAULT_HEADS, help="Query heads")
    att.add_argument("--kv-heads", type=int, default=DEFAULT_KV_HEADS)
    att.add_argument("--head-dim", type=int, default=DEFAULT_HEAD_DIM)
    att.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    att.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if args.mode == "check":
        with open(args.report) as f:
            print("\n".join(check_targets(json.load(f))))
        return
    if args.quick:
        for name, value in QUICK.items():
            if hasattr(args, name):
                setattr(args, name, value)
    if args.mode == "generate":
        if args.decode_tokens < 2:
            raise SystemExit("error: --decode-tokens must be at least 2")
        # fp16 is the reference of every ratio.
        args.configs = ["fp16"] + [c for c in args.configs if c != "fp16"]
        for name in args.configs:
            if not re.fullmatch(CONFIG_PATTERN, name):
                raise SystemExit(
                    f"error: unknown configuration {name!r}: use fp16, affine<b>, tq<b> or k<b>v<b>"
                )
        report = generate(args)
        print(generate_table(report["results"]))
        if report["dtype"] != "float16":
            print(f"fp16 = mlx-lm's default caches, here in {report['dtype']}")
        for e in report["errors"]:
            print(f"{e['config']} failed at {e['context']} tokens: {e['error']}")
        print("GPU targets, TQ4 against fp16:\n" + "\n".join(report["targets"]))
    else:
        report = attention(args)
        print(attention_table(report["results"]))
    plot(args.plot or str(Path(args.json).with_suffix(".png")), report)


if __name__ == "__main__":
    main()
