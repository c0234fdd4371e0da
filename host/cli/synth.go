package cli

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/llama-orch/orch/sdk/synth"
)

func init() { register(newSynthCmd) }

func newSynthCmd() *cobra.Command {
	var arch, size, out string
	var seed uint64
	var workers int
	var dryRun bool
	var presetLines []string
	for _, a := range synth.Archs() {
		presetLines = append(presetLines, fmt.Sprintf("  %-8s %s", a, strings.Join(synth.Sizes(a), ", ")))
	}
	cmd := &cobra.Command{
		Use:   "synth --arch ARCH --size PRESET --out FILE [--seed N]",
		Short: "Write a random-weight GGUF model (tests and benchmarks)",
		Long: `synth writes a model with random weights and llama.cpp's exact tensor names,
shapes, dtypes and metadata for its architecture, plus a tokenizer. The same
seed always gives the same bytes. Presets:

` + strings.Join(presetLines, "\n") + `

tiny presets are a few hundred KB for unit tests (tiny-swa: gpt-oss with a
sliding window of 8); small presets carry the real vocabularies; 20b,
llama3-8b and 124m have the real models' shapes (gpt-oss 20b: 11.3 GiB, MXFP4
experts). --dry-run prints the plan without writing.`,
		Example: `  orch-host synth --arch gpt-oss --size tiny --out tiny.gguf
  orch-host synth --arch gpt-oss --size 20b --out /data/gpt-oss-20b.gguf --seed 1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" && !dryRun {
				return errors.New("synth: --out is required")
			}
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			log := newLoggerTo(cfg, cmd.ErrOrStderr())
			opts := synth.Options{Arch: arch, Size: size, Seed: seed, Workers: workers}
			plan, err := synth.NewPlan(opts)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "%s %s: %d layers, %d wide, vocab %d, %d tensors, %s parameters, %s\n",
				arch, size, plan.Config.Layers, plan.Config.Embd, plan.Config.VocabSize, len(plan.Tensors),
				humanCount(plan.Params), humanBytes(plan.Bytes))
			if dryRun {
				return nil
			}
			progress, finish := progressReporter(cmd, log, "synth "+arch+" "+size, plan.Bytes)
			start := time.Now()
			err = plan.WriteTo(out, progress)
			finish()
			if err != nil {
				return err
			}
			secs := time.Since(start).Seconds()
			fmt.Fprintf(w, "wrote %s (%s in %.1fs, %.0f MB/s)\n", out, humanBytes(plan.Bytes), secs, float64(plan.Bytes)/1e6/max(secs, 1e-9))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&arch, "arch", "", "architecture: "+strings.Join(synth.Archs(), ", "))
	f.StringVar(&size, "size", "tiny", "preset (see above)")
	f.StringVar(&out, "out", "", "output GGUF file")
	f.Uint64Var(&seed, "seed", 1, "random seed")
	f.IntVar(&workers, "workers", 0, "generator goroutines (0 = all CPUs)")
	f.BoolVar(&dryRun, "dry-run", false, "print the plan (shapes, sizes) without writing")
	_ = cmd.MarkFlagRequired("arch")
	return cmd
}

// progressReporter shows a progress bar on a terminal and otherwise logs a
// line at most every 5 seconds.
func progressReporter(cmd *cobra.Command, log hclog.Logger, what string, total int64) (func(done, total int64), func()) {
	errw := cmd.ErrOrStderr()
	if isTerminal(errw) {
		bar := progressbar.NewOptions64(total,
			progressbar.OptionSetWriter(errw),
			progressbar.OptionSetDescription(what),
			progressbar.OptionShowBytes(true),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish(),
		)
		var mu sync.Mutex
		return func(done, _ int64) {
				mu.Lock()
				_ = bar.Set64(done)
				mu.Unlock()
			}, func() {
				_ = bar.Finish()
			}
	}
	var last time.Time
	start := time.Now()
	return func(done, total int64) {
		if time.Since(last) < 5*time.Second && done != total {
			return
		}
		last = time.Now()
		log.Info(what, "done_bytes", done, "total_bytes", total,
			"percent", fmt.Sprintf("%.1f", 100*float64(done)/float64(max(total, 1))),
			"elapsed", time.Since(start).Round(time.Second).String())
	}, func() {}
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func humanCount(n int64) string {
	switch {
	case n >= 1e9:
		return fmt.Sprintf("%.2fB", float64(n)/1e9)
	case n >= 1e6:
		return fmt.Sprintf("%.1fM", float64(n)/1e6)
	case n >= 1e3:
		return fmt.Sprintf("%.1fK", float64(n)/1e3)
	}
	return fmt.Sprint(n)
}
