package sdk

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
)

// EnvLogLevel is the environment variable through which the host passes its
// log level to adapters (trace, debug, info, warn, error). Adapters log at
// that level so that they do not pay for lines the host would drop.
const EnvLogLevel = "ORCH_LOG_LEVEL"

// ServeOption configures Serve.
type ServeOption func(*serveConfig)

type serveConfig struct {
	logger      hclog.Logger
	test        *plugin.ServeTestConfig
	watchParent bool
	pollEvery   time.Duration
}

// WithLogger replaces the default logger (JSON on stderr, level from
// ORCH_LOG_LEVEL). It must not write to stdout.
func WithLogger(l hclog.Logger) ServeOption { return func(c *serveConfig) { c.logger = l } }

// WithTestConfig serves in go-plugin's test/reattach mode (no handshake on
// stdout, no magic cookie required); for debugging an adapter under a
// debugger and for tests.
func WithTestConfig(tc *plugin.ServeTestConfig) ServeOption {
	return func(c *serveConfig) { c.test = tc }
}

// WithoutParentWatch disables the watchdog that exits the adapter when its
// parent (the host) dies.
func WithoutParentWatch() ServeOption { return func(c *serveConfig) { c.watchParent = false } }

// Serve is the single call an adapter's main makes. It creates the logger
// (hclog, JSON on stderr, so the host shows the lines under the plugin's
// name at their level), calls factory, and serves the adapter over
// go-plugin gRPC (protocol version ProtocolVersion) until the host kills
// it. Panics in request handlers become gRPC Internal errors. Nothing may
// be printed to stdout after the handshake (C and CUDA code included).
//
// Serve returns an error when info is incomplete, when the binary was not
// started by orch-host, or when factory fails; otherwise it does not return
// until the plugin is done.
func Serve(info Info, factory func(hclog.Logger) (Adapter, error), opts ...ServeOption) error {
	cfg := serveConfig{watchParent: true, pollEvery: 500 * time.Millisecond}
	for _, o := range opts {
		o(&cfg)
	}
	if info.Name == "" || len(info.Architectures) == 0 {
		return errors.New("sdk.Serve: Info needs a Name and at least one architecture")
	}
	if factory == nil {
		return errors.New("sdk.Serve: nil factory")
	}
	if cfg.test == nil && os.Getenv(Handshake.MagicCookieKey) != Handshake.MagicCookieValue {
		return fmt.Errorf("orch-adapter-%s is an orch adapter plugin: orch-host launches it (put it next to orch-host or in plugins.dir); it is not meant to be run by hand", info.Name)
	}
	logger := cfg.logger
	if logger == nil {
		// Created before plugin.Serve: it holds the real stderr, which
		// go-plugin later swaps out for a pipe.
		level := hclog.LevelFromString(os.Getenv(EnvLogLevel))
		if level == hclog.NoLevel {
			level = hclog.Info
		}
		logger = hclog.New(&hclog.LoggerOptions{
			Name:       info.Name,
			Output:     os.Stderr,
			JSONFormat: true,
			Level:      level,
		})
	}
	if cfg.test == nil {
		// Before factory: it may initialise native code that prints.
		out, err := protectStdout()
		if err != nil {
			return fmt.Errorf("sdk.Serve: %w", err)
		}
		os.Stdout = out // go-plugin writes the handshake to os.Stdout
	}
	if cfg.test == nil {
		startCPUProfile(logger) // ORCH_CPUPROFILE (cpuprofile.go)
	}
	impl, err := factory(logger)
	if err != nil {
		return fmt.Errorf("create adapter %s: %w", info.Name, err)
	}
	if impl == nil {
		return fmt.Errorf("create adapter %s: factory returned a nil adapter", info.Name)
	}
	if cfg.watchParent && cfg.test == nil {
		go watchParent(logger, cfg.pollEvery)
	}
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: Handshake,
		VersionedPlugins: map[int]plugin.PluginSet{ProtocolVersion: {PluginName: &grpcPlugin{
			reg: func(s *grpc.Server) { RegisterAdapter(s, info, impl, logger) },
		}}},
		GRPCServer: func(o []grpc.ServerOption) *grpc.Server {
			return grpc.NewServer(append(o, ServerOptions(logger)...)...)
		},
		Logger: logger,
		Test:   cfg.test,
	})
	return nil
}

// watchParent exits the process when its parent changes (the host died and
// the adapter was re-parented to init or a subreaper). This is the adapter's
// half of "no adapter outlives the host"; the host also sets Pdeathsig on
// Linux. stdin cannot serve as the signal: go-plugin hands the child the
// host's own stdin.
func watchParent(logger hclog.Logger, every time.Duration) {
	parent := os.Getppid()
	for {
		time.Sleep(every)
		if p := os.Getppid(); p != parent {
			logger.Error("host process is gone; exiting", "parent_pid", parent, "new_parent_pid", p)
			os.Exit(3)
		}
	}
}
