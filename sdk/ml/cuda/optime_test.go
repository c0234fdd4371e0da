package cuda

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// fakeClockLib is a lib whose events are stamped by a fake device clock, so
// that the op timer's accounting can be checked without a GPU.
func fakeClockLib(now *float32, created *int) *lib {
	stamps := map[uintptr]float32{}
	next := uintptr(1)
	return &lib{
		eventCreate: func(ev *uintptr) int32 {
			*ev = next
			next++
			*created++
			return stOK
		},
		eventRecord:  func(_, ev uintptr) int32 { stamps[ev] = *now; return stOK },
		eventElapsed: func(a, b uintptr, ms *float32) int32 { *ms = stamps[b] - stamps[a]; return stOK },
		eventDestroy: func(uintptr) int32 { return stOK },
		sync:         func(uintptr) int32 { return stOK },
		lastError:    func(*byte, int64) int32 { return 0 },
	}
}

func TestOpTimerCharges(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ops-%p.md")
	t.Setenv("ORCH_CUDA_OPTIME", path)
	var now float32
	var created int
	b := &Backend{l: fakeClockLib(&now, &created), ctx: 1, graphs: map[string]uintptr{}}
	b.ot = newOpTimer()
	require.NotNil(t, b.ot)

	launch := func(op string, ms float32) { now += ms; b.call(op, stOK) }
	launch("embed", 1)  // first op: the baseline, not charged
	launch("matmul", 2) // 2 ms
	launch("attend", 5) // 5 ms
	launch("matmul", 3) // 3 ms
	require.NoError(t, b.Sync())
	now += 100                             // host idle between steps: charged to nobody
	launch("embed", 1)                     // the first op after a sync: the new baseline
	launch("matmul", 4)                    // 4 ms
	for i := 0; i < opTimerBatch+10; i++ { // past one batch: settled mid-run, events reused
		launch("add", 0.5)
	}
	b.call("rope", stInvalid) // a failed op is not charged
	b.err = nil
	b.ot.close(b)

	got := b.ot.agg
	require.Equal(t, 3, got["matmul"].n)
	require.InDelta(t, 2+3+4, got["matmul"].total, 1e-3)
	require.Equal(t, 1, got["attend"].n)
	require.InDelta(t, 5, got["attend"].total, 1e-6)
	require.Equal(t, opTimerBatch+10, got["add"].n)
	require.InDelta(t, 0.5*float64(opTimerBatch+10), got["add"].total, 1e-2)
	require.NotContains(t, got, "embed")
	require.NotContains(t, got, "rope")
	require.Less(t, created, opTimerBatch+16, "events are reused across batches")

	out, err := os.ReadFile(strings.ReplaceAll(path, "%p", strconv.Itoa(os.Getpid())))
	require.NoError(t, err)
	lines := strings.Split(string(out), "\n")
	require.Contains(t, lines[2], "| add |", "largest total first: %s", out)
	require.Contains(t, string(out), "| matmul | 3 | 9.000 | 3000.00 |")
	require.Contains(t, string(out), "2 ops not timed")
}

func TestOpTimerOffByDefault(t *testing.T) {
	t.Setenv("ORCH_CUDA_OPTIME", "")
	require.Nil(t, newOpTimer())
}

// With op timing on, decode steps stay graphs: each op inside is an event
// node, and every replay charges the node-to-node times under "graph:" names.
func TestOpTimerGraphs(t *testing.T) {
	t.Setenv("ORCH_CUDA_OPTIME", filepath.Join(t.TempDir(), "ops.md"))
	var now float32
	var created, destroyed int
	l := fakeClockLib(&now, &created)
	// A fake graph: events recorded while capturing are re-stamped on every
	// launch, each after the device time its op took at capture.
	type node struct {
		ev   uintptr
		cost float32
	}
	var capturing bool
	var nodes []node
	var last float32
	stamp := l.eventRecord
	l.eventRecord = func(ctx, ev uintptr) int32 {
		if capturing {
			nodes = append(nodes, node{ev, now - last})
			last = now
		}
		return stamp(ctx, ev)
	}
	l.eventDestroy = func(uintptr) int32 { destroyed++; return stOK }
	l.graphBegin = func(uintptr) int32 { capturing, nodes, last = true, nil, now; return stOK }
	l.graphEnd = func(_ uintptr, g *uintptr) int32 { capturing = false; *g = 7; return stOK }
	l.graphLaunch = func(_, g uintptr) int32 {
		for _, n := range nodes {
			now += n.cost
			stamp(0, n.ev)
		}
		return stOK
	}
	l.graphDestroy = func(uintptr) int32 { return stOK }
	b := &Backend{l: l, ctx: 1, graphs: map[string]uintptr{}}
	b.ot = newOpTimer()
	step := func() {
		now += 2
		b.call("matmul", stOK)
		now += 3
		b.call("attend", stOK)
	}
	for i := 0; i < 3; i++ { // capture + launch, then two replays
		require.NoError(t, b.Run("step", step))
	}
	require.Len(t, b.graphs, 1)
	got := b.ot.agg
	require.Equal(t, 3, got["graph:matmul"].n)
	require.InDelta(t, 6, got["graph:matmul"].total, 1e-4)
	require.Equal(t, 3, got["graph:attend"].n)
	require.InDelta(t, 9, got["graph:attend"].total, 1e-4)
	require.NotContains(t, got, "matmul", "graph ops are not charged as eager ops")
	require.Contains(t, b.ot.table(), "3 graph replays, 5.000 ms of graph ops per replay")
	b.ResetGraphs() // the node events go with the graphs
	require.Equal(t, 3, destroyed)
	require.Empty(t, b.ot.graphs)
}
