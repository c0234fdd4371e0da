#!/bin/sh
# Fetch and prepare the training text for the default model (runs on the CPU machine; needs apt and
# python3, nothing else). Debian package r-cran-janeaustenr (1.0.0-1, MIT; the novels are public domain).
# Usage: fetch_corpus.sh OUT_DIR   -> OUT_DIR/{novels/*.txt,train.txt,val.txt}
set -eu
out=${1:?usage: fetch_corpus.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download r-cran-janeaustenr >/dev/null) || { echo "apt-get download failed: run apt-get update once, then retry" >&2; exit 1; }
dpkg-deb -f "$tmp"/r-cran-janeaustenr_*.deb Version
dpkg -x "$tmp"/r-cran-janeaustenr_*.deb "$tmp/pkg"
python3 "$here/extract_austen.py" "$tmp/pkg/usr/lib/R/site-library/janeaustenr/data" "$out/novels"
python3 "$here/prepare_corpus.py" "$out/novels" "$out"
