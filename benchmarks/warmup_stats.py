"""How many tokens the key statistics need: KL against the fp16 cache when the first update
is short (a chat's first turn), for several warm-up lengths (issue 18).

Each window of WikiText-2 is fed as one update (statistics from the whole window), or as a
first update of `n` tokens followed by 64-token chunks. KL is averaged over the positions
from `--from` on, which every warm-up has quantised, and over all positions.

    python benchmarks/warmup_stats.py [--windows 4] [--window 512] [--from 256]
"""

import argparse
import json
import os
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache as fp16_cache

import mlx_tq

DATA = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


def logprobs(model, tokens, cache, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(model(tokens[:, i : i + n], cache=cache)[0].astype(mx.float32))
        i += n
    x = mx.concatenate(out)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def chunks(first, total, chunk=64):
    sizes = [first]
    while sum(sizes) < total:
        sizes.append(min(chunk, total - sum(sizes)))
    return sizes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--from", dest="start", type=int, default=256)
    parser.add_argument("--warmups", type=int, nargs="+", default=[0, 32, 64, 128, 256])
    parser.add_argument("--firsts", type=int, nargs="+", default=[1, 2, 3, 8])
    parser.add_argument("--kv-bits", type=int, default=4)
    parser.add_argument("--data", default=os.environ.get("MLX_TQ_PPL_DATA", DATA))
    args = parser.parse_args()
    model, tokenizer = mlx_tq.load()
    mx.random.seed(0)
    ids = tokenizer.encode(Path(args.data).read_text(encoding="utf-8")[200_000:400_000])
    mlx_tq.patch()
    runs = {"one chunk": (0, [args.window])}
    runs.update(
        {
            f"warmup {w}, first {n}": (w, chunks(n, args.window))
            for w in args.warmups
            for n in args.firsts
        }
    )
    kl = {name: [0.0, 0.0] for name in runs}
    for i in range(args.windows):
        tokens = mx.array(ids[i * args.window : (i + 1) * args.window])[None]
        ref = logprobs(model, tokens, fp16_cache(model), [args.window])
        for name, (warmup, sizes) in runs.items():
            cache = mlx_tq.make_prompt_cache(model, kv_bits=args.kv_bits, warmup_tokens=warmup)
            d = mx.sum(mx.exp(ref) * (ref - logprobs(model, tokens, cache, sizes)), axis=-1)
            kl[name][0] += d[args.start :].mean().item() / args.windows
            kl[name][1] += d.mean().item() / args.windows
    base = kl["one chunk"][0]
    for name, (late, every) in kl.items():
        print(f"{name:24s} KL from {args.start}: {late:.4f} ({late / base:.2f}x)  all: {every:.4f}")
    print(json.dumps({"args": vars(args) | {"data": str(args.data)}, "kl": kl}))


if __name__ == "__main__":
    main()
