package cuda

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
)

// Graph gap timing (ORCH_CUDA_GAPTIME=FILE, "%p" = the process id): how long
// the GPU sits idle between two replayed decode graphs, i.e. what the host
// costs a step (reading the last step's tokens, the engine's bookkeeping,
// the next step's input upload and graph launch). Around every replay the
// backend records one event before the launch (stamped when the stream
// reaches it: the launch's arrival, the stream being idle or busy with the
// step's input upload) and one after (the graph's end). A replay's gap is
// from the previous replay's end event to its own start event, its busy time
// from its start event to its end event. Gaps over 2 ms (between requests)
// are counted apart. The summary (replays, busy and gap mean / p50 / p90 in
// µs) is written every 256 replays and at Close. Costs two events a step and no synchronisation:
// elapsed times are read two replays late, once their events have completed (with steps launched
// ahead, nn.Runner queues replay i+1 before it reads replay i's tokens: replay i-1 may still run).
type gapTimer struct {
	path      string
	ev        [4][2]uintptr // rotating (start, end) pairs: replay i uses ev[i % 4]
	i         int           // replays so far
	busy, gap []float64     // µs
	long      int           // gaps over gapLongUS
	err       error
}

const gapLongUS = 2000

func newGapTimer() *gapTimer {
	p := os.Getenv("ORCH_CUDA_GAPTIME")
	if p == "" {
		return nil
	}
	return &gapTimer{path: strings.ReplaceAll(p, "%p", strconv.Itoa(os.Getpid()))}
}

// around wraps one graph launch: start event, launch, end event.
func (t *gapTimer) around(b *Backend, launch func() error) error {
	if t.err != nil {
		return launch()
	}
	cur := &t.ev[t.i%4]
	for j := range cur {
		if cur[j] == 0 {
			if rc := b.l.eventCreate(&cur[j]); rc != stOK {
				t.err = b.l.status("event_create", rc)
				return launch()
			}
		}
	}
	// replay i-2's busy time and the gap before it (its events have completed: the host read its outputs)
	if t.i >= 2 {
		prev := t.ev[(t.i-2)%4]
		var ms float32
		if b.l.eventElapsed(prev[0], prev[1], &ms) == stOK {
			t.busy = append(t.busy, 1000*float64(ms))
		}
		if t.i >= 3 {
			pp := t.ev[(t.i-3)%4]
			if b.l.eventElapsed(pp[1], prev[0], &ms) == stOK {
				if us := 1000 * float64(ms); us > gapLongUS {
					t.long++
				} else {
					t.gap = append(t.gap, us)
				}
			}
		}
	}
	if rc := b.l.eventRecord(b.ctx, cur[0]); rc != stOK {
		t.err = b.l.status("event_record", rc)
	}
	err := launch()
	if rc := b.l.eventRecord(b.ctx, cur[1]); rc != stOK && t.err == nil {
		t.err = b.l.status("event_record", rc)
	}
	t.i++
	if t.i%256 == 0 { // also while running: a process may exit without closing its backend
		t.write()
	}
	return err
}

func (t *gapTimer) write() {
	if err := os.WriteFile(t.path, []byte(t.summary()), 0o644); err != nil {
		fmt.Fprintf(os.Stderr, "orch cuda: ORCH_CUDA_GAPTIME: %v\n", err)
	}
}

// summary is the report close writes.
func (t *gapTimer) summary() string {
	stat := func(v []float64) string {
		if len(v) == 0 {
			return "none"
		}
		s := slices.Clone(v)
		slices.Sort(s)
		sum := 0.0
		for _, x := range s {
			sum += x
		}
		return fmt.Sprintf("mean %.1f p50 %.1f p90 %.1f µs (%d)", sum/float64(len(s)), s[len(s)/2], s[len(s)*9/10], len(s))
	}
	r := fmt.Sprintf("graph replays %d\nbusy (launch arrival -> graph end): %s\ngap (graph end -> next launch arrival, <= %d µs): %s\ngaps over %d µs: %d\n",
		t.i, stat(t.busy), gapLongUS, stat(t.gap), gapLongUS, t.long)
	if t.err != nil {
		r += fmt.Sprintf("stopped: %v\n", t.err)
	}
	return r
}

func (t *gapTimer) close(b *Backend) {
	t.write()
	for _, p := range t.ev {
		for _, ev := range p {
			if ev != 0 {
				b.l.eventDestroy(ev)
			}
		}
	}
}
