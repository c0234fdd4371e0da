package cuda

import (
	"os"

	"github.com/llama-orch/orch/sdk/ml"
)

// Fewer decode launches without touching model code (issue 7, session 3):
// the backend holds back a small-n MatMul (or a RoPE) instead of launching
// it, and when the next op is a compatible MatMul (same x, n, k and weight
// type: q, k and v of a layer) or RoPE (same positions and parameters: q then
// k), launches them together as one kernel (orch_matmul_multi, orch_rope2),
// whose outputs are bit-identical to separate launches; a held pair of RoPEs
// followed by the KV write of the rotated k (and v) becomes one launch
// (orch_rope_kv). Anything else first
// launches what is held ("flush"): every op (through get, which arg calls),
// Write*/Read*, Sync, Err, Run (before a capture begins and before it ends),
// Free and Close. ORCH_CUDA_FUSE=0 turns the merging off.
//
// Why deferral in the backend and not new ml ops: plugins/ and sdk/ml/nn are
// other code's (and the CPU backend would need the same ops); the backend sees
// the op stream and can merge where it is provably the same computation.

// fuseOps is read once; tests flip it to compare the two paths.
var fuseOps = os.Getenv("ORCH_CUDA_FUSE") != "0"

// fuseGLU (session 6): held gate and up GEMVs followed by SwiGLU(gate, up)
// become one orch_matmul_swiglu launch. ORCH_CUDA_GLU=0 turns it off (the
// library reads the same variable and declines too).
var fuseGLU = os.Getenv("ORCH_CUDA_GLU") != "0"

// foldAttnRoPE (session 7; default on since device run 2, H100: gpt-oss
// tg128 502.9 vs 488.9 tok/s, Llama 230.6 vs 230.2; ORCH_CUDA_ATTN_ROPE=0
// turns it off): a held RoPE pair
// + KV write (what orch_rope_kv launches) followed by Attend over the same
// q, caches, positions and slots, for <= 8 tokens, becomes one launch
// (orch_attention_rope: the decode attention kernel rotates q and the new
// keys in registers and writes the caches itself). Outputs and caches are
// bit-identical to the two launches; q and k are left unrotated in memory,
// so the backend tracks them (pending.unrot) and rotates them in place
// (orch_rope2, the launch the fold saved) before any later op, read or
// write uses them — unless a MatMul overwrites them whole first, which is
// what the next layer's q/k GEMVs do.
var foldAttnRoPE = os.Getenv("ORCH_CUDA_ATTN_ROPE") != "0"

// attnRopeArgs mirrors orch_attn_rope_args field by field.
type attnRopeArgs struct {
	k, v             uintptr
	kStride, vStride int64
	slots, invFreq   uintptr
	attnFactor       float32
	rotDim, neox     int32
}

const attnRopeMaxTok = 8 // ATTN_ROPE_MAX_TOK (attention_kernels.cuh)

const maxGEMVParts = 3 // orch_matmul_multi's limit (GEMV_MAX_PARTS)

// gemvPart mirrors orch_gemv_part field by field.
type gemvPart struct {
	w, bias, y uintptr
	m          int64
}

type span struct{ p, n uintptr }

func (a span) overlaps(b span) bool { return a.n > 0 && b.n > 0 && a.p < b.p+b.n && b.p < a.p+a.n }

// pending is what the backend holds back: MatMuls with one x (mm > 0) or
// RoPEs with one set of positions (rope > 0), never both.
type pending struct {
	mm    int
	x     uintptr
	wtype int32
	n, k  int64
	parts [maxGEMVParts]gemvPart
	reads []span // x, weights and biases of the held parts
	dsts  []span

	rope     int
	rx       [2]uintptr
	rstride  [2]int64
	rheads   [2]int32
	rspan    [2]span
	rn       int64
	rhd, rot int32
	rpos     uintptr
	rfreq    uintptr
	rscale   float32
	rneox    int32
	// rope == 3: the pair plus the held KV write (orch_rope_kv's other
	// operands), for foldAttnRoPE.
	kv kvHeld
	// q and k left unrotated by a folded Attend (not a pending launch: see
	// foldAttnRoPE); survives flush.
	unrot unrotated

	norm       heldNorm // an AddRMSNorm the MoE after it may take in (foldMoENorm); never with mm / rope
	normLaunch bool     // flush is launching the held norm through the norm op
	// normfold.go: a MoE (its orch_moe_decode_norm call) held as the producer
	// of the next AddRMSNorm's fold; never with mm / rope / norm.
	moe heldMoE

	// normfold.go: pnorm, an AddRMSNorm held with the single held GEMV
	// producing its add; nf.on: the held parts are a fold's scaled consumers
	// (x = xt; nf is the fold's state).
	pnorm prodNorm
	nf    xtState
}

type kvHeld struct {
	v, kc, vc, slots uintptr
	vs               span
	kvt              int32
}

// unrotated: the RoPE pair (q = x[0], k = x[1]) a folded Attend did not
// apply in memory; x[i] is 0 once overwritten whole or freed.
type unrotated struct {
	on      bool
	x       [2]uintptr
	stride  [2]int64
	heads   [2]int32
	spans   [2]span
	n       int64
	hd, rot int32
	pos     uintptr
	freq    uintptr
	scale   float32
	neox    int32
}

// flush launches what is held back (a no-op while an op validates its own
// operands: holdFlush).
func (b *Backend) flush() {
	if b.holdFlush {
		return
	}
	b.flushRows() // a held Embed (rowsnorm.go): never held with anything else
	p := &b.pend
	if p.norm.on { // held alone (holdMoENorm): launched as the norm op would have been
		h := p.norm
		p.norm = heldNorm{}
		p.normLaunch = true // not held again
		b.norm(h.op, h.res, h.dst, h.x, h.w, nil, h.eps, false)
		p.normLaunch = false
	}
	pn := p.pnorm // launched after its GEMV (normfold.go)
	p.pnorm = prodNorm{}
	if p.nf.on && p.mm >= 1 { // a fold's scaled consumers (normfold.go)
		if b.launchNF() {
			p.mm = 0
		} else { // the library declines: the norm's output into h, then the plain launches below
			b.dropNF()
		}
	}
	p.nf = xtState{}
	if p.moe.on { // a MoE held as a norm fold's producer (normfold.go): its plain call
		b.launchHeldMoE()
	}
	switch {
	case p.mm == 1 && p.n <= 8:
		q := p.parts[0]
		b.call("matmul", b.l.matmul(b.ctx, q.y, p.x, q.w, p.wtype, q.bias, p.n, p.k, q.m, 0))
	case p.mm >= 1: // several parts, or one of n > 8 (GEMV v9 only through orch_matmul_multi)
		rc := b.l.matmulMulti(b.ctx, p.x, p.wtype, p.n, p.k, int32(p.mm), &p.parts[0])
		if rc == stUnsupported { // not the v5 GEMV for every part: one launch each, as without merging
			// (n > 8: orch_matmul's GEMM, the v9 GEMV's fallback)
			for _, q := range p.parts[:p.mm] {
				b.call("matmul", b.l.matmul(b.ctx, q.y, p.x, q.w, p.wtype, q.bias, p.n, p.k, q.m, 0))
			}
		} else {
			b.call("matmul", rc)
		}
	case p.rope == 1:
		b.call("rope", b.l.rope(b.ctx, p.rx[0], p.rstride[0], p.rn, p.rheads[0], p.rhd, p.rot, p.rpos, p.rfreq,
			p.rscale, p.rneox))
	case p.rope == 2:
		b.call("rope", b.l.rope2(b.ctx, p.rx[0], p.rstride[0], p.rheads[0], p.rx[1], p.rstride[1], p.rheads[1], p.rn,
			p.rhd, p.rot, p.rpos, p.rfreq, p.rscale, p.rneox))
	case p.rope == 3:
		b.launchRopeKV()
	}
	p.mm, p.rope = 0, 0
	p.reads, p.dsts = p.reads[:0], p.dsts[:0]
	if pn.on {
		b.launchProdNorm(pn)
	}
}

// holdMatMul queues y = x·W^T + bias (validated, no accumulate) for merging
// and reports whether it did; false: the caller launches it now.
func (b *Backend) holdMatMul(d, x, w *tensor, bias uintptr, n, k, m int) bool {
	if !fuseOps || n < 1 || (n > 8 && !gemvWideFor(n, k, m)) || !qgemmType(w.dt) {
		b.flush()
		return false
	}
	if b.pend.pnorm.on { // a GEMV + AddRMSNorm held: this MatMul may be the fold's consumer (normfold.go)
		if b.startNormFold(d, x, w, bias, n, k, m) {
			return true
		}
		b.flush()
	}
	dst := span{d.ptr, uintptr(d.bytes)}
	rd := []span{{w.ptr, uintptr(w.bytes)}}
	if bias != 0 {
		rd = append(rd, span{bias, uintptr(4 * m)})
	}
	p := &b.pend
	if p.mm > 0 && p.mm < maxGEMVParts && p.x == x.ptr && p.n == int64(n) && p.k == int64(k) &&
		p.wtype == gemvWType(w) && b.independent(dst, rd) {
		p.parts[p.mm] = gemvPart{w: w.ptr, bias: bias, y: d.ptr, m: int64(m)}
		p.mm++
		p.reads = append(p.reads, rd...)
		p.dsts = append(p.dsts, dst)
		if p.mm == maxGEMVParts {
			b.flush()
		}
		return true
	}
	b.flush()
	xs := span{x.ptr, uintptr(x.bytes)}
	if dst.overlaps(xs) { // y aliasing x: the library rejects or the kernel races; keep the old path
		return false
	}
	for _, r := range rd {
		if dst.overlaps(r) {
			return false
		}
	}
	unrot := p.unrot // not a held launch (foldAttend): kept
	*p = pending{mm: 1, x: x.ptr, wtype: gemvWType(w), n: int64(n), k: int64(k), reads: append(p.reads[:0], xs),
		dsts: append(p.dsts[:0], dst), unrot: unrot}
	p.parts[0] = gemvPart{w: w.ptr, bias: bias, y: d.ptr, m: int64(m)}
	p.reads = append(p.reads, rd...)
	return true
}

// independent reports whether a part writing dst and reading rd can run in
// the same launch as the held parts with the same results as after them: no
// write of one is read or written by another.
func (b *Backend) independent(dst span, rd []span) bool {
	for _, s := range b.pend.reads {
		if dst.overlaps(s) {
			return false
		}
	}
	for _, s := range b.pend.dsts {
		if dst.overlaps(s) {
			return false
		}
		for _, r := range rd {
			if s.overlaps(r) {
				return false
			}
		}
	}
	return true
}

// holdRoPE queues an in-place RoPE of x (validated) for merging with the
// next one (q then k) and reports whether it did.
func (b *Backend) holdRoPE(x *tensor, stride, n int64, heads, hd, rot int32, pos, freq uintptr, scale float32,
	neox int32) bool {
	if !fuseOps {
		b.flush()
		return false
	}
	xs := span{x.ptr, uintptr(x.bytes)}
	p := &b.pend
	if p.rope == 1 && p.rn == n && p.rhd == hd && p.rot == rot && p.rpos == pos && p.rfreq == freq &&
		p.rscale == scale && p.rneox == neox && !xs.overlaps(p.rspan[0]) {
		p.rx[1], p.rstride[1], p.rheads[1], p.rspan[1] = x.ptr, stride, heads, xs
		p.rope = 2 // held: the KV write of k may follow
		return true
	}
	b.flush()
	p.rope = 1
	p.rx[0], p.rstride[0], p.rheads[0], p.rspan[0] = x.ptr, stride, heads, xs
	p.rn, p.rhd, p.rot, p.rpos, p.rfreq, p.rscale, p.rneox = n, hd, rot, pos, freq, scale, neox
	return true
}

// holdKVWrite launches a held RoPE pair (q, k) together with this KV write
// when it writes exactly the rotated k (same tensor, tokens, heads and head
// dim) and v and the caches overlap none of q and k, and reports whether it
// did; otherwise it flushes and the caller launches the write.
func (b *Backend) holdKVWrite(kc, vc *tensor, kvt int32, k, v *tensor, slots uintptr, n int64, nkv, hd int32) bool {
	p := &b.pend
	if !fuseOps || p.rope != 2 || p.rx[1] != k.ptr || p.rn != n || p.rheads[1] != nkv || p.rhd != hd ||
		p.rstride[1] != int64(nkv*hd) {
		b.flush()
		return false
	}
	for _, s := range []span{{v.ptr, uintptr(v.bytes)}, {kc.ptr, uintptr(kc.bytes)}, {vc.ptr, uintptr(vc.bytes)}} {
		if s.overlaps(p.rspan[0]) || s.overlaps(p.rspan[1]) {
			b.flush()
			return false
		}
	}
	if (span{kc.ptr, uintptr(kc.bytes)}).overlaps(span{vc.ptr, uintptr(vc.bytes)}) ||
		(span{v.ptr, uintptr(v.bytes)}).overlaps(span{kc.ptr, uintptr(kc.bytes)}) ||
		(span{v.ptr, uintptr(v.bytes)}).overlaps(span{vc.ptr, uintptr(vc.bytes)}) {
		b.flush()
		return false
	}
	p.kv = kvHeld{v: v.ptr, kc: kc.ptr, vc: vc.ptr, slots: slots, vs: span{v.ptr, uintptr(v.bytes)}, kvt: kvt}
	p.rope = 3
	if !foldAttnRoPE || b.l.attentionRope == nil || n > attnRopeMaxTok {
		b.flush() // launches it now (orch_rope_kv)
	}
	return true
}

// launchRopeKV launches the held RoPE pair + KV write (rope == 3).
func (b *Backend) launchRopeKV() {
	p := &b.pend
	nkv := p.rheads[1]
	b.call("rope", b.l.ropeKV(b.ctx, p.rx[0], p.rstride[0], p.rheads[0], p.rx[1], p.rstride[1], nkv, p.kv.v,
		int64(nkv*p.rhd), p.kv.kc, p.kv.vc, p.kv.kvt, p.kv.slots, p.rn, p.rhd, p.rot, p.rpos, p.rfreq, p.rscale,
		p.rneox))
}

// foldAttend launches Attend a (its operands validated; pos and slots of its
// batch) together with the held RoPE pair + KV write as one
// orch_attention_rope when they are the same computation: the held q is a's
// q (whole, same stride), the write went to a's caches at its batch's slots,
// the RoPE used its positions, and out overlaps none of q, k, v. It reports
// whether it did; on false nothing was launched (the caller flushes).
func (b *Backend) foldAttend(a *attnArgs, out span, pos, slots uintptr) bool {
	p := &b.pend
	if p.rope != 3 || !foldAttnRoPE || b.l.attentionRope == nil {
		return false
	}
	if p.rx[0] != a.q || p.rstride[0] != a.qStride || p.rheads[0] != a.nHeads || p.rhd != a.headDim ||
		p.rheads[1] != a.nKVHeads || p.rn != a.nTok || p.kv.kc != a.kCache || p.kv.vc != a.vCache ||
		p.kv.kvt != a.kvDType || p.kv.slots != slots || p.rpos != pos {
		return false
	}
	if out.overlaps(p.rspan[0]) || out.overlaps(p.rspan[1]) || out.overlaps(p.kv.vs) {
		return false
	}
	r := attnRopeArgs{k: p.rx[1], v: p.kv.v, kStride: p.rstride[1], vStride: int64(a.nKVHeads * a.headDim),
		slots: slots, invFreq: p.rfreq, attnFactor: p.rscale, rotDim: p.rot, neox: p.rneox}
	rc := b.l.attentionRope(b.ctx, a, &r)
	if rc == stUnsupported { // not a batch the kernel folds: the caller flushes (orch_rope_kv) and attends
		return false
	}
	p.rope = 0
	b.call("attend", rc)
	if rc == stOK {
		p.unrot = unrotated{on: true, x: p.rx, stride: p.rstride, heads: p.rheads, spans: p.rspan, n: p.rn,
			hd: p.rhd, rot: p.rot, pos: p.rpos, freq: p.rfreq, scale: p.rscale, neox: p.rneox}
	}
	return true
}

// touchUnrotated is called for every tensor an op, read or write is about
// to use: if it overlaps q or k left unrotated by a folded Attend, they are
// rotated in place first (orch_rope2 / orch_rope, as the RoPE ops would
// have) — unless overwrite (a MatMul's dst: written whole before anything
// reads it) covers them, which only forgets them.
func (b *Backend) touchUnrotated(t *tensor, overwrite bool) {
	u := &b.pend.unrot
	if !u.on || t == nil {
		return
	}
	ts := span{t.ptr, uintptr(t.bytes)}
	hit := false
	for i := range u.spans {
		if u.x[i] == 0 || !ts.overlaps(u.spans[i]) {
			continue
		}
		if overwrite && ts.p <= u.spans[i].p && u.spans[i].p+u.spans[i].n <= ts.p+ts.n {
			u.x[i], u.spans[i] = 0, span{} // overwritten whole
			continue
		}
		hit = true
	}
	if u.x[0] == 0 && u.x[1] == 0 {
		u.on = false
	}
	if hit {
		b.rotateUnrotated()
	}
}

// forgetUnrotated drops q / k overlapping memory being freed.
func (b *Backend) forgetUnrotated(t *tensor) {
	u := &b.pend.unrot
	if !u.on || t == nil {
		return
	}
	ts := span{t.ptr, uintptr(t.bytes)}
	for i := range u.spans {
		if ts.overlaps(u.spans[i]) {
			u.x[i], u.spans[i] = 0, span{}
		}
	}
	if u.x[0] == 0 && u.x[1] == 0 {
		u.on = false
	}
}

// rotateUnrotated applies, in place, the RoPE a folded Attend left out.
func (b *Backend) rotateUnrotated() {
	u := &b.pend.unrot
	if !u.on {
		return
	}
	u.on = false
	switch {
	case u.x[0] != 0 && u.x[1] != 0:
		b.call("rope", b.l.rope2(b.ctx, u.x[0], u.stride[0], u.heads[0], u.x[1], u.stride[1], u.heads[1], u.n, u.hd,
			u.rot, u.pos, u.freq, u.scale, u.neox))
	case u.x[0] != 0 || u.x[1] != 0:
		i := 0
		if u.x[0] == 0 {
			i = 1
		}
		b.call("rope", b.l.rope(b.ctx, u.x[i], u.stride[i], u.n, u.heads[i], u.hd, u.rot, u.pos, u.freq, u.scale,
			u.neox))
	}
}

// setPDL turns programmatic dependent launch on or off for the kernels
// launched from now on (process-wide; graphs captured before keep theirs) and
// returns the previous state. Tests and TestPerfDecodeLaunches use it for A/B.
func (b *Backend) setPDL(on bool) (was bool) {
	var w int32
	b.flush()
	b.call("set_pdl", b.l.setPDL(b.ctx, b2i(on), &w))
	return w != 0
}

// foldSwiGLU launches the two held GEMVs together with SwiGLU(dst, gate, up)
// as one kernel (orch_matmul_swiglu) when they are exactly gate = x.Wg and
// up = x.Wu (the held parts' outputs, whole) and dst is gate, up or memory
// none of the held parts reads or writes; it reports whether it did. On
// false nothing was launched and the held GEMVs are still held. The kernel
// writes gate and up as the merged GEMV would and dst as orch_swiglu.
func (b *Backend) foldSwiGLU(d, g, u *tensor) bool {
	p := &b.pend
	if !fuseOps || !fuseGLU || p.mm != 2 || p.n > 2 || g.ptr == u.ptr {
		return false
	}
	var gu [2]gemvPart
	switch {
	case p.parts[0].y == g.ptr && p.parts[1].y == u.ptr:
		gu = [2]gemvPart{p.parts[0], p.parts[1]}
	case p.parts[1].y == g.ptr && p.parts[0].y == u.ptr:
		gu = [2]gemvPart{p.parts[1], p.parts[0]}
	default:
		return false
	}
	if gu[0].m != gu[1].m || int64(g.n) != p.n*gu[0].m || u.n != g.n || d.n != g.n {
		return false
	}
	if d.ptr != g.ptr && d.ptr != u.ptr {
		ds := span{d.ptr, uintptr(d.bytes)}
		for _, s := range append(append([]span(nil), p.reads...), p.dsts...) {
			if ds.overlaps(s) {
				return false
			}
		}
	}
	rc := int32(stUnsupported)
	if p.nf.on { // a fold's scaled consumers (normfold.go)
		rc = b.l.matmulSwiGLUNF(b.ctx, p.x, p.wtype, p.n, p.k, &gu[0], d.ptr, p.nf.ss, p.nf.nss, p.nf.eps)
		if rc == stUnsupported { // the norm's output into h: the plain fold below reads it
			b.dropNF()
		}
	}
	if rc == stUnsupported {
		rc = b.l.matmulSwiGLU(b.ctx, p.x, p.wtype, p.n, p.k, &gu[0], d.ptr)
	}
	if rc == stUnsupported { // not the v5 GEMV: the caller flushes and runs the three ops
		return false
	}
	p.mm = 0
	p.nf = xtState{}
	p.reads, p.dsts = p.reads[:0], p.dsts[:0]
	b.call("swiglu", rc)
	return true
}

// fuseMoENorm (session 7; default since device run 1 of session 7, H100:
// gpt-oss tg128 497.8 vs 468.6 tok/s, x8 1,310 vs 1,289; ORCH_CUDA_MOE_NORM=0
// turns it off): an AddRMSNorm of 1..64 rows is held back (holdMoENorm); when
// the next op is the MoE of its output (gpt-oss: attention out -> residual
// add -> post-attention norm -> MoE), both become one orch_moe_decode_norm
// call: the norm folded into MoE v10's route kernel (up to 8 tokens; MoE v13's
// from 2 or 9 tokens where it is routed — the library declines the rest, and
// the held norm is launched as before) (one launch fewer on the
// step's critical path; res and the norm's output are norm.cu's bits, the
// MoE output orch_moe_decode's: cuda/test/moe_emu_test.cpp test_decode_norm).
// Anything else launches the held norm first, through the norm op itself
// (flush).
var fuseMoENorm = os.Getenv("ORCH_CUDA_MOE_NORM") != "0"

// moeNormMaxDim: orch_moe_decode_norm's widest row (16 elements per thread of 256).
const moeNormMaxDim = 4096

// heldNorm is a held AddRMSNorm(res, dst, x, w, eps): the op's own operands.
type heldNorm struct {
	on             bool
	op             string
	res, dst, x, w ml.Tensor
	d, r, add      *tensor
	wp             uintptr
	eps            float32
}

// holdMoENorm holds the validated AddRMSNorm a (flushed before: nothing else
// is held) for foldMoENorm and reports whether it did; false: the caller
// launches it. Only where the fold could run: 1..moeDecodeMaxN rows of at most
// moeNormMaxDim, a norm weight, and an output that overlaps none of res, x
// and w (the route kernel's CTAs write their slice of it while others read
// those).
func (b *Backend) holdMoENorm(op string, res, dst, x, w ml.Tensor, a normOps, eps float32) bool {
	if !fuseOps || !fuseMoENorm || b.pend.normLaunch || a.r == nil || a.n < 1 || a.n > moeDecodeMaxN || a.dim > moeNormMaxDim ||
		a.wp == 0 {
		return false
	}
	ds := span{a.d.ptr, uintptr(a.d.bytes)}
	if ds.overlaps(span{a.r.ptr, uintptr(a.r.bytes)}) || ds.overlaps(span{a.x.ptr, uintptr(a.x.bytes)}) ||
		ds.overlaps(span{a.wp, uintptr(4 * a.dim)}) {
		return false
	}
	b.pend.norm = heldNorm{on: true, op: op, res: res, dst: dst, x: x, w: w, d: a.d, r: a.r, add: a.x, wp: a.wp,
		eps: eps}
	return true
}

// foldMoENorm runs the held AddRMSNorm and MoE(dst, x, m) as one
// orch_moe_decode_norm call when x is exactly the norm's output and the
// library takes it, and reports whether it did; false: nothing launched (the
// caller's MoE flushes the norm and runs as without it). Operand errors are
// left to the caller's checks.
func (b *Backend) foldMoENorm(dst, x ml.Tensor, m *ml.MoE) bool {
	// a norm held with its GEMV (normfold.go): the norm is held here, the GEMV goes out — or is kept (pj) for
	// orch_moe_decode_oproj, launched on return where the call does not take it (before the caller's norm)
	pj := b.unholdProdNorm()
	defer b.launchProj(&pj)
	hn := &b.pend.norm
	if !hn.on || m == nil || m.Router == nil || m.Gate == nil || m.Up == nil || m.Down == nil || b.err != nil {
		return false
	}
	const op = "moe"
	b.holdFlush = true // the operand lookups must not launch the held norm
	defer func() { b.holdFlush = false }()
	d, xx := b.arg(op, "dst", dst, ml.F32), b.arg(op, "x", x, ml.F32)
	if d == nil || xx == nil || xx.ptr != hn.d.ptr || xx.n != hn.d.n {
		return false
	}
	router, gate := b.arg(op, "router", m.Router, anyType), b.arg(op, "gate", m.Gate, anyType)
	up, down := b.arg(op, "up", m.Up, anyType), b.arg(op, "down", m.Down, anyType)
	if router == nil || gate == nil || up == nil || down == nil || router.dt != ml.F32 || gate.dt != up.dt {
		return false
	}
	md, err := ml.MoEShapes(d.shape, xx.shape, router.shape, gate.shape, up.shape, down.shape, m.TopK)
	if err != nil || md.N > moeDecodeMaxN || m.TopK > 16 {
		return false
	}
	dim, n, ne, ff, k := md.Dim, md.N, md.Experts, md.FF, m.TopK
	rb, ok1 := b.optF32(op, "router_bias", m.RouterBias, ne)
	gb, ok2 := b.optF32(op, "gate_bias", m.GateBias, ff*ne)
	ub, ok3 := b.optF32(op, "up_bias", m.UpBias, ff*ne)
	db, ok4 := b.optF32(op, "down_bias", m.DownBias, dim*ne)
	if !ok1 || !ok2 || !ok3 || !ok4 {
		return false
	}
	// the MoE op's scratch (ops.go MoE: the same names and sizes)
	ids := b.scratchBuf("moe.ids", 4*k*n)
	wts := b.scratchBuf("moe.w", 4*k*n)
	g := b.scratchBuf("moe.gate", 4*ff*k*n)
	y := b.scratchBuf("moe.down", 4*dim*k*n)
	if b.err != nil {
		return false
	}
	gt, dt := moeWTypes(gate, up, down) // the repacked rows where all three have them (weightrp.go)
	c := moeCall{out: d.ptr, x: xx.ptr, res: hn.r.ptr, add: hn.add.ptr, normW: hn.wp, eps: hn.eps, router: router.ptr,
		routerType: int32(router.dt), routerBias: rb, nExp: int32(ne), ids: ids, w: wts, gate: gate.ptr, up: up.ptr,
		guType: gt, gateBias: gb, upBias: ub, down: down.ptr, downType: dt, downBias: db, act: g,
		ybuf: y, n: int64(n), slots: int32(k), dim: int64(dim), ff: int64(ff), alpha: m.Alpha, limit: m.Limit}
	if pj.on && pj.y == c.add && pj.m == c.dim && c.n == 1 {
		c.pj, pj = pj, oproj{} // the call makes it (moeNormCall, or held: moeAddNormCall / launchHeldMoE)
	}
	b.launchProj(&pj) // (not taken: before the call)
	// held instead (normfold.go): the next AddRMSNorm of its output and a MatMul of that norm may fold into it
	if b.holdMoEProd(dst, x, m, &c, *hn, d, []*tensor{router, gate, up, down},
		[]span{{rb, uintptr(4 * ne)}, {gb, uintptr(4 * ff * ne)}, {ub, uintptr(4 * ff * ne)}, {db, uintptr(4 * dim * ne)}}) {
		*hn = heldNorm{}
		return true
	}
	rc := b.moeNormCall(&c) // (declined: the projection was launched)
	if rc == stUnsupported {
		return false
	}
	*hn = heldNorm{}
	b.call(op, rc)
	return true
}

// moeCall: orch_moe_decode_norm's operands (foldMoENorm), kept while the MoE
// is held (normfold.go), and the out projection it may take in.
type moeCall struct {
	out, x, res, add, normW uintptr
	eps                     float32
	router                  uintptr
	routerType              int32
	routerBias              uintptr
	nExp                    int32
	ids, w, gate, up        uintptr
	guType                  int32
	gateBias, upBias, down  uintptr
	downType                int32
	downBias, act, ybuf     uintptr
	n                       int64
	slots                   int32
	dim, ff                 int64
	alpha, limit            float32
	pj                      oproj // the out projection producing add (normfold.go fuseMoEOProj; on: not launched)
}

// moeDecodeNormCall makes the call c (orch_moe_decode_norm).
func (b *Backend) moeDecodeNormCall(c *moeCall) int32 {
	return b.l.moeDecodeNorm(b.ctx, c.out, c.x, c.res, c.add, c.normW, c.eps, c.router, c.routerType, c.routerBias,
		c.nExp, c.ids, c.w, c.gate, c.up, c.guType, c.gateBias, c.upBias, c.down, c.downType, c.downBias, c.act, c.ybuf,
		c.n, c.slots, c.dim, c.ff, c.alpha, c.limit)
}

// moeDecodeAddNormCall makes the call c with the next RMSNorm's producer half
// (orch_moe_decode_addnorm: res2 += out, xt = res2 * nw2, ss).
func (b *Backend) moeDecodeAddNormCall(c *moeCall, res2, nw2, xt, ss uintptr) int32 {
	return b.l.moeDecodeAddNorm(b.ctx, c.out, c.x, c.res, c.add, c.normW, c.eps, c.router, c.routerType,
		c.routerBias, c.nExp, c.ids, c.w, c.gate, c.up, c.guType, c.gateBias, c.upBias, c.down, c.downType, c.downBias,
		c.act, c.ybuf, c.n, c.slots, c.dim, c.ff, c.alpha, c.limit, res2, nw2, xt, ss)
}
