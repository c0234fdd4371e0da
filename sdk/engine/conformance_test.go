package engine_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/adaptertest"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/engine/enginetest"
)

// TestConformance runs the adapter conformance kit (over the real gRPC wire)
// against the engine serving the fake model.
func TestConformance(t *testing.T) {
	info := sdk.Info{Name: "enginefake", Version: "0.0.1", Architectures: []string{"fake"}}
	fake := enginetest.Loader(enginetest.Config{Vocab: 64, StepCost: 200 * time.Microsecond}, nil)
	loader := func(ctx context.Context, req sdk.LoadRequest, p func(sdk.LoadProgress)) (engine.Model, sdk.ModelInfo, error) {
		if strings.Contains(req.Path, "unsupported") {
			return nil, sdk.ModelInfo{}, fmt.Errorf("%s: %w", req.Path, sdk.ErrUnsupportedArchitecture)
		}
		return fake(ctx, req, p)
	}
	adaptertest.Run(t, func(log hclog.Logger) (sdk.Adapter, error) {
		return engine.NewAdapter(loader, log), nil
	}, adaptertest.Options{
		Info:                 info,
		ModelPath:            "fake.gguf",
		UnsupportedModelPath: "unsupported.gguf",
		LoadOptions:          sdk.LoadOptions{ContextLength: 256},
	})
}
