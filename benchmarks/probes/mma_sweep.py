"""The fused attention alone on the CUDA cores (decode_attention.metal) against the matrix
units (decode_attention_mma.metal) at several split targets and SIMD-groups a threadgroup,
pipelined (10 calls per eval, median of 30), ms per call, beside fp16 SDPA (B = 1, 32/8
heads, D 128, TQ4 and TQ3; keys from `gpu_timings.packed`). Run from the repository root on a
CUDA GPU:

    python3 benchmarks/probes/mma_sweep.py [8192,32768,131072]
"""

import sys

sys.path.insert(0, "benchmarks")
import gpu_timings as g

from mlx_tq import attention

VARIANTS = [  # (name, MMA, MMA_WARPS, MMA_TARGET_WARPS, MMA_MIN_KEYS)
    ("cores", False, 4, 1024, 128),
    ("mma4-1024", True, 4, 1024, 128),
    ("mma4-2048-k64", True, 4, 2048, 64),
    ("mma4-4096-k64", True, 4, 4096, 64),
    ("mma4-4096-k32", True, 4, 4096, 32),
    ("mma8-4096-k32", True, 8, 4096, 32),
]

for row, tq in g.probe_rows(sys.argv):
    for bits in (4, 3):
        call = tq(bits)
        for name, mma, warps, target, least in VARIANTS:
            attention.MMA, attention.MMA_WARPS, attention.MMA_TARGET_WARPS = mma, warps, target
            attention.MMA_MIN_KEYS = least
            attention._fused_plan.cache_clear()
            row[f"tq{bits}-{name}"] = round(g.median_ms(call, runs=30, batch=10), 4)
