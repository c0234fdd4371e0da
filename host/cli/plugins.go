package cli

import (
	"fmt"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"

	"github.com/llama-orch/orch/host/plugins"
)

func init() { register(newPluginsCmd) }

// pluginsDirHook returns the configured plugins.dir; the integrator points it
// at the loaded configuration (host/cli/common.go). Until then the
// --plugins-dir flag and ORCH_PLUGINS__DIR are honoured.
var pluginsDirHook = func(cmd *cobra.Command) (string, error) { return os.Getenv("ORCH_PLUGINS__DIR"), nil }

func newPluginsCmd() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "plugins",
		Short: "List installed adapter plugins (orch-adapter-*)",
		Long: `plugins lists the adapter plugins orch-host can use: orch-adapter-* binaries
next to orch-host and in plugins.dir. Each is started briefly and asked to
describe itself; the table shows its name, version, the GGUF architectures it
serves and its path.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				d, err := pluginsDirHook(cmd)
				if err != nil {
					return err
				}
				dir = d
			}
			level := hclog.Warn
			if l, _ := cmd.Flags().GetString("log-level"); l != "" {
				level = hclog.LevelFromString(l)
			}
			log := hclog.New(&hclog.LoggerOptions{Name: "orch-host", Level: level, Output: cmd.ErrOrStderr()})
			dirs := plugins.DefaultDirs(dir)
			found, err := plugins.Scan(dirs, log)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if len(found) == 0 {
				fmt.Fprintf(out, "no adapters found in %s\n", strings.Join(dirs, ", "))
				return nil
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tVERSION\tARCHITECTURES\tPATH")
			for _, p := range found {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Name, p.Info.Version, strings.Join(p.Info.Architectures, ","), p.Path)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&dir, "plugins-dir", "", "extra directory to scan for orch-adapter-* binaries (plugins.dir)")
	return cmd
}
