"""Where a kernel's warps wait, from Nsight Compute's per-SASS-instruction source page.

    python3 benchmarks/ncu_stalls.py attn.csv.gz [--top 12]

(the CSV of `ncu --import X.ncu-rep --page source --csv --print-source sass`, gzipped or
not; see `benchmarks/ncu_decode.py`). Prints the warp instructions executed, each stall
reason's share of the samples, the executed instruction mix, threadgroup-memory wavefronts
against the conflict-free ideal, and the instructions with the most samples.
"""

import argparse
import collections
import csv
import gzip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    opener = gzip.open if args.csv.endswith(".gz") else open
    with opener(args.csv, "rt") as f:
        lines = f.read().splitlines()
    rows = list(csv.DictReader(lines[1:]))  # (line 0: the kernel's name)
    stalls = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]

    def num(r, c):
        return int((r[c] or "0").replace(",", ""))

    samples = sum(num(r, "Warp Stall Sampling (All Samples)") for r in rows)
    executed = sum(num(r, "Instructions Executed") for r in rows)
    by_reason = {c[6:]: sum(num(r, c) for r in rows) for c in stalls}
    mix = collections.Counter()
    for r in rows:
        words = r["Source"].split()
        op = words[1] if words[0].startswith("@") else words[0]
        mix[op.split(".")[0]] += num(r, "Instructions Executed")
    print(f"warp instructions executed {executed:,}, stall samples {samples:,}")
    top = sorted(by_reason.items(), key=lambda x: -x[1])[:10]
    print("stalls (% of samples):", ", ".join(f"{k} {100 * v / samples:.1f}" for k, v in top))
    print("mix (%):", ", ".join(f"{k} {100 * v / executed:.1f}" for k, v in mix.most_common(12)))
    shared = sum(num(r, "L1 Wavefronts Shared") for r in rows)
    ideal = sum(num(r, "L1 Wavefronts Shared Ideal") for r in rows)
    print(f"threadgroup-memory wavefronts {shared:,} (ideal {ideal:,})")
    for r in sorted(rows, key=lambda r: -num(r, "Warp Stall Sampling (All Samples)"))[: args.top]:
        n = num(r, "Warp Stall Sampling (All Samples)")
        why = sorted(((c[6:], num(r, c)) for c in stalls if num(r, c)), key=lambda x: -x[1])
        reasons = ", ".join(f"{k} {v}" for k, v in why[:3])
        print(f"  {r['Address'][-5:]} {r['Source'].strip()[:44]:44s} {n:6d}  {reasons}")


if __name__ == "__main__":
    main()
