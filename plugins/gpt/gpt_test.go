package gpt

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
		{"gpt-oss", nntest.Tiny("gpt-oss")},
		{"gpt2", nntest.Tiny("gpt2")},
		{"gpt2-q8-tied", func() nntest.Config { c := nntest.Tiny("gpt2"); c.MatType, c.Tied = ml.Q8_0, true; return c }()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// MaxTokens 8 forces long chunks to be split inside the model too
			m := load(t, tc.c, Options{MaxTokens: 8})
			nntest.CheckConsistency(t, m, 21)
			nntest.CheckGreedy(t, m) // longer than the sliding window (8)
		})
	}
}

func TestLogitsSane(t *testing.T) {
	for _, arch := range []string{"gpt-oss", "gpt2"} {
		t.Run(arch, func(t *testing.T) {
			m := load(t, nntest.Tiny(arch), Options{})
			V := m.Spec().VocabSize
			lg := nntest.Prefill(t, m, []int32{1, 2, 3, 4, 5}, []int32{0, 1})
			require.Len(t, lg, 5*V)
			var lo, hi float32
			for _, v := range lg {
				require.False(t, v != v, "NaN logit")
				lo, hi = min(lo, v), max(hi, v)
			}
			assert.Greater(t, hi-lo, float32(0.5), "logits have a useful spread")
			// rows differ by position
			assert.NotEqual(t, lg[:V], lg[V:2*V])
		})
	}
}

// The sliding window is active: with the window, logits at positions >=
// window differ from the same weights without one; below it they are equal.
func TestSlidingWindow(t *testing.T) {
	c := nntest.Tiny("gpt-oss")
	withW := load(t, c, Options{})
	c.Window = 0
	without := load(t, c, Options{})
	assert.Equal(t, 8, withW.Spec().SlidingWindow)
	prompt := []int32{5, 9, 1, 44, 7, 100, 3, 250, 2, 17, 8, 90, 33, 4}
	a := nntest.Prefill(t, withW, prompt, []int32{0, 1, 2, 3})
	b := nntest.Prefill(t, without, prompt, []int32{0, 1, 2, 3})
	V := withW.Spec().VocabSize
	assert.Equal(t, a[:8*V], b[:8*V])
	assert.NotEqual(t, a[8*V:9*V], b[8*V:9*V])
}

func TestLoadErrors(t *testing.T) {
	be := cpu.New(1)
	for _, tc := range []struct {
		name string
		c    nntest.Config
		want string
	}{
		{"missing sinks", func() nntest.Config { c := nntest.Tiny("gpt-oss"); c.Skip = "blk.1.attn_sinks.weight"; return c }(), "blk.1.attn_sinks.weight"},
		{"missing qkv", func() nntest.Config { c := nntest.Tiny("gpt2"); c.Skip = "blk.0.attn_qkv.bias"; return c }(), "blk.0.attn_qkv.bias"},
		{"bad yarn", func() nntest.Config {
			c := nntest.Tiny("gpt-oss")
			c.Extra = map[string]any{"gpt-oss.rope.scaling.type": "longrope"}
			return c
		}(), "rope.scaling.type"},
		{"no experts key", func() nntest.Config {
			c := nntest.Tiny("gpt-oss")
			c.Extra = map[string]any{"gpt-oss.expert_used_count": uint32(9)}
			return c
		}(), "expert_used_count"},
		{"heads", func() nntest.Config {
			c := nntest.Tiny("gpt2")
			c.Extra = map[string]any{"gpt2.attention.head_count": uint32(5)}
			return c
		}(), "head_count"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := nntest.MustWrite(t, tc.c)
			_, err := Load(path, Options{Backend: be})
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
	t.Run("other architecture", func(t *testing.T) {
		path := nntest.MustWrite(t, nntest.Tiny("llama"))
		_, err := Load(path, Options{Backend: be})
		assert.True(t, errors.Is(err, sdk.ErrUnsupportedArchitecture), "%v", err)
		_, _, err = NewLoader(nil)(context.Background(), sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: "cpu"}}, nil)
		assert.True(t, errors.Is(err, sdk.ErrUnsupportedArchitecture), "%v", err)
		assert.ErrorContains(t, err, "llama")
	})
}

func TestLoader(t *testing.T) {
	path := nntest.MustWrite(t, nntest.Tiny("gpt-oss"))
	var stages []string
	m, info, err := NewLoader(nil)(context.Background(), sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: "auto", MaxSequences: 2}},
		func(p sdk.LoadProgress) { stages = append(stages, p.Stage) })
	require.NoError(t, err)
	defer m.Close()
	assert.Equal(t, "gpt-oss", info.Architecture)
	assert.Equal(t, 256, info.ContextLength) // min(trained 256, 4096)
	assert.Equal(t, 300, info.VocabSize)
	assert.Equal(t, 2, info.MaxSequences)
	assert.Equal(t, 256/16*2, m.Spec().NumBlocks)
	assert.Positive(t, info.ParamCount)
	assert.Positive(t, info.KVBytes)
	assert.Contains(t, stages, "weights")
	if info.Backend == "cpu" {
		assert.Contains(t, info.DeviceName, "cpu")
	}
}

func TestGoldens(t *testing.T) {
	nntest.RunGoldens(t, "../testdata/golden", Architectures(), func(t *testing.T, path string, n int) engine.Model {
		m, err := Load(path, Options{Backend: cpu.New(0), NumBlocks: n/16 + 2, BlockSize: 16, ContextLength: n})
		require.NoError(t, err)
		t.Cleanup(func() { m.Close() })
		return m
	})
}

// Decode steps go through ml.GraphBackend.Run (captured once, replayed after)
// and give the same bits as the uncaptured path.
func TestGraphReplay(t *testing.T) {
	for _, arch := range []string{"gpt-oss", "gpt2"} {
		t.Run(arch, func(t *testing.T) {
			rb := nntest.NewReplay(cpu.New(2))
			m := load(t, nntest.Tiny(arch), Options{Backend: rb, MaxTokens: 8})
			nntest.CheckConsistency(t, m, 21)
			nntest.CheckGreedy(t, m)
			assert.Positive(t, rb.Captures)
			assert.Greater(t, rb.Replays, 10)
			assert.Empty(t, rb.Violations)
		})
	}
}

// CompareModels (the GPU oracle) passes for two CPU models of one file, one
// of them on the replaying backend.
func TestCompareModelsCPU(t *testing.T) {
	c := nntest.Tiny("gpt-oss")
	ref := load(t, c, Options{MaxTokens: 16})
	m := load(t, c, Options{Backend: nntest.NewReplay(cpu.New(2)), MaxTokens: 16})
	nntest.CompareModels(t, ref, m, 21, 1e-6)
}

func TestTinyGPUConfigs(t *testing.T) {
	for _, arch := range []string{"gpt-oss", "gpt2"} {
		c := nntest.TinyGPU(arch)
		p := nntest.MustWrite(t, c)
		assert.Equal(t, 64, nntest.HeadDim(p), arch)
		m, err := Load(p, Options{Backend: cpu.New(1), NumBlocks: 8, BlockSize: 4})
		require.NoError(t, err)
		nntest.Prefill(t, m, []int32{1, 2, 3}, []int32{0})
		require.NoError(t, m.Close())
	}
}

// Two models on one replaying backend (as the GPU tests share one CUDA
// backend) never replay each other's captured decode steps: each matches a
// model of its own on a plain CPU backend.
func TestGraphReplaySharedBackend(t *testing.T) {
	rb := nntest.NewReplay(cpu.New(2))
	for _, arch := range []string{"gpt-oss", "gpt2"} {
		t.Run(arch, func(t *testing.T) {
			c := nntest.Tiny(arch)
			ref := load(t, c, Options{MaxTokens: 16})
			m := load(t, c, Options{Backend: rb, MaxTokens: 16})
			nntest.CompareModels(t, ref, m, 21, 1e-6)
		})
	}
	assert.Positive(t, rb.Replays)
}
