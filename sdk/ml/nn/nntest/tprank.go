package nntest

// The tensor-parallel check on GPUs, shared by the adapters' gpu-tagged
// tests (it needs no build tag itself: ORCH_TP_DEVICE=cpu runs it anywhere).

import (
	"context"
	"encoding/json"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml/nn"
)

// splitRun is what rank 0 records of one model (split or whole).
type splitRun struct {
	Tokens      []int32   `json:"tokens"`       // greedy continuation
	Logits      []float32 `json:"logits"`       // the prompt's last row (first step)
	DecodeTokS  float64   `json:"decode_tok_s"` // one stream, ForwardGreedy
	PrefillTokS float64   `json:"prefill_tok_s"`
	WeightBytes int64     `json:"weight_bytes"`
	KVBytes     int64     `json:"kv_bytes"`
}

const (
	splitContext = 1024
	splitBlock   = 16
	splitPrompt  = 64
	splitSteps   = 32  // compared
	splitTimed   = 128 // timed after them
)

func splitRequest(path string, extra map[string]string) sdk.LoadRequest {
	ex := map[string]string{"block_size": strconv.Itoa(splitBlock),
		"num_blocks": strconv.Itoa(splitContext / splitBlock), "window_blocks": strconv.Itoa(splitContext / splitBlock)}
	for k, v := range extra {
		ex[k] = v
	}
	dev := "cuda:0"
	if d := os.Getenv("ORCH_TP_DEVICE"); d != "" {
		dev = d // "cpu" tries the test's logic on a machine without GPUs
	}
	return sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: dev, ContextLength: splitContext, MaxSequences: 1, Extra: ex}}
}

// splitGenerate runs the fixed prompt on m: the first step's logits, the
// greedy continuation, and the timings.
func splitGenerate(t *testing.T, m engine.Model) splitRun {
	ctx := context.Background()
	gm, ok := m.(engine.GreedyModel)
	require.True(t, ok)
	blocks := make([]int32, splitContext/splitBlock)
	for i := range blocks {
		blocks[i] = int32(i)
	}
	prompt := make([]int32, splitPrompt)
	V := m.Spec().VocabSize
	for i := range prompt {
		prompt[i] = int32((i*7919 + 13) % V)
	}
	var run splitRun
	// the first call pays one-time costs (NCCL connects lazily, kernel
	// setup): an untimed run of the same prefill (it writes the same KV)
	_, err := m.Forward(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt, Blocks: blocks}}})
	require.NoError(t, err)
	start := time.Now()
	out, err := m.Forward(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt, Blocks: blocks}}})
	require.NoError(t, err)
	run.PrefillTokS = splitPrompt / time.Since(start).Seconds()
	run.Logits = out.Logits[0]
	best := 0
	for i, v := range run.Logits {
		if v > run.Logits[best] {
			best = i
		}
	}
	tok := []int32{int32(best)}
	pos := splitPrompt
	var decode time.Duration
	for i := 0; i < splitSteps+splitTimed; i++ {
		if i < splitSteps {
			run.Tokens = append(run.Tokens, tok[0])
		}
		start = time.Now()
		next, err := gm.ForwardGreedy(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: tok, Pos: pos, Blocks: blocks}}})
		require.NoError(t, err)
		if i >= splitSteps {
			decode += time.Since(start)
		}
		tok, pos = next[:1], pos+1
	}
	run.DecodeTokS = splitTimed / decode.Seconds()
	return run
}

// RunSplitRanks is one rank of the tensor-parallel GPU check (one process
// per rank, see plugins/gpt/tp_gpu_test.go for the commands): it loads
// ORCH_GPU_MODEL with newLoader (an adapter's NewLoader) as rank ORCH_TP_RANK of
// ORCH_TP_SIZE meeting at ORCH_TP_ADDR, on "cuda:0" (the process sees one
// GPU through CUDA_VISIBLE_DEVICES; ORCH_TP_DEVICE overrides, e.g. "cpu" to
// try it without GPUs). A follower runs rank 0's steps until rank 0 closes
// the model. Rank 0 first runs a fixed prompt on the whole model (Forward
// for the first step's logits, then greedy decode with ForwardGreedy, the
// captured path), then joins the group and runs it split, then runs the
// whole model again; it compares (logits within 2e-2 of max|logit|, greedy
// tokens identical), logs the runs' one-stream decode and prefill speed and
// writes everything to ORCH_TP_OUT (JSON). It skips unless ORCH_TP_SIZE and ORCH_GPU_MODEL are set.
func RunSplitRanks(t *testing.T, newLoader func(hclog.Logger) engine.Loader) {
	sizeS, path := os.Getenv("ORCH_TP_SIZE"), os.Getenv("ORCH_GPU_MODEL")
	if sizeS == "" || path == "" {
		t.Skip("set ORCH_TP_RANK, ORCH_TP_SIZE, ORCH_TP_ADDR and ORCH_GPU_MODEL (one process per rank)")
	}
	rank, addr := os.Getenv("ORCH_TP_RANK"), os.Getenv("ORCH_TP_ADDR")
	log := hclog.New(&hclog.LoggerOptions{Name: "tp-rank" + rank, Level: hclog.Info, Output: os.Stderr})
	stopped := make(chan error, 1)
	nn.FollowerExit = func(_ hclog.Logger, _ int, err error) { stopped <- err }
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	// rank 0 runs the whole model first, in a fresh process like every other
	// GPU test (the other ranks wait in the group's rendezvous), then the
	// split, then the whole model again: whole vs whole tells whether
	// reloading in one process changes results, split vs both whether the
	// split does
	runWhole := func(which string) splitRun {
		whole, winfo, err := newLoader(log)(ctx, splitRequest(path, nil), nil)
		require.NoError(t, err)
		ref := splitGenerate(t, whole)
		ref.WeightBytes, ref.KVBytes = winfo.WeightBytes, winfo.KVBytes
		require.NoError(t, whole.Close())
		t.Logf("whole model (%s): %d weight bytes, first tokens %v", which, ref.WeightBytes, ref.Tokens[:min(8, len(ref.Tokens))])
		return ref
	}
	var ref splitRun
	if rank == "0" {
		ref = runWhole("first")
	}
	start := time.Now()
	m, info, err := newLoader(log)(ctx, splitRequest(path, map[string]string{"tp.rank": rank, "tp.size": sizeS, "tp.addr": addr}), nil)
	require.NoError(t, err)
	t.Logf("rank %s: loaded in %v on %s: weights %d bytes, KV %d bytes", rank, time.Since(start), info.DeviceName, info.WeightBytes, info.KVBytes)
	if rank != "0" {
		// a follower runs rank 0's steps until rank 0 closes the model
		select {
		case err := <-stopped:
			assert.NoError(t, err, "the follower stops cleanly on rank 0's Close")
		case <-time.After(9 * time.Minute):
			t.Error("rank 0 did not close the model")
		}
		require.NoError(t, m.Close())
		return
	}
	split := splitGenerate(t, m)
	split.WeightBytes, split.KVBytes = info.WeightBytes, info.KVBytes
	require.NoError(t, m.Close())
	again := runWhole("again, after the split")

	compare := func(what string, a, b splitRun) (float64, int) {
		e := MaxRelErr(a.Logits, b.Logits)
		same := 0
		for same < len(b.Tokens) && a.Tokens[same] == b.Tokens[same] {
			same++
		}
		t.Logf("%s: first-step logits max error / max|logit| %.3g; greedy tokens identical for %d of %d", what, e, same, len(b.Tokens))
		return e, same
	}
	ew, _ := compare("whole again vs whole first", again, ref)
	e, same := compare("split "+sizeS+" ways vs whole first", split, ref)
	compare("split "+sizeS+" ways vs whole again", split, again)
	t.Logf("decode one stream: split %.1f tok/s, whole %.1f tok/s; prefill %d tokens: split %.0f tok/s, whole %.0f tok/s (whole again: %.0f)",
		split.DecodeTokS, ref.DecodeTokS, splitPrompt, split.PrefillTokS, ref.PrefillTokS, again.PrefillTokS)
	t.Logf("rank 0 holds %d of %d weight bytes, %d of %d KV bytes", split.WeightBytes, ref.WeightBytes, split.KVBytes, ref.KVBytes)
	if out := os.Getenv("ORCH_TP_OUT"); out != "" {
		data, err := json.Marshal(map[string]any{"size": sizeS, "max_rel_err": e, "tokens_identical": same,
			"whole_again_max_rel_err": ew, "split": split, "whole": ref, "whole_again": again})
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(out, data, 0o644))
	}
	assert.LessOrEqual(t, ew, 2e-2, "whole model reloaded in the same process")
	assert.LessOrEqual(t, e, 2e-2, "first-step logits")
	assert.Equal(t, ref.Tokens, split.Tokens, "greedy tokens")
}
