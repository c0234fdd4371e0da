package cuda

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Op timing (ORCH_CUDA_OPTIME=FILE): where the device time of a real run goes,
// op by op, without a profiler. Nsight Systems cannot import on the GPU
// machines we get, and Nsight Compute serialises every kernel (a decode of a
// few tokens ran past five minutes), so the backend times itself: after every
// op it records a device event, and the time between two consecutive events
// is charged to the later op. After each Sync the first op only becomes the
// new baseline (an event recorded on an idle stream is stamped at once, so
// the host's time before the next launch would be charged to that op): the
// first op of each eager step is not timed, and the table counts those ops.
//
// Captured steps (decode graphs) stay graphs: the events are recorded into
// the graph as event nodes (one dedicated event per op, plus one at the
// graph's start), and after every replay the node-to-node times are charged
// to the ops, under "graph:" names so that they are not mixed with eager
// ops. An event node between two kernels replaces their programmatic
// (PDL) edge by a full one, so graph rows show each op without the overlap
// PDL gives: their sum is a little above the untimed step. The table (op, launches, total, mean, share) is written
// to FILE ("%p" in it becomes the process id) at most every 50 ms and when
// the backend closes.
//
// What the numbers mean: an op's time is from the end of the op before it to
// its own end on the GPU. For big ops (prefill GEMMs, attention over long
// rows) that is the kernel time. For small ops, when the host launches slower
// than the GPU runs them (eager decode), it includes the host's launch gap: an
// upper bound. Ops merged by fuse.go count once, under the merged op's name.
// Timing costs events and an event synchronisation every 512 ops: do not
// compare a timed run's tok/s with an untimed one.
type opTimer struct {
	path    string
	base    uintptr // event the next op's time is measured from (0: none yet)
	pending []timedOp
	pool    []uintptr
	agg     map[string]*opStat
	written time.Time
	skipped int  // first ops after a Sync: baselines, not timed
	rebase  bool // the next op becomes the baseline
	// captured steps: the event nodes of each graph (by Run key), in order;
	// capture collects the nodes of the graph being recorded.
	graphs  map[string][]timedOp
	capture []timedOp
	replays int
	err     error // first failure; timing stops, the run goes on
}

type timedOp struct {
	op string
	ev uintptr
}

type opStat struct {
	n     int
	total float64 // ms
}

const opTimerBatch = 512

func newOpTimer() *opTimer {
	p := os.Getenv("ORCH_CUDA_OPTIME")
	if p == "" {
		return nil
	}
	p = strings.ReplaceAll(p, "%p", strconv.Itoa(os.Getpid()))
	return &opTimer{path: p, agg: map[string]*opStat{}, graphs: map[string][]timedOp{}}
}

func (t *opTimer) event(b *Backend) uintptr {
	if n := len(t.pool); n > 0 {
		ev := t.pool[n-1]
		t.pool = t.pool[:n-1]
		return ev
	}
	var ev uintptr
	if rc := b.l.eventCreate(&ev); rc != stOK {
		t.err = b.l.status("event_create", rc)
		return 0
	}
	return ev
}

// mark records the end of op on the stream.
func (t *opTimer) mark(b *Backend, op string) {
	if t.err != nil {
		return
	}
	if b.capturing {
		t.captureMark(b, "graph:"+op)
		return
	}
	ev := t.event(b)
	if ev == 0 {
		return
	}
	if rc := b.l.eventRecord(b.ctx, ev); rc != stOK {
		t.err = b.l.status("event_record", rc)
		return
	}
	if t.base == 0 || t.rebase { // the first op of the run / of a step: no start to measure from
		if t.base != 0 {
			t.pool = append(t.pool, t.base)
		}
		t.base, t.rebase = ev, false
		t.skipped++
		return
	}
	t.pending = append(t.pending, timedOp{op, ev})
	if len(t.pending) >= opTimerBatch {
		t.settle(b)
	}
}

// captureMark records an event node into the graph being captured; graph
// events are never reused (the graph refers to them on every replay).
func (t *opTimer) captureMark(b *Backend, op string) {
	var ev uintptr
	if rc := b.l.eventCreate(&ev); rc != stOK {
		t.err = b.l.status("event_create", rc)
		return
	}
	if rc := b.l.eventRecord(b.ctx, ev); rc != stOK {
		t.err = b.l.status("event_record", rc)
		return
	}
	t.capture = append(t.capture, timedOp{op, ev})
}

// beginCapture starts a graph's node list with its start event.
func (t *opTimer) beginCapture(b *Backend) {
	t.capture = nil
	if t.err == nil {
		t.captureMark(b, "")
	}
}

// endCapture keeps the node list of the graph just captured under key
// (dropped with the graph when the capture failed).
func (t *opTimer) endCapture(b *Backend, key string, ok bool) {
	if ok && len(t.capture) > 1 {
		t.graphs[key] = t.capture
	} else {
		for _, n := range t.capture {
			b.l.eventDestroy(n.ev)
		}
	}
	t.capture = nil
}

// replayed charges one replay of graph key (waits for it to finish).
func (t *opTimer) replayed(b *Backend, key string) {
	nodes := t.graphs[key]
	if t.err != nil || len(nodes) < 2 {
		return
	}
	t.replays++
	for i := 1; i < len(nodes); i++ {
		var ms float32
		if rc := b.l.eventElapsed(nodes[i-1].ev, nodes[i].ev, &ms); rc != stOK {
			t.err = b.l.status("event_elapsed", rc)
			return
		}
		t.charge(nodes[i].op, ms)
	}
	t.writeSoon()
}

// forgetGraphs drops the node lists (the graphs were destroyed).
func (t *opTimer) forgetGraphs(b *Backend) {
	for k, nodes := range t.graphs {
		for _, n := range nodes {
			b.l.eventDestroy(n.ev)
		}
		delete(t.graphs, k)
	}
}

func (t *opTimer) charge(op string, ms float32) {
	s := t.agg[op]
	if s == nil {
		s = &opStat{}
		t.agg[op] = s
	}
	s.n++
	s.total += float64(ms)
}

// settle waits for the pending events and charges their deltas.
func (t *opTimer) settle(b *Backend) {
	for _, p := range t.pending {
		if t.err != nil {
			break
		}
		var ms float32
		if rc := b.l.eventElapsed(t.base, p.ev, &ms); rc != stOK {
			t.err = b.l.status("event_elapsed", rc)
			break
		}
		t.charge(p.op, ms)
		t.pool = append(t.pool, t.base)
		t.base = p.ev
	}
	t.pending = t.pending[:0]
	t.writeSoon()
}

// idle is called after the stream drained (Sync): the next op starts a new
// measurement instead of being measured from the last op before the host
// went away.
func (t *opTimer) idle(b *Backend) {
	t.settle(b)
	t.rebase = true
}

func (t *opTimer) close(b *Backend) {
	t.settle(b)
	t.write()
	if t.base != 0 {
		t.pool = append(t.pool, t.base)
	}
	for _, ev := range t.pool {
		b.l.eventDestroy(ev)
	}
	t.pool, t.base = nil, 0
	t.forgetGraphs(b)
}

// table renders the totals, largest first.
func (t *opTimer) table() string {
	type row struct {
		op string
		s  opStat
	}
	var rows []row
	var total float64
	for op, s := range t.agg {
		rows = append(rows, row{op, *s})
		total += s.total
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].s.total > rows[j].s.total })
	var sb strings.Builder
	sb.WriteString("| op | launches | total ms | mean µs | share |\n|---|---:|---:|---:|---:|\n")
	for _, r := range rows {
		share := 0.0
		if total > 0 {
			share = 100 * r.s.total / total
		}
		fmt.Fprintf(&sb, "| %s | %d | %.3f | %.2f | %.1f%% |\n", r.op, r.s.n, r.s.total, 1000*r.s.total/float64(r.s.n), share)
	}
	fmt.Fprintf(&sb, "\ntotal %.3f ms over %d ops; %d ops not timed (the first after each sync)", total, func() (n int) {
		for _, r := range rows {
			n += r.s.n
		}
		return
	}(), t.skipped)
	if t.replays > 0 {
		var g float64
		for _, r := range rows {
			if strings.HasPrefix(r.op, "graph:") {
				g += r.s.total
			}
		}
		fmt.Fprintf(&sb, "; %d graph replays, %.3f ms of graph ops per replay", t.replays, g/float64(t.replays))
	}
	if t.err != nil {
		fmt.Fprintf(&sb, "; timing stopped: %v", t.err)
	}
	sb.WriteString("\n")
	return sb.String()
}

// writeSoon writes the table if the last write is 50 ms old: the adapter may
// be killed without a Close.
func (t *opTimer) writeSoon() {
	if time.Since(t.written) > 50*time.Millisecond {
		t.write()
	}
}

func (t *opTimer) write() {
	t.written = time.Now()
	_ = os.WriteFile(t.path, []byte(t.table()), 0o644) // best effort: a diagnostic, never fails the run
}
