//go:build gpu

package cuda

import (
	"fmt"
	"math"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// TestMoENormFold: AddRMSNorm(res, h, add) then MoE(y, h) (gpt-oss's
// post-attention norm and MoE) with the norm folded into the MoE's route
// kernel (fuse.go foldMoENorm, orch_moe_decode_norm) is bit-identical to the
// two ops launched separately in res, h and y (y: where both run v10;
// unpinned at one token the separate MoE is v6: within the MoE tolerance),
// eagerly, and the fold's own bits over a graph
// capture and two replays (res restored before each: the route tickets must
// be back at 0), runs (the library takes it) where ORCH_CUDA_MOE is unset or
// v10 (1..8 tokens) and where MoE v13 runs (ORCH_CUDA_MOE=v13, or
// ORCH_CUDA_MOE13_FROM; MXFP4), and matches the CPU backend (h 1e-5, y the
// MoE tolerance).
func TestMoENormFold(t *testing.T) {
	r := newRNG(t)
	defer func(v, g bool) { fuseOps, fuseMoENorm = v, g }(fuseOps, fuseMoENorm)
	fuseOps = true
	ver := os.Getenv("ORCH_CUDA_MOE")
	// the library takes the fold: v10 (unpinned or pinned) at 1..8 tokens, MoE v13 where it is routed (MXFP4)
	folds := func(dt ml.DType, n int) bool {
		return (n <= 8 && (ver == "" || ver == "v10")) || (dt == ml.MXFP4 && moe13Expected(n))
	}
	folded := 0 // orch_moe_decode_norm calls that ran
	orig := gpu.l.moeDecodeNorm
	defer func() { gpu.l.moeDecodeNorm = orig }()
	gpu.l.moeDecodeNorm = func(ctx, out, x, res, add, normW uintptr, eps float32, router uintptr, routerType int32,
		routerBias uintptr, nExp int32, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr,
		downType int32, downBias, act, ybuf uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32) int32 {
		rc := orig(ctx, out, x, res, add, normW, eps, router, routerType, routerBias, nExp, ids, w, gate, up, guType,
			gateBias, upBias, down, downType, downBias, act, ybuf, n, slots, dim, ff, alpha, limit)
		if rc == stOK {
			folded++
		}
		return rc
	}
	for _, c := range []struct {
		dt        ml.DType
		d, ff, ne int
	}{{ml.MXFP4, 2880, 96, 32}, {ml.Q8_0, 1056, 64, 8}} {
		for _, n := range []int{1, 2, 8, 16} { // 16: MoE v13's route kernel where it is routed
			name := fmt.Sprintf("%v/d=%d/n=%d", c.dt, c.d, n)
			t.Run(name, func(t *testing.T) {
				d, ff, ne, dt := c.d, c.ff, c.ne, c.dt
				m, mc := randMoE(t, r, dt, d, ff, ne, 4)
				res0 := randF32(r, d*n, 4)
				res, add, nw := f32Pair(t, res0, d, n), f32Pair(t, randF32(r, d*n, 1), d, n), f32Pair(t, randF32(r, d, 1), d)
				h, y := out(t, d, n), out(t, d, n)
				record := func() {
					gpu.AddRMSNorm(res.g, h.g, add.g, nw.g, 1e-5)
					gpu.MoE(y.g, h.g, m)
				}
				reset := func() {
					require.NoError(t, gpu.WriteF32(res.g, res0))
					gpu.Fill(h.g, float32(math.NaN()))
					gpu.Fill(y.g, float32(math.NaN()))
					require.NoError(t, gpu.Sync())
				}
				run := func() [3][]float32 {
					reset()
					f0 := folded
					record()
					require.NoError(t, gpu.Sync())
					if fuseMoENorm && folds(dt, n) {
						require.Equal(t, 1, folded-f0, "the fold must run (orch_moe_decode_norm)")
					} else {
						require.Equal(t, 0, folded-f0, "no fold with the switch off / another MoE version")
					}
					return [3][]float32{readF32(t, res.g), readF32(t, h.g), readF32(t, y.g)}
				}
				fuseMoENorm = false
				sep := run()
				fuseMoENorm = true
				fused := run()
				// y: the same bits where both paths run the same MoE kernels (v10 from 2 tokens, or pinned);
				// unpinned at one token the separate MoE is v6 (router GEMV + top-k: logits summed in another
				// order than v10's route kernel, so the weights may differ in the last bits)
				sameY := n >= 2 || ver == "v10" || !folds(dt, n)
				sameBits(t, name+" res fused vs separate", sep[0], fused[0])
				sameBits(t, name+" h fused vs separate", sep[1], fused[1])
				if sameY {
					sameBits(t, name+" y fused vs separate", sep[2], fused[2])
				} else {
					checkVec(t, name+" y fused vs separate", fused[2], sep[2], moeTol())
				}
				for rep := 0; rep < 3; rep++ { // capture, then replays
					reset()
					require.NoError(t, gpu.Run("moenorm-"+name, record))
					require.NoError(t, gpu.Sync())
					sameBits(t, fmt.Sprintf("%s graph %d res", name, rep), sep[0], readF32(t, res.g))
					sameBits(t, fmt.Sprintf("%s graph %d h", name, rep), sep[1], readF32(t, h.g))
					sameBits(t, fmt.Sprintf("%s graph %d y", name, rep), fused[2], readF32(t, y.g))
				}
				ref.AddRMSNorm(res.c, h.c, add.c, nw.c, 1e-5)
				ref.MoE(y.c, h.c, mc)
				checkClose(t, name+" h vs CPU", h, 1e-5)
				checkClose(t, name+" y vs CPU", y, moeRouteTol(dt, n, 4)) // n = 16: the grouped GEMM's bf16 bound where it runs
			})
		}
	}
}

// TestMoEAddNorm: orch_moe_decode_addnorm (MoE v10 + the next RMSNorm's
// producer half in its down kernel) against the plain op: the output is
// gpu.MoE's bits (MoE v10, unpinned / pinned at 2..8 tokens; the norm-folded
// form at one token), res2 += out, xt = res2 * w2 and the per-8-row sums of
// res2^2 exactly as computed here, eagerly and over a graph capture + replay.
func TestMoEAddNorm(t *testing.T) {
	if gpu.l.moeDecodeAddNorm == nil {
		t.Skip("library without orch_moe_decode_addnorm")
	}
	ver := os.Getenv("ORCH_CUDA_MOE")
	if ver != "" && ver != "v10" {
		t.Skipf("ORCH_CUDA_MOE=%s: v10 does not run (the entry declines)", ver)
	}
	r := newRNG(t)
	const d, ff, ne, k = 2880, 96, 32, 4
	m, _ := randMoE(t, r, ml.MXFP4, d, ff, ne, k)
	for _, n := range []int{2, 8} {
		name := fmt.Sprintf("n=%d", n)
		t.Run(name, func(t *testing.T) {
			x := f32Pair(t, randF32(r, d*n, 1), d, n)
			y, y0 := out(t, d, n), out(t, d, n)
			r2v, w2v := randF32(r, d*n, 2), randF32(r, d, 1)
			r2, w2, xt, ss := f32Pair(t, r2v, d, n), f32Pair(t, w2v, d), out(t, d, n), out(t, d/8, n)
			gpu.MoE(y0.g, x.g, m) // the plain op (v10 at 2..8 tokens)
			const op = "moe_addnorm"
			b := gpu
			d0, xx := b.arg(op, "y", y.g, ml.F32), b.arg(op, "x", x.g, ml.F32)
			router, gate := b.arg(op, "router", m.Router, anyType), b.arg(op, "gate", m.Gate, anyType)
			up, down := b.arg(op, "up", m.Up, anyType), b.arg(op, "down", m.Down, anyType)
			rb, _ := b.optF32(op, "router_bias", m.RouterBias, ne)
			gb, _ := b.optF32(op, "gate_bias", m.GateBias, ff*ne)
			ub, _ := b.optF32(op, "up_bias", m.UpBias, ff*ne)
			db, _ := b.optF32(op, "down_bias", m.DownBias, d*ne)
			ids, wts := b.scratchBuf("moe.ids", 4*k*n), b.scratchBuf("moe.w", 4*k*n)
			g, yb := b.scratchBuf("moe.gate", 4*ff*k*n), b.scratchBuf("moe.down", 4*d*k*n)
			a2, aw, axt, ass := b.arg(op, "r2", r2.g, ml.F32), b.arg(op, "w2", w2.g, ml.F32), b.arg(op, "xt", xt.g, ml.F32),
				b.arg(op, "ss", ss.g, ml.F32)
			require.NoError(t, b.err)
			call := func() {
				b.call(op, b.l.moeDecodeAddNorm(b.ctx, d0.ptr, xx.ptr, 0, 0, 0, 0, router.ptr, int32(router.dt), rb,
					int32(ne), ids, wts, gate.ptr, up.ptr, int32(gate.dt), gb, ub, down.ptr, int32(down.dt), db, g, yb,
					int64(n), int32(k), int64(d), int64(ff), m.Alpha, m.Limit, a2.ptr, aw.ptr, axt.ptr, ass.ptr))
			}
			check := func(what string) {
				require.NoError(t, b.Sync())
				yv := readF32(t, y.g)
				sameBits(t, what+": y vs the plain MoE", readF32(t, y0.g), yv)
				r2o, xto, sso := readF32(t, r2.g), readF32(t, xt.g), readF32(t, ss.g)
				for i := range r2o {
					want := r2v[i] + yv[i]
					require.Equal(t, math.Float32bits(want), math.Float32bits(r2o[i]), "%s: res2[%d]", what, i)
					require.Equal(t, math.Float32bits(want*w2v[i%d]), math.Float32bits(xto[i]), "%s: xt[%d]", what, i)
				}
				for j := 0; j < n; j++ {
					for blk := 0; blk < d/8; blk++ {
						var s float32
						for w := 0; w < 8; w++ {
							v := r2o[j*d+8*blk+w]
							s += float32(v * v)
						}
						require.Equal(t, math.Float32bits(s), math.Float32bits(sso[j*(d/8)+blk]), "%s: ss[%d][%d]", what, j, blk)
					}
				}
			}
			call()
			check("eager")
			require.NoError(t, gpu.WriteF32(r2.g, r2v))
			gpu.Fill(y.g, float32(math.NaN()))
			require.NoError(t, gpu.Run("moe-addnorm-"+name, call))
			check("graph")
		})
	}
}
