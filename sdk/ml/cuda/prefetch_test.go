package cuda

import (
	"fmt"
	"strings"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// Host tests of the L2 prefetch node selection (prefetch.go) against the
// fake library of fuse_test.go: which MatMuls get a prefetch, the anchor
// (distance in launches), grouping and byte caps, and that nothing is
// prefetched outside a capture.

// withPF adds fake orch_pf_* entry points to a fake backend: marks and
// prefetch nodes go to the same log as the launches.
func withPF(t *testing.T, b *Backend, f *fakeLib, cfg l2pfConfig) {
	var marks int64
	b.l.pfInit = func(ctx uintptr) int32 { return f.add("pf_init") }
	b.l.graphBegin = func(ctx uintptr) int32 { marks = 0; return f.add("graph_begin") }
	b.l.pfMark = func(ctx uintptr, m *int64) int32 {
		marks++
		*m = marks
		return f.add("mark %d", marks)
	}
	b.l.pfL2 = func(ctx uintptr, anchor int64, ranges *pfRange, count, flags int32, added *int32) int32 {
		require.LessOrEqual(t, anchor, marks, "anchor beyond the marks")
		*added = 1
		s := fmt.Sprintf("pf anchor=%d flags=%d", anchor, flags)
		for _, r := range unsafe.Slice(ranges, count) {
			s += fmt.Sprintf(" %x/%d", r.ptr, r.bytes)
		}
		return f.add("%s", s)
	}
	require.NoError(t, b.initL2PF(cfg))
	require.Equal(t, []string{"pf_init"}, f.take())
}

func TestParseL2PF(t *testing.T) {
	c, err := parseL2PF("", "", "", "", "", "", "")
	require.NoError(t, err)
	require.Equal(t, l2pfConfig{maxBytes: defaultL2PFMaxBytes}, c, "unset: off")
	c, err = parseL2PF("2", "16", "last", "1", "stream", "8", "1")
	require.NoError(t, err)
	require.Equal(t, l2pfConfig{dist: 2, maxBytes: 16 << 20, flags: pfEvictLast | pfLines | pfDry | 8<<pfCTAsShift, afterStream: true}, c)
	c, err = parseL2PF(" 0 ", "0.5", "normal", "0", "dist", "", "0")
	require.NoError(t, err)
	require.Equal(t, l2pfConfig{maxBytes: 1 << 19}, c)
	for _, bad := range [][7]string{{"-1", "", "", "", "", ""}, {"17", "", "", "", "", ""}, {"x", "", "", "", "", ""},
		{"1", "0", "", "", "", ""}, {"1", "abc", "", "", "", ""}, {"1", "", "first", "", "", ""}, {"1", "", "", "yes", "", ""},
		{"1", "", "", "", "auto", ""}, {"1", "", "", "", "", "0"}, {"1", "", "", "", "", "256"},
		{"1", "", "", "", "", "", "2"}} {
		_, err := parseL2PF(bad[0], bad[1], bad[2], bad[3], bad[4], bad[5], bad[6])
		require.Error(t, err, "%q", bad)
	}
}

// A gpt-oss-like decode layer: norm, q/k/v (one merged launch), add, o. With
// distance d the o prefetch depends on the mark d launches before o's
// launch; q/k/v's three weights share one node.
func TestL2PFLayer(t *testing.T) {
	defer func(v bool) { fuseOps = v }(fuseOps)
	fuseOps = true
	const d, n = 64, 1
	for _, dist := range []int{1, 2, 3} {
		b, f := newFakeBackend(t)
		withPF(t, b, f, l2pfConfig{dist: dist, maxBytes: 1 << 20})
		x, h, a := fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n)
		norm := fakeT(b, ml.F32, d)
		wq, wk, wv, wo := fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, d/2), fakeT(b, ml.Q8_0, d, d/2),
			fakeT(b, ml.Q8_0, d, d)
		q, k, v, o := fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d/2, n), fakeT(b, ml.F32, d/2, n), fakeT(b, ml.F32, d, n)
		layer := func() {
			b.RMSNorm(h, x, norm, 1e-5) // launch 1 (of the layer)
			b.MatMul(q, h, wq, nil)     // q, k, v: launch 2
			b.MatMul(k, h, wk, nil)
			b.MatMul(v, h, wv, nil)
			b.Add(a, q, q)          // 3
			b.Add(a, a, q)          // 4
			b.MatMul(o, a, wo, nil) // 5 (held; launched by the next op or the capture's end)
			b.Add(x, x, o)          // 6
		}
		require.NoError(t, b.Run("g", func() { layer(); layer() }))
		log := f.take()
		for i, l := range log { // the fake's RMSNorm line: only its output matters here
			if strings.HasPrefix(l, "rmsnorm ") {
				log[i] = strings.Fields(l)[0] + " " + strings.Fields(l)[1]
			}
		}
		// Launch i of the capture is followed by "mark i"; a prefetch for the GEMV of launch g is added
		// right after that launch, before its mark, anchored at mark g-1-dist.
		var want []string
		want = append(want, "graph_begin")
		qkv := func(base int) []string {
			s := []string{fmt.Sprintf("multi x=%x n=1 k=%d [%x/%d %x/%d %x/%d]", h.ptr, d, q.ptr, d, k.ptr, d/2, v.ptr, d/2)}
			if a := int64(base + 2 - 1 - dist); a >= 1 {
				s = append(s, fmt.Sprintf("pf anchor=%d flags=0 %x/%d %x/%d %x/%d", a, wq.ptr, wq.bytes, wk.ptr, wk.bytes,
					wv.ptr, wv.bytes))
			}
			return s
		}
		for base := 0; base <= 6; base += 6 {
			want = append(want, fmt.Sprintf("rmsnorm out=%x", h.ptr), fmt.Sprintf("mark %d", base+1))
			want = append(want, qkv(base)...)
			want = append(want, fmt.Sprintf("mark %d", base+2))
			want = append(want, fmt.Sprintf("add out=%x", a.ptr), fmt.Sprintf("mark %d", base+3))
			want = append(want, fmt.Sprintf("add out=%x", a.ptr), fmt.Sprintf("mark %d", base+4))
			want = append(want, fmt.Sprintf("matmul y=%x x=%x n=1", o.ptr, a.ptr))
			if a := int64(base + 5 - 1 - dist); a >= 1 {
				want = append(want, fmt.Sprintf("pf anchor=%d flags=0 %x/%d", a, wo.ptr, wo.bytes))
			}
			want = append(want, fmt.Sprintf("mark %d", base+5))
			want = append(want, fmt.Sprintf("add out=%x", x.ptr), fmt.Sprintf("mark %d", base+6))
		}
		want = append(want, "graph_end", "graph_launch")
		require.Equal(t, want, log, "dist %d", dist)
		// The first layer's q/k/v have no mark dist launches back (anchor 1-dist < 1): three weights skipped.
		require.Equal(t, 3, b.pf.skipped, "dist %d", dist)
		require.Equal(t, 3, b.pf.nodes, "dist %d", dist)

		// Replays and eager ops add nothing.
		require.NoError(t, b.Run("g", func() { t.Fatal("replay records") }))
		layer()
		require.NoError(t, b.Sync())
		for _, l := range f.take() {
			require.NotContains(t, l, "pf ", "dist %d", dist)
			require.NotContains(t, l, "mark", "dist %d", dist)
		}
	}
}

// Caps: a weight above maxBytes, n > 8, and ranges that would pass maxBytes
// or ORCH_PF_MAX_RANGES in one node (split into more nodes).
func TestL2PFCaps(t *testing.T) {
	defer func(v bool) { fuseOps = v }(fuseOps)
	fuseOps = false // one launch per MatMul: the wants of one anchor come from separate ops
	const d = 64
	b, f := newFakeBackend(t)
	w := fakeT(b, ml.Q8_0, d, d) // 64 rows x 68 bytes = 4352 bytes
	big := fakeT(b, ml.Q8_0, d, 4*d)
	withPF(t, b, f, l2pfConfig{dist: 1, maxBytes: int64(w.bytes) * 2, flags: pfEvictLast})
	x, y := fakeT(b, ml.F32, d, 1), fakeT(b, ml.F32, 4*d, 1)
	y1 := fakeT(b, ml.F32, d, 1)
	require.NoError(t, b.Run("caps", func() {
		b.Add(x, x, x)           // 1
		b.Add(x, x, x)           // 2
		b.MatMul(y, x, big, nil) // 3: too big, no prefetch
		b.l2pfWant(w, x, 9)      // n = 9: no prefetch
		b.MatMul(y1, x, w, nil)  // 4: prefetched, anchored at mark 2
	}))
	var pfs []string
	for _, l := range f.take() {
		if len(l) > 3 && l[:3] == "pf " {
			pfs = append(pfs, l)
		}
	}
	require.Equal(t, []string{fmt.Sprintf("pf anchor=%d flags=1 %x/%d", 2, w.ptr, w.bytes)}, pfs)

	// Grouping: wants of one anchor share a node up to maxBytes / 4 ranges; a repeated range is added once.
	b.pf.want = nil
	b.capturing = true
	b.pf.marks = 3
	ws := []*tensor{fakeT(b, ml.Q8_0, d, d/2), fakeT(b, ml.Q8_0, d, d/2), fakeT(b, ml.Q8_0, d, d/2),
		fakeT(b, ml.Q8_0, d, d/2), fakeT(b, ml.Q8_0, d, d/2)}
	for _, wt := range ws {
		b.l2pfWant(wt, x, 1)
	}
	b.l2pfWant(ws[4], x, 1)
	b.pf.cfg.maxBytes = 1 << 20
	b.l2pfIssue()
	b.capturing = false
	one := func(ts ...*tensor) string {
		s := "pf anchor=2 flags=1"
		for _, wt := range ts {
			s += fmt.Sprintf(" %x/%d", wt.ptr, wt.bytes)
		}
		return s
	}
	require.Equal(t, []string{one(ws[0], ws[1], ws[2], ws[3]), one(ws[4])}, f.take(), "4 ranges a node, the repeat once")

	b.capturing = true
	b.pf.cfg.maxBytes = int64(ws[0].bytes) * 2
	for _, wt := range ws[:3] {
		b.l2pfWant(wt, x, 1)
	}
	b.l2pfIssue()
	b.capturing = false
	require.Equal(t, []string{one(ws[0], ws[1]), one(ws[2])}, f.take(), "split at maxBytes")
}

// Without the library's entry points (an older liborch_cuda) prefetching is off, with an error.
func TestL2PFMissingLibrary(t *testing.T) {
	b, _ := newFakeBackend(t)
	err := b.initL2PF(l2pfConfig{dist: 1, maxBytes: 1 << 20})
	require.ErrorIs(t, err, ErrUnsupported)
	require.Zero(t, b.pf.cfg.dist)
	require.NoError(t, b.initL2PF(l2pfConfig{}), "off needs nothing")
}

// ORCH_CUDA_L2PF_MODE=stream: the anchor is never before the last MatMul /
// MoE launch, and a GEMV right after one gets no prefetch.
func TestL2PFStreamMode(t *testing.T) {
	defer func(v bool) { fuseOps = v }(fuseOps)
	fuseOps = true
	const d, n = 64, 1
	b, f := newFakeBackend(t)
	withPF(t, b, f, l2pfConfig{dist: 3, maxBytes: 1 << 20, afterStream: true})
	x, h, a := fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n)
	norm := fakeT(b, ml.F32, d)
	wq, wk, wo, w2 := fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, d), fakeT(b, ml.Q8_0, d, d)
	q, k, o, o2 := fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n), fakeT(b, ml.F32, d, n)
	layer := func() {
		b.RMSNorm(h, x, norm, 1e-5) // 1, 7
		b.MatMul(q, h, wq, nil)     // q, k: 2, 8 (streams)
		b.MatMul(k, h, wk, nil)
		b.Add(a, q, q)          // 3, 9
		b.Add(a, a, k)          // 4, 10
		b.MatMul(o, a, wo, nil) // 5, 11 (streams)
		b.Add(x, x, o)          // 6, 12
	}
	require.NoError(t, b.Run("g", func() {
		layer()
		layer()
		b.MatMul(o2, o, w2, nil) // 13: right after the add
		b.MatMul(h, o2, wq, nil) // 14: right after a streaming launch (the held w2's): no prefetch
		b.Add(x, x, h)
	}))
	var pfs []string
	for _, l := range f.take() {
		if len(l) > 3 && l[:3] == "pf " {
			pfs = append(pfs, l)
		}
	}
	p := func(anchor int, ws ...*tensor) string {
		s := fmt.Sprintf("pf anchor=%d flags=0", anchor)
		for _, w := range ws {
			s += fmt.Sprintf(" %x/%d", w.ptr, w.bytes)
		}
		return s
	}
	require.Equal(t, []string{
		p(2, wo),     // o of layer 1: max(4-3, q/k at 2) = 2: overlaps the two adds
		p(5, wq, wk), // q/k of layer 2: max(7-3, o at 5) = 5: overlaps the add and the norm
		p(8, wo),     // o of layer 2
		p(11, w2),    // w2: max(12-3, o at 11) = 11
	}, pfs)
	require.Equal(t, 3, b.pf.skipped, "q/k of layer 1 (no anchor yet), wq of launch 14")
}
