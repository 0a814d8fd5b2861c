"""Speed and memory of KV caches in generation: `mlx_tq.bench generate --quick`.

Each configuration's cache is filled with a prompt of N random tokens, then M tokens are
decoded greedily; prompt and decode tok/s, peak memory and the KV bytes held are reported
as medians over repeats, in a table, a JSON file and a plot.
"""

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from .loading import load
from .patch import patch
from .tools import (
    CONFIG_HELP,
    REFERENCE,
    add_model_arguments,
    blas_hint,
    check_config,
    describe,
    kv_footprint,
    make_cache,
    positive_int,
    run_info,
    user_errors,
)

DEFAULT_CONFIGS = ["fp16", "affine8", "affine4", "tq4", "tq3", "k4v3"]
DEFAULT_CONTEXTS = [1024, 4096, 16384]
DEFAULT_DECODE_TOKENS = 32
DEFAULT_REPEATS = 2
DEFAULT_PREFILL_STEP_SIZE = 2048
QUICK = {"contexts": [256, 1024], "decode_tokens": 8, "repeats": 1}
WARMUP_TOKENS = 256
PROMPT_SEED = 0
FIELDS = ("prompt_tps", "decode_tps", "peak_memory", "prefill_peak_memory", "decode_peak_memory")
PLOT_EXTRA = "pip install 'mlx-tq[bench]'"


def timed_generate(model, prompt, cache, decode_tokens, prefill_step_size):
    """Feeds `prompt` through `cache` and decodes `decode_tokens` greedily, timed as mlx-lm's
    `stream_generate` does.

    Returns:
        Prompt seconds, decode tok/s (of the tokens after the first), the last token and the
        peak memory (bytes) of the prefill and of the decode.
    """
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


def measure(model, name, prompt, kept, decode_tokens, prefill_step_size) -> dict:
    """One run of configuration `name`: prefill `prompt` and decode into a new cache, or,
    when `kept` has its cache from an earlier repeat, decode on from it (no second prefill)."""
    r = {}
    if name in kept:
        cache, token = kept[name]
        _, r["decode_tps"], token, _ = timed_generate(
            model, mx.array([token]), cache, decode_tokens, 1
        )
    else:
        cache = make_cache(model, name)
        gc.collect()
        mx.clear_cache()
        held = mx.get_active_memory()
        mx.reset_peak_memory()
        seconds, r["decode_tps"], token, peaks = timed_generate(
            model, prompt, cache, decode_tokens, prefill_step_size
        )
        r["prompt_tps"] = prompt.size / seconds
        # As if alone: the weights, not the other configurations' kept caches.
        weights = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
        r["prefill_peak_memory"], r["decode_peak_memory"] = (p - held + weights for p in peaks)
        r["peak_memory"] = max(peaks) - held + weights
        f = kv_footprint(cache)
        r["kv_bytes"], r["kv_bits"] = f["held"], f["bits"]
    kept[name] = cache, token
    return r


def summarize(runs: list[dict]) -> list[dict]:
    """Medians per (context, config) and the decode speed relative to the fp16 row."""
    rows = []
    for context, config in dict.fromkeys((r["context"], r["config"]) for r in runs):
        mine = [r for r in runs if r["context"] == context and r["config"] == config]
        row = {"context": context, "config": config, "repeats": len(mine)}
        for field in FIELDS + ("kv_bytes", "kv_bits"):
            row[field] = statistics.median(r[field] for r in mine if field in r)
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["context"] == row["context"] and r["config"] == REFERENCE)
        row["decode_vs_fp16"] = row["decode_tps"] / base["decode_tps"]
    return rows


def run(
    model, configs, contexts, decode_tokens, repeats, prefill_step_size, json_path=None, facts=None
):
    """Runs every configuration at every context; see the module docstring.

    Args:
        model: An mlx-lm model; its dtype is the unquantised (fp16) row's.
        configs: Configuration names (`mlx_tq.tools`), fp16 first: the reference of ratios.
        contexts: Prompt lengths in tokens.
        decode_tokens: Tokens decoded per run (at least 2).
        repeats: Runs per (context, config); later repeats decode on from the first's cache.
        prefill_step_size: Prompt tokens per forward call.
        json_path: If given, the report is rewritten there after every run.
        facts: What the report starts with (model, device...).

    Returns:
        The report: run facts, ``runs``, ``results`` (`summarize`) and ``errors`` (a
        configuration that raises is reported and skipped, e.g. mlx-lm's affine cache on
        backends without its kernels).
    """
    vocab = model.args.vocab_size
    report = {
        **(facts or {}),
        "weights_bytes": sum(a.nbytes for _, a in tree_flatten(model.parameters())),
        "prompt": f"random token ids (seed {PROMPT_SEED}): speed does not depend on the text",
        "decode_tokens": decode_tokens,
        "prefill_step_size": prefill_step_size,
        "configs": configs,
        "contexts": contexts,
        "cache_settings": {name: describe(make_cache(model, name)) for name in configs},
        "runs": [],
        "errors": [],
    }

    def failed(name, context, e):
        if name == REFERENCE:
            raise e
        report["errors"].append({"context": context, "config": name, "error": str(e)})
        print(f"context {context}, config {name}: failed: {e}", file=sys.stderr, flush=True)

    # Warm-up: compile every configuration's kernels before timing.
    warm = mx.random.randint(0, vocab, (min(*contexts, WARMUP_TOKENS),))
    broken = set()
    for name in configs:
        try:
            timed_generate(model, warm, make_cache(model, name), 2, prefill_step_size)
        except Exception as e:
            failed(name, warm.size, e)
            broken.add(name)
    for context in contexts:
        prompt = mx.random.randint(0, vocab, (context,), key=mx.random.key(PROMPT_SEED + context))
        kept, skip = {}, set(broken)
        for repeat in range(repeats):
            # Rotate the order each repeat so no configuration always runs first.
            k = repeat % len(configs)
            for name in [c for c in configs[k:] + configs[:k] if c not in skip]:
                r = {"context": context, "config": name, "repeat": repeat}
                try:
                    r.update(measure(model, name, prompt, kept, decode_tokens, prefill_step_size))
                except Exception as e:
                    failed(name, context, e)
                    skip.add(name)
                    continue
                report["runs"].append(r)
                line = ", ".join(
                    f"{f} {v:.4g}" if isinstance(v, float) else f"{f} {v}" for f, v in r.items()
                )
                print(line, file=sys.stderr, flush=True)
                report["results"] = summarize(report["runs"])
                if json_path:
                    Path(json_path).write_text(json.dumps(report, indent=1))
    return report


def format_table(rows: list[dict], dtype: str) -> str:
    """Markdown, one row per (context, config); the fp16 rows named by `dtype`."""
    lines = [
        "| context | config | prompt tok/s | decode tok/s | decode / fp16 | peak GB | "
        "prefill / decode peak GB | KV MB held | KV bits/elem |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"{dtype} (unquantised)" if r["config"] == REFERENCE else r["config"]
        lines.append(
            f"| {r['context']} | {name} | {r['prompt_tps']:.1f} | {r['decode_tps']:.2f} | "
            f"{r['decode_vs_fp16']:.2f} | {r['peak_memory'] / 1e9:.3f} | "
            f"{r['prefill_peak_memory'] / 1e9:.3f} / {r['decode_peak_memory'] / 1e9:.3f} | "
            f"{r['kv_bytes'] / 1e6:.2f} | {r['kv_bits']:.2f} |"
        )
    return "\n".join(lines)


def plot(path: str, report: dict):
    """Decode tok/s, peak memory and KV bytes held against context length, one line per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    panels = [
        ("decode_tps", "decode tok/s", 1),
        ("peak_memory", "peak memory (GB)", 1e9),
        ("kv_bytes", "KV cache held (MB)", 1e6),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (field, label, unit) in zip(axes, panels, strict=True):
        for name in dict.fromkeys(r["config"] for r in rows):
            mine = [r for r in rows if r["config"] == name]
            ax.plot([r["context"] for r in mine], [r[field] / unit for r in mine], "o-", label=name)
        xs = sorted({r["context"] for r in rows})
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set(xlabel="context length (tokens)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['model']} on {report['device']}, {report['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        description="Speed and memory of KV caches in generation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="mode", required=True, help="what to measure")
    gen = sub.add_parser(
        "generate",
        help="prefill + decode tok/s, peak memory and KV bytes per cache",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(gen)
    gen.add_argument(
        "--configs",
        type=check_config,
        nargs="+",
        default=DEFAULT_CONFIGS,
        help=f"Caches: {CONFIG_HELP}",
    )
    gen.add_argument(
        "--contexts", type=positive_int, nargs="+", default=DEFAULT_CONTEXTS, help="Prompt tokens"
    )
    gen.add_argument(
        "--decode-tokens",
        type=positive_int,
        default=DEFAULT_DECODE_TOKENS,
        help="Tokens decoded per run",
    )
    gen.add_argument(
        "--repeats", type=positive_int, default=DEFAULT_REPEATS, help="Runs per context and config"
    )
    gen.add_argument(
        "--prefill-step-size",
        type=positive_int,
        default=DEFAULT_PREFILL_STEP_SIZE,
        help="Prompt tokens per forward call",
    )
    gen.add_argument(
        "--quick",
        action="store_true",
        help="A small run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()),
    )
    gen.add_argument("--json", default="bench_generate.json", help="Write the results to this file")
    gen.add_argument(
        "--plot",
        default=None,
        help=f"Write a plot to this PNG (default: the JSON's name; {PLOT_EXTRA})",
    )
    return parser


def main(argv=None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.decode_tokens < 2:
        parser.error("--decode-tokens must be at least 2")
    configs = list(dict.fromkeys([REFERENCE] + args.configs))
    has_plot = importlib.util.find_spec("matplotlib") is not None
    plot_path = args.plot or str(Path(args.json).with_suffix(".png"))
    if not has_plot:
        print(
            f"matplotlib is not installed: no plot written to {plot_path} ({PLOT_EXTRA})",
            file=sys.stderr,
        )
    blas_hint()
    gpu = mx.default_device() == mx.gpu
    dtype = getattr(mx, args.dtype) if args.dtype else (mx.float16 if gpu else mx.float32)
    with user_errors():
        model = load(args.model, dtype=dtype)[0]
    patch()
    facts = {**run_info("generate", dtype), "model": args.model}
    print(f"{facts['model']}; {facts['device']}; {facts['dtype']}", flush=True)
    report = run(
        model, configs, args.contexts, args.decode_tokens, args.repeats, args.prefill_step_size,
        args.json, facts,
    )  # fmt: skip
    print(format_table(report["results"], facts["dtype"]))
    for e in report["errors"]:
        print(f"{e['config']} failed at {e['context']} tokens: {e['error']}")
    if has_plot:
        plot(plot_path, report)
        print(f"wrote {args.json} and {plot_path}")


if __name__ == "__main__":
    main()
