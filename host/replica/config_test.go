package replica

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/host/config"
	"github.com/llama-orch/orch/host/placement"
)

// models[].replicas reaches placement.ParseReplicas whether YAML writes it
// as a number or as "all".
func TestConfigReplicas(t *testing.T) {
	path := filepath.Join(t.TempDir(), "orch-host.yaml")
	require.NoError(t, os.WriteFile(path, []byte(`models:
  - path: a.gguf
    replicas: 2
  - path: b.gguf
    replicas: all
  - path: c.gguf
`), 0o644))
	cfg, err := config.LoadEnv(path, nil, nil)
	require.NoError(t, err)
	require.Len(t, cfg.Models, 3)
	want := []placement.Replicas{{N: 2}, {All: true}, {N: 1}}
	for i, mc := range cfg.Models {
		r, err := placement.ParseReplicas(mc.Replicas)
		require.NoError(t, err, mc.Path)
		assert.Equal(t, want[i], r, mc.Path)
	}
}
