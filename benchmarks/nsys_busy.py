"""How busy the GPU is in the last part of an Nsight Systems trace (the pipelined decode loop
of `decode_step.py`), from its SQLite export:

    nsys profile -t cuda -o step python3 benchmarks/decode_step.py --full-model --layers 32 \
        --context 8192 --configs tq4 --steps 32 --repeats 1
    nsys export --type sqlite -o step.sqlite step.nsys-rep
    python3 benchmarks/nsys_busy.py step.sqlite [--window-ms 150]

prints the window's span, the time some kernel ran (their union), the idle rest, the kernel
count, and the kernels' total time by name (top 12).
"""

import argparse
import sqlite3
from collections import Counter


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sqlite")
    parser.add_argument("--window-ms", type=float, default=150.0)
    args = parser.parse_args()
    db = sqlite3.connect(args.sqlite)
    rows = db.execute(
        "SELECT k.start, k.end, s.value FROM CUPTI_ACTIVITY_KIND_KERNEL k "
        "JOIN StringIds s ON s.id = k.shortName ORDER BY k.start"
    ).fetchall()
    stop = max(end for _, end, _ in rows)
    begin = stop - args.window_ms * 1e6
    rows = [r for r in rows if r[0] >= begin]
    busy, reach = 0, begin
    by_name = Counter()
    for start, end, name in rows:
        busy += max(0, end - max(start, reach))
        reach = max(reach, end)
        by_name[name] += end - start
    span = stop - rows[0][0]
    print(
        f"window {span / 1e6:.2f} ms: kernels running {busy / 1e6:.2f} ms "
        f"({100 * busy / span:.1f}%), idle {(span - busy) / 1e6:.2f} ms, {len(rows)} kernels"
    )
    for name, t in by_name.most_common(12):
        print(f"  {t / 1e6:8.3f} ms  {name[:80]}")


if __name__ == "__main__":
    main()
