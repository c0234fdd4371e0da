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
	now += 100          // host idle between steps: charged to nobody
	launch("embed", 1)  // the first op after a sync: the new baseline
	launch("matmul", 4) // 4 ms
	b.capturing = true  // ops recorded into a graph (not run) are not timed
	launch("matmul", 0) // (Run never captures with timing on; other capture paths must not count)
	b.capturing = false
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

// With op timing on, Run executes the step eagerly every time (nothing is captured).
func TestOpTimerRunsEagerly(t *testing.T) {
	t.Setenv("ORCH_CUDA_OPTIME", filepath.Join(t.TempDir(), "ops.md"))
	var now float32
	var created int
	l := fakeClockLib(&now, &created)
	l.graphBegin = func(uintptr) int32 { t.Fatal("graph capture with op timing on"); return stOK }
	b := &Backend{l: l, ctx: 1, graphs: map[string]uintptr{}}
	b.ot = newOpTimer()
	runs := 0
	for i := 0; i < 3; i++ {
		require.NoError(t, b.Run("step", func() { runs++; now++; b.call("matmul", stOK) }))
	}
	require.Equal(t, 3, runs)
	require.Empty(t, b.graphs)
}
