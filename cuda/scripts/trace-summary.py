#!/usr/bin/env python3
"""Summarise an Nsight Systems kernel trace of one-stream decode (e2e-gpu.sh step trace).

Input: the CSVs of cuda/scripts/cupti-trace.c ("start_ns,end_ns,gridXxYxZ,blockX,mangled name", one per
process), or of `nsys stats -r cuda_gpu_trace -f csv` taken with --cuda-graph-trace=node: every kernel of
every replayed decode graph is a row with its real start and end (PDL overlap included).
A decode step is the run of kernels that ends with the sampling kernel (argmax / sample). Steps of
the most common length after the first few are the steady state; for each position in the step the
table gives the mean duration and the mean *increment*: end(i) - end(i-1), the time the kernel adds
to the step's critical path (negative start gaps under PDL are overlap, not cost). Per kernel name
the increments are summed per step. Written by hand because nsys's own reports average per name and
cannot see overlap between consecutive nodes.
"""
import csv
import re
import subprocess
import collections
import statistics
import sys


def demangle(names):
    """c++filt where it exists, else the first identifier of the mangled name."""
    names = list(names)
    try:
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, timeout=60)
        out = res.stdout.split("\n")
        if res.returncode == 0 and len(out) >= len(names):
            return dict(zip(names, out))
    except (OSError, subprocess.SubprocessError):
        pass
    def one(n):
        m = re.match(r"_Z(?:L)?(\d+)", n)
        return n[m.end():m.end() + int(m.group(1))] if m else n
    return {n: one(n) for n in names}


def short(name):
    return name.split("(")[0].replace("void ", "")[:64]


def load_cupti(paths):
    raw = []
    for path in paths:
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split(",", 4)
                if len(parts) == 5 and parts[0].isdigit():
                    raw.append((float(parts[0]), float(parts[1]), parts[2], parts[4]))
    names = demangle({r[3] for r in raw})
    out = [(s, e, short(names[n]), g) for s, e, g, n in raw]
    out.sort()
    return out


def load(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # nsys may print notes before the header
    hi = next(i for i, r in enumerate(rows) if any("Start" in c for c in r) and any("Name" == c.strip() for c in r))
    head = [c.strip() for c in rows[hi]]
    col = lambda key: next(i for i, c in enumerate(head) if c.startswith(key))
    si, di, ni = col("Start"), col("Duration"), col("Name")
    gi = next((i for i, c in enumerate(head) if c.startswith("GrdX")), None)
    out = []
    for r in rows[hi + 1:]:
        if len(r) <= ni or not r[si].strip():
            continue
        try:
            s, d = float(r[si]), float(r[di])
        except ValueError:
            continue
        grid = r[gi].strip() if gi is not None else ""
        if not grid or grid == "0" or grid == "":  # memcpy / memset rows have no grid
            if gi is not None:
                continue
        out.append((s, s + d, short(r[ni].strip()), grid))
    out.sort()
    return out


def main(paths, title):
    first = open(paths[0]).readline()
    ks = load_cupti(paths) if first[:1].isdigit() or not first else load(paths[0])
    is_end = lambda n: "argmax" in n or "sample" in n
    steps, cur = [], []
    for k in ks:
        cur.append(k)
        if is_end(k[2]):
            steps.append(cur)
            cur = []
    if len(steps) < 8:
        print(f"### {title}: only {len(steps)} decode steps found in {len(ks)} kernels")
        return
    lens = collections.Counter(len(s) for s in steps[4:])
    n, _ = lens.most_common(1)[0]
    idx = [i for i in range(4, len(steps)) if len(steps[i]) == n and len(steps[i - 1]) == n]
    if len(idx) > 64:
        idx = idx[-64:]
    inc = [[0.0] * n for _ in idx]
    dur = [[0.0] * n for _ in idx]
    gap = []
    for j, i in enumerate(idx):
        prev_end = steps[i - 1][-1][1]
        gap.append(steps[i][0][0] - prev_end)
        for p, k in enumerate(steps[i]):
            inc[j][p] = k[1] - prev_end
            dur[j][p] = k[1] - k[0]
            prev_end = k[1]
    step_ns = [sum(r) for r in inc]
    names = [k[2] for k in steps[idx[-1]]]
    grids = [k[3] for k in steps[idx[-1]]]
    print(f"### {title}")
    print(f"{len(idx)} steady steps of {n} kernels (step lengths seen: {dict(lens)}); step {statistics.mean(step_ns)/1e3:.1f} us "
          f"(median {statistics.median(step_ns)/1e3:.1f}, {1e9/statistics.mean(step_ns):.0f} steps/s); "
          f"idle before the first kernel {statistics.mean(gap)/1e3:.1f} us")
    print()
    print("| kernel | per step | increment us / step | mean increment us | mean duration us | grid |")
    print("|---|---:|---:|---:|---:|---|")
    by = collections.OrderedDict()
    for p, nm in enumerate(names):
        b = by.setdefault(nm, [0, 0.0, 0.0, grids[p]])
        b[0] += 1
        b[1] += statistics.mean(r[p] for r in inc)
        b[2] += statistics.mean(r[p] for r in dur)
    for nm, (c, i_, d_, g) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"| {nm} | {c} | {i_/1e3:.1f} | {i_/c/1e3:.2f} | {d_/c/1e3:.2f} | {g} |")
    print()
    # one layer in the middle of the step, position by position
    print("Positions (every kernel of the step; increments and durations in us):")
    print()
    print("| # | kernel | increment | duration | grid |")
    print("|---:|---|---:|---:|---|")
    for p, nm in enumerate(names):
        print(f"| {p} | {nm} | {statistics.mean(r[p] for r in inc)/1e3:.2f} | {statistics.mean(r[p] for r in dur)/1e3:.2f} | {grids[p]} |")
    print()


if __name__ == "__main__":
    # trace-summary.py TITLE FILE...
    main(sys.argv[2:], sys.argv[1])
