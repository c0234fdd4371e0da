#!/usr/bin/env python3
"""ncu-kernels.py NCU.csv [TOKENS] — per-kernel time table from an Nsight Compute CSV.

Input: the output of `ncu --csv --page raw --metrics gpu__time_duration.sum ...` (one row per
kernel launch; CUDA graph nodes profiled one by one with --graph-profiling node). Prints a
markdown table: kernel (name up to the template arguments), launches, total and mean
duration, share of the total; with TOKENS, µs per token. ncu serialises kernels, so the
sum is the kernels' own time: no launch gaps and no overlap from programmatic dependent
launch.
"""
import csv, re, sys
from collections import defaultdict

path = sys.argv[1]
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 0
lines = open(path, errors="replace").read().splitlines()
start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
if start is None:
    sys.exit(f"{path}: no ncu CSV header (\"ID\",...) found")
rows = list(csv.reader(lines[start:]))
head = rows[0]
name_col = head.index("Kernel Name")
time_col = head.index("gpu__time_duration.sum")
scale = 1.0  # to ns
unit = rows[1][time_col] if len(rows) > 1 else ""
if not re.match(r"^[0-9.,]+$", unit):  # the units row
    scale = {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(unit, 1)
agg = defaultdict(lambda: [0, 0.0])
for r in rows[1:]:
    if len(r) <= max(name_col, time_col):
        continue
    try:
        t = float(r[time_col].replace(",", "")) * scale
    except ValueError:
        continue
    n = re.sub(r"\(.*$", "", r[name_col])  # drop the argument list
    n = re.sub(r"^void ", "", n)
    agg[n][0] += 1
    agg[n][1] += t
total = sum(v[1] for v in agg.values())
if not total:
    sys.exit("no kernel times in the CSV")
print("| kernel | launches | total ms | mean µs | share |" + (" µs/token |" if tokens else ""))
print("|---|---:|---:|---:|---:|" + ("---:|" if tokens else ""))
for n, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:40]:
    line = f"| {n[:90]} | {c} | {t/1e6:.3f} | {t/c/1e3:.2f} | {100*t/total:.1f}% |"
    if tokens:
        line += f" {t/tokens/1e3:.2f} |"
    print(line)
print(f"\nkernel time total {total/1e6:.3f} ms over {sum(v[0] for v in agg.values())} launches")
