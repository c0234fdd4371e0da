package gpt

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/nn"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// withFree makes nn.FreeMemory report free bytes for the test.
func withFree(t *testing.T, free int64) {
	old := nn.FreeMemory
	t.Cleanup(func() { nn.FreeMemory = old })
	nn.FreeMemory = func(ml.Backend) int64 { return free }
}

// TestKVCacheFractionPlanEqualsLoad: with a KVCacheFraction the pool is
// floor(fraction x (free - weights - workspace) / block bytes) blocks, in the
// plan and in the load alike, not capped at context x sequences.
func TestKVCacheFractionPlanEqualsLoad(t *testing.T) {
	ctx := context.Background()
	for _, arch := range []string{"gpt2", "gpt-oss"} {
		t.Run(arch, func(t *testing.T) {
			path := nntest.MustWrite(t, nntest.Tiny(arch))
			base := sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: "cpu", MaxSequences: 2}}
			plain, err := NewPlanner(nil)(ctx, base)
			require.NoError(t, err)
			// gpt-oss's window layers have a pool of their own (window
			// bytes, sized by sequences): the fraction sizes the full pool
			// from what is left of its share after the window pool
			m0, _, err := NewLoader(nil)(ctx, base, nil)
			require.NoError(t, err)
			spec := m0.Spec()
			require.NoError(t, m0.Close())
			blockBytes := spec.KVBlockBytes
			window := spec.KVBytes() - int64(spec.NumBlocks)*blockBytes
			assert.Equal(t, plain.KVBytes, blockBytes*int64(2*256/16)+window) // 2 sequences of the trained 256 tokens
			if arch == "gpt-oss" {
				assert.Positive(t, window)
			}
			fixed := plain.WeightBytes + plain.WorkspaceBytes + 2*window

			withFree(t, fixed+300*blockBytes+blockBytes/2)
			req := base
			req.Options.KVCacheFraction = 0.5
			plan, err := NewPlanner(nil)(ctx, req)
			require.NoError(t, err)
			assert.Equal(t, 150*blockBytes+window, plan.KVBytes, "0.5 x 300.5 blocks, floored")
			assert.Equal(t, plain.WeightBytes, plan.WeightBytes)
			assert.Equal(t, plain.WorkspaceBytes, plan.WorkspaceBytes)
			assert.Equal(t, fixed+300*blockBytes+blockBytes/2, plan.FreeBytes)
			m, info, err := NewLoader(nil)(ctx, req, nil)
			require.NoError(t, err)
			assert.Equal(t, 150, m.Spec().NumBlocks)
			require.NoError(t, m.Close())
			assert.Equal(t, plan.KVBytes, info.KVBytes, "KV: plan == load")
			assert.Equal(t, plan.WeightBytes, info.WeightBytes)
			assert.Equal(t, 2, info.MaxSequences)

			// less than one full context (16 blocks): both refuse with numbers
			withFree(t, fixed+31*blockBytes)
			_, err = NewPlanner(nil)(ctx, req)
			var oom *sdk.OutOfMemoryError
			require.ErrorAs(t, err, &oom)
			assert.Equal(t, "cpu", oom.Device)
			assert.Equal(t, fixed+32*blockBytes, oom.Requested)
			_, _, err = NewLoader(nil)(ctx, req, nil)
			require.ErrorAs(t, err, &oom)
			assert.Contains(t, err.Error(), "holds 15 KV blocks")

			// free memory unknown: today's sizing (context x sequences)
			withFree(t, 0)
			plan, err = NewPlanner(nil)(ctx, req)
			require.NoError(t, err)
			assert.Equal(t, plain.KVBytes, plan.KVBytes)
			m, info, err = NewLoader(nil)(ctx, req, nil)
			require.NoError(t, err)
			require.NoError(t, m.Close())
			assert.Equal(t, plain.KVBytes, info.KVBytes)
		})
	}
}

func TestKVCacheFractionInvalid(t *testing.T) {
	ctx := context.Background()
	path := nntest.MustWrite(t, nntest.Tiny("gpt2"))
	for _, fr := range []float64{-0.1, 1.5} {
		req := sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: "cpu", KVCacheFraction: fr}}
		_, err := NewPlanner(nil)(ctx, req)
		assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
		_, _, err = NewLoader(nil)(ctx, req, nil)
		assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
		assert.ErrorContains(t, err, "kv_cache_fraction")
	}
}
