"""The fused attention alone at a range of split counts (TARGET_GROUPS = splits x 8 KV heads),
pipelined (10 calls per eval, median of 30), ms per call, against fp16 SDPA (B = 1, 32/8
heads, D 128, TQ4 and TQ3; keys from `gpu_timings.packed`). Run from the repository root on
a GPU:

    python3 benchmarks/probes/splits_sweep.py [8192,32768,131072]
"""

import sys

sys.path.insert(0, "benchmarks")
import gpu_timings as g

from mlx_tq import attention

for row, tq in g.probe_rows(sys.argv):
    for bits in (4, 3):
        call = tq(bits)
        for splits in (4, 8, 16, 32, 64, 80, 160):
            if splits * 128 > row["keys"] * 2:
                continue
            attention.TARGET_GROUPS = splits * g.HKV
            attention._fused_plan.cache_clear()
            row[f"tq{bits}-s{splits}"] = round(g.median_ms(call, runs=30, batch=10), 4)
