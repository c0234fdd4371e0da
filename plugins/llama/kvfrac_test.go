package llama

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

// With a KVCacheFraction the Llama adapter's plan and load agree on the
// fraction-sized pool (free memory injected through nn.FreeMemory).
func TestKVCacheFractionPlanEqualsLoad(t *testing.T) {
	ctx := context.Background()
	path := nntest.MustWrite(t, nntest.Tiny("llama"))
	req := sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: "cpu", ContextLength: 64, MaxSequences: 1}}
	plain, err := NewPlanner(nil)(ctx, req)
	require.NoError(t, err)
	blockBytes := plain.KVBytes / 4 // one sequence of 64 tokens
	free := plain.WeightBytes + plain.WorkspaceBytes + 1000*blockBytes
	old := nn.FreeMemory
	t.Cleanup(func() { nn.FreeMemory = old })
	nn.FreeMemory = func(ml.Backend) int64 { return free }

	req.Options.KVCacheFraction = 0.25
	plan, err := NewPlanner(nil)(ctx, req)
	require.NoError(t, err)
	assert.Equal(t, 250*blockBytes, plan.KVBytes)
	m, info, err := NewLoader(nil)(ctx, req, nil)
	require.NoError(t, err)
	assert.Equal(t, 250, m.Spec().NumBlocks)
	require.NoError(t, m.Close())
	assert.Equal(t, plan.KVBytes, info.KVBytes, "KV: plan == load")
	assert.Equal(t, plan.WeightBytes, info.WeightBytes)

	req.Options.KVCacheFraction = 1.5
	_, _, err = NewLoader(nil)(ctx, req, nil)
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
}
