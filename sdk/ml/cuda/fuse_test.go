package cuda

import (
	"fmt"
	"strings"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// Host tests of the launch merging (fuse.go) against a fake library that
// records what the backend launches, in order: which ops merge, that nothing
// is reordered past a held op, and every flush point.

type fakeLib struct {
	log []string
	// multiRC is what orch_matmul_multi answers (stUnsupported: the library
	// declines, e.g. not the v5 GEMV).
	multiRC int32
	// gluRC: what orch_matmul_swiglu answers; nfRC: what the norm fold's
	// consumers answer (orch_matmul_multi_nf / _swiglu_nf), prodRC its producer.
	gluRC, nfRC, prodRC int32
}

func (f *fakeLib) add(format string, a ...any) int32 {
	f.log = append(f.log, fmt.Sprintf(format, a...))
	return stOK
}

func newFakeBackend(*testing.T) (*Backend, *fakeLib) {
	f := &fakeLib{}
	l := &lib{
		lastError: func(buf *byte, n int64) int32 { *buf = 0; return stOK },
		matmul: func(ctx, y, x, w uintptr, wtype int32, bias uintptr, n, k, m int64, acc int32) int32 {
			return f.add("matmul y=%x x=%x n=%d", y, x, n)
		},
		matmulMulti: func(ctx, x uintptr, wtype int32, n, k int64, count int32, parts *gemvPart) int32 {
			ps := unsafe.Slice(parts, count)
			var ys []string
			for _, p := range ps {
				ys = append(ys, fmt.Sprintf("%x/%d", p.y, p.m))
			}
			if f.multiRC != stOK {
				return f.multiRC
			}
			return f.add("multi x=%x n=%d k=%d [%s]", x, n, k, strings.Join(ys, " "))
		},
		matmulSwiGLU: func(ctx, x uintptr, wtype int32, n, k int64, gateUp *gemvPart, out uintptr) int32 {
			if f.gluRC != stOK {
				return f.gluRC
			}
			ps := unsafe.Slice(gateUp, 2)
			return f.add("matmul_swiglu x=%x n=%d k=%d gate=%x/%d up=%x/%d out=%x", x, n, k, ps[0].y, ps[0].m, ps[1].y,
				ps[1].m, out)
		},
		matmulAddNorm: func(ctx, y, x, w uintptr, wtype int32, bias uintptr, n, k, m int64, res, nw, xt,
			ss uintptr) int32 {
			if f.prodRC != stOK {
				return f.prodRC
			}
			return f.add("addnorm y=%x x=%x n=%d res=%x nw=%x xt=%x", y, x, n, res, nw, xt)
		},
		matmulMultiNF: func(ctx, x uintptr, wtype int32, n, k int64, count int32, parts *gemvPart, ss uintptr, nss int64,
			eps float32) int32 {
			if f.nfRC != stOK {
				return f.nfRC
			}
			var ys []string
			for _, p := range unsafe.Slice(parts, count) {
				ys = append(ys, fmt.Sprintf("%x/%d", p.y, p.m))
			}
			return f.add("multi_nf x=%x n=%d k=%d [%s] nss=%d eps=%g", x, n, k, strings.Join(ys, " "), nss, eps)
		},
		matmulSwiGLUNF: func(ctx, x uintptr, wtype int32, n, k int64, gateUp *gemvPart, out, ss uintptr, nss int64,
			eps float32) int32 {
			if f.nfRC != stOK {
				return f.nfRC
			}
			ps := unsafe.Slice(gateUp, 2)
			return f.add("swiglu_nf x=%x n=%d gate=%x up=%x out=%x nss=%d", x, n, ps[0].y, ps[1].y, out, nss)
		},
		malloc: func(ctx uintptr, bytes int64, out *uintptr) int32 {
			*out = fakeNext
			fakeNext += uintptr(bytes+255) &^ 255
			return stOK
		},
		swiglu: func(ctx, out, gate, up uintptr, n, dim, gs, us int64) int32 {
			return f.add("swiglu out=%x gate=%x up=%x", out, gate, up)
		},
		rope: func(ctx, x uintptr, rowStride, nTok int64, nHeads, headDim, rotDim int32, pos, invFreq uintptr,
			attnFactor float32, neox int32) int32 {
			return f.add("rope x=%x heads=%d", x, nHeads)
		},
		rope2: func(ctx, x0 uintptr, stride0 int64, heads0 int32, x1 uintptr, stride1 int64, heads1 int32, nTok int64,
			headDim, rotDim int32, pos, invFreq uintptr, attnFactor float32, neox int32) int32 {
			return f.add("rope2 x0=%x heads=%d x1=%x heads=%d", x0, heads0, x1, heads1)
		},
		ropeKV: func(ctx, q uintptr, qStride int64, qHeads int32, k uintptr, kStride int64, kvHeads int32, v uintptr,
			vStride int64, kCache, vCache uintptr, kvType int32, slots uintptr, nTok int64, headDim, rotDim int32, pos,
			invFreq uintptr, attnFactor float32, neox int32) int32 {
			return f.add("rope_kv q=%x k=%x v=%x kc=%x", q, k, v, kCache)
		},
		kvWrite: func(ctx, kc, vc uintptr, kvType int32, k, v uintptr, ks, vs int64, slots uintptr, nTok int64, nKV,
			hd int32) int32 {
			return f.add("kv_write k=%x kc=%x", k, kc)
		},
		rmsnorm: func(ctx, out, x, add, w uintptr, n, dim int64, eps float32) int32 {
			return f.add("rmsnorm out=%x x=%x add=%x", out, x, add)
		},
		add:          func(ctx, out, a, b uintptr, n int64) int32 { return f.add("add out=%x", out) },
		sync:         func(ctx uintptr) int32 { return f.add("sync") },
		free:         func(ctx, p uintptr) int32 { return f.add("free %x", p) },
		memcpyH2D:    func(ctx, dst uintptr, src *byte, bytes int64) int32 { return f.add("h2d %x", dst) },
		graphBegin:   func(ctx uintptr) int32 { return f.add("graph_begin") },
		graphEnd:     func(ctx uintptr, exec *uintptr) int32 { *exec = 1; f.add("graph_end"); return stOK },
		graphLaunch:  func(ctx, exec uintptr) int32 { return f.add("graph_launch") },
		graphDestroy: func(exec uintptr) int32 { return stOK },
	}
	return &Backend{l: l, ctx: 1, scratch: map[string]*tensor{}, graphs: map[string]uintptr{}}, f
}

var fakeNext uintptr = 0x1000

func fakeT(b *Backend, dt ml.DType, shape ...int) *tensor {
	n, nb, err := tensorBytes(dt, shape)
	if err != nil {
		panic(err)
	}
	p := fakeNext
	fakeNext += uintptr(nb+255) &^ 255
	return &tensor{dt: dt, shape: shape, n: n, ptr: p, bytes: nb, owned: true, be: b}
}

func (f *fakeLib) take() []string {
	l := f.log
	f.log = nil
	return l
}

// One gpt-oss-like attention block: q/k/v GEMVs merge into one launch, the two
// RoPEs into one, and the next op launches only after them.
func TestFuseAttentionBlock(t *testing.T) {
	defer func(v bool) { fuseOps = v }(fuseOps)
	fuseOps = true
	b, f := newFakeBackend(t)
	const d, hd, nh, nkv, n = 64, 16, 4, 2, 1
	x, h := fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n)
	norm := fakeT(b, ml.F32, d)
	wq, wk, wv := fakeT(b, ml.Q8_0, d, hd*nh), fakeT(b, ml.Q8_0, d, hd*nkv), fakeT(b, ml.Q8_0, d, hd*nkv)
	bq := fakeT(b, ml.F32, hd*nh)
	q, k, v := fakeT(b, ml.F32, hd*nh, n), fakeT(b, ml.F32, hd*nkv, n), fakeT(b, ml.F32, hd*nkv, n)
	qh, kh := &tensor{}, &tensor{}
	*qh, *kh = *q, *k
	qh.shape, kh.shape = []int{hd, nh, n}, []int{hd, nkv, n}
	pos, freq := fakeT(b, ml.I32, n), fakeT(b, ml.F32, hd/2)
	rope := &ml.Rope{Mode: ml.RopeNeoX, Dims: hd, InvFreq: freq}

	const bs = 16
	kc, vc := fakeT(b, ml.F16, hd, nkv, bs, 4), fakeT(b, ml.F16, hd, nkv, bs, 4)
	vh := &tensor{}
	*vh = *v
	vh.shape = []int{hd, nkv, n}
	bt := &ml.Batch{Pos: pos, Seq: fakeT(b, ml.I32, n), Slots: fakeT(b, ml.I32, n), Blocks: fakeT(b, ml.I32, 4, 1),
		BlockSize: bs}

	b.RMSNorm(h, x, norm, 1e-5)
	b.MatMul(q, h, wq, bq)
	b.MatMul(k, h, wk, nil)
	b.MatMul(v, h, wv, nil)
	b.RoPE(qh, pos, rope)
	b.RoPE(kh, pos, rope)
	require.Equal(t, []string{
		fmt.Sprintf("rmsnorm out=%x x=%x add=0", h.ptr, x.ptr),
		fmt.Sprintf("multi x=%x n=1 k=%d [%x/%d %x/%d %x/%d]", h.ptr, d, q.ptr, hd*nh, k.ptr, hd*nkv, v.ptr, hd*nkv),
	}, f.take(), "the third GEMV launches the merged kernel; the RoPE pair waits for the KV write")
	b.KVWrite(kc, vc, kh, vh, bt)
	require.Equal(t, []string{fmt.Sprintf("rope_kv q=%x k=%x v=%x kc=%x", q.ptr, k.ptr, v.ptr, kc.ptr)}, f.take())

	// The pair followed by anything else, or by the KV write of another k:
	// the RoPE pair launches alone, first.
	b.RoPE(qh, pos, rope)
	b.RoPE(kh, pos, rope)
	b.KVWrite(kc, vc, vh, vh, bt)
	require.Equal(t, []string{
		fmt.Sprintf("rope2 x0=%x heads=%d x1=%x heads=%d", q.ptr, nh, k.ptr, nkv),
		fmt.Sprintf("kv_write k=%x kc=%x", v.ptr, kc.ptr),
	}, f.take())
	b.RoPE(qh, pos, rope)
	b.RoPE(kh, pos, rope)
	b.Add(x, x, h)
	require.Equal(t, []string{
		fmt.Sprintf("rope2 x0=%x heads=%d x1=%x heads=%d", q.ptr, nh, k.ptr, nkv), fmt.Sprintf("add out=%x", x.ptr),
	}, f.take())
	b.MatMul(q, h, wq, bq)
	b.RoPE(qh, pos, rope) // held MatMul, then a RoPE: both launch, in order, by the Add
	b.Add(x, x, h)
	require.Equal(t, []string{
		fmt.Sprintf("matmul y=%x x=%x n=1", q.ptr, h.ptr),
		fmt.Sprintf("rope x=%x heads=%d", q.ptr, nh),
		fmt.Sprintf("add out=%x", x.ptr),
	}, f.take())
	require.NoError(t, b.Sync())
	require.Equal(t, []string{"sync"}, f.take())

	// Merging off: one launch per op, same order.
	fuseOps = false
	b.MatMul(q, h, wq, bq)
	b.MatMul(k, h, wk, nil)
	b.RoPE(qh, pos, rope)
	b.RoPE(kh, pos, rope)
	require.Equal(t, []string{
		fmt.Sprintf("matmul y=%x x=%x n=1", q.ptr, h.ptr), fmt.Sprintf("matmul y=%x x=%x n=1", k.ptr, h.ptr),
		fmt.Sprintf("rope x=%x heads=%d", q.ptr, nh), fmt.Sprintf("rope x=%x heads=%d", k.ptr, nkv),
	}, f.take())
}

// What must not merge: a GEMV reading the previous one's output, different
// x / n / weight type, n > 8, overlapping outputs; a held op is launched
// before anything else reaches the stream (read, write, free, sync, graphs).
func TestFuseBoundaries(t *testing.T) {
	defer func(v bool) { fuseOps = v }(fuseOps)
	fuseOps = true
	b, f := newFakeBackend(t)
	const d = 64
	x := fakeT(b, ml.F32, d, 1)
	w1, w2 := fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, d)
	wm := fakeT(b, ml.MXFP4, d, d)
	y1, y2, y3 := fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, d, 1)

	b.MatMul(y1, x, w1, nil)
	b.MatMul(y2, y1, w2, nil) // reads y1: a chain, not a merge
	require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=1", y1.ptr, x.ptr)}, f.take())
	b.MatMul(y3, x, wm, nil) // other x and weight type
	require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=1", y2.ptr, y1.ptr)}, f.take())
	b.MatMul(y3, x, w1, nil) // same x, other type than the held MXFP4 one; same dst too
	require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=1", y3.ptr, x.ptr)}, f.take())
	b.MatMul(y3, x, w2, nil) // writes the held part's output: no merge
	require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=1", y3.ptr, x.ptr)}, f.take())
	b.MatMul(x, y3, w1, nil) // writes the held part's x: launched after it (the held one goes first)
	require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=1", y3.ptr, x.ptr)}, f.take())

	// Every flush point launches what is held first.
	require.NoError(t, b.Sync())
	for name, fn := range map[string]func(){
		"read":  func() { require.NoError(t, b.ReadF32(y1, make([]float32, 1))) },
		"write": func() { require.NoError(t, b.WriteF32(y1, []float32{1})) },
		"free":  func() { b.Free(fakeT(b, ml.F32, 4)) },
		"sync":  func() { require.NoError(t, b.Sync()) },
	} {
		f.take()
		b.MatMul(y1, x, w1, nil)
		require.Empty(t, f.log, name)
		func() {
			defer func() { _ = recover() }() // the fake has no d2h copy; only the order matters
			fn()
		}()
		require.NotEmpty(t, f.log, name)
		require.Equal(t, fmt.Sprintf("matmul y=%x x=%x n=1", y1.ptr, x.ptr), f.log[0], name)
	}

	// Graph capture: a held op is launched before the capture begins, and
	// what the recording holds at its end goes into the graph.
	f.take()
	b.MatMul(y1, x, w1, nil)
	require.NoError(t, b.Run("g", func() {
		b.MatMul(y2, x, w2, nil)
		b.MatMul(y3, x, w1, nil)
	}))
	require.Equal(t, []string{
		fmt.Sprintf("matmul y=%x x=%x n=1", y1.ptr, x.ptr), "graph_begin",
		fmt.Sprintf("multi x=%x n=1 k=%d [%x/%d %x/%d]", x.ptr, d, y2.ptr, d, y3.ptr, d), "graph_end", "graph_launch",
	}, f.take())

	// The library declines (not the v5 GEMV): the parts run one by one, in order.
	f.multiRC = stUnsupported
	b.MatMul(y1, x, w1, nil)
	b.MatMul(y2, x, w2, nil)
	require.NoError(t, b.Sync())
	require.Equal(t, []string{
		fmt.Sprintf("matmul y=%x x=%x n=1", y1.ptr, x.ptr), fmt.Sprintf("matmul y=%x x=%x n=1", y2.ptr, x.ptr), "sync",
	}, f.take())

	// n > 8 is never held (the GEMM path).
	f.multiRC = stOK
	defer func(v bool) { gemmV1 = v }(gemmV1)
	gemmV1 = true
	x9, y9 := fakeT(b, ml.F32, d, 9), fakeT(b, ml.F32, d, 9)
	b.MatMul(y9, x9, w1, nil)
	require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=9", y9.ptr, x9.ptr)}, f.take())
}

// gemvPart is passed to orch_matmul_multi as orch_gemv_part[]: 3 pointers + int64.
func TestGemvPartLayout(t *testing.T) {
	require.Equal(t, uintptr(32), unsafe.Sizeof(gemvPart{}))
}

// Llama's feed-forward: gate and up GEMVs held, then SwiGLU(gate, gate, up)
// becomes one orch_matmul_swiglu launch; everything that is not exactly that
// (other tensors, a third part, n > 2, dst overlapping x, the library
// declining, the switches off) runs the merged GEMV and then orch_swiglu.
func TestFuseSwiGLU(t *testing.T) {
	defer func(v, g bool) { fuseOps, fuseGLU = v, g }(fuseOps, fuseGLU)
	fuseOps, fuseGLU = true, true
	b, f := newFakeBackend(t)
	const d, ff = 64, 96
	h := fakeT(b, ml.F32, d, 1)
	wg, wu := fakeT(b, ml.Q8_0, d, ff), fakeT(b, ml.Q8_0, d, ff)
	g, u, o := fakeT(b, ml.F32, ff, 1), fakeT(b, ml.F32, ff, 1), fakeT(b, ml.F32, ff, 1)
	fused := func(out uintptr) string {
		return fmt.Sprintf("matmul_swiglu x=%x n=1 k=%d gate=%x/%d up=%x/%d out=%x", h.ptr, d, g.ptr, ff, u.ptr, ff, out)
	}
	unfused := func(out, gate, up uintptr) []string {
		return []string{fmt.Sprintf("multi x=%x n=1 k=%d [%x/%d %x/%d]", h.ptr, d, g.ptr, ff, u.ptr, ff),
			fmt.Sprintf("swiglu out=%x gate=%x up=%x", out, gate, up)}
	}

	b.MatMul(g, h, wg, nil)
	b.MatMul(u, h, wu, nil)
	b.SwiGLU(g, g, u) // in place, as plugins/llama
	require.Equal(t, []string{fused(g.ptr)}, f.take())
	require.NoError(t, b.Sync())
	require.Equal(t, []string{"sync"}, f.take(), "nothing left held")

	b.MatMul(u, h, wu, nil) // up first: gate is still found by pointer
	b.MatMul(g, h, wg, nil)
	b.SwiGLU(o, g, u) // separate dst
	require.Equal(t, []string{fused(o.ptr)}, f.take())

	b.MatMul(g, h, wg, nil)
	b.MatMul(u, h, wu, nil)
	b.SwiGLU(g, u, g) // gate and up swapped: still exactly two held outputs, gate = u
	require.Equal(t, []string{fmt.Sprintf("matmul_swiglu x=%x n=1 k=%d gate=%x/%d up=%x/%d out=%x", h.ptr, d, u.ptr,
		ff, g.ptr, ff, g.ptr)}, f.take())

	// dst overlapping a held read (x): no fold.
	hh := &tensor{}
	*hh = *h
	hh.shape, hh.n, hh.bytes = []int{ff, 1}, ff, 4*ff
	b.MatMul(g, h, wg, nil)
	b.MatMul(u, h, wu, nil)
	b.SwiGLU(hh, g, u)
	require.Equal(t, unfused(h.ptr, g.ptr, u.ptr), f.take())

	// A SwiGLU of other tensors than the held outputs.
	b.MatMul(g, h, wg, nil)
	b.MatMul(o, h, wu, nil)
	b.SwiGLU(g, g, u)
	require.Equal(t, []string{fmt.Sprintf("multi x=%x n=1 k=%d [%x/%d %x/%d]", h.ptr, d, g.ptr, ff, o.ptr, ff),
		fmt.Sprintf("swiglu out=%x gate=%x up=%x", g.ptr, g.ptr, u.ptr)}, f.take())

	// The library declines: merged GEMV, then the SwiGLU.
	f.gluRC = stUnsupported
	b.MatMul(g, h, wg, nil)
	b.MatMul(u, h, wu, nil)
	b.SwiGLU(g, g, u)
	require.Equal(t, unfused(g.ptr, g.ptr, u.ptr), f.take())
	f.gluRC = stOK

	// Three tokens (v7's route): not folded.
	h3, g3, u3 := fakeT(b, ml.F32, d, 3), fakeT(b, ml.F32, ff, 3), fakeT(b, ml.F32, ff, 3)
	b.MatMul(g3, h3, wg, nil)
	b.MatMul(u3, h3, wu, nil)
	b.SwiGLU(g3, g3, u3)
	require.Equal(t, []string{fmt.Sprintf("multi x=%x n=3 k=%d [%x/%d %x/%d]", h3.ptr, d, g3.ptr, ff, u3.ptr, ff),
		fmt.Sprintf("swiglu out=%x gate=%x up=%x", g3.ptr, g3.ptr, u3.ptr)}, f.take())

	// Switched off.
	fuseGLU = false
	b.MatMul(g, h, wg, nil)
	b.MatMul(u, h, wu, nil)
	b.SwiGLU(g, g, u)
	require.Equal(t, unfused(g.ptr, g.ptr, u.ptr), f.take())
}

// The RoPE pair + KV write folded into Attend (foldAttnRoPE): one
// orch_attention_rope launch for a decode batch; q and k left unrotated are
// rotated in place (rope2) before any later op reads them, and forgotten
// when the next GEMVs overwrite them whole; the library declining, or more
// than 8 tokens, runs the two launches.
func TestFuseAttentionRoPE(t *testing.T) {
	defer func(v, w bool) { fuseOps, foldAttnRoPE = v, w }(fuseOps, foldAttnRoPE)
	fuseOps, foldAttnRoPE = true, true
	b, f := newFakeBackend(t)
	ropeRC := int32(stOK)
	b.l.attentionRope = func(ctx uintptr, a *attnArgs, r *attnRopeArgs) int32 {
		if ropeRC != stOK {
			return ropeRC
		}
		return f.add("attention_rope out=%x q=%x k=%x v=%x kc=%x slots=%x n=%d rot=%d", a.out, a.q, r.k, r.v, a.kCache,
			r.slots, a.nTok, r.rotDim)
	}
	b.l.attention = func(ctx uintptr, a *attnArgs) int32 { return f.add("attention out=%x q=%x", a.out, a.q) }
	const d, hd, nh, nkv, bs = 64, 16, 4, 2, 16
	run := func(n int, rc int32) (q, k, v, att, x *tensor) {
		ropeRC = rc
		s := newRopeFoldStep(b, n)
		q, k, v, att, x = s.q, s.k, s.v, s.att, s.x
		h, wq, wk, wv, kc, bt := s.h, s.wq, s.wk, s.wv, s.kc, s.bt
		s.step()
		// The next layer's GEMVs overwrite q and k whole: nothing to rotate.
		b.MatMul(q, h, wq, nil)
		b.MatMul(k, h, wk, nil)
		b.MatMul(v, h, wv, nil)
		b.Add(x, x, h)
		log := f.take()
		require.Equal(t, fmt.Sprintf("multi x=%x n=%d k=%d [%x/%d %x/%d %x/%d]", h.ptr, n, d, q.ptr, hd*nh, k.ptr,
			hd*nkv, v.ptr, hd*nkv), log[0])
		require.Equal(t, fmt.Sprintf("multi x=%x n=%d k=%d [%x/%d %x/%d %x/%d]", h.ptr, n, d, q.ptr, hd*nh, k.ptr,
			hd*nkv, v.ptr, hd*nkv), log[len(log)-2])
		require.Equal(t, fmt.Sprintf("add out=%x", x.ptr), log[len(log)-1])
		mid := log[1 : len(log)-2]
		if n <= attnRopeMaxTok && rc == stOK {
			require.Equal(t, []string{fmt.Sprintf("attention_rope out=%x q=%x k=%x v=%x kc=%x slots=%x n=%d rot=%d",
				att.ptr, q.ptr, k.ptr, v.ptr, kc.ptr, bt.Slots.(*tensor).ptr, n, hd)}, mid)
		} else {
			require.Equal(t, []string{fmt.Sprintf("rope_kv q=%x k=%x v=%x kc=%x", q.ptr, k.ptr, v.ptr, kc.ptr),
				fmt.Sprintf("attention out=%x q=%x", att.ptr, q.ptr)}, mid)
		}
		return q, k, v, att, x
	}
	run(1, stOK)
	run(8, stOK)
	run(9, stOK)          // more tokens than the kernel folds: not even offered
	run(2, stUnsupported) // the library declines: the two launches
	// A folded Attend, then an op reading q: q and k are rotated first (rope2), then the op.
	q, k, _, att, x := run(1, stOK)
	ropeRC = stOK
	h := fakeT(b, ml.F32, d, 1)
	wq, wk, wv := fakeT(b, ml.Q8_0, d, hd*nh), fakeT(b, ml.Q8_0, d, hd*nkv), fakeT(b, ml.Q8_0, d, hd*nkv)
	_ = att
	b.pend.unrot = unrotated{} // (run's last GEMVs overwrote them; fold again without them)
	f.take()
	foldOnce := func() {
		v := fakeT(b, ml.F32, hd*nkv, 1)
		qv, kv, vv := *q, *k, *v
		qv.shape, kv.shape, vv.shape = []int{hd, nh, 1}, []int{hd, nkv, 1}, []int{hd, nkv, 1}
		pos, freq := fakeT(b, ml.I32, 1), fakeT(b, ml.F32, hd/2)
		rope := &ml.Rope{Mode: ml.RopeNeoX, Dims: hd, InvFreq: freq}
		kc, vc := fakeT(b, ml.F16, hd, nkv, bs, 4), fakeT(b, ml.F16, hd, nkv, bs, 4)
		bt := &ml.Batch{Pos: pos, Seq: fakeT(b, ml.I32, 1), Slots: fakeT(b, ml.I32, 1), Blocks: fakeT(b, ml.I32, 4, 1),
			BlockSize: bs}
		b.RoPE(&qv, pos, rope)
		b.RoPE(&kv, pos, rope)
		b.KVWrite(kc, vc, &kv, &vv, bt)
		b.Attend(fakeT(b, ml.F32, hd, nh, 1), &qv, kc, vc, bt, &ml.Attention{Scale: 0.25})
		require.Len(t, f.take(), 1)
		require.True(t, b.pend.unrot.on)
	}
	foldOnce()
	b.Add(q, q, q) // reads q
	require.Equal(t, []string{fmt.Sprintf("rope2 x0=%x heads=%d x1=%x heads=%d", q.ptr, nh, k.ptr, nkv),
		fmt.Sprintf("add out=%x", q.ptr)}, f.take())
	require.False(t, b.pend.unrot.on)
	// Only q overwritten whole: k alone is rotated when an op touches it.
	foldOnce()
	b.MatMul(q, h, wq, nil)
	b.Add(x, x, h)
	require.Equal(t, []string{fmt.Sprintf("matmul y=%x x=%x n=1", q.ptr, h.ptr), fmt.Sprintf("add out=%x", x.ptr)},
		f.take())
	b.Add(k, k, k)
	require.Equal(t, []string{fmt.Sprintf("rope x=%x heads=%d", k.ptr, nkv), fmt.Sprintf("add out=%x", k.ptr)}, f.take())
	// A write into q (partial or not) first rotates q and k; a freed k is forgotten.
	foldOnce()
	kp := k.ptr
	b.Free(k)
	require.NoError(t, b.WriteF32(q, []float32{1}))
	require.Equal(t, []string{fmt.Sprintf("free %x", kp), fmt.Sprintf("rope x=%x heads=%d", q.ptr, nh),
		fmt.Sprintf("h2d %x", q.ptr)}, f.take())
	// A graph capture ends with q and k rotated (inside the graph), so a replay leaves them as the RoPE ops would.
	unrotQ := func() {
		b.pend.unrot = unrotated{on: true, x: [2]uintptr{q.ptr}, stride: [2]int64{hd * nh}, heads: [2]int32{nh},
			spans: [2]span{{q.ptr, uintptr(q.bytes)}}, n: 1, hd: hd, rot: hd}
	}
	unrotQ()
	require.NoError(t, b.Run("rope-fold", func() { b.Add(x, x, h); unrotQ() }))
	require.Equal(t, []string{fmt.Sprintf("rope x=%x heads=%d", q.ptr, nh), "graph_begin",
		fmt.Sprintf("add out=%x", x.ptr), fmt.Sprintf("rope x=%x heads=%d", q.ptr, nh), "graph_end", "graph_launch"},
		f.take())
	require.False(t, b.pend.unrot.on)
	_, _ = wk, wv
}

// ropeFoldStep issues a decode layer's q/k/v GEMVs, RoPE pair, KV write and
// Attend (n tokens; d 64, head dim 16, 4 heads, 2 kv heads) that fold into one
// orch_attention_rope launch (TestFuseAttentionRoPE, TestDiscardRoPEFold).
type ropeFoldStep struct {
	q, k, v, att, x, h, wq, wk, wv, kc *tensor
	bt                                 *ml.Batch
	nh, nkv                            int
	step                               func()
}

func newRopeFoldStep(b *Backend, n int) *ropeFoldStep {
	const d, hd, nh, nkv, bs = 64, 16, 4, 2, 16
	s := &ropeFoldStep{nh: nh, nkv: nkv}
	s.x, s.h = fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n)
	s.wq, s.wk, s.wv = fakeT(b, ml.Q8_0, d, hd*nh), fakeT(b, ml.Q8_0, d, hd*nkv), fakeT(b, ml.Q8_0, d, hd*nkv)
	s.q, s.k, s.v = fakeT(b, ml.F32, hd*nh, n), fakeT(b, ml.F32, hd*nkv, n), fakeT(b, ml.F32, hd*nkv, n)
	view := func(t *tensor, heads int) *tensor {
		c := *t
		c.shape = []int{hd, heads, n}
		return &c
	}
	pos, freq := fakeT(b, ml.I32, n), fakeT(b, ml.F32, hd/2)
	rope := &ml.Rope{Mode: ml.RopeNeoX, Dims: hd, InvFreq: freq}
	kc, vc := fakeT(b, ml.F16, hd, nkv, bs, 4), fakeT(b, ml.F16, hd, nkv, bs, 4)
	s.kc = kc
	bt := &ml.Batch{Pos: pos, Seq: fakeT(b, ml.I32, n), Slots: fakeT(b, ml.I32, n), Blocks: fakeT(b, ml.I32, 4, 1),
		BlockSize: bs}
	s.bt, s.att = bt, fakeT(b, ml.F32, hd, nh, n)
	s.step = func() {
		b.MatMul(s.q, s.h, s.wq, nil)
		b.MatMul(s.k, s.h, s.wk, nil)
		b.MatMul(s.v, s.h, s.wv, nil)
		b.RoPE(view(s.q, nh), pos, rope)
		b.RoPE(view(s.k, nkv), pos, rope)
		b.KVWrite(kc, vc, view(s.k, nkv), view(s.v, nkv), bt)
		b.Attend(s.att, view(s.q, nh), kc, vc, bt, &ml.Attention{Scale: 0.25})
	}
	return s
}
