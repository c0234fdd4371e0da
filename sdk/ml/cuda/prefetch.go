package cuda

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// L2 prefetch of upcoming decode weights inside a captured graph (issue 7,
// session 6; cuda/src/prefetch.cu). One-token decode is a dependent chain of
// small kernels, and some links (decode attention at short depth, RoPE + KV
// write, the norms) move almost no DRAM bytes. While a step is captured, the
// backend marks every library launch (orch_pf_mark) and, for a small-n MatMul
// whose weight fits the cap, adds a prefetch node for that weight that
// depends on the launch `dist` launches before the GEMV (orch_pf_l2): it runs
// concurrently with the dist launches before the GEMV and has no successors,
// so it delays nothing and changes no result bit.
//
// ORCH_CUDA_L2PF=<dist> (launches; 0 or unset = off, the default until
// measured; at most maxL2PFDist), ORCH_CUDA_L2PF_MAX_MB (largest weight, and
// bytes per prefetch node, default 32 MiB: gpt-oss q/k/v 15.7 MB and attention
// out 12.5 MB, Llama-8B q/k/v 26.7 MB and out 17.8 MB; not the 62 MB Llama
// FFN matrices or an LM head, which would not stay in the 50 MB L2 anyway),
// ORCH_CUDA_L2PF_POLICY=last (L2::evict_last on the prefetched lines),
// ORCH_CUDA_L2PF_LINES=1 (prefetch.global.L2 per line instead of bulk
// prefetches), ORCH_CUDA_L2PF_MODE=stream (the anchor is also never before
// the last weight-streaming launch, a MatMul or MoE: the prefetch then
// overlaps only the links that leave DRAM idle — with dist 3, gpt-oss's
// attention-out weight loads during RoPE + attention and q/k/v during the
// norm after the MoE — instead of competing with a GEMV's or the MoE's
// weight stream and being evicted by it), ORCH_CUDA_L2PF_CTAS (most CTAs of
// 128 threads a prefetch node uses, 1..255, default 64: each issues one 16 KB
// bulk prefetch per thread and exits, but needs a free SM slot while the
// kernels it overlaps run), ORCH_CUDA_L2PF_DRY=1 (the nodes, but their
// kernel issues nothing: what the graph fork alone costs). Outside a capture
// nothing is prefetched.
//
// Why marks and a side stream instead of adding graph nodes directly: the
// graph-node query APIs (cudaStreamGetCaptureInfo, cudaGraphNodeGetDependencies)
// changed signature between CUDA 12 and 13; events and a forked stream are
// the documented, stable way to branch a stream capture.

// maxL2PFDist is the largest distance (prefetch.cu keeps the last 32 marks).
const maxL2PFDist = 16

// maxL2PFTokens is the largest n whose MatMul gets a prefetch (decode).
const maxL2PFTokens = 8

// orch_pf_* flags.
const (
	pfEvictLast = 1
	pfLines     = 2
	pfDry       = 4
	pfCTAsShift = 8 // ORCH_PF_CTAS_SHIFT: flags bits 8..15 = most CTAs
	pfMaxRanges = 4 // ORCH_PF_MAX_RANGES
)

// l2pfConfig is the prefetch setting; dist 0 = off.
type l2pfConfig struct {
	dist        int
	maxBytes    int64
	flags       int32
	afterStream bool // ORCH_CUDA_L2PF_MODE=stream
}

const defaultL2PFMaxBytes = 32 << 20

// parseL2PF reads the ORCH_CUDA_L2PF* values (empty = default).
func parseL2PF(dist, maxMB, policy, lines, mode, ctas, dry string) (l2pfConfig, error) {
	c := l2pfConfig{maxBytes: defaultL2PFMaxBytes}
	if s := strings.TrimSpace(dist); s != "" {
		d, err := strconv.Atoi(s)
		if err != nil || d < 0 || d > maxL2PFDist {
			return l2pfConfig{}, fmt.Errorf("ORCH_CUDA_L2PF=%q: want a distance in launches, 0..%d", dist, maxL2PFDist)
		}
		c.dist = d
	}
	if s := strings.TrimSpace(maxMB); s != "" {
		mb, err := strconv.ParseFloat(s, 64)
		if err != nil || mb <= 0 || mb > 1024 {
			return l2pfConfig{}, fmt.Errorf("ORCH_CUDA_L2PF_MAX_MB=%q: want MiB in (0, 1024]", maxMB)
		}
		c.maxBytes = int64(mb * (1 << 20))
	}
	switch strings.TrimSpace(policy) {
	case "", "normal":
	case "last":
		c.flags |= pfEvictLast
	default:
		return l2pfConfig{}, fmt.Errorf("ORCH_CUDA_L2PF_POLICY=%q: want normal or last", policy)
	}
	switch strings.TrimSpace(lines) {
	case "", "0":
	case "1":
		c.flags |= pfLines
	default:
		return l2pfConfig{}, fmt.Errorf("ORCH_CUDA_L2PF_LINES=%q: want 0 or 1", lines)
	}
	switch strings.TrimSpace(mode) {
	case "", "dist":
	case "stream":
		c.afterStream = true
	default:
		return l2pfConfig{}, fmt.Errorf("ORCH_CUDA_L2PF_MODE=%q: want dist or stream", mode)
	}
	if s := strings.TrimSpace(ctas); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 255 {
			return l2pfConfig{}, fmt.Errorf("ORCH_CUDA_L2PF_CTAS=%q: want 1..255", ctas)
		}
		c.flags |= int32(n) << pfCTAsShift
	}
	switch strings.TrimSpace(dry) {
	case "", "0":
	case "1":
		c.flags |= pfDry
	default:
		return l2pfConfig{}, fmt.Errorf("ORCH_CUDA_L2PF_DRY=%q: want 0 or 1", dry)
	}
	return c, nil
}

// l2pfEnv is read once; a bad value turns prefetching off with a line on
// stderr (New reports it), as a bad ORCH_CUDA_* version falls back.
var l2pfEnv, l2pfEnvErr = parseL2PF(os.Getenv("ORCH_CUDA_L2PF"), os.Getenv("ORCH_CUDA_L2PF_MAX_MB"),
	os.Getenv("ORCH_CUDA_L2PF_POLICY"), os.Getenv("ORCH_CUDA_L2PF_LINES"), os.Getenv("ORCH_CUDA_L2PF_MODE"),
	os.Getenv("ORCH_CUDA_L2PF_CTAS"), os.Getenv("ORCH_CUDA_L2PF_DRY"))

// pfRange mirrors orch_pf_range.
type pfRange struct {
	ptr   uintptr
	bytes int64
}

// pfWant is a weight to prefetch, anchored at a mark (1-based; < 1: none).
type pfWant struct {
	r      pfRange
	anchor int64
}

// prefetcher is the Backend's prefetch state.
type prefetcher struct {
	cfg   l2pfConfig
	ready bool  // orch_pf_init succeeded (the library has the entry points)
	marks int64 // launches marked in this capture
	// lastStream: the mark of the last weight-streaming launch (MatMul, MoE) in this capture.
	lastStream int64
	want       []pfWant
	// Counted over the backend's life (tests, perf): nodes added, wants
	// without a node (no anchor yet: the first launches of a capture).
	nodes, skipped int
}

// initL2PF applies cfg (New: the environment; tests: their own), creating
// the library's prefetch state the first time a distance is set.
func (b *Backend) initL2PF(cfg l2pfConfig) error {
	b.pf.cfg = cfg
	if cfg.dist == 0 || b.pf.ready {
		return nil
	}
	if b.l.pfInit == nil || b.l.pfMark == nil || b.l.pfL2 == nil {
		b.pf.cfg.dist = 0
		return fmt.Errorf("cuda l2 prefetch: %w: %s has no orch_pf_* entry points", ErrUnsupported, b.l.path)
	}
	if err := b.l.status("pf_init", b.l.pfInit(b.ctx)); err != nil {
		b.pf.cfg.dist = 0
		return err
	}
	b.pf.ready = true
	return nil
}

// l2pfOn reports whether launches are marked and prefetches added now.
func (b *Backend) l2pfOn() bool { return b.capturing && b.pf.ready && b.pf.cfg.dist > 0 }

// l2pfBegin starts a capture's count (after orch_graph_begin).
func (b *Backend) l2pfBegin() {
	b.pf.marks, b.pf.lastStream = 0, 0
	b.pf.want = b.pf.want[:0]
}

// l2pfWant asks for w's bytes in L2 before the MatMul of x about to be
// launched (n tokens): anchored dist launches before it, when n and the size
// qualify.
func (b *Backend) l2pfWant(w, x *tensor, n int) {
	if !b.l2pfOn() || n < 1 || n > maxL2PFTokens || int64(w.bytes) > b.pf.cfg.maxBytes || w.bytes <= 0 {
		return
	}
	// An op held back for merging (fuse.go) that this MatMul will not merge
	// with launches before it: count it (a held MatMul streams weights).
	marks, last := b.pf.marks, b.pf.lastStream
	if p := &b.pend; p.rope > 0 || (p.mm > 0 && (p.x != x.ptr || p.n != int64(n) || p.wtype != int32(w.dt))) {
		marks++
		if p.mm > 0 {
			last = marks
		}
	}
	anchor := marks - int64(b.pf.cfg.dist)
	if b.pf.cfg.afterStream && last > anchor {
		anchor = last
		if anchor >= marks { // the launch right before streams weights: nothing to overlap
			b.pf.skipped++
			return
		}
	}
	b.pf.want = append(b.pf.want, pfWant{r: pfRange{ptr: w.ptr, bytes: int64(w.bytes)}, anchor: anchor})
}

// streamsWeights reports whether a launch of op reads a weight matrix from
// DRAM (the ops whose names start so: matmul, matmul_multi, moe, ...).
func streamsWeights(op string) bool {
	return strings.HasPrefix(op, "matmul") || strings.HasPrefix(op, "moe")
}

// l2pfLaunched runs after every successful library launch while capturing:
// adds the prefetch nodes asked for so far (their anchors are earlier marks,
// so the node's place in the graph does not depend on when it is added),
// then marks this launch.
func (b *Backend) l2pfLaunched(op string) {
	if !b.l2pfOn() {
		return
	}
	b.l2pfIssue()
	var m int64
	if err := b.l.status("pf_mark ("+op+")", b.l.pfMark(b.ctx, &m)); err != nil {
		b.fail(err)
		return
	}
	// The library counts only while the stream really captures (not after
	// the capture was invalidated, which orch_graph_end then reports).
	b.pf.marks = m
	if streamsWeights(op) {
		b.pf.lastStream = m
	}
}

// l2pfIssue adds what is wanted: consecutive wants of one anchor share a
// node (q, k and v of a layer), up to pfMaxRanges ranges and maxBytes.
func (b *Backend) l2pfIssue() {
	w := b.pf.want
	b.pf.want = b.pf.want[:0]
	for i := 0; i < len(w); {
		if w[i].anchor < 1 {
			b.pf.skipped++
			i++
			continue
		}
		var rs [pfMaxRanges]pfRange
		cnt, bytes := 0, int64(0)
		j := i
		for ; j < len(w) && w[j].anchor == w[i].anchor && cnt < pfMaxRanges && bytes+w[j].r.bytes <= b.pf.cfg.maxBytes; j++ {
			if !hasRange(rs[:cnt], w[j].r) {
				rs[cnt] = w[j].r
				cnt++
				bytes += w[j].r.bytes
			}
		}
		var added int32
		if err := b.l.status("pf_l2", b.l.pfL2(b.ctx, w[i].anchor, &rs[0], int32(cnt), b.pf.cfg.flags, &added)); err != nil {
			b.fail(err)
			return
		}
		if added != 0 {
			b.pf.nodes++
		} else {
			b.pf.skipped++
		}
		i = j
	}
}

func hasRange(rs []pfRange, r pfRange) bool {
	for _, x := range rs {
		if x == r {
			return true
		}
	}
	return false
}

// l2pfEnd drops wants whose MatMul never launched (it failed) before the
// capture ends.
func (b *Backend) l2pfEnd() {
	b.pf.skipped += len(b.pf.want)
	b.pf.want = b.pf.want[:0]
}
