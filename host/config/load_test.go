package config

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/knadh/koanf/parsers/yaml"
	"github.com/knadh/koanf/providers/file"
	"github.com/knadh/koanf/v2"
	"github.com/spf13/pflag"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func writeYAML(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "orch-host.yaml")
	require.NoError(t, os.WriteFile(p, []byte(body), 0o644))
	return p
}

func TestDefaults(t *testing.T) {
	t.Chdir(t.TempDir()) // no orch-host.yaml around
	cfg, err := LoadEnv("", nil, nil)
	require.NoError(t, err)
	assert.Equal(t, "127.0.0.1:8080", cfg.Server.Addr)
	assert.Equal(t, 64, cfg.Server.MaxQueue)
	assert.Equal(t, "info", cfg.LogLevel)
	assert.Empty(t, cfg.Models)
}

func TestExampleConfigLoads(t *testing.T) {
	path := filepath.Join("..", "..", "configs", "orch-host.yaml")
	cfg, err := LoadEnv(path, nil, nil)
	require.NoError(t, err)
	assert.Equal(t, Default().Server.Addr, cfg.Server.Addr)
	assert.Equal(t, Default().Server.MaxQueue, cfg.Server.MaxQueue)
	assert.Empty(t, cfg.Server.APIKeys)
	assert.Equal(t, "info", cfg.LogLevel)

	// the example names every key of every section
	k := koanf.New(".")
	require.NoError(t, k.Load(file.Provider(path), yaml.Parser()))
	var walk func(t2 reflect.Type, prefix string)
	walk = func(t2 reflect.Type, prefix string) {
		for i := 0; i < t2.NumField(); i++ {
			f := t2.Field(i)
			key := prefix + f.Tag.Get("koanf")
			if f.Type.Kind() == reflect.Struct {
				walk(f.Type, key+".")
				continue
			}
			assert.True(t, k.Exists(key), "configs/orch-host.yaml lacks %s", key)
		}
	}
	walk(reflect.TypeOf(Config{}), "")
}

func TestLayers(t *testing.T) {
	path := writeYAML(t, `
log_level: debug
server:
  addr: 0.0.0.0:9000
  max_queue: 10
  api_keys: [a, b]
plugins:
  dir: /opt/orch
  architectures:
    gpt-oss: gpt
models:
  - path: /m/a.gguf
    device: cuda
    context_length: 4096
`)
	cfg, err := LoadEnv(path, nil, nil)
	require.NoError(t, err)
	assert.Equal(t, "debug", cfg.LogLevel)
	assert.Equal(t, "0.0.0.0:9000", cfg.Server.Addr)
	assert.Equal(t, 10, cfg.Server.MaxQueue)
	assert.Equal(t, []string{"a", "b"}, cfg.Server.APIKeys)
	assert.Equal(t, "gpt", cfg.Plugins.Architectures["gpt-oss"])
	require.Len(t, cfg.Models, 1)
	assert.Equal(t, 4096, cfg.Models[0].ContextLength)
	assert.Equal(t, "cuda", cfg.Models[0].Device)

	// env overrides the file
	env := []string{"ORCH_SERVER__MAX_QUEUE=128", "ORCH_LOG_LEVEL=warn", "ORCH_SERVER__API_KEYS=x, y", "ORCH_CUDA_LIB=/x.so", "PATH=/bin"}
	cfg, err = LoadEnv(path, nil, env)
	require.NoError(t, err)
	assert.Equal(t, 128, cfg.Server.MaxQueue)
	assert.Equal(t, "warn", cfg.LogLevel)
	assert.Equal(t, []string{"x", "y"}, cfg.Server.APIKeys)
	assert.Equal(t, "0.0.0.0:9000", cfg.Server.Addr, "file value kept")

	// flags the user set override env; unset flags do not
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	fs.String("log-level", "", "")
	fs.String("addr", "ignored-default", "")
	fs.Int("max-queue", 1, "")
	fs.Bool("json", false, "") // not configuration
	require.NoError(t, fs.Parse([]string{"--log-level=error", "--max-queue=5", "--json"}))
	cfg, err = LoadEnv(path, fs, env)
	require.NoError(t, err)
	assert.Equal(t, "error", cfg.LogLevel)
	assert.Equal(t, 5, cfg.Server.MaxQueue)
	assert.Equal(t, "0.0.0.0:9000", cfg.Server.Addr)
}

func TestUnknownKeys(t *testing.T) {
	cases := map[string]string{
		"top":    "lgo_level: info\n",
		"nested": "server:\n  adr: x\n",
		"model":  "models:\n  - path: a\n    devcie: cpu\n",
	}
	want := map[string]string{"top": `"lgo_level"`, "nested": `"server.adr"`, "model": `"models[0].devcie"`}
	for name, body := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := LoadEnv(writeYAML(t, body), nil, nil)
			require.Error(t, err)
			assert.ErrorContains(t, err, want[name])
		})
	}
	t.Chdir(t.TempDir())
	_, err := LoadEnv("", nil, []string{"ORCH_SERVER__ADRR=x"})
	assert.ErrorContains(t, err, "ORCH_SERVER__ADRR")
	_, err = LoadEnv("", nil, []string{"ORCH_LOGLEVEL=x"})
	assert.ErrorContains(t, err, "ORCH_LOGLEVEL")
}

func TestBadValues(t *testing.T) {
	_, err := LoadEnv(writeYAML(t, "log_level: loud\n"), nil, nil)
	assert.ErrorContains(t, err, "log_level")
	_, err = LoadEnv(writeYAML(t, "server:\n  max_queue: many\n"), nil, nil)
	assert.ErrorContains(t, err, "max_queue")
	_, err = LoadEnv(writeYAML(t, "models:\n  - name: x\n"), nil, nil)
	assert.ErrorContains(t, err, "models[0].path")
	_, err = LoadEnv(filepath.Join(t.TempDir(), "missing.yaml"), nil, nil)
	assert.Error(t, err)
	_, err = LoadEnv(writeYAML(t, "server: [1\n"), nil, nil)
	assert.Error(t, err)
}

func TestTensorParallelKey(t *testing.T) {
	cfg, err := LoadEnv(writeYAML(t, "models:\n  - path: a.gguf\n    tensor_parallel: 2\n  - path: b.gguf\n"), nil, nil)
	require.NoError(t, err)
	require.Len(t, cfg.Models, 2)
	assert.Equal(t, 2, cfg.Models[0].TensorParallel)
	assert.Equal(t, 0, cfg.Models[1].TensorParallel)

	_, err = LoadEnv(writeYAML(t, "models:\n  - path: a.gguf\n    tensor_parallel: -2\n"), nil, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "models[0].tensor_parallel -2 is negative")
}
