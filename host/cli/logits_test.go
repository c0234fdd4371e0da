package cli

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/plugins/gpt"
	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/adaptertest"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/nn/nntest"
)

// The command goes through the Evaluate RPC of a real adapter (the GPT
// adapter over an in-process gRPC connection) and writes what the model
// computes, row for row.
func TestLogitsCommandWritesNPY(t *testing.T) {
	model := nntest.MustWrite(t, nntest.Tiny("gpt2"))
	old := logitsAdapter
	t.Cleanup(func() { logitsAdapter = old })
	logitsAdapter = func(ctx context.Context, cmd *cobra.Command, path, pin string, log hclog.Logger) (sdk.Adapter, func() error, error) {
		a := adaptertest.Connect(t, gpt.Info(), gpt.New(log), log)
		return a, func() error { return nil }, nil
	}
	out := filepath.Join(t.TempDir(), "x.npy")
	root := NewRoot()
	var stdout, stderr bytes.Buffer
	root.SetOut(&stdout)
	root.SetErr(&stderr)
	root.SetArgs([]string{"logits", "--model", model, "--tokens", "5, 7,11,13", "--out", out, "--device", "cpu", "--log-level", "warn"})
	require.NoError(t, root.Execute(), stderr.String())
	assert.Contains(t, stdout.String(), "float32 [4, 300]")

	shape, got, err := nntest.ReadNPY(out)
	require.NoError(t, err)
	require.Equal(t, []int{4, 300}, shape)

	m, err := gpt.Load(model, gpt.Options{Backend: cpu.New(0), NumBlocks: 4, BlockSize: 4})
	require.NoError(t, err)
	defer m.Close()
	want := nntest.Prefill(t, m, []int32{5, 7, 11, 13}, []int32{0})
	assert.Equal(t, want, got)

	// without --out: the top logits per position
	stdout.Reset()
	root = NewRoot()
	root.SetOut(&stdout)
	root.SetErr(&stderr)
	root.SetArgs([]string{"logits", "--model", model, "--tokens", "5,7", "--top", "3", "--device", "cpu", "--log-level", "warn"})
	require.NoError(t, root.Execute(), stderr.String())
	assert.Contains(t, stdout.String(), "pos 1 (token 7):")
}

func TestLogitsCommandErrors(t *testing.T) {
	for _, args := range [][]string{
		{"logits", "--tokens", "1"},
		{"logits", "--model", "x.gguf", "--tokens", "1,a"},
		{"logits", "--model", "x.gguf", "--tokens", ""},
		{"logits", "--model", "/nonexistent.gguf", "--tokens", "1"},
	} {
		root := NewRoot()
		root.SetOut(&bytes.Buffer{})
		root.SetErr(&bytes.Buffer{})
		root.SetArgs(args)
		assert.Error(t, root.Execute(), "%v", args)
	}
	ids, err := parseTokenList(" 1,2 ,3")
	require.NoError(t, err)
	assert.Equal(t, []int32{1, 2, 3}, ids)
}

func TestWriteNPYHeader(t *testing.T) {
	var b bytes.Buffer
	require.NoError(t, writeNPY(&b, []float32{1, 2, 3, 4, 5, 6}, 2, 3))
	raw := b.Bytes()
	assert.Equal(t, "\x93NUMPY\x01\x00", string(raw[:8]))
	hl := int(raw[8]) | int(raw[9])<<8
	assert.Zero(t, (10+hl)%64, "data starts 64-byte aligned")
	assert.Equal(t, byte('\n'), raw[10+hl-1])
	assert.Len(t, raw, 10+hl+24)
	assert.Error(t, writeNPY(&b, []float32{1}, 2, 3))
}
