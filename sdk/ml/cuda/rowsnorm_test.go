package cuda

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// Host test of the gather + RMSNorm fold (rowsnorm.go) against the fake
// library of fuse_test.go: Hidden's Embed -> RMSNorm(h, x) and Head's
// in-place RMSNorm of the gathered rows become one orch_get_rows_rmsnorm
// call; the plain launches for an accumulating Embed, a norm of something
// else, the switch off, the library declining, before flush calls
// flushRows (nothing held), and a host read in between.
func TestRowsNormFold(t *testing.T) {
	defer func(v, rn bool) { fuseOps, fuseRowsNorm = v, rn }(fuseOps, fuseRowsNorm)
	fuseOps, fuseRowsNorm = true, true
	b, f := newFakeBackend(t)
	rc := int32(stOK)
	b.l.getRows = func(ctx, out, table uintptr, ttype int32, ids uintptr, n, dim int64, acc int32) int32 {
		return f.add("get_rows out=%x n=%d acc=%d", out, n, acc)
	}
	b.l.getRowsRMSNorm = func(ctx, xo, ho, table uintptr, ttype int32, ids uintptr, n, dim int64, w uintptr,
		eps float32) int32 {
		if rc != stOK {
			return rc
		}
		return f.add("rows_norm x=%x h=%x n=%d dim=%d w=%x", xo, ho, n, dim, w)
	}
	b.l.memcpyD2H = func(ctx uintptr, dst *byte, src uintptr, bytes int64) int32 { return f.add("d2h %x", src) }
	const d, vocab, n = 64, 10, 3
	tok := fakeT(b, ml.Q8_0, d, vocab)
	ids := fakeT(b, ml.I32, n)
	x, h, y := fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n)
	w := fakeT(b, ml.F32, d)
	gather := func() string { return fmt.Sprintf("get_rows out=%x n=%d acc=0", x.ptr, n) }
	rms := func(out, xx uintptr) string { return fmt.Sprintf("rmsnorm out=%x x=%x add=0", out, xx) }

	// flush does not call flushRows yet (fuse.go): nothing is held.
	s := b.rows()
	s.hooked = false
	require.NoError(t, b.Sync())
	hooked := s.hooked
	s.hooked = true // as after the first flush with the hook
	b.Embed(x, tok, ids, false)
	b.RMSNorm(h, x, w, 1e-5)
	require.Equal(t, []string{"sync", fmt.Sprintf("rows_norm x=%x h=%x n=%d dim=%d w=%x", x.ptr, h.ptr, n, d, w.ptr)},
		f.take())

	// In place (Head): x not written apart.
	b.Embed(x, tok, ids, false)
	b.RMSNorm(x, x, w, 1e-5)
	require.Equal(t, []string{fmt.Sprintf("rows_norm x=0 h=%x n=%d dim=%d w=%x", x.ptr, n, d, w.ptr)}, f.take())

	// Accumulating: not held.
	b.Embed(x, tok, ids, true)
	b.RMSNorm(h, x, w, 1e-5)
	require.Equal(t, []string{fmt.Sprintf("get_rows out=%x n=%d acc=1", x.ptr, n), rms(h.ptr, x.ptr)}, f.take())

	// Switch off.
	fuseRowsNorm = false
	b.Embed(x, tok, ids, false)
	b.RMSNorm(h, x, w, 1e-5)
	require.Equal(t, []string{gather(), rms(h.ptr, x.ptr)}, f.take())
	fuseRowsNorm = true

	if !hooked {
		t.Log("flush does not call flushRows (fuse.go hook not in): the flush cases are not run")
		return
	}
	// A norm of other rows, a norm whose output overlaps its x partly, the library declining, a host read:
	// the Embed first, then as without the fold.
	b.Embed(x, tok, ids, false)
	b.RMSNorm(h, y, w, 1e-5)
	require.Equal(t, []string{gather(), rms(h.ptr, y.ptr)}, f.take())
	rc = stUnsupported
	b.Embed(x, tok, ids, false)
	b.RMSNorm(h, x, w, 1e-5)
	require.Equal(t, []string{gather(), rms(h.ptr, x.ptr)}, f.take())
	rc = stOK
	b.Embed(x, tok, ids, false)
	require.NoError(t, b.ReadF32(x, make([]float32, d*n)))
	require.Equal(t, []string{gather(), fmt.Sprintf("d2h %x", x.ptr)}, f.take())
	b.Embed(x, tok, ids, false)
	b.Add(y, y, y)
	require.Equal(t, []string{gather(), fmt.Sprintf("add out=%x", y.ptr)}, f.take())
	// A row view in between (the runner's head) keeps the Embed held where Rows uses getKeepRows.
	b.Embed(x, tok, ids, false)
	v, err := b.Rows(x, 0, n)
	require.NoError(t, err)
	b.RMSNorm(v, v, w, 1e-5)
	if log := f.take(); len(log) == 2 {
		t.Log("Rows does not use getKeepRows (backend.go): the head's view launches the gather")
		require.Equal(t, []string{gather(), rms(x.ptr, x.ptr)}, log)
	} else {
		require.Equal(t, []string{fmt.Sprintf("rows_norm x=0 h=%x n=%d dim=%d w=%x", x.ptr, n, d, w.ptr)}, log)
	}
}
