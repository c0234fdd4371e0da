package tp

import (
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
}

func TestDecodeStepErrors(t *testing.T) {
	good := encodeStep(sampleSteps()[0])
	cases := map[string][]byte{
		"empty":         nil,
		"one byte":      {stepVersion},
		"version":       {9, byte(opClose)},
		"unknown op":    {stepVersion, 99},
		"truncated":     good[:len(good)-1],
		"trailing":      append(append([]byte{}, good...), 0),
		"huge count":    {stepVersion, byte(opForward), 0xff, 0xff, 0xff, 0xff, 0x0f},
		"int32 range":   {stepVersion, byte(opCopyBlock), 0x80, 0x80, 0x80, 0x80, 0x20, 0},
		"bad flags":     {stepVersion, byte(opForward), 2, 4, 0, 0, 0, 0},
		"huge group":    {stepVersion, byte(opCopyGroupBlock), 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0},
		"close payload": {stepVersion, byte(opClose), 0},
	}
	for name, p := range cases {
		_, err := decodeStep(p)
		assert.Error(t, err, name)
	}
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
		// Whatever decodes re-encodes to something that decodes the same.
		s2, err := decodeStep(encodeStep(s))
		require.NoError(t, err)
		require.Equal(t, s, s2)
	})
}
