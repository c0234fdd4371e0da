package nn_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/nn"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

func TestPlannerArchitectures(t *testing.T) {
	ctx := context.Background()
	path := nntest.MustWrite(t, nntest.Tiny("gpt2"))
	req := sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: "cpu"}}
	// served but without a footprint: not implemented, not a wrong number
	_, err := nn.Builders{"gpt2": nil}.Planner(nil, nil)(ctx, req)
	assert.ErrorIs(t, err, sdk.ErrNotImplemented)
	_, err = nn.Builders{"llama": nil}.Planner(nil, nil)(ctx, req)
	assert.ErrorIs(t, err, sdk.ErrUnsupportedArchitecture)
	// a footprint error names the architecture
	bad := func(*gguf.File, ml.Shard) (nn.Footprint, error) { return nn.Footprint{}, assert.AnError }
	_, err = nn.Builders{"gpt2": nil}.Planner(map[string]nn.Footprinter{"gpt2": bad}, nil)(ctx, req)
	assert.ErrorIs(t, err, assert.AnError)
	assert.Contains(t, err.Error(), "gpt2")
	// a cancelled context stops before the backend is opened
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	ok := func(*gguf.File, ml.Shard) (nn.Footprint, error) { return nn.Footprint{}, nil }
	_, err = nn.Builders{"gpt2": nil}.Planner(map[string]nn.Footprinter{"gpt2": ok}, nil)(cctx, req)
	assert.ErrorIs(t, err, context.Canceled)
}

func TestWeightBytes(t *testing.T) {
	path := nntest.MustWrite(t, nntest.Tiny("llama"))
	f, err := gguf.Open(path)
	require.NoError(t, err)
	defer f.Close()
	var all, freqs int64
	for _, ti := range f.Tensors {
		all += ti.Size
		if ti.Name == "rope_freqs.weight" {
			freqs = ti.Size
		}
	}
	require.Positive(t, freqs)
	assert.Equal(t, all, nn.WeightBytes(f, nil, nil))
	assert.Equal(t, all-freqs, nn.WeightBytes(f, func(n string) bool { return n == "rope_freqs.weight" }, nil))
	// the tiny files store vectors as F32: Vector binds them as they are
	assert.Equal(t, all, nn.WeightBytes(f, nil, nn.VectorName))
}

func TestMemAvailable(t *testing.T) {
	assert.GreaterOrEqual(t, nn.MemAvailable(), int64(0))
}
