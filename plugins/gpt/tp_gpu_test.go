//go:build gpu

// Tensor parallelism on GPUs (build as gpu_test.go says). One test process
// per rank, each seeing one GPU:
//
//	go test -c -tags gpu -o bin/gpt-gpu.test ./plugins/gpt
//	export ORCH_GPU_MODEL=<gguf> ORCH_TP_SIZE=2 ORCH_TP_ADDR=127.0.0.1:29533 NCCL_NVLS_ENABLE=0
//	CUDA_VISIBLE_DEVICES=1 ORCH_TP_RANK=1 bin/gpt-gpu.test -test.run TestGPUTensorParallel -test.v > rank1.log 2>&1 &
//	CUDA_VISIBLE_DEVICES=0 ORCH_TP_RANK=0 ORCH_TP_OUT=tp.json bin/gpt-gpu.test -test.run TestGPUTensorParallel -test.v
//	wait
//
// Rank 0 runs a fixed prompt split (Forward for the first step's logits,
// then greedy decode with ForwardGreedy, the captured path), closes the
// group, loads the whole model on its GPU, runs the same, compares (logits
// within 2e-2 of max|logit|, greedy tokens identical) and writes both to
// ORCH_TP_OUT (JSON). It also times one-stream decode of each.

package gpt

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
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// tpRun is what rank 0 records of one model (split or whole).
type tpRun struct {
	Tokens      []int32   `json:"tokens"`       // greedy continuation
	Logits      []float32 `json:"logits"`       // the prompt's last row (first step)
	DecodeTokS  float64   `json:"decode_tok_s"` // one stream, ForwardGreedy
	PrefillTokS float64   `json:"prefill_tok_s"`
	WeightBytes int64     `json:"weight_bytes"`
	KVBytes     int64     `json:"kv_bytes"`
}

const (
	tpGPUContext = 1024
	tpGPUBlock   = 16
	tpGPUPrompt  = 64
	tpGPUSteps   = 32  // compared
	tpGPUTimed   = 128 // timed after them
)

func tpGPURequest(path string, extra map[string]string) sdk.LoadRequest {
	ex := map[string]string{"block_size": strconv.Itoa(tpGPUBlock),
		"num_blocks": strconv.Itoa(tpGPUContext / tpGPUBlock), "window_blocks": strconv.Itoa(tpGPUContext / tpGPUBlock)}
	for k, v := range extra {
		ex[k] = v
	}
	dev := "cuda:0"
	if d := os.Getenv("ORCH_TP_DEVICE"); d != "" {
		dev = d // "cpu" tries the test's logic on a machine without GPUs
	}
	return sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: dev, ContextLength: tpGPUContext, MaxSequences: 1, Extra: ex}}
}

// tpGPUGenerate runs the fixed prompt on m: the first step's logits, the
// greedy continuation, and the timings.
func tpGPUGenerate(t *testing.T, m engine.Model) tpRun {
	ctx := context.Background()
	gm, ok := m.(engine.GreedyModel)
	require.True(t, ok)
	blocks := make([]int32, tpGPUContext/tpGPUBlock)
	for i := range blocks {
		blocks[i] = int32(i)
	}
	prompt := make([]int32, tpGPUPrompt)
	V := m.Spec().VocabSize
	for i := range prompt {
		prompt[i] = int32((i*7919 + 13) % V)
	}
	var run tpRun
	start := time.Now()
	out, err := m.Forward(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt, Blocks: blocks}}})
	require.NoError(t, err)
	run.PrefillTokS = tpGPUPrompt / time.Since(start).Seconds()
	run.Logits = out.Logits[0]
	best := 0
	for i, v := range run.Logits {
		if v > run.Logits[best] {
			best = i
		}
	}
	tok := []int32{int32(best)}
	pos := tpGPUPrompt
	var decode time.Duration
	for i := 0; i < tpGPUSteps+tpGPUTimed; i++ {
		if i < tpGPUSteps {
			run.Tokens = append(run.Tokens, tok[0])
		}
		start = time.Now()
		next, err := gm.ForwardGreedy(ctx, &engine.Batch{Seqs: []engine.SeqInput{{Tokens: tok, Pos: pos, Blocks: blocks}}})
		require.NoError(t, err)
		if i >= tpGPUSteps {
			decode += time.Since(start)
		}
		tok, pos = next[:1], pos+1
	}
	run.DecodeTokS = tpGPUTimed / decode.Seconds()
	return run
}

func TestGPUTensorParallel(t *testing.T) {
	sizeS, path := os.Getenv("ORCH_TP_SIZE"), os.Getenv("ORCH_GPU_MODEL")
	if sizeS == "" || path == "" {
		t.Skip("set ORCH_TP_RANK, ORCH_TP_SIZE, ORCH_TP_ADDR and ORCH_GPU_MODEL (one process per rank)")
	}
	rank, addr := os.Getenv("ORCH_TP_RANK"), os.Getenv("ORCH_TP_ADDR")
	log := hclog.New(&hclog.LoggerOptions{Name: "tp-rank" + rank, Level: hclog.Info, Output: os.Stderr})
	stopped := make(chan error, 1)
	nn.FollowerExit = func(_ hclog.Logger, _ int, err error) { stopped <- err }
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	m, info, err := NewLoader(log)(ctx, tpGPURequest(path, map[string]string{"tp.rank": rank, "tp.size": sizeS, "tp.addr": addr}), nil)
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
	split := tpGPUGenerate(t, m)
	split.WeightBytes, split.KVBytes = info.WeightBytes, info.KVBytes
	require.NoError(t, m.Close())

	whole, winfo, err := NewLoader(log)(ctx, tpGPURequest(path, nil), nil)
	require.NoError(t, err)
	ref := tpGPUGenerate(t, whole)
	ref.WeightBytes, ref.KVBytes = winfo.WeightBytes, winfo.KVBytes
	require.NoError(t, whole.Close())

	e := nntest.MaxRelErr(split.Logits, ref.Logits)
	same := 0
	for same < len(ref.Tokens) && split.Tokens[same] == ref.Tokens[same] {
		same++
	}
	t.Logf("split %s ways vs whole: first-step logits max error / max|logit| %.3g; greedy tokens identical for %d of %d",
		sizeS, e, same, len(ref.Tokens))
	t.Logf("decode one stream: split %.1f tok/s, whole %.1f tok/s; prefill %d tokens: split %.0f tok/s, whole %.0f tok/s",
		split.DecodeTokS, ref.DecodeTokS, tpGPUPrompt, split.PrefillTokS, ref.PrefillTokS)
	t.Logf("rank 0 holds %d of %d weight bytes, %d of %d KV bytes", split.WeightBytes, ref.WeightBytes, split.KVBytes, ref.KVBytes)
	if out := os.Getenv("ORCH_TP_OUT"); out != "" {
		data, err := json.Marshal(map[string]any{"size": sizeS, "split": split, "whole": ref, "max_rel_err": e, "tokens_identical": same})
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(out, data, 0o644))
	}
	assert.LessOrEqual(t, e, 2e-2, "first-step logits")
	assert.Equal(t, ref.Tokens, split.Tokens, "greedy tokens")
}
