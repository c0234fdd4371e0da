package cuda

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// Host test of the folded RMSNorm (normfold.go) against the fake library of
// fuse_test.go: a Llama layer's GEMV -> AddRMSNorm -> GEMVs become the
// producer with the fold and scaled consumers (merged q/k/v; gate/up +
// SwiGLU), the next layer's norm reuses h without materialising it, and the
// residual add after the last layer materialises h first (a plain norm without
// the add); the plain launches when the switch is off, when the library
// declines (producer or consumers), for a norm followed by something else,
// nine tokens (eight fold: gate/up and SwiGLU as two launches), a MoE after the norm (its own fold takes the norm), a host
// read of h and a graph boundary.
func TestFuseNormFold(t *testing.T) {
	defer func(v, nf bool) { fuseOps, fuseNormFold = v, nf }(fuseOps, fuseNormFold)
	fuseOps, fuseNormFold = true, true
	b, f := newFakeBackend(t)
	b.l.memcpyD2H = func(ctx uintptr, dst *byte, src uintptr, bytes int64) int32 { return f.add("d2h %x", src) }
	const d, ff = 64, 96
	x, h, o, att, fo := fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1),
		fakeT(b, ml.F32, d, 1)
	n1, n2 := fakeT(b, ml.F32, d), fakeT(b, ml.F32, d)
	wo, wq, wk, wv := fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, 32), fakeT(b, ml.Q8_0, d, 32)
	wg, wu, wd := fakeT(b, ml.Q8_0, d, ff), fakeT(b, ml.Q8_0, d, ff), fakeT(b, ml.Q8_0, ff, d)
	q, k, v, g, u := fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, 32, 1), fakeT(b, ml.F32, 32, 1), fakeT(b, ml.F32, ff, 1),
		fakeT(b, ml.F32, ff, 1)
	addnorm := func(y, xx, res, nw uintptr) string {
		return fmt.Sprintf("addnorm y=%x x=%x n=1 res=%x nw=%x xt=%x", y, xx, res, nw, h.ptr)
	}
	rms := func(out, res, add uintptr) string { return fmt.Sprintf("rmsnorm out=%x x=%x add=%x", out, res, add) }
	swigluNF := fmt.Sprintf("swiglu_nf x=%x n=1 gate=%x up=%x out=%x nss=8", h.ptr, g.ptr, u.ptr, g.ptr)
	qkvNF := fmt.Sprintf("multi_nf x=%x n=1 k=%d [%x/%d %x/32 %x/32] nss=8 eps=1e-05", h.ptr, d, q.ptr, d, k.ptr, v.ptr)
	layer := (&foldLayer{o: o, att: att, wo: wo, x: x, h: h, n2: n2, g: g, u: u, wg: wg, wu: wu, fo: fo, wd: wd, n1: n1,
		q: q, k: k, v: v, wq: wq, wk: wk, wv: wv}).issuer(b)

	layer()
	require.Equal(t, []string{addnorm(o.ptr, att.ptr, x.ptr, n2.ptr), swigluNF, addnorm(fo.ptr, g.ptr, x.ptr, n1.ptr),
		qkvNF}, f.take())
	require.True(t, b.xt.on, "h holds xt")
	b.Add(x, x, fo) // the residual: h materialised first
	require.Equal(t, []string{rms(h.ptr, x.ptr, 0), fmt.Sprintf("add out=%x", x.ptr)}, f.take())
	require.False(t, b.xt.on)

	// A host read of h materialises it; so does a graph's end (and its start).
	layer()
	f.take()
	buf := make([]float32, d)
	require.NoError(t, b.ReadF32(h, buf))
	require.Equal(t, []string{rms(h.ptr, x.ptr, 0), fmt.Sprintf("d2h %x", h.ptr)}, f.take())
	require.NoError(t, b.Run("g", layer))
	log := f.take()
	require.Equal(t, "graph_begin", log[0])
	require.Equal(t, []string{qkvNF, rms(h.ptr, x.ptr, 0), "graph_end", "graph_launch"}, log[len(log)-4:])
	require.False(t, b.xt.on)

	// A MatMul of h that is not one of the scaled consumers: h materialised first.
	layer()
	f.take()
	b.MatMul(g, h, wg, nil)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{rms(h.ptr, x.ptr, 0), fmt.Sprintf("matmul y=%x x=%x n=1", g.ptr, h.ptr), "sync"}, f.take())

	// The consumers' library declines: h materialised, then the plain launches.
	f.nfRC = stUnsupported
	layer()
	require.Equal(t, []string{addnorm(o.ptr, att.ptr, x.ptr, n2.ptr), rms(h.ptr, x.ptr, 0),
		fmt.Sprintf("matmul_swiglu x=%x n=1 k=%d gate=%x/%d up=%x/%d out=%x", h.ptr, d, g.ptr, ff, u.ptr, ff, g.ptr),
		addnorm(fo.ptr, g.ptr, x.ptr, n1.ptr), rms(h.ptr, x.ptr, 0),
		fmt.Sprintf("multi x=%x n=1 k=%d [%x/%d %x/32 %x/32]", h.ptr, d, q.ptr, d, k.ptr, v.ptr)}, f.take())
	require.False(t, b.xt.on)
	f.nfRC = stOK
	// GEMV -> AddRMSNorm -> MatMul of qx launched as without the fold: the GEMV, the norm, the MatMul.
	plainPair := func(what string, qx *tensor) {
		t.Helper()
		b.MatMul(o, att, wo, nil)
		b.AddRMSNorm(x, h, o, n2, 1e-5)
		b.MatMul(q, qx, wq, nil)
		require.NoError(t, b.Sync())
		require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=1", o.ptr, att.ptr), rms(h.ptr, x.ptr, o.ptr),
			fmt.Sprintf("matmul y=%x x=%x n=1", q.ptr, qx.ptr), "sync"}, f.take(), what)
	}
	f.prodRC = stUnsupported
	plainPair("the producer declines", h)
	f.prodRC = stOK

	// The norm followed by something else: the GEMV, the norm, that op.
	b.MatMul(o, att, wo, nil)
	b.AddRMSNorm(x, h, o, n2, 1e-5)
	require.Empty(t, f.take(), "held")
	b.Add(att, att, att)
	require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=1", o.ptr, att.ptr), rms(h.ptr, x.ptr, o.ptr),
		fmt.Sprintf("add out=%x", att.ptr)}, f.take())
	plainPair("a MatMul of another x", att)

	// A MoE after the norm: the GEMV goes out, the MoE fold takes the norm.
	b.l.moeDecodeNorm = func(ctx, out, x, res, add, normW uintptr, eps float32, router uintptr, routerType int32,
		routerBias uintptr, nExp int32, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr,
		downType int32, downBias, act, ybuf uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32) int32 {
		return f.add("moe_decode_norm out=%x x=%x res=%x add=%x n=%d", out, x, res, add, n)
	}
	moe := &ml.MoE{Router: fakeT(b, ml.F32, d, 4), Gate: fakeT(b, ml.MXFP4, d, 32, 4),
		Up: fakeT(b, ml.MXFP4, d, 32, 4), Down: fakeT(b, ml.MXFP4, 32, d, 4), TopK: 2, Alpha: 1.702, Limit: 7}
	b.MatMul(o, att, wo, nil)
	b.AddRMSNorm(x, h, o, n2, 1e-5)
	b.MoE(fo, h, moe)
	require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=1", o.ptr, att.ptr),
		fmt.Sprintf("moe_decode_norm out=%x x=%x res=%x add=%x n=1", fo.ptr, h.ptr, x.ptr, o.ptr)}, f.take())

	// Eight tokens fold (GEMV v7 in the library); gate/up then SwiGLU as two launches.
	x8, h8, o8, a8, g8, u8 := fakeT(b, ml.F32, d, 8), fakeT(b, ml.F32, d, 8), fakeT(b, ml.F32, d, 8),
		fakeT(b, ml.F32, d, 8), fakeT(b, ml.F32, ff, 8), fakeT(b, ml.F32, ff, 8)
	b.MatMul(o8, a8, wo, nil)
	b.AddRMSNorm(x8, h8, o8, n2, 1e-5)
	b.MatMul(g8, h8, wg, nil)
	b.MatMul(u8, h8, wu, nil)
	b.SwiGLU(g8, g8, u8)
	require.Equal(t, []string{fmt.Sprintf("addnorm y=%x x=%x n=8 res=%x nw=%x xt=%x", o8.ptr, a8.ptr, x8.ptr, n2.ptr, h8.ptr),
		fmt.Sprintf("multi_nf x=%x n=8 k=%d [%x/%d %x/%d] nss=8 eps=1e-05", h8.ptr, d, g8.ptr, ff, u8.ptr, ff),
		fmt.Sprintf("swiglu out=%x gate=%x up=%x", g8.ptr, g8.ptr, u8.ptr)}, f.take())
	b.Add(x8, x8, x8)
	require.Equal(t, []string{rms(h8.ptr, x8.ptr, 0), fmt.Sprintf("add out=%x", x8.ptr)}, f.take())

	// Nine tokens: no fold.
	x9, h9, o9, a9, q9 := fakeT(b, ml.F32, d, 9), fakeT(b, ml.F32, d, 9), fakeT(b, ml.F32, d, 9), fakeT(b, ml.F32, d, 9),
		fakeT(b, ml.F32, d, 9)
	b.MatMul(o9, a9, wo, nil)
	b.AddRMSNorm(x9, h9, o9, n2, 1e-5)
	b.MatMul(q9, h9, wq, nil)
	require.NoError(t, b.Sync())
	log = f.take()
	require.Len(t, log, 4, "%v", log)
	require.Equal(t, rms(h9.ptr, x9.ptr, o9.ptr), log[1])
	require.NotContains(t, strings.Join(log, " "), "addnorm")

	fuseNormFold = false
	plainPair("the switch off", h)
}

// The L2 prefetch of the first consumer's weight (startNormFold, l2Prefetch): the out projection's producer right
// after a decode attention is made through orch_matmul_addnorm_pf with the gate weight, its rows and k; the down
// projection's producer (after the gate/up fold), a producer after any other launch, and a library without the
// entry get the plain orch_matmul_addnorm.
func TestNormFoldL2Prefetch(t *testing.T) {
	defer func(v, nf, ar bool) { fuseOps, fuseNormFold, foldAttnRoPE = v, nf, ar }(fuseOps, fuseNormFold, foldAttnRoPE)
	fuseOps, fuseNormFold, foldAttnRoPE = true, true, true
	b, f := newFakeBackend(t)
	b.l.attentionRope = func(ctx uintptr, a *attnArgs, r *attnRopeArgs) int32 { return f.add("attention_rope") }
	pfLib := func(ctx, y, x, w uintptr, wtype int32, bias uintptr, n, k, m int64, res, nw, xt, ss, pfw uintptr,
		pfType int32, pfM, pfK int64) int32 {
		return f.add("addnorm_pf y=%x x=%x n=%d res=%x nw=%x xt=%x pf=%x/%d m=%d k=%d", y, x, n, res, nw, xt, pfw, pfType,
			pfM, pfK)
	}
	b.l.matmulAddNormPF = pfLib
	s := newRopeFoldStep(b, 1)
	const ff = 96
	d := s.x.shape[0]
	o, fo, n1, n2 := fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d), fakeT(b, ml.F32, d)
	wo, wg, wu, wd := fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, ff), fakeT(b, ml.Q8_0, d, ff), fakeT(b, ml.Q8_0, ff, d)
	g, u := fakeT(b, ml.F32, ff, 1), fakeT(b, ml.F32, ff, 1)
	x, h := s.x, s.h
	att := *s.att // the attention's output as the projection's x
	att.shape = []int{d, 1}
	ffn := (&foldLayer{o: o, att: &att, wo: wo, x: x, h: h, n2: n2, g: g, u: u, wg: wg, wu: wu, fo: fo, wd: wd, n1: n1,
		q: s.q, k: s.k, v: s.v, wq: s.wq, wk: s.wk, wv: s.wv}).issuer(b)
	addnorm := func(y, xx, nw uintptr) string {
		return fmt.Sprintf("addnorm y=%x x=%x n=1 res=%x nw=%x xt=%x", y, xx, x.ptr, nw, h.ptr)
	}
	oprojPF := fmt.Sprintf("addnorm_pf y=%x x=%x n=1 res=%x nw=%x xt=%x pf=%x/%d m=%d k=%d", o.ptr, s.att.ptr, x.ptr,
		n2.ptr, h.ptr, wg.ptr, gemvWType(wg), ff, d)
	swigluNF := fmt.Sprintf("swiglu_nf x=%x n=1 gate=%x up=%x out=%x nss=8", h.ptr, g.ptr, u.ptr, g.ptr)
	down := addnorm(fo.ptr, g.ptr, n1.ptr)

	s.step()
	require.Equal(t, "attention_rope", f.take()[1])
	ffn()
	require.Equal(t, []string{oprojPF, swigluNF, down}, f.take()[:3], "after the attention")

	// Another launch between the attention and the producer: no prefetch (the window is gone).
	s.step()
	f.take()
	b.Add(n1, n1, n1)
	ffn()
	require.Equal(t, []string{fmt.Sprintf("add out=%x", n1.ptr), addnorm(o.ptr, s.att.ptr, n2.ptr), swigluNF, down},
		f.take()[:4], "an add between")
	// No attention before it at all, and a library without the entry.
	ffn()
	require.Equal(t, []string{addnorm(o.ptr, s.att.ptr, n2.ptr), swigluNF, down}, f.take()[:3], "no attention")
	b.l.matmulAddNormPF = nil
	s.step()
	f.take()
	ffn()
	require.Equal(t, []string{addnorm(o.ptr, s.att.ptr, n2.ptr), swigluNF, down}, f.take()[:3], "no entry")
}

// foldLayer is what the norm fold folds in a Llama decode layer: out projection -> AddRMSNorm -> gate/up + SwiGLU ->
// down -> AddRMSNorm -> the next layer's q/k/v GEMVs (TestFuseNormFold, TestNormFoldL2Prefetch).
type foldLayer struct {
	o, att, wo, x, h, n2, g, u, wg, wu, fo, wd, n1, q, k, v, wq, wk, wv *tensor
}

// issuer returns a function issuing the layer's ops on b.
func (l *foldLayer) issuer(b *Backend) func() {
	return func() {
		b.MatMul(l.o, l.att, l.wo, nil)
		b.AddRMSNorm(l.x, l.h, l.o, l.n2, 1e-5)
		b.MatMul(l.g, l.h, l.wg, nil)
		b.MatMul(l.u, l.h, l.wu, nil)
		b.SwiGLU(l.g, l.g, l.u)
		b.MatMul(l.fo, l.g, l.wd, nil)
		b.AddRMSNorm(l.x, l.h, l.fo, l.n1, 1e-5)
		b.MatMul(l.q, l.h, l.wq, nil)
		b.MatMul(l.k, l.h, l.wk, nil)
		b.MatMul(l.v, l.h, l.wv, nil)
	}
}
