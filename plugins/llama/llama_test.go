package llama

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

func load(t *testing.T, c nntest.Config, opts Options) engine.Model {
	t.Helper()
	return nntest.Load(t, c, opts, Load)
}

func TestConsistency(t *testing.T) {
	for _, tc := range []struct {
		name string
		c    nntest.Config
	}{
		{"gqa-q8-ropefreqs", nntest.Tiny("llama")},
		{"mha-f32-tied-partial-rope", func() nntest.Config {
			c := nntest.Tiny("llama")
			c.KVHeads, c.MatType, c.Tied, c.RopeFreqs, c.RopeDims = 8, ml.F32, true, false, 4
			return c
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := load(t, tc.c, Options{MaxTokens: 8})
			nntest.CheckConsistency(t, m, 21)
			nntest.CheckGreedy(t, m)
		})
	}
}

// rope_freqs.weight is used: the same weights without it give other logits
// (beyond position 0, where RoPE is the identity).
func TestRopeFreqsUsed(t *testing.T) {
	c := nntest.Tiny("llama")
	a := load(t, c, Options{})
	c.RopeFreqs = false
	b := load(t, c, Options{})
	prompt := []int32{3, 1, 4, 1, 5}
	la := nntest.Prefill(t, a, prompt, []int32{0, 1})
	lb := nntest.Prefill(t, b, prompt, []int32{0, 1})
	V := a.Spec().VocabSize
	assert.Equal(t, la[:V], lb[:V])
	assert.NotEqual(t, la[4*V:], lb[4*V:])
}

func TestLoadErrors(t *testing.T) {
	be := cpu.New(1)
	for _, tc := range []struct {
		name string
		c    nntest.Config
		want string
	}{
		{"missing ffn", func() nntest.Config { c := nntest.Tiny("llama"); c.Skip = "blk.1.ffn_down.weight"; return c }(), "blk.1.ffn_down.weight"},
		{"kv heads", func() nntest.Config {
			c := nntest.Tiny("llama")
			c.Extra = map[string]any{"llama.attention.head_count_kv": uint32(3)}
			return c
		}(), "head_count_kv"},
		{"scaling", func() nntest.Config {
			c := nntest.Tiny("llama")
			c.Extra = map[string]any{"llama.rope.scaling.type": "yarn"}
			return c
		}(), "rope.scaling.type"},
		{"no block count", func() nntest.Config {
			c := nntest.Tiny("llama")
			c.Extra = map[string]any{"llama.block_count": "two"}
			return c
		}(), "llama.block_count"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(nntest.MustWrite(t, tc.c), Options{Backend: be})
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
	path := nntest.MustWrite(t, nntest.Tiny("gpt2"))
	_, _, err := NewLoader(nil)(context.Background(), sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: "cpu"}}, nil)
	assert.True(t, errors.Is(err, sdk.ErrUnsupportedArchitecture), "%v", err)
}

func TestGoldens(t *testing.T) {
	nntest.RunGoldens(t, "../testdata/golden", Architectures(), func(t *testing.T, path string, n int) engine.Model {
		m, err := Load(path, Options{Backend: cpu.New(0), NumBlocks: n/16 + 2, BlockSize: 16, ContextLength: n})
		require.NoError(t, err)
		t.Cleanup(func() { m.Close() })
		return m
	})
}

func TestGraphReplay(t *testing.T) {
	rb := nntest.NewReplay(cpu.New(2))
	m := load(t, nntest.Tiny("llama"), Options{Backend: rb, MaxTokens: 8})
	nntest.CheckConsistency(t, m, 21)
	assert.Greater(t, rb.Replays, 10)
	assert.Empty(t, rb.Violations)
}
