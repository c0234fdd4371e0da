package llama

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/cuda"
	"github.com/llama-orch/orch/sdk/ml/nn"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// counting wraps the CPU backend and counts the bytes a load allocates.
type counting struct {
	ml.Backend
	alloc, weights int64
}

func (c *counting) Alloc(dt ml.DType, shape ...int) (ml.Tensor, error) {
	t, err := c.Backend.Alloc(dt, shape...)
	if err == nil {
		el := int64(4)
		if dt == ml.F16 || dt == ml.BF16 {
			el = 2
		}
		c.alloc += el * int64(t.Len())
	}
	return t, err
}

func (c *counting) Weight(name string, dt ml.DType, shape []int, data []byte) (ml.Tensor, error) {
	t, err := c.Backend.Weight(name, dt, shape, data)
	if err == nil {
		c.weights += int64(len(data))
	}
	return t, err
}

// checkPlan asserts that the plan for c under opts equals what the adapter's
// loader reports, and that the workspace covers what the build allocated
// besides weights and KV (exactly, but for the margin and extra, the part of
// the workspace only the CUDA backend allocates).
func checkPlan(t *testing.T, c nntest.Config, opts sdk.LoadOptions, extra func(nn.Footprint) int64, fp nn.Footprinter) {
	t.Helper()
	path := nntest.MustWrite(t, c)
	req := sdk.LoadRequest{Path: path, Options: opts}
	plan, err := NewPlanner(nil)(context.Background(), req)
	require.NoError(t, err)
	assert.Equal(t, "cpu", plan.Device)
	// free memory moves between two readings on a busy machine: same order, not same bytes
	assert.InDelta(t, float64(nn.MemAvailable()), float64(plan.FreeBytes), 256<<20)

	m, info, err := NewLoader(nil)(context.Background(), req, nil)
	require.NoError(t, err)
	require.NoError(t, m.Close())
	assert.Equal(t, info.WeightBytes, plan.WeightBytes, "weights: plan == load")
	assert.Equal(t, info.KVBytes, plan.KVBytes, "KV: plan == load")

	// the same build on a counting backend: every byte it allocates is planned
	sz, err := nn.Size(opts, c.Context, "cpu")
	require.NoError(t, err)
	cb := &counting{Backend: cpu.New(1)}
	m2, err := Load(path, Options{Backend: cb, NumBlocks: sz.NumBlocks, BlockSize: sz.BlockSize, ContextLength: sz.Context, KVType: sz.KVType})
	require.NoError(t, err)
	require.NoError(t, m2.Close())
	f, err := openFootprint(path, fp)
	require.NoError(t, err)
	assert.Equal(t, plan.Total()-nn.CPUMargin-4*extra(f)*256, cb.alloc+cb.weights, "every allocated byte is planned")
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

func openFootprint(path string, fp nn.Footprinter) (nn.Footprint, error) {
	f, err := gguf.Open(path)
	if err != nil {
		return nn.Footprint{}, err
	}
	defer f.Close()
	return fp(f)
}
