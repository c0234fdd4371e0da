package gpt

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/nn"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// Decode steps launched ahead (sdk/ml/nn/ahead.go) give the tokens of the
// plain path: greedy and seeded sampled streams on the window model (its
// window pool frees blocks as the streams go; block size 4, so every fourth
// step is not launched ahead), alone — nearly every step a hit — and four at
// once, where streams joining, finishing and preempted (a pool of 24 blocks)
// make misses. The sampled rows are drawn "on the device" in both runs (the
// replaying backend's SampleRows).
func TestStepAhead(t *testing.T) {
	path := windowModel(t)
	reqs := windowPrompts(4, 10, 9)
	for i := range reqs {
		reqs[i].MaxTokens = 24 + 5*i
		if i%2 == 1 {
			reqs[i].Sampling = sdk.SamplingParams{Temperature: 0.9, TopK: 40, Seed: uint64(7 + i), HasSeed: true}
		}
	}
	ref := nntest.NewReplay(cpu.New(2))
	ref.Sample = true // the same draws as below, without steps launched ahead
	plain, _ := serve(t, path, nn.Options{Backend: ref, NumBlocks: 256, ContextLength: 128, MaxTokens: 8})
	want := make([][]int32, len(reqs))
	for i, rq := range reqs {
		var err error
		want[i], _, err = generate(context.Background(), plain, rq)
		require.NoError(t, err)
		require.Len(t, want[i], rq.MaxTokens)
	}
	for _, tc := range []struct {
		name      string
		blocks    int
		alone     bool
		minHitPct int64
		upload    bool // the backend declines AdvanceStep: the runner uploads the inputs
	}{
		{"alone", 256, true, 90, false},
		{"alone, uploaded", 256, true, 90, true},
		{"together", 256, false, 50, false},
		{"together, preempted", 24, false, 50, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rb := nntest.NewReplay(cpu.New(2))
			rb.Ahead, rb.Sample, rb.NoAdvance = true, true, tc.upload
			a, rec := serve(t, path, nn.Options{Backend: rb, NumBlocks: tc.blocks, ContextLength: 128, MaxTokens: 8, MaxSequences: 4},
				engine.WithMaxSequences(4), engine.WithMaxBatchTokens(16))
			var got [][]int32
			if tc.alone {
				for _, rq := range reqs {
					toks, _, err := generate(context.Background(), a, rq)
					require.NoError(t, err)
					got = append(got, toks)
				}
			} else {
				got = generateAll(t, a, reqs)
			}
			for i := range reqs {
				assert.Equal(t, want[i], got[i], "stream %d", i)
			}
			launched, hits := rec.AheadStats()
			t.Logf("steps %d, launched ahead %d, hits %d", rec.steps.Load(), launched, hits)
			assert.Positive(t, hits)
			assert.GreaterOrEqual(t, 100*hits, tc.minHitPct*launched)
			if !tc.alone {
				assert.Greater(t, launched, hits, "misses")
			}
			assert.Empty(t, rb.Violations)
			st, err := a.Stats(context.Background())
			require.NoError(t, err)
			assert.Zero(t, st.KVUsedBlocks)
		})
	}
}

// Two sequences decoded in turn, one per call: every step launched ahead is
// a miss (the next call is the other sequence), yet the tokens are the plain
// runner's, and after aheadMaxMisses misses in a row of outcomes the runner
// stops launching ahead for a while (bounded waste).
func TestStepAheadMisses(t *testing.T) {
	c := nntest.Tiny("gpt-oss")
	rb := nntest.NewReplay(cpu.New(2))
	rb.Ahead = true
	m := load(t, c, Options{Backend: rb, MaxTokens: 8, NumBlocks: 64, BlockSize: 16, ContextLength: 256})
	ref := load(t, c, Options{Backend: nntest.NewReplay(cpu.New(2)), MaxTokens: 8, NumBlocks: 64, BlockSize: 16, ContextLength: 256})
	ctx := context.Background()
	decode := func(mod engine.Model) [][]int32 {
		gm := mod.(engine.GreedyModel)
		tables := [][]int32{{0, 1, 2, 3}, {4, 5, 6, 7}}
		toks := [][]int32{{5}, {9}}
		for step := 0; step < 100; step++ {
			s := step % 2
			pos := step / 2
			out, err := gm.ForwardGreedy(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: toks[s][pos:], Pos: pos, Blocks: tables[s]}}})
			require.NoError(t, err)
			toks[s] = append(toks[s], out[0])
		}
		return toks
	}
	want, got := decode(ref), decode(m)
	assert.Equal(t, want, got)
	launched, hits := m.(*nn.Runner).AheadStats()
	t.Logf("launched ahead %d, hits %d", launched, hits)
	assert.Zero(t, hits)
	assert.Positive(t, launched)
	assert.Less(t, launched, int64(40), "the throttle: 100 candidates")
}

// One sequence decoded past position 128: the captured decode steps are
// recorded per bucket of positions (128, then 256; nn.posBucket) and the
// tokens are the plain CPU runner's. (A bucket starts on a block boundary
// for block sizes dividing 128, where no step is launched ahead.)
func TestStepAheadPositionBuckets(t *testing.T) {
	c := nntest.Tiny("gpt-oss")
	rb := nntest.NewReplay(cpu.New(2))
	rb.Ahead = true
	opts := Options{MaxTokens: 8, NumBlocks: 32, BlockSize: 16, ContextLength: 256}
	ref := load(t, c, opts)
	opts.Backend = rb
	m := load(t, c, opts)
	ctx := context.Background()
	decode := func(mod engine.Model) []int32 {
		gm := mod.(engine.GreedyModel)
		blocks := make([]int32, 16)
		for i := range blocks {
			blocks[i] = int32(i)
		}
		toks := []int32{7}
		for pos := 0; pos < 150; pos++ {
			out, err := gm.ForwardGreedy(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: toks[pos:], Pos: pos, Blocks: blocks}}})
			require.NoError(t, err)
			toks = append(toks, out[0])
		}
		return toks
	}
	assert.Equal(t, decode(ref), decode(m))
	launched, hits := m.(*nn.Runner).AheadStats()
	t.Logf("captures %d, replays %d, launched ahead %d, hits %d", rb.Captures, rb.Replays, launched, hits)
	assert.Equal(t, 2, rb.Captures, "one graph per bucket")
	assert.Greater(t, hits, int64(120))
	assert.Empty(t, rb.Violations)
}
