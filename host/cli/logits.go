package cli

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"

	"github.com/llama-orch/orch/sdk"
)

func init() { register(newLogitsCmd) }

// logitsAdapter opens the adapter for the model at path (pin: adapter name
// from --adapter, "" = the one declaring the model's architecture). It goes
// through the same hook as bench, so wiring the plugin runtime there wires
// both; tests replace it with an in-process adapter.
var logitsAdapter = func(ctx context.Context, cmd *cobra.Command, path, pin string, log hclog.Logger) (sdk.Adapter, func() error, error) {
	return benchAdapter(ctx, cmd, path, pin, log)
}

func newLogitsCmd() *cobra.Command {
	var (
		model, tokens, out, device, adapterName string
		threads, top                            int
	)
	cmd := &cobra.Command{
		Use:   "logits --model FILE --tokens 1,2,3 [--out FILE.npy]",
		Short: "Run token ids through a model and write the logits of every position",
		Long: `logits loads a model through its adapter, evaluates the given token ids
from an empty context (the adapter's Evaluate RPC) and writes the logits of
every position as a float32 NumPy array of shape [n_tokens, n_vocab]
(--out FILE.npy), so the numbers can be checked with NumPy:

  numpy.load("x.npy").argmax(-1)

Without --out it prints, per position, the --top highest logits.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if model == "" {
				return errors.New("logits: --model is required")
			}
			ids, err := parseTokenList(tokens)
			if err != nil {
				return fmt.Errorf("logits: --tokens: %w", err)
			}
			if _, err := os.Stat(model); err != nil {
				return fmt.Errorf("logits: %w", err)
			}
			level := hclog.Info
			if l, _ := cmd.Flags().GetString("log-level"); l != "" {
				level = hclog.LevelFromString(l)
			}
			log := hclog.New(&hclog.LoggerOptions{Name: "logits", Level: level, Output: cmd.ErrOrStderr()})
			ctx := cmd.Context()
			if ctx == nil {
				ctx = context.Background()
			}
			a, closeFn, err := logitsAdapter(ctx, cmd, model, adapterName, log)
			if err != nil {
				return fmt.Errorf("logits: %w", err)
			}
			defer func() {
				if err := closeFn(); err != nil {
					log.Warn("closing adapter", "error", err)
				}
			}()
			info, err := a.Load(ctx, sdk.LoadRequest{Path: model, Options: sdk.LoadOptions{
				Device: device, Threads: threads, ContextLength: len(ids), MaxSequences: 1,
			}}, func(p sdk.LoadProgress) { log.Debug("load", "stage", p.Stage, "done", p.Done, "total", p.Total) })
			if err != nil {
				return fmt.Errorf("logits: %w", err)
			}
			log.Info("model loaded", "arch", info.Architecture, "backend", info.Backend, "device", info.DeviceName)
			lg, err := a.Evaluate(ctx, ids)
			if err != nil {
				return fmt.Errorf("logits: %w", err)
			}
			if lg.Rows != len(ids) || lg.Vocab <= 0 || len(lg.Data) != lg.Rows*lg.Vocab {
				return fmt.Errorf("logits: adapter returned %d x %d logits with %d values for %d tokens", lg.Rows, lg.Vocab, len(lg.Data), len(ids))
			}
			if err := a.Unload(ctx); err != nil {
				log.Warn("unload", "error", err)
			}
			if out != "" {
				if err := writeNPYFile(out, lg.Data, lg.Rows, lg.Vocab); err != nil {
					return fmt.Errorf("logits: %w", err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "wrote %s: float32 [%d, %d]\n", out, lg.Rows, lg.Vocab)
				return nil
			}
			printTopLogits(cmd.OutOrStdout(), ids, lg, top)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVarP(&model, "model", "m", "", "GGUF model file")
	f.StringVar(&tokens, "tokens", "", "comma-separated token ids, e.g. 1,2,3")
	f.StringVarP(&out, "out", "o", "", "write the logits as a float32 .npy file [n_tokens, n_vocab]")
	f.IntVar(&top, "top", 5, "without --out: how many of the highest logits to print per position")
	f.StringVar(&device, "device", "auto", "device: auto, cpu or cuda")
	f.IntVarP(&threads, "threads", "t", 0, "CPU threads (0 = all cores)")
	f.StringVar(&adapterName, "adapter", "", "use this adapter (by name) instead of the one declaring the model's architecture")
	f.Int("tensor-parallel", 0, "split the model over N ranks (one adapter process per GPU, or N CPU processes with --device cpu); 0 = one process")
	return cmd
}

// parseTokenList parses "1,2, 3" into token ids.
func parseTokenList(s string) ([]int32, error) {
	if strings.TrimSpace(s) == "" {
		return nil, fmt.Errorf("no token ids given: %w", sdk.ErrInvalidArgument)
	}
	var ids []int32
	for i, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		v, err := strconv.ParseInt(f, 10, 32)
		if err != nil || v < 0 {
			return nil, fmt.Errorf("item %d %q is not a token id: %w", i+1, f, sdk.ErrInvalidArgument)
		}
		ids = append(ids, int32(v))
	}
	return ids, nil
}

// writeNPY writes data as a little-endian float32 NumPy array of shape
// [rows, cols] (format version 1.0, header padded to 64 bytes). Hand-written:
// the format is 10 bytes of preamble and a Python dict literal, not worth a
// dependency.
func writeNPY(w io.Writer, data []float32, rows, cols int) error {
	if rows*cols != len(data) {
		return fmt.Errorf("npy: %d values for shape [%d, %d]", len(data), rows, cols)
	}
	header := fmt.Sprintf("{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }", rows, cols)
	pad := 64 - (10+len(header)+1)%64
	if pad == 64 {
		pad = 0
	}
	header += strings.Repeat(" ", pad) + "\n"
	if len(header) > math.MaxUint16 {
		return errors.New("npy: header too long")
	}
	bw := bufio.NewWriter(w)
	bw.WriteString("\x93NUMPY\x01\x00")
	var hl [2]byte
	binary.LittleEndian.PutUint16(hl[:], uint16(len(header)))
	bw.Write(hl[:])
	bw.WriteString(header)
	var b [4]byte
	for _, v := range data {
		binary.LittleEndian.PutUint32(b[:], math.Float32bits(v))
		bw.Write(b[:])
	}
	return bw.Flush()
}

func writeNPYFile(path string, data []float32, rows, cols int) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := writeNPY(f, data, rows, cols); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}

// printTopLogits prints the top highest logits of each position.
func printTopLogits(w io.Writer, ids []int32, lg sdk.Logits, top int) {
	top = max(1, min(top, lg.Vocab))
	fmt.Fprintf(w, "logits [%d, %d]\n", lg.Rows, lg.Vocab)
	idx := make([]int, lg.Vocab)
	for r := 0; r < lg.Rows; r++ {
		row := lg.Data[r*lg.Vocab : (r+1)*lg.Vocab]
		for i := range idx {
			idx[i] = i
		}
		sort.SliceStable(idx, func(a, b int) bool { return row[idx[a]] > row[idx[b]] })
		parts := make([]string, top)
		for i := 0; i < top; i++ {
			parts[i] = fmt.Sprintf("%d:%.4f", idx[i], row[idx[i]])
		}
		fmt.Fprintf(w, "pos %d (token %d): %s\n", r, ids[r], strings.Join(parts, " "))
	}
}
