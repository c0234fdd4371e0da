#!/usr/bin/env python3
"""Extract Jane Austen's six novels as plain text from Debian's r-cran-janeaustenr package.

The package (version 1.0.0-1, MIT; the novels themselves are public domain) stores the texts as R
character vectors in a lazy-load database (data/Rdata.rdx + data/Rdata.rdb). R is not needed: this
script reads that format with the Python standard library (a small subset of R's XDR serialization:
enough for the index list and character vectors).

Usage:
  apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb pkg
  python3 extract_austen.py pkg/usr/lib/R/site-library/janeaustenr/data OUT_DIR
Writes OUT_DIR/<novel>.txt (one file per novel, lines as in the package).
"""
import gzip
import os
import struct
import sys
import zlib


class RReader:
    """Minimal reader for R's XDR serialization format (version 2 and 3)."""

    def __init__(self, data):
        self.d = data
        self.p = 0
        self.refs = []

    def int(self):
        v = struct.unpack_from(">i", self.d, self.p)[0]
        self.p += 4
        return v

    def bytes(self, n):
        b = self.d[self.p:self.p + n]
        self.p += n
        return b

    def header(self):
        if self.bytes(2) != b"X\n":
            raise ValueError("not an XDR R serialization")
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader version
        if version == 3:
            n = self.int()
            self.bytes(n)  # native encoding
        return self.item()

    def item(self):
        flags = self.int()
        typ = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if typ == 254:  # NILVALUE_SXP
            return None
        if typ == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if typ in (242, 251, 253, 252):  # EMPTYENV, GLOBALENV, BASEENV, MISSINGARG...
            return None
        if typ == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if typ == 2:  # LISTSXP (pairlist) -> list of (tag, value)
            out = []
            while True:
                attr = self.item() if has_attr else None
                tag = self.item() if has_tag else None
                val = self.item()
                out.append((tag, val))
                nf = self.int()
                t = nf & 0xFF
                if t == 254:
                    break
                if t != 2:
                    raise ValueError("unsupported pairlist tail type %d" % t)
                has_attr = bool(nf & (1 << 9))
                has_tag = bool(nf & (1 << 10))
            return out
        if typ == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            return self.bytes(n).decode("utf-8", errors="replace")
        if typ in (10, 13):  # LGLSXP, INTSXP
            n = self.int()
            v = list(struct.unpack_from(">%di" % n, self.d, self.p))
            self.p += 4 * n
        elif typ == 14:  # REALSXP
            n = self.int()
            v = list(struct.unpack_from(">%dd" % n, self.d, self.p))
            self.p += 8 * n
        elif typ == 16:  # STRSXP
            n = self.int()
            v = [self.item() for _ in range(n)]
        elif typ == 19:  # VECSXP
            n = self.int()
            v = [self.item() for _ in range(n)]
        else:
            raise ValueError("unsupported R type %d" % typ)
        attrs = self.item() if has_attr else None
        if attrs:
            names = dict(attrs).get("names")
            if names is not None and isinstance(v, list) and len(names) == len(v):
                return dict(zip(names, v))
        return v


def read_rdb_object(rdb, off, length):
    chunk = rdb[off:off + length]
    n = struct.unpack(">I", chunk[:4])[0]
    body = chunk[4:]
    data = zlib.decompress(body)
    if len(data) != n:
        raise ValueError("rdb chunk: length %d, want %d" % (len(data), n))
    return RReader(data).header()


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    with gzip.open(os.path.join(src, "Rdata.rdx")) as f:
        idx = RReader(f.read()).header()
    with open(os.path.join(src, "Rdata.rdb"), "rb") as f:
        rdb = f.read()
    os.makedirs(out, exist_ok=True)
    for name, (off, length) in idx["variables"].items():
        lines = read_rdb_object(rdb, int(off), int(length))
        if not isinstance(lines, list) or not all(isinstance(s, (str, type(None))) for s in lines):
            continue
        text = "\n".join(s or "" for s in lines) + "\n"
        with open(os.path.join(out, name + ".txt"), "w", encoding="utf-8") as f:
            f.write(text)
        print("%s: %d lines, %d chars" % (name, len(lines), len(text)))


if __name__ == "__main__":
    main()
