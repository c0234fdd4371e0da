package tp

import (
	"context"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/engine/enginetest"
	"github.com/llama-orch/orch/sdk/ml"
)

// TestEngineOverGroup serves requests with the engine over Lead, three
// ranks of enginetest's device-sampling fake (with a window KV group, like
// gpt-oss) over the TCP group: sampled requests take ForwardSample on every
// rank, in steps mixed with greedy and host-sampled (logprobs, penalty)
// rows, and give the reference tokens. Each follower's fake checks the KV
// it reads through the block tables it is sent, so a step replayed wrong
// fails there.
func TestEngineOverGroup(t *testing.T) {
	const size = 3
	cfg := enginetest.Config{Vocab: 200, DeviceSample: true, Window: 8, StepCost: 100 * time.Microsecond}
	var fakes []*enginetest.Model
	var done []chan error
	load := func(ctx context.Context, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (engine.Model, sdk.ModelInfo, error) {
		gs := newGroups(t, size, 10*time.Second)
		var lead engine.Model
		for r := range size {
			m := enginetest.New(cfg)
			fakes = append(fakes, m)
			em := enginetest.DeviceSampler{DeviceGreedy: enginetest.DeviceGreedy{Model: m}}
			if r == 0 {
				lead = Lead(em, gs[0])
				continue
			}
			d := make(chan error, 1)
			done = append(done, d)
			Follow(em, gs[r], func(err error) { d <- err })
		}
		spec := lead.Spec()
		return lead, sdk.ModelInfo{Architecture: "fake", Name: "fake", Backend: "cpu", ContextLength: spec.ContextLength,
			VocabSize: spec.VocabSize, KVBytes: spec.KVBytes()}, nil
	}
	a := engine.NewAdapter(load, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := a.Load(ctx, sdk.LoadRequest{Path: "fake"}, nil)
	require.NoError(t, err)

	rng := rand.New(rand.NewPCG(1, 2))
	prompt := func(n int) []int32 {
		p := make([]int32, n)
		for i := range p {
			p[i] = int32(rng.IntN(cfg.Vocab))
		}
		return p
	}
	ps := [][]int32{prompt(5), prompt(23), prompt(9), prompt(14), prompt(3)}
	sp := sdk.SamplingParams{Temperature: 1.2, TopK: 50, TopP: 0.95, MinP: 0.01, Seed: 42, HasSeed: true}
	reqs := []sdk.GenerateRequest{
		{Prompt: ps[0], MaxTokens: 30, Sampling: sp},
		{Prompt: ps[1], MaxTokens: 25}, // greedy
		{Prompt: ps[2], MaxTokens: 10, Logprobs: true, Sampling: sdk.SamplingParams{Temperature: 1, Seed: 1, HasSeed: true}}, // host rows
		{Prompt: ps[3], MaxTokens: 40, Sampling: sdk.SamplingParams{Temperature: 0.8, Seed: 9, HasSeed: true}},
		{Prompt: ps[4], MaxTokens: 20, Sampling: sdk.SamplingParams{Temperature: 1, RepetitionPenalty: 1.3}}, // host rows
	}
	toks := make([][]int32, len(reqs))
	errs := make([]error, len(reqs))
	var wg sync.WaitGroup
	for i, req := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = a.Generate(ctx, req, func(c sdk.Chunk) error {
				toks[i] = append(toks[i], c.Tokens...)
				return nil
			})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		require.NoError(t, err, "request %d", i)
		assert.Len(t, toks[i], reqs[i].MaxTokens, "request %d", i)
	}
	assert.Equal(t, enginetest.Sampled(ps[0], 30, cfg.Vocab, ml.SampleParams{Temperature: 1.2, TopK: 50, TopP: 0.95, MinP: 0.01, Seed: 42}), toks[0])
	assert.Equal(t, enginetest.Greedy(ps[1], 25, cfg.Vocab), toks[1])
	assert.Equal(t, enginetest.Sampled(ps[3], 40, cfg.Vocab, ml.SampleParams{Temperature: 0.8, Seed: 9}), toks[3])

	require.NoError(t, a.Unload(context.Background()))
	for r, d := range done {
		select {
		case err := <-d:
			assert.NoError(t, err, "rank %d", r+1)
		case <-time.After(5 * time.Second):
			t.Fatalf("rank %d did not stop", r+1)
		}
	}
	lead := fakes[0]
	assert.GreaterOrEqual(t, lead.SampledRows.Load(), int64(30+40), "the sampled requests' tokens were drawn by ForwardSample")
	assert.Positive(t, lead.SampleSteps.Load())
	for r, f := range fakes[1:] {
		assert.Equal(t, lead.SampleSteps.Load(), f.SampleSteps.Load(), "rank %d ForwardSample steps", r+1)
		assert.Equal(t, lead.SampledRows.Load(), f.SampledRows.Load(), "rank %d drew the same rows", r+1)
		assert.Equal(t, lead.GreedySteps.Load(), f.GreedySteps.Load(), "rank %d ForwardGreedy steps", r+1)
		assert.Equal(t, lead.Forwards.Load(), f.Forwards.Load(), "rank %d forwards", r+1)
		assert.Equal(t, lead.Tokens.Load(), f.Tokens.Load(), "rank %d tokens", r+1)
	}
}
