"""Minimal GGUF reader with NumPy dequantizers, written for the transformers reference checks.

The GPU box has no `gguf` pip package, so this reads the format directly (GGUF v2/v3, every metadata
value type, general.alignment) and dequantizes F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K and MXFP4 to
float32 exactly as llama.cpp's dequantize_row_* functions do (ggml-quants.c). It is independent of the
Go code on purpose: it is the other side of the comparison.

Shapes: GGUF stores ne = [ne0, ne1, ...] with ne0 contiguous; tensors are returned as NumPy arrays of
shape reversed(ne), so a 2-D weight ne=[in, out] comes back as [out, in] (nn.Linear.weight layout).
"""
import struct

import numpy as np

GGUF_MAGIC = b"GGUF"

# ggml type id -> (name, block elements, block bytes)
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
    39: ("MXFP4", 32, 17),
}

# GGUF metadata value types
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_NP_SCALARS = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
    7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}


class GGUFError(Exception):
    pass


class Tensor:
    def __init__(self, name, ne, typ, offset):
        self.name = name
        self.ne = ne  # ggml order, ne[0] contiguous
        self.type = typ
        self.offset = offset  # relative to the data section

    @property
    def type_name(self):
        return GGML_TYPES.get(self.type, ("type%d" % self.type,))[0]

    def n_elements(self):
        n = 1
        for d in self.ne:
            n *= d
        return n

    def n_bytes(self):
        if self.type not in GGML_TYPES:
            raise GGUFError("tensor %s: unsupported ggml type %d" % (self.name, self.type))
        _, bs, bb = GGML_TYPES[self.type]
        n = self.n_elements()
        if n % bs:
            raise GGUFError("tensor %s: %d elements not a multiple of block %d" % (self.name, n, bs))
        return n // bs * bb


class GGUFFile:
    def __init__(self, path):
        with open(path, "rb") as f:
            self.buf = f.read()
        self.path = path
        self.pos = 0
        if self._read(4) != GGUF_MAGIC:
            raise GGUFError("%s: not a GGUF file (bad magic)" % path)
        self.version = self._u32()
        if self.version not in (2, 3):
            raise GGUFError("%s: unsupported GGUF version %d" % (path, self.version))
        n_tensors = self._u64()
        n_kv = self._u64()
        self.kv = {}
        for _ in range(n_kv):
            key = self._str()
            vt = self._u32()
            self.kv[key] = self._value(vt)
        self.tensors = {}
        self.tensor_order = []
        for _ in range(n_tensors):
            name = self._str()
            nd = self._u32()
            ne = [self._u64() for _ in range(nd)]
            typ = self._u32()
            off = self._u64()
            self.tensors[name] = Tensor(name, ne, typ, off)
            self.tensor_order.append(name)
        align = int(self.kv.get("general.alignment", 32))
        self.data_offset = (self.pos + align - 1) // align * align
        for t in self.tensors.values():
            end = self.data_offset + t.offset + t.n_bytes()
            if end > len(self.buf):
                raise GGUFError("tensor %s extends past end of file" % t.name)

    # --- primitive readers
    def _read(self, n):
        if self.pos + n > len(self.buf):
            raise GGUFError("%s: truncated at offset %d" % (self.path, self.pos))
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def _u32(self):
        return struct.unpack("<I", self._read(4))[0]

    def _u64(self):
        return struct.unpack("<Q", self._read(8))[0]

    def _str(self):
        n = self._u64()
        return self._read(n).decode("utf-8", errors="replace")

    def _value(self, vt):
        if vt in _SCALARS:
            fmt = _SCALARS[vt]
            return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]
        if vt == 8:
            return self._str()
        if vt == 9:
            et = self._u32()
            n = self._u64()
            if et in _NP_SCALARS:
                dt = np.dtype(_NP_SCALARS[et]).newbyteorder("<")
                arr = np.frombuffer(self._read(n * dt.itemsize), dtype=dt)
                return arr.tolist()
            return [self._value(et) for _ in range(n)]
        raise GGUFError("%s: unknown metadata value type %d" % (self.path, vt))

    # --- metadata helpers
    @property
    def arch(self):
        return self.kv.get("general.architecture", "")

    def get(self, key, default=None):
        return self.kv.get(key, default)

    def arch_get(self, suffix, default=None):
        return self.kv.get("%s.%s" % (self.arch, suffix), default)

    def require(self, key):
        if key not in self.kv:
            raise GGUFError("%s: missing metadata key %s" % (self.path, key))
        return self.kv[key]

    # --- tensors
    def raw(self, name):
        t = self.tensors[name]
        start = self.data_offset + t.offset
        return np.frombuffer(self.buf, dtype=np.uint8, count=t.n_bytes(), offset=start)

    def has(self, name):
        return name in self.tensors

    def tensor(self, name):
        """Dequantized float32 array of shape reversed(ne)."""
        if name not in self.tensors:
            raise GGUFError("%s: missing tensor %s" % (self.path, name))
        t = self.tensors[name]
        flat = dequantize(self.raw(name), t.type, t.n_elements())
        return flat.reshape(list(reversed(t.ne)))


# --- dequantizers (ggml-quants.c dequantize_row_*), all vectorised over blocks


def _f16(b):
    return b.view(np.float16).astype(np.float32)


def deq_q8_0(raw, n):
    blk = raw.reshape(-1, 34)
    d = _f16(blk[:, 0:2].copy())
    qs = blk[:, 2:34].view(np.int8).astype(np.float32)
    return (d * qs).reshape(-1)


def deq_q4_0(raw, n):
    blk = raw.reshape(-1, 18)
    d = _f16(blk[:, 0:2].copy())
    qs = blk[:, 2:18]
    lo = (qs & 0x0F).astype(np.int32) - 8
    hi = (qs >> 4).astype(np.int32) - 8
    q = np.concatenate([lo, hi], axis=1).astype(np.float32)  # elements j and j+16
    return (d * q).reshape(-1)


def _scale_min_k4(scales):
    """scales: [nb, 12] uint8 -> (sc [nb, 8], m [nb, 8]) as in get_scale_min_k4."""
    s = scales.astype(np.int32)
    sc = np.zeros((s.shape[0], 8), dtype=np.int32)
    m = np.zeros((s.shape[0], 8), dtype=np.int32)
    for j in range(8):
        if j < 4:
            sc[:, j] = s[:, j] & 63
            m[:, j] = s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0x0F) | ((s[:, j - 4] >> 6) << 4)
            m[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return sc, m


def deq_q4_k(raw, n):
    blk = raw.reshape(-1, 144)
    nb = blk.shape[0]
    d = _f16(blk[:, 0:2].copy())
    dmin = _f16(blk[:, 2:4].copy())
    sc, m = _scale_min_k4(blk[:, 4:16])
    qs = blk[:, 16:144].reshape(nb, 4, 32)  # 4 chunks of 32 bytes, each -> 64 values
    out = np.empty((nb, 4, 2, 32), dtype=np.float32)
    for c in range(4):
        is0, is1 = 2 * c, 2 * c + 1
        d1 = d * sc[:, is0:is0 + 1].astype(np.float32)
        m1 = dmin * m[:, is0:is0 + 1].astype(np.float32)
        d2 = d * sc[:, is1:is1 + 1].astype(np.float32)
        m2 = dmin * m[:, is1:is1 + 1].astype(np.float32)
        q = qs[:, c, :]
        out[:, c, 0, :] = d1 * (q & 0x0F).astype(np.float32) - m1
        out[:, c, 1, :] = d2 * (q >> 4).astype(np.float32) - m2
    return out.reshape(-1)


def deq_q6_k(raw, n):
    blk = raw.reshape(-1, 210)
    nb = blk.shape[0]
    ql_all = blk[:, 0:128]
    qh_all = blk[:, 128:192]
    sc_all = blk[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(blk[:, 208:210].copy())
    out = np.empty((nb, 256), dtype=np.float32)
    for half in range(2):
        ql = ql_all[:, 64 * half:64 * half + 64].astype(np.int32)
        qh = qh_all[:, 32 * half:32 * half + 32].astype(np.int32)
        sc = sc_all[:, 8 * half:8 * half + 8]
        l = np.arange(32)
        is_ = l // 16
        q1 = ((ql[:, 0:32] & 0xF) | (((qh >> 0) & 3) << 4)) - 32
        q2 = ((ql[:, 32:64] & 0xF) | (((qh >> 2) & 3) << 4)) - 32
        q3 = ((ql[:, 0:32] >> 4) | (((qh >> 4) & 3) << 4)) - 32
        q4 = ((ql[:, 32:64] >> 4) | (((qh >> 6) & 3) << 4)) - 32
        q1, q2, q3, q4 = (x.astype(np.float32) for x in (q1, q2, q3, q4))
        base = 128 * half
        out[:, base + 0:base + 32] = d * sc[:, is_ + 0] * q1
        out[:, base + 32:base + 64] = d * sc[:, is_ + 2] * q2
        out[:, base + 64:base + 96] = d * sc[:, is_ + 4] * q3
        out[:, base + 96:base + 128] = d * sc[:, is_ + 6] * q4
    return out.reshape(-1)


E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                 -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float64)


def deq_mxfp4(raw, n):
    blk = raw.reshape(-1, 17)
    e = blk[:, 0].astype(np.float64)
    scale = np.ldexp(1.0, (e - 127).astype(np.int64))[:, None]  # E8M0: 2^(e-127)
    qs = blk[:, 1:17]
    lo = E2M1[qs & 0x0F]
    hi = E2M1[qs >> 4]
    vals = np.concatenate([lo, hi], axis=1) * scale  # byte j: element j (low), j+16 (high)
    return vals.astype(np.float32).reshape(-1)


def dequantize(raw, typ, n):
    if typ == 0:
        out = raw.view(np.float32).astype(np.float32)
    elif typ == 1:
        out = raw.view(np.float16).astype(np.float32)
    elif typ == 30:
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif typ == 8:
        out = deq_q8_0(raw, n)
    elif typ == 2:
        out = deq_q4_0(raw, n)
    elif typ == 12:
        out = deq_q4_k(raw, n)
    elif typ == 14:
        out = deq_q6_k(raw, n)
    elif typ == 39:
        out = deq_mxfp4(raw, n)
    else:
        raise GGUFError("unsupported ggml type %d" % typ)
    if out.size != n:
        raise GGUFError("dequantized %d elements, want %d" % (out.size, n))
    return out
