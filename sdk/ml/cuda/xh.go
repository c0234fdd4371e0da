package cuda

import (
	"os"

	"github.com/llama-orch/orch/sdk/ml"
)

// x packed in fp16 by its producer (issue 7, session 7; opt-in
// ORCH_CUDA_XH=1 until the device measures it). The one- and two-token v5
// GEMVs stage their x into shared memory as fp16 with a power-of-two scale
// per 32 elements (dec16.cuh); each CTA converted the float x it read, one
// L2 round trip per float4 per thread after the PDL wait (session 6's trace:
// 1.2-1.5 us at k = 2880-4096). Here the RMSNorm in front of the GEMV
// (orch_rmsnorm_xh) also writes that staged image once, into a backend
// scratch buffer, and the consumer (the merged q/k/v GEMV, the gate/up +
// SwiGLU fold, the LM head: orch_matmul_multi_xh / orch_matmul_swiglu_xh)
// copies it with 16-byte cp.async: half the bytes, one round trip, no
// conversion. Bit-identical to the float-x path (same floats, same scale and
// rounding: cuda/test/decode_emu_test.cpp test_norm_xh).
//
// Validity: the packed copy stands for the norm's output only until anything
// else is launched or may write memory. The norm records the launch count
// (b.launches, counted in call); a held GEMV uses the copy only when its x
// is the norm's output and no launch happened since (the held q/k/v or
// gate/up are the very next launch); get (outside an op's own operand
// checks), Free and Run forget it.
//
// ORCH_CUDA_XH=2 also packs the SwiGLU fold's output for the down GEMV (Llama
// down, k = 14336: the bigger staging; the fold then runs in clusters of 4
// CTAs on sm_90, gemv16.cuh gemv5_glu_pack): its own switch so that the
// device can time the clusters apart.
var (
	fuseXH   = os.Getenv("ORCH_CUDA_XH") == "1" || os.Getenv("ORCH_CUDA_XH") == "2"
	xhGLUOut = os.Getenv("ORCH_CUDA_XH") == "2"
)

// xhMaxK: the widest x packed by a norm (orch_rmsnorm_xh's limit: 32 x 256
// threads); xhGLUMaxM: the widest SwiGLU fold output packed (its own buffer:
// the fold reads the norm's while it writes).
const (
	xhMaxK    = 8192
	xhGLUMaxM = 16384
)

type xhState struct {
	src  uintptr // the norm's output (0: nothing packed)
	n, k int64
	kind int32 // packed pair order: 0 Q8_0, 1 MXFP4 / Q4_0
	seq  uint64
	buf  uintptr
}

// xhKind is the packed pair order the weight type's GEMV reads.
func xhKind(wt int32) int32 {
	if wt == int32(ml.Q8_0) {
		return 0
	}
	return 1
}

// normXH launches the RMSNorm with its output also packed for a Q8_0 GEMV
// (the GEMVs that follow norms in Llama and gpt-oss) and reports whether it
// did; false: nothing launched, the caller runs orch_rmsnorm.
func (b *Backend) normXH(op string, a normOps, eps float32) bool {
	if !fuseXH || !fuseOps || b.l.rmsnormXH == nil || a.n < 1 || a.n > 2 || a.dim%32 != 0 || a.dim > xhMaxK ||
		a.wp == 0 {
		return false
	}
	rb := b.l.xhRowBytes(int64(xhMaxK))
	buf := b.scratchBuf("xh", int(2*rb)) // one size: never regrown between captures
	if b.err != nil {
		return false
	}
	rc := b.l.rmsnormXH(b.ctx, a.d.ptr, a.xp, a.addp, a.wp, int64(a.n), int64(a.dim), eps, buf, 0)
	if rc == stUnsupported {
		return false
	}
	b.call(op, rc)
	if rc == stOK {
		b.xh = xhState{src: a.d.ptr, n: int64(a.n), k: int64(a.dim), kind: 0, seq: b.launches, buf: buf}
	}
	return true
}

// swigluXH runs the held gate/up GEMVs + SwiGLU(d) (foldSwiGLU's checks
// passed) with x packed by the norm when it is, and out packed for the down
// GEMV after it (orch_matmul_swiglu_xh; sm_90 clusters); xo: the packed out
// (buf 0: none). stUnsupported: nothing launched, the caller runs
// orch_matmul_swiglu.
func (b *Backend) swigluXH(d *tensor, gu [2]gemvPart) (rc int32, xo xhState) {
	p := &b.pend
	if !fuseXH || b.l.matmulSwiGLUXH == nil || p.n > 2 {
		return stUnsupported, xo
	}
	xin, kind := b.xhFor(), xhKind(p.wtype)
	var xout uintptr
	if m := gu[0].m; xhGLUOut && m%32 == 0 && m <= xhGLUMaxM {
		xout = b.scratchBuf("xh.glu", int(2*b.l.xhRowBytes(xhGLUMaxM)))
		if b.err != nil {
			return stUnsupported, xo
		}
	}
	rc = stUnsupported
	if xin != 0 || xout != 0 {
		rc = b.l.matmulSwiGLUXH(b.ctx, p.x, xin, kind, p.wtype, p.n, p.k, &gu[0], d.ptr, xout)
	}
	if rc == stUnsupported && xout != 0 && xin != 0 { // out not packable here (not sm_90): x still is
		xout = 0
		rc = b.l.matmulSwiGLUXH(b.ctx, p.x, xin, kind, p.wtype, p.n, p.k, &gu[0], d.ptr, 0)
	}
	if rc != stUnsupported && xout != 0 {
		xo = xhState{src: d.ptr, n: p.n, k: gu[0].m, kind: kind, buf: xout}
	}
	return rc, xo
}

// xhFor returns the packed copy of the held GEMVs' x, or 0.
func (b *Backend) xhFor() uintptr {
	p := &b.pend
	x := &b.xh
	if x.src == 0 || x.seq != b.launches || p.x != x.src || p.n != x.n || p.k != x.k || xhKind(p.wtype) != x.kind {
		return 0
	}
	return x.buf
}

// forgetXH drops the packed copy (memory may change without a launch).
func (b *Backend) forgetXH() { b.xh.src = 0 }
