package cpu

import (
	"fmt"
	"math/rand/v2"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
)

// cpuTime is the process's user+system CPU time (the machine is shared, so
// CPU time per token is the comparable figure, not wall time).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchMatrices runs MatMul over every 2-D weight matrix of a GGUF model
// (the bulk of a forward pass: QKV, attention output, FFN up/down and the
// tied LM head) with n activation rows, and reports CPU-ms per token.
func benchMatrices(b *testing.B, path string) {
	f, err := gguf.Open(path)
	require.NoError(b, err)
	defer f.Close()
	be := New(0)
	type mat struct {
		w       ml.Tensor
		in, out int
	}
	var mats []mat
	maxIn, maxOut := 0, 0
	for i := range f.Tensors {
		ti := &f.Tensors[i]
		if len(ti.Shape) != 2 || ti.Name == "position_embd.weight" {
			continue
		}
		data, err := f.Data(ti)
		require.NoError(b, err)
		in, out := int(ti.Shape[0]), int(ti.Shape[1])
		w, err := be.Weight(ti.Name, ml.DType(ti.Type), []int{in, out}, data)
		require.NoError(b, err)
		mats = append(mats, mat{w, in, out})
		maxIn, maxOut = max(maxIn, in), max(maxOut, out)
	}
	require.NotEmpty(b, mats)
	impls := []bool{false}
	if useAVX {
		impls = append(impls, true)
	}
	for _, avx := range impls {
		for _, n := range []int{1, 8, 128} {
			kind := "portable"
			if avx {
				kind = "avx2"
			}
			b.Run(fmt.Sprintf("%s/n=%d", kind, n), func(b *testing.B) {
				old := useAVX
				useAVX = avx
				defer func() { useAVX = old }()
				rng := rand.New(rand.NewPCG(1, 2))
				xs := randF32(rng, maxIn*n, 1)
				ys := make([]float32, maxOut*n)
				xt := tensorF32(b, be, xs, maxIn*n)
				yt := tensorF32(b, be, ys, maxOut*n)
				cpu0 := cpuTime()
				b.ResetTimer()
				for range b.N {
					for _, m := range mats {
						x, err := be.Reshape(mustRows(b, be, xt, m.in*n), m.in, n)
						require.NoError(b, err)
						y, err := be.Reshape(mustRows(b, be, yt, m.out*n), m.out, n)
						require.NoError(b, err)
						be.MatMul(y, x, m.w, nil)
					}
					require.NoError(b, be.Sync())
				}
				b.StopTimer()
				b.ReportMetric((cpuTime()-cpu0).Seconds()*1e3/float64(b.N*n), "cpu-ms/tok")
			})
		}
	}
}

func mustRows(b *testing.B, be *Backend, t ml.Tensor, n int) ml.Tensor {
	r, err := be.Rows(t, 0, n)
	require.NoError(b, err)
	return r
}

// BenchmarkMatricesDefault: the embedded default model (Q8_0).
func BenchmarkMatricesDefault(b *testing.B) {
	path := "../../../host/defaultmodel/model.gguf"
	if _, err := os.Stat(path); err != nil {
		b.Skip("no default model")
	}
	benchMatrices(b, path)
}

// BenchmarkMatricesGGUF: any model, e.g. ORCH_BENCH_GGUF=/tmp/g124.gguf after
// `orch-host synth --arch gpt2 --size 124m --out /tmp/g124.gguf`.
func BenchmarkMatricesGGUF(b *testing.B) {
	path := os.Getenv("ORCH_BENCH_GGUF")
	if path == "" {
		b.Skip("set ORCH_BENCH_GGUF to a .gguf file")
	}
	benchMatrices(b, path)
}
