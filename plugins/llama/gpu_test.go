//go:build gpu

// GPU checks of the Llama model on the CUDA backend, built here with
//   go test -c -tags gpu -o bin/llama-gpu.test ./plugins/llama
// and run on the GPU machine by cuda/scripts/gpu-check.sh.

package llama

import (
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

	dir := nntest.FindDir("plugins/testdata/golden", "../testdata/golden")
	if dir == "" {
		return
	}
	for _, gd := range nntest.Goldens(t, dir) {
		if gd.Arch != "llama" {
			continue
		}
		t.Run(gd.Name, func(t *testing.T) {
			if hd := nntest.HeadDim(gd.GGUF); hd != 64 && hd != 128 && hd != 256 {
				t.Skipf("head dim %d: the CUDA attention kernels take 64, 128 or 256", hd)
			}
			n := len(gd.Tokens) + len(gd.Greedy) + 1
			m, err := Load(gd.GGUF, Options{Backend: g, NumBlocks: n/16 + 2, BlockSize: 16, ContextLength: n})
			require.NoError(t, err)
			defer m.Close()
			nntest.CheckGolden(t, gd, m, 2e-2)
		})
	}
}
