package cli

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/llama-orch/orch/sdk/tokenizer"
)

func init() {
	register(newTokenizeCmd)
	register(newDetokenizeCmd)
}

const maxJSONLLine = 64 << 20

func newTokenizeCmd() *cobra.Command {
	var model string
	var jsonl, addSpecial, parseSpecial bool
	cmd := &cobra.Command{
		Use:   "tokenize --model FILE [TEXT]",
		Short: "Turn text into token ids with a model's tokenizer",
		Long: `tokenize encodes text with the tokenizer in a GGUF file's metadata and prints
the ids as a JSON array. The text is the argument, or stdin when there is none.

With --jsonl, every stdin line is a JSON string and every output line the JSON
id array for it; nothing else is written to stdout.

By default the text is tokenized as given: no BOS/EOS (--add-special adds them
as the model's metadata says) and special-token text such as <|start|> is plain
text (--parse-special turns it into the special token).`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			tok, err := openTokenizer(model)
			if err != nil {
				return err
			}
			o := tokenizer.EncodeOptions{AddSpecial: addSpecial, ParseSpecial: parseSpecial}
			out := bufio.NewWriter(cmd.OutOrStdout())
			defer out.Flush()
			if !jsonl {
				text := ""
				if len(args) == 1 {
					text = args[0]
				} else {
					b, err := io.ReadAll(cmd.InOrStdin())
					if err != nil {
						return fmt.Errorf("read stdin: %w", err)
					}
					text = string(b)
				}
				return writeJSONLine(out, idsOrEmpty(tok.Encode(text, o)))
			}
			return eachLine(cmd.InOrStdin(), func(n int, line []byte) error {
				var text string
				if err := json.Unmarshal(line, &text); err != nil {
					return fmt.Errorf("stdin line %d: want a JSON string: %w", n, err)
				}
				return writeJSONLine(out, idsOrEmpty(tok.Encode(text, o)))
			})
		},
	}
	cmd.Flags().StringVar(&model, "model", "", "GGUF model file whose tokenizer to use (required)")
	cmd.Flags().BoolVar(&jsonl, "jsonl", false, "read one JSON string per stdin line, write one JSON id array per line")
	cmd.Flags().BoolVar(&addSpecial, "add-special", false, "add BOS/EOS as the model's metadata says")
	cmd.Flags().BoolVar(&parseSpecial, "parse-special", false, "turn special-token text (e.g. <|start|>) into special tokens")
	_ = cmd.MarkFlagRequired("model")
	return cmd
}

func newDetokenizeCmd() *cobra.Command {
	var model string
	var jsonl bool
	cmd := &cobra.Command{
		Use:   "detokenize --model FILE [IDS]",
		Short: "Turn token ids into text with a model's tokenizer",
		Long: `detokenize decodes token ids with the tokenizer in a GGUF file's metadata and
prints the text exactly (no newline added). The ids are the argument or stdin,
as a JSON array or separated by spaces/commas. Special tokens print as their
text.

With --jsonl, every stdin line is a JSON id array and every output line the
decoded text as a JSON string; nothing else is written to stdout.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			tok, err := openTokenizer(model)
			if err != nil {
				return err
			}
			out := bufio.NewWriter(cmd.OutOrStdout())
			defer out.Flush()
			if !jsonl {
				var src string
				if len(args) == 1 {
					src = args[0]
				} else {
					b, err := io.ReadAll(cmd.InOrStdin())
					if err != nil {
						return fmt.Errorf("read stdin: %w", err)
					}
					src = string(b)
				}
				ids, err := parseIDs(src, tok.VocabSize())
				if err != nil {
					return err
				}
				_, err = out.WriteString(tok.Decode(ids))
				return err
			}
			return eachLine(cmd.InOrStdin(), func(n int, line []byte) error {
				var ids []int32
				if err := json.Unmarshal(line, &ids); err != nil {
					return fmt.Errorf("stdin line %d: want a JSON array of token ids: %w", n, err)
				}
				if err := checkIDs(ids, tok.VocabSize()); err != nil {
					return fmt.Errorf("stdin line %d: %w", n, err)
				}
				return writeJSONLine(out, tok.Decode(ids))
			})
		},
	}
	cmd.Flags().StringVar(&model, "model", "", "GGUF model file whose tokenizer to use (required)")
	cmd.Flags().BoolVar(&jsonl, "jsonl", false, "read one JSON id array per stdin line, write one JSON string per line")
	_ = cmd.MarkFlagRequired("model")
	return cmd
}

func openTokenizer(path string) (*tokenizer.Tokenizer, error) {
	if path == "" {
		return nil, errors.New("--model is required")
	}
	tok, err := tokenizer.Open(path)
	if err != nil {
		return nil, fmt.Errorf("load tokenizer: %w", err)
	}
	return tok, nil
}

func idsOrEmpty(ids []int32) []int32 {
	if ids == nil {
		return []int32{}
	}
	return ids
}

func writeJSONLine(w *bufio.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return enc.Encode(v) // Encode ends the line
}

// eachLine calls f for every stdin line (1-based numbers), flushing output as
// it goes so that it can be used interactively.
func eachLine(r io.Reader, f func(n int, line []byte) error) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxJSONLLine)
	n := 0
	for sc.Scan() {
		n++
		line := sc.Bytes()
		if len(strings.TrimSpace(string(line))) == 0 {
			return fmt.Errorf("stdin line %d is empty", n)
		}
		if err := f(n, line); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read stdin: %w", err)
	}
	return nil
}

// parseIDs reads ids as a JSON array or as numbers separated by spaces or
// commas.
func parseIDs(s string, vocab int) ([]int32, error) {
	s = strings.TrimSpace(s)
	var ids []int32
	if strings.HasPrefix(s, "[") {
		if err := json.Unmarshal([]byte(s), &ids); err != nil {
			return nil, fmt.Errorf("token ids: %w", err)
		}
	} else {
		for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\t' || r == '\r' }) {
			v, err := strconv.ParseInt(f, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("token ids: %q is not an integer", f)
			}
			ids = append(ids, int32(v))
		}
	}
	return ids, checkIDs(ids, vocab)
}

func checkIDs(ids []int32, vocab int) error {
	for _, id := range ids {
		if id < 0 || int(id) >= vocab {
			return fmt.Errorf("token id %d out of range [0,%d)", id, vocab)
		}
	}
	return nil
}
