package gpt

import (
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/adaptertest"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

func TestAdapterConformance(t *testing.T) {
	for _, arch := range []string{"gpt-oss", "gpt2"} {
		t.Run(arch, func(t *testing.T) {
			adaptertest.Run(t, func(log hclog.Logger) (sdk.Adapter, error) { return New(log), nil }, adaptertest.Options{
				Info:                 Info(),
				ModelPath:            nntest.MustWrite(t, nntest.Tiny(arch)),
				UnsupportedModelPath: nntest.MustWrite(t, nntest.Tiny("llama")),
				LoadOptions:          sdk.LoadOptions{Device: "cpu", ContextLength: 128, MaxSequences: 4},
				Prompt:               []int32{1, 2, 3, 4, 5},
				MaxTokens:            12,
				Timeout:              time.Minute,
			})
		})
	}
}
