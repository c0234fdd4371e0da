package cuda

import (
	"os"

	"github.com/llama-orch/orch/sdk/ml"
)

// fuseRowsNorm (session 14; ORCH_CUDA_ROWS_NORM=0 turns it off, as does
// ORCH_CUDA_FUSE=0): a plain Embed (a row gather: the token's embedding rows,
// or the runner's gather of the output rows from the last hidden state) is
// held back; when the next op is an RMSNorm of exactly its output (same
// pointer and row count, no residual add: Hidden's layer-0 attention norm,
// Head's in-place output norm), both become one orch_get_rows_rmsnorm launch
// (cuda/src/rowsnorm.cu: one CTA per row, both outputs bit-identical to the
// two kernels). Each pair was two one-CTA kernels back to back on the decode
// step's critical path. In place (dst == x) only the normalised rows are
// written, as the two launches leave them. Anything else launches the held
// Embed first, as without the fold (flushRows from flush); a row view
// (Rows: the runner's head takes one between the gather and the norm)
// launches nothing and keeps it held (getKeepRows).
var fuseRowsNorm = os.Getenv("ORCH_CUDA_ROWS_NORM") != "0"

// rowsNormMaxDim: orch_get_rows_rmsnorm's widest row (norm.cu's register
// kernel: 32 elements per thread of 256).
const rowsNormMaxDim = 8192

// heldRows is a held Embed(dst, table, ids, false), validated.
type heldRows struct {
	on         bool
	d          *tensor
	table, ids uintptr
	tt         int32
	ts, is     span // the table's and the ids' memory
	n, dim     int64
}

// rowsState is the backend's held Embed. hooked: flush calls flushRows
// (nothing is held before it does, so an op that flushes can never pass a
// held Embed).
type rowsState struct {
	hooked bool
	e      heldRows
}

func (b *Backend) rows() *rowsState { return &b.rn }

// flushRows launches a held Embed as the Embed op would have. flush calls it
// first (a held Embed is never held with anything else: holdRows flushes
// before holding and every later op's operand lookup flushes).
func (b *Backend) flushRows() {
	s := b.rows()
	s.hooked = true
	if !s.e.on {
		return
	}
	e := s.e
	s.e = heldRows{}
	b.call("embed", b.l.getRows(b.ctx, e.d.ptr, e.table, e.tt, e.ids, e.n, e.dim, 0))
}

// getKeepRows is get for a view (Rows): it launches what flush launches but
// keeps a held Embed held (a view launches nothing).
func (b *Backend) getKeepRows(t ml.Tensor) (*tensor, error) {
	s := b.rows()
	e := s.e
	s.e = heldRows{}
	ct, err := b.get(t)
	s.e = e
	return ct, err
}

// holdRows holds the validated Embed(d, tb, ids, false) of n rows of dim for
// foldRowsNorm and reports whether it did; false: the caller launches it.
func (b *Backend) holdRows(d, tb, id *tensor, dim int) bool {
	s := b.rows()
	if !fuseOps || !fuseRowsNorm || !s.hooked || b.l.getRowsRMSNorm == nil || b.err != nil || b.holdFlush ||
		id.n < 1 || dim > rowsNormMaxDim || dim%32 != 0 {
		return false
	}
	b.flush() // nothing else is held while the Embed is
	if b.err != nil {
		return false
	}
	s.e = heldRows{on: true, d: d, table: tb.ptr, ids: id.ptr, tt: int32(tb.dt), ts: span{tb.ptr, uintptr(tb.bytes)},
		is: span{id.ptr, uintptr(id.bytes)}, n: int64(id.n), dim: int64(dim)}
	return true
}

// foldRowsNorm runs the held Embed and RMSNorm(dst, x, w, eps) as one
// orch_get_rows_rmsnorm call when x is exactly the Embed's output and the
// library takes it, and reports whether it did; false: nothing launched (the
// caller's norm flushes the Embed and runs as without it). Operands are
// checked here without lookups (a lookup flushes); anything unusual, errors
// included, is left to the norm's own checks.
func (b *Backend) foldRowsNorm(dst, x, w ml.Tensor, eps float32) bool {
	s := b.rows()
	e := &s.e
	if !e.on || b.err != nil || b.holdFlush {
		return false
	}
	d, xx, ww := b.own(dst), b.own(x), b.own(w)
	if d == nil || xx == nil || ww == nil || xx.dt != ml.F32 || d.dt != ml.F32 || ww.dt != ml.F32 ||
		xx.ptr != e.d.ptr || xx.n != e.d.n || xx.shape[0] != int(e.dim) || d.n != xx.n || ww.n != int(e.dim) {
		return false
	}
	ds, xs, ws := span{d.ptr, uintptr(d.bytes)}, span{xx.ptr, uintptr(xx.bytes)}, span{ww.ptr, uintptr(ww.bytes)}
	inPlace := d.ptr == xx.ptr && d.bytes == xx.bytes
	if !inPlace && ds.overlaps(xs) {
		return false
	}
	for _, o := range []span{ds, xs} {
		if o.overlaps(e.ts) || o.overlaps(e.is) || o.overlaps(ws) || b.heldState(o) {
			return false
		}
	}
	xo := xx.ptr
	if inPlace {
		xo = 0
	}
	rc := b.l.getRowsRMSNorm(b.ctx, xo, d.ptr, e.table, e.tt, e.ids, e.n, e.dim, ww.ptr, eps)
	if rc == stUnsupported {
		return false
	}
	*e = heldRows{}
	b.call("rows_norm", rc)
	return true
}

// own is t as this backend's live tensor, or nil (no lookup: nothing flushed).
func (b *Backend) own(t ml.Tensor) *tensor {
	ct, ok := t.(*tensor)
	if !ok || ct == nil || ct.be != b || ct.ptr == 0 || len(ct.shape) == 0 {
		return nil
	}
	return ct
}

// heldState reports whether memory o holds state another fold tracks (h
// holding a norm fold's xt, q / k a folded Attend left unrotated): the norm's
// own lookups would act on it first, so the fold leaves such operands alone.
func (b *Backend) heldState(o span) bool {
	if b.xt.on && o.overlaps(b.xt.h) {
		return true
	}
	u := &b.pend.unrot
	if !u.on {
		return false
	}
	for i, p := range u.x {
		if p != 0 && o.overlaps(u.spans[i]) {
			return true
		}
	}
	return false
}
