package nntest

import (
	"context"
	"math/rand/v2"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
)

// blockAlloc hands out KV blocks in a shuffled order.
type blockAlloc struct {
	free []int32
}

func newBlockAlloc(n int, rng *rand.Rand) *blockAlloc {
	a := &blockAlloc{}
	for _, v := range rng.Perm(n) {
		a.free = append(a.free, int32(v))
	}
	return a
}

func (a *blockAlloc) table(t testing.TB, positions, bs int) []int32 {
	n := (positions + bs - 1) / bs
	require.LessOrEqual(t, n, len(a.free), "test needs more KV blocks")
	out := a.free[:n:n]
	a.free = a.free[n:]
	return out
}

// Prompt returns n random token ids below vocab.
func Prompt(rng *rand.Rand, n, vocab int) []int32 {
	out := make([]int32, n)
	for i := range out {
		out[i] = int32(rng.IntN(vocab))
	}
	return out
}

// Prefill runs tokens as one chunk from position 0 with fresh blocks and
// returns all logits (len(tokens) x vocab).
func Prefill(t testing.TB, m engine.Model, tokens []int32, blocks []int32) []float32 {
	t.Helper()
	out, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: tokens, Blocks: blocks, AllLogits: true}}})
	require.NoError(t, err)
	require.Len(t, out.Logits, 1)
	require.Len(t, out.Logits[0], len(tokens)*m.Spec().VocabSize)
	return out.Logits[0]
}

// CheckConsistency asserts the invariants every model must keep on the CPU
// backend, bit for bit: (1) one prefill chunk == chunked prefill == token by
// token decoding; (2) a batch of several sequences (mixing a prefill and
// decodes) == each sequence alone. n is the prompt length.
func CheckConsistency(t *testing.T, m engine.Model, n int) {
	spec := m.Spec()
	rng := rand.New(rand.NewPCG(42, uint64(n)))
	V, bs := spec.VocabSize, spec.BlockSize
	alloc := newBlockAlloc(spec.NumBlocks, rng)
	prompt := Prompt(rng, n, V)
	whole := Prefill(t, m, prompt, alloc.table(t, n, bs))

	t.Run("chunked prefill", func(t *testing.T) {
		blocks := alloc.table(t, n, bs)
		var got []float32
		for pos := 0; pos < n; {
			c := min(3, n-pos)
			out, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt[pos : pos+c], Pos: pos, Blocks: blocks, AllLogits: true}}})
			require.NoError(t, err)
			got = append(got, out.Logits[0]...)
			pos += c
		}
		assert.Equal(t, whole, got)
	})
	t.Run("token by token", func(t *testing.T) {
		blocks := alloc.table(t, n, bs)
		var got []float32
		for pos := 0; pos < n; pos++ {
			out, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt[pos : pos+1], Pos: pos, Blocks: blocks[:pos/bs+1]}}})
			require.NoError(t, err)
			require.Len(t, out.Logits[0], V)
			got = append(got, out.Logits[0]...)
		}
		assert.Equal(t, whole, got)
	})
	t.Run("batch invariance", func(t *testing.T) {
		// three sequences alone: a prompt of n, one of n/2+1, one of 2
		lens := []int{n, n/2 + 1, 2}
		prompts := make([][]int32, len(lens))
		alone := make([][]float32, len(lens))
		for i, l := range lens {
			prompts[i] = Prompt(rng, l, V)
			alone[i] = Prefill(t, m, prompts[i], alloc.table(t, l, bs))
		}
		// together: seq 0 and 1 decode their last token after a prefill of the
		// rest; seq 2 prefills fully in the same step
		tables := make([][]int32, len(lens))
		for i, l := range lens {
			tables[i] = alloc.table(t, l, bs)
		}
		_, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{
			{Tokens: prompts[0][:n-1], Blocks: tables[0]},
			{Tokens: prompts[1][:lens[1]-1], Blocks: tables[1]},
		}})
		require.NoError(t, err)
		out, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{
			{Tokens: prompts[2], Blocks: tables[2], AllLogits: true},
			{Tokens: prompts[0][n-1:], Pos: n - 1, Blocks: tables[0]},
			{Tokens: prompts[1][lens[1]-1:], Pos: lens[1] - 1, Blocks: tables[1]},
		}})
		require.NoError(t, err)
		assert.Equal(t, alone[2], out.Logits[0])
		assert.Equal(t, alone[0][(n-1)*V:], out.Logits[1])
		assert.Equal(t, alone[1][(lens[1]-1)*V:], out.Logits[2])
	})
	t.Run("CopyBlock", func(t *testing.T) {
		// a sequence whose first block is a copy of another's continues identically
		blocks := alloc.table(t, n, bs)
		if n < bs+1 {
			t.Skip("prompt shorter than a block")
		}
		src := alloc.table(t, bs, bs)
		Prefill(t, m, prompt[:bs], src)
		require.NoError(t, m.CopyBlock(blocks[0], src[0]))
		out, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt[bs:], Pos: bs, Blocks: blocks, AllLogits: true}}})
		require.NoError(t, err)
		assert.Equal(t, whole[bs*V:], out.Logits[0])
	})
	t.Run("bad input", func(t *testing.T) {
		_, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{int32(V)}, Blocks: []int32{0}}}})
		assert.ErrorContains(t, err, "vocabulary")
		_, err = m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{1, 2}, Pos: bs, Blocks: []int32{0}}}})
		assert.ErrorContains(t, err, "blocks")
		_, err = m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{1}, Blocks: []int32{int32(spec.NumBlocks)}}}})
		assert.Error(t, err)
		_, err = m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{1}, Pos: spec.ContextLength,
			Blocks: make([]int32, spec.ContextLength/bs+1)}}})
		assert.ErrorIs(t, err, sdk.ErrContextTooLong)
		// the model still works after errors
		again := Prefill(t, m, prompt[:2], []int32{0})
		assert.Equal(t, whole[:2*V], again)
	})
}

// CheckGreedy asserts that a GreedyModel's device argmax equals the argmax
// of Forward's rows, for a batch mixing a prefill and a decode.
func CheckGreedy(t *testing.T, m engine.Model) {
	gm, ok := m.(engine.GreedyModel)
	require.True(t, ok, "model does not implement engine.GreedyModel")
	spec := m.Spec()
	rng := rand.New(rand.NewPCG(5, 6))
	alloc := newBlockAlloc(spec.NumBlocks, rng)
	p1, p2 := Prompt(rng, 9, spec.VocabSize), Prompt(rng, 5, spec.VocabSize)
	t1, t2 := alloc.table(t, 10, spec.BlockSize), alloc.table(t, 5, spec.BlockSize)
	batch := &engine.Batch{Seqs: []engine.SeqInput{{Tokens: p1, Blocks: t1}, {Tokens: p2, Blocks: t2}}}
	out, err := m.Forward(context.Background(), batch)
	require.NoError(t, err)
	t3, t4 := alloc.table(t, 10, spec.BlockSize), alloc.table(t, 5, spec.BlockSize)
	batch.Seqs[0].Blocks, batch.Seqs[1].Blocks = t3, t4
	toks, err := gm.ForwardGreedy(context.Background(), batch)
	require.NoError(t, err)
	require.Len(t, toks, 2)
	for i, row := range out.Logits {
		best := 0
		for j, v := range row {
			if v > row[best] {
				best = j
			}
		}
		assert.Equal(t, int32(best), toks[i], "sequence %d", i)
	}
}

// CompareModels checks a model (e.g. on the GPU) against a reference model
// of the same file (the CPU backend) within a relative tolerance: a prefill
// of n tokens (all rows), the same prompt decoded token by token (the
// captured-graph path on GPU backends), and a batch mixing a prefill chunk
// with decodes.
func CompareModels(t *testing.T, ref, m engine.Model, n int, tol float64) {
	spec := m.Spec()
	V, bs := spec.VocabSize, spec.BlockSize
	rng := rand.New(rand.NewPCG(77, uint64(n)))
	prompt := Prompt(rng, n, V)
	tbl := func(a *blockAlloc, l int) []int32 { return a.table(t, l, bs) }
	ra, ma := newBlockAlloc(ref.Spec().NumBlocks, rng), newBlockAlloc(spec.NumBlocks, rng)
	want := Prefill(t, ref, prompt, tbl(ra, n))
	got := Prefill(t, m, prompt, tbl(ma, n))
	e := RelErr(got, want)
	t.Logf("prefill %d tokens: relative error %.3g", n, e)
	assert.LessOrEqual(t, e, tol, "prefill")

	blocks := tbl(ma, n)
	var dec []float32
	for pos := 0; pos < n; pos++ {
		out, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt[pos : pos+1], Pos: pos, Blocks: blocks}}})
		require.NoError(t, err)
		dec = append(dec, out.Logits[0]...)
	}
	e = RelErr(dec, want)
	t.Logf("decode %d steps: relative error %.3g", n, e)
	assert.LessOrEqual(t, e, tol, "token-by-token decode")

	// a batch: sequence A decodes its last token while B prefills
	b1 := tbl(ma, n)
	_, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt[:n-1], Blocks: b1}}})
	require.NoError(t, err)
	other := Prompt(rng, n/2+1, V)
	wantOther := Prefill(t, ref, other, tbl(ra, len(other)))
	out, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{
		{Tokens: other, Blocks: tbl(ma, len(other)), AllLogits: true},
		{Tokens: prompt[n-1:], Pos: n - 1, Blocks: b1},
	}})
	require.NoError(t, err)
	assert.LessOrEqual(t, RelErr(out.Logits[0], wantOther), tol, "batched prefill")
	assert.LessOrEqual(t, RelErr(out.Logits[1], want[(n-1)*V:]), tol, "batched decode")
}

// FindDir returns the first of the candidate directories that exists ("" if none).
func FindDir(candidates ...string) string {
	for _, c := range candidates {
		if st, err := os.Stat(c); err == nil && st.IsDir() {
			return c
		}
	}
	return ""
}
