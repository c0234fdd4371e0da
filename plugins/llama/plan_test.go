package llama

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/ml/cuda"
	"github.com/llama-orch/orch/sdk/ml/nn"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// checkPlan is nntest.CheckPlan on this package's planner, loader and Load.
func checkPlan(t *testing.T, c nntest.Config, opts sdk.LoadOptions, extra func(nn.Footprint) int64, fp nn.Footprinter) {
	t.Helper()
	nntest.CheckPlan(t, c, opts, nntest.PlanAdapter{Plan: NewPlanner(nil), Loader: NewLoader(nil), Load: Load, Footprint: fp}, extra)
}

func TestPlanEqualsLoad(t *testing.T) {
	none := func(nn.Footprint) int64 { return 0 }
	for _, opts := range []sdk.LoadOptions{
		{Device: "cpu"},
		{Device: "cpu", ContextLength: 100, MaxSequences: 3},
		{Device: "cpu", Extra: map[string]string{"block_size": "32", "num_blocks": "5"}},
	} {
		checkPlan(t, nntest.Tiny("llama"), opts, none, footprint)
	}
	// without rope_freqs.weight, MHA, the output tied to the embedding
	c := nntest.Tiny("llama")
	c.RopeFreqs, c.KVHeads, c.Tied = false, 4, true
	checkPlan(t, c, sdk.LoadOptions{Device: "cpu", ContextLength: 64}, none, footprint)
}

func TestPlanOutOfMemory(t *testing.T) {
	if nn.MemAvailable() == 0 {
		t.Skip("MemAvailable unknown here: the planner cannot refuse")
	}
	c := nntest.Tiny("llama")
	c.Context = 1 << 28
	path := nntest.MustWrite(t, c)
	plan, err := NewPlanner(nil)(context.Background(), sdk.LoadRequest{Path: path,
		Options: sdk.LoadOptions{Device: "cpu", ContextLength: 1 << 28, MaxSequences: 64}})
	var oom *sdk.OutOfMemoryError
	require.True(t, errors.As(err, &oom), "want *sdk.OutOfMemoryError, got %v", err)
	assert.Equal(t, "cpu", oom.Device)
	assert.Equal(t, plan.Total(), oom.Requested)
	// free memory moves between two readings on a busy machine: same order, not same bytes
	assert.InDelta(t, float64(nn.MemAvailable()), float64(plan.FreeBytes), 256<<20)
	assert.Greater(t, oom.Requested, oom.Free)
	assert.Greater(t, plan.KVBytes, int64(1)<<40, "KV for 64 x 2^28 tokens")
	assert.Contains(t, err.Error(), "context 268435456 x 64 sequences")

	// "auto" without a usable GPU plans for the CPU, as the loader loads there
	if cuda.Available() == nil {
		return
	}
	_, err = NewPlanner(nil)(context.Background(), sdk.LoadRequest{Path: path,
		Options: sdk.LoadOptions{Device: "auto", ContextLength: 1 << 28, MaxSequences: 64}})
	require.True(t, errors.As(err, &oom), "want *sdk.OutOfMemoryError, got %v", err)
	assert.Equal(t, "cpu", oom.Device)
}

func TestPlanErrors(t *testing.T) {
	ctx := context.Background()
	for _, arch := range []string{"gpt2", "gpt-oss"} {
		_, err := NewPlanner(nil)(ctx, sdk.LoadRequest{Path: nntest.MustWrite(t, nntest.Tiny(arch)), Options: sdk.LoadOptions{Device: "cpu"}})
		assert.ErrorIs(t, err, sdk.ErrUnsupportedArchitecture, arch)
	}
	_, err := NewPlanner(nil)(ctx, sdk.LoadRequest{Path: t.TempDir() + "/missing.gguf"})
	assert.Error(t, err)
	_, err = NewPlanner(nil)(ctx, sdk.LoadRequest{Path: nntest.MustWrite(t, nntest.Tiny("llama")), Options: sdk.LoadOptions{Device: "tpu"}})
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
}

func TestAdapterPlans(t *testing.T) {
	pl, ok := New(nil).(sdk.Planner)
	require.True(t, ok, "the Llama adapter implements sdk.Planner")
	plan, err := pl.Plan(context.Background(), sdk.LoadRequest{Path: nntest.MustWrite(t, nntest.Tiny("llama")), Options: sdk.LoadOptions{Device: "cpu"}})
	require.NoError(t, err)
	assert.Positive(t, plan.WeightBytes)
	assert.Positive(t, plan.KVBytes)
	assert.Greater(t, plan.WorkspaceBytes, nn.CPUMargin)
}
