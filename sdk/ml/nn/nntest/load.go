package nntest

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/nn"
)

// Load writes c and builds it with load (a model package's Load) under
// opts, defaulting to a 2-thread CPU backend and a KV cache of 64 blocks of
// 4 tokens (window pools of KV groups as big, so that tests that call
// Forward with one table, SeqInput.Blocks, reach every layer with it); the
// model is closed when the test ends.
func Load(t *testing.T, c Config, opts nn.Options, load func(path string, opts nn.Options) (engine.Model, error)) engine.Model {
	t.Helper()
	path := MustWrite(t, c)
	if opts.Backend == nil {
		opts.Backend = cpu.New(2)
	}
	if opts.NumBlocks == 0 {
		opts.NumBlocks = 64
	}
	if opts.BlockSize == 0 {
		opts.BlockSize = 4
	}
	if opts.WindowBlocks == 0 {
		opts.WindowBlocks = opts.NumBlocks
	}
	m, err := load(path, opts)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	return m
}
