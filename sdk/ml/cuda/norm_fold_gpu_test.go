//go:build gpu

package cuda

import (
	"fmt"
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// TestFoldNorm on the device (session 5): an (Add)RMSNorm followed by the
// GEMVs that read its output runs as one launch (orch_matmul_multi_norm,
// fuse.go holdNorm). The residual, the normalised rows and every GEMV output
// must be the bytes of the two-launch path (foldNorm off), eagerly and over
// graph replays (the ticket resets itself: a stale one would leave res or dst
// unwritten, poisoned), and match the CPU backend.
func TestFoldNormGPU(t *testing.T) {
	r := newRNG(t)
	defer func(v, w bool) { fuseOps, foldNorm = v, w }(fuseOps, foldNorm)
	if gpu.l.matmulMultiNorm == nil {
		t.Skip("library without orch_matmul_multi_norm")
	}
	type tc struct {
		dt       ml.DType
		n, k     int
		ms       []int
		add, inp bool // AddRMSNorm; in place (the output norm)
	}
	cases := []tc{
		{ml.Q8_0, 1, 2880, []int{4096, 512, 512}, true, false}, // gpt-oss attention norm -> q, k, v
		{ml.Q8_0, 2, 4096, []int{14336, 14336}, true, false},   // Llama FFN norm -> gate, up; 2 tokens
		{ml.Q8_0, 1, 4096, []int{4096, 1024, 1024}, false, false},
		{ml.Q8_0, 1, 2880, []int{20000}, false, true}, // output norm in place -> LM head (a slice)
		{ml.MXFP4, 2, 2880, []int{2880}, true, false},
		{ml.Q4_0, 1, 4096, []int{512, 64}, true, false},
	}
	for _, c := range cases {
		name := fmt.Sprintf("%v/n=%d/k=%d/parts=%d/add=%v/inplace=%v", c.dt, c.n, c.k, len(c.ms), c.add, c.inp)
		t.Run(name, func(t *testing.T) {
			x0, a0 := randF32(r, c.k*c.n, 2), randF32(r, c.k*c.n, 1)
			nw := f32Pair(t, randF32(r, c.k, 1), c.k)
			res, add := f32Pair(t, x0, c.k, c.n), f32Pair(t, a0, c.k, c.n)
			dst := out(t, c.k, c.n)
			if c.inp {
				dst = res
			}
			ws, ys := make([]pair, len(c.ms)), make([]pair, len(c.ms))
			bias := make([]pair, len(c.ms))
			for i, m := range c.ms {
				ws[i] = weightPair(t, "w", c.dt, []int{c.k, m}, randWeight(r, c.dt, c.k, m))
				ys[i] = out(t, m, c.n)
				if i == 0 {
					bias[i] = f32Pair(t, randF32(r, m, 1), m)
				}
			}
			step := func() {
				if c.add {
					gpu.AddRMSNorm(res.g, dst.g, add.g, nw.g, 1e-5)
				} else {
					gpu.RMSNorm(dst.g, res.g, nw.g, 1e-5)
				}
				for i := range ws {
					gpu.MatMul(ys[i].g, dst.g, ws[i].g, bias[i].g)
				}
			}
			reset := func() {
				require.NoError(t, gpu.WriteF32(res.g, x0))
				if !c.inp {
					gpu.Fill(dst.g, float32(math.NaN()))
				}
				for i := range ys {
					gpu.Fill(ys[i].g, float32(math.NaN()))
				}
			}
			read := func() [][]float32 {
				v := [][]float32{readF32(t, res.g), readF32(t, dst.g)}
				for i := range ys {
					v = append(v, readF32(t, ys[i].g))
				}
				require.NoError(t, gpu.Err())
				return v
			}
			fuseOps, foldNorm = true, false
			reset()
			step()
			want := read()
			fuseOps, foldNorm = true, true
			for rep := 0; rep < 4; rep++ { // eager twice, then graph capture and replays
				reset()
				if rep < 2 {
					step()
				} else {
					require.NoError(t, gpu.Run("foldnorm-"+name, step))
				}
				got := read()
				for i := range got {
					sameBits(t, fmt.Sprintf("%s rep %d output %d (res, dst, y...)", name, rep, i), want[i], got[i])
				}
			}
			// and against the CPU backend
			rc := res.c
			if c.add {
				ref.AddRMSNorm(rc, dst.c, add.c, nw.c, 1e-5)
			} else {
				ref.RMSNorm(dst.c, rc, nw.c, 1e-5)
			}
			for i := range ws {
				var b ml.Tensor
				if bias[i].c != nil {
					b = bias[i].c
				}
				ref.MatMul(ys[i].c, dst.c, ws[i].c, b)
				cv := make([]float32, ys[i].c.Len())
				require.NoError(t, ref.ReadF32(ys[i].c, cv))
				checkVec(t, fmt.Sprintf("%s y%d vs CPU", name, i), want[2+i], cv, gemvTol(c.dt, c.n, true))
			}
			cv := make([]float32, dst.c.Len())
			require.NoError(t, ref.ReadF32(dst.c, cv))
			checkVec(t, name+" dst vs CPU", want[1], cv, 1e-5)
			gpu.ResetGraphs()
		})
	}
}
