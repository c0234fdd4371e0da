package nn

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
)

// countWrites counts the backend's WriteI32 calls and the values they carry.
type countWrites struct {
	ml.Backend
	calls, values int
}

func (c *countWrites) WriteI32(t ml.Tensor, v []int32) error {
	c.calls++
	c.values += len(v)
	return c.Backend.WriteI32(t, v)
}

// upload writes only the span that differs from the last upload to the same
// tensor, and the device then holds exactly what a whole write would have
// left (a shorter write keeps the values past it, as a whole write does).
func TestRunnerUploadChangedSpan(t *testing.T) {
	b := &countWrites{Backend: cpu.New(1)}
	spec := RunnerConfig{Width: 4, MaxTokens: 8}
	spec.Spec.VocabSize, spec.Spec.ContextLength, spec.Spec.BlockSize, spec.Spec.NumBlocks = 10, 16, 4, 8
	r, err := NewRunner(b, nil, nopNet{}, spec)
	require.NoError(t, err)
	defer r.freeStaging() // no KV cache to free
	dev := func() []int32 {
		v := make([]int32, 8)
		require.NoError(t, b.ReadI32(r.pos, v))
		return v
	}
	step := func(v []int32, calls, values int) {
		t.Helper()
		b.calls, b.values = 0, 0
		require.NoError(t, r.upload(r.pos, v))
		assert.Equal(t, calls, b.calls, "calls for %v", v)
		assert.Equal(t, values, b.values, "values for %v", v)
	}
	step([]int32{1, 2, 3, 4, 5, 6, 7, 8}, 1, 8)
	assert.Equal(t, []int32{1, 2, 3, 4, 5, 6, 7, 8}, dev())
	step([]int32{1, 2, 3, 4, 5, 6, 7, 8}, 0, 0) // unchanged: no copy
	step([]int32{1, 2, 9, 4, 9, 6, 7, 8}, 1, 3) // the span [2, 5)
	assert.Equal(t, []int32{1, 2, 9, 4, 9, 6, 7, 8}, dev())
	step([]int32{0}, 1, 1) // shorter: the rest stays
	assert.Equal(t, []int32{0, 2, 9, 4, 9, 6, 7, 8}, dev())
	step([]int32{0, 2, 9, 4, 9, 6, 7, 5}, 1, 1) // the last value only
	assert.Equal(t, []int32{0, 2, 9, 4, 9, 6, 7, 5}, dev())

	// another tensor keeps its own record; a failed write forgets the record
	step2 := []int32{3, 3}
	require.NoError(t, r.upload(r.seq, step2))
	b.calls = 0
	require.Error(t, r.upload(r.seq, make([]int32, 9))) // more than the tensor holds
	_, ok := r.staged[r.seq]
	assert.False(t, ok)
	b.calls = 0
	require.NoError(t, r.upload(r.seq, step2))
	assert.Equal(t, 1, b.calls, "rewritten after the failure")
}

// A captured decode step is recorded for the smallest power of two from 128
// holding its positions, at most the context.
func TestPosBucket(t *testing.T) {
	for _, c := range []struct{ maxPos, ctx, want int }{
		{1, 4096, 128}, {128, 4096, 128}, {129, 4096, 256}, {257, 4096, 512}, {4096, 4096, 4096},
		{3000, 4096, 4096}, {5, 64, 64}, {129, 200, 200},
	} {
		assert.Equal(t, c.want, posBucket(c.maxPos, c.ctx), "maxPos %d, context %d", c.maxPos, c.ctx)
	}
}
