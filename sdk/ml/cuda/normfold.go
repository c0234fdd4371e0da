package cuda

import (
	"os"
	"strconv"

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

// The same fold with gpt-oss's MoE as the producer (session 9; the library
// entry orch_moe_decode_addnorm landed in session 8): the layer ends MoE ->
// AddRMSNorm(res, h, moe_out, attn_norm) -> q/k/v MatMuls of h. foldMoENorm
// (fuse.go), instead of making its orch_moe_decode_norm call, holds it
// (holdMoEProd: one token by default, up to 8, where MoE v13 is not routed); the next
// AddRMSNorm of exactly its output is held with it (holdProdNorm), and a
// MatMul of the norm's output makes the call as orch_moe_decode_addnorm (v10's
// down kernel adds out into res, writes xt and the partial sums: the
// orch_matmul_addnorm contract) and becomes the scaled consumer group as after
// a GEMV producer. Anything else (another op, a graph boundary, the library
// declining the fold) first makes the held call as it would have been made
// (launchHeldMoE; where the library declines that too, the MoE op's plain
// path with the held pre-norm, as foldMoENorm's false), then the norm. The
// MoE output, the residual and xt are the plain ops' bits (TestMoEAddNorm);
// h2 and the consumers' outputs round as the GEMV fold's.
// ORCH_CUDA_MOE_ADDNORM=0 turns off only this fold (ORCH_CUDA_NORM_FOLD=0 and
// ORCH_CUDA_MOE_NORM=0 too). Device run 2 of session 9 (H100): gpt-oss tg128
// 549.6 vs 533.0 tok/s (+3.1%), x8 1,332.5 vs 1,330.5 (noise);
// TestPerfMoEAddNorm (norm + MoE -> norm -> q/k/v, graph of 16): n = 1 53.1 ->
// 49.9 us, but n = 2 75.8 -> 76.7 and n = 8 199.2 -> 200.4 (down10's epilogue
// loads res2 and w after the dots: its per-CTA tail repeats every wave — 1 wave
// at one token, 2 at two, 7 at eight — against one norm boundary saved). So by
// default only one token folds; ORCH_CUDA_MOE_ADDNORM=N (2..8) folds up to N.
var fuseMoEAddNorm = os.Getenv("ORCH_CUDA_MOE_ADDNORM") != "0"

// The attention out projection as the pre-norm's producer of the MoE fold
// (session 10, issue 7; gpt-oss's one-token layer: out-projection GEMV ->
// AddRMSNorm -> MoE). foldMoENorm takes the held GEMV out of pend instead
// of launching it (unholdProdNorm: one token, a quantized weight, the held
// norm's add exactly its output) and keeps its operands in the MoE's call
// (moeCall.pj); the call is then made as orch_moe_decode_oproj (through its
// struct wrapper orch_moe_decode_oproj_args): the GEMV is orch_matmul_addnorm's
// producer (y, res += y, x = xt = res * w) and its last CTA routes and stages
// x for v10's gate_up, so the route kernel and its re-read of the row go. With
// the next norm folded (startNormFold: res2 .. ss set) the norm's output must
// cover the MoE's x (gpt-oss: both are h), which then holds the next fold's
// xt; without it (the MoE not held: foldMoENorm's own call) x holds this
// fold's xt (xtState: a later reader materialises the norm; the next layer's
// norm overwrites it). A held MoE launched by anything else (launchHeldMoE:
// in gpt-oss the last layer, whose residual add would force that
// materialisation, a norm launch for the route kernel saved) runs the GEMV and
// orch_moe_decode_norm as before. Where the library declines, the GEMV goes
// out plainly and the call is made as without the fold.
// ORCH_CUDA_MOE_OPROJ=0 turns off only this.
var fuseMoEOProj = os.Getenv("ORCH_CUDA_MOE_OPROJ") != "0"

// oproj: a one-token GEMV y = x . W^T + bias (m = dim rows) taken out of pend
// for orch_moe_decode_oproj; on: not launched yet.
type oproj struct {
	on            bool
	x, w, bias, y uintptr
	wtype         int32
	k, m          int64
}

// moeAddNormMaxN: the most tokens the MoE fold takes (ORCH_CUDA_MOE_ADDNORM=N, 1..8; default 1).
var moeAddNormMaxN = func() int64 {
	if v, err := strconv.Atoi(os.Getenv("ORCH_CUDA_MOE_ADDNORM")); err == nil && v >= 1 {
		return int64(min(v, nfMaxN))
	}
	return 1
}()

// moe13From mirrors the library's MoE v13 route (moe_dec13.cuh moe13_on,
// unpinned: from ORCH_CUDA_MOE13_FROM tokens, default 9; < 2 or not a
// number: never): where orch_moe_decode_norm would run v13, the MoE is not
// held (orch_moe_decode_addnorm is v10's).
var moe13From = func() int {
	v := os.Getenv("ORCH_CUDA_MOE13_FROM")
	if v == "" {
		return 9
	}
	if f, err := strconv.Atoi(v); err == nil && f >= 2 {
		return f
	}
	return 1 << 30
}()

// moeAuto: ORCH_CUDA_MOE unset (the library's ctx->moe_auto).
var moeAuto = os.Getenv("ORCH_CUDA_MOE") == ""

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

// heldMoE is a MoE held as a norm fold's producer: its orch_moe_decode_norm
// call c, the pre-norm it took in and the op's operands (launchHeldMoE's
// fallback), and the memory its down kernel reads or writes (out, weights,
// biases), which the next norm's h, residual and weight must not overlap.
type heldMoE struct {
	on      bool
	c       moeCall
	pre     heldNorm
	dst, x  ml.Tensor
	m       *ml.MoE
	out     span
	touched [9]span // out, router, gate, up, down, the four biases
}

// prodHeld: a producer the next AddRMSNorm may be held with (norm): one held
// GEMV, or a held MoE.
func (b *Backend) prodHeld() bool {
	p := &b.pend
	return (p.mm == 1 && !p.nf.on) || p.moe.on
}

// holdMoEProd holds foldMoENorm's call c (its operands validated; pre: the
// AddRMSNorm it takes in) instead of making it, and reports whether it did:
// only where the fold could follow (1..moeAddNormMaxN tokens, the consumer's dim, the
// library's entries present) and the library would run MoE v10 for c.
func (b *Backend) holdMoEProd(dst, x ml.Tensor, m *ml.MoE, c *moeCall, pre heldNorm, d *tensor, ws []*tensor,
	biases []span) bool {
	p := &b.pend
	if !fuseOps || !fuseNormFold || !fuseMoEAddNorm || b.l.moeDecodeAddNorm == nil || b.l.matmulMultiNF == nil ||
		p.mm != 0 || p.rope != 0 || p.pnorm.on || p.moe.on || c.n < 1 || c.n > moeAddNormMaxN || c.dim%32 != 0 ||
		c.dim/nfRowsPerCTA > nfMaxPartials || (moeAuto && c.n >= int64(moe13From)) {
		return false
	}
	h := heldMoE{on: true, c: *c, pre: pre, dst: dst, x: x, m: m, out: span{d.ptr, uintptr(d.bytes)}}
	h.touched[0] = h.out
	for i, t := range ws {
		h.touched[1+i] = span{t.ptr, uintptr(t.bytes)}
	}
	copy(h.touched[1+len(ws):], biases)
	p.moe = h
	return true
}

// launchHeldMoE makes the held MoE's call as foldMoENorm would have (flush),
// its out projection (if it kept one) launched plainly first (fuseMoEOProj);
// where the library declines it, the held pre-norm and the MoE op's plain
// path (foldMoENorm false), re-entered: its operand lookups launch the norm.
func (b *Backend) launchHeldMoE() {
	h := b.pend.moe
	b.pend.moe = heldMoE{}
	b.launchProj(&h.c.pj)
	if rc := b.moeDecodeNormCall(&h.c); rc != stUnsupported {
		b.call("moe", rc)
		return
	}
	b.pend.norm = h.pre
	b.moePlain(h.dst, h.x, h.m)
}

// holdProdNorm holds the validated AddRMSNorm a with the held GEMV (or MoE)
// that produces its add (exactly: the producer's whole output) and reports
// whether it did; false: the caller flushes and launches it.
func (b *Backend) holdProdNorm(op string, res, dst, x, w ml.Tensor, a normOps, eps float32) bool {
	p := &b.pend
	if !fuseNormFold || !fuseOps || p.nf.on || p.rope != 0 || p.norm.on || p.pnorm.on || a.r == nil || a.wp == 0 ||
		a.bp != 0 || a.n < 1 || a.n > nfMaxN {
		return false
	}
	if p.moe.on {
		return b.holdMoENormProd(op, res, dst, x, w, a, eps)
	}
	if b.l.matmulAddNorm == nil || p.mm != 1 || int64(a.n) != p.n {
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

// holdMoENormProd is holdProdNorm with a held MoE producing the add. h and
// the residual may be the MoE's input and residual (gpt-oss: the same
// tensors; the route kernel has read them before the down kernel's epilogue
// writes), but overlap nothing the down kernel reads or writes, nor each
// other or the weight; the weight overlaps none of out, h, res.
func (b *Backend) holdMoENormProd(op string, res, dst, x, w ml.Tensor, a normOps, eps float32) bool {
	p := &b.pend
	hm := &p.moe
	if int64(a.n) != hm.c.n || int64(a.dim) != hm.c.dim || a.x.ptr != hm.c.out || int64(a.x.n) != hm.c.n*hm.c.dim {
		return false
	}
	hs, rs, ws := span{a.d.ptr, uintptr(a.d.bytes)}, span{a.r.ptr, uintptr(a.r.bytes)}, span{a.wp, uintptr(4 * a.dim)}
	for _, s := range hm.touched {
		if hs.overlaps(s) || rs.overlaps(s) {
			return false
		}
	}
	if hs.overlaps(rs) || hs.overlaps(ws) || rs.overlaps(ws) || ws.overlaps(hm.out) {
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

// unholdProdNorm (foldMoENorm, a MoE after the norm): holds the norm for the
// MoE fold where it may take it, else launches the GEMV and the norm. The
// GEMV is returned unlaunched (pj.on) where orch_moe_decode_oproj may take it
// (oprojFor), else launched.
func (b *Backend) unholdProdNorm() (pj oproj) {
	p := &b.pend
	if !p.pnorm.on {
		return
	}
	h := p.pnorm
	p.pnorm = prodNorm{}
	if b.oprojFor(h) {
		q := p.parts[0]
		pj = oproj{on: true, x: p.x, w: q.w, bias: q.bias, y: q.y, wtype: p.wtype, k: p.k, m: q.m}
		p.mm = 0
		p.reads, p.dsts = p.reads[:0], p.dsts[:0]
	} else {
		hf := b.holdFlush
		b.holdFlush = false
		b.flush() // the GEMV
		b.holdFlush = hf
	}
	if !b.holdMoENorm(h.op, h.res, h.dst, h.x, h.w, h.a, h.eps) {
		b.launchProj(&pj)
		b.launchProdNorm(h)
	}
	return pj
}

// oprojFor reports whether the held GEMV producing norm h's add may become
// orch_moe_decode_oproj's projection: the switches and the entry, one token,
// a weight type and k the library's GEMV v5 producer takes (holdProdNorm
// checked the rest: its whole output is the add, overlaps).
func (b *Backend) oprojFor(h prodNorm) bool {
	p := &b.pend
	return fuseOps && fuseMoEOProj && fuseMoENorm && b.l.moeDecodeOProj != nil && p.mm == 1 && !p.nf.on &&
		!p.moe.on && p.rope == 0 && p.n == 1 && qgemmType(plainWType(p.wtype)) && p.k%32 == 0 &&
		p.parts[0].y == h.a.x.ptr && p.parts[0].m == int64(h.a.dim)
}

// launchProj launches a GEMV kept for orch_moe_decode_oproj plainly (no-op
// when off) and turns it off.
func (b *Backend) launchProj(pj *oproj) {
	if !pj.on {
		return
	}
	pj.on = false
	b.call("matmul", b.l.matmul(b.ctx, pj.y, pj.x, pj.w, pj.wtype, pj.bias, 1, pj.k, pj.m, 0))
}

// oprojCall makes MoE call c with its projection as one orch_moe_decode_oproj
// (res2 .. ss: the next norm's producer half, or all 0). A fold's h still
// holding xt is materialised first (x becomes this call's). On
// stUnsupported nothing was launched.
func (b *Backend) oprojCall(c *moeCall, res2, nw2, xt, ss uintptr) int32 {
	b.materializeXT()
	a := oprojArgs{ox: c.pj.x, ow: c.pj.w, obias: c.pj.bias, y: c.pj.y, out: c.out, x: c.x, res: c.res,
		normW: c.normW, router: c.router, routerBias: c.routerBias, ids: c.ids, w: c.w, gate: c.gate, up: c.up,
		gateBias: c.gateBias, upBias: c.upBias, down: c.down, downBias: c.downBias, act: c.act, ybuf: c.ybuf,
		res2: res2, nw2: nw2, xt: xt, ss: ss, ok: c.pj.k, n: c.n, dim: c.dim, ff: c.ff, owtype: c.pj.wtype,
		routerType: c.routerType, nExp: c.nExp, guType: c.guType, downType: c.downType, slots: c.slots, eps: c.eps,
		alpha: c.alpha, limit: c.limit}
	rc := b.l.moeDecodeOProj(b.ctx, &a)
	if rc != stUnsupported {
		c.pj.on = false
	}
	return rc
}

// moeNormCall makes foldMoENorm's own call c: with its projection
// orch_moe_decode_oproj, x then holding xt (xtState); where the library
// declines that, the projection plainly and orch_moe_decode_norm.
func (b *Backend) moeNormCall(c *moeCall) int32 {
	if c.pj.on {
		rc := b.oprojCall(c, 0, 0, 0, 0)
		if rc == stOK {
			nb := uintptr(4 * c.n * c.dim)
			b.xt = xtState{on: true, h: span{c.x, nb}, hp: c.x, res: c.res, rs: span{c.res, nb},
				ws: span{c.normW, uintptr(4 * c.dim)}, w: c.normW, n: c.n, dim: c.dim, eps: c.eps}
		}
		if rc != stUnsupported {
			return rc
		}
		b.launchProj(&c.pj)
	}
	return b.moeDecodeNormCall(c)
}

// moeAddNormCall is startNormFold's call of the held MoE c with the next
// norm's producer half (its output xt covering hs): with its projection
// orch_moe_decode_oproj where xt covers the MoE's x (which would otherwise
// be left holding this fold's xt), else (or where the library declines) the
// projection plainly and orch_moe_decode_addnorm.
func (b *Backend) moeAddNormCall(c *moeCall, res2, nw2, xt, ss uintptr, hs span) int32 {
	if c.pj.on {
		if x := (span{c.x, uintptr(4 * c.n * c.dim)}); hs.p <= x.p && x.p+x.n <= hs.p+hs.n {
			if rc := b.oprojCall(c, res2, nw2, xt, ss); rc != stUnsupported {
				return rc
			}
		}
		b.launchProj(&c.pj)
	}
	return b.moeDecodeAddNormCall(c, res2, nw2, xt, ss)
}

// startNormFold is holdMatMul's first step while a GEMV + AddRMSNorm are
// held: a MatMul of exactly the norm's output (a consumer the library can
// scale) launches the producer with the fold and becomes the held, scaled
// consumer group; it reports whether it did. On false nothing was launched.
//
// l2Prefetch (session 16, issue 7): a producer launched right after the decode attention (Llama: attention -> out
// projection -> FFN norm -> gate/up) is made through orch_matmul_addnorm_pf with the first consumer's weight (w),
// so that its CTAs, waiting for the attention, ask the first rows of that weight into L2: the attention is
// latency-bound and leaves DRAM mostly idle, the gate/up fold after the projection is bandwidth-bound. How many
// bytes is the library's choice (ORCH_CUDA_L2PF); the results are the same bits. Not after any other launch (the
// down projection's producer follows the bandwidth-bound gate/up fold).
func (b *Backend) startNormFold(d, x, w *tensor, bias uintptr, n, k, m int) bool {
	p := &b.pend
	pn := &p.pnorm
	a := pn.a
	if !pn.on || x.ptr != a.d.ptr || x.n != a.d.n || n != a.n || k != a.dim || n > nfMaxN || !qgemmType(w.dt) ||
		b.l.matmulMultiNF == nil || (p.moe.on && b.l.moeDecodeAddNorm == nil) {
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
	if p.moe.on {
		for _, s := range p.moe.touched {
			if ds.overlaps(s) {
				return false
			}
		}
	}
	ss := b.scratchBuf("nf.ss", 4*nfMaxN*nfMaxPartials) // one size: never regrown between captures
	if b.err != nil {
		return false
	}
	var rc int32
	op, nss := "matmul", int64(0)
	if p.moe.on { // the held MoE as the producer: orch_moe_decode_addnorm
		op, nss = "moe", p.moe.c.dim/nfRowsPerCTA
		rc = b.moeAddNormCall(&p.moe.c, a.r.ptr, a.wp, a.d.ptr, ss, span{a.d.ptr, uintptr(a.d.bytes)})
	} else {
		q := p.parts[0]
		nss = q.m / nfRowsPerCTA
		if b.afterAttend && b.l.matmulAddNormPF != nil { // see l2Prefetch
			rc = b.l.matmulAddNormPF(b.ctx, q.y, p.x, q.w, p.wtype, q.bias, p.n, p.k, q.m, a.r.ptr, a.wp, a.d.ptr, ss,
				w.ptr, gemvWType(w), int64(m), int64(k))
		} else {
			rc = b.l.matmulAddNorm(b.ctx, q.y, p.x, q.w, p.wtype, q.bias, p.n, p.k, q.m, a.r.ptr, a.wp, a.d.ptr, ss)
		}
	}
	if rc == stUnsupported {
		return false
	}
	b.call(op, rc)
	b.xt = xtState{on: rc == stOK, h: span{a.d.ptr, uintptr(a.d.bytes)}, hp: a.d.ptr, res: a.r.ptr,
		rs: span{a.r.ptr, uintptr(a.r.bytes)}, ws: span{a.wp, uintptr(4 * a.dim)}, w: a.wp, n: int64(a.n),
		dim: int64(a.dim), eps: pn.eps, ss: ss, nss: nss}
	unrot := p.unrot
	*p = pending{mm: 1, x: x.ptr, wtype: gemvWType(w), n: int64(n), k: int64(k), unrot: unrot,
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
		p.wtype != gemvWType(w) || !fuseOps {
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
