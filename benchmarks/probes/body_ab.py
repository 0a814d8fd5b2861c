"""The fused attention alone with this checkout's kernel bodies (metal/) against the bodies in
another folder (e.g. an earlier commit's: `git archive REV metal | tar -x -C DIR`), rounds
interleaved, TQ4 and TQ3 on the matrix units, with and without the launch that merges;
pipelined ms per call (10 calls per eval, median of 30 per round, then the median of the
rounds), beside fp16 SDPA (B = 1, 32/8 heads, D 128). Run from the repository root on a CUDA
GPU:

    python3 benchmarks/probes/body_ab.py DIR [8192,32768,131072] [--rounds 3]

With --ncu each variant instead runs 4 calls, each evaluated alone, and the probe prints
their labels in order, for Nsight Compute's kernel durations (the attention launch only; the
first call of each variant is its warm-up):

    ncu --cache-control none -k regex:decode_attention --metrics gpu__time_duration.sum \
        --csv --print-units base python3 benchmarks/probes/body_ab.py DIR --ncu > ab.csv
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
import gpu_timings as g

from mlx_tq import attention, kernels

other = Path(sys.argv.pop(1)).resolve()
other = other / "metal" if (other / "metal").is_dir() else other
rounds = 3
ncu = "--ncu" in sys.argv
if ncu:
    sys.argv.remove("--ncu")
    rounds = 1
if "--rounds" in sys.argv:
    i = sys.argv.index("--rounds")
    rounds = int(sys.argv[i + 1])
    del sys.argv[i : i + 2]
own_root, own_name = kernels._root, kernels.variant_name


def use(which):
    """Builds kernels from this checkout's bodies ("new") or the other folder's ("old"); the
    other's get their own names (MLX caches a compiled CUDA module by name)."""
    if which == "old":
        kernels._root = lambda: other
        kernels.variant_name = lambda name, template: "old_" + own_name(name, template)
    else:
        kernels._root, kernels.variant_name = own_root, own_name
    for f in (kernels.source, kernels.include_path, kernels.kernel, attention._fused_plan):
        f.cache_clear()


for row, tq in g.probe_rows(sys.argv):
    for bits in (4, 3):
        call = tq(bits)
        for merge in (False, True):
            attention.MMA_MERGE = merge
            times = {"old": [], "new": []}
            for _ in range(rounds):
                for which in times:
                    use(which)
                    if ncu:
                        print(f"label {row['keys']} tq{bits} merge={merge} {which}", flush=True)
                        g.median_ms(call, warmup=1, runs=3)
                        times[which].append(0.0)
                    else:
                        times[which].append(g.median_ms(call, runs=30, batch=10))
            for which, t in times.items():
                row[f"tq{bits}{'-merge' if merge else ''}-{which}"] = round(statistics.median(t), 4)
    use("new")
