package gguf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestTypeTable(t *testing.T) {
	cases := []struct {
		t         Type
		name      string
		block, sz int
	}{
		{TypeF32, "F32", 1, 4}, {TypeF16, "F16", 1, 2}, {TypeBF16, "BF16", 1, 2},
		{TypeQ4_0, "Q4_0", 32, 18}, {TypeQ8_0, "Q8_0", 32, 34}, {TypeQ4_K, "Q4_K", 256, 144},
		{TypeQ6_K, "Q6_K", 256, 210}, {TypeMXFP4, "MXFP4", 32, 17},
	}
	for _, c := range cases {
		assert.Equal(t, c.name, c.t.String())
		assert.Equal(t, c.block, c.t.BlockSize(), c.name)
		assert.Equal(t, c.sz, c.t.BlockBytes(), c.name)
		p, ok := ParseType(c.name)
		assert.True(t, ok)
		assert.Equal(t, c.t, p)
	}
	n, err := TypeMXFP4.RowBytes(2880)
	require.NoError(t, err)
	assert.Equal(t, int64(90*17), n)
	_, err = TypeQ8_0.RowBytes(33)
	assert.ErrorContains(t, err, "multiple")
	_, err = Type(99).RowBytes(32)
	assert.ErrorContains(t, err, "unknown")
	assert.Equal(t, "type(99)", Type(99).String())
}

func fillBytes(b []byte) func(io.Writer) error {
	return func(w io.Writer) error { _, err := w.Write(b); return err }
}

func TestRoundTrip(t *testing.T) {
	w := NewWriter()
	w.Set("general.architecture", "llama")
	w.Set("u8", uint8(200))
	w.Set("i8", int8(-5))
	w.Set("u16", uint16(65000))
	w.Set("i16", int16(-30000))
	w.Set("u32", uint32(4000000000))
	w.Set("i32", int32(-2000000000))
	w.Set("u64", uint64(math.MaxUint64))
	w.Set("i64", int64(math.MinInt64))
	w.Set("f32", float32(1.5))
	w.Set("f64", 2.25)
	w.Set("b", true)
	w.Set("s", "héllo")
	w.Set("as", []string{"a", "", "ccc"})
	w.Set("ai32", []int32{1, -2, 3})
	w.Set("au8", []uint8{1, 2})
	w.Set("af32", []float32{0.5, -1})
	w.Set("ab", []bool{true, false})
	w.Set("nested", [][]int32{{1, 2}, {}, {3}})
	w.Set("nested_s", [][]string{{"x"}, {"y", "z"}})
	w.Set("empty", []string{})
	w.Set("u32", uint32(7)) // overwrite keeps position
	a := bytes.Repeat([]byte{1}, 4*8*2)
	b := bytes.Repeat([]byte{2}, 34*2)
	require.NoError(t, w.AddTensor("a", TypeF32, []int64{8, 2}, fillBytes(a)))
	require.NoError(t, w.AddTensor("b", TypeQ8_0, []int64{64}, fillBytes(b)))
	require.Error(t, w.AddTensor("a", TypeF32, []int64{1}, fillBytes(nil)))
	require.Error(t, w.AddTensor("c", TypeQ8_0, []int64{31}, fillBytes(nil)))

	path := filepath.Join(t.TempDir(), "m.gguf")
	var last int64
	require.NoError(t, w.WriteFile(path, func(done, total int64) { last = done; assert.LessOrEqual(t, done, total) }))
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, st.Size(), last)
	assert.Equal(t, w.Size(), st.Size())

	f, err := Open(path)
	require.NoError(t, err)
	defer f.Close()
	assert.Equal(t, uint32(3), f.Version)
	assert.Equal(t, "llama", f.Architecture())
	assert.Equal(t, "u8", f.KV[1].Key)
	assert.Equal(t, "u32", f.KV[5].Key)
	u, ok := f.Uint("u32")
	assert.True(t, ok)
	assert.EqualValues(t, 7, u)
	u, _ = f.Uint("u64")
	assert.Equal(t, uint64(math.MaxUint64), u)
	_, ok = f.Int("u64")
	assert.False(t, ok, "u64 max does not fit int64")
	i, _ := f.Int("i64")
	assert.Equal(t, int64(math.MinInt64), i)
	i, _ = f.Int("i8")
	assert.EqualValues(t, -5, i)
	_, ok = f.Uint("i8")
	assert.False(t, ok)
	i, _ = f.Int("i16")
	assert.EqualValues(t, -30000, i)
	fl, _ := f.Float("f32")
	assert.Equal(t, 1.5, fl)
	fl, _ = f.Float("f64")
	assert.Equal(t, 2.25, fl)
	bo, ok := f.Bool("b")
	assert.True(t, ok && bo)
	s, _ := f.String("s")
	assert.Equal(t, "héllo", s)
	ss, _ := f.Strings("as")
	assert.Equal(t, []string{"a", "", "ccc"}, ss)
	is, _ := f.Ints("ai32")
	assert.Equal(t, []int64{1, -2, 3}, is)
	fs, _ := f.Floats("af32")
	assert.Equal(t, []float32{0.5, -1}, fs)
	v, _ := f.Get("ab")
	assert.Equal(t, []bool{true, false}, v.Raw())
	v, _ = f.Get("nested")
	require.Equal(t, ValueArray, v.ElemType)
	require.Equal(t, 3, v.Len())
	e, _ := v.Elem(0)
	is, _ = e.Ints()
	assert.Equal(t, []int64{1, 2}, is)
	e, _ = v.Elem(1)
	assert.Equal(t, 0, e.Len())
	v, _ = f.Get("nested_s")
	e, _ = v.Elem(1)
	ss, _ = e.Strings()
	assert.Equal(t, []string{"y", "z"}, ss)
	v, _ = f.Get("empty")
	assert.Equal(t, 0, v.Len())
	assert.Equal(t, ValueString, v.ElemType)

	require.Len(t, f.Tensors, 2)
	ta, ok := f.Tensor("a")
	require.True(t, ok)
	assert.Equal(t, []int64{8, 2}, ta.Shape)
	assert.EqualValues(t, 16, ta.Elements())
	assert.Zero(t, ta.Offset%32)
	d, err := f.Data(ta)
	require.NoError(t, err)
	assert.Equal(t, a, d)
	tb, _ := f.Tensor("b")
	d, err = f.Data(tb)
	require.NoError(t, err)
	assert.Equal(t, b, d)
	assert.Equal(t, TypeQ8_0, tb.Type)

	// Parse through a ReaderAt gives the same result.
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	g, err := Parse(bytes.NewReader(raw), int64(len(raw)))
	require.NoError(t, err)
	assert.Equal(t, f.KV, g.KV)
	assert.Equal(t, f.Tensors, g.Tensors)
	d, err = g.Data(&g.Tensors[1])
	require.NoError(t, err)
	assert.Equal(t, b, d)
}

func TestWriterErrors(t *testing.T) {
	w := NewWriter()
	w.Set("bad", struct{}{})
	_, err := w.WriteTo(io.Discard)
	assert.ErrorContains(t, err, `"bad"`)

	w = NewWriter()
	require.NoError(t, w.AddTensor("x", TypeF32, []int64{4}, fillBytes(make([]byte, 15))))
	_, err = w.WriteTo(io.Discard)
	assert.ErrorContains(t, err, "wrote 15 bytes, want 16")
	assert.Error(t, w.SetAlignment(48))
}

func TestWriterAlignment(t *testing.T) {
	w := NewWriter()
	require.NoError(t, w.SetAlignment(256))
	require.NoError(t, w.AddTensor("x", TypeF32, []int64{3}, fillBytes(make([]byte, 12))))
	require.NoError(t, w.AddTensor("y", TypeF32, []int64{3}, fillBytes([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12})))
	var buf bytes.Buffer
	_, err := w.WriteTo(&buf)
	require.NoError(t, err)
	f, err := Parse(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	require.NoError(t, err)
	assert.EqualValues(t, 256, f.Alignment)
	assert.Zero(t, f.DataOffset%256)
	y, _ := f.Tensor("y")
	assert.Equal(t, f.DataOffset+256, y.Offset)
}

// rawBuilder hand-assembles GGUF bytes independent of Writer, so tests can
// produce files with other key orders, integer widths, alignments and
// corruptions.
type rawBuilder struct{ bytes.Buffer }

func (b *rawBuilder) u8(x uint8)   { b.WriteByte(x) }
func (b *rawBuilder) u16(x uint16) { binary.Write(b, binary.LittleEndian, x) }
func (b *rawBuilder) u32(x uint32) { binary.Write(b, binary.LittleEndian, x) }
func (b *rawBuilder) u64(x uint64) { binary.Write(b, binary.LittleEndian, x) }
func (b *rawBuilder) str(s string) { b.u64(uint64(len(s))); b.WriteString(s) }
func (b *rawBuilder) header(version uint32, nt, nkv uint64) {
	b.WriteString("GGUF")
	b.u32(version)
	b.u64(nt)
	b.u64(nkv)
}
func (b *rawBuilder) pad(a int) {
	for b.Len()%a != 0 {
		b.WriteByte(0)
	}
}

// foreignFile is a v2 file with tensors declared out of data order,
// alignment 64 given as uint16... no: as uint32 per spec but placed last,
// integer hyperparameters as uint16/int8, a uint64 array, a float64 array and
// a nested array of strings.
func foreignFile() []byte {
	var b rawBuilder
	b.header(2, 2, 6)
	b.str("llama.block_count")
	b.u32(uint32(ValueUint16))
	b.u16(2)
	b.str("llama.context_length")
	b.u32(uint32(ValueInt8))
	b.u8(64)
	b.str("tokenizer.ggml.tokens")
	b.u32(uint32(ValueArray))
	b.u32(uint32(ValueString))
	b.u64(2)
	b.str("a")
	b.str("b")
	b.str("x.nested")
	b.u32(uint32(ValueArray))
	b.u32(uint32(ValueArray))
	b.u64(1)
	b.u32(uint32(ValueFloat64))
	b.u64(2)
	binary.Write(&b, binary.LittleEndian, 1.25)
	binary.Write(&b, binary.LittleEndian, -2.5)
	b.str("general.architecture")
	b.u32(uint32(ValueString))
	b.str("llama")
	b.str("general.alignment")
	b.u32(uint32(ValueUint32))
	b.u32(64)
	// tensor infos: second in data first
	b.str("late")
	b.u32(1)
	b.u64(32)
	b.u32(uint32(TypeQ4_0))
	b.u64(64)
	b.str("early")
	b.u32(2)
	b.u64(2)
	b.u64(2)
	b.u32(uint32(TypeF16))
	b.u64(0)
	b.pad(64)
	b.Write(bytes.Repeat([]byte{0xAA}, 8)) // early: 4 F16
	b.pad(64)
	b.Write(bytes.Repeat([]byte{0xBB}, 18)) // late: one Q4_0 block
	return b.Bytes()
}

func TestForeignFile(t *testing.T) {
	raw := foreignFile()
	path := filepath.Join(t.TempDir(), "foreign.gguf")
	require.NoError(t, os.WriteFile(path, raw, 0o644))
	f, err := Open(path)
	require.NoError(t, err)
	defer f.Close()
	assert.EqualValues(t, 2, f.Version)
	assert.EqualValues(t, 64, f.Alignment)
	assert.Equal(t, "llama", f.Architecture())
	n, ok := f.ArchUint("block_count")
	assert.True(t, ok)
	assert.EqualValues(t, 2, n)
	n, _ = f.ArchUint("context_length")
	assert.EqualValues(t, 64, n)
	v, _ := f.Get("x.nested")
	e, _ := v.Elem(0)
	fs, ok := e.Floats()
	assert.True(t, ok)
	assert.Equal(t, []float32{1.25, -2.5}, fs)
	late, _ := f.Tensor("late")
	d, err := f.Data(late)
	require.NoError(t, err)
	assert.Equal(t, bytes.Repeat([]byte{0xBB}, 18), d)
	early, _ := f.Tensor("early")
	d, _ = f.Data(early)
	assert.Equal(t, bytes.Repeat([]byte{0xAA}, 8), d)
	assert.Equal(t, f.DataOffset, early.Offset)
}

func TestMalformed(t *testing.T) {
	good := foreignFile()
	le := binary.LittleEndian
	mut := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	hugeArray := func() []byte {
		var b rawBuilder
		b.header(3, 0, 1)
		b.str("k")
		b.u32(uint32(ValueArray))
		b.u32(uint32(ValueUint8))
		b.u64(1 << 60)
		return b.Bytes()
	}
	smallArray := func() []byte {
		var b rawBuilder
		b.header(3, 0, 1)
		b.str("k")
		b.u32(uint32(ValueArray))
		b.u32(uint32(ValueInt32))
		b.u64(1000)
		b.u32(7)
		return b.Bytes()
	}
	hugeString := func() []byte {
		var b rawBuilder
		b.header(3, 0, 1)
		b.str("k")
		b.u32(uint32(ValueString))
		b.u64(1 << 62)
		return b.Bytes()
	}
	tensors := func(t1off, t2off uint64, typ uint32, extra int) []byte {
		var b rawBuilder
		b.header(3, 2, 0)
		b.str("t1")
		b.u32(1)
		b.u64(8)
		b.u32(typ)
		b.u64(t1off)
		b.str("t2")
		b.u32(1)
		b.u64(8)
		b.u32(0)
		b.u64(t2off)
		b.pad(32)
		b.Write(make([]byte, 64+extra))
		return b.Bytes()
	}
	deep := func() []byte {
		var b rawBuilder
		b.header(3, 0, 1)
		b.str("k")
		b.u32(uint32(ValueArray))
		for i := 0; i < 20; i++ {
			b.u32(uint32(ValueArray))
			b.u64(1)
		}
		return b.Bytes()
	}
	cases := []struct {
		name string
		data []byte
		want string
	}{
		{"empty", nil, "truncated"},
		{"wrong magic", mut(func(b []byte) []byte { copy(b, "GGML"); return b }), "wrong magic"},
		{"big endian", mut(func(b []byte) []byte { binary.BigEndian.PutUint32(b[4:], 3); return b }), "big-endian"},
		{"version 1", mut(func(b []byte) []byte { le.PutUint32(b[4:], 1); return b }), "unsupported GGUF version 1"},
		{"truncated header", good[:40], "cannot fit"},
		{"truncated kv", good[:150], "truncated"},
		{"truncated data", good[:len(good)-1], "past the end"},
		{"huge kv count", mut(func(b []byte) []byte { le.PutUint64(b[16:], 1<<60); return b }), "metadata count"},
		{"huge tensor count", mut(func(b []byte) []byte { le.PutUint64(b[8:], 1<<60); return b }), "tensor count"},
		{"2^60 array", hugeArray(), "array of 1152921504606846976 elements"},
		{"array past eof", smallArray(), "does not fit"},
		{"huge string", hugeString(), "exceeds"},
		{"overlap", tensors(0, 0, 0, 0), "overlap"},
		{"past eof", tensors(0, 4096, 0, 0), "past the end"},
		{"unknown dtype", tensors(0, 32, 77, 0), "unknown type id 77"},
		{"misaligned", tensors(0, 40, 0, 16), "alignment"},
		{"nesting", deep(), "nested deeper"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, err := Parse(bytes.NewReader(c.data), int64(len(c.data)))
			require.Error(t, err)
			assert.Nil(t, f)
			assert.ErrorContains(t, err, c.want)
			assert.True(t, errors.Is(err, ErrFormat), "%v", err)
		})
	}
	// sanity: the good tensors() layout parses
	_, err := Parse(bytes.NewReader(tensors(0, 32, 0, 0)), int64(len(tensors(0, 32, 0, 0))))
	require.NoError(t, err)
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	_, err := Open(filepath.Join(dir, "missing.gguf"))
	assert.Error(t, err)
	p := filepath.Join(dir, "empty.gguf")
	require.NoError(t, os.WriteFile(p, nil, 0o644))
	_, err = Open(p)
	assert.ErrorIs(t, err, ErrFormat)
	assert.ErrorContains(t, err, "empty.gguf")
}

func TestLimits(t *testing.T) {
	// a large file claiming a 2^30-element uint8 array: rejected by the
	// per-array limit before anything is allocated
	var b rawBuilder
	b.header(3, 0, 1)
	b.str("k")
	b.u32(uint32(ValueArray))
	b.u32(uint32(ValueUint8))
	b.u64(1 << 30)
	_, err := Parse(sparseReader{b.Bytes()}, 1<<31)
	assert.ErrorContains(t, err, "exceeds the limit")

	var c rawBuilder
	c.header(3, 1<<24, 0)
	_, err = Parse(sparseReader{c.Bytes()}, 1<<40)
	assert.ErrorContains(t, err, "exceed the limits")
}

// sparseReader serves a header followed by zeros up to any size, to model a
// huge file without writing it.
type sparseReader struct{ head []byte }

func (s sparseReader) ReadAt(p []byte, off int64) (int, error) {
	for i := range p {
		j := off + int64(i)
		if j < int64(len(s.head)) {
			p[i] = s.head[j]
		} else {
			p[i] = 0
		}
	}
	return len(p), nil
}
