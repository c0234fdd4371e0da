//go:build gpu

package cuda

import (
	"encoding/binary"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// MoE v6 (cuda/src/moe_ffn.cu, docs/perf-cuda.md "Round 4: MoE decode"): the
// library reads ORCH_CUDA_MOE once per process, so both tests run their
// versions in child processes of this test binary.

// TestMoEVersions re-runs the MoE tests (every op against the CPU backend,
// several rounds of blocks per lane, and the PDL chain — PDL on == off bit
// for bit, eager and over graph replays, which exercises v6's and v10's
// speculative routing read before pdl_wait and v10's routing ticket) under
// ORCH_CUDA_MOE=v4, v6, v9 (expert-major tensor-core kernels for MXFP4, 2..64
// tokens, orch_moe_ffn_route; v6 below) and v10 (router + top-k + expert FFN
// at 1..8 tokens in three launches, orch_moe_decode; session 5), v13
// (2..64 tokens, each touched expert's tiles copied to shared memory once for
// all its tokens; session 8) and unpinned with ORCH_CUDA_MOE13_FROM=9 (v13
// from 9 tokens, the default route below). (v7, v8, v11 and v12 were removed.)
func TestMoEVersions(t *testing.T) {
	if v := os.Getenv("ORCH_CUDA_MOE") + os.Getenv("ORCH_CUDA_MOE13_FROM"); v != "" {
		t.Skipf("ORCH_CUDA_MOE / ORCH_CUDA_MOE13_FROM pin this process; the version children run from an unpinned one")
	}
	tests := []string{"TestMoE", "TestMoEWide", "TestPDLChain", "TestMoENormFold", "TestMoEDecode13"}
	for _, v := range []string{"ORCH_CUDA_MOE=v4", "ORCH_CUDA_MOE=v6", "ORCH_CUDA_MOE=v9", "ORCH_CUDA_MOE=v10",
		"ORCH_CUDA_MOE=v13", "ORCH_CUDA_MOE=v13 ORCH_CUDA_MOE13_PIPE=1", "ORCH_CUDA_MOE13_FROM=0"} {
		cmd := exec.Command(os.Args[0], "-test.run", "^("+strings.Join(tests, "|")+")$", "-test.v")
		cmd.Env = append(os.Environ(), strings.Fields(v)...)
		outp, err := cmd.CombinedOutput()
		// every child runs (assert, not require): one failing setting must not hide the others' results
		if !assert.NoError(t, err, "%s child:\n%s", v, outp) {
			continue
		}
		for _, name := range tests {
			assert.Contains(t, string(outp), "--- PASS: "+name+" ", "%s child:\n%s", v, outp)
		}
		t.Logf("%s: %s passed", v, strings.Join(tests, ", "))
	}
}

// TestPerfMoEVersions times the fused MoE decode op at the gpt-oss-20b shape
// (router GEMV + top-4 + gate_up + down; graph of 16 calls, median of 20
// replays) at n = 1, 2, 4, 8, 16 tokens (from 16 tokens = 64 pairs: the
// grouped tile path under v6 and v10, v9 unpinned) under ORCH_CUDA_MOE=v6,
// v10 and unpinned (the default: v6 at 1, v10 at 2..8, v9 from 16), in child
// processes on the same card; under v6 at n = 1 also the op's parts (router
// GEMV, top-k, gate_up + down) alone; at n = 1 and 8 the op without its down
// kernel (ORCH_CUDA_MOE_ONLY=gate_up: v10's route + gate_up kernels) and
// v10's routing kernel alone
// (=route): a timing hook, the result is garbage. Writes perf-moe.md next to
// ORCH_PERF_OUT.
//
//	ORCH_GPU_PERF=1 bin/cuda-gpu.test -test.run TestPerfMoEVersions -test.v
func TestPerfMoEVersions(t *testing.T) {
	if os.Getenv("ORCH_GPU_PERF") == "" {
		t.Skip("set ORCH_GPU_PERF=1 to time the MoE versions")
	}
	if os.Getenv("ORCH_MOE_SPEED_CHILD") == "" {
		if v := os.Getenv("ORCH_CUDA_MOE"); v != "" {
			t.Skipf("ORCH_CUDA_MOE pins this process; the timing runs from an unpinned one")
		}
		// v6 and the unpinned route timed as in run 1 (the run-to-run reference)
		perfChildren(t, "TestPerfMoEVersions", "ORCH_MOE_SPEED_CHILD",
			[]string{"ORCH_CUDA_MOE=v6", "ORCH_CUDA_MOE=v10", "ORCH_CUDA_MOE=",
				// session 8: MoE v13 (2..64 tokens), and the default route with v13 from 9 tokens
				"ORCH_CUDA_MOE=v13", "ORCH_CUDA_MOE= ORCH_CUDA_MOE13_FROM=0", // v13 pinned; the session-7 route
				"ORCH_CUDA_MOE=v13 ORCH_CUDA_MOE13_PIPE=1", // gate_up13's tiles copied round by round
				// where v13's time goes (n = 8, 16, 64): route alone, route + gate_up13 (timing hook; results garbage)
				"ORCH_CUDA_MOE=v13 ORCH_CUDA_MOE_ONLY=route", "ORCH_CUDA_MOE=v13 ORCH_CUDA_MOE_ONLY=gate_up",
				// the post-attention AddRMSNorm folded into the route kernel (S7, default): norm+moe rows without it
				"ORCH_CUDA_MOE= ORCH_CUDA_MOE_NORM=0",
				// where the time goes (n = 1, 8): the op without down / without both expert kernels
				// (timing hook; results garbage)
				"ORCH_CUDA_MOE=v10 ORCH_CUDA_MOE_ONLY=route", "ORCH_CUDA_MOE=v10 ORCH_CUDA_MOE_ONLY=gate_up",
				"ORCH_CUDA_MOE=v6", "ORCH_CUDA_MOE=v10"},
			[]string{"| MoE version | shape | median | of the bytes floor |", "|---|---|---|---|"}, "perf-moe.md")
		return
	}
	r := newRandSrc(newRNG(t))
	peak := copyPeak(t)
	const d, ff, ne, topk = 2880, 2880, 32, 4
	mo := r.moe(t, d, ff, ne, topk)
	rb, _ := ml.MXFP4.RowBytes(d)
	nw := mustA(t, ml.F32, d)
	require.NoError(t, gpu.WriteF32(nw, r.f32(d)))
	defer gpu.Free(nw)
	ns := []int{1, 2, 4, 8, 16}
	if os.Getenv("ORCH_CUDA_MOE_ONLY") != "" {
		ns = []int{1, 8}
		if os.Getenv("ORCH_CUDA_MOE") == "v13" {
			ns = []int{8, 16, 64}
		}
	}
	if os.Getenv("ORCH_CUDA_MOE_ONLY") == "" && (os.Getenv("ORCH_CUDA_MOE") == "v13" ||
		(os.Getenv("ORCH_CUDA_MOE") == "" && os.Getenv("ORCH_CUDA_MOE_NORM") == "")) {
		ns = []int{1, 2, 4, 8, 9, 12, 16, 24, 32, 40, 64} // session 8: the 9..64-token steps
	}
	label := "ORCH_CUDA_MOE=" + os.Getenv("ORCH_CUDA_MOE")
	for _, v := range []string{"ORCH_CUDA_MOE_NORM", "ORCH_CUDA_MOE_ONLY", "ORCH_CUDA_MOE13_FROM", "ORCH_CUDA_MOE13_PIPE"} {
		if e := os.Getenv(v); e != "" {
			label += " " + v + "=" + e
		}
	}
	for _, n := range ns {
		x := mustA(t, ml.F32, d, n)
		require.NoError(t, gpu.WriteF32(x, r.f32(d*n)))
		y := mustA(t, ml.F32, d, n)
		ms := timeKernel(t, 20, 16, func() { gpu.MoE(y, x, mo) })
		// the floor: every expert the op touched (its ids, read back) read once
		experts := moeTouched(t, n*topk, ne)
		bytes := float64(experts)*3*float64(rb)*ff + 4*float64(d*ne)
		t.Logf("| %s | moe decode gpt-oss n=%d | %.4f ms | %.0f%% (%d experts touched) |", label, n, ms,
			100*bytes/peak*1e3/ms, experts)
		if label == "ORCH_CUDA_MOE=" && (n == 16 || n == 32) {
			// the n-token step as n/8 v10 ops of 8 tokens (L2 may hold part of the later ops' experts)
			var xs, ys []ml.Tensor
			for i := 0; i < n/8; i++ {
				xi, yi := mustA(t, ml.F32, d, 8), mustA(t, ml.F32, d, 8)
				require.NoError(t, gpu.WriteF32(xi, r.f32(d*8)))
				xs, ys = append(xs, xi), append(ys, yi)
			}
			ms := timeKernel(t, 20, 16, func() {
				for i := range xs {
					gpu.MoE(ys[i], xs[i], mo)
				}
			})
			t.Logf("| %s | moe decode gpt-oss n=%d as %d v10 ops of 8 | %.4f ms | %.0f%% (%d experts touched at n) |",
				label, n, n/8, ms, 100*bytes/peak*1e3/ms, experts)
			for i := range xs {
				gpu.Free(xs[i])
				gpu.Free(ys[i])
			}
		}
		if os.Getenv("ORCH_CUDA_MOE_ONLY") == "" && (n <= 8 || n == 16 || n == 64) { // 16, 64: v13's fold where routed
			// AddRMSNorm + MoE (gpt-oss's post-attention norm): one op (the fold, default), or two with ORCH_CUDA_MOE_NORM=0
			res, add := mustA(t, ml.F32, d, n), mustA(t, ml.F32, d, n)
			require.NoError(t, gpu.WriteF32(res, r.f32(d*n)))
			require.NoError(t, gpu.WriteF32(add, r.f32(d*n)))
			ms := timeKernel(t, 20, 16, func() {
				gpu.AddRMSNorm(res, x, add, nw, 1e-5)
				gpu.MoE(y, x, mo)
			})
			nb := bytes + 4*float64(3*d*n+d)
			t.Logf("| %s | norm+moe decode gpt-oss n=%d | %.4f ms | %.0f%% (<= %d experts) |", label, n, ms,
				100*nb/peak*1e3/ms, experts)
			gpu.Free(res)
			gpu.Free(add)
		}
		if n == 1 && os.Getenv("ORCH_CUDA_MOE") == "v6" && os.Getenv("ORCH_CUDA_MOE_ONLY") == "" {
			moePartsN1(t, mo, x, y, peak)
		}
		gpu.Free(x)
		gpu.Free(y)
	}
	for _, w := range []ml.Tensor{mo.Router, mo.RouterBias, mo.Gate, mo.GateBias, mo.Up, mo.UpBias, mo.Down, mo.DownBias} {
		gpu.Free(w)
	}
	require.NoError(t, gpu.Sync())
}

// moeTouched: the distinct experts in the last MoE op's routing (the
// backend's moe.ids scratch: np ids; every MoE path writes them there).
func moeTouched(t *testing.T, np, ne int) int {
	s, ok := gpu.scratch["moe.ids"]
	require.True(t, ok, "moe.ids scratch")
	b := make([]byte, 4*np)
	require.NoError(t, gpu.l.status("d2h", gpu.l.memcpyD2H(gpu.ctx, &b[0], s.ptr, int64(len(b)))))
	seen := map[int32]bool{}
	for i := 0; i < np; i++ {
		if e := int32(binary.LittleEndian.Uint32(b[4*i:])); e >= 0 && int(e) < ne {
			seen[e] = true
		}
	}
	return len(seen)
}

// moePartsN1 times the parts of the v6 MoE op at one token alone (graphs of
// 16 back-to-back calls, as the whole op): the F32 router GEMV, the top-k and
// the fused expert FFN (gate_up + down) — where the op's time goes.
func moePartsN1(t *testing.T, mo *ml.MoE, x, y ml.Tensor, peak float64) {
	const op = "moe parts"
	b := gpu
	xx, d := b.arg(op, "x", x, ml.F32), b.arg(op, "y", y, ml.F32)
	router, gate := b.arg(op, "router", mo.Router, anyType), b.arg(op, "gate", mo.Gate, anyType)
	up, down := b.arg(op, "up", mo.Up, anyType), b.arg(op, "down", mo.Down, anyType)
	rb, _ := b.optF32(op, "router_bias", mo.RouterBias, -1)
	gb, _ := b.optF32(op, "gate_bias", mo.GateBias, -1)
	ub, _ := b.optF32(op, "up_bias", mo.UpBias, -1)
	db, _ := b.optF32(op, "down_bias", mo.DownBias, -1)
	require.NoError(t, b.err)
	dim, ne, ff, k := router.shape[0], router.shape[1], gate.shape[1], mo.TopK
	logits := b.scratchBuf("parts.logits", 4*ne)
	ids := b.scratchBuf("parts.ids", 4*k)
	wts := b.scratchBuf("parts.w", 4*k)
	act := b.scratchBuf("parts.act", 4*ff*k)
	require.NoError(t, b.err)
	b.call(op, b.l.matmul(b.ctx, logits, xx.ptr, router.ptr, int32(router.dt), rb, 1, int64(dim), int64(ne), 0))
	b.call(op, b.l.moeTopK(b.ctx, ids, wts, logits, 1, int32(ne), int32(k)))
	require.NoError(t, b.Sync())
	rbytes := float64(4 * dim * ne)
	ms := timeKernel(t, 20, 16, func() {
		b.call(op, b.l.matmul(b.ctx, logits, xx.ptr, router.ptr, int32(router.dt), rb, 1, int64(dim), int64(ne), 0))
	})
	t.Logf("| ORCH_CUDA_MOE=v6 | part n=1: router F32 GEMV %dx%d | %.4f ms | %.0f%% |", ne, dim, ms, 100*rbytes/peak*1e3/ms)
	ms = timeKernel(t, 20, 16, func() { b.call(op, b.l.moeTopK(b.ctx, ids, wts, logits, 1, int32(ne), int32(k))) })
	t.Logf("| ORCH_CUDA_MOE=v6 | part n=1: top-%d of %d | %.4f ms | — |", k, ne, ms)
	rowb, _ := ml.MXFP4.RowBytes(dim)
	fbytes := float64(k) * 3 * float64(rowb) * float64(ff)
	ms = timeKernel(t, 20, 16, func() {
		b.call(op, b.l.moeFFN(b.ctx, d.ptr, xx.ptr, ids, wts, gate.ptr, up.ptr, int32(gate.dt), gb, ub, down.ptr,
			int32(down.dt), db, act, 1, int32(k), int64(dim), int64(ff), mo.Alpha, mo.Limit))
	})
	t.Logf("| ORCH_CUDA_MOE=v6 | part n=1: expert FFN (gate_up + down) | %.4f ms | %.0f%% |", ms, 100*fbytes/peak*1e3/ms)
	require.NoError(t, b.err)
}
