package gguf_test

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"

	"github.com/llama-orch/orch/sdk/gguf"
)

func Example() {
	dir, _ := os.MkdirTemp("", "gguf-example")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "model.gguf")

	w := gguf.NewWriter()
	w.Set("general.architecture", "llama")
	w.Set("llama.block_count", uint32(2))
	w.Set("tokenizer.ggml.tokens", []string{"a", "b"})
	_ = w.AddTensor("output_norm.weight", gguf.TypeF32, []int64{4}, func(out io.Writer) error {
		for _, v := range []float32{1, 2, 3, 4} {
			if err := binary.Write(out, binary.LittleEndian, math.Float32bits(v)); err != nil {
				return err
			}
		}
		return nil
	})
	if err := w.WriteFile(path, nil); err != nil {
		fmt.Println(err)
		return
	}

	f, err := gguf.Open(path)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer f.Close()
	n, _ := f.Uint(f.Architecture() + ".block_count")
	toks, _ := f.Strings("tokenizer.ggml.tokens")
	t, _ := f.Tensor("output_norm.weight")
	data, _ := f.Data(t) // a slice of the memory mapping
	fmt.Println(f.Architecture(), n, toks, t.Shape, t.Type, len(data))
	// Output: llama 2 [a b] [4] F32 16
}
