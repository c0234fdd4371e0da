package replica

import (
	"context"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/host/defaultmodel"
	"github.com/llama-orch/orch/host/placement"
	"github.com/llama-orch/orch/host/plugins"
	"github.com/llama-orch/orch/sdk"
)

var (
	gptOnce sync.Once
	gptDir  string
	gptErr  error
)

// gptPlugin builds orch-adapter-gpt once (only for the tests that need it)
// and returns its scanned plugin.
func gptPlugin(t *testing.T) plugins.Plugin {
	t.Helper()
	gptOnce.Do(func() {
		gptDir = filepath.Join(binDir, "gpt")
		cmd := exec.Command("go", "build", "-o", filepath.Join(gptDir, "orch-adapter-gpt"),
			"github.com/llama-orch/orch/plugins/gpt/cmd/orch-adapter-gpt")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			gptErr = err
			t.Log(string(out))
		}
	})
	require.NoError(t, gptErr, "build orch-adapter-gpt")
	ps, err := plugins.Scan([]string{gptDir}, hclog.NewNullLogger())
	require.NoError(t, err)
	require.Len(t, ps, 1)
	return ps[0]
}

// The embedded GPT-2 split over two CPU rank processes of the real gpt
// adapter (TCP rendezvous, host all-reduce, leader/follower steps) gives the
// greedy tokens and (within float tolerance) the logits of the unsplit model.
// Then a follower is SIGKILLed mid-stream: the stream fails with
// sdk.ErrAdapterCrashed, both ranks are replaced and the model reloaded, and
// the group answers as before.
func TestSplitGPTMatchesUnsplit(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the gpt adapter")
	}
	p := gptPlugin(t)
	path, err := defaultmodel.PathIn(t.TempDir())
	require.NoError(t, err)
	ctx := context.Background()
	req := sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: "cpu", ContextLength: 128, MaxSequences: 2, Threads: 1}}
	prompts := [][]int32{{464, 3290, 318}, {40, 716, 257, 1310, 11, 290}, {1}}
	type result struct {
		tokens [][]int32
		logits sdk.Logits
		info   sdk.ModelInfo
	}
	run := func(tpN int) result {
		var m Model
		var err error
		if tpN > 1 {
			// StartSplit, not OpenModel: placement's feature check is tested
			// on its own (and by the serve test); this is the group over the
			// real adapter.
			m, err = StartSplit(ctx, p, placement.Decision{Kind: placement.Split, Processes: tpN}, OpenOptions{Name: "austen"})
		} else {
			m, _, err = OpenModel(ctx, p, req, OpenOptions{Devices: fakeGPUs(), Name: "austen"})
		}
		require.NoError(t, err)
		defer func() { assert.NoError(t, m.Close(ctx)) }()
		if tpN > 1 {
			bad := req
			bad.Path = filepath.Join(t.TempDir(), "not.gguf")
			require.NoError(t, os.WriteFile(bad.Path, []byte("not a gguf file"), 0o644))
			_, err = m.Load(ctx, bad, nil)
			require.Error(t, err, "a failed load ...")
			assert.Contains(t, err.Error(), "rank 0")
		}
		var res result
		res.info, err = m.Load(ctx, req, nil) // ... leaves the group ready for the next
		require.NoError(t, err)
		for _, pr := range prompts {
			var out []int32
			err = m.Generate(ctx, sdk.GenerateRequest{Prompt: pr, MaxTokens: 16}, func(c sdk.Chunk) error {
				out = append(out, c.Tokens...)
				return nil
			})
			require.NoError(t, err)
			res.tokens = append(res.tokens, out)
		}
		res.logits, err = m.Evaluate(ctx, prompts[1])
		require.NoError(t, err)
		if g, ok := m.(*Group); ok {
			// A follower killed mid-stream: the stream fails as crashed, the
			// whole group is relaunched and reloaded, and it answers the same.
			pids := g.Pids()
			require.Len(t, pids, 2)
			n := 0
			err = g.Generate(ctx, sdk.GenerateRequest{Prompt: prompts[0], MaxTokens: 120}, func(c sdk.Chunk) error {
				if n == 0 {
					require.NoError(t, syscall.Kill(pids[1], syscall.SIGKILL))
					time.Sleep(50 * time.Millisecond)
				}
				n += len(c.Tokens)
				return nil
			})
			require.ErrorIs(t, err, sdk.ErrAdapterCrashed)
			assert.Less(t, n, 120)
			require.Eventually(t, func() bool { return g.Restarts() == 1 && g.WaitReady(doneCtx) == nil }, 20*time.Second, 20*time.Millisecond)
			assert.NotEqual(t, pids[0], g.Pids()[0], "rank 0 was replaced too")
			var out []int32
			err = g.Generate(ctx, sdk.GenerateRequest{Prompt: prompts[0], MaxTokens: 16}, func(c sdk.Chunk) error {
				out = append(out, c.Tokens...)
				return nil
			})
			require.NoError(t, err, "the relaunched group serves")
			assert.Equal(t, res.tokens[0], out, "and answers as before")

			// Unload and load again (a new rendezvous in the same processes).
			require.NoError(t, g.Unload(ctx))
			_, err = g.Load(ctx, req, nil)
			require.NoError(t, err)
			out = nil
			err = g.Generate(ctx, sdk.GenerateRequest{Prompt: prompts[0], MaxTokens: 16}, func(c sdk.Chunk) error {
				out = append(out, c.Tokens...)
				return nil
			})
			require.NoError(t, err, "reloaded after Unload")
			assert.Equal(t, res.tokens[0], out)
		}
		return res
	}
	whole := run(1)
	split := run(2)
	for i := range prompts {
		assert.Len(t, whole.tokens[i], 16, "prompt %d", i)
	}
	assert.Equal(t, whole.tokens, split.tokens, "greedy tokens")
	assert.Contains(t, split.info.DeviceName, "2 x ")
	assert.Equal(t, whole.info.VocabSize, split.info.VocabSize)
	require.Equal(t, whole.logits.Rows, split.logits.Rows)
	require.Equal(t, len(whole.logits.Data), len(split.logits.Data))
	maxAbs, maxDiff := 0.0, 0.0
	for i, w := range whole.logits.Data {
		maxAbs = math.Max(maxAbs, math.Abs(float64(w)))
		maxDiff = math.Max(maxDiff, math.Abs(float64(w-split.logits.Data[i])))
	}
	t.Logf("max |logit| %.3f, max |split - whole| %.3g", maxAbs, maxDiff)
	assert.LessOrEqual(t, maxDiff, 1e-4*maxAbs, "logits within 1e-4 of max|logit|")
}

// Placement asks the adapter for one rank's plan of a k-way split: it holds
// more than half the weights (embeddings and norms are whole on every rank)
// and is what a forced split on (fake) GPUs reserves; a split the adapter
// cannot do is refused before any rank starts.
func TestSplitPlansFromTheAdapter(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the gpt adapter")
	}
	p := gptPlugin(t)
	path, err := defaultmodel.PathIn(t.TempDir())
	require.NoError(t, err)
	ctx := context.Background()
	req := sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{ContextLength: 128, MaxSequences: 2}}
	plan, splits, err := planModel(ctx, p, req, []int{2, 3}, hclog.NewNullLogger())
	require.NoError(t, err)
	require.Contains(t, splits, 2)
	require.NoError(t, splits[2].Err)
	half := splits[2].Plan
	t.Logf("whole %+v, rank of 2 %+v", plan, half)
	assert.Greater(t, half.WeightBytes, plan.WeightBytes/2)
	assert.Less(t, half.WeightBytes, plan.WeightBytes)
	assert.Equal(t, plan.KVBytes/2, half.KVBytes, "KV heads split evenly")
	require.Contains(t, splits, 3)
	require.ErrorIs(t, splits[3].Err, sdk.ErrInvalidArgument, "8 heads do not split 3 ways")

	dec, err := place(ctx, p, req, OpenOptions{TensorParallel: 2, Devices: fakeGPUs(70<<30, 75<<30)})
	require.NoError(t, err)
	assert.Equal(t, placement.Split, dec.Kind)
	assert.Equal(t, half.Total(), dec.PerGPUBytes, "the rank plan, not the estimate")

	cpu := req
	cpu.Options.Device = "cpu"
	_, _, err = OpenModel(ctx, p, cpu, OpenOptions{TensorParallel: 3, Devices: fakeGPUs()})
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)
	assert.Contains(t, err.Error(), "cannot split the model 3 ways")
}
