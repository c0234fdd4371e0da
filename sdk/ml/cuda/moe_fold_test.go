package cuda

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// Host test of the AddRMSNorm -> MoE fold (fuse.go holdMoENorm /
// foldMoENorm) against the fake library of fuse_test.go: the held norm goes
// into one orch_moe_decode_norm call when the MoE reads exactly its output;
// it is launched as a plain norm before anything else, when the library
// declines, for a MoE of another tensor, for a plain RMSNorm, an output
// overlapping the residual, more than 64 rows (moeDecodeMaxN), and with the switch off; a held
// norm followed by a GEMV launches before it.
func TestFuseMoENorm(t *testing.T) {
	defer func(v, g bool) { fuseOps, fuseMoENorm = v, g }(fuseOps, fuseMoENorm)
	fuseOps, fuseMoENorm = true, true
	b, f := newFakeBackend(t)
	foldRC := int32(stOK)
	b.l.malloc = func(ctx uintptr, bytes int64, out *uintptr) int32 {
		*out = fakeNext
		fakeNext += uintptr(bytes+255) &^ 255
		return stOK
	}
	b.l.moeDecodeNorm = func(ctx, out, x, res, add, normW uintptr, eps float32, router uintptr, routerType int32,
		routerBias uintptr, nExp int32, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr,
		downType int32, downBias, act, ybuf uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32) int32 {
		if foldRC != stOK {
			return foldRC
		}
		return f.add("moe_decode_norm out=%x x=%x res=%x add=%x n=%d", out, x, res, add, n)
	}
	b.l.moeDecode = func(ctx, out, x, router uintptr, routerType int32, routerBias uintptr, nExp int32, ids, w, gate,
		up uintptr, guType int32, gateBias, upBias, down uintptr, downType int32, downBias, act, ybuf uintptr, n int64,
		slots int32, dim, ff int64, alpha, limit float32) int32 {
		return f.add("moe_decode out=%x x=%x n=%d", out, x, n)
	}
	const d, ff, ne, k = 64, 32, 4, 2
	moe := &ml.MoE{Router: fakeT(b, ml.F32, d, ne), Gate: fakeT(b, ml.MXFP4, d, ff, ne),
		Up: fakeT(b, ml.MXFP4, d, ff, ne), Down: fakeT(b, ml.MXFP4, ff, d, ne), TopK: k, Alpha: 1.702, Limit: 7}
	x, h, o, nw, mo := fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d),
		fakeT(b, ml.F32, d, 1)
	norm := func(out, res, add uintptr) string { return fmt.Sprintf("rmsnorm out=%x x=%x add=%x", out, res, add) }
	fold := func(n int) string {
		return fmt.Sprintf("moe_decode_norm out=%x x=%x res=%x add=%x n=%d", mo.ptr, h.ptr, x.ptr, o.ptr, n)
	}
	plain := fmt.Sprintf("moe_decode out=%x x=%x n=1", mo.ptr, h.ptr)

	b.AddRMSNorm(x, h, o, nw, 1e-5)
	require.Empty(t, f.take(), "the norm is held")
	b.MoE(mo, h, moe)
	require.Equal(t, []string{fold(1)}, f.take())
	require.NoError(t, b.Sync())
	require.Equal(t, []string{"sync"}, f.take(), "nothing left held")

	// Anything else first: the norm, then that op.
	b.AddRMSNorm(x, h, o, nw, 1e-5)
	b.Add(o, o, o)
	require.Equal(t, []string{norm(h.ptr, x.ptr, o.ptr), fmt.Sprintf("add out=%x", o.ptr)}, f.take())
	b.AddRMSNorm(x, h, o, nw, 1e-5)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{norm(h.ptr, x.ptr, o.ptr), "sync"}, f.take())

	// The MoE of another tensor.
	b.AddRMSNorm(x, h, o, nw, 1e-5)
	b.MoE(mo, o, moe)
	require.Equal(t, []string{norm(h.ptr, x.ptr, o.ptr), fmt.Sprintf("moe_decode out=%x x=%x n=1", mo.ptr, o.ptr)},
		f.take())

	// The library declines: the norm, then the MoE as without the fold.
	foldRC = stUnsupported
	b.AddRMSNorm(x, h, o, nw, 1e-5)
	b.MoE(mo, h, moe)
	require.Equal(t, []string{norm(h.ptr, x.ptr, o.ptr), plain}, f.take())
	foldRC = stOK

	// Not held: a plain RMSNorm, an output overlapping the residual, more than 64 rows, the switch off.
	b.RMSNorm(h, x, nw, 1e-5)
	require.Equal(t, []string{norm(h.ptr, x.ptr, 0)}, f.take())
	b.AddRMSNorm(x, x, o, nw, 1e-5)
	require.Equal(t, []string{norm(x.ptr, x.ptr, o.ptr)}, f.take())
	x65, h65, o65 := fakeT(b, ml.F32, d, 65), fakeT(b, ml.F32, d, 65), fakeT(b, ml.F32, d, 65)
	b.AddRMSNorm(x65, h65, o65, nw, 1e-5)
	require.Equal(t, []string{norm(h65.ptr, x65.ptr, o65.ptr)}, f.take())
	fuseMoENorm = false
	b.AddRMSNorm(x, h, o, nw, 1e-5)
	b.MoE(mo, h, moe)
	require.Equal(t, []string{norm(h.ptr, x.ptr, o.ptr), plain}, f.take())
	fuseMoENorm = true

	// A held norm followed by a GEMV: launched through the norm op, then the GEMV.
	wq, q := fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.F32, d, 1)
	b.AddRMSNorm(x, h, o, nw, 1e-5)
	require.Empty(t, f.take(), "held")
	b.MatMul(q, h, wq, nil)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{norm(h.ptr, x.ptr, o.ptr), fmt.Sprintf("matmul y=%x x=%x n=1", q.ptr, h.ptr), "sync"},
		f.take())

	// 64 tokens are held and offered to the library (MoE v13's route kernel takes it where routed).
	x64, h64, o64, mo64 := fakeT(b, ml.F32, d, 64), fakeT(b, ml.F32, d, 64), fakeT(b, ml.F32, d, 64),
		fakeT(b, ml.F32, d, 64)
	b.AddRMSNorm(x64, h64, o64, nw, 1e-5)
	require.Empty(t, f.take(), "held")
	b.MoE(mo64, h64, moe)
	require.Equal(t, []string{fmt.Sprintf("moe_decode_norm out=%x x=%x res=%x add=%x n=64", mo64.ptr, h64.ptr, x64.ptr,
		o64.ptr)}, f.take())

	// Two tokens fold too.
	x2, h2, o2, mo2 := fakeT(b, ml.F32, d, 2), fakeT(b, ml.F32, d, 2), fakeT(b, ml.F32, d, 2), fakeT(b, ml.F32, d, 2)
	b.AddRMSNorm(x2, h2, o2, nw, 1e-5)
	b.MoE(mo2, h2, moe)
	require.Equal(t, []string{fmt.Sprintf("moe_decode_norm out=%x x=%x res=%x add=%x n=2", mo2.ptr, h2.ptr, x2.ptr,
		o2.ptr)}, f.take())
	require.NoError(t, b.Err())
}
