#!/usr/bin/env python3
"""Turn the extracted Austen novels into training text (stdlib only).

* Paragraphs are un-wrapped (the package keeps the ~70-column line breaks of the Gutenberg files),
  `_italics_` markers are dropped, chapter headings are kept as their own paragraphs.
* Each novel is split 95% / 5% by paragraph position into train and validation text.
* Dialogue: runs of consecutive paragraphs that are pure quotations (one speaker's line, nothing
  else) are also emitted as chat examples, "User: <line>\nAssistant: <reply><|endoftext|>", so the
  tiny model learns the chat template's shape. It remains a small language model of Austen's prose.

Usage: prepare_corpus.py NOVELS_DIR OUT_DIR  -> OUT_DIR/{train,val}.txt and stats on stdout.
"""
import os
import re
import sys

EOT = "<|endoftext|>"


def paragraphs(text):
    out = []
    for block in re.split(r"\n\s*\n", text):
        p = " ".join(line.strip() for line in block.splitlines() if line.strip())
        p = p.replace("_", "")
        p = re.sub(r"\s+", " ", p).strip()
        if p:
            out.append(p)
    return out


def pure_quote(p):
    return len(p) >= 4 and p.startswith('"') and p.endswith('"') and p.count('"') == 2 and len(p) < 400


def dialogues(paras):
    runs, cur = [], []
    for p in paras:
        if pure_quote(p):
            cur.append(p[1:-1].strip())
        else:
            if len(cur) >= 2:
                runs.append(cur)
            cur = []
    if len(cur) >= 2:
        runs.append(cur)
    out = []
    for run in runs:
        if len(run) % 2:
            run = run[:-1]
        s = ""
        for i in range(0, len(run), 2):
            s += "User: " + run[i] + "\nAssistant: " + run[i + 1] + EOT
        out.append(s)
    return out


def main():
    src, dst = sys.argv[1], sys.argv[2]
    os.makedirs(dst, exist_ok=True)
    train, val, ndlg = [], [], 0
    for fn in sorted(os.listdir(src)):
        if not fn.endswith(".txt"):
            continue
        paras = paragraphs(open(os.path.join(src, fn), encoding="utf-8").read())
        cut = int(len(paras) * 0.95)
        tr, va = paras[:cut], paras[cut:]
        train.append("\n\n".join(tr) + EOT)
        val.append("\n\n".join(va) + EOT)
        d_tr, d_va = dialogues(tr), dialogues(va)
        ndlg += sum(s.count(EOT) for s in d_tr)  # distinct exchanges
        train.extend(d_tr * 3)  # oversampled: the chat shape is a small share of the text
        val.extend(d_va)
    with open(os.path.join(dst, "train.txt"), "w", encoding="utf-8") as f:
        f.write("".join(train))
    with open(os.path.join(dst, "val.txt"), "w", encoding="utf-8") as f:
        f.write("".join(val))
    print("train %d chars, val %d chars, %d dialogue exchanges in train" % (
        sum(map(len, train)), sum(map(len, val)), ndlg))


if __name__ == "__main__":
    main()
