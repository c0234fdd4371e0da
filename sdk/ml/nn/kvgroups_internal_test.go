package nn

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
)

func TestKVGroups(t *testing.T) {
	o := Options{NumBlocks: 100, BlockSize: 4, ContextLength: 64, MaxTokens: 16, MaxSequences: 3, StepTokens: 32}
	g := KVGroups([]int{8, 0, 8, 0}, o)
	require.Len(t, g, 2)
	assert.Equal(t, KVGroup{Window: 0, Layers: []int{1, 3}, NumBlocks: 100}, g[0], "full layers first")
	assert.Equal(t, KVGroup{Window: 8, Layers: []int{0, 2}, NumBlocks: WindowBlocks(8, 4, 32, 64, 3)}, g[1])
	assert.Equal(t, (32+3*6)/4+2*3+1, g[1].NumBlocks)

	// two windows and full layers: three groups in order of appearance after the full one
	g = KVGroups([]int{4, 8, 0}, o)
	require.Len(t, g, 3)
	assert.Equal(t, []int{0, 4, 8}, []int{g[0].Window, g[1].Window, g[2].Window})

	for name, tc := range map[string]struct {
		w []int
		o Options
	}{
		"no windows":  {[]int{0, 0}, o},
		"nil":         {nil, o},
		"shared":      {[]int{8, 0}, func() Options { x := o; x.SharedKV = true; return x }()},
		"all windows": {[]int{8, 8}, o},
		"no full":     {[]int{8, 4}, o},
	} {
		assert.Nil(t, KVGroups(tc.w, tc.o), name)
	}
	t.Setenv(EnvKVGroups, "off")
	assert.Nil(t, KVGroups([]int{8, 0}, o), "environment switch")
	t.Setenv(EnvKVGroups, "")

	// without MaxSequences (a direct Load) the window pool is as big as the full one
	x := o
	x.MaxSequences = 0
	assert.Equal(t, 100, KVGroups([]int{8, 0}, x)[1].NumBlocks)
	x.WindowBlocks = 7
	assert.Equal(t, 7, KVGroups([]int{8, 0}, x)[1].NumBlocks, "explicit window pool")
	// capped at whole contexts
	assert.Equal(t, 3*(64/4+1), WindowBlocks(1000, 4, 512, 64, 3))
}

// WindowBlocks bounds what the sequences of any step hold: each holds the
// blocks from (c-W+1)/bs to (c+n-1)/bs for its chunk of n tokens at c, and
// the chunks add up to at most the step's tokens.
func TestWindowBlocksBound(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 20000 {
		bs, w, seqs := 1+r.IntN(32), 1+r.IntN(300), 1+r.IntN(16)
		step := seqs + r.IntN(1024)
		ctx := w + r.IntN(5000)
		left, held := step, 0
		for s := 0; s < seqs; s++ {
			n := r.IntN(min(left, ctx) + 1)
			if s == seqs-1 {
				n = min(left, ctx)
			}
			left -= n
			c := r.IntN(ctx - n + 1)
			lo := max(0, c-w+1) / bs
			hi := (c + max(n, 1) - 1) / bs
			if c+n == 0 {
				continue
			}
			held += hi - lo + 1
		}
		require.LessOrEqual(t, held+1, WindowBlocks(w, bs, step, ctx, seqs), "bs %d w %d seqs %d step %d", bs, w, seqs, step)
	}
}

func TestGroupedKVCache(t *testing.T) {
	b := cpu.New(1)
	groups := []KVGroup{{Layers: []int{1, 2}, NumBlocks: 10}, {Window: 4, Layers: []int{0}, NumBlocks: 3}}
	kv, err := NewGroupedKVCache(b, ml.F32, 3, 8, 2, 4, 10, groups)
	require.NoError(t, err)
	defer kv.Free(b)
	assert.Equal(t, []int{1, 0, 0}, kv.Group)
	assert.Equal(t, 10, kv.NumBlocks)
	assert.Equal(t, 3, kv.K[0].Shape()[3])
	assert.Equal(t, 10, kv.K[1].Shape()[3])
	assert.Equal(t, KVBlockBytes(ml.F32, 2, 8, 2, 4), kv.BlockBytes(), "group 0's layers")
	assert.Equal(t, KVBlockBytes(ml.F32, 1, 8, 2, 4), kv.GroupBlockBytes(1))
	assert.Equal(t, 10*kv.BlockBytes()+3*kv.GroupBlockBytes(1), kv.Bytes())
	bb, rest := GroupKVBytes(ml.F32, 3, 8, 2, 4, groups)
	assert.Equal(t, kv.BlockBytes(), bb)
	assert.Equal(t, 3*kv.GroupBlockBytes(1), rest)
	eg := kv.EngineGroups()
	require.Len(t, eg, 2)
	assert.Equal(t, engine.KVGroup{Name: "window 4", Window: 4, Layers: 1, NumBlocks: 3, BlockBytes: kv.GroupBlockBytes(1)}, eg[1])
	spec := engine.Spec{NumBlocks: 10, KVBlockBytes: bb, Groups: eg}
	assert.Equal(t, kv.Bytes(), spec.KVBytes())

	_, err = NewGroupedKVCache(b, ml.F32, 3, 8, 2, 4, 10, []KVGroup{{Layers: []int{0, 1}, NumBlocks: 10}})
	assert.ErrorContains(t, err, "layer 2 in no group")
	_, err = NewGroupedKVCache(b, ml.F32, 3, 8, 2, 4, 10, []KVGroup{{Layers: []int{0, 1, 2, 1}, NumBlocks: 10}})
	assert.ErrorContains(t, err, "two groups")
	_, err = NewGroupedKVCache(b, ml.F32, 1, 8, 2, 4, 10, []KVGroup{{Layers: []int{0}, NumBlocks: 0}})
	assert.Error(t, err)
}

// split gives each group its slots and tables; a window group's freed
// entries (-1) below the chunk's window become 0, visible ones must be valid.
func TestSplitGroups(t *testing.T) {
	groups := []KVGroup{{NumBlocks: 20}, {Window: 5, NumBlocks: 6}}
	const bs = 4
	// positions 12..14; the window of position 12 starts at 8: block 2
	seq := engine.SeqInput{Tokens: []int32{1, 2, 3}, Pos: 12, Blocks: []int32{10, 11, 12, 13},
		GroupBlocks: [][]int32{{10, 11, 12, 13}, {-1, -1, 4, 5}}}
	ps, err := split(&engine.Batch{Seqs: []engine.SeqInput{seq}}, 50, bs, groups, 2)
	require.NoError(t, err)
	require.Len(t, ps, 2)
	assert.Equal(t, []int32{13 * bs, 13*bs + 1}, ps[0].Slots)
	assert.Equal(t, [][]int32{{5 * bs, 5*bs + 1}}, ps[0].GroupSlots)
	assert.Equal(t, []int32{10, 11, 12, 13}, ps[0].Blocks)
	assert.Equal(t, [][]int32{{0, 0, 4, 5}}, ps[0].GroupBlocks)
	assert.Equal(t, [][]int32{{5*bs + 2}}, ps[1].GroupSlots)
	assert.Equal(t, []int32{-1, -1, 4, 5}, seq.GroupBlocks[1], "the caller's table is not modified")

	bad := seq
	bad.GroupBlocks = [][]int32{seq.Blocks, {-1, -1, -1, 5}} // block 2 is visible from 12
	_, err = split(&engine.Batch{Seqs: []engine.SeqInput{bad}}, 50, bs, groups, 8)
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
	assert.ErrorContains(t, err, "KV group 1")
	bad.GroupBlocks = [][]int32{seq.Blocks, {0, 1, 2, 6}} // 6 is outside the window pool
	_, err = split(&engine.Batch{Seqs: []engine.SeqInput{bad}}, 50, bs, groups, 8)
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
	bad.GroupBlocks = [][]int32{seq.Blocks}
	_, err = split(&engine.Batch{Seqs: []engine.SeqInput{bad}}, 50, bs, groups, 8)
	assert.ErrorContains(t, err, "1 group block tables for 2 KV groups")

	// no GroupBlocks: every group uses Blocks (ids must fit the window pool)
	one := engine.SeqInput{Tokens: []int32{1}, Pos: 5, Blocks: []int32{3, 4}}
	ps, err = split(&engine.Batch{Seqs: []engine.SeqInput{one}}, 50, bs, groups, 8)
	require.NoError(t, err)
	assert.Equal(t, [][]int32{{3, 4}}, ps[0].GroupBlocks)
	assert.Equal(t, [][]int32{{4*bs + 1}}, ps[0].GroupSlots)
	one.Blocks = []int32{3, 9}
	_, err = split(&engine.Batch{Seqs: []engine.SeqInput{one}}, 50, bs, groups, 8)
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
}

func TestRunnerGroupBytesMatchesRunner(t *testing.T) {
	b := &countAlloc{Backend: cpu.New(1)}
	kv := &KVCache{Groups: []KVGroup{{NumBlocks: 8}, {Window: 4, NumBlocks: 3}, {Window: 2, NumBlocks: 3}}}
	spec := RunnerConfig{Width: 32, MaxTokens: 16}
	spec.Spec.VocabSize, spec.Spec.ContextLength, spec.Spec.BlockSize, spec.Spec.NumBlocks = 100, 200, 4, 8
	r, err := NewRunner(b, kv, nil, spec)
	require.NoError(t, err)
	r.freeStaging()
	assert.Equal(t, b.n, RunnerGroupBytes(32, 100, 200, 4, 16, 3))
	assert.Greater(t, RunnerGroupBytes(32, 100, 200, 4, 16, 3), RunnerBytes(32, 100, 200, 4, 16))
}

// CopyGroupBlock copies a block in its group's layers only; CopyBlock in
// every layer.
func TestCopyGroupBlock(t *testing.T) {
	b := cpu.New(1)
	groups := []KVGroup{{Layers: []int{1}, NumBlocks: 4}, {Window: 4, Layers: []int{0}, NumBlocks: 3}}
	kv, err := NewGroupedKVCache(b, ml.F32, 2, 2, 1, 1, 4, groups)
	require.NoError(t, err)
	spec := RunnerConfig{Width: 4, MaxTokens: 4}
	spec.Spec.VocabSize, spec.Spec.ContextLength, spec.Spec.BlockSize, spec.Spec.NumBlocks = 10, 8, 1, 4
	r, err := NewRunner(b, kv, nopNet{}, spec)
	require.NoError(t, err)
	defer r.Close()
	fill := func() {
		for l := range 2 {
			n := kv.K[l].Len()
			v := make([]float32, n)
			for i := range v {
				v[i] = float32(100*l + i)
			}
			require.NoError(t, b.WriteF32(kv.K[l], v))
			require.NoError(t, b.WriteF32(kv.V[l], v))
		}
	}
	read := func(l int) []float32 {
		v := make([]float32, kv.K[l].Len())
		require.NoError(t, b.ReadF32(kv.K[l], v))
		return v
	}
	fill()
	require.NoError(t, r.CopyGroupBlock(1, 0, 2)) // layer 0, blocks of 2 floats
	assert.Equal(t, []float32{4, 5, 2, 3, 4, 5}, read(0))
	assert.Equal(t, []float32{100, 101, 102, 103, 104, 105, 106, 107}, read(1), "group 0's layer untouched")
	fill()
	require.NoError(t, r.CopyGroupBlock(0, 3, 0))
	assert.Equal(t, []float32{100, 101, 102, 103, 104, 105, 100, 101}, read(1))
	assert.Equal(t, []float32{0, 1, 2, 3, 4, 5}, read(0))
	fill()
	require.NoError(t, r.CopyBlock(1, 0))
	assert.Equal(t, []float32{0, 1, 0, 1, 4, 5}, read(0))
	assert.Equal(t, []float32{100, 101, 100, 101, 104, 105, 106, 107}, read(1))
	assert.ErrorIs(t, r.CopyGroupBlock(1, 3, 0), sdk.ErrInvalidArgument, "block 3 outside the window pool")
	assert.ErrorIs(t, r.CopyBlock(3, 0), sdk.ErrInvalidArgument, "CopyBlock ids must fit every pool")
	assert.ErrorIs(t, r.CopyGroupBlock(2, 0, 1), sdk.ErrInvalidArgument)
}

type nopNet struct{}

func (nopNet) Hidden(*Staged) (ml.Tensor, error) { return nil, nil }
func (nopNet) Head(_, _ ml.Tensor) error         { return nil }
func (nopNet) Close() error                      { return nil }
