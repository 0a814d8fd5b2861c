"""The team's GPU benchmark: `mlx_tq.bench`'s generate run on real model shapes with random
weights (the lent GPU cannot fetch real ones), checked against the decode and memory targets.

    python benchmarks/gpu_bench.py --model llama-3.1-8b --contexts 8192 32768 --json out.json
    python benchmarks/gpu_bench.py --check out.json
"""

import argparse
import importlib
import json

import mlx.core as mx
import mlx.nn as nn

from mlx_tq import bench
from mlx_tq.patch import patch
from mlx_tq.tools import REFERENCE, run_info

# TQ4 decode speed / fp16 at a context length, and the share of fp16 KV bytes the TQ4 peak
# must save at 32K.
DECODE_TARGETS = {8192: 1.0, 32768: 1.3}
MEMORY_TARGET = (32768, 0.7)

# Real shapes, random weights: (config, weight bits).
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
}


def default_dtype():
    return mx.float16 if mx.default_device() == mx.gpu else mx.float32


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


def check_targets(report: dict) -> list[str]:
    """The GPU targets for TQ4 against fp16, one line each, from a generate report."""
    rows = {(r["context"], r["config"]): r for r in report["results"]}
    lines = []
    for context, target in DECODE_TARGETS.items():
        if (context, "tq4") in rows and (context, REFERENCE) in rows:
            ratio = rows[context, "tq4"]["decode_vs_fp16"]
            verdict = "PASS" if ratio >= target else "FAIL"
            lines.append(
                f"{verdict} decode at {context}: TQ4 {ratio:.2f}x fp16 tok/s (target >= {target})"
            )
        else:
            lines.append(f"n/a  decode at {context}: no tq4 and fp16 rows at that context")
    context, share = MEMORY_TARGET
    if (context, "tq4") in rows and (context, REFERENCE) in rows:
        tq4, fp16 = rows[context, "tq4"], rows[context, REFERENCE]
        # The fp16 row's KV bytes, as 2-byte elements whatever dtype it ran in.
        fp16_kv = fp16["kv_bytes"] * 16 / fp16["kv_bits"]
        saved = (fp16["peak_memory"] - tq4["peak_memory"]) / fp16_kv
        verdict = "PASS" if saved >= share else "FAIL"
        lines.append(
            f"{verdict} memory at {context}: TQ4 peak {tq4['peak_memory'] / 1e9:.3f} GB vs fp16 "
            f"{fp16['peak_memory'] / 1e9:.3f} GB saves {saved:.0%} of the fp16 KV bytes "
            f"({fp16_kv / 1e9:.3f} GB; target >= {share:.0%})"
        )
    else:
        lines.append(f"n/a  memory at {context}: no tq4 and fp16 rows at that context")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(RANDOM_MODELS), default="llama-3.1-8b")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--configs", nargs="+", default=bench.DEFAULT_CONFIGS)
    parser.add_argument("--decode-tokens", type=int, default=bench.DEFAULT_DECODE_TOKENS)
    parser.add_argument("--repeats", type=int, default=bench.DEFAULT_REPEATS)
    parser.add_argument("--prefill-step-size", type=int, default=bench.DEFAULT_PREFILL_STEP)
    parser.add_argument("--json", default="gpu_bench.json")
    parser.add_argument("--check", default=None, help="Only print the targets of this JSON")
    args = parser.parse_args(argv)
    if args.check:
        with open(args.check) as f:
            print("\n".join(check_targets(json.load(f))))
        return
    dtype = default_dtype()
    model = random_model(args.model, dtype)
    patch()
    facts = {**run_info("generate", dtype), "model": f"{args.model} (random weights)"}
    facts["note"] = "random weights of the real shape: speed does not depend on their values"
    configs = list(dict.fromkeys([REFERENCE] + args.configs))
    report = bench.run(
        model, configs, args.contexts, args.decode_tokens, args.repeats, args.prefill_step_size,
        args.json, facts,
    )  # fmt: skip
    report["targets"] = check_targets(report)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(bench.format_table(report["results"], report["dtype"]))
    print("GPU targets, TQ4 against fp16:\n" + "\n".join(report["targets"]))


if __name__ == "__main__":
    main()
