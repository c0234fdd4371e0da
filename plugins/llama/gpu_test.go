//go:build gpu

// GPU checks of the Llama model on the CUDA backend, built here with
//   go test -c -tags gpu -o bin/llama-gpu.test ./plugins/llama
// and run on the GPU machine by cuda/scripts/gpu-check.sh.

package llama

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/cuda"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

func TestGPUMatchesCPU(t *testing.T) {
	g, err := cuda.New(0)
	require.NoError(t, err, "CUDA backend")
	defer g.Close()
	c := nntest.TinyGPU("llama")
	ref := load(t, c, Options{Backend: cpu.New(0), MaxTokens: 16})
	m := load(t, c, Options{Backend: g, MaxTokens: 16})
	nntest.CompareModels(t, ref, m, 21, 2e-2)
	nntest.CheckGreedy(t, m)
}

// TestGPUGoldens checks the CUDA backend against the transformers goldens
// (plugins/testdata/golden) through nntest.RunGPUGoldens.
func TestGPUGoldens(t *testing.T) {
	g, err := cuda.New(0)
	require.NoError(t, err, "CUDA backend")
	defer g.Close()
	dir := nntest.FindDir("plugins/testdata/golden", "../testdata/golden")
	// f16 is the KV type the adapter loads on the GPU by default (nn.Size); f32 on request
	for _, kv := range []ml.DType{ml.F16, ml.F32} {
		t.Run("kv_"+kv.String(), func(t *testing.T) {
			nntest.RunGPUGoldens(t, dir, []string{"llama"}, func(t *testing.T, path string, n, maxTokens int) engine.Model {
				m, err := Load(path, Options{Backend: g, NumBlocks: n/16 + 2, BlockSize: 16, ContextLength: n, MaxTokens: maxTokens, KVType: kv})
				require.NoError(t, err)
				return m
			})
		})
	}
}
