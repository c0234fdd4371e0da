package replica

import (
	"context"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"testing"

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
func TestSplitGPTMatchesUnsplit(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the gpt adapter")
	}
	p := gptPlugin(t)
	if !slices.Contains(p.Info.Features, placement.FeatureTensorParallel) {
		t.Skip("TODO(issue 9): the gpt adapter does not declare tensor-parallel yet")
	}
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
		m, dec, err := OpenModel(ctx, p, req, OpenOptions{TensorParallel: tpN, Devices: fakeGPUs(), Name: "austen"})
		require.NoError(t, err)
		defer func() { assert.NoError(t, m.Close(ctx)) }()
		if tpN > 1 {
			assert.Equal(t, placement.Split, dec.Kind)
			assert.Equal(t, tpN, dec.Processes)
			require.IsType(t, &Group{}, m)
		}
		var res result
		res.info, err = m.Load(ctx, req, nil)
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
		return res
	}
	whole := run(1)
	split := run(2)
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
