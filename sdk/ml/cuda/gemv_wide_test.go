package cuda

import (
	"fmt"
	"testing"

	"github.com/llama-orch/orch/sdk/ml"
	"github.com/stretchr/testify/require"
)

// TestGEMVWideRoute: with GEMV v9 pinned (gemvPin9), quantized MatMuls of
// 9..64 tokens go to orch_matmul_multi — merged with their siblings, or
// alone as one part (orch_matmul would run the GEMM) — and 65 tokens or
// ORCH_CUDA_GEMM=v1 (gemmV1) leave them on the old paths; by default only
// the shapes gemvWideFor picks.
func TestGEMVWideRoute(t *testing.T) {
	defer func(f, w, p, g bool) { fuseOps, gemvWide, gemvPin9, gemmV1 = f, w, p, g }(fuseOps, gemvWide, gemvPin9, gemmV1)
	fuseOps, gemvWide, gemvPin9, gemmV1 = true, true, true, false
	b, f := newFakeBackend(t)
	const d = 64
	for _, n := range []int{9, 16, 33, 64} {
		x := fakeT(b, ml.F32, d, n)
		wq, wk := fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, 32)
		yq, yk := fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, 32, n)
		b.MatMul(yq, x, wq, nil)
		b.MatMul(yk, x, wk, nil)
		require.NoError(t, b.Sync())
		require.Equal(t, []string{fmt.Sprintf("multi x=%x n=%d k=%d [%x/%d %x/32]", x.ptr, n, d, yq.ptr, d, yk.ptr), "sync"},
			f.take(), "n=%d: merged", n)
		b.MatMul(yq, x, wq, nil)
		require.NoError(t, b.Sync())
		require.Equal(t, []string{fmt.Sprintf("multi x=%x n=%d k=%d [%x/%d]", x.ptr, n, d, yq.ptr, d), "sync"}, f.take(),
			"n=%d: one part through orch_matmul_multi", n)
		// Without merging: the part goes straight to orch_matmul_multi.
		fuseOps = false
		b.MatMul(yq, x, wq, nil)
		require.Equal(t, []string{fmt.Sprintf("multi x=%x n=%d k=%d [%x/%d]", x.ptr, n, d, yq.ptr, d)}, f.take(), "n=%d", n)
		fuseOps = true
	}
	// The library declines (another GEMV pinned, unaligned rows): orch_matmul, one part at a time.
	x := fakeT(b, ml.F32, d, 16)
	w := fakeT(b, ml.MXFP4, d, d)
	y := fakeT(b, ml.F32, d, 16)
	f.multiRC = stUnsupported
	b.MatMul(y, x, w, nil)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=16", y.ptr, x.ptr), "sync"}, f.take())
	f.multiRC = stOK
	// ORCH_CUDA_GEMM=v1: the session-2 paths (orch_matmul's GEMM for n > 8), nothing held.
	gemmV1 = true
	require.Equal(t, 8, gemvMaxN())
	b.MatMul(y, x, w, nil)
	require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=16", y.ptr, x.ptr)}, f.take())
	gemmV1 = false
	gemvWide = false // another GEMV version pinned
	require.Equal(t, 8, gemvMaxN())
	gemvWide = true
	require.Equal(t, gemvWideN, gemvMaxN())
	require.False(t, gemvWideFor(65, 2880, 5120))

	// The default (not pinned): only the shapes measured faster than the GEMM
	// (9..denseV2From-1 tokens; from denseV2From the dequantize + cuBLAS path).
	gemvPin9 = false
	defer func(v int) { denseV2From = v }(denseV2From)
	denseV2From = 17
	for _, c := range []struct {
		n, k, m int
		want    bool
	}{{8, 2880, 5120, false}, {9, 2880, 5120, true}, {16, 4096, 14336, true}, {16, 14336, 4096, true},
		{17, 2880, 5120, false}, {32, 14336, 4096, false}, {33, 2880, 5120, false}, {64, 14336, 4096, false},
		{65, 2880, 5120, false}} {
		require.Equal(t, c.want, gemvWideFor(c.n, c.k, c.m), "n=%d k=%d m=%d", c.n, c.k, c.m)
	}
	// Session 5's border (ORCH_CUDA_DENSE_V2_FROM=65): v9 up to 32 tokens, and up to 64 where m <= 8192.
	denseV2From = 65
	for _, c := range []struct {
		n, k, m int
		want    bool
	}{{32, 2880, 5120, true}, {32, 14336, 4096, true}, {32, 4096, 14336, true}, {33, 2880, 5120, true},
		{64, 14336, 4096, true}, {33, 4096, 14336, false}, {64, 4096, 14336, false}, {65, 2880, 5120, false}} {
		require.Equal(t, c.want, gemvWideFor(c.n, c.k, c.m), "n=%d k=%d m=%d", c.n, c.k, c.m)
	}
	// Not picked: not held, and the GEMM path (the fake has no qgemm: gemmV1 sends it to orch_matmul).
	gemmV1 = true
	x64, y64 := fakeT(b, ml.F32, d, 64), fakeT(b, ml.F32, 9000, 64)
	wb := fakeT(b, ml.Q8_0, d, 9000)
	require.False(t, gemvWideFor(64, d, 9000))
	b.MatMul(y64, x64, wb, nil)
	require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=64", y64.ptr, x64.ptr)}, f.take())
}
