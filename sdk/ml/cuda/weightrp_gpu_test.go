//go:build gpu

package cuda

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// TestMoERepacked: MXFP4 expert weights made by Weight carry the repacked rows (weightrp.go), and MoE v10 on them
// (ORCH_T_MXFP4_DUAL) gives the plain rows' ids, weights and output bit for bit at the gpt-oss-20b shape: through
// orch_moe_decode_norm at 1, 2, 5 and 8 tokens (v10 whenever ORCH_CUDA_MOE is unset, one token included) and
// orch_moe_decode at 2..8 (unpinned: v10 from two tokens), the same tensors passed as MXFP4 and as DUAL.
func TestMoERepacked(t *testing.T) {
	if gpu.l.weightRepack == nil || !rpType(ml.MXFP4) {
		t.Skip("no orch_weight_repack in the library, or ORCH_CUDA_WEIGHT_RP keeps MXFP4 plain")
	}
	r := newRandSrc(newRNG(t))
	const d, ff, ne, topk = 2880, 2880, 32, 4
	mo := r.moe(t, d, ff, ne, topk)
	gate, up, down := mo.Gate.(*tensor), mo.Up.(*tensor), mo.Down.(*tensor)
	require.True(t, gate.rp && up.rp && down.rp, "the expert weights must carry the repacked rows")
	gu, dn := moeWTypes(gate, up, down)
	require.Equal(t, int32(tMXFP4Dual), gu)
	require.Equal(t, int32(tMXFP4Dual), dn)
	ptr := func(x ml.Tensor) uintptr { return x.(*tensor).ptr }
	f32 := func(v []float32, shape ...int) ml.Tensor {
		x := mustA(t, ml.F32, shape...)
		require.NoError(t, gpu.WriteF32(x, v))
		return x
	}
	normW := f32(r.f32(d), d)
	for _, n := range []int{1, 2, 5, 8} {
		xv, resv, addv := r.f32(d*n), r.f32(d*n), r.f32(d*n)
		type result struct {
			out, w, x, res []float32
			ids            []int32
		}
		run := func(wt int32, norm bool) (result, int32) {
			x, res, add := f32(xv, d, n), f32(resv, d, n), f32(addv, d, n)
			out := mustA(t, ml.F32, d, n)
			ids := mustA(t, ml.I32, topk*n)
			w := mustA(t, ml.F32, topk*n)
			act := mustA(t, ml.F32, ff*topk*n)
			yb := mustA(t, ml.F32, d*topk*n)
			var rc int32
			if norm {
				rc = gpu.l.moeDecodeNorm(gpu.ctx, ptr(out), ptr(x), ptr(res), ptr(add), ptr(normW), 1e-5, ptr(mo.Router),
					int32(ml.F32), ptr(mo.RouterBias), ne, ptr(ids), ptr(w), gate.ptr, up.ptr, wt, ptr(mo.GateBias),
					ptr(mo.UpBias), down.ptr, wt, ptr(mo.DownBias), ptr(act), ptr(yb), int64(n), topk, d, ff, mo.Alpha,
					mo.Limit)
			} else {
				rc = gpu.l.moeDecode(gpu.ctx, ptr(out), ptr(x), ptr(mo.Router), int32(ml.F32), ptr(mo.RouterBias), ne,
					ptr(ids), ptr(w), gate.ptr, up.ptr, wt, ptr(mo.GateBias), ptr(mo.UpBias), down.ptr, wt,
					ptr(mo.DownBias), ptr(act), ptr(yb), int64(n), topk, d, ff, mo.Alpha, mo.Limit)
			}
			var o result
			if rc == stOK {
				o = result{out: make([]float32, d*n), w: make([]float32, topk*n), x: make([]float32, d*n),
					res: make([]float32, d*n), ids: make([]int32, topk*n)}
				require.NoError(t, gpu.ReadF32(out, o.out))
				require.NoError(t, gpu.ReadF32(w, o.w))
				require.NoError(t, gpu.ReadF32(x, o.x))
				require.NoError(t, gpu.ReadF32(res, o.res))
				require.NoError(t, gpu.ReadI32(ids, o.ids))
			}
			for _, v := range []ml.Tensor{x, res, add, out, ids, w, act, yb} {
				gpu.Free(v)
			}
			return o, rc
		}
		for _, norm := range []bool{true, false} {
			if !norm && n == 1 {
				continue // unpinned orch_moe_decode declines one token (v6 runs)
			}
			plain, rc := run(int32(ml.MXFP4), norm)
			require.Equal(t, int32(stOK), rc, "n=%d norm=%v: the plain rows", n, norm)
			dual, rc := run(tMXFP4Dual, norm)
			require.Equal(t, int32(stOK), rc, "n=%d norm=%v: the repacked rows", n, norm)
			require.Equal(t, plain.ids, dual.ids, "n=%d norm=%v: ids", n, norm)
			what := fmt.Sprintf("n=%d norm=%v", n, norm)
			sameBits(t, what+": weights", plain.w, dual.w)
			sameBits(t, what+": output", plain.out, dual.out)
			sameBits(t, what+": normed x", plain.x, dual.x)
			sameBits(t, what+": residual", plain.res, dual.res)
			t.Logf("n=%d norm=%v: repacked rows = plain rows bit for bit", n, norm)
		}
	}
}

// TestGEMVRepacked: Q8_0 matrices made by Weight carry the repacked rows, and GEMV v5 on them (ORCH_T_Q8_0_DUAL
// through orch_matmul and orch_matmul_multi) gives the plain rows' output bit for bit at one and two tokens: a
// Llama-3-8B down projection (k 14336), gpt-oss q/k (two parts) and an output head past 32768 rows (two rows a warp).
func TestGEMVRepacked(t *testing.T) {
	if gpu.l.weightRepack == nil || !rpType(ml.Q8_0) {
		t.Skip("no orch_weight_repack in the library, or ORCH_CUDA_WEIGHT_RP keeps Q8_0 plain")
	}
	r := newRandSrc(newRNG(t))
	ptr := func(x ml.Tensor) uintptr { return x.(*tensor).ptr }
	for _, c := range []struct {
		name string
		k    int
		ms   []int
	}{{"llama down", 14336, []int{4096}}, {"gpt-oss q+k", 2880, []int{4096, 512}}, {"head", 2880, []int{40000}}} {
		ws := make([]*tensor, len(c.ms))
		for i, m := range c.ms {
			ws[i] = mustW(t, r, c.name, ml.Q8_0, c.k, m).(*tensor)
			require.True(t, ws[i].rp, "%s: the Q8_0 weight must carry the repacked rows", c.name)
			require.Equal(t, int32(tQ80Dual), gemvWType(ws[i]))
		}
		for _, n := range []int{1, 2} {
			x := mustA(t, ml.F32, c.k, n)
			require.NoError(t, gpu.WriteF32(x, r.f32(c.k*n)))
			run := func(wt int32) [][]float32 {
				outs := make([][]float32, len(c.ms))
				ys := make([]ml.Tensor, len(c.ms))
				parts := make([]gemvPart, len(c.ms))
				for i, m := range c.ms {
					ys[i] = mustA(t, ml.F32, m, n)
					parts[i] = gemvPart{w: ws[i].ptr, y: ptr(ys[i]), m: int64(m)}
				}
				if len(c.ms) == 1 {
					require.Equal(t, int32(stOK), gpu.l.matmul(gpu.ctx, parts[0].y, ptr(x), ws[0].ptr, wt, 0, int64(n),
						int64(c.k), int64(c.ms[0]), 0))
				} else {
					require.Equal(t, int32(stOK), gpu.l.matmulMulti(gpu.ctx, ptr(x), wt, int64(n), int64(c.k),
						int32(len(parts)), &parts[0]))
				}
				for i, m := range c.ms {
					outs[i] = make([]float32, m*n)
					require.NoError(t, gpu.ReadF32(ys[i], outs[i]))
					gpu.Free(ys[i])
				}
				return outs
			}
			plain, dual := run(int32(ml.Q8_0)), run(tQ80Dual)
			for i := range plain {
				sameBits(t, fmt.Sprintf("%s n=%d part %d", c.name, n, i), plain[i], dual[i])
			}
			t.Logf("%s n=%d: repacked Q8_0 rows = plain rows bit for bit", c.name, n)
			gpu.Free(x)
		}
		for _, w := range ws {
			gpu.Free(w)
		}
	}
}
