"""Per-kernel GPU time of whole-model decode steps, from an Nsight Compute CSV.

    ncu --cache-control none --metrics gpu__time_duration.sum --csv --print-units base \
        python3 benchmarks/decode_step.py --full-model --layers 2 --context 8192 \
        --configs tq4 --steps 2 --repeats 1 > steps.csv
    python3 benchmarks/ncu_kernels.py steps.csv [--last 4]

prints, per kernel name, its launches and the mean duration (us) of its last `--last`
launches (the decode steps; earlier ones include filling the caches). Add `-k regex:tq_` to
ncu for mlx_tq's kernels only; `--cache-control all` (ncu's default) flushes the caches
before each kernel, which lengthens short kernels that would read from L2.
"""

import argparse
import csv
from collections import defaultdict


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--last", type=int, default=4)
    args = parser.parse_args()
    with open(args.csv) as f:
        rows = list(csv.DictReader(line for line in f if line.startswith('"')))
    times = defaultdict(list)
    for r in rows:
        if r["Metric Name"] == "gpu__time_duration.sum":
            name = r["Kernel Name"].split("(")[0].removeprefix("void ")
            times[name].append(float(r["Metric Value"].replace(",", "")) / 1e3)
    for name, t in times.items():
        last = t[-args.last :]
        print(f"{sum(last) / len(last):9.2f} us  x{len(t):<4d} {name[:90]}")


if __name__ == "__main__":
    main()
