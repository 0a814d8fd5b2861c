"""The fused attention alone on the CUDA cores (decode_attention.metal) against the matrix
units (decode_attention_mma.metal) at several split targets and SIMD-groups a threadgroup,
pipelined (10 calls per eval, median of 30), ms per call, beside fp16 SDPA (B = 1, 32/8
heads, D 128, TQ4 and TQ3; keys from `gpu_timings.packed`). Run from the repository root on a
CUDA GPU:

    python3 benchmarks/probes/mma_sweep.py [8192,32768,131072]
"""

import json
import sys

sys.path.insert(0, "benchmarks")
from functools import partial

import gpu_timings as g
import mlx.core as mx

from mlx_tq import attention, scaled_dot_product_attention

VARIANTS = [  # (name, MMA, MMA_WARPS, MMA_TARGET_WARPS, MMA_MIN_KEYS)
    ("cores", False, 4, 1024, 128),
    ("mma4-1024", True, 4, 1024, 128),
    ("mma4-2048", True, 4, 2048, 128),
    ("mma8-1024", True, 8, 1024, 128),
    ("mma4-512", True, 4, 512, 128),
]

sizes = [int(s) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else [8192, 32768, 131072]
q = g.normal((1, g.HQ, 1, g.D))
for S in sizes:
    k, v = g.normal((1, g.HKV, S, g.D)), g.normal((1, g.HKV, S, g.D))
    sdpa = partial(mx.fast.scaled_dot_product_attention, q, k, v, scale=g.D**-0.5)
    row = {"keys": S, "fp16": round(g.median_ms(sdpa, runs=30, batch=10), 4)}
    for bits in (4, 3):
        tk, tv = g.packed(S, bits, 0), g.packed(S, bits, 1, keys=False)
        call = partial(scaled_dot_product_attention, q, tk, tv, g.D**-0.5)
        for name, mma, warps, target, least in VARIANTS:
            attention.MMA, attention.MMA_WARPS, attention.MMA_TARGET_WARPS = mma, warps, target
            attention.MMA_MIN_KEYS = least
            attention._fused_plan.cache_clear()
            row[f"tq{bits}-{name}"] = round(g.median_ms(call, runs=30, batch=10), 4)
    print(json.dumps(row), flush=True)
