package gguf

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

func fuzzSeeds() [][]byte {
	w := NewWriter()
	w.Set("general.architecture", "gpt2")
	w.Set("a", []int32{1, 2})
	w.Set("n", [][]string{{"x"}, {}})
	w.Set("f", float32(1))
	_ = w.AddTensor("t", TypeQ8_0, []int64{32, 2}, fillBytes(make([]byte, 68)))
	_ = w.AddTensor("u", TypeMXFP4, []int64{32}, fillBytes(make([]byte, 17)))
	var buf bytes.Buffer
	_, _ = w.WriteTo(&buf)
	return [][]byte{buf.Bytes(), foreignFile(), []byte("GGUF"), {}}
}

// FuzzParse checks that no input makes the reader panic, and that whatever
// it accepts is self-consistent.
func FuzzParse(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		g, err := Parse(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			return
		}
		for i := range g.Tensors {
			ti := &g.Tensors[i]
			if ti.Offset < g.DataOffset || ti.Offset+ti.Size > int64(len(data)) {
				t.Fatalf("accepted tensor %q out of bounds", ti.Name)
			}
			if _, err := g.Data(ti); err != nil {
				t.Fatalf("Data: %v", err)
			}
		}
		for _, kv := range g.KV {
			_ = kv.Value.String()
		}
	})
}

// TestWriteFuzzCorpus regenerates testdata/fuzz/FuzzParse from fuzzSeeds
// when ORCH_WRITE_FUZZ_CORPUS=1.
func TestWriteFuzzCorpus(t *testing.T) {
	if os.Getenv("ORCH_WRITE_FUZZ_CORPUS") != "1" {
		t.Skip("set ORCH_WRITE_FUZZ_CORPUS=1 to regenerate the seed corpus")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzParse")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i, s := range fuzzSeeds() {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", s)
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%d", i)), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
