package gpt

import (
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// gpt-oss's Hidden discards q, k and h after the last layer (ml.Discarder):
// with the discarded tensors poisoned, prefill, decode (captured and
// replayed) and mixed batches match a model on a plain CPU backend, so
// nothing reads them.
func TestDiscardUnread(t *testing.T) {
	rb := nntest.NewReplay(cpu.New(2))
	rb.PoisonDiscards = true
	c := nntest.Tiny("gpt-oss")
	ref := load(t, c, Options{MaxTokens: 16})
	m := load(t, c, Options{Backend: rb, MaxTokens: 16})
	nntest.CompareModels(t, ref, m, 21, 1e-6)
	assert.Positive(t, rb.Discards)
	assert.Positive(t, rb.Replays)
}
