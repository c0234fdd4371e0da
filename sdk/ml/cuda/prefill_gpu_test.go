//go:build gpu

// GPU tests and timing of orch_matmul's large-n path (cuda/src/matmul_prefill.cu:
// dequantize + cuBLAS, and the versions selected by ORCH_CUDA_PREFILL).

package cuda

import (
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// prefillVariants are the environments the tests below re-run themselves
// under (child processes: the library reads ORCH_CUDA_PREFILL once per
// process): v1, v2 (default), v2 with 32 MiB tiles (the bf16 tile then
// stays in L2 for cuBLAS, at the price of thinner cuBLAS calls); timing only
// (wrong results, not checked): v2's dequantization alone and its cuBLAS
// calls alone (each with x's conversion and the bias fill); v2 with the bf16
// weight cache (bf16cache.go: each weight's bf16 copy made on its first
// Backend.MatMul, then cuBLAS only; timing here, its correctness is
// TestBF16Cache: bit-identical to the per-call dequantization).
var prefillVariants = []struct {
	name       string
	env        []string
	timingOnly bool
}{
	{"v1", []string{"ORCH_CUDA_PREFILL=v1", "ORCH_CUDA_BF16_CACHE=off"}, false},
	{"v2", []string{"ORCH_CUDA_PREFILL=v2", "ORCH_CUDA_BF16_CACHE=off"}, false},
	{"v2 cap 32 MiB", []string{"ORCH_CUDA_PREFILL=v2", "ORCH_CUDA_PREFILL_CAP=32", "ORCH_CUDA_BF16_CACHE=off"}, false},
	{"v2 dequant only", []string{"ORCH_CUDA_PREFILL=v2", "ORCH_CUDA_PREFILL_TIMING=dequant", "ORCH_CUDA_BF16_CACHE=off"}, true},
	{"v2 cuBLAS only", []string{"ORCH_CUDA_PREFILL=v2", "ORCH_CUDA_PREFILL_TIMING=gemm", "ORCH_CUDA_BF16_CACHE=off"}, true},
	{"v2 + bf16 cache", []string{"ORCH_CUDA_PREFILL=v2", "ORCH_CUDA_BF16_CACHE=on"}, true},
}

// runPrefillChildren re-runs test in one child process per variant (same
// card) and returns the lines of the children's output that hold a table
// row, with parent = true; in a child (or a process pinned by the caller's
// ORCH_CUDA_PREFILL) it returns parent = false and the caller does the work.
func runPrefillChildren(t *testing.T, test string, perf bool) (rows []string, parent bool) {
	if os.Getenv("ORCH_PREFILL_CHILD") != "" || os.Getenv("ORCH_CUDA_PREFILL") != "" {
		return nil, false
	}
	for _, v := range prefillVariants {
		if v.timingOnly && !perf {
			continue
		}
		cmd := exec.Command(os.Args[0], "-test.run", "^"+test+"$", "-test.v")
		cmd.Env = append(append(os.Environ(), "ORCH_PREFILL_CHILD="+v.name), v.env...)
		outp, err := cmd.CombinedOutput()
		for _, line := range strings.Split(string(outp), "\n") {
			if i := strings.Index(line, "|"); i >= 0 {
				t.Log(line[i:])
				rows = append(rows, line[i:])
			}
		}
		require.NoError(t, err, "%s child:\n%s", v.name, outp)
	}
	return rows, true
}

// TestMatMulPrefill checks orch_matmul's large-n path (called directly, so
// any n > 8 reaches it; n = 97 also has 97 % 8 != 0 token rows) against the
// CPU backend, Q8_0 under every prefillVariants entry and every other weight
// type under v2, with and without bias and accumulate, ragged m, outputs
// poisoned with NaN (accumulate: random).
func TestMatMulPrefill(t *testing.T) {
	if _, parent := runPrefillChildren(t, "TestMatMulPrefill", false); parent {
		return
	}
	r := newRNG(t)
	type shape struct{ k, m, n int }
	shapes := []shape{{512, 203, 97}, {2880, 130, 200}, {4096, 72, 130}}
	for _, dt := range ml.WeightDTypes {
		shs := shapes
		if dt != ml.Q8_0 {
			// Q8_0 has its own dequantization kernel from v2 on; the other
			// types take the generic one in every version (tiles and the
			// bias pass differ): one shape, in the v2 child.
			if os.Getenv("ORCH_PREFILL_CHILD") != "v2" {
				continue
			}
			shs = shapes[:1]
		}
		for _, sh := range shs {
			for _, c := range []struct{ bias, acc bool }{{false, false}, {true, false}, {true, true}, {false, true}} {
				name := fmt.Sprintf("%s/%v/k=%d/m=%d/n=%d/bias=%v/acc=%v", os.Getenv("ORCH_PREFILL_CHILD"), dt, sh.k, sh.m, sh.n, c.bias, c.acc)
				t.Run(name, func(t *testing.T) { prefillCase(t, r, dt, sh.k, sh.m, sh.n, c.bias, c.acc) })
			}
		}
	}
	// v2's tiling: 8192 x 8200 is over the 128 MiB cap (two tiles of 4104
	// rows); n = 9 reaches the large-n path through orch_matmul directly.
	t.Run("Q8_0/two-tiles", func(t *testing.T) { prefillCase(t, r, ml.Q8_0, 8192, 8200, 9, true, false) })
	// Captured into a CUDA graph (cuBLAS, the fused first launch) and
	// replayed on new x: must match the CPU.
	t.Run("Q8_0/graph", func(t *testing.T) {
		const k, m, n = 2880, 1030, 130
		w := weightPair(t, "w", ml.Q8_0, []int{k, m}, randWeight(r, ml.Q8_0, k, m))
		x := f32Pair(t, randF32(r, k*n, 1), k, n)
		bias := f32Pair(t, randF32(r, m, 1), m)
		y := out(t, m, n)
		yp, xp, wp, bp := dptr(t, y.g), dptr(t, x.g), dptr(t, w.g), dptr(t, bias.g)
		key := "prefill-graph-" + os.Getenv("ORCH_PREFILL_CHILD")
		rec := func() { gpu.call("matmul", gpu.l.matmul(gpu.ctx, yp, xp, wp, int32(ml.Q8_0), bp, n, k, m, 0)) }
		require.NoError(t, gpu.Run(key, rec))
		x2 := randF32(r, k*n, 1)
		require.NoError(t, gpu.WriteF32(x.g, x2))
		require.NoError(t, ref.WriteF32(x.c, x2))
		gpu.Fill(y.g, float32(math.NaN()))
		require.NoError(t, gpu.Run(key, rec))
		ref.MatMul(y.c, x.c, w.c, bias.c)
		checkClose(t, "graph replay", y, bf16Tol)
	})
	// In place (y is x, k = m) with a bias: x must be read before y is written.
	t.Run("Q8_0/in-place", func(t *testing.T) {
		const k, m, n = 512, 512, 130
		w := weightPair(t, "w", ml.Q8_0, []int{k, m}, randWeight(r, ml.Q8_0, k, m))
		x := f32Pair(t, randF32(r, k*n, 1), k, n)
		bias := f32Pair(t, randF32(r, m, 1), m)
		want := out(t, m, n)
		ref.MatMul(want.c, x.c, w.c, bias.c)
		xp := dptr(t, x.g)
		require.NoError(t, gpu.l.status("matmul", gpu.l.matmul(gpu.ctx, xp, xp, dptr(t, w.g), int32(ml.Q8_0), dptr(t, bias.g), n, k, m, 0)))
		ref.Copy(x.c, want.c)
		checkClose(t, "in place", x, bf16Tol)
	})
	// n = 1000, m = 1030, k = 160: a large n, ragged m.
	t.Run("Q8_0/k=160", func(t *testing.T) { prefillCase(t, r, ml.Q8_0, 160, 1030, 1000, true, true) })
}

func prefillCase(t *testing.T, rr *rand.Rand, dt ml.DType, k, m, n int, withBias, acc bool) {
	w := weightPair(t, "w", dt, []int{k, m}, randWeight(rr, dt, k, m))
	x := f32Pair(t, randF32(rr, k*n, 1), k, n)
	var bias pair
	if withBias {
		bias = f32Pair(t, randF32(rr, m, 1), m)
	}
	y := f32Pair(t, randF32(rr, m*n, 1), m, n)
	if !acc {
		gpu.Fill(y.g, float32(math.NaN()))
	}
	rc := gpu.l.matmul(gpu.ctx, dptr(t, y.g), dptr(t, x.g), dptr(t, w.g), int32(dt), dptr(t, bias.g),
		int64(n), int64(k), int64(m), b2i(acc))
	require.NoError(t, gpu.l.status("matmul", rc))
	tmp := out(t, m, n)
	ref.MatMul(tmp.c, x.c, w.c, bias.c)
	if acc {
		ref.Add(y.c, y.c, tmp.c)
	} else {
		ref.Copy(y.c, tmp.c)
	}
	tol := bf16Tol
	if dt == ml.F32 {
		tol = 1e-4
	}
	checkClose(t, fmt.Sprintf("%v k=%d m=%d n=%d", dt, k, m, n), y, tol)
}

// TestPerfPrefillMatMul times orch_matmul's large-n path at the prefill
// shapes the models call (Llama-3-8B Q8_0: q, k / v, o, gate / up, down, and
// the merged qkv; gpt-oss-20b: q, k / v, o; n = 512 is the engine's prefill
// chunk, 2048 for reference), one child process per ORCH_CUDA_PREFILL
// version on the same card. Floor: max(Q8_0 W + f32 x + f32 y bytes at the
// measured copy rate, FLOPs at the card's dense bf16 rate, 989 TFLOP/s).
//
//	ORCH_GPU_PERF=1 bin/cuda-gpu.test -test.run PerfPrefillMatMul -test.v
//
// (cuda/scripts/e2e-gpu.sh's tables step runs it by name; a broad
// -test.run TestPerf skips it. With ORCH_PERF_OUT set the table also goes
// next to it as perf-prefill.md.)
func TestPerfPrefillMatMul(t *testing.T) {
	if os.Getenv("ORCH_GPU_PERF") == "" {
		t.Skip("set ORCH_GPU_PERF=1 to time the prefill matmul")
	}
	// Child processes: only when asked for by name (e2e-gpu.sh's
	// tables step), not inside the broad -test.run TestPerf timing runs.
	if f := flag.Lookup("test.run"); f == nil || !strings.Contains(f.Value.String(), "PrefillMatMul") {
		t.Skip("run by name: -test.run TestPerfPrefillMatMul")
	}
	if table, parent := runPrefillChildren(t, "TestPerfPrefillMatMul", true); parent {
		if po := os.Getenv("ORCH_PERF_OUT"); po != "" {
			f := filepath.Join(filepath.Dir(po), "perf-prefill.md")
			require.NoError(t, os.WriteFile(f, []byte(strings.Join(table, "\n")+"\n"), 0o644))
		}
		return
	}
	version := os.Getenv("ORCH_PREFILL_CHILD")
	if version == "" {
		version = "ORCH_CUDA_PREFILL=" + os.Getenv("ORCH_CUDA_PREFILL")
	}
	r := newRandSrc(newRNG(t))
	// Copy rate (read + write), as TestPerf.
	peak := copyPeak(t)
	t.Logf("| prefill matmul %s on %s | measured | TFLOP/s | floor | of floor |", version, gpu.DeviceName())
	type shape struct {
		name string
		k, m int
	}
	shapes := []shape{
		{"llama q / o", 4096, 4096}, {"llama k / v", 4096, 1024}, {"llama qkv merged", 4096, 6144},
		{"llama gate / up", 4096, 14336}, {"llama down", 14336, 4096},
		{"gpt-oss q", 2880, 4096}, {"gpt-oss k / v", 2880, 512}, {"gpt-oss o", 4096, 2880},
	}
	for _, sh := range shapes {
		w := mustW(t, r, sh.name, ml.Q8_0, sh.k, sh.m)
		bias := mustA(t, ml.F32, sh.m)
		require.NoError(t, gpu.WriteF32(bias, r.f32(sh.m)))
		if gpu.bc.on {
			// the bf16 copy, made by one Backend.MatMul at a large n (the
			// "direct" rows call orch_matmul, which only uses it)
			x, y := mustA(t, ml.F32, sh.k, 512), mustA(t, ml.F32, sh.m, 512)
			gpu.MatMul(y, x, w, nil)
			require.NoError(t, gpu.Sync())
			gpu.Free(x)
			gpu.Free(y)
			nw, nb := gpu.BF16CacheStats()
			require.Positive(t, nw, "no bf16 copy made")
			t.Logf("bf16 cache: %d weights, %d MiB", nw, nb>>20)
		}
		// n = 32 .. 128: where the large-n path could take over from GEMV v9
		// / qgemm (Backend.MatMul routes n <= qgemmMaxN there): "direct"
		// calls orch_matmul (this version's large-n path) at any n, "routed"
		// goes through Backend.MatMul (GEMV v9 or qgemm up to qgemmMaxN).
		for _, n := range []int{32, 64, 96, 128, 512, 2048} {
			x := mustA(t, ml.F32, sh.k, n)
			require.NoError(t, gpu.WriteF32(x, r.f32(sh.k*n)))
			y := mustA(t, ml.F32, sh.m, n)
			var b ml.Tensor
			if strings.HasPrefix(sh.name, "gpt-oss") { // gpt-oss's projections have biases
				b = bias
			}
			rb, _ := ml.Q8_0.RowBytes(sh.k)
			bytes := float64(rb*sh.m) + 4*float64(sh.k*n+sh.m*n)
			flops := 2 * float64(sh.k) * float64(sh.m) * float64(n)
			floor := max(bytes/peak, flops/h100BF16) * 1e3
			row := func(label string, ms float64) {
				t.Logf("| Q8_0 %s %dx%d n=%d (%s%s) | %.4f ms | %.0f | %.4f ms | %.0f%% |", sh.name, sh.k, sh.m, n, version,
					label, ms, flops/ms/1e9, floor, 100*floor/ms)
			}
			if n <= 128 {
				if sh.m < 4096 { // the large shapes only
					gpu.Free(x)
					gpu.Free(y)
					continue
				}
				yp, xp, wp, bp := dptr(t, y), dptr(t, x), dptr(t, w), dptr(t, b)
				direct := timeKernel(t, 10, 4, func() {
					gpu.call("matmul", gpu.l.matmul(gpu.ctx, yp, xp, wp, int32(ml.Q8_0), bp, int64(n), int64(sh.k), int64(sh.m), 0))
				})
				row(", direct", direct)
				if n <= qgemmMaxN && os.Getenv("ORCH_PREFILL_CHILD") == "v2" { // the same in every child
					row(", routed (GEMV v9 / qgemm)", timeKernel(t, 10, 4, func() { gpu.MatMul(y, x, w, b) }))
				}
			} else {
				ms := timeKernel(t, 10, 4, func() { gpu.MatMul(y, x, w, b) })
				row("", ms)
			}
			require.NoError(t, gpu.Sync())
			gpu.Free(x)
			gpu.Free(y)
		}
		gpu.Free(w)
		gpu.Free(bias)
	}
}
