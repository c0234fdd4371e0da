package engine

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
)

// The float32 sampler draws the float64 one's tokens from the same stream:
// both consume one Float64 per token, so a seeded request's tokens are the
// same but where the uniform falls within float32 rounding of a boundary.
func TestSamplerMatchesFloat64(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for _, c := range []struct {
		v     int
		scale float64
		p     sdk.SamplingParams
	}{
		{5000, 2, sdk.SamplingParams{Temperature: 1}},
		{5000, 2, sdk.SamplingParams{Temperature: 0.3, TopP: 0.9}},
		{5000, 4, sdk.SamplingParams{Temperature: 1.7, TopK: 200, TopP: 0.8}},
		{5000, 1, sdk.SamplingParams{Temperature: 1, MinP: 0.05}},
		{5000, 3, sdk.SamplingParams{Temperature: 0.8, TopK: 40, TopP: 0.95, MinP: 0.02}},
		{300, 30, sdk.SamplingParams{Temperature: 0.05}},                      // most relative probabilities below e^-40: skipped
		{5000, 2, sdk.SamplingParams{Temperature: 1, TopP: 0.95, MinP: 0.3}},  // min-p cuts above the nucleus's last bucket
		{5000, 2, sdk.SamplingParams{Temperature: 1, TopP: 0.5, MinP: 0.001}}, // min-p inside or below it
		{8000, 0.3, sdk.SamplingParams{Temperature: 1, TopP: 0.9}},            // flat: the nucleus is most of the row
		{8000, 0.3, sdk.SamplingParams{Temperature: 1, TopP: 0.9, MinP: 0.7}}, // flat, min-p in the top buckets
		{201088, 2.5, sdk.SamplingParams{Temperature: 1, TopP: 0.9}},
	} {
		w := make([]float32, c.v)
		for i := range w {
			w[i] = float32(r.NormFloat64() * c.scale)
		}
		c.p.Seed, c.p.HasSeed = 77, true
		fast := newTestSampler(c.p)
		ref := rand.New(rand.NewPCG(77, 77^0x2545f4914f6cdd1d)) // newSampler's stream for seed 77
		draws, diff := 100, 0
		if c.v > 100000 {
			draws = 5
		}
		for range draws {
			got, _ := fast.sample(w, 0)
			if want := draw64(c.p, ref, w); got != want {
				diff++
			}
		}
		assert.LessOrEqual(t, diff, 1, "%+v (vocab %d): %d of %d draws differ from the float64 sampler", c.p, c.v, diff, draws)
	}
}

func TestExp32(t *testing.T) {
	assert.Equal(t, float32(1), exp32(0))
	assert.Equal(t, float32(1), exp32(float32(math.Copysign(0, -1))))
	for i := 0; i <= 400000; i += 3 {
		x := -float32(i) / 10000 // [-40, 0]
		want := math.Exp(float64(x))
		rel := math.Abs(float64(exp32(x))-want) / want
		tol := 3e-6
		if x > -10 {
			tol = 1e-6
		}
		require.Less(t, rel, tol, "exp32(%g)", x)
	}
}

// The sampler keeps its buffers: no allocation per token once warm.
func TestSamplerNoAllocs(t *testing.T) {
	w := make([]float32, 20000)
	r := rand.New(rand.NewPCG(1, 1))
	for i := range w {
		w[i] = float32(r.NormFloat64() * 2)
	}
	for _, p := range []sdk.SamplingParams{{Temperature: 1}, {Temperature: 1, TopP: 0.9}, {Temperature: 0.7, TopK: 50, MinP: 0.1}} {
		s := newTestSampler(p)
		s.sample(w, 0)
		assert.Zero(t, testing.AllocsPerRun(20, func() { s.sample(w, 0) }), "%+v", p)
	}
}

func TestSamplerEdgeRows(t *testing.T) {
	inf, nan := float32(math.Inf(1)), float32(math.NaN())
	for _, p := range []sdk.SamplingParams{{Temperature: 1}, {Temperature: 1, TopK: 3}, {Temperature: 1, TopP: 0.5}, {Temperature: 1, MinP: 0.5}} {
		s := newTestSampler(p)
		seen := map[int32]bool{}
		for range 200 {
			tok, _ := s.sample([]float32{nan, 1, inf, 0, inf}, 0)
			require.True(t, tok == 2 || tok == 4, "%+v: +Inf logits share all the mass: %d", p, tok)
			seen[tok] = true
			tok, _ = s.sample([]float32{nan, 0.5, nan, 0.25}, 0)
			require.True(t, tok == 1 || tok == 3, "%+v: NaN never drawn: %d", p, tok)
		}
		if p.TopP == 0 {
			assert.Len(t, seen, 2, "%+v: both +Inf tokens drawn", p)
		}
		tok, _ := s.sample([]float32{float32(math.Inf(-1)), float32(math.Inf(-1))}, 0)
		assert.Equal(t, int32(0), tok, "no candidate: 0")
	}
}

// The dense pass split over goroutines (one row alone in a step) draws the
// same tokens as one goroutine: same blocks, same sum order.
func TestSamplerParallelDense(t *testing.T) {
	w := make([]float32, 201088)
	r := rand.New(rand.NewPCG(8, 8))
	for i := range w {
		w[i] = float32(r.NormFloat64() * 2)
	}
	for _, p := range []sdk.SamplingParams{{Temperature: 1, Seed: 3, HasSeed: true}, {Temperature: 0.8, TopP: 0.9, Seed: 4, HasSeed: true}} {
		one, four := newTestSampler(p), newTestSampler(p)
		four.par = 4
		for range 5 {
			a, _ := one.sample(w, 0)
			b, _ := four.sample(w, 0)
			require.Equal(t, a, b, "%+v", p)
		}
		assert.Equal(t, one.blocks, four.blocks)
	}
}

// min-p above 1 keeps nothing: the argmax, as the float64 sampler.
func TestSamplerMinPAboveOne(t *testing.T) {
	w := []float32{0.5, 3, -1, 2.9}
	for _, p := range []sdk.SamplingParams{{Temperature: 1, MinP: 1.5}, {Temperature: 1, MinP: 1.5, TopK: 3}, {Temperature: 1, MinP: 1.5, TopP: 0.9}} {
		s := newTestSampler(p)
		tok, _ := s.sample(w, 0)
		assert.Equal(t, int32(1), tok, "%+v", p)
		assert.Equal(t, int32(1), draw64(p, rand.New(rand.NewPCG(1, 1)), w), "%+v (float64 sampler)", p)
	}
}
