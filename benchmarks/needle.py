"""Pass-key retrieval through a compressed KV cache: `python benchmarks/needle.py --kv-bits 4 3`.

A five-digit pass key is hidden at several depths of filler text and asked for at the end;
the prompt is prefilled through each configuration's cache, a few tokens are decoded
greedily and the digits must match exactly.
"""

import argparse
import json
import random
import re
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from mlx_tq.cache import PRESETS
from mlx_tq.loading import load
from mlx_tq.patch import patch
from mlx_tq.tools import (
    CONFIG_HELP,
    REFERENCE,
    add_model_arguments,
    blas_hint,
    check_config,
    make_cache,
    model_dtype,
    positive_int,
    run_info,
    user_errors,
)

DEFAULT_LENGTHS = [1024, 2048]
DEFAULT_DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
DEFAULT_TRIALS = 2
DEFAULT_KV_BITS = [4, 3]
DEFAULT_COMPARE = ["k4v3"]
DEFAULT_CHUNK_SIZE = 256
DECODE_TOKENS = 8

INTRO = (
    "There is an important pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the pass key.\n"
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nQuestion: What is the pass key?\nAnswer: The pass key is"


def make_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """Token ids of about `length` tokens with the needle `depth` of the way into the filler."""
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    head, tail = encode(INTRO), encode(QUESTION)
    needle, filler = encode(NEEDLE.format(key=key)), encode(FILLER)
    n = max(length - len(head) - len(tail) - len(needle), 0)
    body = (filler * (n // len(filler) + 1))[:n]
    # Cut the filler at a sentence boundary so the needle starts a sentence.
    cut = int(depth * n) // len(filler) * len(filler)
    ids = head + body[:cut] + needle + body[cut:] + tail
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + ids


def retrieve(model, cache, prompt: list[int], chunk_size=DEFAULT_CHUNK_SIZE, bar=None) -> list[int]:
    """Prefills `prompt` through `cache` in chunks and greedily decodes `DECODE_TOKENS`.

    Args:
        bar: A tqdm bar advanced by the tokens of each chunk, if given.
    """
    x = mx.array(prompt)[None]
    body = getattr(model, "model", None)
    for start in range(0, x.shape[1] - 1, chunk_size):
        chunk = x[:, start : min(start + chunk_size, x.shape[1] - 1)]
        # Only the last position's logits are needed: skip the (large) vocabulary projection.
        mx.eval(body(chunk, cache=cache) if body is not None else model(chunk, cache=cache))
        if bar is not None:
            bar.update(chunk.shape[1])
    y, out = x[:, -1:], []
    for _ in range(DECODE_TOKENS):
        y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1, keepdims=True)
        out.append(y.item())
    return out


def run(model, tokenizer, configs, lengths, depths, trials, chunk_size, seed=0):
    """Exact-match rate per configuration and per (length, depth); see `main`."""
    rng = random.Random(seed)
    cases = [
        (n, d, str(rng.randrange(10000, 100000)))
        for n in lengths
        for d in depths
        for _ in range(trials)
    ]
    hits = {c: {} for c in configs}
    answers = {c: [] for c in configs}
    prompts = [make_prompt(tokenizer, n, d, key) for n, d, key in cases]
    total = sum(len(p) - 1 for p in prompts) * len(configs)
    with tqdm(total=total, desc="prompt tokens x configs", unit="tok") as bar:
        for (n, d, key), prompt in zip(cases, prompts, strict=True):
            for c in configs:
                out = retrieve(model, make_cache(model, c), prompt, chunk_size, bar)
                text = tokenizer.decode(out)
                digits = re.findall(r"\d+", text)
                ok = bool(digits) and digits[0] == key
                hits[c].setdefault(f"{n}@{d:.0%}", []).append(ok)
                answers[c].append({"length": n, "depth": d, "key": key, "text": text})
    return {
        name: {
            "accuracy": sum(sum(v) for v in cells.values()) / len(cases),
            "cells": {k: sum(v) / len(v) for k, v in cells.items()},
            "answers": answers[name],
        }
        for name, cells in hits.items()
    }


def format_table(results: dict, dtype: str) -> str:
    """Markdown: one row per configuration (fp16 named by `dtype`), one column per
    (length, depth), then the total."""
    cells = list(next(iter(results.values()))["cells"])
    lines = [
        "| config | " + " | ".join(cells) + " | all |",
        "|---" * (len(cells) + 2) + "|",
    ]
    for name, r in results.items():
        row = " | ".join(f"{100 * r['cells'][k]:.0f}%" for k in cells)
        name = f"{dtype} (unquantised)" if name == REFERENCE else name
        lines.append(f"| {name} | {row} | {100 * r['accuracy']:.0f}% |")
    return "\n".join(lines)


def depth(text: str) -> float:
    """An argparse ``type``: a fraction of the filler, 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not a depth between 0 and 1")
    return value


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        description="Pass-key retrieval through each KV cache, against mlx-lm's unquantised one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--lengths", type=positive_int, nargs="+", default=DEFAULT_LENGTHS, help="Prompt tokens"
    )
    parser.add_argument(
        "--depths",
        type=depth,
        nargs="+",
        default=DEFAULT_DEPTHS,
        help="Where the pass key sits, as a fraction of the filler",
    )
    parser.add_argument("--trials", type=positive_int, default=DEFAULT_TRIALS, help="Keys per cell")
    parser.add_argument(
        "--chunk-size",
        type=positive_int,
        default=DEFAULT_CHUNK_SIZE,
        help="Prefill tokens per call",
    )
    parser.add_argument(
        "--kv-bits",
        type=int,
        nargs="*",
        default=DEFAULT_KV_BITS,
        choices=PRESETS,
        help="TurboQuant presets to evaluate (tq<b>)",
    )
    parser.add_argument(
        "--compare",
        type=check_config,
        nargs="*",
        default=DEFAULT_COMPARE,
        help=f"More configurations: {CONFIG_HELP}",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the pass keys")
    parser.add_argument("--json", default=None, help="Also write the results to this file")
    return parser


def main():
    args = setup_arg_parser().parse_args()
    configs = list(dict.fromkeys([REFERENCE] + [f"tq{b}" for b in args.kv_bits] + args.compare))
    blas_hint()
    with user_errors():
        model, tokenizer = load(args.model, dtype=getattr(mx, args.dtype) if args.dtype else None)
    patch()
    results = run(
        model,
        tokenizer,
        configs,
        args.lengths,
        args.depths,
        args.trials,
        args.chunk_size,
        args.seed,
    )
    dtype = model_dtype(model)
    print(format_table(results, str(dtype).removeprefix("mlx.core.")))
    if args.json:
        meta = run_info("needle", dtype)
        meta |= {"lengths": args.lengths, "depths": args.depths, "trials": args.trials}
        Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
