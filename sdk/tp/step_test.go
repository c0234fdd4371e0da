package tp

import (
	"bytes"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/engine"
)

func sampleSteps() []step {
	return []step{
		{Op: opForward, Batch: &engine.Batch{Seqs: []engine.SeqInput{
			{Tokens: []int32{1, 2, 3, 200_000}, Pos: 0, Blocks: []int32{0}},
			{Tokens: []int32{7}, Pos: 4095, Blocks: []int32{5, 9, -1, 2_000_000_000}, AllLogits: true},
		}}},
		{Op: opForwardGreedy, Batch: &engine.Batch{Seqs: []engine.SeqInput{
			{Tokens: []int32{42}, Pos: 130, Blocks: []int32{0, 1, 2, 3, 4, 5, 6, 7, 8},
				GroupBlocks: [][]int32{{0, 1, 2, 3, 4, 5, 6, 7, 8}, {-1, -1, -1, -1, -1, -1, 3, 4, 5}}},
			{Tokens: []int32{}, Pos: 0, Blocks: nil, GroupBlocks: [][]int32{nil, {}}},
		}}},
		{Op: opForwardSample, Batch: &engine.Batch{Seqs: []engine.SeqInput{
			{Tokens: []int32{5}, Pos: 9, Blocks: []int32{2, 3}},
			{Tokens: []int32{6}, Pos: 70, Blocks: []int32{0, 1, 4}, GroupBlocks: [][]int32{{0, 1, 4}, {-1, 1, 4}}},
			{Tokens: []int32{7, 8, 9}, Pos: 0, Blocks: []int32{8}},
		}}, Specs: []engine.SampleSpec{
			{Temperature: 1, Seed: 42, Index: 0},
			{Host: true},
			{Temperature: 0.7, TopK: 40, TopP: 0.9, MinP: 0.05, Seed: 1<<64 - 1, Index: 1 << 40},
		}},
		{Op: opForwardSample, Batch: &engine.Batch{Seqs: []engine.SeqInput{}}, Specs: []engine.SampleSpec{}},
		{Op: opForwardSample, Specs: []engine.SampleSpec{{TopK: -1, Temperature: float32(math.Inf(1)), MinP: -0.5}}},
		{Op: opForwardSample},
		{Op: opForward, Batch: &engine.Batch{}},
		{Op: opForward, Batch: &engine.Batch{Seqs: []engine.SeqInput{}}},
		{Op: opForward},
		{Op: opCopyBlock, Dst: 3, Src: 17},
		{Op: opCopyBlock, Dst: -1, Src: 2147483647},
		{Op: opCopyGroupBlock, Group: 1, Dst: 100, Src: 0},
		{Op: opClose},
	}
}

func TestStepRoundTrip(t *testing.T) {
	for _, s := range sampleSteps() {
		got, err := decodeStep(encodeStep(s))
		require.NoError(t, err, "%v", s.Op)
		assert.Equal(t, s, got)
	}
}

// Floats travel as their bits: NaN and -0 too.
func TestStepSpecFloatBits(t *testing.T) {
	nan := math.Float32frombits(0x7fc00123)
	s := step{Op: opForwardSample, Batch: &engine.Batch{Seqs: []engine.SeqInput{{}}},
		Specs: []engine.SampleSpec{{Temperature: nan, TopP: float32(math.Copysign(0, -1)), MinP: math.SmallestNonzeroFloat32}}}
	got, err := decodeStep(encodeStep(s))
	require.NoError(t, err)
	require.Len(t, got.Specs, 1)
	sp := got.Specs[0]
	assert.Equal(t, uint32(0x7fc00123), math.Float32bits(sp.Temperature))
	assert.Equal(t, uint32(0x80000000), math.Float32bits(sp.TopP))
	assert.Equal(t, float32(math.SmallestNonzeroFloat32), sp.MinP)
}

func TestStepSize(t *testing.T) {
	// 64 decode sequences with 64-block tables stay a few KB.
	b := &engine.Batch{}
	for i := range 64 {
		bl := make([]int32, 64)
		for j := range bl {
			bl[j] = int32(i*64 + j)
		}
		b.Seqs = append(b.Seqs, engine.SeqInput{Tokens: []int32{int32(1000 + i)}, Pos: 1000, Blocks: bl})
	}
	n := len(encodeStep(step{Op: opForward, Batch: b}))
	assert.Less(t, n, 12_000)
	// with seeded top-k/p specs: at most 30 bytes more a sequence
	specs := make([]engine.SampleSpec, 64)
	for i := range specs {
		specs[i] = engine.SampleSpec{Temperature: 0.8, TopK: 40, TopP: 0.95, Seed: 1<<63 + uint64(i), Index: 3000}
	}
	n2 := len(encodeStep(step{Op: opForwardSample, Batch: b, Specs: specs}))
	assert.Less(t, n2-n, 64*30)
}

func TestDecodeStepErrors(t *testing.T) {
	good := encodeStep(sampleSteps()[0])
	sample := encodeStep(sampleSteps()[2])
	cases := map[string][]byte{
		"empty":          nil,
		"one byte":       {stepVersion},
		"version":        {9, byte(opClose)},
		"unknown op":     {stepVersion, 99},
		"truncated":      good[:len(good)-1],
		"trailing":       append(append([]byte{}, good...), 0),
		"huge count":     {stepVersion, byte(opForward), 0xff, 0xff, 0xff, 0xff, 0x0f},
		"int32 range":    {stepVersion, byte(opCopyBlock), 0x80, 0x80, 0x80, 0x80, 0x20, 0},
		"bad flags":      {stepVersion, byte(opForward), 2, 4, 0, 0, 0, 0},
		"huge group":     {stepVersion, byte(opCopyGroupBlock), 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0},
		"close payload":  {stepVersion, byte(opClose), 0},
		"spec truncated": sample[:len(sample)-1],
		"spec trailing":  append(append([]byte{}, sample...), 0),
		// empty batch (2), then 2^28 specs
		"huge spec count": {stepVersion, byte(opForwardSample), 2, 0x80, 0x80, 0x80, 0x80, 0x01},
		// empty batch, one spec with flags 2
		"bad spec flags": append([]byte{stepVersion, byte(opForwardSample), 2, 2, 2}, make([]byte, 15)...),
		"no specs":       {stepVersion, byte(opForwardSample), 2},
	}
	for name, p := range cases {
		_, err := decodeStep(p)
		assert.Error(t, err, name)
	}
	// the spec above with flags 0 is good
	s, err := decodeStep(append([]byte{stepVersion, byte(opForwardSample), 2, 2, 0}, make([]byte, 15)...))
	require.NoError(t, err)
	assert.Equal(t, []engine.SampleSpec{{}}, s.Specs)
}

func FuzzDecodeStep(f *testing.F) {
	for _, s := range sampleSteps() {
		f.Add(encodeStep(s))
	}
	f.Add([]byte{stepVersion, byte(opForward), 0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Fuzz(func(t *testing.T, p []byte) {
		s, err := decodeStep(p)
		if err != nil {
			return
		}
		// Whatever decodes re-encodes to something that decodes the same
		// (compared by encoding: a NaN in a spec is not equal to itself).
		p2 := encodeStep(s)
		s2, err := decodeStep(p2)
		require.NoError(t, err)
		require.True(t, bytes.Equal(p2, encodeStep(s2)))
		if !hasNaN(s) {
			require.Equal(t, s, s2)
		}
	})
}

func hasNaN(s step) bool {
	for _, sp := range s.Specs {
		for _, x := range []float32{sp.Temperature, sp.TopP, sp.MinP} {
			if x != x {
				return true
			}
		}
	}
	return false
}
