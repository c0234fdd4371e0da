package cli

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/llama-orch/orch/host/plugins"
)

func init() { register(newPluginsCmd) }

func newPluginsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "plugins",
		Short: "List installed adapter plugins (orch-adapter-*)",
		Long: `plugins lists the adapter plugins orch-host can use: orch-adapter-* binaries
next to orch-host and in plugins.dir. Each is started briefly and asked to
describe itself; the table shows its name, version, the GGUF architectures it
serves and its path.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			log := newLoggerTo(cfg, cmd.ErrOrStderr())
			dirs := plugins.DefaultDirs(cfg.Plugins.Dir)
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
	cmd.Flags().String("plugins-dir", "", "extra directory to scan for orch-adapter-* binaries (plugins.dir)")
	return cmd
}
