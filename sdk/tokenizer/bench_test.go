//go:build unix

package tokenizer_test

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/llama-orch/orch/sdk/tokenizer"
)

// benchTexts are the inputs testdata/gen/bench.mjs times npm tiktoken on:
// the golden corpus joined by newlines (multilingual, emoji, random
// strings) and Go's net/http/server.go (code and English comments).
func benchTexts(b *testing.B) map[string]string {
	src, err := os.ReadFile(filepath.Join(runtime.GOROOT(), "src", "net", "http", "server.go"))
	if err != nil {
		b.Skipf("Go source for the benchmark text: %v", err)
	}
	return map[string]string{
		"corpus": strings.Join(loadCorpus(b), "\n"),
		"gosrc":  string(src),
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func benchEncode(b *testing.B, tok *tokenizer.Tokenizer) {
	for _, name := range []string{"corpus", "gosrc"} {
		text := benchTexts(b)[name]
		b.Run(name, func(b *testing.B) {
			n := len(tok.Encode(text, tokenizer.EncodeOptions{}))
			b.SetBytes(int64(len(text)))
			c0 := cpuTime()
			b.ResetTimer()
			for b.Loop() {
				tok.Encode(text, tokenizer.EncodeOptions{})
			}
			cpu := (cpuTime() - c0).Seconds()
			b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
			// On a shared machine wall time depends on other load; process
			// CPU time (GC included) per op compares better with
			// bench.mjs, which reports the same.
			b.ReportMetric(cpu*1e3/float64(b.N), "cpu-ms/op")
			b.ReportMetric(float64(n)*float64(b.N)/cpu, "tokens/cpu-s")
		})
	}
}

func BenchmarkEncodeO200k(b *testing.B)  { benchEncode(b, o200k(b)) }
func BenchmarkEncodeLlama3(b *testing.B) { benchEncode(b, llama3(b)) }
func BenchmarkEncodeLlama2(b *testing.B) { benchEncode(b, llama2(b)) }
func BenchmarkEncodeGPT2(b *testing.B)   { benchEncode(b, gpt2(b)) }

func BenchmarkDecodeO200k(b *testing.B) {
	tok := o200k(b)
	ids := tok.Encode(benchTexts(b)["gosrc"], tokenizer.EncodeOptions{})
	b.ResetTimer()
	for b.Loop() {
		tok.Decode(ids)
	}
	b.ReportMetric(float64(len(ids))*float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
}
