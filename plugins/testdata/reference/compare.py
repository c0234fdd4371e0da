#!/usr/bin/env python3
"""Compare orch's logits with the transformers goldens (CPU machine, NumPy only).

For every plugins/testdata/golden/<name>.gguf (or the names given), runs
  orch-host logits --model <name>.gguf --tokens <prompt> --out /tmp/x.npy
and prints ||ours - ref|| / ||ref|| over all prompt positions (target <= 1e-4), the largest
per-position error, and whether the argmax agrees at each position. With --greedy it also decodes 64
tokens greedily by calling `logits` on the growing sequence and checks the continuation against
<name>.greedy.json (slow: one adapter launch per token).

Usage: compare.py --orch-host ./bin/orch-host [--greedy] [name ...]
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

GOLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden")


def ours(bin_, gguf, ids, tmp):
    out = os.path.join(tmp, "x.npy")
    cmd = [bin_, "logits", "--model", gguf, "--tokens", ",".join(map(str, ids)), "--out", out]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("%s failed: %s" % (" ".join(cmd[:4]), r.stderr.strip()[-2000:]))
    return np.load(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orch-host", required=True)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("names", nargs="*")
    a = ap.parse_args()
    names = a.names or sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(GOLD, "*.gguf")))
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            base = os.path.join(GOLD, n)
            if not os.path.exists(base + ".logits.npy"):
                print("%-18s no golden logits (run run.sh on the GPU box)" % n)
                continue
            ids = json.load(open(base + ".tokens.json"))
            ref = np.load(base + ".logits.npy").astype(np.float64)
            try:
                got = ours(a.orch_host, base + ".gguf", ids, tmp).astype(np.float64)
            except Exception as e:
                print("%-18s ERROR %s" % (n, e))
                bad += 1
                continue
            if got.shape != ref.shape:
                print("%-18s shape %s, want %s" % (n, got.shape, ref.shape))
                bad += 1
                continue
            rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            rows = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
            agree = int((got.argmax(1) == ref.argmax(1)).sum())
            line = "%-18s rel err %.3e (max per position %.3e), argmax agrees %d/%d" % (n, rel, rows.max(), agree, len(ids))
            ok = rel <= a.tol
            if a.greedy:
                want = json.load(open(base + ".greedy.json"))
                seq = list(ids)
                for _ in range(len(want)):
                    seq.append(int(ours(a.orch_host, base + ".gguf", seq, tmp)[-1].argmax()))
                same = seq[len(ids):] == want
                first = next((i for i, (x, y) in enumerate(zip(seq[len(ids):], want)) if x != y), None)
                line += ", greedy %d tokens %s" % (len(want), "identical" if same else "DIFFER at %s" % first)
                ok = ok and same
            print(line + ("" if ok else "  <-- FAIL"))
            bad += 0 if ok else 1
    print("%d passed, %d failed" % (len(names) - bad, bad))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
