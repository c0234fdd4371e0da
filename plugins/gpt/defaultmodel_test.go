package gpt

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
	"github.com/llama-orch/orch/sdk/tokenizer"
)

// The embedded default model is a real trained GPT-2 (host/defaultmodel);
// its training script recorded PyTorch's greedy continuations of the exported
// GGUF weights in train/results/samples.txt. Ours must produce the same text.
func TestDefaultModelGreedyMatchesPyTorch(t *testing.T) {
	const path = "../../host/defaultmodel/model.gguf"
	tok, err := tokenizer.Open(path)
	if err != nil {
		t.Skipf("default model not available: %v", err)
	}
	m, err := Load(path, Options{Backend: cpu.New(0), NumBlocks: 16, BlockSize: 16, ContextLength: 256})
	require.NoError(t, err)
	defer m.Close()
	for _, tc := range []struct{ prompt, want string }{
		{"Elizabeth could not help", " thinking of it, and she was not sorry to be able to make her happy."},
		{"User: What do you think of Mr. Darcy?\nAssistant:", " Yes, very well."},
	} {
		ids := tok.Encode(tc.prompt, tokenizer.EncodeOptions{})
		start := time.Now()
		gen := nntest.Greedy(t, m, ids, 16)
		el := time.Since(start)
		text := tok.Decode(gen)
		t.Logf("%q -> %q (%d tokens in %v)", tc.prompt, text, len(gen), el)
		assert.True(t, strings.HasPrefix(text, tc.want) || strings.HasPrefix(tc.want, text), "got %q, PyTorch greedy %q", text, tc.want)
	}
}
