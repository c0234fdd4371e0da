package ml_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

func TestRopeShape(t *testing.T) {
	hd, heads, err := ml.RopeShape([]int{8, 6}, 3, &ml.Rope{Dims: 4}, 2)
	require.NoError(t, err)
	assert.Equal(t, [2]int{8, 2}, [2]int{hd, heads})
	_, _, err = ml.RopeShape([]int{8}, 1, &ml.Rope{Dims: 4}, 2)
	assert.ErrorContains(t, err, "want [head_dim, heads, n]")
	_, _, err = ml.RopeShape([]int{8, 5}, 3, &ml.Rope{Dims: 4}, 2)
	assert.ErrorContains(t, err, "does not hold 3 tokens")
	for _, r := range []struct{ dims, freqs int }{{0, 0}, {3, 1}, {10, 5}, {4, 3}} {
		_, _, err = ml.RopeShape([]int{8, 6}, 3, &ml.Rope{Dims: r.dims}, r.freqs)
		assert.ErrorContains(t, err, "frequencies", r)
	}
}

func TestMoEShapes(t *testing.T) {
	x, router, gate, down := []int{4, 3}, []int{4, 5}, []int{4, 6, 5}, []int{6, 4, 5}
	m, err := ml.MoEShapes(x, x, router, gate, gate, down, 2)
	require.NoError(t, err)
	assert.Equal(t, ml.MoEDims{Dim: 4, N: 3, Experts: 5, FF: 6}, m)
	for want, c := range map[string][6][]int{
		"dst":    {{4, 2}, x, router, gate, gate, down},
		"router": {x, x, []int{3, 5}, gate, gate, down},
		"gate":   {x, x, router, []int{4, 6, 4}, gate, down},
		"up":     {x, x, router, gate, []int{4, 7, 5}, down},
		"down":   {x, x, router, gate, gate, []int{6, 4, 4}},
	} {
		_, err := ml.MoEShapes(c[0], c[1], c[2], c[3], c[4], c[5], 2)
		assert.ErrorContains(t, err, want)
	}
	for _, k := range []int{0, 6} {
		_, err := ml.MoEShapes(x, x, router, gate, gate, down, k)
		assert.ErrorContains(t, err, "top-k")
	}
}

func TestKVRowsAttendShape(t *testing.T) {
	n, err := ml.KVRows([]int{8, 2, 3}, []int{8, 2, 3}, 8, 2)
	require.NoError(t, err)
	assert.Equal(t, 3, n)
	_, err = ml.KVRows([]int{8, 2, 3}, []int{8, 2, 2}, 8, 2)
	assert.ErrorContains(t, err, "cache rows")
	_, err = ml.KVRows([]int{4, 4, 3}, []int{4, 4, 3}, 8, 2)
	assert.ErrorContains(t, err, "cache rows")

	heads, n, err := ml.AttendShape([]int{8, 4, 3}, []int{8, 4, 3}, 8, 2)
	require.NoError(t, err)
	assert.Equal(t, [2]int{4, 3}, [2]int{heads, n})
	_, _, err = ml.AttendShape([]int{8, 4, 3}, []int{8, 4, 2}, 8, 2)
	assert.ErrorContains(t, err, "head dim")
	_, _, err = ml.AttendShape([]int{8, 3, 3}, []int{8, 3, 3}, 8, 2)
	assert.ErrorContains(t, err, "query heads")
}
