//go:build gpu

// GPU checks of the Llama model on the CUDA backend, built here with
//   go test -c -tags gpu -o bin/llama-gpu.test ./plugins/llama
// and run on the GPU machine by cuda/scripts/gpu-check.sh.

package llama

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

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
// (plugins/testdata/golden): logits within 2e-2, greedy tokens identical.
func TestGPUGoldens(t *testing.T) {
	g, err := cuda.New(0)
	require.NoError(t, err, "CUDA backend")
	defer g.Close()
	dir := nntest.FindDir("plugins/testdata/golden", "../testdata/golden")
	if dir == "" {
		t.Skip("no golden directory")
	}
	for _, gd := range nntest.Goldens(t, dir) {
		if gd.Arch != "llama" {
			continue
		}
		// Whole prompt in one sub-batch (bf16 prefill GEMMs, multi-token
		// attention), and in sub-batches of 8 (the float32 GEMV path).
		for _, mt := range []int{0, 8} {
			t.Run(fmt.Sprintf("%s/max_tokens=%d", gd.Name, mt), func(t *testing.T) {
				t.Logf("head dim %d", nntest.HeadDim(gd.GGUF))
				n := len(gd.Tokens) + len(gd.Greedy) + 1
				m, err := Load(gd.GGUF, Options{Backend: g, NumBlocks: n/16 + 2, BlockSize: 16, ContextLength: n, MaxTokens: mt})
				require.NoError(t, err)
				defer m.Close()
				nntest.CheckGoldenTies(t, gd, m, 2e-2, gpuTies)
			})
		}
	}
}

// gpuTies: the default CUDA kernels use fp16 activations in the decode GEMVs
// and bf16 in the prefill GEMMs (logits within 2e-2 of transformers); a
// greedy step may flip a near tie (docs/correctness.md).
var gpuTies = nntest.Ties{Gap: 1e-2, MaxFlips: 4}
