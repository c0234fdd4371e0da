#!/usr/bin/env python3
"""nsys-kernels.py REPORT.sqlite [TOKENS] — per-kernel table of a decode profile.

Reads the kernel activity of an `nsys profile --cuda-graph-trace=node` run (exported
to SQLite by `nsys export --type sqlite`), and prints a markdown table: kernel, launches,
total and mean duration, share of kernel time. With TOKENS (the decoded tokens of the
profiled run) it adds time per token. It also prints the GPU-busy fraction of the
longest stretch of back-to-back kernels (the decode loop): the sum of kernel
durations (overlaps merged) against the stretch's wall span, i.e. how much of the
step is gaps between kernels.
"""
import sqlite3, sys
from collections import defaultdict

db = sqlite3.connect(sys.argv[1])
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 0
rows = db.execute(
    "SELECT k.start, k.end, COALESCE(s.value, k.demangledName) FROM CUPTI_ACTIVITY_KIND_KERNEL k "
    "LEFT JOIN StringIds s ON s.id = k.shortName ORDER BY k.start").fetchall()
if not rows:
    sys.exit("no kernels in the profile")
agg = defaultdict(lambda: [0, 0])
for s, e, n in rows:
    agg[n][0] += 1
    agg[n][1] += e - s
total = sum(v[1] for v in agg.values())
print(f"| kernel | launches | total ms | mean µs | share |" + (" µs/token |" if tokens else ""))
print("|---|---:|---:|---:|---:|" + ("---:|" if tokens else ""))
for n, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:40]:
    line = f"| {n[:60]} | {c} | {t/1e6:.3f} | {t/c/1e3:.2f} | {100*t/total:.1f}% |"
    if tokens:
        line += f" {t/tokens/1e3:.2f} |"
    print(line)
print(f"\nkernel time total {total/1e6:.3f} ms over {len(rows)} launches")
# busy fraction of the longest run of kernels separated by gaps < 1 ms (the decode loop)
best, cur = (0, 0), 0
for i in range(1, len(rows) + 1):
    if i == len(rows) or rows[i][0] - rows[i - 1][1] > 1_000_000:
        if i - cur > best[1] - best[0]:
            best = (cur, i)
        cur = i
seg = rows[best[0]:best[1]]
busy, end = 0, None
for s, e, _ in seg:
    if end is None or s >= end:
        busy += e - s
        end = e
    elif e > end:
        busy += e - end
        end = e
span = seg[-1][1] - seg[0][0]
print(f"longest back-to-back stretch: {len(seg)} kernels, span {span/1e6:.3f} ms, busy {busy/1e6:.3f} ms "
      f"({100*busy/span:.1f}%), gaps {(span-busy)/1e6:.3f} ms")
