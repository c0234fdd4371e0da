package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/llama-orch/orch/host/config"
	"github.com/llama-orch/orch/host/placement"
	"github.com/llama-orch/orch/host/plugins"
	"github.com/llama-orch/orch/host/replica"
	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/gguf"
)

func init() { register(newBenchCmd) }

// benchOptions say which tests bench runs.
type benchOptions struct {
	Prompts []int // pp N: prompt processing of N random tokens
	Gens    []int // tg N: N generated tokens
	Depths  []int // tg N @ dD: generation after a prefix of D tokens (0 = none)
	Streams []int // aggregate decode with S concurrent pp128+tgN requests
	Repeats int
	Seed    uint64
	// Sampling of every generated token (--temperature, --top-p, --top-k,
	// --min-p); the zero value is greedy decoding.
	Sampling sdk.SamplingParams
}

// benchRow is one line of the table: a test and its rate in each repeat.
type benchRow struct {
	Test    string
	Rates   []float64     // tokens per second, one per repeat
	ITL50   time.Duration // stream tests: inter-token latency percentiles seen by the clients
	ITL99   time.Duration
	Streams int
}

// streamPrompt is the prompt length of each request in a --streams test
// (llama.cpp's comparison runs pp128+tg128 per stream).
const streamPrompt = 128

// benchAdapter opens an adapter for the model at path through the plugin
// runtime: scan the plugin directories (next to orch-host, then plugins.dir),
// pick the adapter pinned by --adapter or plugins.architectures, else the
// one declaring the file's architecture, and launch it. It is the one place
// bench (and logits) get their adapter from; tests replace it with an
// in-process engine.
var benchAdapter = func(ctx context.Context, cmd *cobra.Command, path, pin string, log hclog.Logger) (sdk.Adapter, func() error, error) {
	f, err := gguf.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("open model: %w", err)
	}
	arch := f.Architecture()
	if err := f.Close(); err != nil {
		return nil, nil, fmt.Errorf("close model: %w", err)
	}
	cfg, err := loadConfig(cmd)
	if err != nil {
		return nil, nil, err
	}
	if pin == "" {
		pin = plugins.PinFor(cfg.Plugins, config.ModelConfig{Path: path}, arch)
	}
	found, err := plugins.Scan(plugins.DefaultDirs(cfg.Plugins.Dir), log)
	if err != nil {
		return nil, nil, fmt.Errorf("scan adapters: %w", err)
	}
	p, err := plugins.Select(found, arch, pin)
	if err != nil {
		return nil, nil, err
	}
	if n, _ := cmd.Flags().GetInt("tensor-parallel"); n > 1 {
		return openSplitAdapter(ctx, cmd, p, path, n, log)
	}
	log.Info("launching adapter", "plugin", p.Name, "arch", arch)
	inst, err := plugins.Launch(ctx, p, plugins.LaunchOptions{Logger: log})
	if err != nil {
		return nil, nil, fmt.Errorf("launch adapter %s: %w", p.Name, err)
	}
	return inst, func() error { return inst.Close(context.Background()) }, nil
}

// openSplitAdapter starts the tensor-parallel group of n ranks for bench
// and logits (--tensor-parallel n): on the n freest GPUs, or n CPU ranks
// with --device cpu (or auto and no GPU). There is no memory plan here: the
// ranks' Load reports what does not fit.
func openSplitAdapter(ctx context.Context, cmd *cobra.Command, p plugins.Plugin, path string, n int, log hclog.Logger) (sdk.Adapter, func() error, error) {
	device, _ := cmd.Flags().GetString("device")
	gpus, err := placement.Devices(ctx)
	if err != nil {
		log.Warn("listing GPUs failed; placing as if there were none", "error", err)
	}
	dec, err := placement.Decide(placement.Request{
		Device: device, GPUs: gpus, ForceSplit: n,
		TensorParallel: slices.Contains(p.Info.Features, placement.FeatureTensorParallel),
	})
	if err != nil {
		return nil, nil, fmt.Errorf("--tensor-parallel %d: %w", n, err)
	}
	log.Info("launching tensor-parallel ranks", "plugin", p.Name, "ranks", dec.Processes, "gpus", fmt.Sprint(dec.GPUs), "reason", dec.Reason)
	g, err := replica.StartSplit(ctx, p, dec, replica.OpenOptions{Logger: log, Name: strings.TrimSuffix(filepath.Base(path), ".gguf")})
	if err != nil {
		return nil, nil, err
	}
	return g, func() error { return g.Close(context.Background()) }, nil
}

func newBenchCmd() *cobra.Command {
	var (
		model, device, adapterName string
		o                          benchOptions
		threads, batchTokens       int
		mixedTokens                int
		kvType                     string
		kvFraction                 float64
		deviceSample               bool
	)
	cmd := &cobra.Command{
		Use:   "bench --model FILE",
		Short: "Measure prompt processing and generation throughput (llama-bench style)",
		Long: `bench loads a model through its adapter and prints a markdown table like
llama-bench: for each test the tokens per second, mean ± standard deviation
over the repeats (a warm-up run before each test is not counted).

  pp N            prompt processing of N random tokens (N / time to first token)
  tg N            generation of N tokens after a one-token prompt ((N-1) / generate time)
  tg N @ dD       generation of N tokens after a prompt of D tokens (--depth)
  pp128+tgN xS    S concurrent requests of 128 prompt + N generated tokens
                  (--streams): aggregate decode rate while all S requests decode
                  (tokens in the window from the last request's first token to the
                  first request's last token / its length) and the inter-token
                  latency p50/p99 the clients saw (prefill stalls included)

Prompt and generation times are measured by the adapter around its forward
passes (the model synchronises there, so they are device times); prompts are
random tokens, different in every run, so the prefix cache does not help.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if model == "" {
				return errors.New("bench: --model is required")
			}
			if err := o.validate(); err != nil {
				return fmt.Errorf("bench: %w", err)
			}
			st, err := os.Stat(model)
			if err != nil {
				return fmt.Errorf("bench: %w", err)
			}
			level := hclog.Info
			if l, _ := cmd.Flags().GetString("log-level"); l != "" {
				level = hclog.LevelFromString(l)
			}
			log := hclog.New(&hclog.LoggerOptions{Name: "bench", Level: level, Output: cmd.ErrOrStderr()})
			ctx := cmd.Context()
			if ctx == nil {
				ctx = context.Background()
			}
			a, closeFn, err := benchAdapter(ctx, cmd, model, adapterName, log)
			if err != nil {
				return fmt.Errorf("bench: %w", err)
			}
			defer func() {
				if err := closeFn(); err != nil {
					log.Warn("closing adapter", "error", err)
				}
			}()
			log.Info("loading", "model", model)
			lo := o.loadOptions(device, threads)
			lo.Extra = map[string]string{}
			if batchTokens > 0 {
				lo.Extra[engine.ExtraMaxBatchTokens] = strconv.Itoa(batchTokens)
			}
			if mixedTokens > 0 {
				lo.Extra[engine.ExtraMixedTokens] = strconv.Itoa(mixedTokens)
			}
			if kvType != "" {
				lo.Extra["kv_type"] = kvType
			}
			if !deviceSample {
				lo.Extra[engine.ExtraDeviceSample] = "false"
			}
			if kvFraction < 0 || kvFraction > 1 {
				return fmt.Errorf("bench: --kv-cache-fraction %g: want a fraction between 0 and 1", kvFraction)
			}
			lo.KVCacheFraction = kvFraction
			info, err := a.Load(ctx, sdk.LoadRequest{Path: model, Options: lo}, func(p sdk.LoadProgress) {
				log.Debug("load", "stage", p.Stage, "done", p.Done, "total", p.Total)
			})
			if err != nil {
				return fmt.Errorf("bench: %w", err)
			}
			tick, done := benchProgress(cmd, o)
			rows, err := runBench(ctx, a, info, o, log, tick)
			done()
			if err != nil {
				return fmt.Errorf("bench: %w", err)
			}
			name := info.Name
			if name == "" {
				name = strings.TrimSuffix(filepath.Base(model), ".gguf")
			}
			backend := info.Backend
			switch {
			case strings.HasPrefix(info.DeviceName, info.Backend):
				backend = info.DeviceName
			case info.DeviceName != "":
				backend += " (" + info.DeviceName + ")"
			}
			writeBenchTable(cmd.OutOrStdout(), name, st.Size(), backend, rows)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVarP(&model, "model", "m", "", "GGUF model file")
	f.IntSliceVarP(&o.Prompts, "n-prompt", "p", []int{512}, "prompt lengths for pp tests (comma-separated; 0 = none)")
	f.IntSliceVarP(&o.Gens, "n-gen", "n", []int{128}, "generation lengths for tg tests (comma-separated; 0 = none)")
	f.IntSliceVarP(&o.Depths, "depth", "d", []int{0}, "prompt depths before tg tests (comma-separated)")
	f.IntSliceVar(&o.Streams, "streams", nil, "concurrent streams for aggregate decode tests, e.g. 1,8,32,64")
	f.IntVarP(&o.Repeats, "repetitions", "r", 3, "repeats per test")
	f.Float32Var(&o.Sampling.Temperature, "temperature", 0, "sampling temperature of the generated tokens (0 = greedy, as before)")
	f.IntVar(&o.Sampling.TopK, "top-k", 0, "top-k of the generated tokens' sampling (0 = off)")
	f.Float32Var(&o.Sampling.TopP, "top-p", 1, "top-p of the generated tokens' sampling (1 = off)")
	f.Float32Var(&o.Sampling.MinP, "min-p", 0, "min-p of the generated tokens' sampling (0 = off)")
	f.BoolVar(&deviceSample, "device-sample", true, "engine-based adapters: draw sampled tokens on the device where the model can (false: copy the logits and sample on the host; engine.device_sample)")
	f.Uint64Var(&o.Seed, "seed", 1, "seed of the random prompts")
	f.StringVar(&device, "device", "auto", "device: auto, cpu or cuda")
	f.IntVarP(&threads, "threads", "t", 0, "CPU threads (0 = all cores)")
	f.StringVar(&kvType, "kv-type", "", "KV cache element type for engine-based adapters: f32, f16 or bf16 (default: the adapter's)")
	f.Float64Var(&kvFraction, "kv-cache-fraction", 0, "size the KV cache from this fraction of free device memory (0 = from context x streams)")
	f.IntVar(&batchTokens, "batch-tokens", 0, "tokens per forward step of engine-based adapters (prefill chunk size; 0 = adapter default)")
	f.IntVar(&mixedTokens, "mixed-tokens", 0, "tokens per forward step that carries decodes (engine-based adapters; 0 = adapter default)")
	f.String("plugins-dir", "", "extra directory to scan for orch-adapter-* binaries (plugins.dir)")
	f.StringVar(&adapterName, "adapter", "", "use this adapter (by name) instead of the one declaring the model's architecture")
	f.Int("tensor-parallel", 0, "split the model over N ranks (one adapter process per GPU, or N CPU processes with --device cpu); 0 = one process (docs/multi-gpu.md)")
	return cmd
}

func (o *benchOptions) validate() error {
	o.Prompts = slices.DeleteFunc(o.Prompts, func(n int) bool { return n == 0 })
	o.Gens = slices.DeleteFunc(o.Gens, func(n int) bool { return n == 0 })
	if len(o.Depths) == 0 {
		o.Depths = []int{0}
	}
	for _, l := range [][]int{o.Prompts, o.Gens, o.Depths, o.Streams} {
		for _, n := range l {
			if n < 0 {
				return fmt.Errorf("negative size %d: %w", n, sdk.ErrInvalidArgument)
			}
		}
	}
	if slices.Contains(o.Streams, 0) {
		return fmt.Errorf("--streams needs positive counts: %w", sdk.ErrInvalidArgument)
	}
	if o.Repeats < 1 {
		return fmt.Errorf("--repetitions must be at least 1: %w", sdk.ErrInvalidArgument)
	}
	sp := o.Sampling
	if sp.Temperature < 0 || sp.TopK < 0 || sp.TopP < 0 || sp.TopP > 1 || sp.MinP < 0 || sp.MinP > 1 ||
		math.IsNaN(float64(sp.Temperature)) || math.IsNaN(float64(sp.TopP)) || math.IsNaN(float64(sp.MinP)) {
		return fmt.Errorf("sampling: --temperature %g, --top-k %d, --top-p %g, --min-p %g: want T >= 0, k >= 0, p and min-p in [0, 1]: %w",
			sp.Temperature, sp.TopK, sp.TopP, sp.MinP, sdk.ErrInvalidArgument)
	}
	if len(o.Prompts)+len(o.Gens)+len(o.Streams) == 0 {
		return fmt.Errorf("nothing to run: %w", sdk.ErrInvalidArgument)
	}
	return nil
}

// samplingLabel names the sampling of the generated tokens in the test
// names ("" for greedy).
func (o benchOptions) samplingLabel() string {
	sp := o.Sampling
	if sp.Temperature == 0 {
		return ""
	}
	l := fmt.Sprintf(" T=%g", sp.Temperature)
	if sp.TopK > 0 {
		l += fmt.Sprintf(" top_k=%d", sp.TopK)
	}
	if sp.TopP > 0 && sp.TopP < 1 {
		l += fmt.Sprintf(" top_p=%g", sp.TopP)
	}
	if sp.MinP > 0 {
		l += fmt.Sprintf(" min_p=%g", sp.MinP)
	}
	return l
}

// streamGen is the generation length of the --streams tests.
func (o benchOptions) streamGen() int {
	if len(o.Gens) > 0 {
		return o.Gens[0]
	}
	return 128
}

// loadOptions asks for a context and batch the tests fit in.
func (o benchOptions) loadOptions(device string, threads int) sdk.LoadOptions {
	ctxLen := streamPrompt + o.streamGen()
	for _, p := range o.Prompts {
		ctxLen = max(ctxLen, p)
	}
	for _, d := range o.Depths {
		for _, g := range o.Gens {
			ctxLen = max(ctxLen, max(d, 1)+g)
		}
	}
	seqs := 1
	for _, s := range o.Streams {
		seqs = max(seqs, s)
	}
	return sdk.LoadOptions{Device: device, ContextLength: ctxLen, MaxSequences: seqs, Threads: threads}
}

// runBench runs the tests against a loaded adapter.
// tick (may be nil) is called after every run, warm-ups included.
func runBench(ctx context.Context, a sdk.Adapter, info sdk.ModelInfo, o benchOptions, log hclog.Logger, tick func(test string)) ([]benchRow, error) {
	if tick == nil {
		tick = func(string) {}
	}
	if info.VocabSize <= 0 {
		return nil, fmt.Errorf("adapter reports vocabulary size %d", info.VocabSize)
	}
	rng := rand.New(rand.NewPCG(o.Seed, o.Seed^0x5851f42d4c957f2d))
	prompt := func(n int) []int32 {
		p := make([]int32, n)
		for i := range p {
			p[i] = int32(rng.IntN(info.VocabSize))
		}
		return p
	}
	var rows []benchRow
	repeat := func(test string, run func() (float64, error)) error {
		log.Info("running", "test", test, "repeats", o.Repeats)
		if _, err := run(); err != nil { // warm-up
			return fmt.Errorf("%s (warm-up): %w", test, err)
		}
		tick(test)
		row := benchRow{Test: test}
		for r := 0; r < o.Repeats; r++ {
			v, err := run()
			if err != nil {
				return fmt.Errorf("%s: %w", test, err)
			}
			tick(test)
			row.Rates = append(row.Rates, v)
		}
		rows = append(rows, row)
		return nil
	}
	for _, n := range o.Prompts {
		err := repeat(fmt.Sprintf("pp%d", n), func() (float64, error) {
			t, err := generateOnce(ctx, a, prompt(n), 1, o.Sampling)
			if err != nil {
				return 0, err
			}
			if t.PromptTime <= 0 {
				return 0, errors.New("adapter reported no prompt time")
			}
			return float64(n-t.CachedTokens) / t.PromptTime.Seconds(), nil
		})
		if err != nil {
			return rows, err
		}
	}
	for _, d := range o.Depths {
		for _, g := range o.Gens {
			test := fmt.Sprintf("tg%d", g)
			if d > 0 {
				test += fmt.Sprintf(" @ d%d", d)
			}
			test += o.samplingLabel()
			err := repeat(test, func() (float64, error) {
				t, err := generateOnce(ctx, a, prompt(max(d, 1)), g, o.Sampling)
				if err != nil {
					return 0, err
				}
				if t.GeneratedTokens < 2 || t.GenerateTime <= 0 {
					return 0, fmt.Errorf("generated %d tokens in %v: too few to time", t.GeneratedTokens, t.GenerateTime)
				}
				return float64(t.GeneratedTokens-1) / t.GenerateTime.Seconds(), nil
			})
			if err != nil {
				return rows, err
			}
		}
	}
	g := o.streamGen()
	for _, s := range o.Streams {
		var itl []time.Duration
		test := fmt.Sprintf("pp%d+tg%d x%d", streamPrompt, g, s) + o.samplingLabel()
		first := true
		err := repeat(test, func() (float64, error) {
			rate, gaps, err := streamsOnce(ctx, a, s, g, prompt, o.Sampling)
			if err == nil && !first {
				itl = append(itl, gaps...)
			}
			first = false
			return rate, err
		})
		if err != nil {
			return rows, err
		}
		rows[len(rows)-1].Streams = s
		rows[len(rows)-1].ITL50, rows[len(rows)-1].ITL99 = percentile(itl, 0.50), percentile(itl, 0.99)
	}
	return rows, nil
}

// benchProgress shows a progress bar of the runs on a terminal (the log
// lines of runBench say the same otherwise).
func benchProgress(cmd *cobra.Command, o benchOptions) (func(string), func()) {
	errw := cmd.ErrOrStderr()
	if !isTerminal(errw) {
		return nil, func() {}
	}
	tests := len(o.Prompts) + len(o.Depths)*len(o.Gens) + len(o.Streams)
	bar := progressbar.NewOptions(tests*(o.Repeats+1),
		progressbar.OptionSetWriter(errw),
		progressbar.OptionSetDescription("bench"),
		progressbar.OptionClearOnFinish(),
	)
	return func(test string) {
			bar.Describe("bench " + test)
			_ = bar.Add(1)
		}, func() {
			_ = bar.Finish()
		}
}

// generateOnce runs one request with no stop tokens (greedy unless sp says
// otherwise) and returns its timings.
func generateOnce(ctx context.Context, a sdk.Adapter, prompt []int32, n int, sp sdk.SamplingParams) (sdk.Timings, error) {
	var t *sdk.Timings
	got := 0
	err := a.Generate(ctx, sdk.GenerateRequest{Prompt: prompt, MaxTokens: n, Sampling: sp}, func(c sdk.Chunk) error {
		got += len(c.Tokens)
		if c.Timings != nil {
			t = c.Timings
		}
		return nil
	})
	if err != nil {
		return sdk.Timings{}, err
	}
	if t == nil {
		return sdk.Timings{}, errors.New("adapter sent no timings")
	}
	if got != n {
		return sdk.Timings{}, fmt.Errorf("asked for %d tokens, got %d (context too small?)", n, got)
	}
	return *t, nil
}

// streamsOnce runs s concurrent pp128+tg g requests. The aggregate decode
// rate is measured in the window where every stream is decoding (from the
// last stream's first token to the first stream's last token), the steady
// state llama.cpp's batched-bench reports as S_TG; when the streams barely
// overlap it falls back to all tokens after each stream's first over the
// whole span. gaps are the inter-token gaps the clients saw (all of them:
// stalls while other prompts are prefilled included).
func streamsOnce(ctx context.Context, a sdk.Adapter, s, g int, prompt func(int) []int32, sp sdk.SamplingParams) (float64, []time.Duration, error) {
	prompts := make([][]int32, s)
	for i := range prompts {
		prompts[i] = prompt(streamPrompt)
	}
	type res struct {
		at   []time.Time // arrival time of each token
		gaps []time.Duration
		err  error
	}
	out := make([]res, s)
	var wg sync.WaitGroup
	for i := range s {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := &out[i]
			r.err = a.Generate(ctx, sdk.GenerateRequest{Prompt: prompts[i], MaxTokens: g, Sampling: sp}, func(c sdk.Chunk) error {
				if len(c.Tokens) == 0 {
					return nil
				}
				now := time.Now()
				if len(r.at) > 0 {
					gap := now.Sub(r.at[len(r.at)-1]) / time.Duration(len(c.Tokens))
					for range c.Tokens {
						r.gaps = append(r.gaps, gap)
					}
				}
				for range c.Tokens {
					r.at = append(r.at, now)
				}
				return nil
			})
		}()
	}
	wg.Wait()
	var firstAll, lastAll, steadyFrom, steadyTo time.Time
	decoded := 0
	var gaps []time.Duration
	for i, r := range out {
		if r.err != nil {
			return 0, nil, r.err
		}
		if len(r.at) == 0 {
			return 0, nil, errors.New("a stream produced no tokens")
		}
		first, last := r.at[0], r.at[len(r.at)-1]
		if i == 0 || first.Before(firstAll) {
			firstAll = first
		}
		if i == 0 || first.After(steadyFrom) {
			steadyFrom = first
		}
		if i == 0 || last.After(lastAll) {
			lastAll = last
		}
		if i == 0 || last.Before(steadyTo) {
			steadyTo = last
		}
		decoded += len(r.at) - 1
		gaps = append(gaps, r.gaps...)
	}
	if span := steadyTo.Sub(steadyFrom); span > 0 {
		n := 0
		for _, r := range out {
			for _, t := range r.at {
				if t.After(steadyFrom) && !t.After(steadyTo) {
					n++
				}
			}
		}
		if n >= 2*s {
			return float64(n) / span.Seconds(), gaps, nil
		}
	}
	el := lastAll.Sub(firstAll)
	if decoded == 0 || el <= 0 {
		return 0, nil, fmt.Errorf("%d decoded tokens in %v: too few to time", decoded, el)
	}
	return float64(decoded) / el.Seconds(), gaps, nil
}

func percentile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func meanSD(v []float64) (mean, sd float64) {
	for _, x := range v {
		mean += x
	}
	mean /= float64(len(v))
	if len(v) < 2 {
		return mean, 0
	}
	for _, x := range v {
		sd += (x - mean) * (x - mean)
	}
	return mean, math.Sqrt(sd / float64(len(v)-1))
}

// writeBenchTable prints the results as a markdown table.
func writeBenchTable(w io.Writer, model string, size int64, backend string, rows []benchRow) {
	withITL := slices.ContainsFunc(rows, func(r benchRow) bool { return r.Streams > 0 })
	head := "| model | size | backend | test | t/s |"
	sep := "| --- | ---: | --- | --- | ---: |"
	if withITL {
		head += " itl p50 | itl p99 |"
		sep += " ---: | ---: |"
	}
	fmt.Fprintln(w, head)
	fmt.Fprintln(w, sep)
	gib := fmt.Sprintf("%.2f GiB", float64(size)/(1<<30))
	if size < 1<<30 {
		gib = fmt.Sprintf("%.2f MiB", float64(size)/(1<<20))
	}
	for _, r := range rows {
		m, sd := meanSD(r.Rates)
		line := fmt.Sprintf("| %s | %s | %s | %s | %.2f ± %.2f |", model, gib, backend, r.Test, m, sd)
		if withITL {
			if r.Streams > 0 {
				line += fmt.Sprintf(" %.2f ms | %.2f ms |", ms(r.ITL50), ms(r.ITL99))
			} else {
				line += " - | - |"
			}
		}
		fmt.Fprintln(w, line)
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
