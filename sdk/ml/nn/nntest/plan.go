package nntest

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/nn"
)

// Counting wraps a backend and counts the bytes a load allocates: Alloc
// (4 bytes an element, 2 for F16/BF16) and Weight (the bytes handed over).
type Counting struct {
	ml.Backend
	Allocated, Weights int64
}

// Alloc allocates on the wrapped backend and counts the tensor's bytes.
func (c *Counting) Alloc(dt ml.DType, shape ...int) (ml.Tensor, error) {
	t, err := c.Backend.Alloc(dt, shape...)
	if err == nil {
		el := int64(4)
		if dt == ml.F16 || dt == ml.BF16 {
			el = 2
		}
		c.Allocated += el * int64(t.Len())
	}
	return t, err
}

// Weight uploads on the wrapped backend and counts the data's bytes.
func (c *Counting) Weight(name string, dt ml.DType, shape []int, data []byte) (ml.Tensor, error) {
	t, err := c.Backend.Weight(name, dt, shape, data)
	if err == nil {
		c.Weights += int64(len(data))
	}
	return t, err
}

// PlanAdapter is what CheckPlan needs of a model package: its planner, its
// loader, its Load, and the footprint of the architecture under test.
type PlanAdapter struct {
	Plan      engine.PlanFunc
	Loader    engine.Loader
	Load      func(path string, opts nn.Options) (engine.Model, error)
	Footprint nn.Footprinter
}

// CheckPlan asserts that the plan for c under opts equals what the
// adapter's loader reports, and that the workspace covers what the build
// allocated besides weights and KV (exactly, but for the margin and extra,
// the part of the workspace only the CUDA backend allocates).
func CheckPlan(t *testing.T, c Config, opts sdk.LoadOptions, a PlanAdapter, extra func(nn.Footprint) int64) {
	t.Helper()
	path := MustWrite(t, c)
	req := sdk.LoadRequest{Path: path, Options: opts}
	plan, err := a.Plan(context.Background(), req)
	require.NoError(t, err)
	assert.Equal(t, "cpu", plan.Device)
	// free memory moves between two readings on a busy machine: same order, not same bytes
	assert.InDelta(t, float64(nn.MemAvailable()), float64(plan.FreeBytes), 256<<20)

	m, info, err := a.Loader(context.Background(), req, nil)
	require.NoError(t, err)
	require.NoError(t, m.Close())
	assert.Equal(t, info.WeightBytes, plan.WeightBytes, "weights: plan == load")
	assert.Equal(t, info.KVBytes, plan.KVBytes, "KV: plan == load")

	// the same build on a counting backend: every byte it allocates is planned
	sz, err := nn.Size(opts, c.Context, "cpu")
	require.NoError(t, err)
	cb := &Counting{Backend: cpu.New(1)}
	lo := nn.Options{Backend: cb, NumBlocks: sz.NumBlocks, BlockSize: sz.BlockSize, ContextLength: sz.Context, KVType: sz.KVType,
		MaxSequences: sz.MaxSeqs, StepTokens: sz.StepTokens, WindowBlocks: sz.WindowBlocks, SharedKV: sz.SharedKV}
	m2, err := a.Load(path, lo)
	require.NoError(t, err)
	norm, err := lo.Normalize(c.Context)
	require.NoError(t, err)
	require.NoError(t, m2.Close())
	f, err := OpenFootprint(path, a.Footprint)
	require.NoError(t, err)
	assert.Equal(t, plan.Total()-nn.CPUMargin-4*extra(f)*int64(norm.MaxTokens), cb.Allocated+cb.Weights, "every allocated byte is planned")
}

// OpenFootprint reads the footprint fp computes from the GGUF at path
// (the whole model).
func OpenFootprint(path string, fp nn.Footprinter) (nn.Footprint, error) {
	return OpenShardFootprint(path, fp, ml.Shard{})
}

// OpenShardFootprint is OpenFootprint for rank s.Rank of a model split
// s.Size ways.
func OpenShardFootprint(path string, fp nn.Footprinter, s ml.Shard) (nn.Footprint, error) {
	f, err := gguf.Open(path)
	if err != nil {
		return nn.Footprint{}, err
	}
	defer f.Close()
	return fp(f, s)
}
