package nn

import (
	"context"
	"encoding/binary"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/tp"
)

func TestSplitOf(t *testing.T) {
	for name, want := range map[string]TPSplit{
		"blk.3.attn_q.weight":              {Kind: SplitDim, Axis: 1},
		"blk.3.attn_k.bias":                {Kind: SplitDim, Axis: 0},
		"blk.10.attn_sinks.weight":         {Kind: SplitDim, Axis: 0},
		"blk.0.attn_output.weight":         {Kind: SplitDim, Axis: 0},
		"blk.0.attn_output.bias":           {Kind: LeadOnly},
		"blk.0.ffn_gate_exps.weight":       {Kind: SplitDim, Axis: 1},
		"blk.0.ffn_up_exps.bias":           {Kind: SplitDim, Axis: 0},
		"blk.0.ffn_down_exps.weight":       {Kind: SplitDim, Axis: 0},
		"blk.0.ffn_down_exps.bias":         {Kind: LeadOnly},
		"blk.0.ffn_gate_inp.weight":        {},
		"blk.0.attn_qkv.weight":            {Kind: SplitDim, Axis: 1, Parts: 3},
		"blk.0.attn_qkv.bias":              {Kind: SplitDim, Axis: 0, Parts: 3},
		"blk.0.ffn_down.bias":              {Kind: LeadOnly},
		"token_embd.weight":                {},
		"output.weight":                    {},
		"blk.0.post_attention_norm.weight": {},
		"attn_q.weight":                    {Kind: SplitDim, Axis: 1}, // a bare name splits the same way
	} {
		assert.Equal(t, want, SplitOf(name), name)
	}
}

// sliceBytes over F32 data whose value is its own index: every layout's
// rank part is exactly the expected elements.
func TestSliceBytes(t *testing.T) {
	idx := func(n int) []byte {
		vals := make([]float32, n)
		for i := range vals {
			vals[i] = float32(i)
		}
		return f32Bytes(vals)
	}
	floats := func(b []byte) []float32 {
		out := make([]float32, len(b)/4)
		require.NoError(t, ml.DequantizeRow(ml.F32, b, out))
		return out
	}
	// [4, 6, 2] (ne0 4, ne1 6, 2 experts)
	shape := []int{4, 6, 2}
	data := idx(48)
	// rows of ne1 per expert, rank 1 of 2: ne1 rows 3..5 of each expert
	got, err := sliceBytes(ml.F32, shape, data, TPSplit{Kind: SplitDim, Axis: 1}, ml.Shard{Rank: 1, Size: 2})
	require.NoError(t, err)
	assert.Equal(t, []float32{12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47}, floats(got))
	// columns of ne0, rank 0 of 2: elements 0..1 of every row
	got, err = sliceBytes(ml.F32, shape, data, TPSplit{Kind: SplitDim, Axis: 0}, ml.Shard{Rank: 0, Size: 2})
	require.NoError(t, err)
	want := []float32{}
	for r := range 12 {
		want = append(want, float32(4*r), float32(4*r+1))
	}
	assert.Equal(t, want, floats(got))
	// fused q|k|v rows ([2, 6]: 3 parts of 2 rows), rank 1 of 2: row 1 of each part
	got, err = sliceBytes(ml.F32, []int{2, 6}, idx(12), TPSplit{Kind: SplitDim, Axis: 1, Parts: 3}, ml.Shard{Rank: 1, Size: 2})
	require.NoError(t, err)
	assert.Equal(t, []float32{2, 3, 6, 7, 10, 11}, floats(got))
	// a contiguous range aliases the file's bytes
	two := idx(12)
	got, err = sliceBytes(ml.F32, []int{2, 6}, two, TPSplit{Kind: SplitDim, Axis: 1}, ml.Shard{Rank: 1, Size: 2})
	require.NoError(t, err)
	assert.Same(t, &two[24], &got[0])
	// quantized columns go by whole blocks: Q8_0 [64, 2] rank 1 of 2 = block 1 of each row
	q := make([]byte, 4*34)
	for i := range q {
		q[i] = byte(i)
	}
	got, err = sliceBytes(ml.Q8_0, []int{64, 2}, q, TPSplit{Kind: SplitDim, Axis: 0}, ml.Shard{Rank: 1, Size: 2})
	require.NoError(t, err)
	assert.Equal(t, append(append([]byte{}, q[34:68]...), q[102:136]...), got)
}

func TestSplitShapeErrors(t *testing.T) {
	s := ml.Shard{Rank: 0, Size: 2}
	_, err := splitShape("blk.0.ffn_down_exps.weight", ml.MXFP4, []int{96, 64, 4}, TPSplit{Kind: SplitDim, Axis: 0}, s)
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)
	assert.ErrorContains(t, err, "blk.0.ffn_down_exps.weight: dimension 0 (96) split 2 ways is 48 columns a rank, not a multiple of the MXFP4 block of 32")
	_, err = splitShape("blk.0.attn_q.weight", ml.Q8_0, []int{64, 30}, TPSplit{Kind: SplitDim, Axis: 1}, ml.Shard{Rank: 0, Size: 4})
	assert.ErrorContains(t, err, "blk.0.attn_q.weight: dimension 1 (30) does not split 4 ways (tensor-parallel size 4)")
	local, err := splitShape("blk.0.attn_qkv.weight", ml.F32, []int{8, 24}, TPSplit{Kind: SplitDim, Axis: 1, Parts: 3}, s)
	require.NoError(t, err)
	assert.Equal(t, []int{8, 12}, local)
	_, err = splitShape("x", ml.F32, []int{8, 18}, TPSplit{Kind: SplitDim, Axis: 1, Parts: 3}, ml.Shard{Rank: 0, Size: 4})
	assert.ErrorContains(t, err, "does not split 12 ways")
}

func TestPlanShard(t *testing.T) {
	s, err := PlanShard(nil)
	require.NoError(t, err)
	assert.False(t, s.Split())
	s, err = PlanShard(map[string]string{"tp.size": "4", "tp.rank": "3", "tp.addr": "127.0.0.1:1"})
	require.NoError(t, err)
	assert.Equal(t, ml.Shard{Rank: 3, Size: 4}, s)
	s, err = PlanShard(map[string]string{"tp.size": "2"})
	require.NoError(t, err)
	assert.Equal(t, ml.Shard{Rank: 0, Size: 2}, s)
	for _, bad := range []map[string]string{{"tp.size": "x"}, {"tp.size": "0"}, {"tp.size": "2", "tp.rank": "2"}, {"tp.size": "2", "tp.rank": "-1"}} {
		_, err := PlanShard(bad)
		assert.ErrorIs(t, err, sdk.ErrInvalidArgument, "%v", bad)
	}
}

func f32Bytes(vals []float32) []byte {
	out := make([]byte, 4*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(v))
	}
	return out
}

// agreeMin over a real 3-rank group: every rank gets the smallest count,
// exactly, for counts beyond float32's 2^24.
func TestAgreeMin(t *testing.T) {
	ln, err := tp.Listen(tp.Config{Rank: 0, Size: 3, Addr: "127.0.0.1:0"})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	counts := []int{math.MaxInt32, 1<<24 + 3, 1<<24 + 7}
	got, errs := make([]int, 3), make([]error, 3)
	var wg sync.WaitGroup
	for r := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var g *tp.Group
			var err error
			if r == 0 {
				g, err = ln.Accept(ctx)
			} else {
				g, err = tp.Join(ctx, tp.Config{Rank: r, Size: 3, Addr: ln.Addr()})
			}
			if err != nil {
				errs[r] = err
				return
			}
			defer g.Close()
			got[r], errs[r] = agreeMin(g, counts[r])
		}()
	}
	wg.Wait()
	for r := range 3 {
		require.NoError(t, errs[r])
		assert.Equal(t, 1<<24+3, got[r], "rank %d", r)
	}
}
