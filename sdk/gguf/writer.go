package gguf

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
)

// Writer builds a GGUF v3 file. Metadata keys keep the order of their first
// Set; tensor data is streamed from fill functions when the file is written.
type Writer struct {
	alignment int64
	kv        []KV
	kvIndex   map[string]int
	tensors   []writerTensor
	names     map[string]bool
	err       error // first error from Set/AddTensor, reported by WriteTo
}

type writerTensor struct {
	info TensorInfo // Offset relative to the data section
	fill func(io.Writer) error
}

// NewWriter returns a writer for GGUF v3 with alignment 32.
func NewWriter() *Writer {
	return &Writer{alignment: DefaultAlignment, kvIndex: map[string]int{}, names: map[string]bool{}}
}

// SetAlignment sets the tensor data alignment (a power of two). A value other
// than 32 is also recorded as general.alignment (uint32), as the spec requires.
func (w *Writer) SetAlignment(a int) error {
	if a <= 0 || a&(a-1) != 0 || a > 1<<30 {
		return fmt.Errorf("gguf: alignment %d is not a power of two", a)
	}
	w.alignment = int64(a)
	if a != DefaultAlignment {
		w.Set("general.alignment", uint32(a))
	}
	return nil
}

// Set records a metadata value (see NewValue for the accepted Go types); a
// key set twice keeps its first position and the last value. An unsupported
// type is reported by WriteTo/WriteFile.
func (w *Writer) Set(key string, v any) {
	val, err := NewValue(v)
	if err != nil {
		if w.err == nil {
			w.err = fmt.Errorf("gguf: key %q: %w", key, err)
		}
		return
	}
	if key == "" {
		if w.err == nil {
			w.err = errors.New("gguf: empty metadata key")
		}
		return
	}
	if i, ok := w.kvIndex[key]; ok {
		w.kv[i].Value = val
		return
	}
	w.kvIndex[key] = len(w.kv)
	w.kv = append(w.kv, KV{Key: key, Value: val})
}

// AddTensor declares a tensor; fill is called while writing and must write
// exactly the tensor's byte size (Type.RowBytes of its element count).
func (w *Writer) AddTensor(name string, t Type, shape []int64, fill func(io.Writer) error) error {
	if name == "" {
		return errors.New("gguf: empty tensor name")
	}
	if w.names[name] {
		return fmt.Errorf("gguf: duplicate tensor %q", name)
	}
	if !t.Known() {
		return fmt.Errorf("gguf: tensor %q: unknown type %d", name, uint32(t))
	}
	if len(shape) == 0 || len(shape) > maxDims {
		return fmt.Errorf("gguf: tensor %q: %d dimensions (1..%d allowed)", name, len(shape), maxDims)
	}
	n := int64(1)
	for _, d := range shape {
		if d <= 0 || n > math.MaxInt64/d {
			return fmt.Errorf("gguf: tensor %q: bad shape %v", name, shape)
		}
		n *= d
	}
	if shape[0]%int64(t.BlockSize()) != 0 {
		return fmt.Errorf("gguf: tensor %q: row length %d is not a multiple of the %s block size %d", name, shape[0], t, t.BlockSize())
	}
	size, err := t.RowBytes(n)
	if err != nil {
		return fmt.Errorf("gguf: tensor %q: %w", name, err)
	}
	if fill == nil {
		return fmt.Errorf("gguf: tensor %q: nil fill function", name)
	}
	w.names[name] = true
	w.tensors = append(w.tensors, writerTensor{
		info: TensorInfo{Name: name, Shape: append([]int64(nil), shape...), Type: t, Size: size},
		fill: fill,
	})
	return nil
}

// layout assigns relative offsets and returns the header size, the padded
// data start and the total file size.
func (w *Writer) layout() (header, dataStart, total int64) {
	header = 4 + 4 + 8 + 8
	for _, kv := range w.kv {
		header += 8 + int64(len(kv.Key)) + 4 + encodedSize(kv.Value)
	}
	var off int64
	for i := range w.tensors {
		t := &w.tensors[i].info
		header += 8 + int64(len(t.Name)) + 4 + 8*int64(len(t.Shape)) + 4 + 8
		t.Offset = off
		off = alignUp(off+t.Size, w.alignment)
	}
	dataStart = alignUp(header, w.alignment)
	total = dataStart
	if n := len(w.tensors); n > 0 {
		last := w.tensors[n-1].info
		total = dataStart + last.Offset + last.Size
	}
	return header, dataStart, total
}

// Size is the byte size of the file the writer would produce.
func (w *Writer) Size() int64 {
	_, _, total := w.layout()
	return total
}

// Tensors lists the declared tensors with offsets relative to the data section.
func (w *Writer) Tensors() []TensorInfo {
	w.layout()
	out := make([]TensorInfo, len(w.tensors))
	for i, t := range w.tensors {
		out[i] = t.info
	}
	return out
}

func encodedSize(v Value) int64 {
	switch v.Type {
	case ValueString:
		return 8 + int64(len(v.s))
	case ValueArray:
		n := int64(4 + 8)
		switch a := v.arr.(type) {
		case []string:
			for _, s := range a {
				n += 8 + int64(len(s))
			}
		case []Value:
			for _, e := range a {
				n += encodedSize(e)
			}
		default:
			n += int64(v.Len()) * int64(v.ElemType.fixedSize())
		}
		return n
	}
	return int64(v.Type.fixedSize())
}

type countingWriter struct {
	w        io.Writer
	n        int64
	progress func(int64)
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	if c.progress != nil {
		c.progress(c.n)
	}
	return n, err
}

// WriteTo writes the whole file to out.
func (w *Writer) WriteTo(out io.Writer) (int64, error) {
	return w.write(out, nil)
}

func (w *Writer) write(out io.Writer, progress func(done, total int64)) (int64, error) {
	if w.err != nil {
		return 0, w.err
	}
	_, dataStart, total := w.layout()
	var cb func(int64)
	if progress != nil {
		cb = func(n int64) { progress(n, total) }
	}
	cw := &countingWriter{w: out, progress: cb}
	bw := bufio.NewWriterSize(cw, 1<<20)
	le := binary.LittleEndian
	var scratch [8]byte
	u32 := func(x uint32) { le.PutUint32(scratch[:], x); bw.Write(scratch[:4]) }
	u64 := func(x uint64) { le.PutUint64(scratch[:], x); bw.Write(scratch[:8]) }
	str := func(s string) { u64(uint64(len(s))); bw.WriteString(s) }

	bw.WriteString(Magic)
	u32(3)
	u64(uint64(len(w.tensors)))
	u64(uint64(len(w.kv)))
	for _, kv := range w.kv {
		str(kv.Key)
		u32(uint32(kv.Value.Type))
		writeValue(bw, kv.Value)
	}
	for _, t := range w.tensors {
		str(t.info.Name)
		u32(uint32(len(t.info.Shape)))
		for _, d := range t.info.Shape {
			u64(uint64(d))
		}
		u32(uint32(t.info.Type))
		u64(uint64(t.info.Offset))
	}
	pad := func(to int64) error {
		if err := bw.Flush(); err != nil {
			return err
		}
		if gap := to - cw.n; gap > 0 {
			_, err := cw.Write(make([]byte, gap))
			return err
		} else if gap < 0 {
			return fmt.Errorf("gguf: internal layout error: at %d, want %d", cw.n, to)
		}
		return nil
	}
	if err := pad(dataStart); err != nil {
		return cw.n, fmt.Errorf("gguf: write header: %w", err)
	}
	for _, t := range w.tensors {
		if err := pad(dataStart + t.info.Offset); err != nil {
			return cw.n, fmt.Errorf("gguf: write: %w", err)
		}
		start := cw.n
		if err := t.fill(bw); err != nil {
			return cw.n, fmt.Errorf("gguf: fill tensor %q: %w", t.info.Name, err)
		}
		if err := bw.Flush(); err != nil {
			return cw.n, fmt.Errorf("gguf: write tensor %q: %w", t.info.Name, err)
		}
		if got := cw.n - start; got != t.info.Size {
			return cw.n, fmt.Errorf("gguf: fill of tensor %q wrote %d bytes, want %d", t.info.Name, got, t.info.Size)
		}
	}
	if err := pad(total); err != nil {
		return cw.n, fmt.Errorf("gguf: write: %w", err)
	}
	return cw.n, nil
}

func writeValue(bw *bufio.Writer, v Value) {
	le := binary.LittleEndian
	var b [8]byte
	switch v.Type {
	case ValueUint8, ValueBool:
		bw.WriteByte(byte(v.u))
	case ValueInt8:
		bw.WriteByte(byte(int8(v.i)))
	case ValueUint16:
		le.PutUint16(b[:], uint16(v.u))
		bw.Write(b[:2])
	case ValueInt16:
		le.PutUint16(b[:], uint16(int16(v.i)))
		bw.Write(b[:2])
	case ValueUint32:
		le.PutUint32(b[:], uint32(v.u))
		bw.Write(b[:4])
	case ValueInt32:
		le.PutUint32(b[:], uint32(int32(v.i)))
		bw.Write(b[:4])
	case ValueUint64:
		le.PutUint64(b[:], v.u)
		bw.Write(b[:8])
	case ValueInt64:
		le.PutUint64(b[:], uint64(v.i))
		bw.Write(b[:8])
	case ValueFloat32:
		le.PutUint32(b[:], math.Float32bits(float32(v.f)))
		bw.Write(b[:4])
	case ValueFloat64:
		le.PutUint64(b[:], math.Float64bits(v.f))
		bw.Write(b[:8])
	case ValueString:
		le.PutUint64(b[:], uint64(len(v.s)))
		bw.Write(b[:8])
		bw.WriteString(v.s)
	case ValueArray:
		le.PutUint32(b[:], uint32(v.ElemType))
		bw.Write(b[:4])
		n := v.Len()
		le.PutUint64(b[:], uint64(n))
		bw.Write(b[:8])
		for i := 0; i < n; i++ {
			e, _ := v.Elem(i)
			writeValue(bw, e)
		}
	}
}

// WriteFile writes the file to path atomically (a temporary file in the same
// directory, renamed at the end). progress, if not nil, gets the bytes written
// so far and the total.
func (w *Writer) WriteFile(path string, progress func(done, total int64)) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("gguf: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := tmp.Chmod(0o644); err != nil {
		return fmt.Errorf("gguf: %w", err)
	}
	if _, err := w.write(tmp, progress); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("gguf: close %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("gguf: %w", err)
	}
	ok = true
	return nil
}
