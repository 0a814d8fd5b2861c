"""Kernel alone, pipelined (10 calls per eval, median of 30): fp16 SDPA against TQ4 and TQ3
fused attention, ms per call (B = 1, 32/8 heads, D 128; keys from `gpu_timings.packed`).
The probe behind the 2026-12-01 kernel tables in RESULTS.md; run from the repository root:

    python3 benchmarks/probes/kernel_alone.py TAG [8192,32768,131072]
"""

import json
import sys

sys.path.insert(0, "benchmarks")
from functools import partial

import gpu_timings as g
import mlx.core as mx

from mlx_tq import scaled_dot_product_attention

tag = sys.argv[1]
sizes = [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else [8192, 32768, 131072]
q = g.normal((1, g.HQ, 1, g.D))
for S in sizes:
    row = {"tag": tag, "keys": S}
    k, v = g.normal((1, g.HKV, S, g.D)), g.normal((1, g.HKV, S, g.D))
    row["fp16"] = round(
        g.median_ms(
            partial(mx.fast.scaled_dot_product_attention, q, k, v, scale=g.D**-0.5),
            runs=30,
            batch=10,
        ),
        4,
    )
    for bits in (4, 3):
        tk, tv = g.packed(S, bits, 0), g.packed(S, bits, 1, keys=False)
        row[f"tq{bits}"] = round(
            g.median_ms(
                partial(scaled_dot_product_attention, q, tk, tv, g.D**-0.5), runs=30, batch=10
            ),
            4,
        )
    print(json.dumps(row), flush=True)
