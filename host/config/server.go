package config

// ServerConfig configures the HTTP API.
type ServerConfig struct {
	Addr     string   `koanf:"addr"`
	APIKeys  []string `koanf:"api_keys"`
	MaxQueue int      `koanf:"max_queue"`
}
