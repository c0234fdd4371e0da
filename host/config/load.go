package config

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strings"

	"github.com/hashicorp/go-hclog"
	"github.com/knadh/koanf/parsers/yaml"
	"github.com/knadh/koanf/providers/env/v2"
	"github.com/knadh/koanf/providers/file"
	"github.com/knadh/koanf/providers/posflag"
	"github.com/knadh/koanf/providers/structs"
	"github.com/knadh/koanf/v2"
	"github.com/spf13/pflag"
)

// EnvPrefix starts every configuration environment variable. Nesting uses
// "__": ORCH_SERVER__ADDR sets server.addr, ORCH_LOG_LEVEL sets log_level.
// List values (server.api_keys) are comma-separated.
const EnvPrefix = "ORCH_"

// NonConfigEnvPrefixes are ORCH_* variables that belong to other parts of
// orch (CUDA library path and kernel switches, NCCL library path, KV-group
// and tensor-parallel switches read by adapters, the decode-graph switch of the runner, the adapters'
// CPU profile, test helpers, plugin handshake) and are not
// configuration keys; Load ignores them instead of rejecting them.
var NonConfigEnvPrefixes = []string{
	"ORCH_TEST_", "ORCH_CUDA_", "ORCH_GPU_", "ORCH_PERF_", "ORCH_PLUGIN_", "ORCH_WRITE_", "ORCH_ABI_",
	"ORCH_NCCL_", "ORCH_KV_", "ORCH_TP_", "ORCH_CPUPROFILE", "ORCH_GRAPH_",
}

// DefaultSearchPaths are tried in order when Load gets no path.
var DefaultSearchPaths = []string{"orch-host.yaml", "configs/orch-host.yaml"}

// FlagKeys maps command-line flag names to configuration keys. Flags not
// listed map by rule: kebab-case to snake_case ("log-level" -> log_level)
// when that is a top-level key; other flags (command options such as
// --json or --out) are not configuration and are ignored by Load.
var FlagKeys = map[string]string{
	"log-level":   "log_level",
	"addr":        "server.addr",
	"max-queue":   "server.max_queue",
	"api-key":     "server.api_keys",
	"plugins-dir": "plugins.dir",
}

// Default returns the built-in defaults.
func Default() *Config {
	return &Config{
		LogLevel: "info",
		Server:   ServerConfig{Addr: "127.0.0.1:8080", MaxQueue: 64},
	}
}

// Load builds the configuration: defaults, then the YAML file (path; when
// empty the first of DefaultSearchPaths that exists, else none), then ORCH_*
// environment variables, then the flags the user set. Unknown keys in the
// file or the environment are errors naming the key.
func Load(path string, flags *pflag.FlagSet) (*Config, error) {
	return LoadEnv(path, flags, os.Environ())
}

// LoadEnv is Load with an explicit environment (KEY=VALUE strings).
func LoadEnv(path string, flags *pflag.FlagSet, environ []string) (*Config, error) {
	cfg, _, err := load(path, flags, environ)
	return cfg, err
}

// Source reports which file Load used ("" for none).
func Source(path string) string {
	if path != "" {
		return path
	}
	for _, p := range DefaultSearchPaths {
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p
		}
	}
	return ""
}

func load(path string, flags *pflag.FlagSet, environ []string) (*Config, string, error) {
	k := koanf.New(".")
	if err := k.Load(structs.Provider(Default(), "koanf"), nil); err != nil {
		return nil, "", fmt.Errorf("config: defaults: %w", err)
	}
	src := Source(path)
	if src != "" {
		fk := koanf.New(".")
		if err := fk.Load(file.Provider(src), yaml.Parser()); err != nil {
			return nil, "", fmt.Errorf("config: %s: %w", src, err)
		}
		if err := checkKeys(fk.Raw(), reflect.TypeOf(Config{}), ""); err != nil {
			return nil, "", fmt.Errorf("config: %s: %w", src, err)
		}
		if err := k.Merge(fk); err != nil {
			return nil, "", fmt.Errorf("config: %s: %w", src, err)
		}
	}
	// environment
	var envErr error
	ek := koanf.New(".")
	err := ek.Load(env.Provider(".", env.Opt{
		Prefix:      EnvPrefix,
		EnvironFunc: func() []string { return environ },
		TransformFunc: func(name, value string) (string, any) {
			for _, p := range NonConfigEnvPrefixes {
				if strings.HasPrefix(name, p) {
					return "", nil
				}
			}
			key := strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(name, EnvPrefix), "__", "."))
			ft, ok := fieldType(reflect.TypeOf(Config{}), key)
			if !ok {
				if envErr == nil {
					envErr = fmt.Errorf("config: unknown environment variable %s (no configuration key %q)", name, key)
				}
				return "", nil
			}
			if ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.String {
				var parts []string
				for _, s := range strings.Split(value, ",") {
					if s = strings.TrimSpace(s); s != "" {
						parts = append(parts, s)
					}
				}
				return key, parts
			}
			return key, value
		},
	}), nil)
	if err != nil {
		return nil, "", fmt.Errorf("config: environment: %w", err)
	}
	if envErr != nil {
		return nil, "", envErr
	}
	if err := k.Merge(ek); err != nil {
		return nil, "", fmt.Errorf("config: environment: %w", err)
	}
	// flags the user set
	if flags != nil {
		err := k.Load(posflag.ProviderWithFlag(flags, ".", k, func(f *pflag.Flag) (string, any) {
			if !f.Changed {
				return "", nil
			}
			key, ok := FlagKeys[f.Name]
			if !ok {
				key = strings.ReplaceAll(f.Name, "-", "_")
				if _, known := fieldType(reflect.TypeOf(Config{}), key); !known {
					return "", nil
				}
			}
			return key, posflag.FlagVal(flags, f)
		}), nil)
		if err != nil {
			return nil, "", fmt.Errorf("config: flags: %w", err)
		}
	}
	cfg := &Config{}
	if err := k.UnmarshalWithConf("", cfg, koanf.UnmarshalConf{Tag: "koanf"}); err != nil {
		return nil, "", fmt.Errorf("config: %w", err)
	}
	if err := cfg.Validate(); err != nil {
		if src != "" {
			return nil, "", fmt.Errorf("config (%s): %w", src, err)
		}
		return nil, "", fmt.Errorf("config: %w", err)
	}
	return cfg, src, nil
}

// Validate checks values that the types alone do not.
func (c *Config) Validate() error {
	var errs []error
	switch strings.ToLower(c.LogLevel) {
	case "trace", "debug", "info", "warn", "error", "off":
	default:
		errs = append(errs, fmt.Errorf("log_level %q is not one of trace, debug, info, warn, error, off", c.LogLevel))
	}
	if c.Server.Addr == "" {
		errs = append(errs, errors.New("server.addr is empty"))
	}
	if c.Server.MaxQueue < 0 {
		errs = append(errs, fmt.Errorf("server.max_queue %d is negative", c.Server.MaxQueue))
	}
	for i, m := range c.Models {
		if m.Path == "" {
			errs = append(errs, fmt.Errorf("models[%d].path is empty", i))
		}
		switch m.Device {
		case "", "auto", "cpu", "cuda":
		default:
			errs = append(errs, fmt.Errorf("models[%d].device %q is not one of auto, cpu, cuda", i, m.Device))
		}
		if m.TensorParallel < 0 {
			errs = append(errs, fmt.Errorf("models[%d].tensor_parallel %d is negative (0 or 1: unsplit, N >= 2: N ranks)", i, m.TensorParallel))
		}
	}
	return errors.Join(errs...)
}

// HclogLevel is the configured log level for hclog.
func (c *Config) HclogLevel() hclog.Level {
	if c.LogLevel == "" {
		return hclog.Info
	}
	return hclog.LevelFromString(c.LogLevel)
}

// fieldType finds the Go type of a dotted key in struct t (koanf tags).
// Any key below a map field is accepted.
func fieldType(t reflect.Type, key string) (reflect.Type, bool) {
	parts := strings.Split(key, ".")
	for i, p := range parts {
		for t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		switch t.Kind() {
		case reflect.Struct:
			f, ok := fieldByTag(t, p)
			if !ok {
				return nil, false
			}
			t = f.Type
		case reflect.Map:
			_ = i
			return t.Elem(), true
		default:
			return nil, false
		}
	}
	return t, true
}

func fieldByTag(t reflect.Type, tag string) (reflect.StructField, bool) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if name := strings.Split(f.Tag.Get("koanf"), ",")[0]; name == tag {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

// checkKeys walks a decoded YAML tree and reports the first key that has no
// field in t (sorted, so the error is deterministic).
func checkKeys(m map[string]any, t reflect.Type, prefix string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		full := prefix + k
		var ft reflect.Type
		switch t.Kind() {
		case reflect.Struct:
			f, ok := fieldByTag(t, k)
			if !ok {
				return fmt.Errorf("unknown key %q", full)
			}
			ft = f.Type
		case reflect.Map:
			ft = t.Elem()
		default:
			return fmt.Errorf("key %q: %s takes a value, not a map", full, strings.TrimSuffix(prefix, "."))
		}
		if err := checkValue(m[k], ft, full); err != nil {
			return err
		}
	}
	return nil
}

func checkValue(v any, t reflect.Type, path string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch x := v.(type) {
	case map[string]any:
		if t.Kind() != reflect.Struct && t.Kind() != reflect.Map {
			return fmt.Errorf("key %q: expected a %s, got a map", path, t.Kind())
		}
		return checkKeys(x, t, path+".")
	case []any:
		if t.Kind() != reflect.Slice {
			return fmt.Errorf("key %q: expected a %s, got a list", path, t.Kind())
		}
		for i, e := range x {
			if err := checkValue(e, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	}
	return nil
}
