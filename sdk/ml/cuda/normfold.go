package cuda

import (
	"os"

	"github.com/llama-orch/orch/sdk/ml"
)

// The RMSNorm between two decode GEMVs folded into them (issue 7, session 8;
// default since device run 2 of session 8, H100: Llama tg128 265.1 vs 240.0
// tok/s, +10.5%; ORCH_CUDA_NORM_FOLD=0 turns it off). Llama's decode
// layer is GEMV -> AddRMSNorm -> GEMV(s) twice (attention out -> FFN norm ->
// gate/up + SwiGLU; down -> the next layer's attention norm -> q/k/v); each
// norm is a one-CTA kernel whose cost is its kernel boundary (~8.8 us of the
// step's critical path each in the session-8 trace, 17.6 of ~123 us a
// layer). Folded (cuda/src/gemv16.cuh gemv5_nf):
//   - the producer GEMV (orch_matmul_addnorm) writes y as before and adds it
//     into the residual (res += y), writes xt = res * w into the norm's
//     output tensor h and one partial sum of squares per CTA and token into
//     a scratch buffer (fixed slots, no atomics);
//   - the consumer GEMVs (orch_matmul_multi_nf, orch_matmul_swiglu_nf) read
//     xt as their x and scale every output by rsqrt(sum / dim + eps).
//
// No serial tail (session 6's GEMV+norm fold: the last CTA normalised) and
// no consumer CTA re-reading the row (session 5's fold: thousands of CTAs
// each read res, add and w). Rounding differs from the norm kernel (the sum
// of squares in another order; the scale applied after the dot instead of to
// x before its fp16 staging): the outputs agree within the GEMV tolerance, res
// is bit-identical, and every run gives the same bits.
//
// The backend sees the op stream (as fuse.go): a single held GEMV whose
// output is the add of the next AddRMSNorm is held together with that norm
// (holdProdNorm); when the next op is a MatMul of the norm's output (n <= 8:
// the v5 and v7 GEMV routes), the producer launches with the fold and the MatMul is
// held as a scaled consumer (startNormFold), q/k/v merging as before; the
// SwiGLU fold takes a scaled gate/up pair (n <= 2; at 3..8 tokens gate/up are
// a scaled merged GEMV and SwiGLU its own launch). Anything else first launches the
// GEMV and the norm as without the fold (flush), and a MoE after them gets the
// norm for its own fold (unholdProdNorm).
//
// After the fold, h holds xt, not the norm's output (xtState). Any later op,
// read or write that touches h (other than the held consumers reading it, or
// an op overwriting all of it, as the next layer's norm does), the residual
// or the norm weight first launches the plain norm without the add
// (orch_rmsnorm(h, res, nil, w): exactly the norm kernel's output, res being
// what the norm would have left) — in Llama that is once per step, before the
// residual add after the last layer. Graphs start and end with h
// materialised (Run), as foldAttend's q / k.
var fuseNormFold = os.Getenv("ORCH_CUDA_NORM_FOLD") != "0"

const (
	nfMaxN        = 8    // the v5 (n = 1, 2) and v7 (n = 3..8) GEMV routes
	nfMaxPartials = 1024 // GEMV5_NF_MAX: the producer's m <= 8192
	nfRowsPerCTA  = 8    // the producer's partials per token: m / 8
)

// prodNorm is an AddRMSNorm held together with the single GEMV producing its add.
type prodNorm struct {
	on  bool
	op  string
	res ml.Tensor
	dst ml.Tensor
	x   ml.Tensor
	w   ml.Tensor
	a   normOps
	eps float32
}

// xtState: the norm output h holds xt = res * w of a fold; the scale's
// partial sums are at ss (nss per token).
type xtState struct {
	on      bool
	h       span
	hp, res uintptr
	rs, ws  span // the residual's and the norm weight's memory
	w       uintptr
	n, dim  int64
	eps     float32
	ss      uintptr
	nss     int64
}

// holdProdNorm holds the validated AddRMSNorm a with the held GEMV that
// produces its add (exactly: the GEMV's whole output) and reports whether it
// did; false: the caller flushes and launches it.
func (b *Backend) holdProdNorm(op string, res, dst, x, w ml.Tensor, a normOps, eps float32) bool {
	p := &b.pend
	if !fuseNormFold || !fuseOps || b.l.matmulAddNorm == nil || p.mm != 1 || p.nf.on || p.rope != 0 || p.norm.on ||
		p.pnorm.on || a.r == nil || a.wp == 0 || a.bp != 0 || a.n < 1 || a.n > nfMaxN || int64(a.n) != p.n {
		return false
	}
	q := p.parts[0]
	if q.y != a.x.ptr || q.m != int64(a.dim) || int64(a.x.n) != p.n*q.m || q.m%32 != 0 ||
		q.m/nfRowsPerCTA > nfMaxPartials {
		return false
	}
	// h, res and w overlap nothing the GEMV reads or writes, nor each other
	hs, rs, ws := span{a.d.ptr, uintptr(a.d.bytes)}, span{a.r.ptr, uintptr(a.r.bytes)}, span{a.wp, uintptr(4 * a.dim)}
	for _, s := range append(append([]span(nil), p.reads...), p.dsts...) {
		if hs.overlaps(s) || rs.overlaps(s) {
			return false
		}
	}
	if hs.overlaps(rs) || hs.overlaps(ws) || rs.overlaps(ws) {
		return false
	}
	p.pnorm = prodNorm{on: true, op: op, res: res, dst: dst, x: x, w: w, a: a, eps: eps}
	return true
}

// launchProdNorm launches a held norm after its GEMV went out plainly.
func (b *Backend) launchProdNorm(h prodNorm) {
	a := h.a
	b.call(h.op, b.l.rmsnorm(b.ctx, a.d.ptr, a.xp, a.addp, a.wp, int64(a.n), int64(a.dim), h.eps))
}

// unholdProdNorm (foldMoENorm, a MoE after the norm): launches the held
// GEMV and holds the norm for the MoE fold where it may take it, else
// launches it.
func (b *Backend) unholdProdNorm() {
	p := &b.pend
	if !p.pnorm.on {
		return
	}
	h := p.pnorm
	p.pnorm = prodNorm{}
	hf := b.holdFlush
	b.holdFlush = false
	b.flush() // the GEMV
	b.holdFlush = hf
	if !b.holdMoENorm(h.op, h.res, h.dst, h.x, h.w, h.a, h.eps) {
		b.launchProdNorm(h)
	}
}

// startNormFold is holdMatMul's first step while a GEMV + AddRMSNorm are
// held: a MatMul of exactly the norm's output (a consumer the library can
// scale) launches the producer with the fold and becomes the held, scaled
// consumer group; it reports whether it did. On false nothing was launched.
func (b *Backend) startNormFold(d, x, w *tensor, bias uintptr, n, k, m int) bool {
	p := &b.pend
	pn := &p.pnorm
	a := pn.a
	if !pn.on || x.ptr != a.d.ptr || x.n != a.d.n || n != a.n || k != a.dim || n > nfMaxN || !qgemmType(w.dt) ||
		b.l.matmulMultiNF == nil {
		return false
	}
	ds := span{d.ptr, uintptr(d.bytes)}
	for _, s := range []span{{a.d.ptr, uintptr(a.d.bytes)}, {a.r.ptr, uintptr(a.r.bytes)}, {a.wp, uintptr(4 * a.dim)},
		{w.ptr, uintptr(w.bytes)}} {
		if ds.overlaps(s) {
			return false
		}
	}
	if bias != 0 && ds.overlaps(span{bias, uintptr(4 * m)}) {
		return false
	}
	for _, s := range append(append([]span(nil), p.reads...), p.dsts...) {
		if ds.overlaps(s) {
			return false
		}
	}
	ss := b.scratchBuf("nf.ss", 4*nfMaxN*nfMaxPartials) // one size: never regrown between captures
	if b.err != nil {
		return false
	}
	q := p.parts[0]
	rc := b.l.matmulAddNorm(b.ctx, q.y, p.x, q.w, p.wtype, q.bias, p.n, p.k, q.m, a.r.ptr, a.wp, a.d.ptr, ss)
	if rc == stUnsupported {
		return false
	}
	b.call("matmul", rc)
	b.xt = xtState{on: rc == stOK, h: span{a.d.ptr, uintptr(a.d.bytes)}, hp: a.d.ptr, res: a.r.ptr,
		rs: span{a.r.ptr, uintptr(a.r.bytes)}, ws: span{a.wp, uintptr(4 * a.dim)}, w: a.wp, n: int64(a.n),
		dim: int64(a.dim), eps: pn.eps, ss: ss, nss: q.m / nfRowsPerCTA}
	unrot := p.unrot
	*p = pending{mm: 1, x: x.ptr, wtype: int32(w.dt), n: int64(n), k: int64(k), unrot: unrot,
		reads: append(p.reads[:0], span{x.ptr, uintptr(x.bytes)}), dsts: append(p.dsts[:0], ds)}
	p.nf = b.xt
	p.parts[0] = gemvPart{w: w.ptr, bias: bias, y: d.ptr, m: int64(m)}
	p.reads = append(p.reads, span{w.ptr, uintptr(w.bytes)})
	if bias != 0 {
		p.reads = append(p.reads, span{bias, uintptr(4 * m)})
	}
	return true
}

// nfJoins reports whether a MatMul of x would merge into the held scaled
// consumer group (holdMatMul's merge test).
func (b *Backend) nfJoins(d, x, w *tensor, bias uintptr, n, k, m int) bool {
	p := &b.pend
	if !p.nf.on || p.mm < 1 || p.mm >= maxGEMVParts || p.x != x.ptr || p.n != int64(n) || p.k != int64(k) ||
		p.wtype != int32(w.dt) || !fuseOps {
		return false
	}
	rd := []span{{w.ptr, uintptr(w.bytes)}}
	if bias != 0 {
		rd = append(rd, span{bias, uintptr(4 * m)})
	}
	return b.independent(span{d.ptr, uintptr(d.bytes)}, rd)
}

// launchNF launches the held scaled consumer group (flush); false: the
// library declined (nothing launched).
func (b *Backend) launchNF() bool {
	p := &b.pend
	rc := b.l.matmulMultiNF(b.ctx, p.x, p.wtype, p.n, p.k, int32(p.mm), &p.parts[0], p.nf.ss, p.nf.nss, p.nf.eps)
	if rc == stUnsupported {
		return false
	}
	b.call("matmul", rc)
	return true
}

// materializeNF writes the norm's output into h of fold st (which must still
// hold xt: its residual and weight unchanged since).
func (b *Backend) materializeNF(st xtState) {
	b.call("rms_norm", b.l.rmsnorm(b.ctx, st.hp, st.res, 0, st.w, st.n, st.dim, st.eps))
}

// dropNF turns the held scaled consumers into plain ones: the norm's output
// into their h first.
func (b *Backend) dropNF() {
	p := &b.pend
	b.materializeNF(p.nf)
	if b.xt.on && b.xt.hp == p.nf.hp {
		b.xt = xtState{}
	}
	p.nf = xtState{}
}

// materializeXT: h back to the norm's output (xtState) and the state off; a
// held scaled consumer group of that h becomes a plain one (it launches
// after this norm, on its output).
func (b *Backend) materializeXT() {
	if !b.xt.on {
		return
	}
	st := b.xt
	b.xt = xtState{}
	b.materializeNF(st)
	if p := &b.pend; p.nf.on && p.nf.hp == st.hp {
		p.nf = xtState{}
	}
}

// preNormXT (norm, before its operand lookups): a norm writing all of h
// without reading it forgets the state (the next layer's AddRMSNorm), so
// that looking up its residual does not materialise h for nothing.
func (b *Backend) preNormXT(res, dst, x ml.Tensor) {
	st := &b.xt
	if !st.on {
		return
	}
	d, ok := dst.(*tensor)
	if !ok || d == nil || d.be != b || d.ptr == 0 {
		return
	}
	ds := span{d.ptr, uintptr(d.bytes)}
	if !(ds.p <= st.h.p && st.h.p+st.h.n <= ds.p+ds.n) {
		return
	}
	for _, t := range []ml.Tensor{res, x} {
		if c, ok := t.(*tensor); ok && c != nil && (span{c.ptr, uintptr(c.bytes)}).overlaps(st.h) {
			return
		}
	}
	*st = xtState{}
}

// touchXT is called for every tensor an op, read or write is about to use
// (as touchUnrotated): memory overlapping h, the residual or the norm weight
// of a fold gets h materialised first — unless overwrite (a MatMul's dst:
// written whole before anything reads it), which forgets the state, or it is
// a MatMul's x (MatMul decides: nfJoins).
func (b *Backend) touchXT(t *tensor, overwrite, matmulX bool) {
	st := &b.xt
	if !st.on || t == nil {
		return
	}
	ts := span{t.ptr, uintptr(t.bytes)}
	if overwrite && ts.p <= st.h.p && st.h.p+st.h.n <= ts.p+ts.n {
		*st = xtState{}
		return
	}
	if matmulX && ts.overlaps(st.h) {
		return
	}
	if ts.overlaps(st.h) || ts.overlaps(st.rs) || ts.overlaps(st.ws) {
		b.materializeXT()
	}
}

// forgetXT drops the state for memory being freed (h: forgotten; the
// residual or the weight: h materialised first).
func (b *Backend) forgetXT(t *tensor) {
	st := &b.xt
	if !st.on || t == nil {
		return
	}
	ts := span{t.ptr, uintptr(t.bytes)}
	switch {
	case ts.overlaps(st.h):
		*st = xtState{}
	case ts.overlaps(st.rs) || ts.overlaps(st.ws):
		b.materializeXT()
	}
}
