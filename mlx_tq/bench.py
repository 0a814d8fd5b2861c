"""Speed and memory of KV caches in generation: `mlx_tq.bench --quick`.

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

from . import tools
from .loading import load
from .patch import patch

DEFAULT_CONFIGS = ["fp16", "affine8", "affine4", "tq4", "tq3", "k4v3"]
DEFAULT_CONTEXTS = [1024, 4096, 16384]
DEFAULT_DECODE_TOKENS = 32
DEFAULT_REPEATS = 2
DEFAULT_PREFILL_STEP = 2048
QUICK = {"contexts": [256, 1024], "decode_tokens": 8, "repeats": 1}
COMPILE_TOKENS = 256  # the untimed first run of each configuration
PROMPT_SEED = 0
FIELDS = ("prompt_tps", "decode_tps", "host_ms", "peak_memory", "kv_bytes", "kv_bits")
PLOT_EXTRA = "pip install 'mlx-tq[bench]'"


class _HostTimer:
    """The model, timing its calls: building a step's graph in Python, before it runs."""

    def __init__(self, model):
        self.model, self.seconds, self.calls = model, 0.0, 0

    def __call__(self, *args, **kwargs):
        tic = time.perf_counter()
        out = self.model(*args, **kwargs)
        self.seconds += time.perf_counter() - tic
        self.calls += 1
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


def measure(model, name, prompt, decode_tokens, prefill_step_size) -> dict:
    """One run of configuration `name`: `prompt` into a new cache, then `decode_tokens` greedy
    tokens, timed as mlx-lm's `stream_generate` does (decode tok/s of the tokens after the
    first); host ms per decode step (the model call: building its graph, which the GPU's
    work overlaps, and any evaluation a cache forces there, e.g. the one that ends its
    warm-up); peak memory in bytes, KV bytes and bits of the rows holding tokens."""
    cache = tools.make_cache(model, name)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    timed = _HostTimer(model)
    tic = time.perf_counter()
    options = dict(max_tokens=decode_tokens, prefill_step_size=prefill_step_size)
    for i, _ in enumerate(generate_step(prompt, timed, prompt_cache=cache, **options)):
        if i == 0:
            prompt_tps = prompt.size / (time.perf_counter() - tic)
            tic = time.perf_counter()
            timed.seconds, timed.calls = 0.0, 0
    decode_tps = (decode_tokens - 1) / (time.perf_counter() - tic)
    host_ms = 1e3 * timed.seconds / max(timed.calls, 1)
    # generate_step has queued one more step: let it finish before the next run starts.
    mx.synchronize()
    f = tools.kv_footprint(cache)
    values = (prompt_tps, decode_tps, host_ms, mx.get_peak_memory(), f["held"], f["bits"])
    return dict(zip(FIELDS, values, strict=True))


def summarize(runs: list[dict]) -> list[dict]:
    """Medians per (context, config) and the decode speed relative to the fp16 row."""
    rows = {}
    for context, config in dict.fromkeys((r["context"], r["config"]) for r in runs):
        mine = [r for r in runs if r["context"] == context and r["config"] == config]
        row = {"context": context, "config": config, "repeats": len(mine)}
        rows[context, config] = row | {f: statistics.median(r[f] for r in mine) for f in FIELDS}
    for (context, _), row in rows.items():
        row["decode_vs_fp16"] = row["decode_tps"] / rows[context, tools.REFERENCE]["decode_tps"]
    return list(rows.values())


def run(
    model, configs, contexts, decode_tokens, repeats, prefill_step_size, json_path=None, facts=None
):
    """Runs every configuration at every context; see the module docstring.

    Args:
        model: An mlx-lm model; its dtype is the unquantised (fp16) row's.
        configs: Configuration names (`mlx_tq.tools`), fp16 first: the reference of ratios.
        contexts: Prompt lengths in tokens.
        decode_tokens: Tokens decoded per run (at least 2).
        repeats: Runs per (context, config).
        prefill_step_size: Prompt tokens per forward call.
        json_path: If given, the report is rewritten there after every run.
        facts: What the report starts with (model, device...).

    Returns:
        The report: the facts, ``runs``, ``results`` (`summarize`) and ``errors``: a
        configuration that fails its warm-up (e.g. mlx-lm's affine cache on a backend
        without its kernels) is reported there and skipped.
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
        "cache_settings": {name: tools.describe(tools.make_cache(model, name)) for name in configs},
        "runs": [],
        "errors": [],
    }
    # Warm-up: compile every configuration's kernels before timing.
    warm = mx.random.randint(0, vocab, (min(*contexts, COMPILE_TOKENS),))
    for name in configs:
        try:
            measure(model, name, warm, 2, prefill_step_size)
        except Exception as e:
            if name == tools.REFERENCE:
                raise
            report["errors"].append({"context": warm.size, "config": name, "error": str(e)})
            print(f"{name}: failed: {e}", file=sys.stderr, flush=True)
    failed = {e["config"] for e in report["errors"]}
    for context in contexts:
        prompt = mx.random.randint(0, vocab, (context,), key=mx.random.key(PROMPT_SEED + context))
        for repeat in range(repeats):
            # Rotate the order each repeat so no configuration always runs first.
            k = repeat % len(configs)
            for name in [c for c in configs[k:] + configs[:k] if c not in failed]:
                r = {"context": context, "config": name, "repeat": repeat}
                r.update(measure(model, name, prompt, decode_tokens, prefill_step_size))
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
        "| context | config | prompt tok/s | decode tok/s | decode / fp16 | host ms/token | "
        "peak GB | KV MB held | KV bits/elem |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"{dtype} (unquantised)" if r["config"] == tools.REFERENCE else r["config"]
        lines.append(
            f"| {r['context']} | {name} | {r['prompt_tps']:.1f} | {r['decode_tps']:.2f} | "
            f"{r['decode_vs_fp16']:.2f} | {r['host_ms']:.2f} | {r['peak_memory'] / 1e9:.3f} | "
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
    for ax, (field, ylabel, unit) in zip(axes, panels, strict=True):
        for name in dict.fromkeys(r["config"] for r in rows):
            mine = [r for r in rows if r["config"] == name]
            name = f"{report['dtype']} (unquantised)" if name == tools.REFERENCE else name
            ax.plot([r["context"] for r in mine], [r[field] / unit for r in mine], "o-", label=name)
        xs = sorted({r["context"] for r in rows})
        ax.set(xscale="log", xlabel="context length (tokens)", ylabel=ylabel)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['model']} on {report['device']}, {report['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        description="Prompt and decode tok/s, peak memory and KV bytes of KV caches.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tools.add_model_arguments(parser)
    arg, count, config = parser.add_argument, tools.positive_int, tools.check_config
    arg("--configs", type=config, nargs="+", default=DEFAULT_CONFIGS, help=tools.CONFIG_HELP)
    arg("--contexts", type=count, nargs="+", default=DEFAULT_CONTEXTS, help="Prompt tokens")
    arg("--decode-tokens", type=count, default=DEFAULT_DECODE_TOKENS, help="Tokens decoded per run")
    arg("--repeats", type=count, default=DEFAULT_REPEATS, help="Runs per context and config")
    arg("--prefill-step-size", type=count, default=DEFAULT_PREFILL_STEP, help="Tokens per call")
    arg("--quick", action="store_true", help=f"A small run: {QUICK}")
    arg(
        "--json",
        type=tools.output_file,
        default="bench_generate.json",
        help="Write the results to this file",
    )
    arg(
        "--plot",
        type=tools.output_file,
        help=f"PNG to write; None: the JSON's name with .png (needs {PLOT_EXTRA})",
    )
    return parser


def main(argv=None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if args.decode_tokens < 2:
        parser.error("--decode-tokens must be at least 2")
    configs = list(dict.fromkeys([tools.REFERENCE] + args.configs))
    has_plot = importlib.util.find_spec("matplotlib") is not None
    plot_path = args.plot or str(Path(args.json).with_suffix(".png"))
    if not has_plot:
        print(
            f"matplotlib is not installed: no plot written to {plot_path} ({PLOT_EXTRA})",
            file=sys.stderr,
        )
    tools.blas_hint()
    with tools.user_errors():
        model = load(args.model, dtype=getattr(mx, args.dtype) if args.dtype else None)[0]
    patch()
    dtype = tools.model_dtype(model)
    facts = {**tools.run_info("generate", dtype), "model": args.model}
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
