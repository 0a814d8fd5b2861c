"""The fused attention alone at a range of split counts (TARGET_GROUPS = splits x 8 KV heads),
pipelined (10 calls per eval, median of 30), ms per call, against fp16 SDPA (B = 1, 32/8
heads, D 128, TQ4 and TQ3; keys from `gpu_timings.packed`). Run from the repository root on
a GPU:

    python3 benchmarks/probes/splits_sweep.py [8192,32768,131072]
"""

import json
import sys

sys.path.insert(0, "benchmarks")
from functools import partial

import gpu_timings as g
import mlx.core as mx

from mlx_tq import attention, scaled_dot_product_attention

sizes = [int(s) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else [8192, 32768, 131072]
q = g.normal((1, g.HQ, 1, g.D))
for S in sizes:
    k, v = g.normal((1, g.HKV, S, g.D)), g.normal((1, g.HKV, S, g.D))
    sdpa = partial(mx.fast.scaled_dot_product_attention, q, k, v, scale=g.D**-0.5)
    row = {"keys": S, "fp16": round(g.median_ms(sdpa, runs=30, batch=10), 4)}
    for bits in (4, 3):
        tk, tv = g.packed(S, bits, 0), g.packed(S, bits, 1, keys=False)
        for splits in (4, 8, 16, 32, 64, 80, 160):
            if splits * 128 > S * 2:
                continue
            attention.TARGET_GROUPS = splits * g.HKV
            attention._fused_plan.cache_clear()
            call = partial(scaled_dot_product_attention, q, tk, tv, g.D**-0.5)
            row[f"tq{bits}-s{splits}"] = round(g.median_ms(call, runs=30, batch=10), 4)
    print(json.dumps(row), flush=True)
