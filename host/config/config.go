// Package config holds orch-host's configuration: defaults, then a YAML
// file, then ORCH_* environment variables (__ for nesting), then the flags
// the user actually set. Unknown keys are errors.
//
// Each section's struct lives in its own file (plugins.go, server.go, ...);
// koanf tags are snake_case.
package config

// Config is the whole orch-host configuration.
type Config struct {
	LogLevel string        `koanf:"log_level"`
	Plugins  PluginsConfig `koanf:"plugins"`
	Models   []ModelConfig `koanf:"models"`
	Server   ServerConfig  `koanf:"server"`
}

// ModelConfig is one model to serve.
type ModelConfig struct {
	Path          string `koanf:"path"`
	Name          string `koanf:"name"`    // served model id; default: file name without .gguf
	Adapter       string `koanf:"adapter"` // pin an adapter by name (overrides plugins.architectures)
	Device        string `koanf:"device"`  // auto, cpu, cuda
	ContextLength int    `koanf:"context_length"`
	MaxSequences  int    `koanf:"max_sequences"`
	// KVCacheFraction: share of the device's free memory (after weights and
	// workspace, at load) given to the KV cache, in (0, 1]; 0 = the pool
	// holds context_length tokens for each of max_sequences sequences.
	KVCacheFraction float64 `koanf:"kv_cache_fraction"`
	// Replicas: adapter processes for this model, one per GPU: a number or
	// "all" (every GPU the model fits); "" = 1. Parsed by
	// placement.ParseReplicas; see docs/multi-gpu.md.
	Replicas string `koanf:"replicas"`
	// TensorParallel: split the model over this many ranks (one adapter
	// process each, on its own GPU; on the CPU with device cpu) even when it
	// fits one GPU; 0 or 1 = split only when the model fits no GPU and the
	// adapter can. On GPUs a power of two no larger than the GPU count; not
	// combinable with replicas > 1. See docs/multi-gpu.md.
	TensorParallel int `koanf:"tensor_parallel"`
}
