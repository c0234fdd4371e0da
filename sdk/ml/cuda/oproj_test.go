package cuda

import (
	"fmt"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// oprojArgs must match orch_moe_oproj_args byte for byte (24 pointers, 4
// int64, 6 int32, 3 floats, a pad).
func TestOProjArgsLayout(t *testing.T) {
	var a oprojArgs
	require.Equal(t, uintptr(264), unsafe.Sizeof(a))
	require.Equal(t, uintptr(8*23), unsafe.Offsetof(a.ss))
	require.Equal(t, uintptr(192), unsafe.Offsetof(a.ok))
	require.Equal(t, uintptr(216), unsafe.Offsetof(a.ff))
	require.Equal(t, uintptr(224), unsafe.Offsetof(a.owtype))
	require.Equal(t, uintptr(244), unsafe.Offsetof(a.slots))
	require.Equal(t, uintptr(248), unsafe.Offsetof(a.eps))
	require.Equal(t, uintptr(256), unsafe.Offsetof(a.limit))
}

// oprojFake installs orch_moe_decode_oproj_args, orch_moe_decode_norm and
// _addnorm, orch_moe_decode into the fake library of fuse_test.go; rc: what
// the oproj entry answers, addRC orch_moe_decode_addnorm; last: the oproj
// entry's last operands.
type oprojFake struct {
	rc, addRC int32
	last      oprojArgs
}

func installOProjFake(b *Backend, f *fakeLib) *oprojFake {
	o := &oprojFake{rc: stOK, addRC: stOK}
	b.l.moeDecodeOProj = func(ctx uintptr, a *oprojArgs) int32 {
		if o.rc != stOK {
			return o.rc
		}
		o.last = *a
		return f.add("oproj ox=%x y=%x out=%x x=%x res=%x res2=%x nw2=%x xt=%x", a.ox, a.y, a.out, a.x, a.res, a.res2,
			a.nw2, a.xt)
	}
	b.l.moeDecodeNorm = func(ctx, out, x, res, add, normW uintptr, eps float32, router uintptr, routerType int32,
		routerBias uintptr, nExp int32, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr,
		downType int32, downBias, act, ybuf uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32) int32 {
		return f.add("moe_decode_norm out=%x x=%x res=%x add=%x n=%d", out, x, res, add, n)
	}
	b.l.moeDecodeAddNorm = func(ctx, out, x, res, add, normW uintptr, eps float32, router uintptr, routerType int32,
		routerBias uintptr, nExp int32, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr,
		downType int32, downBias, act, ybuf uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32, res2,
		nw2, xt, ss uintptr) int32 {
		if o.addRC != stOK {
			return o.addRC
		}
		return f.add("moe_decode_addnorm out=%x x=%x res=%x add=%x n=%d res2=%x nw2=%x xt=%x", out, x, res, add, n, res2,
			nw2, xt)
	}
	b.l.moeDecode = func(ctx, out, x, router uintptr, routerType int32, routerBias uintptr, nExp int32, ids, w, gate,
		up uintptr, guType int32, gateBias, upBias, down uintptr, downType int32, downBias, act, ybuf uintptr, n int64,
		slots int32, dim, ff int64, alpha, limit float32) int32 {
		return f.add("moe_decode out=%x x=%x n=%d", out, x, n)
	}
	return o
}

// Host test of the out projection folded into the MoE (normfold.go
// fuseMoEOProj) against the fake library: gpt-oss's layer end (attention out
// GEMV with bias -> AddRMSNorm -> MoE -> AddRMSNorm -> q/k/v) at one token
// makes one orch_moe_decode_oproj call with the next norm's producer half
// (and the projection's, the MoE's and the norm's operands) and the scaled
// q/k/v; without the next norm (MoE not held) one call without it, h holding
// xt (materialised for a later reader, forgotten by the next norm); a held
// MoE launched by another op runs the GEMV and orch_moe_decode_norm; where
// the library declines, the GEMV then today's call; not taken with the
// switch off, without the entry, at two tokens, or where the next norm's
// output does not cover h.
func TestFuseMoEOProj(t *testing.T) {
	defer func(v, nf, mn, an, op bool, mx int64) {
		fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, fuseMoEOProj, moeAddNormMaxN = v, nf, mn, an, op, mx
	}(fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, fuseMoEOProj, moeAddNormMaxN)
	fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, fuseMoEOProj, moeAddNormMaxN = true, true, true, true, true, 1
	b, f := newFakeBackend(t)
	o := installOProjFake(b, f)
	const d, ok, ff, ne, eps = 64, 96, 32, 4, 1e-5
	moe := &ml.MoE{Router: fakeT(b, ml.F32, d, ne), RouterBias: fakeT(b, ml.F32, ne), Gate: fakeT(b, ml.MXFP4, d, ff, ne),
		Up: fakeT(b, ml.MXFP4, d, ff, ne), Down: fakeT(b, ml.MXFP4, ff, d, ne), TopK: 2, Alpha: 1.702, Limit: 7}
	pnw, anw := fakeT(b, ml.F32, d), fakeT(b, ml.F32, d) // post-attention and attention norm weights
	wo, bo := fakeT(b, ml.Q8_0, ok, d), fakeT(b, ml.F32, d)
	wq, wk, wv := fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, 32), fakeT(b, ml.Q8_0, d, 32)
	type acts struct{ x, h, h2, o, att, mo, q, k, v *tensor }
	mk := func(n int) acts {
		return acts{fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n),
			fakeT(b, ml.F32, ok, n), fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, 32, n),
			fakeT(b, ml.F32, 32, n)}
	}
	a1 := mk(1)
	toMoE := func(a acts) {
		b.MatMul(a.o, a.att, wo, bo)
		b.AddRMSNorm(a.x, a.h, a.o, pnw, eps)
		b.MoE(a.mo, a.h, moe)
	}
	qkv := func(a acts, h *tensor) {
		b.MatMul(a.q, h, wq, nil)
		b.MatMul(a.k, h, wk, nil)
		b.MatMul(a.v, h, wv, nil)
	}
	layer := func(a acts) {
		toMoE(a)
		b.AddRMSNorm(a.x, a.h, a.mo, anw, eps)
		qkv(a, a.h)
	}
	gemv := func(a acts) string { return fmt.Sprintf("matmul y=%x x=%x n=%d", a.o.ptr, a.att.ptr, a.x.shape[1]) }
	opAN := func(a acts) string {
		return fmt.Sprintf("oproj ox=%x y=%x out=%x x=%x res=%x res2=%x nw2=%x xt=%x", a.att.ptr, a.o.ptr, a.mo.ptr,
			a.h.ptr, a.x.ptr, a.x.ptr, anw.ptr, a.h.ptr)
	}
	op := func(a acts) string {
		return fmt.Sprintf("oproj ox=%x y=%x out=%x x=%x res=%x res2=0 nw2=0 xt=0", a.att.ptr, a.o.ptr, a.mo.ptr,
			a.h.ptr, a.x.ptr)
	}
	addNorm := func(a acts, h *tensor) string {
		return fmt.Sprintf("moe_decode_addnorm out=%x x=%x res=%x add=%x n=%d res2=%x nw2=%x xt=%x", a.mo.ptr, a.h.ptr,
			a.x.ptr, a.o.ptr, a.x.shape[1], a.x.ptr, anw.ptr, h.ptr)
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
	qkvNF := func(a acts, h *tensor) string {
		return fmt.Sprintf("multi_nf x=%x n=%d k=%d [%x/%d %x/32 %x/32] nss=8 eps=1e-05", h.ptr, a.x.shape[1], d, a.q.ptr,
			d, a.k.ptr, a.v.ptr)
	}
	qkvPlain := func(a acts) string {
		return fmt.Sprintf("multi x=%x n=%d k=%d [%x/%d %x/32 %x/32]", a.h.ptr, a.x.shape[1], d, a.q.ptr, d, a.k.ptr,
			a.v.ptr)
	}
	addOp := func(a acts) string { return fmt.Sprintf("add out=%x", a.x.ptr) }

	// The fold: nothing goes out until q (the GEMV kept, the MoE and the next norm held), then one oproj call
	// with the next norm's producer half and the scaled q/k/v.
	toMoE(a1)
	require.Empty(t, f.take(), "the GEMV and the MoE are held")
	b.AddRMSNorm(a1.x, a1.h, a1.mo, anw, eps)
	require.Empty(t, f.take(), "the norm is held with them")
	qkv(a1, a1.h)
	require.Equal(t, []string{opAN(a1), qkvNF(a1, a1.h)}, f.take())
	require.True(t, b.xt.on, "h holds the next fold's xt")
	require.Equal(t, a1.h.ptr, b.xt.hp)
	require.Equal(t, anw.ptr, b.xt.w)
	// every operand of the call
	a := o.last
	require.Equal(t, oprojArgs{ox: a1.att.ptr, ow: wo.ptr, obias: bo.ptr, y: a1.o.ptr, out: a1.mo.ptr, x: a1.h.ptr,
		res: a1.x.ptr, normW: pnw.ptr, router: moe.Router.(*tensor).ptr, routerBias: moe.RouterBias.(*tensor).ptr,
		ids: b.scratch["moe.ids"].ptr, w: b.scratch["moe.w"].ptr, gate: moe.Gate.(*tensor).ptr,
		up: moe.Up.(*tensor).ptr, down: moe.Down.(*tensor).ptr, act: b.scratch["moe.gate"].ptr,
		ybuf: b.scratch["moe.down"].ptr, res2: a1.x.ptr, nw2: anw.ptr, xt: a1.h.ptr, ss: b.scratch["nf.ss"].ptr,
		ok: ok, n: 1, dim: d, ff: ff, owtype: int32(ml.Q8_0), routerType: int32(ml.F32), nExp: ne,
		guType: int32(ml.MXFP4), downType: int32(ml.MXFP4), slots: 2, eps: eps, alpha: 1.702, limit: 7}, a)
	// the next layer's post-attention norm overwrites h: no materialisation
	layer(a1)
	require.Equal(t, []string{opAN(a1), qkvNF(a1, a1.h)}, f.take())
	// the residual add after the last layer: h materialised first
	b.Add(a1.x, a1.x, a1.mo)
	require.Equal(t, []string{rms(a1.h, a1.x, nil), addOp(a1)}, f.take())
	require.False(t, b.xt.on)

	// The held MoE launched by another op (gpt-oss's last layer: the residual add): the GEMV and today's call.
	toMoE(a1)
	b.Add(a1.x, a1.x, a1.mo)
	require.Equal(t, []string{gemv(a1), plainMoE(a1), addOp(a1)}, f.take())
	require.False(t, b.xt.on)
	toMoE(a1)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{gemv(a1), plainMoE(a1), "sync"}, f.take())
	// ... by the norm, then something else: the GEMV, the MoE, the norm, that op.
	toMoE(a1)
	b.AddRMSNorm(a1.x, a1.h, a1.mo, anw, eps)
	b.Add(a1.att, a1.att, a1.att)
	require.Equal(t, []string{gemv(a1), plainMoE(a1), rms(a1.h, a1.x, a1.mo), fmt.Sprintf("add out=%x", a1.att.ptr)},
		f.take())

	// The next norm writes another tensor: the oproj call would leave h holding xt under it — the GEMV, then
	// orch_moe_decode_addnorm as before.
	toMoE(a1)
	b.AddRMSNorm(a1.x, a1.h2, a1.mo, anw, eps)
	qkv(a1, a1.h2)
	require.Equal(t, []string{gemv(a1), addNorm(a1, a1.h2), qkvNF(a1, a1.h2)}, f.take())
	b.Add(a1.x, a1.x, a1.mo)
	require.Equal(t, []string{rms(a1.h2, a1.x, nil), addOp(a1)}, f.take())

	// The library declines: the GEMV, then exactly today's calls.
	o.rc = stUnsupported
	layer(a1)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{gemv(a1), addNorm(a1, a1.h), qkvNF(a1, a1.h), "sync"}, f.take())
	b.Add(a1.x, a1.x, a1.mo)
	f.take()
	// ... and orch_moe_decode_addnorm too: the GEMV, orch_moe_decode_norm, the norm, the plain q/k/v.
	o.addRC = stUnsupported
	layer(a1)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{gemv(a1), plainMoE(a1), rms(a1.h, a1.x, a1.mo), qkvPlain(a1), "sync"}, f.take())
	require.False(t, b.xt.on)
	o.rc, o.addRC = stOK, stOK

	// The MoE not held (ORCH_CUDA_MOE_ADDNORM=0): its own call without the next norm; h holds xt, which the next
	// norm overwrites, and which a later reader materialises.
	fuseMoEAddNorm = false
	toMoE(a1)
	require.Equal(t, []string{op(a1)}, f.take())
	require.True(t, b.xt.on, "h holds this fold's xt")
	require.Equal(t, pnw.ptr, b.xt.w)
	b.AddRMSNorm(a1.x, a1.h, a1.mo, anw, eps)
	qkv(a1, a1.h)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{rms(a1.h, a1.x, a1.mo), qkvPlain(a1), "sync"}, f.take())
	require.False(t, b.xt.on)
	toMoE(a1)
	b.MatMul(a1.q, a1.h, wq, nil) // a reader of h
	require.NoError(t, b.Sync())
	require.Equal(t, []string{op(a1), rms(a1.h, a1.x, nil), fmt.Sprintf("matmul y=%x x=%x n=1", a1.q.ptr, a1.h.ptr),
		"sync"}, f.take())
	toMoE(a1)
	b.Add(a1.x, a1.x, a1.mo) // a writer of the residual
	require.Equal(t, []string{op(a1), rms(a1.h, a1.x, nil), addOp(a1)}, f.take())
	// ... and captured: h materialised at the graph's end
	require.NoError(t, b.Run("oproj-plain", func() { toMoE(a1) }))
	require.Equal(t, []string{"graph_begin", op(a1), rms(a1.h, a1.x, nil), "graph_end", "graph_launch"}, f.take())
	// ... declined: the GEMV, then orch_moe_decode_norm
	o.rc = stUnsupported
	toMoE(a1)
	require.Equal(t, []string{gemv(a1), plainMoE(a1)}, f.take())
	require.False(t, b.xt.on)
	o.rc = stOK
	fuseMoEAddNorm = true

	// A graph of the layer: the fold, h materialised at its end.
	require.NoError(t, b.Run("oproj-layer", func() { layer(a1) }))
	require.Equal(t, []string{"graph_begin", opAN(a1), qkvNF(a1, a1.h), rms(a1.h, a1.x, nil), "graph_end",
		"graph_launch"}, f.take())
	require.False(t, b.xt.on)

	// Not taken: the switch off, the library without the entry (today's calls), two tokens.
	fuseMoEOProj = false
	layer(a1)
	require.Equal(t, []string{gemv(a1), addNorm(a1, a1.h), qkvNF(a1, a1.h)}, f.take(), "ORCH_CUDA_MOE_OPROJ=0")
	b.Add(a1.x, a1.x, a1.mo)
	f.take()
	fuseMoEOProj = true
	fn := b.l.moeDecodeOProj
	b.l.moeDecodeOProj = nil
	layer(a1)
	require.Equal(t, []string{gemv(a1), addNorm(a1, a1.h), qkvNF(a1, a1.h)}, f.take(), "library without the entry")
	b.Add(a1.x, a1.x, a1.mo)
	f.take()
	b.l.moeDecodeOProj = fn
	moeAddNormMaxN = 2
	a2 := mk(2)
	layer(a2)
	require.Equal(t, []string{gemv(a2), addNorm(a2, a2.h), qkvNF(a2, a2.h)}, f.take(), "two tokens")
	b.Add(a2.x, a2.x, a2.mo)
	f.take()
	// A norm fold without a MoE after it (Llama) is unchanged.
	b.MatMul(a1.o, a1.att, wo, bo)
	b.AddRMSNorm(a1.x, a1.h, a1.o, pnw, eps)
	qkv(a1, a1.h)
	require.Equal(t, []string{fmt.Sprintf("addnorm y=%x x=%x n=1 res=%x nw=%x xt=%x", a1.o.ptr, a1.att.ptr, a1.x.ptr,
		pnw.ptr, a1.h.ptr), qkvNF(a1, a1.h)}, f.take())
	require.NoError(t, b.Err())
}

// gpt-oss's Hidden for three layers and one token through the fake library
// (as TestFuseMoEAddNormStep): layers 0 and 1 end in one oproj call each (the
// out projection, both norms and the MoE) and the scaled q/k/v, the last
// layer in the GEMV and orch_moe_decode_norm; with ORCH_CUDA_MOE_ADDNORM=0
// every layer's MoE is an oproj call, and h is materialised once, before the
// residual add.
func TestFuseMoEOProjStep(t *testing.T) {
	defer func(v, nf, mn, an, ar, op bool) {
		fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, foldAttnRoPE, fuseMoEOProj = v, nf, mn, an, ar, op
	}(fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, foldAttnRoPE, fuseMoEOProj)
	fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, foldAttnRoPE, fuseMoEOProj = true, true, true, true, true, true
	b, f := newFakeBackend(t)
	installOProjFake(b, f)
	b.l.attentionRope = func(ctx uintptr, a *attnArgs, r *attnRopeArgs) int32 { return f.add("attention_rope") }
	b.l.getRows = func(ctx, dst, table uintptr, tt int32, ids uintptr, n, dim int64, add int32) int32 {
		return f.add("embed")
	}
	g := newOSSStep(b, true)
	const layers = ossLayers
	x, h, mo, o, att2, step := g.x, g.h, g.mo, g.o, g.att2, g.step
	multi, multiNF, oGEMV := g.multi, g.multiNF, g.oGEMV
	oprojAN := func(i int) string {
		return fmt.Sprintf("oproj ox=%x y=%x out=%x x=%x res=%x res2=%x nw2=%x xt=%x", att2.ptr, o.ptr, mo.ptr, h.ptr,
			x.ptr, x.ptr, g.an[i+1].ptr, h.ptr)
	}
	oproj := fmt.Sprintf("oproj ox=%x y=%x out=%x x=%x res=%x res2=0 nw2=0 xt=0", att2.ptr, o.ptr, mo.ptr, h.ptr, x.ptr)
	addX := fmt.Sprintf("add out=%x", x.ptr)
	want := []string{"embed", fmt.Sprintf("rmsnorm out=%x x=%x add=0", h.ptr, x.ptr), multi}
	for i := 0; i < layers; i++ {
		want = append(want, "attention_rope")
		if i < layers-1 {
			want = append(want, oprojAN(i), multiNF)
		} else {
			want = append(want, oGEMV, fmt.Sprintf("moe_decode_norm out=%x x=%x res=%x add=%x n=1", mo.ptr, h.ptr, x.ptr,
				o.ptr))
		}
	}
	want = append(want, addX)
	g.checkEagerAndGraph(t, b, f, want)
	// ORCH_CUDA_MOE_ADDNORM=0: each MoE one oproj call; the norms after them plain; h materialised before the add.
	fuseMoEAddNorm = false
	step()
	require.NoError(t, b.Sync())
	off := []string{"embed", fmt.Sprintf("rmsnorm out=%x x=%x add=0", h.ptr, x.ptr), multi}
	for i := 0; i < layers; i++ {
		off = append(off, "attention_rope", oproj)
		if i < layers-1 {
			off = append(off, fmt.Sprintf("rmsnorm out=%x x=%x add=%x", h.ptr, x.ptr, mo.ptr), multi)
		}
	}
	off = append(off, fmt.Sprintf("rmsnorm out=%x x=%x add=0", h.ptr, x.ptr), addX, "sync")
	require.Equal(t, off, f.take())
}
