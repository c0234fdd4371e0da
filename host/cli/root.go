// Package cli holds orch-host's cobra commands. Each subcommand lives in its
// own file and registers itself with register() from an init function, so
// that commands can be added without touching this file.
package cli

import (
	"github.com/spf13/cobra"
)

var subcommands []func() *cobra.Command

// register adds a subcommand constructor; call it from init().
func register(f func() *cobra.Command) { subcommands = append(subcommands, f) }

// Version is set at build time with -ldflags "-X github.com/llama-orch/orch/host/cli.Version=...".
var Version = "dev"

// NewRoot builds the orch-host command tree.
func NewRoot() *cobra.Command {
	root := &cobra.Command{
		Use:   "orch-host",
		Short: "orch: a plugin-based LLM inference runtime",
		Long: `orch-host serves GGUF language models through an OpenAI-compatible HTTP API.
It reads a model's metadata, picks the adapter plugin that declares its
architecture (orch-adapter-* binaries), loads the model on the GPU (or the CPU
when there is none) and serves it.`,
		Version:       Version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().String("config", "", "configuration file (default: ./orch-host.yaml or configs/orch-host.yaml if present)")
	root.PersistentFlags().String("log-level", "", "log level: trace, debug, info, warn, error")
	for _, f := range subcommands {
		root.AddCommand(f())
	}
	return root
}
