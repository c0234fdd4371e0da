package tp

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/llama-orch/orch/sdk/engine"
)

// op is the engine.Model call a step message replays on the followers.
type op uint8

const (
	opForward op = iota + 1
	opForwardGreedy
	opCopyBlock
	opCopyGroupBlock
	opClose
	opForwardSample
)

func (o op) String() string {
	switch o {
	case opForward:
		return "Forward"
	case opForwardGreedy:
		return "ForwardGreedy"
	case opCopyBlock:
		return "CopyBlock"
	case opCopyGroupBlock:
		return "CopyGroupBlock"
	case opClose:
		return "Close"
	case opForwardSample:
		return "ForwardSample"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// step is one leader call, as broadcast to the followers.
type step struct {
	Op       op
	Batch    *engine.Batch       // Forward, ForwardGreedy, ForwardSample
	Specs    []engine.SampleSpec // ForwardSample
	Group    int                 // CopyGroupBlock
	Dst, Src int32               // CopyBlock, CopyGroupBlock
}

// stepVersion leads every step message; a follower refuses another version.
const stepVersion = 1

// Step message layout (varints from encoding/binary; "n+1" lengths keep nil
// and empty slices apart, 0 meaning nil):
//
//	version u8, op u8, then by op:
//	Forward, ForwardGreedy, ForwardSample: uvarint nSeq+2 (0: nil batch,
//	1: nil Seqs), per sequence:
//	    uvarint flags (bit 0 AllLogits), varint Pos, tokens, blocks,
//	    uvarint nGroups+1 (0: nil GroupBlocks), each group's table
//	    (a table: uvarint n+1, then n varints)
//	ForwardSample, after the batch: uvarint nSpecs+1 (0: nil), per spec:
//	    uvarint flags (bit 0 Host), Temperature, TopP, MinP (float32 bits,
//	    4 bytes little-endian each: every value travels, NaN included),
//	    varint TopK, uvarint Seed, uvarint Index
//	CopyBlock: varint dst, varint src
//	CopyGroupBlock: uvarint group, varint dst, varint src
//	Close: nothing
//
// A decode step of 64 sequences with 64-block tables takes ~9 KB (with
// ForwardSample's specs 16 to 30 bytes more a sequence).

const (
	flagAllLogits = 1 // sequence flags
	flagHost      = 1 // spec flags
)

// minSeqBytes is the smallest encoded sequence: flags, pos and three
// lengths of one byte each.
const minSeqBytes = 5

// minSpecBytes is the smallest encoded spec: flags, three floats, TopK,
// Seed and Index.
const minSpecBytes = 1 + 3*4 + 3

func encodeStep(s step) []byte {
	b := make([]byte, 0, 64)
	b = append(b, stepVersion, byte(s.Op))
	switch s.Op {
	case opForward, opForwardGreedy:
		b = appendBatch(b, s.Batch)
	case opForwardSample:
		b = appendBatch(b, s.Batch)
		if s.Specs == nil {
			return binary.AppendUvarint(b, 0)
		}
		b = binary.AppendUvarint(b, uint64(len(s.Specs))+1)
		for _, sp := range s.Specs {
			var flags uint64
			if sp.Host {
				flags |= flagHost
			}
			b = binary.AppendUvarint(b, flags)
			b = binary.LittleEndian.AppendUint32(b, math.Float32bits(sp.Temperature))
			b = binary.LittleEndian.AppendUint32(b, math.Float32bits(sp.TopP))
			b = binary.LittleEndian.AppendUint32(b, math.Float32bits(sp.MinP))
			b = binary.AppendVarint(b, int64(sp.TopK))
			b = binary.AppendUvarint(b, sp.Seed)
			b = binary.AppendUvarint(b, sp.Index)
		}
	case opCopyGroupBlock:
		b = binary.AppendUvarint(b, uint64(s.Group))
		b = binary.AppendVarint(b, int64(s.Dst))
		b = binary.AppendVarint(b, int64(s.Src))
	case opCopyBlock:
		b = binary.AppendVarint(b, int64(s.Dst))
		b = binary.AppendVarint(b, int64(s.Src))
	}
	return b
}

func appendBatch(b []byte, bt *engine.Batch) []byte {
	if bt == nil {
		return binary.AppendUvarint(b, 0)
	}
	if bt.Seqs == nil {
		return binary.AppendUvarint(b, 1)
	}
	b = binary.AppendUvarint(b, uint64(len(bt.Seqs))+2)
	for _, q := range bt.Seqs {
		var flags uint64
		if q.AllLogits {
			flags |= flagAllLogits
		}
		b = binary.AppendUvarint(b, flags)
		b = binary.AppendVarint(b, int64(q.Pos))
		b = appendI32s(b, q.Tokens)
		b = appendI32s(b, q.Blocks)
		if q.GroupBlocks == nil {
			b = binary.AppendUvarint(b, 0)
			continue
		}
		b = binary.AppendUvarint(b, uint64(len(q.GroupBlocks))+1)
		for _, t := range q.GroupBlocks {
			b = appendI32s(b, t)
		}
	}
	return b
}

func appendI32s(b []byte, v []int32) []byte {
	if v == nil {
		return binary.AppendUvarint(b, 0)
	}
	b = binary.AppendUvarint(b, uint64(len(v))+1)
	for _, x := range v {
		b = binary.AppendVarint(b, int64(x))
	}
	return b
}

var errShortStep = errors.New("truncated")

// stepReader decodes a step message; the first error sticks.
type stepReader struct {
	b   []byte
	err error
}

func (r *stepReader) fail(err error) {
	if r.err == nil {
		r.err = err
	}
}

func (r *stepReader) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail(errShortStep)
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *stepReader) varint() int64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.fail(errShortStep)
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *stepReader) f32() float32 {
	if r.err != nil {
		return 0
	}
	if len(r.b) < 4 {
		r.fail(errShortStep)
		return 0
	}
	v := math.Float32frombits(binary.LittleEndian.Uint32(r.b))
	r.b = r.b[4:]
	return v
}

func (r *stepReader) i32() int32 {
	v := r.varint()
	if v < math.MinInt32 || v > math.MaxInt32 {
		r.fail(fmt.Errorf("value %d out of int32 range", v))
		return 0
	}
	return int32(v)
}

// count reads an n+1 length of elements that take at least minBytes each
// on the wire: a count above what the bytes left can hold is corrupt (this
// bounds every allocation by a small multiple of the message size).
func (r *stepReader) count(what string, minBytes int) (n int, isNil bool) {
	v := r.uvarint()
	if r.err != nil {
		return 0, true
	}
	if v == 0 {
		return 0, true
	}
	if v-1 > uint64(len(r.b)/minBytes) {
		r.fail(fmt.Errorf("%s count %d exceeds what the %d bytes left can hold", what, v-1, len(r.b)))
		return 0, true
	}
	return int(v - 1), false
}

func (r *stepReader) i32s(what string) []int32 {
	n, isNil := r.count(what, 1)
	if isNil {
		return nil
	}
	v := make([]int32, n)
	for i := range v {
		v[i] = r.i32()
	}
	return v
}

// batch reads a Batch (appendBatch).
func (r *stepReader) batch() *engine.Batch {
	v := r.uvarint()
	if r.err != nil || v == 0 {
		return nil // nil batch (or truncated)
	}
	b := &engine.Batch{}
	if v == 1 {
		return b // nil Seqs
	}
	if v-2 > uint64(len(r.b)/minSeqBytes) {
		r.fail(fmt.Errorf("sequence count %d exceeds what the %d bytes left can hold", v-2, len(r.b)))
		return b
	}
	b.Seqs = make([]engine.SeqInput, v-2)
	for i := range b.Seqs {
		q := &b.Seqs[i]
		flags := r.uvarint()
		if flags&^flagAllLogits != 0 {
			r.fail(fmt.Errorf("unknown sequence flags %#x", flags))
		}
		q.AllLogits = flags&flagAllLogits != 0
		pos := r.varint()
		if pos < math.MinInt32 || pos > math.MaxInt32 {
			r.fail(fmt.Errorf("position %d out of range", pos))
		}
		q.Pos = int(pos)
		q.Tokens = r.i32s("token")
		q.Blocks = r.i32s("block")
		ng, gNil := r.count("group table", 1)
		if !gNil {
			q.GroupBlocks = make([][]int32, ng)
			for j := range q.GroupBlocks {
				q.GroupBlocks[j] = r.i32s("group block")
			}
		}
		if r.err != nil {
			break
		}
	}
	return b
}

// specs reads the SampleSpecs of a ForwardSample step.
func (r *stepReader) specs() []engine.SampleSpec {
	n, isNil := r.count("sample spec", minSpecBytes)
	if isNil {
		return nil
	}
	v := make([]engine.SampleSpec, n)
	for i := range v {
		sp := &v[i]
		flags := r.uvarint()
		if flags&^flagHost != 0 {
			r.fail(fmt.Errorf("unknown sample spec flags %#x", flags))
		}
		sp.Host = flags&flagHost != 0
		sp.Temperature, sp.TopP, sp.MinP = r.f32(), r.f32(), r.f32()
		k := r.varint()
		if int64(int(k)) != k {
			r.fail(fmt.Errorf("top-k %d out of range", k))
		}
		sp.TopK = int(k)
		sp.Seed, sp.Index = r.uvarint(), r.uvarint()
		if r.err != nil {
			break
		}
	}
	return v
}

// decodeStep parses a step message: any malformed input is an error, never
// a panic, and allocations stay proportional to len(p).
func decodeStep(p []byte) (step, error) {
	if len(p) < 2 {
		return step{}, fmt.Errorf("tp: step message of %d bytes: %w", len(p), errShortStep)
	}
	if p[0] != stepVersion {
		return step{}, fmt.Errorf("tp: step message version %d, this rank speaks %d", p[0], stepVersion)
	}
	s := step{Op: op(p[1])}
	r := &stepReader{b: p[2:]}
	switch s.Op {
	case opForward, opForwardGreedy:
		s.Batch = r.batch()
	case opForwardSample:
		s.Batch = r.batch()
		s.Specs = r.specs()
	case opCopyGroupBlock:
		g := r.uvarint()
		if g > math.MaxInt32 {
			r.fail(fmt.Errorf("group %d out of range", g))
		}
		s.Group = int(g)
		s.Dst, s.Src = r.i32(), r.i32()
	case opCopyBlock:
		s.Dst, s.Src = r.i32(), r.i32()
	case opClose:
	default:
		return step{}, fmt.Errorf("tp: step message with unknown op %d", p[1])
	}
	if r.err == nil && len(r.b) != 0 {
		r.fail(fmt.Errorf("%d trailing bytes", len(r.b)))
	}
	if r.err != nil {
		return step{}, fmt.Errorf("tp: bad %v step message: %w", s.Op, r.err)
	}
	return s, nil
}
