package gguf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// Magic is the first four bytes of every GGUF file.
const Magic = "GGUF"

// DefaultAlignment is the tensor data alignment when general.alignment is absent.
const DefaultAlignment = 32

// Limits on what the reader accepts; they keep a hostile header from causing
// huge allocations. Counts are also bounded by the bytes left in the file.
const (
	maxDims       = 4       // GGML_MAX_DIMS
	maxNesting    = 8       // nested array depth
	maxStringLen  = 1 << 30 // one metadata string or key
	maxTensorName = 1 << 16
	maxArrayLen   = 1 << 26 // elements of one metadata array (vocabularies are ~1<<18)
	maxTensors    = 1 << 20
	maxKV         = 1 << 20
)

// ErrFormat is wrapped by every error about a malformed file, so callers can
// tell bad input from I/O errors with errors.Is.
var ErrFormat = errors.New("gguf: malformed file")

// File is a parsed GGUF file. Header fields and tensor infos are decoded
// eagerly; tensor data stays in the file (memory-mapped by Open).
type File struct {
	Version    uint32
	Alignment  int64
	DataOffset int64 // absolute offset of the tensor data section
	Size       int64 // file size in bytes
	KV         []KV
	Tensors    []TensorInfo

	kvIndex     map[string]int
	tensorIndex map[string]int
	mapping     []byte      // mmap of the whole file (Open), nil for Parse
	ra          io.ReaderAt // for Parse
	closer      io.Closer
}

// KV is one metadata key/value pair, in file order.
type KV struct {
	Key   string
	Value Value
}

// TensorInfo describes one tensor.
type TensorInfo struct {
	Name string
	// Shape is in ggml ne order: Shape[0] is the contiguous dimension.
	Shape []int64
	Type  Type
	// Offset is the absolute file offset of the tensor's first byte.
	Offset int64
	// Size is the tensor's size in bytes.
	Size int64
}

// Elements is the number of elements (product of Shape).
func (t *TensorInfo) Elements() int64 {
	n := int64(1)
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

func formatErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrFormat, fmt.Sprintf(format, args...))
}

// Open memory-maps the file at path, parses and validates it. Tensor data
// returned by Data are slices of the mapping (no copy) and are valid until Close.
func Open(path string) (*File, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("gguf: %w", err)
	}
	defer fh.Close()
	st, err := fh.Stat()
	if err != nil {
		return nil, fmt.Errorf("gguf: stat %s: %w", path, err)
	}
	size := st.Size()
	if size == 0 {
		return nil, fmt.Errorf("%s: %w", path, formatErr("empty file"))
	}
	if size > math.MaxInt {
		return nil, fmt.Errorf("gguf: %s: file too large to map", path)
	}
	m, err := unix.Mmap(int(fh.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("gguf: mmap %s: %w", path, err)
	}
	f, err := parse(byteReaderAt(m), size)
	if err != nil {
		_ = unix.Munmap(m)
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	f.mapping = m
	return f, nil
}

// Parse parses a GGUF file from r (size bytes). Data then reads tensor bytes
// through r into new buffers. Close is a no-op unless r is an io.Closer.
func Parse(r io.ReaderAt, size int64) (*File, error) {
	f, err := parse(r, size)
	if err != nil {
		return nil, err
	}
	f.ra = r
	if c, ok := r.(io.Closer); ok {
		f.closer = c
	}
	return f, nil
}

// Close unmaps the file. Slices returned by Data must not be used afterwards.
func (f *File) Close() error {
	var err error
	if f.mapping != nil {
		err = unix.Munmap(f.mapping)
		f.mapping = nil
	}
	if f.closer != nil {
		if cerr := f.closer.Close(); err == nil {
			err = cerr
		}
		f.closer = nil
	}
	return err
}

// Mapping returns the whole memory-mapped file (nil for Parse). Useful to
// hand one region to a device copy.
func (f *File) Mapping() []byte { return f.mapping }

// Data returns tensor t's bytes: a slice of the mapping for Open (no copy,
// read-only; writing to it faults), a fresh buffer for Parse.
func (f *File) Data(t *TensorInfo) ([]byte, error) {
	if t == nil {
		return nil, errors.New("gguf: nil tensor")
	}
	if t.Offset < f.DataOffset || t.Size < 0 || t.Offset+t.Size > f.Size {
		return nil, fmt.Errorf("gguf: tensor %q [%d,+%d) outside file of %d bytes", t.Name, t.Offset, t.Size, f.Size)
	}
	if f.mapping != nil {
		return f.mapping[t.Offset : t.Offset+t.Size : t.Offset+t.Size], nil
	}
	if f.ra == nil {
		return nil, errors.New("gguf: file is closed")
	}
	buf := make([]byte, t.Size)
	if _, err := f.ra.ReadAt(buf, t.Offset); err != nil && !(errors.Is(err, io.EOF) && t.Size == 0) {
		return nil, fmt.Errorf("gguf: read tensor %q: %w", t.Name, err)
	}
	return buf, nil
}

// Get returns the value of a metadata key.
func (f *File) Get(key string) (Value, bool) {
	i, ok := f.kvIndex[key]
	if !ok {
		return Value{}, false
	}
	return f.KV[i].Value, true
}

// String returns a string metadata value.
func (f *File) String(key string) (string, bool) {
	v, ok := f.Get(key)
	if !ok {
		return "", false
	}
	return v.AsString()
}

// Uint returns an integer metadata value of any width that fits uint64.
func (f *File) Uint(key string) (uint64, bool) {
	v, ok := f.Get(key)
	if !ok {
		return 0, false
	}
	return v.AsUint()
}

// Int returns an integer metadata value of any width that fits int64.
func (f *File) Int(key string) (int64, bool) {
	v, ok := f.Get(key)
	if !ok {
		return 0, false
	}
	return v.AsInt()
}

// Float returns a float32/float64 (or integer) metadata value.
func (f *File) Float(key string) (float64, bool) {
	v, ok := f.Get(key)
	if !ok {
		return 0, false
	}
	return v.AsFloat()
}

// Bool returns a bool metadata value.
func (f *File) Bool(key string) (bool, bool) {
	v, ok := f.Get(key)
	if !ok {
		return false, false
	}
	return v.AsBool()
}

// Strings returns a string array metadata value (shared, do not modify).
func (f *File) Strings(key string) ([]string, bool) {
	v, ok := f.Get(key)
	if !ok {
		return nil, false
	}
	return v.Strings()
}

// Ints returns an integer array of any width as []int64.
func (f *File) Ints(key string) ([]int64, bool) {
	v, ok := f.Get(key)
	if !ok {
		return nil, false
	}
	return v.Ints()
}

// Floats returns a float array as []float32.
func (f *File) Floats(key string) ([]float32, bool) {
	v, ok := f.Get(key)
	if !ok {
		return nil, false
	}
	return v.Floats()
}

// Architecture returns general.architecture ("" when absent).
func (f *File) Architecture() string {
	s, _ := f.String("general.architecture")
	return s
}

// ArchUint reads "<architecture>.<suffix>" as an unsigned integer, e.g.
// ArchUint("block_count").
func (f *File) ArchUint(suffix string) (uint64, bool) {
	return f.Uint(f.Architecture() + "." + suffix)
}

// ArchFloat reads "<architecture>.<suffix>" as a float.
func (f *File) ArchFloat(suffix string) (float64, bool) {
	return f.Float(f.Architecture() + "." + suffix)
}

// Tensor finds a tensor by name.
func (f *File) Tensor(name string) (*TensorInfo, bool) {
	i, ok := f.tensorIndex[name]
	if !ok {
		return nil, false
	}
	return &f.Tensors[i], true
}

// byteReaderAt is an io.ReaderAt over a byte slice (the mapping).
type byteReaderAt []byte

func (b byteReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(b)) {
		return 0, io.EOF
	}
	n := copy(p, b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// cursor reads the header sequentially through a small window buffer.
type cursor struct {
	r      io.ReaderAt
	size   int64
	off    int64
	direct []byte // set when r is a byteReaderAt: no copying into win
	win    []byte
	winOff int64
}

func newCursor(r io.ReaderAt, size int64) *cursor {
	c := &cursor{r: r, size: size}
	if b, ok := r.(byteReaderAt); ok {
		c.direct = b
	}
	return c
}

func (c *cursor) remaining() int64 { return c.size - c.off }

// bytes returns the next n bytes (valid until the next call).
func (c *cursor) bytes(n int64, what string) ([]byte, error) {
	if n < 0 || n > c.remaining() {
		return nil, formatErr("truncated: %s needs %d bytes at offset %d, file has %d", what, n, c.off, c.size)
	}
	if c.direct != nil {
		b := c.direct[c.off : c.off+n]
		c.off += n
		return b, nil
	}
	if c.off >= c.winOff && c.off+n <= c.winOff+int64(len(c.win)) {
		b := c.win[c.off-c.winOff : c.off-c.winOff+n]
		c.off += n
		return b, nil
	}
	want := int64(64 << 10)
	if n > want {
		want = n
	}
	if want > c.remaining() {
		want = c.remaining()
	}
	if int64(cap(c.win)) < want {
		c.win = make([]byte, want)
	}
	c.win = c.win[:want]
	m, err := c.r.ReadAt(c.win, c.off)
	if int64(m) < n {
		if err == nil || errors.Is(err, io.EOF) {
			return nil, formatErr("truncated: %s at offset %d", what, c.off)
		}
		return nil, fmt.Errorf("gguf: read at %d: %w", c.off, err)
	}
	c.win = c.win[:m]
	c.winOff = c.off
	b := c.win[:n]
	c.off += n
	return b, nil
}

func (c *cursor) u8(what string) (uint8, error) {
	b, err := c.bytes(1, what)
	if err != nil {
		return 0, err
	}
	return b[0], nil
}
func (c *cursor) u16(what string) (uint16, error) {
	b, err := c.bytes(2, what)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint16(b), nil
}
func (c *cursor) u32(what string) (uint32, error) {
	b, err := c.bytes(4, what)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(b), nil
}
func (c *cursor) u64(what string) (uint64, error) {
	b, err := c.bytes(8, what)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b), nil
}

func (c *cursor) str(what string) (string, error) {
	n, err := c.u64(what + " length")
	if err != nil {
		return "", err
	}
	if n > maxStringLen || int64(n) > c.remaining() {
		return "", formatErr("truncated or corrupt: %s length %d at offset %d exceeds the %d bytes left", what, n, c.off-8, c.remaining())
	}
	b, err := c.bytes(int64(n), what)
	if err != nil {
		return "", err
	}
	return string(b), nil
}

// minEncoded is the smallest encoding of one value of type t.
func minEncoded(t ValueType) int64 {
	switch t {
	case ValueString:
		return 8
	case ValueArray:
		return 12
	}
	return int64(t.fixedSize())
}

func (c *cursor) value(t ValueType, key string, depth int) (Value, error) {
	switch t {
	case ValueUint8, ValueUint16, ValueUint32, ValueUint64, ValueInt8, ValueInt16, ValueInt32, ValueInt64, ValueFloat32, ValueFloat64, ValueBool:
		b, err := c.bytes(int64(t.fixedSize()), "value of "+key)
		if err != nil {
			return Value{}, err
		}
		return scalarFromBytes(t, b, key)
	case ValueString:
		s, err := c.str("string value of " + key)
		if err != nil {
			return Value{}, err
		}
		return Value{Type: ValueString, s: s}, nil
	case ValueArray:
		if depth >= maxNesting {
			return Value{}, formatErr("key %q: arrays nested deeper than %d", key, maxNesting)
		}
		et32, err := c.u32("array element type of " + key)
		if err != nil {
			return Value{}, err
		}
		et := ValueType(et32)
		if !et.valid() {
			return Value{}, formatErr("key %q: unknown array element type %d", key, et32)
		}
		n, err := c.u64("array length of " + key)
		if err != nil {
			return Value{}, err
		}
		if n > maxArrayLen {
			return Value{}, formatErr("key %q: array of %d elements exceeds the limit of %d", key, n, maxArrayLen)
		}
		if n > uint64(c.remaining()/minEncoded(et)) {
			return Value{}, formatErr("key %q: array of %d %s elements does not fit in the %d bytes left", key, n, et, c.remaining())
		}
		return c.array(et, int(n), key, depth)
	}
	return Value{}, formatErr("key %q: unknown value type %d", key, uint32(t))
}

func scalarFromBytes(t ValueType, b []byte, key string) (Value, error) {
	switch t {
	case ValueUint8:
		return Value{Type: t, u: uint64(b[0])}, nil
	case ValueInt8:
		return Value{Type: t, i: int64(int8(b[0]))}, nil
	case ValueUint16:
		return Value{Type: t, u: uint64(binary.LittleEndian.Uint16(b))}, nil
	case ValueInt16:
		return Value{Type: t, i: int64(int16(binary.LittleEndian.Uint16(b)))}, nil
	case ValueUint32:
		return Value{Type: t, u: uint64(binary.LittleEndian.Uint32(b))}, nil
	case ValueInt32:
		return Value{Type: t, i: int64(int32(binary.LittleEndian.Uint32(b)))}, nil
	case ValueUint64:
		return Value{Type: t, u: binary.LittleEndian.Uint64(b)}, nil
	case ValueInt64:
		return Value{Type: t, i: int64(binary.LittleEndian.Uint64(b))}, nil
	case ValueFloat32:
		return Value{Type: t, f: float64(math.Float32frombits(binary.LittleEndian.Uint32(b)))}, nil
	case ValueFloat64:
		return Value{Type: t, f: math.Float64frombits(binary.LittleEndian.Uint64(b))}, nil
	case ValueBool:
		if b[0] > 1 {
			return Value{}, formatErr("key %q: bool byte %d is neither 0 nor 1", key, b[0])
		}
		return Value{Type: t, u: uint64(b[0])}, nil
	}
	return Value{}, formatErr("key %q: unknown value type %d", key, uint32(t))
}

// decodeLE decodes n little-endian elements of size bytes each from b.
func decodeLE[T any](b []byte, n, size int, at func([]byte) T) []T {
	a := make([]T, n)
	for i := range a {
		a[i] = at(b[size*i:])
	}
	return a
}

func (c *cursor) array(et ValueType, n int, key string, depth int) (Value, error) {
	v := Value{Type: ValueArray, ElemType: et}
	if sz := et.fixedSize(); sz > 0 {
		b, err := c.bytes(int64(n)*int64(sz), "array of "+key)
		if err != nil {
			return Value{}, err
		}
		le := binary.LittleEndian
		switch et {
		case ValueUint8:
			v.arr = append([]uint8(nil), b...)
		case ValueInt8:
			a := make([]int8, n)
			for i := range a {
				a[i] = int8(b[i])
			}
			v.arr = a
		case ValueBool:
			a := make([]bool, n)
			for i := range a {
				if b[i] > 1 {
					return Value{}, formatErr("key %q: bool byte %d at element %d is neither 0 nor 1", key, b[i], i)
				}
				a[i] = b[i] == 1
			}
			v.arr = a
		case ValueUint16:
			v.arr = decodeLE(b, n, 2, le.Uint16)
		case ValueInt16:
			v.arr = decodeLE(b, n, 2, func(p []byte) int16 { return int16(le.Uint16(p)) })
		case ValueUint32:
			v.arr = decodeLE(b, n, 4, le.Uint32)
		case ValueInt32:
			v.arr = decodeLE(b, n, 4, func(p []byte) int32 { return int32(le.Uint32(p)) })
		case ValueFloat32:
			v.arr = decodeLE(b, n, 4, func(p []byte) float32 { return math.Float32frombits(le.Uint32(p)) })
		case ValueUint64:
			v.arr = decodeLE(b, n, 8, le.Uint64)
		case ValueInt64:
			v.arr = decodeLE(b, n, 8, func(p []byte) int64 { return int64(le.Uint64(p)) })
		case ValueFloat64:
			v.arr = decodeLE(b, n, 8, func(p []byte) float64 { return math.Float64frombits(le.Uint64(p)) })
		}
		return v, nil
	}
	switch et {
	case ValueString:
		a := make([]string, n)
		for i := range a {
			s, err := c.str(fmt.Sprintf("element %d of %s", i, key))
			if err != nil {
				return Value{}, err
			}
			a[i] = s
		}
		v.arr = a
	case ValueArray:
		a := make([]Value, n)
		for i := range a {
			e, err := c.value(ValueArray, fmt.Sprintf("%s[%d]", key, i), depth+1)
			if err != nil {
				return Value{}, err
			}
			a[i] = e
		}
		v.arr = a
	}
	return v, nil
}

func parse(r io.ReaderAt, size int64) (*File, error) {
	c := newCursor(r, size)
	magic, err := c.bytes(4, "magic")
	if err != nil {
		return nil, err
	}
	if string(magic) != Magic {
		return nil, formatErr("wrong magic %q, want %q (not a GGUF file)", magic, Magic)
	}
	version, err := c.u32("version")
	if err != nil {
		return nil, err
	}
	if version&0xFFFF == 0 && version>>16 != 0 {
		// e.g. 0x03000000: a big-endian file read as little-endian.
		return nil, formatErr("big-endian GGUF (version bytes %#08x) is not supported", version)
	}
	if version != 2 && version != 3 {
		return nil, formatErr("unsupported GGUF version %d (supported: 2, 3)", version)
	}
	nTensors, err := c.u64("tensor count")
	if err != nil {
		return nil, err
	}
	nKV, err := c.u64("metadata count")
	if err != nil {
		return nil, err
	}
	// a KV is at least 8 (key len) + 4 (type) + 1 bytes; a tensor info at least 8+4+8+4+8.
	if nKV > uint64(c.remaining()/13) {
		return nil, formatErr("metadata count %d cannot fit in the %d bytes left", nKV, c.remaining())
	}
	if nTensors > uint64(c.remaining()/32) {
		return nil, formatErr("tensor count %d cannot fit in the %d bytes left", nTensors, c.remaining())
	}
	if nKV > maxKV || nTensors > maxTensors {
		return nil, formatErr("%d metadata entries / %d tensors exceed the limits (%d / %d)", nKV, nTensors, maxKV, maxTensors)
	}
	f := &File{Version: version, Alignment: DefaultAlignment, Size: size,
		kvIndex: make(map[string]int, nKV), tensorIndex: make(map[string]int, nTensors)}
	f.KV = make([]KV, 0, min(nKV, 1024))
	for i := uint64(0); i < nKV; i++ {
		key, err := c.str(fmt.Sprintf("key of metadata entry %d", i))
		if err != nil {
			return nil, err
		}
		if key == "" {
			return nil, formatErr("metadata entry %d has an empty key", i)
		}
		if !utf8.ValidString(key) {
			return nil, formatErr("metadata entry %d: key %q is not UTF-8", i, key)
		}
		if _, dup := f.kvIndex[key]; dup {
			return nil, formatErr("duplicate metadata key %q", key)
		}
		t, err := c.u32("value type of " + key)
		if err != nil {
			return nil, err
		}
		v, err := c.value(ValueType(t), key, 0)
		if err != nil {
			return nil, err
		}
		f.kvIndex[key] = len(f.KV)
		f.KV = append(f.KV, KV{Key: key, Value: v})
	}
	if v, ok := f.Get("general.alignment"); ok {
		a, ok := v.AsUint()
		if !ok || a == 0 || a&(a-1) != 0 || a > 1<<30 {
			return nil, formatErr("general.alignment %s is not a power of two", v)
		}
		f.Alignment = int64(a)
	}
	f.Tensors = make([]TensorInfo, nTensors)
	for i := range f.Tensors {
		t := &f.Tensors[i]
		name, err := c.str(fmt.Sprintf("name of tensor %d", i))
		if err != nil {
			return nil, err
		}
		if name == "" || len(name) > maxTensorName {
			return nil, formatErr("tensor %d has an invalid name length %d", i, len(name))
		}
		if _, dup := f.tensorIndex[name]; dup {
			return nil, formatErr("duplicate tensor name %q", name)
		}
		t.Name = name
		nd, err := c.u32("dimension count of " + name)
		if err != nil {
			return nil, err
		}
		if nd == 0 || nd > maxDims {
			return nil, formatErr("tensor %q has %d dimensions (1..%d allowed)", name, nd, maxDims)
		}
		t.Shape = make([]int64, nd)
		elems := int64(1)
		for d := range t.Shape {
			x, err := c.u64("shape of " + name)
			if err != nil {
				return nil, err
			}
			if x == 0 || x > math.MaxInt64 {
				return nil, formatErr("tensor %q: dimension %d is %d", name, d, x)
			}
			if elems > math.MaxInt64/int64(x) {
				return nil, formatErr("tensor %q: element count overflows", name)
			}
			elems *= int64(x)
			t.Shape[d] = int64(x)
		}
		typ, err := c.u32("type of " + name)
		if err != nil {
			return nil, err
		}
		t.Type = Type(typ)
		if !t.Type.Known() {
			return nil, formatErr("tensor %q has unknown type id %d", name, typ)
		}
		if t.Shape[0]%int64(t.Type.BlockSize()) != 0 {
			return nil, formatErr("tensor %q: row length %d is not a multiple of the %s block size %d", name, t.Shape[0], t.Type, t.Type.BlockSize())
		}
		t.Size, err = t.Type.RowBytes(elems)
		if err != nil {
			return nil, formatErr("tensor %q: %v", name, err)
		}
		off, err := c.u64("offset of " + name)
		if err != nil {
			return nil, err
		}
		if off > math.MaxInt64/2 {
			return nil, formatErr("tensor %q: offset %d out of range", name, off)
		}
		if int64(off)%f.Alignment != 0 {
			return nil, formatErr("tensor %q: offset %d is not a multiple of the alignment %d", name, off, f.Alignment)
		}
		t.Offset = int64(off) // relative for now
		f.tensorIndex[name] = i
	}
	f.DataOffset = alignUp(c.off, f.Alignment)
	if nTensors > 0 && f.DataOffset > size {
		return nil, formatErr("truncated: tensor data would start at %d, file has %d bytes", f.DataOffset, size)
	}
	for i := range f.Tensors {
		t := &f.Tensors[i]
		t.Offset += f.DataOffset
		if t.Offset+t.Size > size {
			return nil, formatErr("tensor %q [%d, %d) extends past the end of the file (%d bytes)", t.Name, t.Offset, t.Offset+t.Size, size)
		}
	}
	// overlap check on sorted copies of the ranges
	idx := make([]int, len(f.Tensors))
	for i := range idx {
		idx[i] = i
	}
	sort.Slice(idx, func(a, b int) bool { return f.Tensors[idx[a]].Offset < f.Tensors[idx[b]].Offset })
	for k := 1; k < len(idx); k++ {
		p, q := &f.Tensors[idx[k-1]], &f.Tensors[idx[k]]
		if p.Offset+p.Size > q.Offset {
			return nil, formatErr("tensors %q [%d, %d) and %q [%d, %d) overlap", p.Name, p.Offset, p.Offset+p.Size, q.Name, q.Offset, q.Offset+q.Size)
		}
	}
	return f, nil
}

func alignUp(x, a int64) int64 { return (x + a - 1) / a * a }
