package cuda

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// Host test of the norm fold with the MoE as its producer (normfold.go
// holdMoEProd / holdMoENormProd / launchHeldMoE) against the fake library of
// fuse_test.go: gpt-oss's layer end (attention out GEMV -> AddRMSNorm -> MoE
// -> AddRMSNorm -> q/k/v) becomes the GEMV, orch_moe_decode_addnorm and the
// scaled q/k/v; the held MoE makes its plain orch_moe_decode_norm call
// before anything else (another op, a norm of something else, Sync), where
// the library declines the fold (then the norm, then the plain MatMuls), and
// re-enters the MoE op's plain path where the library declines that call too;
// not held with the switches off, without the library entry, for nine
// tokens (two by default: ORCH_CUDA_MOE_ADDNORM=N widens it), where MoE v13 is routed; a graph ends with h materialised; the
// consumers declining materialise h.
func TestFuseMoEAddNorm(t *testing.T) {
	defer func(v, nf, mn, an, from bool, f13 int, mx int64) {
		fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, moeAuto, moe13From, moeAddNormMaxN = v, nf, mn, an, from,
			f13, mx
	}(fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, moeAuto, moe13From, moeAddNormMaxN)
	fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, moeAuto, moe13From = true, true, true, true, true, 9
	moeAddNormMaxN = 8 // ORCH_CUDA_MOE_ADDNORM=8 (the default folds one token: checked below)
	b, f := newFakeBackend(t)
	normRC, addRC := int32(stOK), int32(stOK)
	b.l.moeDecodeNorm = func(ctx, out, x, res, add, normW uintptr, eps float32, router uintptr, routerType int32,
		routerBias uintptr, nExp int32, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr,
		downType int32, downBias, act, ybuf uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32) int32 {
		if normRC != stOK {
			return normRC
		}
		return f.add("moe_decode_norm out=%x x=%x res=%x add=%x n=%d", out, x, res, add, n)
	}
	b.l.moeDecodeAddNorm = func(ctx, out, x, res, add, normW uintptr, eps float32, router uintptr, routerType int32,
		routerBias uintptr, nExp int32, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr,
		downType int32, downBias, act, ybuf uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32, res2,
		nw2, xt, ss uintptr) int32 {
		if addRC != stOK {
			return addRC
		}
		return f.add("moe_decode_addnorm out=%x x=%x res=%x add=%x n=%d res2=%x nw2=%x xt=%x", out, x, res, add, n, res2,
			nw2, xt)
	}
	b.l.moeDecode = func(ctx, out, x, router uintptr, routerType int32, routerBias uintptr, nExp int32, ids, w, gate,
		up uintptr, guType int32, gateBias, upBias, down uintptr, downType int32, downBias, act, ybuf uintptr, n int64,
		slots int32, dim, ff int64, alpha, limit float32) int32 {
		return f.add("moe_decode out=%x x=%x n=%d", out, x, n)
	}
	const d, ff, ne, eps = 64, 32, 4, 1e-5
	moe := &ml.MoE{Router: fakeT(b, ml.F32, d, ne), Gate: fakeT(b, ml.MXFP4, d, ff, ne),
		Up: fakeT(b, ml.MXFP4, d, ff, ne), Down: fakeT(b, ml.MXFP4, ff, d, ne), TopK: 2, Alpha: 1.702, Limit: 7}
	pnw, anw := fakeT(b, ml.F32, d), fakeT(b, ml.F32, d) // post-attention and attention norm weights
	wo, wq, wk, wv := fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, 32), fakeT(b, ml.Q8_0, d, 32)
	type acts struct{ x, h, o, att, mo, q, k, v *tensor }
	mk := func(n int) acts {
		return acts{fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n),
			fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, 32, n), fakeT(b, ml.F32, 32, n)}
	}
	a1 := mk(1)
	// the layer's end up to the MoE, then the next layer's norm and q/k/v
	toMoE := func(a acts) {
		b.MatMul(a.o, a.att, wo, nil)
		b.AddRMSNorm(a.x, a.h, a.o, pnw, eps)
		b.MoE(a.mo, a.h, moe)
	}
	qkv := func(a acts) {
		b.MatMul(a.q, a.h, wq, nil)
		b.MatMul(a.k, a.h, wk, nil)
		b.MatMul(a.v, a.h, wv, nil)
	}
	layer := func(a acts) {
		toMoE(a)
		b.AddRMSNorm(a.x, a.h, a.mo, anw, eps)
		qkv(a)
	}
	gemv := func(a acts) string { return fmt.Sprintf("matmul y=%x x=%x n=%d", a.o.ptr, a.att.ptr, a.x.shape[1]) }
	fold := func(a acts) string {
		return fmt.Sprintf("moe_decode_addnorm out=%x x=%x res=%x add=%x n=%d res2=%x nw2=%x xt=%x", a.mo.ptr, a.h.ptr,
			a.x.ptr, a.o.ptr, a.x.shape[1], a.x.ptr, anw.ptr, a.h.ptr)
	}
	plainMoE := func(a acts) string {
		return fmt.Sprintf("moe_decode_norm out=%x x=%x res=%x add=%x n=%d", a.mo.ptr, a.h.ptr, a.x.ptr, a.o.ptr,
			a.x.shape[1])
	}
	rms := func(out, res, add *tensor) string {
		ap := uintptr(0)
		if add != nil {
			ap = add.ptr
		}
		return fmt.Sprintf("rmsnorm out=%x x=%x add=%x", out.ptr, res.ptr, ap)
	}
	qkvNF := func(a acts) string {
		return fmt.Sprintf("multi_nf x=%x n=%d k=%d [%x/%d %x/32 %x/32] nss=8 eps=1e-05", a.h.ptr, a.x.shape[1], d, a.q.ptr,
			d, a.k.ptr, a.v.ptr)
	}
	qkvPlain := func(a acts) string {
		return fmt.Sprintf("multi x=%x n=%d k=%d [%x/%d %x/32 %x/32]", a.h.ptr, a.x.shape[1], d, a.q.ptr, d, a.k.ptr,
			a.v.ptr)
	}
	// without the fold: the GEMV, the MoE with its pre-norm, the norm, q/k/v (rest: after the MoE call)
	plainLayer := func(what string, a acts, rest ...string) {
		t.Helper()
		layer(a)
		require.NoError(t, b.Sync())
		want := append([]string{gemv(a), plainMoE(a), rms(a.h, a.x, a.mo), qkvPlain(a)}, rest...)
		require.Equal(t, append(want, "sync"), f.take(), what)
		require.False(t, b.xt.on, what)
	}

	// The fold: the GEMV goes out at the MoE (its norm taken in), the MoE is held and launches with the next norm's
	// producer half at q; q/k/v are the scaled consumers.
	toMoE(a1)
	require.Equal(t, []string{gemv(a1)}, f.take(), "the MoE is held")
	b.AddRMSNorm(a1.x, a1.h, a1.mo, anw, eps)
	require.Empty(t, f.take(), "the norm is held with it")
	qkv(a1) // (three parts: launched)
	require.Equal(t, []string{fold(a1), qkvNF(a1)}, f.take())
	require.True(t, b.xt.on, "h holds xt")
	// the next layer's post-attention norm overwrites h: no materialisation
	layer(a1)
	require.Equal(t, []string{gemv(a1), fold(a1), qkvNF(a1)}, f.take())
	// the residual add after the last layer: h materialised first
	b.Add(a1.x, a1.x, a1.mo)
	require.Equal(t, []string{rms(a1.h, a1.x, nil), fmt.Sprintf("add out=%x", a1.x.ptr)}, f.take())
	require.False(t, b.xt.on)

	// The held MoE followed by something else: its plain call, then that op.
	toMoE(a1)
	b.Add(a1.x, a1.x, a1.mo)
	require.Equal(t, []string{gemv(a1), plainMoE(a1), fmt.Sprintf("add out=%x", a1.x.ptr)}, f.take())
	toMoE(a1)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{gemv(a1), plainMoE(a1), "sync"}, f.take())
	// ... by the norm, then something else: the MoE, the norm, that op.
	toMoE(a1)
	b.AddRMSNorm(a1.x, a1.h, a1.mo, anw, eps)
	b.Add(a1.att, a1.att, a1.att)
	require.Equal(t, []string{gemv(a1), plainMoE(a1), rms(a1.h, a1.x, a1.mo), fmt.Sprintf("add out=%x", a1.att.ptr)},
		f.take())
	// ... by a norm of another tensor (not held with it; held for a MoE after it as before).
	toMoE(a1)
	b.AddRMSNorm(a1.x, a1.h, a1.o, anw, eps)
	qkv(a1)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{gemv(a1), plainMoE(a1), rms(a1.h, a1.x, a1.o), qkvPlain(a1), "sync"}, f.take())
	// ... by a norm writing its output into the MoE's output: not held with it.
	toMoE(a1)
	b.AddRMSNorm(a1.x, a1.mo, a1.mo, anw, eps)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{gemv(a1), plainMoE(a1), rms(a1.mo, a1.x, a1.mo), "sync"}, f.take())

	// The library declines the fold: the MoE's plain call, the norm, the plain q/k/v.
	addRC = stUnsupported
	plainLayer("the fold declined", a1)
	// ... and the plain call too: the pre-norm, the MoE op's plain path, the norm, q/k/v.
	normRC = stUnsupported
	layer(a1)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{gemv(a1), rms(a1.h, a1.x, a1.o), fmt.Sprintf("moe_decode out=%x x=%x n=1", a1.mo.ptr, a1.h.ptr),
		rms(a1.h, a1.x, a1.mo), qkvPlain(a1), "sync"}, f.take())
	normRC, addRC = stOK, stOK

	// The consumers decline: h materialised, then the plain q/k/v.
	f.nfRC = stUnsupported
	layer(a1)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{gemv(a1), fold(a1), rms(a1.h, a1.x, nil), qkvPlain(a1), "sync"}, f.take())
	f.nfRC = stOK

	// A graph: the layer captured with the fold, h materialised at its end.
	require.NoError(t, b.Run("moe-addnorm", func() { layer(a1) }))
	require.Equal(t, []string{"graph_begin", gemv(a1), fold(a1), qkvNF(a1), rms(a1.h, a1.x, nil), "graph_end",
		"graph_launch"}, f.take())
	require.False(t, b.xt.on)

	// Not held: each switch off, the library without the entry.
	for _, c := range []struct {
		what string
		sw   *bool
	}{{"ORCH_CUDA_MOE_ADDNORM=0", &fuseMoEAddNorm}, {"ORCH_CUDA_NORM_FOLD=0", &fuseNormFold}} {
		*c.sw = false
		toMoE(a1)
		require.Equal(t, []string{gemv(a1), plainMoE(a1)}, f.take(), c.what)
		b.AddRMSNorm(a1.x, a1.h, a1.mo, anw, eps)
		qkv(a1)
		require.NoError(t, b.Sync())
		require.Equal(t, []string{rms(a1.h, a1.x, a1.mo), qkvPlain(a1), "sync"}, f.take(), c.what)
		*c.sw = true
	}
	fuseMoENorm = false // ORCH_CUDA_MOE_NORM=0: no pre-norm fold, no MoE hold
	toMoE(a1)
	require.Equal(t, []string{gemv(a1), rms(a1.h, a1.x, a1.o), fmt.Sprintf("moe_decode out=%x x=%x n=1", a1.mo.ptr, a1.h.ptr)},
		f.take())
	require.NoError(t, b.Sync())
	f.take()
	fuseMoENorm = true
	an := b.l.moeDecodeAddNorm
	b.l.moeDecodeAddNorm = nil
	toMoE(a1)
	require.Equal(t, []string{gemv(a1), plainMoE(a1)}, f.take(), "library without orch_moe_decode_addnorm")
	require.NoError(t, b.Sync())
	f.take()
	b.l.moeDecodeAddNorm = an

	// Two and eight tokens fold; nine do not (MoE v13 from 9 by default); nor two where v13 is routed from 2.
	for _, n := range []int{2, 8} {
		a := mk(n)
		layer(a)
		require.NoError(t, b.Sync())
		require.Equal(t, []string{gemv(a), fold(a), qkvNF(a), "sync"}, f.take(), "n=%d", n)
		b.Add(a.x, a.x, a.mo)
		f.take()
	}
	moeAddNormMaxN = 1 // the default: two tokens are not held
	a2d := mk(2)
	toMoE(a2d)
	require.Equal(t, []string{gemv(a2d), plainMoE(a2d)}, f.take(), "default: one token folds")
	require.NoError(t, b.Sync())
	f.take()
	moeAddNormMaxN = 8
	a9 := mk(9)
	toMoE(a9)
	require.Equal(t, plainMoE(a9), f.take()[1], "n=9: not held")
	require.NoError(t, b.Sync())
	f.take()
	moe13From = 2
	a2 := mk(2)
	toMoE(a2)
	require.Equal(t, []string{gemv(a2), plainMoE(a2)}, f.take(), "ORCH_CUDA_MOE13_FROM=2: v13 at 2 tokens, not held")
	moeAuto = false // ORCH_CUDA_MOE pinned: no v13 from MOE13_FROM; the library decides (v10 or declines)
	toMoE(a2)
	require.Equal(t, []string{gemv(a2)}, f.take(), "held")
	require.NoError(t, b.Sync())
	require.Equal(t, []string{plainMoE(a2), "sync"}, f.take())
	require.NoError(t, b.Err())
}

// gpt-oss's Hidden (plugins/gpt gptoss.go) for three layers and one token
// through the fake library, eagerly and captured: per step one plain norm
// (layer 0), the folded pre-norm + MoE (orch_moe_decode_addnorm) ending
// layers 0 and 1 with the next layer's q/k/v as its scaled consumers, the
// last layer's MoE plain (the residual add after it), no norm materialised,
// and the attention fold (RoPE + KV write in orch_attention_rope) unchanged.
func TestFuseMoEAddNormStep(t *testing.T) {
	defer func(v, nf, mn, an, ar bool) {
		fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, foldAttnRoPE = v, nf, mn, an, ar
	}(fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, foldAttnRoPE)
	fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, foldAttnRoPE = true, true, true, true, true
	b, f := newFakeBackend(t)
	b.l.moeDecodeNorm = func(ctx, out, x, res, add, normW uintptr, eps float32, router uintptr, routerType int32,
		routerBias uintptr, nExp int32, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr,
		downType int32, downBias, act, ybuf uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32) int32 {
		return f.add("moe_decode_norm")
	}
	b.l.moeDecodeAddNorm = func(ctx, out, x, res, add, normW uintptr, eps float32, router uintptr, routerType int32,
		routerBias uintptr, nExp int32, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr,
		downType int32, downBias, act, ybuf uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32, res2,
		nw2, xt, ss uintptr) int32 {
		return f.add("moe_decode_addnorm")
	}
	b.l.attentionRope = func(ctx uintptr, a *attnArgs, r *attnRopeArgs) int32 { return f.add("attention_rope") }
	b.l.getRows = func(ctx, dst, table uintptr, tt int32, ids uintptr, n, dim int64, add int32) int32 {
		return f.add("embed")
	}
	g := newOSSStep(b, false)
	const layers = ossLayers
	x, h, mo, step := g.x, g.h, g.mo, g.step
	multi, multiNF, oGEMV := g.multi, g.multiNF, g.oGEMV
	want := []string{"embed", fmt.Sprintf("rmsnorm out=%x x=%x add=0", h.ptr, x.ptr), multi}
	for i := 0; i < layers; i++ {
		want = append(want, "attention_rope", oGEMV)
		if i < layers-1 {
			want = append(want, "moe_decode_addnorm", multiNF)
		} else {
			want = append(want, "moe_decode_norm")
		}
	}
	want = append(want, fmt.Sprintf("add out=%x", x.ptr))
	g.checkEagerAndGraph(t, b, f, want)
	// ORCH_CUDA_MOE_ADDNORM=0: the norms back (layers 1 and 2), q/k/v plain.
	fuseMoEAddNorm = false
	step()
	require.NoError(t, b.Sync())
	off := []string{"embed", fmt.Sprintf("rmsnorm out=%x x=%x add=0", h.ptr, x.ptr), multi}
	for i := 0; i < layers; i++ {
		off = append(off, "attention_rope", oGEMV, "moe_decode_norm")
		if i < layers-1 {
			off = append(off, fmt.Sprintf("rmsnorm out=%x x=%x add=%x", h.ptr, x.ptr, mo.ptr), multi)
		}
	}
	require.Equal(t, append(append(off, fmt.Sprintf("add out=%x", x.ptr)), "sync"), f.take())
}

const eps5 = 1e-5

// ossLayers: the layers of newOSSStep's model.
const ossLayers = 3

// ossStep is gpt-oss's Hidden for ossLayers one-token layers through the fake
// library (TestFuseMoEAddNormStep, TestFuseMoEOProjStep): step records it,
// the rest is what the expected calls name.
type ossStep struct {
	x, h, mo, o, q2, k2, att2 *tensor
	an                        []*tensor // each layer's attention norm weight
	nh, nkv                   int
	step                      func()
	multi, multiNF, oGEMV     string // the q/k/v GEMVs plain and scaled (the norm folded), the out projection
}

// checkEagerAndGraph runs the step eagerly (then a sync) and as a captured
// graph, asserting the launches want both times; the last layer's q / k, left
// unrotated by the attention fold, are rotated at the graph's start and end
// (fuse.go).
func (g *ossStep) checkEagerAndGraph(t *testing.T, b *Backend, f *fakeLib, want []string) {
	t.Helper()
	g.step()
	require.NoError(t, b.Sync())
	require.Equal(t, append(append([]string(nil), want...), "sync"), f.take())
	require.False(t, b.xt.on)
	require.NoError(t, b.Run("step", g.step))
	rot := fmt.Sprintf("rope2 x0=%x heads=%d x1=%x heads=%d", g.q2.ptr, g.nh, g.k2.ptr, g.nkv)
	require.Equal(t, append(append([]string{rot, "graph_begin"}, want...), rot, "graph_end", "graph_launch"), f.take())
}

// newOSSStep builds the model's fake tensors on b; outBias: the out
// projection has a bias (nil otherwise).
func newOSSStep(b *Backend, outBias bool) *ossStep {
	const d, hd, nh, nkv, bs, ne, ff = 64, 16, 4, 2, 16, 4, 32
	type lw struct {
		an, pn, q, k, v, o, ob, qb, kc, vc *tensor
		moe                                *ml.MoE
	}
	var L [ossLayers]lw
	for i := range L {
		L[i] = lw{an: fakeT(b, ml.F32, d), pn: fakeT(b, ml.F32, d), q: fakeT(b, ml.Q8_0, d, hd*nh),
			k: fakeT(b, ml.Q8_0, d, hd*nkv), v: fakeT(b, ml.Q8_0, d, hd*nkv), o: fakeT(b, ml.Q8_0, hd*nh, d),
			qb: fakeT(b, ml.F32, hd*nh), kc: fakeT(b, ml.F16, hd, nkv, bs, 4), vc: fakeT(b, ml.F16, hd, nkv, bs, 4),
			moe: &ml.MoE{Router: fakeT(b, ml.F32, d, ne), Gate: fakeT(b, ml.MXFP4, d, ff, ne),
				Up: fakeT(b, ml.MXFP4, d, ff, ne), Down: fakeT(b, ml.MXFP4, ff, d, ne), TopK: 2, Alpha: 1.702, Limit: 7}}
	}
	if outBias {
		for i := range L {
			L[i].ob = fakeT(b, ml.F32, d)
		}
	}
	emb := fakeT(b, ml.Q8_0, d, 16)
	x, h, mo, o := fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1)
	q2, k2, v2, att2 := fakeT(b, ml.F32, hd*nh, 1), fakeT(b, ml.F32, hd*nkv, 1), fakeT(b, ml.F32, hd*nkv, 1),
		fakeT(b, ml.F32, hd*nh, 1)
	view := func(t *tensor, heads int) *tensor {
		c := *t
		c.shape = []int{hd, heads, 1}
		return &c
	}
	q, k, v, att := view(q2, nh), view(k2, nkv), view(v2, nkv), view(att2, nh)
	ids, pos, freq := fakeT(b, ml.I32, 1), fakeT(b, ml.I32, 1), fakeT(b, ml.F32, hd/2)
	rope := &ml.Rope{Mode: ml.RopeNeoX, Dims: hd, InvFreq: freq}
	bt := &ml.Batch{Pos: pos, Seq: fakeT(b, ml.I32, 1), Slots: fakeT(b, ml.I32, 1), Blocks: fakeT(b, ml.I32, 4, 1),
		BlockSize: bs, MaxPos: 1}
	step := func() {
		b.Embed(x, emb, ids, false)
		for i := range L {
			l := &L[i]
			if i == 0 {
				b.RMSNorm(h, x, l.an, eps5)
			} else {
				b.AddRMSNorm(x, h, mo, l.an, eps5)
			}
			b.MatMul(q2, h, l.q, l.qb)
			b.MatMul(k2, h, l.k, nil)
			b.MatMul(v2, h, l.v, nil)
			b.RoPE(q, pos, rope)
			b.RoPE(k, pos, rope)
			b.KVWrite(l.kc, l.vc, k, v, bt)
			b.Attend(att, q, l.kc, l.vc, bt, &ml.Attention{Scale: 0.25})
			if l.ob != nil {
				b.MatMul(o, att2, l.o, l.ob)
			} else {
				b.MatMul(o, att2, l.o, nil)
			}
			b.AddRMSNorm(x, h, o, l.pn, eps5)
			b.MoE(mo, h, l.moe)
		}
		b.Add(x, x, mo)
	}
	g := &ossStep{x: x, h: h, mo: mo, o: o, q2: q2, k2: k2, att2: att2, nh: nh, nkv: nkv, step: step}
	for i := range L {
		g.an = append(g.an, L[i].an)
	}
	g.multi = fmt.Sprintf("multi x=%x n=1 k=%d [%x/%d %x/%d %x/%d]", h.ptr, d, q2.ptr, hd*nh, k2.ptr, hd*nkv, v2.ptr,
		hd*nkv)
	g.multiNF = fmt.Sprintf("multi_nf x=%x n=1 k=%d [%x/%d %x/%d %x/%d] nss=8 eps=1e-05", h.ptr, d, q2.ptr, hd*nh, k2.ptr,
		hd*nkv, v2.ptr, hd*nkv)
	g.oGEMV = fmt.Sprintf("matmul y=%x x=%x n=1", o.ptr, att2.ptr)
	return g
}
