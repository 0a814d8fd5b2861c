"""Aggregate decode throughput of concurrent requests (issue 17): TurboQuant caches batched, as
`mlx_tq.server` runs them; mlx-lm's fp16 caches batched, as `mlx_lm.server` does; and mlx-lm's
affine 4-bit cache one request at a time, as `mlx_lm.server --kv-bits 4` serves them. Drives
mlx-lm's `BatchGenerator` (the server's engine) directly, without HTTP, on a random-weight model
of a real shape (speed does not depend on the weights).

    python benchmarks/batch_throughput.py --model llama-3.1-8b --prompt 8192 --requests 1 4 8
    python benchmarks/batch_throughput.py --model tiny --prompt 64 --requests 1 2   # any CPU
"""

import argparse
import json
import time

import mlx.core as mx
from gpu_bench import RANDOM_MODELS, default_dtype, random_model
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache as lm_make_prompt_cache

import mlx_tq

TINY = dict(
    model_type="llama",
    hidden_size=256,
    num_hidden_layers=2,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    rms_norm_eps=1e-5,
    vocab_size=512,
)


def batched(model, prompts, max_tokens, make_cache):
    """(decode tok/s over all requests after each has its first token, peak bytes)."""
    mx.synchronize()
    mx.reset_peak_memory()
    gen = BatchGenerator(model, max_tokens=max_tokens, prefill_step_size=2048)
    uids = gen.insert(prompts, caches=[make_cache() for _ in prompts])
    first, tokens, t_first = set(), 0, None
    while len(first) < len(uids) or tokens < len(uids) * max_tokens:
        responses = gen.next_generated()
        if not responses:
            break
        for r in responses:
            tokens += 1
            first.add(r.uid)
        if t_first is None and len(first) == len(uids):
            t_first, counted = time.perf_counter(), tokens
    elapsed = time.perf_counter() - t_first
    gen.close()
    return (tokens - counted) / elapsed, mx.get_peak_memory()


def one_at_a_time(model, prompts, max_tokens, kv_bits):
    """mlx-lm's `--kv-bits` path: requests in turn, affine-quantised caches."""
    mx.synchronize()
    mx.reset_peak_memory()
    decode_time, tokens = 0.0, 0
    for p in prompts:
        steps = generate_step(
            mx.array(p),
            model,
            max_tokens=max_tokens,
            prompt_cache=lm_make_prompt_cache(model),
            kv_bits=kv_bits,
            kv_group_size=64,
            quantized_kv_start=0,
        )
        for i, _ in enumerate(steps):
            if i == 0:
                t0 = time.perf_counter()
        decode_time += time.perf_counter() - t0
        tokens += max_tokens - 1
    return tokens / decode_time, mx.get_peak_memory()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*RANDOM_MODELS, "tiny"], default="llama-3.1-8b")
    parser.add_argument("--prompt", type=int, default=8192, help="tokens per request")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", default="batch_throughput.json")
    args = parser.parse_args()
    if args.model == "tiny":
        model = llama.Model(llama.ModelArgs.from_dict(TINY))
        mx.eval(model.parameters())
    else:
        model = random_model(args.model, default_dtype())
    vocab = model.args.vocab_size
    mlx_tq.patch()
    configs = {
        "fp16 batched (mlx_lm.server)": lambda ps: batched(
            model, ps, args.max_tokens, lambda: lm_make_prompt_cache(model)
        ),
        "tq4 batched (mlx_tq.server)": lambda ps: batched(
            model, ps, args.max_tokens, lambda: mlx_tq.make_prompt_cache(model, kv_bits=4)
        ),
        "affine4 one at a time (mlx_lm.server --kv-bits 4)": lambda ps: one_at_a_time(
            model, ps, args.max_tokens, 4
        ),
    }
    report = {"args": vars(args), "device": str(mx.default_device()), "rows": []}
    for n in args.requests:
        key = mx.random.key(n)
        prompts = mx.random.randint(0, vocab, (n, args.prompt), key=key).tolist()
        for name, run in configs.items():
            try:
                tps, peak = run(prompts)
            except RuntimeError as e:  # mlx-lm's affine cache has no CUDA kernel for some shapes
                row = {"requests": n, "config": name, "error": str(e)}
            else:
                row = {"requests": n, "config": name, "decode_tok_s": tps, "peak_gb": peak / 1e9}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
