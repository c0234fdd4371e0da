//go:build gpu

// GPU checks of the GPT models on the CUDA backend, built here with
//   go test -c -tags gpu -o bin/gpt-gpu.test ./plugins/gpt
// and run on the GPU machine by cuda/scripts/gpu-check.sh (from the
// repository root). ORCH_BENCH_MODEL=<gguf> adds a decode/prefill timing.

package gpt

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/cuda"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

func gpuBackend(t testing.TB) ml.Backend {
	t.Helper()
	b, err := cuda.New(0)
	require.NoError(t, err, "CUDA backend")
	t.Cleanup(func() { b.Close() })
	return b
}

func TestGPUMatchesCPU(t *testing.T) {
	g := gpuBackend(t)
	for _, arch := range []string{"gpt-oss", "gpt2"} {
		t.Run(arch, func(t *testing.T) {
			c := nntest.TinyGPU(arch)
			ref := load(t, c, Options{Backend: cpu.New(0), MaxTokens: 16})
			m := load(t, c, Options{Backend: g, MaxTokens: 16})
			nntest.CompareModels(t, ref, m, 21, 2e-2)
			nntest.CheckGreedy(t, m)
		})
	}
}

func TestGPUGoldens(t *testing.T) {
	g := gpuBackend(t)
	dir := nntest.FindDir("plugins/testdata/golden", "../testdata/golden")
	// f16 is the KV type the adapter loads on the GPU by default (nn.Size); f32 on request
	for _, kv := range []ml.DType{ml.F16, ml.F32} {
		t.Run("kv_"+kv.String(), func(t *testing.T) {
			nntest.RunGPUGoldens(t, dir, []string{"gpt-oss", "gpt2"}, func(t *testing.T, path string, n, maxTokens int) engine.Model {
				m, err := Load(path, Options{Backend: g, NumBlocks: n/16 + 2, BlockSize: 16, ContextLength: n, MaxTokens: maxTokens, KVType: kv})
				require.NoError(t, err)
				return m
			})
		})
	}
}

// TestGPUDecodeSpeed times single-stream greedy decode (ForwardGreedy, the
// captured path) and a 512-token prefill of ORCH_BENCH_MODEL.
func TestGPUDecodeSpeed(t *testing.T) {
	path := os.Getenv("ORCH_BENCH_MODEL")
	if path == "" {
		t.Skip("set ORCH_BENCH_MODEL to a GGUF file")
	}
	g := gpuBackend(t)
	start := time.Now()
	m, err := Load(path, Options{Backend: g, NumBlocks: 4096/16 + 1, BlockSize: 16, ContextLength: 4096, MaxTokens: 512})
	require.NoError(t, err)
	defer m.Close()
	t.Logf("load %v", time.Since(start))
	gm := m.(engine.GreedyModel)
	blocks := make([]int32, 4096/16)
	for i := range blocks {
		blocks[i] = int32(i)
	}
	prompt := make([]int32, 512)
	for i := range prompt {
		prompt[i] = int32(i*7 + 1)
	}
	ctx := context.Background()
	for rep := 0; rep < 2; rep++ {
		start = time.Now()
		_, err = gm.ForwardGreedy(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt, Blocks: blocks}}})
		require.NoError(t, err)
		t.Logf("pp512: %.0f tok/s", 512/time.Since(start).Seconds())
	}
	tok := []int32{1}
	const steps = 128
	for rep := 0; rep < 2; rep++ {
		start = time.Now()
		for i := 0; i < steps; i++ {
			out, err := gm.ForwardGreedy(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: tok, Pos: 512 + i, Blocks: blocks}}})
			require.NoError(t, err)
			tok = out[:1]
		}
		t.Logf("tg%d (one stream, ForwardGreedy): %.1f tok/s", steps, steps/time.Since(start).Seconds())
	}
}
