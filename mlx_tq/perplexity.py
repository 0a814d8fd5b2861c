"""Perplexity, KL divergence and top-1 agreement of KV caches against the unquantised cache.

`mlx_tq.perplexity --kv-bits 4 3 --compare affine8 affine4`: each window of the text is fed
through every cache in chunks, so most predictions attend to stored (compressed) keys and
values; each configuration is compared token by token with mlx-lm's plain cache.
"""

import argparse
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx_lm.models.cache as lm_cache
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from .bench import header
from .cache import PRESETS, make_prompt_cache
from .loading import load
from .patch import patch

DEFAULT_WINDOW = 512
DEFAULT_NUM_WINDOWS = 8
DEFAULT_CHUNK_SIZE = 64
DEFAULT_KV_BITS = [4, 3]
DEFAULT_COMPARE = ["affine8", "affine4"]
AFFINE_GROUP_SIZE = 64
REFERENCE = "fp16"


def default_data_path() -> Path:
    """`$MLX_TQ_PPL_DATA`, else WikiText-2's test split under ../shared next to the repository."""
    if "MLX_TQ_PPL_DATA" in os.environ:
        return Path(os.environ["MLX_TQ_PPL_DATA"])
    root = Path(__file__).resolve().parents[1]
    return root.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@dataclass
class Config:
    """A named way to build a model's cache: `make_cache(model) -> list`."""

    name: str
    make_cache: Callable


def _affine_cache(model, bits):
    # mlx-lm cannot quantise a RotatingKVCache (to_quantized raises), so every layer gets a
    # QuantizedKVCache: sliding-window layers keep all tokens and the mask does the windowing.
    n = len(lm_cache.make_prompt_cache(model))
    return [lm_cache.QuantizedKVCache(group_size=AFFINE_GROUP_SIZE, bits=bits) for _ in range(n)]


def parse_config(name: str, **options) -> Config:
    """A `Config` from its name.

    Args:
        name: ``fp16`` (mlx-lm's plain caches, in the model's dtype), ``affine<b>`` (mlx-lm's
            ``QuantizedKVCache``, group 64), ``tq<b>`` (the `PRESETS` entry for ``kv_bits=b``)
            or ``k<kb>v<vb>`` (TurboQuant with those key and value bits, no smoothing); the
            last two take a suffix ``-s<x>`` for ``smooth_keys=x``, then ``-sink`` or
            ``-nosink`` for ``exact_sink`` (``k<kb>v<vb>``: no sink unless it says so).
        **options: Passed to `make_prompt_cache` for the TurboQuant names.
    """
    if name == REFERENCE:
        return Config(name, lm_cache.make_prompt_cache)
    if m := re.fullmatch(r"affine(\d)", name):
        return Config(name, lambda model: _affine_cache(model, int(m[1])))
    if m := re.fullmatch(r"(?:tq(\d)|k(\d)v(\d))(?:-s([\d.]+))?(?:-(sink|nosink))?", name):
        bits = dict(kv_bits=int(m[1])) if m[1] else dict(key_bits=int(m[2]), value_bits=int(m[3]))
        if m[4] or m[2]:  # k<kb>v<vb> names the plain split unless it says -s<x>
            options = {**options, "smooth_keys": float(m[4] or 0)}
        if m[5] or m[2]:
            options = {**options, "exact_sink": m[5] == "sink"}
        return Config(name, lambda model: make_prompt_cache(model, **bits, **options))
    raise ValueError(
        f"unknown configuration {name!r}: use fp16, affine<b>, tq<b> or k<b>v<b>, "
        "the last two optionally with -s<smooth_keys> and -sink / -nosink"
    )


def load_windows(tokenizer, path, window: int, num_windows: int | None = None) -> mx.array:
    """Consecutive, non-overlapping windows of the text as (N, window + 1) token ids.

    Each row is BOS (when the tokenizer has one) then text tokens: the first `window` are
    fed, the last `window` are the targets.
    """
    text = Path(path).read_text(encoding="utf-8")
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


def _length(c) -> int:
    keys = c.keys[0] if isinstance(c.keys, tuple | list) else c.keys
    return keys.shape[2]


def kv_bits_per_element(caches, reference) -> float:
    """8 * sum(nbytes) / (2 * tokens * kv heads * head_dim) over the layers' caches.

    nbytes counts every buffer a cache holds (indices, scales, biases, key offsets); tokens
    is each buffer's length, heads and head_dim come from the matching `reference` cache.
    """
    held = sum(c.nbytes for c in caches)
    elements = sum(
        2 * _length(c) * r.keys.shape[1] * r.keys.shape[3]
        for c, r in zip(caches, reference, strict=True)
    )
    return 8 * held / elements


def evaluate(model, windows: mx.array, configs: list[Config], chunk_size=DEFAULT_CHUNK_SIZE):
    """Feeds every window through each configuration's cache and compares it with fp16.

    Args:
        model: An mlx-lm model.
        windows: (N, L + 1) token ids (see `load_windows`).
        configs: The configurations; the fp16 reference is always run.
        chunk_size: Tokens per forward call; each chunk's logits are its predictions.

    Returns:
        A dict per configuration name: ``ppl``, ``ppl_se``, ``delta_ppl`` (relative, from
        the paired per-token log-likelihood differences), ``delta_ppl_se``, ``kl`` (mean
        KL(fp16 || config) over the vocabulary), ``kl_se``, ``top1`` (agreement of argmax),
        ``bits_per_element`` (after the last window) and ``tokens``.
    """
    configs = [parse_config(REFERENCE)] + [c for c in configs if c.name != REFERENCE]
    nll = {c.name: [] for c in configs}
    kl = {c.name: [] for c in configs}
    top1 = {c.name: [] for c in configs}
    bits = {}
    N, L = windows.shape[0], windows.shape[1] - 1
    steps = N * -(-L // chunk_size)
    with tqdm(total=steps * len(configs), desc="windows x chunks x configs") as bar:
        for w in range(N):
            caches = [c.make_cache(model) for c in configs]
            for start in range(0, L, chunk_size):
                x = windows[w : w + 1, start : min(start + chunk_size, L)]
                y = windows[w, start + 1 : start + 1 + x.shape[1]]
                ref = None
                for c, cache in zip(configs, caches, strict=True):
                    logits = model(x, cache=cache)[0].astype(mx.float32)
                    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                    if ref is None:
                        ref, ref_top = logp, mx.argmax(logp, axis=-1)
                    d = mx.sum(mx.exp(ref) * (ref - logp), axis=-1)
                    t = mx.argmax(logp, axis=-1) == ref_top
                    n = -mx.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
                    mx.eval(d, t, n)
                    nll[c.name].append(np.array(n))
                    kl[c.name].append(np.array(d))
                    top1[c.name].append(np.array(t))
                    bar.update()
            reference = caches[0]
            for c, cache in zip(configs, caches, strict=True):
                bits[c.name] = kv_bits_per_element(cache, reference)
    ref_nll = np.concatenate(nll[REFERENCE]).astype(np.float64)
    results = {}
    for c in configs:
        n = np.concatenate(nll[c.name]).astype(np.float64)
        d = n - ref_nll
        k = np.concatenate(kl[c.name]).astype(np.float64)
        ppl, ratio = math.exp(n.mean()), math.exp(d.mean())
        sqrt_n = math.sqrt(len(n))
        results[c.name] = {
            "ppl": ppl,
            "ppl_se": ppl * n.std() / sqrt_n,
            "delta_ppl": ratio - 1,
            "delta_ppl_se": ratio * d.std() / sqrt_n,
            "kl": max(k.mean(), 0.0),
            "kl_se": k.std() / sqrt_n,
            "top1": float(np.concatenate(top1[c.name]).mean()),
            "bits_per_element": bits[c.name],
            "tokens": len(n),
        }
    return results


def format_table(results: dict) -> str:
    """A Markdown table: config | bits/elem | PPL ± se | ΔPPL | KL | top-1."""
    lines = [
        "| config | KV bits/elem | PPL ± se | ΔPPL ± se | KL ± se | top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['bits_per_element']:.3f} | {r['ppl']:.3f} ± {r['ppl_se']:.3f} "
            f"| {100 * r['delta_ppl']:+.2f}% ± {100 * r['delta_ppl_se']:.2f} "
            f"| {r['kl']:.4f} ± {r['kl_se']:.4f} | {100 * r['top1']:.1f}% |"
        )
    return "\n".join(lines)


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        description="Perplexity, KL and top-1 agreement of KV caches against mlx-lm's fp16 cache."
    )
    parser.add_argument(
        "--model", default=None, help="HF repo, local mlx folder or .gguf (default: Gemma-3-270M)"
    )
    parser.add_argument(
        "--data", default=None, help="UTF-8 text file (default: WikiText-2 test, see docs)"
    )
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="Tokens per window")
    parser.add_argument(
        "--num-windows", type=int, default=DEFAULT_NUM_WINDOWS, help="Windows (0: all the text)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="Bound the windows by tokens instead"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="Tokens per forward call"
    )
    parser.add_argument(
        "--kv-bits",
        type=int,
        nargs="*",
        default=DEFAULT_KV_BITS,
        help=f"TurboQuant presets to evaluate, from {tuple(PRESETS)}",
    )
    parser.add_argument(
        "--kv-key-bits", type=int, nargs="*", default=[], help="TurboQuant key bits (with values)"
    )
    parser.add_argument(
        "--kv-value-bits", type=int, nargs="*", default=[], help="TurboQuant value bits, paired"
    )
    parser.add_argument(
        "--compare",
        nargs="*",
        default=DEFAULT_COMPARE,
        help="More configurations: fp16, affine<b> (mlx-lm, group 64), tq<b>, k<b>v<b>[-s<x>]",
    )
    add_dtype_argument(parser)
    parser.add_argument("--json", default=None, help="Also write the results to this file")
    return parser


def add_dtype_argument(parser):
    """`--dtype` of the quality tools (perplexity, needle); see `load_model`."""
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="Weights and activations (default: a GGUF's float16 on GPU, float32 on CPU)",
    )


def load_model(args):
    """The model and tokenizer named by `--model`, in `--dtype`."""
    return load(args.model, dtype=getattr(mx, args.dtype) if args.dtype else None)


def model_dtype(model):
    return tree_flatten(model.parameters())[0][1].dtype


def main():
    args = setup_arg_parser().parse_args()
    if len(args.kv_key_bits) != len(args.kv_value_bits):
        raise SystemExit("error: give as many --kv-key-bits as --kv-value-bits")
    names = [f"tq{b}" for b in args.kv_bits]
    names += [f"k{k}v{v}" for k, v in zip(args.kv_key_bits, args.kv_value_bits, strict=True)]
    names += args.compare
    try:
        configs = [parse_config(n) for n in dict.fromkeys(names)]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    data = Path(args.data) if args.data else default_data_path()
    if not data.is_file():
        raise SystemExit(f"error: no text file at {data}: give one with --data")
    model, tokenizer = load_model(args)
    patch()
    num_windows = args.num_windows or None
    if args.max_tokens:
        num_windows = max(1, args.max_tokens // args.window)
    windows = load_windows(tokenizer, data, args.window, num_windows)
    results = evaluate(model, windows, configs, args.chunk_size)
    print(
        f"{windows.shape[0]} windows x {args.window} tokens of {data.name}, "
        f"chunks of {args.chunk_size}; fp16 = mlx-lm's plain cache in the model's dtype "
        f"({model_dtype(model)})"
    )
    print(format_table(results))
    if args.json:
        meta = {
            **header("perplexity", model_dtype(model)),
            "model": args.model or "gemma3-270m",
            "data": str(data),
            "window": args.window,
            "num_windows": int(windows.shape[0]),
            "chunk_size": args.chunk_size,
        }
        Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
