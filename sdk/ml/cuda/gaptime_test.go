package cuda

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestGapTimerSummary(t *testing.T) {
	g := &gapTimer{i: 12, busy: []float64{1800, 1790, 1810, 1805}, gap: []float64{40, 20, 30, 50, 60}, long: 2}
	s := g.summary()
	require.Contains(t, s, "graph replays 12\n")
	require.Contains(t, s, "busy (launch arrival -> graph end): mean 1801.2 p50 1805.0 p90 1810.0 µs (4)")
	require.Contains(t, s, "mean 40.0 p50 40.0 p90 60.0 µs (5)")
	require.Contains(t, s, "gaps over 2000 µs: 2")
	require.True(t, strings.Contains((&gapTimer{}).summary(), "busy (launch arrival -> graph end): none"))
}

func TestGapTimerOff(t *testing.T) {
	t.Setenv("ORCH_CUDA_GAPTIME", "")
	require.Nil(t, newGapTimer())
	t.Setenv("ORCH_CUDA_GAPTIME", "/tmp/gap-%p.txt")
	g := newGapTimer()
	require.NotNil(t, g)
	require.NotContains(t, g.path, "%p")
}
