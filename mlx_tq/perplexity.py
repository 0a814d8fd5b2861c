"""Perplexity, KL divergence and top-1 agreement of KV caches against the unquantised cache.

`mlx_tq.perplexity --kv-bits 4 3 --compare affine8 affine4`: each window of the text is fed
through every cache in chunks, so most predictions attend to stored (compressed) keys and
values; each configuration is compared token by token with mlx-lm's plain cache.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from . import tools
from .attention import FUSED_MAX_ROWS
from .cache import PRESETS, WARMUP_TOKENS
from .loading import load
from .patch import patch

DEFAULT_WINDOW = 512
DEFAULT_NUM_WINDOWS = 8
DEFAULT_CHUNK_SIZE = 64
DEFAULT_KV_BITS = [4, 3]
DEFAULT_COMPARE = ["affine8", "affine4"]
DATA_ENV = "MLX_TQ_PPL_DATA"


def load_windows(tokenizer, path, window: int, num_windows: int | None = None) -> mx.array:
    """Consecutive, non-overlapping windows of the text as (N, window + 1) token ids.

    Each row is BOS (when the tokenizer has one) then text tokens: the first `window` are
    fed, the last `window` are the targets. Raises ValueError for a file that is not UTF-8
    text or holds less than one window.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from e
    tokens = tokenizer.encode(text, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    n = window if bos is not None else window + 1
    count = len(tokens) // n if num_windows is None else min(num_windows, len(tokens) // n)
    if count == 0:
        raise ValueError(f"{path} has {len(tokens)} tokens: fewer than one window of {n}")
    rows = np.array(tokens[: count * n]).reshape(count, n)
    if bos is not None:
        rows = np.concatenate([np.full((count, 1), bos), rows], axis=1)
    return mx.array(rows)


def evaluate(
    model,
    windows: mx.array,
    configs: list[str],
    chunk_size=DEFAULT_CHUNK_SIZE,
    first_update=0,
    deadline=None,
    batch_size=1,
):
    """Feeds every window through each configuration's cache and compares it with fp16.

    Args:
        model: An mlx-lm model.
        windows: (N, L + 1) token ids (see `load_windows`).
        configs: Configuration names (`mlx_tq.tools`); the fp16 reference is always run.
        chunk_size: Tokens per forward call; each call's logits are its predictions.
        first_update: If > 0, the first `first_update` tokens of each window go in one call,
            as a chat's first turn, then the rest in chunks of `chunk_size`.
        deadline: A `time.monotonic()` value: no batch of windows starts after it (at least
            one runs); the results are those of the windows done.
        batch_size: Windows fed together, as the rows of one batch (B): each row's cache keeps
            its own statistics, so the numbers are those of one window at a time, in fewer
            forward calls (to float rounding).

    Returns:
        A dict per configuration name: ``ppl``, ``ppl_se``, ``delta_ppl`` (relative, from
        the paired per-token log-likelihood differences), ``delta_ppl_se``, ``kl`` (mean
        KL(fp16 || config) over the vocabulary), ``kl_se``, ``top1`` (agreement of argmax),
        ``bits_per_element`` (of the rows held after the last window), ``tokens`` and
        ``windows`` (evaluated).
    """
    configs = [tools.REFERENCE] + [c for c in configs if c != tools.REFERENCE]
    # Per configuration and batch of windows: (nll, kl, top-1) lists of (windows, tokens) chunks.
    per_batch, bits = {c: [] for c in configs}, {}
    N, L = windows.shape[0], windows.shape[1] - 1
    starts = ([0] if first_update else []) + list(range(first_update, L, chunk_size))
    ends = starts[1:] + [L]
    done = 0
    with tqdm(total=N * len(starts) * len(configs), desc="windows x chunks x configs") as bar:
        for w in range(0, N, batch_size):
            if w and deadline is not None and time.monotonic() > deadline:
                break
            done = min(w + batch_size, N)
            caches = [tools.make_cache(model, c) for c in configs]
            for c in configs:
                per_batch[c].append(([], [], []))
            for start, end in zip(starts, ends, strict=True):
                x = windows[w:done, start:end]
                y = windows[w:done, start + 1 : end + 1]
                ref = None
                for c, cache in zip(configs, caches, strict=True):
                    logits = model(x, cache=cache).astype(mx.float32)
                    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                    if ref is None:
                        ref, ref_top = logp, mx.argmax(logp, axis=-1)
                    d = mx.sum(mx.exp(ref) * (ref - logp), axis=-1)
                    t = mx.argmax(logp, axis=-1) == ref_top
                    n = -mx.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
                    mx.eval(n, d, t)
                    for out, a in zip(per_batch[c][-1], (n, d, t), strict=True):
                        out.append(np.array(a))
                    bar.update(done - w)
            for c, cache in zip(configs, caches, strict=True):
                bits[c] = tools.kv_footprint(cache)["bits"]
    ref_nll = _tokens([b[0] for b in per_batch[tools.REFERENCE]])
    results = {}
    for c in configs:
        n, k, top1 = (_tokens(a) for a in zip(*per_batch[c], strict=True))
        d = n - ref_nll
        ppl, ratio = math.exp(n.mean()), math.exp(d.mean())
        sqrt_n = math.sqrt(len(n))
        results[c] = {
            "ppl": ppl,
            "ppl_se": ppl * n.std() / sqrt_n,
            "delta_ppl": ratio - 1,
            "delta_ppl_se": ratio * d.std() / sqrt_n,
            "kl": max(k.mean(), 0.0),
            "kl_se": k.std() / sqrt_n,
            "top1": float(top1.mean()),
            "bits_per_element": bits[c],
            "tokens": len(n),
            "windows": done,
        }
    return results


def _tokens(batches) -> np.ndarray:
    """Per-token float64 values from batches of (windows, tokens) chunks, window by window."""
    return np.concatenate([np.concatenate(b, axis=1).reshape(-1) for b in batches]).astype(
        np.float64
    )


def format_table(feeds: dict, dtype: str, chunk_size: int) -> str:
    """Markdown: config | feed | KV bits/elem | PPL ± se | ΔPPL | KL | top-1.

    Args:
        feeds: ``{first_update: evaluate's results}``; 0 is the plain chunked feed.
        dtype: The model's dtype, which names the fp16 (unquantised) row.
        chunk_size: The chunk size the results were computed with.
    """
    lines = [
        "| config | feed | KV bits/elem | PPL ± se | ΔPPL ± se | KL ± se | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for first, results in feeds.items():
        feed = f"{first}, then {chunk_size}s" if first else f"chunks of {chunk_size}"
        for name, r in results.items():
            name = f"{dtype} (unquantised)" if name == tools.REFERENCE else name
            lines.append(
                f"| {name} | {feed} | {r['bits_per_element']:.3f} "
                f"| {r['ppl']:.3f} ± {r['ppl_se']:.3f} "
                f"| {100 * r['delta_ppl']:+.2f}% ± {100 * r['delta_ppl_se']:.2f} "
                f"| {r['kl']:.4f} ± {r['kl_se']:.4f} | {100 * r['top1']:.1f}% |"
            )
    return "\n".join(lines)


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        description="Perplexity, KL and top-1 agreement of KV caches against mlx-lm's "
        "unquantised cache, the text fed through each cache in chunks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tools.add_model_arguments(parser)
    arg, count, config = parser.add_argument, tools.positive_int, tools.check_config
    arg("--data", default=os.environ.get(DATA_ENV), help=f"UTF-8 text file; ${DATA_ENV} sets it")
    arg("--window", type=count, default=DEFAULT_WINDOW, help="Tokens per window")
    arg("--num-windows", type=int, default=DEFAULT_NUM_WINDOWS, help="Windows (0: the whole text)")
    arg("--chunk-size", type=count, default=DEFAULT_CHUNK_SIZE, help="Tokens per forward call")
    arg(
        "--first-update",
        type=count,
        help="Also feed each window chat-shaped: this many tokens in one call (a first turn), "
        "then chunks; the table gets rows for both feeds",
    )
    arg(
        "--batch-size",
        type=count,
        default=1,
        help="Windows fed together as one batch: the same computation per window in fewer "
        "forward calls (the model's matmuls may round differently at another batch size, "
        "which quantised caches can amplify on a small sample)",
    )
    arg("--kv-bits", type=int, nargs="*", choices=PRESETS, default=DEFAULT_KV_BITS, help="As tq<b>")
    arg("--compare", type=config, nargs="*", default=DEFAULT_COMPARE, help=tools.CONFIG_HELP)
    arg("--json", type=tools.output_file, help="Also write the results to this file")
    arg(
        "--time-limit",
        type=count,
        help="Seconds: start no window after this (per feed) and report the windows done",
    )
    return parser


def main():
    parser = setup_arg_parser()
    args = parser.parse_args()
    if args.num_windows < 0:
        parser.error("--num-windows must be 0 (all the text) or more")
    if args.first_update is not None and args.first_update >= args.window:
        parser.error(f"--first-update must be shorter than the window ({args.window})")
    if not args.data:
        parser.error(f"give a text file with --data or ${DATA_ENV}")
    data = Path(args.data)
    if not data.is_file():
        parser.error(f"no text file at {data}: give one with --data or ${DATA_ENV}")
    configs = list(dict.fromkeys([f"tq{b}" for b in args.kv_bits] + args.compare))
    if args.window <= WARMUP_TOKENS:
        print(
            f"note: TurboQuant caches hold their first {WARMUP_TOKENS} tokens exactly: a window "
            f"of {args.window} measures none of their quantisation (see -w<n> in --compare)",
            file=sys.stderr,
        )
    if args.chunk_size > FUSED_MAX_ROWS and any(map(tools.recent_tokens, configs)):
        print(
            f"note: chunks of {args.chunk_size} tokens are prefill: they read packed rows only, "
            f"not the exact recent window of decoding (-r<n>); --chunk-size {FUSED_MAX_ROWS} "
            "or less measures decoding",
            file=sys.stderr,
        )
    tools.blas_hint()
    with tools.user_errors():
        model, tokenizer = load(args.model, dtype=getattr(mx, args.dtype) if args.dtype else None)
        windows = load_windows(tokenizer, data, args.window, args.num_windows or None)
    patch()
    feeds = {}
    for n in dict.fromkeys([0, args.first_update or 0]):
        deadline = time.monotonic() + args.time_limit if args.time_limit else None
        feeds[n] = evaluate(model, windows, configs, args.chunk_size, n, deadline, args.batch_size)
    dtype = tools.model_dtype(model)
    done = min(r["windows"] for feed in feeds.values() for r in feed.values())
    print(f"{done} window{'s' * (done > 1)} x {args.window} tokens of {data.name}")
    print(format_table(feeds, str(dtype).removeprefix("mlx.core."), args.chunk_size))
    if args.json:
        meta = {**tools.run_info("perplexity", dtype), "model": args.model, "data": str(data)}
        meta |= {"window": args.window, "num_windows": done, "time_limit": args.time_limit}
        meta |= {"chunk_size": args.chunk_size, "first_update": args.first_update}
        meta["batch_size"] = args.batch_size
        meta["results"] = feeds[0]
        if args.first_update:
            meta["first_update_results"] = feeds[args.first_update]
        Path(args.json).write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
