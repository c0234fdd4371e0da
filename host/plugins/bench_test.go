package plugins

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/example"
)

// BenchmarkGenerateOverPluginWire measures the plugin boundary: one token
// per chunk from the example adapter (no step delay) in a real process,
// over go-plugin gRPC with AutoMTLS. ns/op is the per-token cost.
func BenchmarkGenerateOverPluginWire(b *testing.B) {
	log := hclog.NewNullLogger()
	ctx := context.Background()
	ps, err := Scan([]string{binDir}, log)
	require.NoError(b, err)
	p, err := Select(ps, "example-counter", "")
	require.NoError(b, err)
	inst, err := Launch(ctx, p, LaunchOptions{Logger: log})
	require.NoError(b, err)
	defer func() { _ = inst.Close(ctx) }()
	path := filepath.Join(b.TempDir(), "m.json")
	require.NoError(b, example.WriteModel(path, example.ModelFile{Architecture: "example-counter", VocabSize: 1000, ContextLength: 1 << 30}))
	_, err = inst.Load(ctx, sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Extra: map[string]string{"step_delay": "0s"}}}, nil)
	require.NoError(b, err)
	b.ResetTimer()
	n := 0
	err = inst.Generate(ctx, sdk.GenerateRequest{Prompt: []int32{1}, MaxTokens: b.N}, func(c sdk.Chunk) error {
		n += len(c.Tokens)
		return nil
	})
	require.NoError(b, err)
	require.Equal(b, b.N, n)
}
