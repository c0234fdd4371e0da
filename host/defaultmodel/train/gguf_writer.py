"""Minimal GGUF v3 writer (NumPy) used to export the default model.

Writes metadata (ints, floats, bools, strings, arrays of those) and tensors in F32, F16 or Q8_0.
Q8_0 follows llama.cpp's quantize_row_q8_0_ref: per block of 32, d = max|x| / 127, q = round(x / d)
(half away from zero), d stored as float16. Arrays given in NumPy order [.., out, in] are written with
ggml ne = reversed(shape), i.e. ne0 = the contiguous (last) NumPy axis.
"""
import struct

import numpy as np

F32, F16, Q8_0 = 0, 1, 8
ALIGN = 32


def _str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(v):
    """(type id, payload) for a metadata value."""
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        if 0 <= v < 2**32:
            return 4, struct.pack("<I", v)
        return 11, struct.pack("<q", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, _str(v)
    if isinstance(v, (list, tuple)):
        if not v:
            return 9, struct.pack("<IQ", 8, 0)
        if all(isinstance(x, str) for x in v):
            return 9, struct.pack("<IQ", 8, len(v)) + b"".join(_str(x) for x in v)
        if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v):
            return 9, struct.pack("<IQ", 5, len(v)) + np.asarray(v, dtype="<i4").tobytes()
        if all(isinstance(x, (float, int)) for x in v):
            return 9, struct.pack("<IQ", 6, len(v)) + np.asarray(v, dtype="<f4").tobytes()
    raise TypeError("unsupported metadata value %r" % (v,))


def quantize_q8_0(x):
    x = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    amax = np.abs(x).max(axis=1, keepdims=True)
    d = amax / 127.0
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, 1.0 / d, 0.0).astype(np.float32)
    v = x * inv
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)  # roundf: half away from zero
    out = np.empty((x.shape[0], 34), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


class Writer:
    def __init__(self):
        self.kv = []
        self.tensors = []

    def add(self, key, value):
        self.kv.append((key, value))

    def add_tensor(self, name, arr, typ):
        arr = np.ascontiguousarray(arr)
        if typ == F32:
            data = arr.astype("<f4").tobytes()
        elif typ == F16:
            data = arr.astype("<f2").tobytes()
        elif typ == Q8_0:
            if arr.shape[-1] % 32:
                raise ValueError("%s: Q8_0 needs the row length %d to be a multiple of 32" % (name, arr.shape[-1]))
            data = quantize_q8_0(arr)
        else:
            raise ValueError("unsupported type %d" % typ)
        self.tensors.append((name, list(reversed(arr.shape)), typ, data))

    def add_raw(self, name, ne, typ, data):
        """A tensor given as already-encoded bytes with ggml shape ne (ne[0] contiguous)."""
        self.tensors.append((name, list(ne), typ, bytes(data)))

    def write(self, path):
        head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(self.tensors), len(self.kv)))
        for k, v in self.kv:
            t, payload = _value(v)
            head += _str(k) + struct.pack("<I", t) + payload
        off = 0
        offsets = []
        for name, ne, typ, data in self.tensors:
            offsets.append(off)
            off += (len(data) + ALIGN - 1) // ALIGN * ALIGN
        for (name, ne, typ, data), o in zip(self.tensors, offsets):
            head += _str(name) + struct.pack("<I", len(ne)) + struct.pack("<%dQ" % len(ne), *ne) + struct.pack("<IQ", typ, o)
        pad = (-len(head)) % ALIGN
        with open(path, "wb") as f:
            f.write(head + b"\0" * pad)
            for name, ne, typ, data in self.tensors:
                f.write(data)
                f.write(b"\0" * ((-len(data)) % ALIGN))
