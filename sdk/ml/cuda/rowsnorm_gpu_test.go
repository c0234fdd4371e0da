//go:build gpu

package cuda

import (
	"fmt"
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// TestRowsNorm: Embed -> RMSNorm of its output (rowsnorm.go) is one
// orch_get_rows_rmsnorm launch whose outputs are bit-identical to the two
// launches (ORCH_CUDA_ROWS_NORM off), for every weight type get_rows reads
// at dim 2880 (gpt-oss) and 4096 (Llama), 1 and 3 rows, fresh random inputs,
// poisoned outputs: "kept" is Hidden's RMSNorm(h, x) (x and h compared; the
// entry with x not kept too), "inplace" Head's RMSNorm(x, x), "view" the
// runner's head (a Rows view of the gathered rows between the two ops).
//
//	bin/cuda-gpu.test -test.run 'TestRowsNorm' -test.v
func TestRowsNorm(t *testing.T) {
	defer func(v, rn bool) { fuseOps, fuseRowsNorm = v, rn }(fuseOps, fuseRowsNorm)
	fuseOps = true
	r := newRNG(t)
	require.NotNil(t, gpu.l.getRowsRMSNorm, "the library lacks orch_get_rows_rmsnorm")
	require.NoError(t, gpu.Sync())
	require.True(t, gpu.rows().hooked, "flush does not call flushRows (fuse.go)")
	const vocab, eps = 300, float32(1e-5)
	poisoned := func(t *testing.T, shape ...int) ml.Tensor {
		p, err := gpu.Alloc(ml.F32, shape...)
		require.NoError(t, err)
		t.Cleanup(func() { gpu.Free(p) })
		gpu.Fill(p, float32(math.NaN()))
		return p
	}
	for _, dt := range ml.WeightDTypes {
		for _, dim := range []int{2880, 4096} {
			if dim%dt.BlockSize() != 0 {
				continue // get_rows declines (Q4_K / Q6_K at 2880)
			}
			for _, n := range []int{1, 3} {
				for _, mode := range []string{"kept", "inplace", "view"} {
					t.Run(fmt.Sprintf("%v/dim=%d/n=%d/%s", dt, dim, n, mode), func(t *testing.T) {
						var tb ml.Tensor
						if dt == ml.F32 { // the head gathers from activations
							tb = f32Pair(t, randF32(r, dim*vocab, 1), dim, vocab).g
						} else {
							tb = weightPair(t, "tok", dt, []int{dim, vocab}, randWeight(r, dt, dim, vocab)).g
						}
						w := f32Pair(t, randF32(r, dim, 1), dim).g
						ids := make([]int32, n)
						for i := range ids {
							ids[i] = int32(r.IntN(vocab))
						}
						ids[n-1] = vocab - 1
						id := i32Pair(t, ids, n).g
						run := func(fold bool) (x, h ml.Tensor, launches uint64) {
							fuseRowsNorm = fold
							x, h = poisoned(t, dim, n), poisoned(t, dim, n)
							require.NoError(t, gpu.Sync())
							l0 := gpu.launches
							gpu.Embed(x, tb, id, false)
							switch mode {
							case "kept":
								gpu.RMSNorm(h, x, w, eps)
							case "inplace":
								gpu.RMSNorm(x, x, w, eps)
							case "view":
								v, err := gpu.Rows(x, 0, n)
								require.NoError(t, err)
								gpu.RMSNorm(v, v, w, eps)
							}
							require.NoError(t, gpu.Sync())
							return x, h, gpu.launches - l0
						}
						x0, h0, l0 := run(false)
						x1, h1, l1 := run(true)
						require.Equal(t, uint64(2), l0, "two launches without the fold")
						require.Equal(t, uint64(1), l1, "one launch with the fold (view: Rows must use getKeepRows)")
						sameBits(t, "x", readF32(t, x1), readF32(t, x0))
						if mode != "kept" {
							return
						}
						sameBits(t, "h", readF32(t, h1), readF32(t, h0))
						// the entry with the gathered rows not kept
						h2, tt, ip, wt := poisoned(t, dim, n), tb.(*tensor), id.(*tensor), w.(*tensor)
						gpu.call("rows_norm", gpu.l.getRowsRMSNorm(gpu.ctx, 0, h2.(*tensor).ptr, tt.ptr, int32(tt.dt), ip.ptr,
							int64(n), int64(dim), wt.ptr, eps))
						require.NoError(t, gpu.Sync())
						sameBits(t, "h, x not kept", readF32(t, h2), readF32(t, h0))
					})
				}
			}
		}
	}
}

// TestRowsNormGraph: a decode step's two folds (the token's embedding row
// and layer-0 norm; the gather of the output rows from h and the in-place
// output norm through a view) captured into a graph: two launches fewer than without the fold, and
// the capture's launch and two replays give the eager unfused bits.
//
//	bin/cuda-gpu.test -test.run 'TestRowsNormGraph' -test.v
func TestRowsNormGraph(t *testing.T) {
	defer func(v, rn bool) { fuseOps, fuseRowsNorm = v, rn }(fuseOps, fuseRowsNorm)
	fuseOps = true
	r := newRNG(t)
	require.NotNil(t, gpu.l.getRowsRMSNorm, "the library lacks orch_get_rows_rmsnorm")
	const d, vocab, n, eps = 2880, 300, 1, float32(1e-5)
	tok := weightPair(t, "tok", ml.Q8_0, []int{d, vocab}, randWeight(r, ml.Q8_0, d, vocab)).g
	w1, w2 := f32Pair(t, randF32(r, d, 1), d).g, f32Pair(t, randF32(r, d, 1), d).g
	id := i32Pair(t, []int32{int32(r.IntN(vocab))}, n).g
	out := i32Pair(t, []int32{0}, n).g
	x, h, g := out2(t, d, n), out2(t, d, n), out2(t, d, n)
	step := func() {
		gpu.Embed(x, tok, id, false)
		gpu.RMSNorm(h, x, w1, eps)
		gpu.Embed(g, h, out, false)
		v, err := gpu.Rows(g, 0, n)
		require.NoError(t, err)
		gpu.RMSNorm(v, v, w2, eps)
	}
	fuseRowsNorm = false
	step()
	want := [][]float32{readF32(t, x), readF32(t, h), readF32(t, g)}
	// capture records step under a fresh key (fold on or off) and returns its launches; then the capture's launch
	// and two replays each give the eager unfused bits
	capture := func(fold bool) uint64 {
		fuseRowsNorm = fold
		graphSeq++
		key := fmt.Sprintf("rows-norm-%d", graphSeq)
		var n uint64
		for i := range 3 {
			for _, p := range []ml.Tensor{x, h, g} {
				gpu.Fill(p, float32(math.NaN()))
			}
			require.NoError(t, gpu.Sync())
			l0 := gpu.launches
			require.NoError(t, gpu.Run(key, step))
			if i == 0 {
				n = gpu.launches - l0
			}
			for j, p := range []ml.Tensor{x, h, g} {
				sameBits(t, fmt.Sprintf("fold %t run %d output %d", fold, i, j), readF32(t, p), want[j])
			}
		}
		return n
	}
	gpu.ResetGraphs()
	plain, folded := capture(false), capture(true)
	require.Equal(t, plain-2, folded, "two launches fewer in the capture")
}

func out2(t *testing.T, shape ...int) ml.Tensor {
	p, err := gpu.Alloc(ml.F32, shape...)
	require.NoError(t, err)
	t.Cleanup(func() { gpu.Free(p) })
	return p
}
