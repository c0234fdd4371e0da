package gpt

import (
	"testing"

	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// gpt-oss's Hidden discards q, k and h after the last layer (ml.Discarder):
// nothing reads them (nntest.CheckDiscardsUnread).
func TestDiscardUnread(t *testing.T) {
	nntest.CheckDiscardsUnread(t, "gpt-oss", func(c nntest.Config, b ml.Backend) engine.Model {
		return load(t, c, Options{Backend: b, MaxTokens: 16})
	})
}
