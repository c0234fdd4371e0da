package config

// PluginsConfig says where adapters are found and which serves what.
type PluginsConfig struct {
	// Dir is an extra directory to scan for orch-adapter-* binaries (the directory of orch-host is always scanned).
	Dir string `koanf:"dir"`
	// Architectures pins an adapter name per GGUF architecture, e.g. {"llama": "llama"}.
	Architectures map[string]string `koanf:"architectures"`
}
