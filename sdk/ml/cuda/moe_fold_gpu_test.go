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
