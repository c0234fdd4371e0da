package gpt

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/synth"
)

// cpuTime is the process's user+system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchModel writes a synth preset once per benchmark run.
func benchModel(b *testing.B, arch, size string) string {
	b.Helper()
	path := filepath.Join(b.TempDir(), arch+"-"+size+".gguf")
	require.NoError(b, synth.Write(path, synth.Options{Arch: arch, Size: size, Seed: 1}, nil))
	return path
}

// benchDecode measures single-stream decode (one token per Forward) after a
// 32-token prompt, and prefill of 128 tokens, on the CPU backend.
func benchDecode(b *testing.B, path string) {
	m, err := Load(path, Options{Backend: cpu.New(0), NumBlocks: 64, BlockSize: 16, ContextLength: 1024})
	require.NoError(b, err)
	defer m.Close()
	blocks := make([]int32, 64)
	for i := range blocks {
		blocks[i] = int32(i)
	}
	prompt := make([]int32, 128)
	for i := range prompt {
		prompt[i] = int32(i + 1)
	}
	ctx := context.Background()
	start := time.Now()
	_, err = m.Forward(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt, Blocks: blocks}}})
	require.NoError(b, err)
	pp := time.Since(start)
	cpu0 := cpuTime()
	b.ResetTimer()
	pos := len(prompt)
	for i := 0; i < b.N; i++ {
		if pos >= 1000 {
			pos = len(prompt)
		}
		_, err := m.Forward(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{7}, Pos: pos, Blocks: blocks}}})
		require.NoError(b, err)
		pos++
	}
	b.StopTimer()
	// CPU seconds per token: comparable on a machine shared with other jobs
	b.ReportMetric((cpuTime()-cpu0).Seconds()*1e3/float64(b.N), "cpu-ms/tok")
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tok/s")
	b.ReportMetric(128/pp.Seconds(), "pp128-tok/s")
}

func BenchmarkDecodeGPT2_124M(b *testing.B) {
	if os.Getenv("ORCH_BENCH_BIG") == "" {
		b.Skip("set ORCH_BENCH_BIG=1 (writes a 250 MB model)")
	}
	benchDecode(b, benchModel(b, "gpt2", "124m"))
}

func BenchmarkDecodeGPT2Tiny(b *testing.B)    { benchDecode(b, benchModel(b, "gpt2", "tiny")) }
func BenchmarkDecodeGPTOSSSmall(b *testing.B) { benchDecode(b, benchModel(b, "gpt-oss", "small")) }
