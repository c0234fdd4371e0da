package cuda

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// Host tests of Discard (discard.go) against the fake library of
// fuse_test.go: discarded q / k left unrotated by the attention fold are not
// rotated (not by a later op, not at a graph's end); a discarded norm output
// holding xt is not materialised (not by the residual add, not at a graph's
// end), while held launches still go out as before; partial overlaps, the
// residual, other backends' tensors and the switch change nothing.

func TestDiscardRoPEFold(t *testing.T) {
	defer func(v, w, d bool) { fuseOps, foldAttnRoPE, discardOn = v, w, d }(fuseOps, foldAttnRoPE, discardOn)
	fuseOps, foldAttnRoPE, discardOn = true, true, true
	b, f := newFakeBackend(t)
	b.l.attentionRope = func(ctx uintptr, a *attnArgs, r *attnRopeArgs) int32 {
		return f.add("attention_rope out=%x q=%x", a.out, a.q)
	}
	s := newRopeFoldStep(b, 1)
	q, k := s.q, s.k
	multi := fmt.Sprintf("multi x=%x n=1 k=64 [%x/64 %x/32 %x/32]", s.h.ptr, q.ptr, k.ptr, s.v.ptr)
	attn := fmt.Sprintf("attention_rope out=%x q=%x", s.att.ptr, q.ptr)
	rope2 := fmt.Sprintf("rope2 x0=%x heads=%d x1=%x heads=%d", q.ptr, s.nh, k.ptr, s.nkv)
	addQ := fmt.Sprintf("add out=%x", q.ptr)

	// Without Discard an op reading q rotates q and k first.
	s.step()
	require.Equal(t, []string{multi, attn}, f.take())
	b.Add(q, q, q)
	require.Equal(t, []string{rope2, addQ}, f.take())

	// Discarded: nothing to rotate; nothing launched by Discard itself.
	s.step()
	f.take()
	b.Discard(q, k)
	require.Empty(t, f.take())
	require.False(t, b.pend.unrot.on)
	b.Add(q, q, q)
	require.Equal(t, []string{addQ}, f.take())

	// Only k discarded: q alone is rotated.
	s.step()
	f.take()
	b.Discard(k)
	b.Add(q, q, q)
	require.Equal(t, []string{fmt.Sprintf("rope x=%x heads=%d", q.ptr, s.nh), addQ}, f.take())

	// Nil, foreign, freed and unrelated tensors are ignored; the switch off: as without Discard.
	s.step()
	f.take()
	other, _ := newFakeBackend(t)
	freed := *q
	freed.ptr = 0
	b.Discard(nil, fakeT(other, ml.F32, 4), &freed, s.x, s.att)
	require.True(t, b.pend.unrot.on)
	discardOn = false
	b.Discard(q, k)
	discardOn = true
	require.True(t, b.pend.unrot.on)
	b.Add(q, q, q)
	require.Equal(t, []string{rope2, addQ}, f.take())

	// A graph's end: the rope pair only without Discard.
	require.NoError(t, b.Run("plain", s.step))
	require.Equal(t, []string{"graph_begin", multi, attn, rope2, "graph_end", "graph_launch"}, f.take())
	require.NoError(t, b.Run("discard", func() { s.step(); b.Discard(q, k) }))
	require.Equal(t, []string{"graph_begin", multi, attn, "graph_end", "graph_launch"}, f.take())
	require.False(t, b.pend.unrot.on)
	require.NoError(t, b.Run("discard", nil)) // replay: nothing before it either
	require.Equal(t, []string{"graph_launch"}, f.take())

	// Two tokens, the first token's rows of q and k discarded: a partial overlap, still rotated.
	s2 := newRopeFoldStep(b, 2)
	q0, k0 := *s2.q, *s2.k
	q0.bytes, k0.bytes = s2.q.bytes/2, s2.k.bytes/2
	s2.step()
	f.take()
	b.Discard(&q0, &k0)
	require.True(t, b.pend.unrot.on)
	b.Add(s2.q, s2.q, s2.q)
	require.Equal(t, []string{fmt.Sprintf("rope2 x0=%x heads=%d x1=%x heads=%d", s2.q.ptr, s2.nh, s2.k.ptr, s2.nkv),
		fmt.Sprintf("add out=%x", s2.q.ptr)}, f.take())
}

// Llama's last layer: out projection -> AddRMSNorm -> gate/up + SwiGLU ->
// down, then the residual add. The norm folds; h holds xt until the add
// materialises it — unless h is discarded first.
func TestDiscardNormFold(t *testing.T) {
	defer func(v, nf, d bool) { fuseOps, fuseNormFold, discardOn = v, nf, d }(fuseOps, fuseNormFold, discardOn)
	fuseOps, fuseNormFold, discardOn = true, true, true
	b, f := newFakeBackend(t)
	const d, ff = 64, 96
	x, h, o, att, fo := fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1),
		fakeT(b, ml.F32, d, 1)
	n1, n2 := fakeT(b, ml.F32, d), fakeT(b, ml.F32, d)
	wo, wq, wg, wu, wd := fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, ff),
		fakeT(b, ml.Q8_0, d, ff), fakeT(b, ml.Q8_0, ff, d)
	q, g, u := fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, ff, 1), fakeT(b, ml.F32, ff, 1)
	addnorm := fmt.Sprintf("addnorm y=%x x=%x n=1 res=%x nw=%x xt=%x", o.ptr, att.ptr, x.ptr, n2.ptr, h.ptr)
	swigluNF := fmt.Sprintf("swiglu_nf x=%x n=1 gate=%x up=%x out=%x nss=8", h.ptr, g.ptr, u.ptr, g.ptr)
	down := fmt.Sprintf("matmul y=%x x=%x n=1", fo.ptr, g.ptr)
	rms := fmt.Sprintf("rmsnorm out=%x x=%x add=0", h.ptr, x.ptr)
	addX := fmt.Sprintf("add out=%x", x.ptr)
	last := func(discard ...ml.Tensor) func() {
		return func() {
			b.MatMul(o, att, wo, nil)
			b.AddRMSNorm(x, h, o, n2, 1e-5)
			b.MatMul(g, h, wg, nil)
			b.MatMul(u, h, wu, nil)
			b.SwiGLU(g, g, u)
			b.MatMul(fo, g, wd, nil)
			b.Discard(discard...)
			b.Add(x, x, fo)
		}
	}

	last()()
	require.Equal(t, []string{addnorm, swigluNF, down, rms, addX}, f.take())
	last(h)()
	require.Equal(t, []string{addnorm, swigluNF, down, addX}, f.take(), "h discarded: no norm")
	require.False(t, b.xt.on)
	last(x, n2)() // the residual and the weight: h still materialised before the add
	require.Equal(t, []string{addnorm, swigluNF, down, rms, addX}, f.take())
	discardOn = false
	last(h)()
	require.Equal(t, []string{addnorm, swigluNF, down, rms, addX}, f.take(), "ORCH_CUDA_DISCARD=0")
	discardOn = true

	// Graphs end with h materialised, unless discarded.
	require.NoError(t, b.Run("plain", last()))
	require.Equal(t, []string{"graph_begin", addnorm, swigluNF, down, rms, addX, "graph_end", "graph_launch"}, f.take())
	require.NoError(t, b.Run("discard", func() { last()(); b.Discard(h) }))
	require.Equal(t, []string{"graph_begin", addnorm, swigluNF, down, rms, addX, "graph_end", "graph_launch"}, f.take(),
		"discarded after the add materialised it: too late")
	require.NoError(t, b.Run("discard-early", last(h)))
	require.Equal(t, []string{"graph_begin", addnorm, swigluNF, down, addX, "graph_end", "graph_launch"}, f.take())

	// Held scaled consumers of h (q) still launch on xt; declined, h is materialised for their plain launch.
	qNF := fmt.Sprintf("multi_nf x=%x n=1 k=%d [%x/%d] nss=8 eps=1e-05", h.ptr, d, q.ptr, d)
	consumer := func() {
		b.MatMul(o, att, wo, nil)
		b.AddRMSNorm(x, h, o, n1, 1e-5)
		b.MatMul(q, h, wq, nil)
		b.Discard(h)
		require.False(t, b.xt.on)
		require.True(t, b.pend.nf.on)
		b.Add(x, x, o)
	}
	addnorm1 := fmt.Sprintf("addnorm y=%x x=%x n=1 res=%x nw=%x xt=%x", o.ptr, att.ptr, x.ptr, n1.ptr, h.ptr)
	consumer()
	require.Equal(t, []string{addnorm1, qNF, addX}, f.take())
	f.nfRC = stUnsupported
	consumer()
	require.Equal(t, []string{addnorm1, rms, fmt.Sprintf("matmul y=%x x=%x n=1", q.ptr, h.ptr), addX}, f.take())
	f.nfRC = stOK

	// A norm held with its GEMV (h its output) is not dropped by discarding h: it writes the residual.
	b.MatMul(o, att, wo, nil)
	b.AddRMSNorm(x, h, o, n1, 1e-5)
	b.Discard(h)
	b.Add(x, x, o)
	require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=1", o.ptr, att.ptr),
		fmt.Sprintf("rmsnorm out=%x x=%x add=%x", h.ptr, x.ptr, o.ptr), addX}, f.take())
}

// gpt-oss's Hidden (two one-token layers) through the fake library with q,
// k and h discarded before the residual add: the last MoE is made as one
// oproj call (its out projection folded in, h left holding xt and
// forgotten) instead of the GEMV and orch_moe_decode_norm, and a graph ends
// without the rope pair. The library declining the call, or
// ORCH_CUDA_DISCARD_OPROJ=0: the two launches (the rope pair still gone).
func TestDiscardOSSStep(t *testing.T) {
	defer func(v, nf, mn, an, ar, op, d, dp bool) {
		fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, foldAttnRoPE, fuseMoEOProj, discardOn, discardOProj = v, nf,
			mn, an, ar, op, d, dp
	}(fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, foldAttnRoPE, fuseMoEOProj, discardOn, discardOProj)
	fuseOps, fuseNormFold, fuseMoENorm, fuseMoEAddNorm, foldAttnRoPE, fuseMoEOProj = true, true, true, true, true, true
	discardOn, discardOProj = true, true
	b, f := newFakeBackend(t)
	installOProjFake(b, f)
	b.l.attentionRope = func(ctx uintptr, a *attnArgs, r *attnRopeArgs) int32 { return f.add("attention_rope") }
	const d, hd, nh, nkv, bs, ne, ff, layers = 64, 16, 4, 2, 16, 4, 32, 2
	x, h, mo, o := fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1)
	q2, k2, v2, att2 := fakeT(b, ml.F32, hd*nh, 1), fakeT(b, ml.F32, hd*nkv, 1), fakeT(b, ml.F32, hd*nkv, 1),
		fakeT(b, ml.F32, hd*nh, 1)
	view := func(t *tensor, heads int) *tensor {
		c := *t
		c.shape = []int{hd, heads, 1}
		return &c
	}
	pos, freq := fakeT(b, ml.I32, 1), fakeT(b, ml.F32, hd/2)
	rope := &ml.Rope{Mode: ml.RopeNeoX, Dims: hd, InvFreq: freq}
	bt := &ml.Batch{Pos: pos, Seq: fakeT(b, ml.I32, 1), Slots: fakeT(b, ml.I32, 1), Blocks: fakeT(b, ml.I32, 4, 1),
		BlockSize: bs, MaxPos: 1}
	type lw struct {
		an, pn, q, k, v, o, ob, kc, vc *tensor
		moe                            *ml.MoE
	}
	var L [layers]lw
	for i := range L {
		L[i] = lw{an: fakeT(b, ml.F32, d), pn: fakeT(b, ml.F32, d), q: fakeT(b, ml.Q8_0, d, hd*nh),
			k: fakeT(b, ml.Q8_0, d, hd*nkv), v: fakeT(b, ml.Q8_0, d, hd*nkv), o: fakeT(b, ml.Q8_0, hd*nh, d),
			ob: fakeT(b, ml.F32, d), kc: fakeT(b, ml.F16, hd, nkv, bs, 4), vc: fakeT(b, ml.F16, hd, nkv, bs, 4),
			moe: &ml.MoE{Router: fakeT(b, ml.F32, d, ne), Gate: fakeT(b, ml.MXFP4, d, ff, ne),
				Up: fakeT(b, ml.MXFP4, d, ff, ne), Down: fakeT(b, ml.MXFP4, ff, d, ne), TopK: 2, Alpha: 1.702, Limit: 7}}
	}
	step := func(discard bool) func() {
		return func() {
			for i := range L {
				l := &L[i]
				if i == 0 {
					b.RMSNorm(h, x, l.an, eps5)
				} else {
					b.AddRMSNorm(x, h, mo, l.an, eps5)
				}
				b.MatMul(q2, h, l.q, nil)
				b.MatMul(k2, h, l.k, nil)
				b.MatMul(v2, h, l.v, nil)
				b.RoPE(view(q2, nh), pos, rope)
				b.RoPE(view(k2, nkv), pos, rope)
				b.KVWrite(l.kc, l.vc, view(k2, nkv), view(v2, nkv), bt)
				b.Attend(view(att2, nh), view(q2, nh), l.kc, l.vc, bt, &ml.Attention{Scale: 0.25})
				b.MatMul(o, att2, l.o, l.ob)
				b.AddRMSNorm(x, h, o, l.pn, eps5)
				b.MoE(mo, h, l.moe)
			}
			if discard {
				b.Discard(q2, k2, h)
			}
			b.Add(x, x, mo)
		}
	}
	multi := fmt.Sprintf("multi x=%x n=1 k=%d [%x/%d %x/%d %x/%d]", h.ptr, d, q2.ptr, hd*nh, k2.ptr, hd*nkv, v2.ptr,
		hd*nkv)
	multiNF := fmt.Sprintf("multi_nf x=%x n=1 k=%d [%x/%d %x/%d %x/%d] nss=8 eps=1e-05", h.ptr, d, q2.ptr, hd*nh,
		k2.ptr, hd*nkv, v2.ptr, hd*nkv)
	oprojAN := fmt.Sprintf("oproj ox=%x y=%x out=%x x=%x res=%x res2=%x nw2=%x xt=%x", att2.ptr, o.ptr, mo.ptr, h.ptr,
		x.ptr, x.ptr, L[1].an.ptr, h.ptr)
	oproj := fmt.Sprintf("oproj ox=%x y=%x out=%x x=%x res=%x res2=0 nw2=0 xt=0", att2.ptr, o.ptr, mo.ptr, h.ptr, x.ptr)
	plainEnd := []string{fmt.Sprintf("matmul y=%x x=%x n=1", o.ptr, att2.ptr),
		fmt.Sprintf("moe_decode_norm out=%x x=%x res=%x add=%x n=1", mo.ptr, h.ptr, x.ptr, o.ptr)}
	rms := fmt.Sprintf("rmsnorm out=%x x=%x add=0", h.ptr, x.ptr)
	rot := fmt.Sprintf("rope2 x0=%x heads=%d x1=%x heads=%d", q2.ptr, nh, k2.ptr, nkv)
	want := func(end ...string) []string {
		w := []string{rms, multi, "attention_rope", oprojAN, multiNF, "attention_rope"}
		return append(append(w, end...), fmt.Sprintf("add out=%x", x.ptr))
	}
	graph := func(key string, discard bool) []string {
		require.NoError(t, b.Run(key, step(discard)))
		return f.take()
	}
	wrap := func(w []string, rot ...string) []string {
		return append(append(append([]string{"graph_begin"}, w...), rot...), "graph_end", "graph_launch")
	}

	require.Equal(t, wrap(want(plainEnd...), rot), graph("plain", false))
	require.Equal(t, wrap(want(oproj)), graph("discard", true))
	require.False(t, b.xt.on)
	require.False(t, b.pend.unrot.on)
	step(true)() // eager: the same
	require.Equal(t, want(oproj), f.take())

	// The library declines the oproj call without the next norm: the GEMV and orch_moe_decode_norm, as without
	// Discard.
	oc := b.l.moeDecodeOProj
	b.l.moeDecodeOProj = func(ctx uintptr, a *oprojArgs) int32 {
		if a.res2 == 0 {
			return stUnsupported
		}
		return oc(ctx, a)
	}
	require.Equal(t, wrap(want(plainEnd...)), graph("declined", true))
	b.l.moeDecodeOProj = oc
	discardOProj = false
	require.Equal(t, wrap(want(plainEnd...)), graph("no-oproj", true))
	discardOProj = true
	discardOn = false
	require.Equal(t, wrap(want(plainEnd...), rot), graph("off", true))
	require.Equal(t, []string{"graph_launch"}, graph("discard", false), "a replay")
}
