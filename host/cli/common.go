package cli

import (
	"io"
	"os"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/llama-orch/orch/host/config"
)

// loadConfig loads the configuration for a command: --config (or the
// default search paths), ORCH_* variables, then the flags the user set on
// the command line (see config.FlagKeys for the flag -> key mapping).
func loadConfig(cmd *cobra.Command) (*config.Config, error) {
	path, _ := cmd.Flags().GetString("config")
	return config.Load(path, cmd.Flags())
}

// newLogger returns orch-host's logger at the configured level on stderr.
func newLogger(cfg *config.Config) hclog.Logger {
	return newLoggerTo(cfg, os.Stderr)
}

func newLoggerTo(cfg *config.Config, w io.Writer) hclog.Logger {
	level := hclog.Info
	if cfg != nil {
		level = cfg.HclogLevel()
	}
	return hclog.New(&hclog.LoggerOptions{
		Name:   "orch-host",
		Level:  level,
		Output: w,
		Color:  hclog.AutoColor,
	})
}

// isTerminal reports whether w is a terminal (progress bars) rather than a
// file or pipe (log lines).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}
