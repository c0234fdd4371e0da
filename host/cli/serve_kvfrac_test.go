package cli

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/host/config"
	"github.com/llama-orch/orch/host/plugins"
)

func TestLoadOptionsKVCacheFraction(t *testing.T) {
	o := loadOptions(config.ModelConfig{Path: "/m/a.gguf", Device: "cuda", ContextLength: 512, MaxSequences: 3, KVCacheFraction: 0.9})
	assert.Equal(t, "cuda", o.Device)
	assert.Equal(t, 512, o.ContextLength)
	assert.Equal(t, 3, o.MaxSequences)
	assert.Equal(t, 0.9, o.KVCacheFraction)
}

// serveModels runs `serve args...` with serveOpenModel replaced by one that
// records the models it is asked to load and fails (so serve returns).
func serveModels(t *testing.T, args ...string) ([]config.ModelConfig, error) {
	t.Helper()
	old := serveOpenModel
	t.Cleanup(func() { serveOpenModel = old })
	var mu sync.Mutex
	var got []config.ModelConfig
	serveOpenModel = func(_ context.Context, _ *config.Config, _ []plugins.Plugin, mc config.ModelConfig, _ hclog.Logger) (loadedModel, error) {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, mc)
		return loadedModel{}, errors.New("not loading in this test")
	}
	root := NewRoot()
	root.SetArgs(append([]string{"serve", "--addr", "127.0.0.1:0", "--log-level", "error"}, args...))
	root.SetOut(&syncBuf{})
	root.SetErr(&syncBuf{})
	err := root.Execute()
	mu.Lock()
	defer mu.Unlock()
	return got, err
}

func TestServeKVCacheFractionFlag(t *testing.T) {
	cfgPath := filepath.Join(t.TempDir(), "orch-host.yaml")
	require.NoError(t, os.WriteFile(cfgPath, []byte("models:\n  - path: /m/a.gguf\n    kv_cache_fraction: 0.5\n  - path: /m/b.gguf\n"), 0o644))

	// from the config
	got, err := serveModels(t, "--config", cfgPath)
	require.ErrorContains(t, err, "not loading in this test")
	require.NotEmpty(t, got)
	for _, mc := range got { // models may load concurrently: by path
		want := map[string]float64{"/m/a.gguf": 0.5, "/m/b.gguf": 0}[mc.Path]
		assert.Equal(t, want, mc.KVCacheFraction, mc.Path)
	}

	// a flag the user sets overrides the config for every model
	got, err = serveModels(t, "--config", cfgPath, "--kv-cache-fraction", "0.8")
	require.ErrorContains(t, err, "not loading in this test")
	require.NotEmpty(t, got)
	for _, mc := range got {
		assert.Equal(t, 0.8, mc.KVCacheFraction, mc.Path)
	}
	got, err = serveModels(t, "--model", "/m/c.gguf", "--kv-cache-fraction", "0.25")
	require.ErrorContains(t, err, "not loading in this test")
	require.Len(t, got, 1)
	assert.Equal(t, 0.25, got[0].KVCacheFraction)

	// out of range: refused before anything is loaded, naming the option
	for _, bad := range []string{"1.5", "-0.1"} {
		got, err = serveModels(t, "--model", "/m/c.gguf", "--kv-cache-fraction", bad)
		require.ErrorContains(t, err, "kv_cache_fraction")
		assert.Empty(t, got)
	}
	require.NoError(t, os.WriteFile(cfgPath, []byte("models:\n  - path: /m/a.gguf\n    kv_cache_fraction: 2\n"), 0o644))
	got, err = serveModels(t, "--config", cfgPath)
	require.ErrorContains(t, err, "kv_cache_fraction 2")
	assert.Empty(t, got)
}
