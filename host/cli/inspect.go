package cli

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/llama-orch/orch/host/config"
	"github.com/llama-orch/orch/host/plugins"
	"github.com/llama-orch/orch/sdk/gguf"
)

func init() { register(newInspectCmd) }

// AdapterMatch says which installed adapter would serve a model.
type AdapterMatch struct {
	Adapter string `json:"adapter,omitempty"` // adapter name; empty when none
	Version string `json:"version,omitempty"`
	Path    string `json:"path,omitempty"`
	Reason  string `json:"reason,omitempty"` // why none would (or a note)
}

// inspectAdapterHook finds the adapter for an architecture. The default
// scans the plugin directories (host/plugins) and applies the configured
// pins; tests replace it.
var inspectAdapterHook = func(cmd *cobra.Command, cfg *config.Config, arch string) AdapterMatch {
	log := newLoggerTo(cfg, cmd.ErrOrStderr()).Named("plugins")
	found, err := plugins.Scan(plugins.DefaultDirs(cfg.Plugins.Dir), log)
	if err != nil {
		return AdapterMatch{Reason: "scanning plugins: " + err.Error()}
	}
	p, err := plugins.Select(found, arch, plugins.PinFor(cfg.Plugins, config.ModelConfig{}, arch))
	if err != nil {
		return AdapterMatch{Reason: err.Error()}
	}
	return AdapterMatch{Adapter: p.Name, Version: p.Info.Version, Path: p.Path}
}

// Inspection is what `orch-host inspect --json` prints.
type Inspection struct {
	File            string            `json:"file"`
	SizeBytes       int64             `json:"size_bytes"`
	GGUFVersion     uint32            `json:"gguf_version"`
	Alignment       int64             `json:"alignment"`
	Architecture    string            `json:"architecture"`
	Name            string            `json:"name,omitempty"`
	Parameters      int64             `json:"parameters"`
	TensorCount     int               `json:"tensor_count"`
	DTypes          []DTypeShare      `json:"dtypes"`
	ContextLength   uint64            `json:"context_length,omitempty"`
	Hyperparameters map[string]string `json:"hyperparameters"`
	Tokenizer       TokenizerInfo     `json:"tokenizer"`
	Adapter         AdapterMatch      `json:"adapter"`
	MetadataCount   int               `json:"metadata_count"`
}

// DTypeShare is one tensor type's share of the weights.
type DTypeShare struct {
	Type    string  `json:"type"`
	Tensors int     `json:"tensors"`
	Params  int64   `json:"params"`
	Bytes   int64   `json:"bytes"`
	Percent float64 `json:"percent"` // of tensor bytes
}

// TokenizerInfo summarises tokenizer.ggml.*.
type TokenizerInfo struct {
	Model        string `json:"model,omitempty"` // gpt2 (byte-level BPE), llama (SentencePiece), ...
	Pre          string `json:"pre,omitempty"`
	Kind         string `json:"kind"`
	VocabSize    int    `json:"vocab_size"`
	Merges       int    `json:"merges,omitempty"`
	BOS          *int64 `json:"bos_token_id,omitempty"`
	EOS          *int64 `json:"eos_token_id,omitempty"`
	ChatTemplate bool   `json:"chat_template"`
}

// Inspect summarises a parsed GGUF file.
func Inspect(path string, f *gguf.File) Inspection {
	in := Inspection{File: path, SizeBytes: f.Size, GGUFVersion: f.Version, Alignment: f.Alignment,
		Architecture: f.Architecture(), TensorCount: len(f.Tensors), MetadataCount: len(f.KV),
		Hyperparameters: map[string]string{}}
	in.Name, _ = f.String("general.name")
	byType := map[gguf.Type]*DTypeShare{}
	var total int64
	for i := range f.Tensors {
		t := &f.Tensors[i]
		n := t.Elements()
		in.Parameters += n
		s := byType[t.Type]
		if s == nil {
			s = &DTypeShare{Type: t.Type.String()}
			byType[t.Type] = s
		}
		s.Tensors++
		s.Params += n
		s.Bytes += t.Size
		total += t.Size
	}
	for _, s := range byType {
		if total > 0 {
			s.Percent = 100 * float64(s.Bytes) / float64(total)
		}
		in.DTypes = append(in.DTypes, *s)
	}
	sort.Slice(in.DTypes, func(a, b int) bool { return in.DTypes[a].Bytes > in.DTypes[b].Bytes })
	prefix := in.Architecture + "."
	for _, kv := range f.KV {
		if in.Architecture != "" && strings.HasPrefix(kv.Key, prefix) {
			in.Hyperparameters[strings.TrimPrefix(kv.Key, prefix)] = kv.Value.String()
		}
	}
	in.ContextLength, _ = f.ArchUint("context_length")
	tk := &in.Tokenizer
	tk.Model, _ = f.String("tokenizer.ggml.model")
	tk.Pre, _ = f.String("tokenizer.ggml.pre")
	if v, ok := f.Get("tokenizer.ggml.tokens"); ok {
		tk.VocabSize = v.Len()
	}
	if v, ok := f.Get("tokenizer.ggml.merges"); ok {
		tk.Merges = v.Len()
	}
	if id, ok := f.Int("tokenizer.ggml.bos_token_id"); ok {
		tk.BOS = &id
	}
	if id, ok := f.Int("tokenizer.ggml.eos_token_id"); ok {
		tk.EOS = &id
	}
	_, tk.ChatTemplate = f.Get("tokenizer.chat_template")
	switch tk.Model {
	case "gpt2":
		tk.Kind = "byte-level BPE"
	case "llama":
		tk.Kind = "SentencePiece (BPE with scores)"
	case "":
		tk.Kind = "none"
	default:
		tk.Kind = tk.Model
	}
	return in
}

func newInspectCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "inspect FILE",
		Short: "Describe a GGUF model: architecture, size, dtypes, hyperparameters, tokenizer, adapter",
		Long: `inspect reads a GGUF file's header (not its weights) and prints its
architecture, parameter and tensor counts, the tensor dtypes with their share
of the bytes, the context length and the architecture's hyperparameters, the
tokenizer kind and vocabulary size, and which installed adapter would serve
it (or why none would). --json prints the same as one JSON object.`,
		Example: `  orch-host inspect model.gguf
  orch-host inspect --json model.gguf | jq .dtypes`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			f, err := gguf.Open(args[0])
			if err != nil {
				return err
			}
			defer f.Close()
			in := Inspect(args[0], f)
			if in.Architecture == "" {
				in.Adapter = AdapterMatch{Reason: "the file has no general.architecture"}
			} else {
				in.Adapter = inspectAdapterHook(cmd, cfg, in.Architecture)
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(in)
			}
			return printInspection(cmd, in)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printInspection(cmd *cobra.Command, in Inspection) error {
	w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
	p := func(k, format string, a ...any) { fmt.Fprintf(w, "%s\t"+format+"\n", append([]any{k}, a...)...) }
	p("file:", "%s (%s, GGUF v%d, alignment %d)", in.File, humanBytes(in.SizeBytes), in.GGUFVersion, in.Alignment)
	arch := in.Architecture
	if arch == "" {
		arch = "(none)"
	}
	p("architecture:", "%s", arch)
	if in.Name != "" {
		p("name:", "%s", in.Name)
	}
	p("parameters:", "%s (%d)", humanCount(in.Parameters), in.Parameters)
	p("tensors:", "%d", in.TensorCount)
	for _, d := range in.DTypes {
		p("", "%-6s %5.1f%%  %s in %d tensors", d.Type, d.Percent, humanBytes(d.Bytes), d.Tensors)
	}
	if in.ContextLength > 0 {
		p("context length:", "%d", in.ContextLength)
	}
	keys := make([]string, 0, len(in.Hyperparameters))
	for k := range in.Hyperparameters {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	if len(keys) > 0 {
		p("hyperparameters:", "")
		for _, k := range keys {
			p("  "+k, "%s", in.Hyperparameters[k])
		}
	}
	t := in.Tokenizer
	tok := fmt.Sprintf("%s, vocab %d", t.Kind, t.VocabSize)
	if t.Model != "" {
		tok += fmt.Sprintf(" (model %q", t.Model)
		if t.Pre != "" {
			tok += fmt.Sprintf(", pre %q", t.Pre)
		}
		tok += ")"
	}
	if t.Merges > 0 {
		tok += fmt.Sprintf(", %d merges", t.Merges)
	}
	if t.ChatTemplate {
		tok += ", chat template"
	}
	p("tokenizer:", "%s", tok)
	a := in.Adapter
	switch {
	case a.Adapter != "":
		p("adapter:", "%s %s (%s)", a.Adapter, a.Version, a.Path)
	default:
		p("adapter:", "none: %s", a.Reason)
	}
	return w.Flush()
}
