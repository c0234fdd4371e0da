#!/usr/bin/env python3
"""Self-test of the reference GGUF reader (NumPy only; runs anywhere): writer -> reader round trip,
MXFP4/Q4_0/Q8_0 against hand-computed values, and the vectorised Q4_K/Q6_K dequantizers against a
line-by-line transcription of llama.cpp's dequantize_row_q4_K / dequantize_row_q6_K loops."""
import os
import struct
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "host", "defaultmodel", "train"))
import gguf_reader as gr  # noqa: E402
import gguf_writer as gw  # noqa: E402


def f16(x):
    return np.float32(np.frombuffer(struct.pack("<e", x), np.float16)[0])


def scalar_q4_k(raw):
    y = []
    for b in raw.reshape(-1, 144):
        d = np.frombuffer(b[0:2].tobytes(), np.float16)[0].astype(np.float32)
        mn = np.frombuffer(b[2:4].tobytes(), np.float16)[0].astype(np.float32)
        sc = [int(v) for v in b[4:16]]
        q = [int(v) for v in b[16:144]]

        def gsm(j):
            if j < 4:
                return sc[j] & 63, sc[j + 4] & 63
            return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
        is_, qi = 0, 0
        for _ in range(0, 256, 64):
            s, m = gsm(is_)
            d1, m1 = d * np.float32(s), mn * np.float32(m)
            s, m = gsm(is_ + 1)
            d2, m2 = d * np.float32(s), mn * np.float32(m)
            y += [d1 * np.float32(q[qi + l] & 0xF) - m1 for l in range(32)]
            y += [d2 * np.float32(q[qi + l] >> 4) - m2 for l in range(32)]
            qi += 32
            is_ += 2
    return np.array(y, np.float32)


def scalar_q6_k(raw):
    y = np.zeros(raw.size // 210 * 256, np.float32)
    for i, b in enumerate(raw.reshape(-1, 210)):
        ql, qh = [int(v) for v in b[0:128]], [int(v) for v in b[128:192]]
        sc = [int(v) for v in b[192:208].view(np.int8)]
        d = np.frombuffer(b[208:210].tobytes(), np.float16)[0].astype(np.float32)
        yo, lo, ho, so = i * 256, 0, 0, 0
        for _ in range(2):
            for l in range(32):
                is_ = l // 16
                q1 = ((ql[lo + l] & 0xF) | (((qh[ho + l] >> 0) & 3) << 4)) - 32
                q2 = ((ql[lo + l + 32] & 0xF) | (((qh[ho + l] >> 2) & 3) << 4)) - 32
                q3 = ((ql[lo + l] >> 4) | (((qh[ho + l] >> 4) & 3) << 4)) - 32
                q4 = ((ql[lo + l + 32] >> 4) | (((qh[ho + l] >> 6) & 3) << 4)) - 32
                y[yo + l] = d * np.float32(sc[so + is_]) * np.float32(q1)
                y[yo + l + 32] = d * np.float32(sc[so + is_ + 2]) * np.float32(q2)
                y[yo + l + 64] = d * np.float32(sc[so + is_ + 4]) * np.float32(q3)
                y[yo + l + 96] = d * np.float32(sc[so + is_ + 6]) * np.float32(q4)
            yo += 128
            lo += 64
            ho += 32
            so += 8
    return y


def random_kquant(rng, nb, size, d_off):
    raw = rng.integers(0, 256, (nb, size), dtype=np.uint8)
    for o in d_off:  # keep the f16 scales finite and moderate
        raw[:, o:o + 2] = np.frombuffer(rng.uniform(-0.1, 0.1, nb).astype(np.float16).tobytes(), np.uint8).reshape(nb, 2)
    return raw.reshape(-1)


def main():
    rng = np.random.default_rng(0)
    # Q4_K / Q6_K vs scalar transcription
    raw = random_kquant(rng, 3, 144, (0, 2))
    a, b = gr.dequantize(raw, 12, 768), scalar_q4_k(raw)
    assert np.array_equal(a, b), "Q4_K mismatch: %s" % np.abs(a - b).max()
    raw = random_kquant(rng, 3, 210, (208,))
    a, b = gr.dequantize(raw, 14, 768), scalar_q6_k(raw)
    assert np.array_equal(a, b), "Q6_K mismatch: %s" % np.abs(a - b).max()
    # MXFP4: exponent 128 -> scale 2; byte j low nibble = element j, high nibble = element j+16
    blk = np.zeros(17, np.uint8)
    blk[0] = 128
    blk[1] = 0x9 | (0x7 << 4)   # element 0 = -0.5*2 = -1, element 16 = 6*2 = 12
    blk[16] = 0x3 | (0xF << 4)  # element 15 = 1.5*2 = 3, element 31 = -6*2 = -12
    v = gr.dequantize(blk, 39, 32)
    assert v[0] == -1 and v[16] == 12 and v[15] == 3 and v[31] == -12 and np.count_nonzero(v) == 4, v
    blk[0] = 0  # E8M0 0 -> 2^-127
    blk[1] = 0x2
    assert gr.dequantize(blk, 39, 32)[0] == np.float32(2.0 ** -127)
    # Q4_0: d=0.5, byte j low = element j (q-8), high = element j+16
    blk = np.zeros(18, np.uint8)
    blk[0:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    blk[2:] = 0x88
    blk[2] = 0x0F  # element 0 = (15-8)*0.5 = 3.5, element 16 = (0-8)*0.5 = -4
    v = gr.dequantize(blk, 2, 32)
    assert v[0] == 3.5 and v[16] == -4 and np.count_nonzero(v) == 2, v
    # writer -> reader round trip with every metadata kind and F32/F16/Q8_0
    w = gw.Writer()
    w.add("general.architecture", "test")
    w.add("test.n", 7)
    w.add("test.f", 0.25)
    w.add("test.b", True)
    w.add("test.s", "héllo")
    w.add("test.ss", ["a", "b c"])
    w.add("test.ii", [1, -2, 3])
    x = rng.standard_normal((3, 64)).astype(np.float32)
    w.add_tensor("a", x, gw.F32)
    w.add_tensor("b", x, gw.F16)
    w.add_tensor("c", x, gw.Q8_0)
    with tempfile.TemporaryDirectory() as td:
        p = os.path.join(td, "t.gguf")
        w.write(p)
        g = gr.GGUFFile(p)
        assert g.arch == "test" and g.get("test.n") == 7 and abs(g.get("test.f") - 0.25) < 1e-9
        assert g.get("test.b") is True and g.get("test.s") == "héllo" and g.get("test.ss") == ["a", "b c"]
        assert g.get("test.ii") == [1, -2, 3]
        assert g.tensors["a"].ne == [64, 3]
        assert np.array_equal(g.tensor("a"), x)
        assert np.array_equal(g.tensor("b"), x.astype(np.float16).astype(np.float32))
        c = g.tensor("c")
        step = np.abs(x).reshape(-1, 32).max(1) / 127
        assert np.all(np.abs(c - x).reshape(-1, 32) <= step[:, None] * 0.6), "Q8_0 error too big"  # 0.5 step + f16 rounding of d
    print("gguf_reader self-test: 6 passed, 0 failed")


if __name__ == "__main__":
    main()
