//go:build gpu

// GPU check of the memory planner (run with the other GPU tests, see gpu_test.go).

package llama

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

func TestGPUPlanEqualsLoad(t *testing.T) {
	ctx := context.Background()
	for _, arch := range []string{"llama"} {
		t.Run(arch, func(t *testing.T) {
			c := nntest.TinyGPU(arch)
			path := nntest.MustWrite(t, c)
			req := sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: "cuda:0", ContextLength: 128,
				Extra: map[string]string{"kv_type": "f16"}}}
			plan, err := NewPlanner(nil)(ctx, req)
			require.NoError(t, err)
			assert.Equal(t, "cuda:0", plan.Device)
			assert.Positive(t, plan.FreeBytes)
			m, info, err := NewLoader(nil)(ctx, req, nil)
			require.NoError(t, err)
			require.NoError(t, m.Close())
			assert.Equal(t, "cuda", info.Backend)
			assert.Equal(t, info.WeightBytes, plan.WeightBytes)
			assert.Equal(t, info.KVBytes, plan.KVBytes)

			// an absurd context: cuda:0 refuses, "cuda" leaves it to the host's placement
			c.Context = 1 << 28
			path = nntest.MustWrite(t, c)
			big := sdk.LoadOptions{Device: "cuda:0", ContextLength: 1 << 28, MaxSequences: 64}
			_, err = NewPlanner(nil)(ctx, sdk.LoadRequest{Path: path, Options: big})
			var oom *sdk.OutOfMemoryError
			require.True(t, errors.As(err, &oom), "want *sdk.OutOfMemoryError, got %v", err)
			assert.Equal(t, "cuda:0", oom.Device)
			big.Device = "cuda"
			plan, err = NewPlanner(nil)(ctx, sdk.LoadRequest{Path: path, Options: big})
			require.NoError(t, err)
			assert.Greater(t, plan.Total(), plan.FreeBytes)
		})
	}
}
