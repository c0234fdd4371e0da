package nn

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
)

func TestSize(t *testing.T) {
	s, err := Size(sdk.LoadOptions{}, 131072, "cpu")
	require.NoError(t, err)
	assert.Equal(t, Sizing{Context: 4096, MaxSeqs: 4, BlockSize: 16, NumBlocks: 256 * 4, KVType: ml.F32}, s)
	s, err = Size(sdk.LoadOptions{ContextLength: 100000, MaxSequences: 2}, 2048, "cuda")
	require.NoError(t, err)
	assert.Equal(t, 2048, s.Context)
	assert.Equal(t, 2*128, s.NumBlocks)
	s, err = Size(sdk.LoadOptions{}, 0, "cuda")
	require.NoError(t, err)
	assert.Equal(t, 16, s.MaxSeqs)
	assert.Equal(t, ml.F16, s.KVType, "f16 KV by default on the GPU")
	s, err = Size(sdk.LoadOptions{Extra: map[string]string{"kv_type": "f32"}}, 0, "cuda")
	require.NoError(t, err)
	assert.Equal(t, ml.F32, s.KVType)
	s, err = Size(sdk.LoadOptions{Extra: map[string]string{"block_size": "32", "num_blocks": "7", "kv_type": "F16"}}, 4096, "cuda")
	require.NoError(t, err)
	assert.Equal(t, 32, s.BlockSize)
	assert.Equal(t, 7, s.NumBlocks)
	assert.Equal(t, ml.F16, s.KVType)
	for _, extra := range []map[string]string{{"block_size": "0"}, {"num_blocks": "x"}, {"kv_type": "q8"}} {
		_, err = Size(sdk.LoadOptions{Extra: extra}, 4096, "cpu")
		assert.ErrorIs(t, err, sdk.ErrInvalidArgument, "%v", extra)
	}
}

func TestOpenBackend(t *testing.T) {
	b, err := OpenBackend("cpu", 3, nil)
	require.NoError(t, err)
	assert.Equal(t, "cpu", b.Name())
	assert.Equal(t, "cpu (3 threads)", b.DeviceName())
	_, err = OpenBackend("tpu", 0, nil)
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
	_, err = OpenBackend("cuda:x", 0, nil)
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
	// auto always yields a usable backend (CPU when there is no GPU)
	b, err = OpenBackend("auto", 1, nil)
	require.NoError(t, err)
	assert.NotEmpty(t, b.DeviceName())
	require.NoError(t, b.Close())
}

func TestKVCacheTypes(t *testing.T) {
	b := cpu.New(1)
	c, err := NewKVCache(b, ml.F32, 2, 16, 2, 4, 8)
	require.NoError(t, err)
	assert.Equal(t, int64(2*2*16*2*4*4), c.BlockBytes())
	_, err = NewKVCache(b, ml.F16, 2, 16, 2, 4, 8)
	assert.ErrorContains(t, err, "F16") // the CPU backend keeps F32 caches
	_, err = NewKVCache(b, ml.Q8_0, 2, 16, 2, 4, 8)
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
}

func TestSplit(t *testing.T) {
	b := &engine.Batch{Seqs: []engine.SeqInput{
		{Tokens: []int32{1, 2, 3, 4, 5}, Pos: 2, Blocks: []int32{7, 3}, AllLogits: true},
		{Tokens: []int32{9}, Pos: 0, Blocks: []int32{5}},
	}}
	ps, err := Split(b, 10, 4, 8, 4)
	require.NoError(t, err)
	require.Len(t, ps, 2)
	assert.Equal(t, []int32{1, 2, 3, 4}, ps[0].Tokens)
	assert.Equal(t, []int32{2, 3, 4, 5}, ps[0].Pos)
	assert.Equal(t, []int32{7*4 + 2, 7*4 + 3, 3 * 4, 3*4 + 1}, ps[0].Slots)
	assert.Equal(t, []int32{0, 1, 2, 3}, ps[0].OutRows)
	assert.Equal(t, []int{0, 0, 0, 0}, ps[0].OutOwner)
	// second piece: the last token of seq 0 and seq 1, two block-table rows
	assert.Equal(t, []int32{5, 9}, ps[1].Tokens)
	assert.Equal(t, []int32{0, 1}, ps[1].Seq)
	assert.Equal(t, 2, ps[1].MaxBlocks)
	assert.Equal(t, []int32{7, 3, 5, 0}, ps[1].Blocks)
	assert.Equal(t, []int{0, 1}, ps[1].OutOwner)

	for _, bad := range []engine.SeqInput{
		{Tokens: nil, Blocks: []int32{0}},
		{Tokens: []int32{1}, Pos: -1, Blocks: []int32{0}},
		{Tokens: []int32{1, 2}, Pos: 3, Blocks: []int32{0}},
		{Tokens: []int32{1}, Blocks: []int32{8}},
		{Tokens: []int32{10}, Blocks: []int32{0}},
	} {
		_, err := Split(&engine.Batch{Seqs: []engine.SeqInput{bad}}, 10, 4, 8, 4)
		assert.ErrorIs(t, err, sdk.ErrInvalidArgument, "%+v", bad)
	}
	_, err = Split(&engine.Batch{}, 10, 4, 8, 4)
	assert.Error(t, err)
}
