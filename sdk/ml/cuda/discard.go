package cuda

import (
	"os"

	"github.com/llama-orch/orch/sdk/ml"
)

// Discard (ml.Discarder; session 14): two folds leave a tensor other than
// in the state the ops describe and repair it when something touches it or
// a graph ends — q / k unrotated after the RoPE folded into the attention
// (fuse.go foldAttend: one rope launch) and a norm's output holding xt after
// the norm folded into its GEMVs (normfold.go xtState: one norm launch). In
// a decode step nothing reads the last layer's q, k or norm output, yet a
// captured step ended with that rope after the argmax and (Llama) the norm
// before the residual add. The models discard them at the end of Hidden.
//
// Discard only forgets the repair for memory it covers whole (a partial
// overlap keeps it: the rest may be read) and never cancels a held launch:
// a held op reads what the ops before it wrote (a held norm consumer its xt,
// a held RoPE its input), and writes the residual, the caches or other
// outputs besides the discarded tensor. So it needs no flush. A discarded
// residual or norm weight changes nothing either: h stays to be
// materialised, and a later write of the residual still does that first.
//
// One held launch is made early instead: gpt-oss's last MoE, held as the
// producer of a next norm that does not come (normfold.go holdMoEProd),
// would go out as the out-projection GEMV + orch_moe_decode_norm so that
// its input h is left as the norm's output; with h discarded it is made as
// orch_moe_decode_oproj (the projection folded in, h left holding xt and
// forgotten), as foldMoENorm makes an unheld MoE's call — one launch fewer,
// the MoE output within the MoE bound of the other route (TestMoEOProjFold).
// Only where it is all that is held. ORCH_CUDA_DISCARD_OPROJ=0 turns that
// off; ORCH_CUDA_DISCARD=0 makes Discard a no-op.
var discardOn = os.Getenv("ORCH_CUDA_DISCARD") != "0"

var discardOProj = os.Getenv("ORCH_CUDA_DISCARD_OPROJ") != "0"

var _ ml.Discarder = (*Backend)(nil)

// Discard implements ml.Discarder. Tensors of another backend, freed ones
// and nil are ignored.
func (b *Backend) Discard(ts ...ml.Tensor) {
	if !discardOn {
		return
	}
	for _, t := range ts {
		ct, ok := t.(*tensor)
		if !ok || ct == nil || ct.be != b || ct.ptr == 0 {
			continue
		}
		s := span{ct.ptr, uintptr(ct.bytes)}
		b.discardHeldMoE(s)
		b.discardUnrotated(s)
		b.discardXT(s)
	}
}

// covers reports whether a holds all of b (b not empty).
func covers(a, b span) bool { return b.n > 0 && a.p <= b.p && b.p+b.n <= a.p+a.n }

// discardUnrotated forgets q / k left unrotated by a folded Attend where s
// covers them whole.
func (b *Backend) discardUnrotated(s span) {
	u := &b.pend.unrot
	if !u.on {
		return
	}
	for i := range u.spans {
		if u.x[i] != 0 && covers(s, u.spans[i]) {
			u.x[i], u.spans[i] = 0, span{}
		}
	}
	if u.x[0] == 0 && u.x[1] == 0 {
		u.on = false
	}
}

// discardXT forgets a norm fold's h still holding xt where s covers it
// whole. Held scaled consumers of h keep their own state (pend.nf) and
// launch as they would have.
func (b *Backend) discardXT(s span) {
	if b.xt.on && covers(s, b.xt.h) {
		b.xt = xtState{}
	}
}

// discardHeldMoE makes a held MoE's call with its out projection folded in
// (moeNormCall) when s covers the MoE's input and nothing else is held; h
// then holds xt (xtState), which the caller's discardXT forgets. Where the
// library declines, the held pre-norm and the MoE op's plain path, as
// launchHeldMoE.
func (b *Backend) discardHeldMoE(s span) {
	p := &b.pend
	if !discardOProj || !p.moe.on || !p.moe.c.pj.on || b.err != nil || b.holdFlush || p.mm != 0 || p.rope != 0 ||
		p.norm.on || p.pnorm.on || p.nf.on || !covers(s, span{p.moe.c.x, uintptr(4 * p.moe.c.n * p.moe.c.dim)}) {
		return
	}
	h := p.moe
	p.moe = heldMoE{}
	if rc := b.moeNormCall(&h.c); rc != stUnsupported {
		b.call("moe", rc)
		return
	}
	b.pend.norm = h.pre
	b.moePlain(h.dst, h.x, h.m)
}
