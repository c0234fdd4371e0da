package config

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestModelKVCacheFraction(t *testing.T) {
	cfg, err := LoadEnv(writeYAML(t, "models:\n  - path: /m/a.gguf\n    kv_cache_fraction: 0.9\n  - path: /m/b.gguf\n"), nil, nil)
	require.NoError(t, err)
	require.Len(t, cfg.Models, 2)
	assert.Equal(t, 0.9, cfg.Models[0].KVCacheFraction)
	assert.Zero(t, cfg.Models[1].KVCacheFraction, "unset = off")
	_, err = LoadEnv(writeYAML(t, "models:\n  - path: /m/a.gguf\n    kv_cache_fraction: most\n"), nil, nil)
	assert.ErrorContains(t, err, "kv_cache_fraction")
}

// The example config documents every models[] key (the key walk of
// TestExampleConfigLoads does not enter the list: models is empty there).
func TestExampleConfigDocumentsModelKeys(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "configs", "orch-host.yaml"))
	require.NoError(t, err)
	mt := reflect.TypeOf(ModelConfig{})
	for i := 0; i < mt.NumField(); i++ {
		key := mt.Field(i).Tag.Get("koanf")
		assert.Regexp(t, `(?m)^#\s+(- )?`+key+`: `, string(b), "configs/orch-host.yaml does not document models[].%s", key)
	}
}
