//go:build gpu

package cuda

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// MoE v6 (cuda/src/moe_ffn.cu, docs/perf-cuda.md "Round 4: MoE decode"): the
// library reads ORCH_CUDA_MOE once per process, so both tests run their
// versions in child processes of this test binary.

// TestMoEVersions re-runs the MoE tests (every op against the CPU backend,
// several rounds of blocks per lane, and the PDL chain — PDL on == off bit
// for bit, eager and over graph replays, which exercises v6's speculative
// routing read before pdl_wait) under ORCH_CUDA_MOE=v4, v6, v8 (expert-major
// batched kernels for 2..64 tokens, orch_moe_ffn_route; v6 at one token) and
// v9 (v8 with tensor-core expert kernels for MXFP4). (v7 was removed.)
func TestMoEVersions(t *testing.T) {
	if v := os.Getenv("ORCH_CUDA_MOE"); v != "" {
		t.Skipf("ORCH_CUDA_MOE=%s pins this process; the version children run from an unpinned one", v)
	}
	tests := []string{"TestMoE", "TestMoEWide", "TestPDLChain"}
	for _, v := range []string{"v4", "v6", "v8", "v9"} {
		cmd := exec.Command(os.Args[0], "-test.run", "^("+strings.Join(tests, "|")+")$", "-test.v")
		cmd.Env = append(os.Environ(), "ORCH_CUDA_MOE="+v)
		outp, err := cmd.CombinedOutput()
		require.NoError(t, err, "ORCH_CUDA_MOE=%s child:\n%s", v, outp)
		for _, name := range tests {
			require.Contains(t, string(outp), "--- PASS: "+name+" ", "ORCH_CUDA_MOE=%s child:\n%s", v, outp)
		}
		t.Logf("ORCH_CUDA_MOE=%s: %s passed", v, strings.Join(tests, ", "))
	}
}

// TestPerfMoEVersions times the fused MoE decode op at the gpt-oss-20b shape
// (router GEMV + top-4 + gate_up + down; graph of 16 calls, median of 20
// replays) at n = 1, 2, 4, 8, 16, 32, 64 tokens (from 16 tokens = 64 pairs:
// the grouped tile path under v6) under ORCH_CUDA_MOE=v6, v8 and v9, each
// twice (run-to-run spread), in child processes on the same card; writes
// perf-moe.md next to ORCH_PERF_OUT.
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
		// each twice: run-to-run spread on the same card
		perfChildren(t, "TestPerfMoEVersions", "ORCH_MOE_SPEED_CHILD",
			[]string{"ORCH_CUDA_MOE=v6", "ORCH_CUDA_MOE=v8", "ORCH_CUDA_MOE=v9", "ORCH_CUDA_MOE=v6", "ORCH_CUDA_MOE=v8",
				"ORCH_CUDA_MOE=v9"},
			[]string{"| MoE version | shape | median | of the bytes floor |", "|---|---|---|---|"}, "perf-moe.md")
		return
	}
	r := newRandSrc(newRNG(t))
	const cb = 1 << 30
	var src, dst uintptr
	require.NoError(t, gpu.l.status("malloc", gpu.l.malloc(gpu.ctx, cb, &src)))
	require.NoError(t, gpu.l.status("malloc", gpu.l.malloc(gpu.ctx, cb, &dst)))
	peak := 2 * cb / (timeMs(t, 10, func() { gpu.call("copy", gpu.l.memcpyD2D(gpu.ctx, dst, src, cb)) }) * 1e-3)
	gpu.l.free(gpu.ctx, src)
	gpu.l.free(gpu.ctx, dst)
	const d, ff, ne, topk = 2880, 2880, 32, 4
	mo := r.moe(t, d, ff, ne, topk)
	rb, _ := ml.MXFP4.RowBytes(d)
	for _, n := range []int{1, 2, 4, 8, 16, 32, 64} {
		x := mustA(t, ml.F32, d, n)
		require.NoError(t, gpu.WriteF32(x, r.f32(d*n)))
		y := mustA(t, ml.F32, d, n)
		ms := timeKernel(t, 20, 16, func() { gpu.MoE(y, x, mo) })
		experts := min(ne, topk*n) // upper bound: random routing of n tokens
		bytes := float64(experts)*3*float64(rb)*ff + 4*float64(d*ne)
		t.Logf("| ORCH_CUDA_MOE=%s | moe decode gpt-oss n=%d | %.4f ms | %.0f%% (<= %d experts) |", os.Getenv("ORCH_CUDA_MOE"),
			n, ms, 100*bytes/peak*1e3/ms, experts)
		gpu.Free(x)
		gpu.Free(y)
	}
	for _, w := range []ml.Tensor{mo.Router, mo.RouterBias, mo.Gate, mo.GateBias, mo.Up, mo.UpBias, mo.Down, mo.DownBias} {
		gpu.Free(w)
	}
	require.NoError(t, gpu.Sync())
}
