package cli

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/host/defaultmodel"
	"github.com/llama-orch/orch/plugins/gpt"
	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/engine/enginetest"
)

// fakeBenchAdapter makes bench use an in-process engine over the fake model.
func fakeBenchAdapter(t *testing.T, cfg enginetest.Config) **enginetest.Model {
	t.Helper()
	old := benchAdapter
	t.Cleanup(func() { benchAdapter = old })
	var m *enginetest.Model
	benchAdapter = func(ctx context.Context, cmd *cobra.Command, path, pin string, log hclog.Logger) (sdk.Adapter, func() error, error) {
		a := engine.NewAdapter(enginetest.Loader(cfg, func(x *enginetest.Model) { m = x }), log)
		return a, func() error { return a.Unload(context.Background()) }, nil
	}
	return &m
}

func TestBenchCommandOnFakeModel(t *testing.T) {
	// A per-step cost makes batching visible: 8 streams decode faster in aggregate than 1.
	model := fakeBenchAdapter(t, enginetest.Config{Vocab: 50, NumBlocks: 1024, ContextLength: 4096,
		StepCost: time.Millisecond, TokenCost: 2 * time.Microsecond})
	file := filepath.Join(t.TempDir(), "tiny.gguf")
	require.NoError(t, os.WriteFile(file, make([]byte, 3<<20), 0o644))

	root := NewRoot()
	var out, errb bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetArgs([]string{"bench", "--model", file, "-p", "64,256", "-n", "16", "--depth", "0,200",
		"--streams", "1,8", "-r", "1", "--batch-tokens", "128", "--log-level", "warn"})
	require.NoError(t, root.Execute(), errb.String())

	table := out.String()
	t.Log("\n" + table)
	lines := strings.Split(strings.TrimSpace(table), "\n")
	require.Len(t, lines, 2+6, "header, separator, pp64, pp256, tg16, tg16 @ d200, two stream rows")
	assert.Contains(t, lines[0], "| model | size | backend | test | t/s | itl p50 | itl p99 |")
	rate := regexp.MustCompile(`\| ([0-9.]+) ± ([0-9.]+) \|`)
	tests := []string{"pp64", "pp256", "tg16", "tg16 @ d200", "pp128+tg16 x1", "pp128+tg16 x8"}
	rates := map[string]float64{}
	for i, name := range tests {
		l := lines[2+i]
		assert.Contains(t, l, "| fake | 3.00 MiB | cpu (fake) | "+name+" |")
		m := rate.FindStringSubmatch(l)
		require.NotNil(t, m, l)
		v, err := strconv.ParseFloat(m[1], 64)
		require.NoError(t, err)
		assert.Positive(t, v, name)
		rates[name] = v
	}
	assert.Greater(t, rates["pp128+tg16 x8"], 2*rates["pp128+tg16 x1"], "aggregate decode scales with streams")
	assert.Greater(t, rates["pp256"], rates["tg16"], "prompt processing is batched")
	assert.Contains(t, lines[6], " ms | ", "stream rows report inter-token latency")
	assert.Contains(t, lines[2], "| - | - |")
	assert.Equal(t, 128, (*model).MaxChunk(), "--batch-tokens reaches the engine")
}

func TestBenchSamplingFlags(t *testing.T) {
	model := fakeBenchAdapter(t, enginetest.Config{Vocab: 50, NumBlocks: 1024, ContextLength: 4096, DeviceGreedy: true})
	file := filepath.Join(t.TempDir(), "tiny.gguf")
	require.NoError(t, os.WriteFile(file, make([]byte, 1<<20), 0o644))
	run := func(args ...string) string {
		root := NewRoot()
		var out, errb bytes.Buffer
		root.SetOut(&out)
		root.SetErr(&errb)
		root.SetArgs(append([]string{"bench", "--model", file, "-p", "0", "-n", "8", "-r", "1", "--log-level", "warn"}, args...))
		require.NoError(t, root.Execute(), errb.String())
		return out.String()
	}
	table := run("--streams", "2")
	assert.Contains(t, table, "| tg8 |")
	assert.Contains(t, table, "| pp128+tg8 x2 |")
	assert.Positive(t, (*model).GreedySteps.Load(), "default: greedy decoding (device argmax)")

	table = run("--streams", "2", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--min-p", "0.05")
	assert.Contains(t, table, "| tg8 T=0.8 top_k=20 top_p=0.9 min_p=0.05 |")
	assert.Contains(t, table, "| pp128+tg8 x2 T=0.8 top_k=20 top_p=0.9 min_p=0.05 |")
	assert.Zero(t, (*model).GreedySteps.Load(), "sampled requests never take the greedy path")
	assert.Positive(t, (*model).Forwards.Load())
}

func TestBenchDeviceSampleFlag(t *testing.T) {
	model := fakeBenchAdapter(t, enginetest.Config{Vocab: 50, NumBlocks: 1024, ContextLength: 4096, DeviceSample: true})
	file := filepath.Join(t.TempDir(), "tiny.gguf")
	require.NoError(t, os.WriteFile(file, make([]byte, 1<<20), 0o644))
	for _, dev := range []bool{true, false} {
		root := NewRoot()
		var out, errb bytes.Buffer
		root.SetOut(&out)
		root.SetErr(&errb)
		root.SetArgs([]string{"bench", "--model", file, "-p", "0", "-n", "8", "-r", "1", "--log-level", "warn",
			"--temperature", "1", "--device-sample=" + strconv.FormatBool(dev)})
		require.NoError(t, root.Execute(), errb.String())
		if dev {
			assert.Positive(t, (*model).SampleSteps.Load(), "sampled tokens drawn by the device sampler")
		} else {
			assert.Zero(t, (*model).SampleSteps.Load(), "--device-sample=false: host sampling")
		}
	}
}

func TestBenchRejectsBadFlags(t *testing.T) {
	fakeBenchAdapter(t, enginetest.Config{})
	model := filepath.Join(t.TempDir(), "m.gguf")
	require.NoError(t, os.WriteFile(model, []byte("x"), 0o644))
	for _, args := range [][]string{
		{"bench"},
		{"bench", "--model", model, "-r", "0"},
		{"bench", "--model", model, "--streams", "0"},
		{"bench", "--model", model, "-p", "-5"},
		{"bench", "--model", model, "--temperature", "-1"},
		{"bench", "--model", model, "--top-p", "1.5"},
		{"bench", "--model", model, "--min-p", "-0.1"},
		{"bench", "--model", model, "--top-k", "-2"},
		{"bench", "--model", filepath.Join(t.TempDir(), "missing.gguf")},
	} {
		root := NewRoot()
		root.SetOut(&bytes.Buffer{})
		root.SetErr(&bytes.Buffer{})
		root.SetArgs(args)
		assert.Error(t, root.Execute(), "%v", args)
	}
}

func TestPercentileAndMeanSD(t *testing.T) {
	d := []time.Duration{5, 1, 4, 2, 3}
	assert.Equal(t, time.Duration(3), percentile(d, 0.5))
	assert.Equal(t, time.Duration(5), percentile(d, 0.99))
	assert.Zero(t, percentile(nil, 0.5))
	m, sd := meanSD([]float64{2, 4, 4, 4, 5, 5, 7, 9})
	assert.InDelta(t, 5, m, 1e-9)
	assert.InDelta(t, 2.138, sd, 1e-3)
}

// TestBenchDefaultModelCPU runs the bench core on a real model: the embedded
// 7M-parameter GPT-2 through the GPT adapter's loader, in process, on the CPU.
func TestBenchDefaultModelCPU(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("runs a real model on the CPU: too slow under -race or -short")
	}
	path, err := defaultmodel.PathIn(t.TempDir())
	require.NoError(t, err)
	old := benchAdapter
	t.Cleanup(func() { benchAdapter = old })
	benchAdapter = func(ctx context.Context, cmd *cobra.Command, _, _ string, log hclog.Logger) (sdk.Adapter, func() error, error) {
		a := engine.NewAdapter(gpt.NewLoader(log), log)
		return a, func() error { return a.Unload(context.Background()) }, nil
	}
	root := NewRoot()
	var out, errb bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetArgs([]string{"bench", "--model", path, "-p", "32", "-n", "8", "--streams", "1,4", "-r", "1", "--device", "cpu", "--log-level", "warn"})
	require.NoError(t, root.Execute(), errb.String())
	t.Log("\n" + out.String())
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Len(t, lines, 2+4)
	for i, name := range []string{"pp32", "tg8", "pp128+tg8 x1", "pp128+tg8 x4"} {
		assert.Contains(t, lines[2+i], "| "+name+" |")
		assert.Regexp(t, `\| [0-9.]+ ± [0-9.]+ \|`, lines[2+i])
	}
}

// TestBenchThroughPlugin runs bench end to end: the real orch-adapter-gpt
// binary, launched over go-plugin/gRPC, serving the embedded GPT-2 on the CPU.
func TestBenchThroughPlugin(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and launches an adapter binary")
	}
	dir := t.TempDir()
	build := exec.Command("go", "build", "-o", filepath.Join(dir, "orch-adapter-gpt"), "github.com/llama-orch/orch/plugins/gpt/cmd/orch-adapter-gpt")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	outb, err := build.CombinedOutput()
	require.NoError(t, err, string(outb))
	path, err := defaultmodel.PathIn(t.TempDir())
	require.NoError(t, err)

	root := NewRoot()
	var out, errb bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetArgs([]string{"bench", "--model", path, "--plugins-dir", dir, "-p", "16", "-n", "4",
		"--streams", "2", "-r", "1", "--device", "cpu", "--log-level", "warn"})
	require.NoError(t, root.Execute(), errb.String())
	t.Log("\n" + out.String())
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Len(t, lines, 2+3)
	assert.Contains(t, lines[2], "| orch-austen-gpt2-7m | 9.89 MiB | cpu")
	for i, name := range []string{"pp16", "tg4", "pp128+tg4 x2"} {
		assert.Contains(t, lines[2+i], "| "+name+" |")
		assert.Regexp(t, `\| [0-9.]+ ± [0-9.]+ \|`, lines[2+i])
	}
}

// TestEngineBatchInvarianceDefaultModel checks the serving engine on a real
// model: 8 concurrent greedy streams of the embedded GPT-2 (CPU backend)
// produce exactly the tokens each produces alone.
func TestEngineBatchInvarianceDefaultModel(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("runs a real model on the CPU: too slow under -race or -short")
	}
	path, err := defaultmodel.PathIn(t.TempDir())
	require.NoError(t, err)
	a := engine.NewAdapter(gpt.NewLoader(hclog.NewNullLogger()), nil)
	ctx := context.Background()
	info, err := a.Load(ctx, sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: "cpu", ContextLength: 256, MaxSequences: 8}}, nil)
	require.NoError(t, err)
	defer a.Unload(ctx)
	gen := func(p []int32) []int32 {
		var toks []int32
		require.NoError(t, a.Generate(ctx, sdk.GenerateRequest{Prompt: p, MaxTokens: 12}, func(c sdk.Chunk) error {
			toks = append(toks, c.Tokens...)
			return nil
		}))
		return toks
	}
	prompts := make([][]int32, 8)
	solo := make([][]int32, 8)
	for i := range prompts {
		for j := 0; j < 5+3*i; j++ {
			prompts[i] = append(prompts[i], int32((i*131+j*17)%info.VocabSize))
		}
		solo[i] = gen(prompts[i])
		require.Len(t, solo[i], 12)
	}
	got := make([][]int32, 8)
	var wg sync.WaitGroup
	for i := range prompts {
		wg.Add(1)
		go func() { defer wg.Done(); got[i] = gen(prompts[i]) }()
	}
	wg.Wait()
	for i := range prompts {
		assert.Equal(t, solo[i], got[i], "stream %d", i)
	}
}
