package ml

import (
	"cmp"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestPackSampleParams(t *testing.T) {
	w := make([]int32, 2*SampleParamsWords)
	PackSampleParams(w, []SampleParams{{}, {Temperature: 0.5, TopK: 7, TopP: 0.25, MinP: 2, Seed: 0x1122334455667788, Counter: 0x99aabbccddeeff00}})
	assert.Equal(t, make([]int32, SampleParamsWords), w[:SampleParamsWords])
	assert.Equal(t, []int32{0x3f000000, 0x3e800000, 0x40000000, 7, 0x55667788, 0x11223344, -0x22110100, -0x66554434}, w[SampleParamsWords:])
}

func TestSampleFilters(t *testing.T) {
	const v = 100
	for _, c := range []struct {
		ps   []SampleParams
		want int
	}{
		{nil, 0},
		{[]SampleParams{{}, {Temperature: 1}}, 0},
		{[]SampleParams{{TopK: 5, TopP: 0.5}}, 0},      // greedy: filters are moot
		{[]SampleParams{{Temperature: 1, TopK: v}}, 0}, // k >= vocab: off
		{[]SampleParams{{Temperature: 1, TopP: 1}}, 0},
		{[]SampleParams{{Temperature: 1, MinP: 0.1}}, 1},
		{[]SampleParams{{Temperature: 1, TopP: 0.9}, {Temperature: 1}}, 2},
		{[]SampleParams{{Temperature: 1, TopK: 3}, {Temperature: 1, TopP: 0.9, TopK: 2}}, 3},
	} {
		assert.Equal(t, c.want, SampleFilters(v, c.ps), "%+v", c.ps)
	}
}

// filtered is the filtered softmax of the host sampler's definition.
func filtered(l []float32, p SampleParams) []float64 {
	mx := math.Inf(-1)
	for _, x := range l {
		mx = math.Max(mx, float64(x))
	}
	idx := make([]int, len(l))
	pr := make([]float64, len(l))
	for i, x := range l {
		idx[i], pr[i] = i, math.Exp((float64(x)-mx)/float64(p.Temperature))
	}
	slices.SortFunc(idx, func(a, b int) int { return cmp.Compare(pr[b], pr[a]) })
	keep := len(l)
	if p.TopK > 0 && int(p.TopK) < keep {
		keep = int(p.TopK)
	}
	if p.TopP > 0 && p.TopP < 1 {
		tot, cum := 0.0, 0.0
		for _, i := range idx[:keep] {
			tot += pr[i]
		}
		for j, i := range idx[:keep] {
			if cum += pr[i]; cum >= float64(p.TopP)*tot {
				keep = j + 1
				break
			}
		}
	}
	out := make([]float64, len(l))
	z := 0.0
	for _, i := range idx[:keep] {
		if pr[i] >= float64(p.MinP) {
			out[i] = pr[i]
			z += pr[i]
		}
	}
	for i := range out {
		out[i] /= z
	}
	return out
}

// The Gumbel-max draw of SampleRowRef samples the filtered softmax.
func TestSampleRowRefDistribution(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	l := make([]float32, 30)
	for i := range l {
		l[i] = float32(r.NormFloat64() * 1.5)
	}
	const n = 20000
	for _, p := range []SampleParams{{Temperature: 1}, {Temperature: 0.7, TopK: 5}, {Temperature: 1.3, TopP: 0.8},
		{Temperature: 1, MinP: 0.2}, {Temperature: 0.9, TopK: 10, TopP: 0.9, MinP: 0.05}} {
		want := filtered(l, p)
		cnt := make([]float64, len(l))
		for c := range n {
			p.Seed, p.Counter = 42, uint64(c)
			tok := SampleRowRef(l, p)
			require.Positive(t, want[tok], "%+v: token %d is filtered out", p, tok)
			cnt[tok]++
		}
		for i := range cnt {
			assert.InDelta(t, want[i], cnt[i]/n, 0.01+4*math.Sqrt(want[i]*(1-want[i])/n), "%+v: token %d", p, i)
		}
	}
}

func TestSampleRowRefEdges(t *testing.T) {
	inf, nan := float32(math.Inf(1)), float32(math.NaN())
	T1 := SampleParams{Temperature: 1, Seed: 3}
	assert.Equal(t, int32(2), SampleRowRef([]float32{1, nan, 5, 5}, SampleParams{}), "greedy: lowest index of the max, NaN never wins")
	assert.Equal(t, int32(0), SampleRowRef([]float32{-inf, -inf}, T1), "no candidate: 0")
	assert.Equal(t, int32(0), SampleRowRef([]float32{-inf, -inf}, SampleParams{}))
	for c := range 20 {
		T1.Counter = uint64(c)
		assert.Equal(t, int32(1), SampleRowRef([]float32{3, inf, 0, inf}, T1), "+Inf takes the mass, the first wins")
		tok := SampleRowRef([]float32{nan, 0, nan, 0.5}, T1)
		assert.True(t, tok == 1 || tok == 3, "NaN never drawn: %d", tok)
		assert.Equal(t, int32(2), SampleRowRef([]float32{0, 1, 9, 2}, SampleParams{Temperature: 1, TopK: 1, Counter: uint64(c)}))
		assert.Equal(t, int32(2), SampleRowRef([]float32{0, 1, 9, 2}, SampleParams{Temperature: 1, MinP: 0.5, Counter: uint64(c)}))
	}
	// the noise is bounded as the kernels' pruning assumes
	for i := range 100000 {
		require.LessOrEqual(t, SampleGumbel(7, 9, i), float32(22.9))
	}
}

// sortThreshold is sampleThreshold by a full sort (SampleRowRef before the
// cut loop), the reference of TestSampleThresholdMatchesSort.
func sortThreshold(cand []float32, mx float32, p SampleParams, v int) uint32 {
	cand = slices.Clone(cand)
	slices.SortFunc(cand, func(a, b float32) int { return cmp.Compare(b, a) })
	thr, keep := uint32(0), len(cand)
	if p.topK(v) && int(p.TopK) < len(cand) {
		k := int(p.TopK)
		thr, keep = sampleKey(cand[k-1]), k
		for keep < len(cand) && cand[keep] == cand[k-1] {
			keep++
		}
	}
	if p.topP() {
		invT := 1 / float64(p.Temperature)
		tot := 0.0
		for _, x := range cand[:keep] {
			tot += math.Exp((float64(x) - float64(mx)) * invT)
		}
		cum := 0.0
		for _, x := range cand[:keep] {
			cum += math.Exp((float64(x) - float64(mx)) * invT)
			if cum >= float64(p.TopP)*tot {
				return sampleKey(x)
			}
		}
	}
	return thr
}

func TestSampleThresholdMatchesSort(t *testing.T) {
	r := rand.New(rand.NewPCG(4, 4))
	for trial := range 400 {
		n := 1 + r.IntN(3000)
		l := make([]float32, n)
		scale := []float64{0.05, 1, 4, 30}[trial%4]
		for i := range l {
			l[i] = float32(r.NormFloat64() * scale)
			if r.IntN(50) == 0 {
				l[i] = float32(r.IntN(3)) // ties
			}
		}
		p := SampleParams{Temperature: []float32{0.1, 0.7, 1, 1.8}[r.IntN(4)]}
		if r.IntN(2) == 0 {
			p.TopK = int32(1 + r.IntN(n+5))
		}
		if r.IntN(3) > 0 {
			p.TopP = float32(r.Float64())
		}
		mx := slices.Max(l)
		got, want := sampleThreshold(l, mx, p, n), sortThreshold(l, mx, p, n)
		if got != want { // only where the mass crosses top_p within rounding of an element
			k := 0
			for _, x := range l {
				if sampleKey(x) >= got {
					k++
				}
			}
			require.Failf(t, "threshold", "trial %d %+v n %d: %08x (%d kept), sort %08x", trial, p, n, got, k, want)
		}
	}
}
