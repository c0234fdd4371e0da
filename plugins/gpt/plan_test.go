package gpt

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
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
	for _, tc := range []struct {
		arch  string
		opts  sdk.LoadOptions
		fp    nn.Footprinter
		extra func(nn.Footprint) int64
	}{
		{"gpt2", sdk.LoadOptions{Device: "cpu"}, footprintGPT2, none},
		{"gpt2", sdk.LoadOptions{Device: "cpu", ContextLength: 100, MaxSequences: 3}, footprintGPT2, none},
		// the CUDA MoE's per-token buffers are planned; the CPU MoE does not allocate them
		{"gpt-oss", sdk.LoadOptions{Device: "cpu", ContextLength: 128, MaxSequences: 2}, footprintGPTOSS,
			func(f nn.Footprint) int64 { return 4 + 2*(2+2*64+int64(f.Width)) }},
		{"gpt-oss", sdk.LoadOptions{Device: "cpu", Extra: map[string]string{"block_size": "32", "num_blocks": "5"}}, footprintGPTOSS,
			func(f nn.Footprint) int64 { return 4 + 2*(2+2*64+int64(f.Width)) }},
	} {
		t.Run(tc.arch, func(t *testing.T) {
			checkPlan(t, nntest.Tiny(tc.arch), tc.opts, tc.extra, tc.fp)
		})
	}
	c := nntest.Tiny("gpt2")
	c.Tied = true
	checkPlan(t, c, sdk.LoadOptions{Device: "cpu", MaxSequences: 1}, none, footprintGPT2)
}

func TestPlanOutOfMemory(t *testing.T) {
	if nn.MemAvailable() == 0 {
		t.Skip("MemAvailable unknown here: the planner cannot refuse")
	}
	c := nntest.Tiny("gpt-oss")
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
}

func TestPlanErrors(t *testing.T) {
	ctx := context.Background()
	_, err := NewPlanner(nil)(ctx, sdk.LoadRequest{Path: nntest.MustWrite(t, nntest.Tiny("llama")), Options: sdk.LoadOptions{Device: "cpu"}})
	assert.ErrorIs(t, err, sdk.ErrUnsupportedArchitecture)
	_, err = NewPlanner(nil)(ctx, sdk.LoadRequest{Path: t.TempDir() + "/missing.gguf"})
	assert.Error(t, err)
	_, err = NewPlanner(nil)(ctx, sdk.LoadRequest{Path: nntest.MustWrite(t, nntest.Tiny("gpt2")), Options: sdk.LoadOptions{Device: "tpu"}})
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
	_, err = NewPlanner(nil)(ctx, sdk.LoadRequest{Path: nntest.MustWrite(t, nntest.Tiny("gpt2")),
		Options: sdk.LoadOptions{Device: "cpu", Extra: map[string]string{"kv_type": "q4"}}})
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
}

func TestAdapterPlans(t *testing.T) {
	pl, ok := New(nil).(sdk.Planner)
	require.True(t, ok, "the GPT adapter implements sdk.Planner")
	plan, err := pl.Plan(context.Background(), sdk.LoadRequest{Path: nntest.MustWrite(t, nntest.Tiny("gpt2")), Options: sdk.LoadOptions{Device: "cpu"}})
	require.NoError(t, err)
	assert.Positive(t, plan.WeightBytes)
	assert.Positive(t, plan.KVBytes)
	assert.Greater(t, plan.WorkspaceBytes, nn.CPUMargin)
}
