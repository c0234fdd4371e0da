package engine

import (
	"cmp"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/llama-orch/orch/sdk"
)

// The float64 sampler of sessions 1-7 (draw and nucleus as they were before
// the float32 rewrite), the reference of TestSamplerMatchesFloat64.

// draw64 samples from temperature-scaled, top-k/top-p/min-p filtered logits.
func draw64(p sdk.SamplingParams, rng *rand.Rand, w []float32) int32 {
	invT := 1 / float64(p.Temperature)
	idx := []int32(nil)
	if k := p.TopK; k > 0 && k < len(w) {
		idx = topK(w, k, idx)
	} else {
		for i, v := range w {
			if !math.IsInf(float64(v), -1) && !math.IsNaN(float64(v)) {
				idx = append(idx, int32(i))
			}
		}
	}
	if len(idx) == 0 {
		return argmax(w)
	}
	// softmax over the candidates; probs is indexed like idx.
	maxv := math.Inf(-1)
	for _, t := range idx {
		maxv = max(maxv, float64(w[t])*invT)
	}
	probs := []float64(nil)
	sum := 0.0
	for _, t := range idx {
		x := float64(w[t]) * invT
		var p float64
		if math.IsInf(maxv, 1) { // +Inf logits (or overflow at a tiny temperature) share all the mass
			if math.IsInf(x, 1) {
				p = 1
			}
		} else {
			p = math.Exp(x - maxv)
		}
		probs = append(probs, p)
		sum += p
	}
	pmax := 0.0
	for i := range probs {
		probs[i] /= sum
		pmax = max(pmax, probs[i])
	}
	if tp := float64(p.TopP); tp > 0 && tp < 1 {
		idx, probs = nucleus64(idx, probs, pmax, tp)
	}
	if mp := float64(p.MinP); mp > 0 {
		thr := mp * pmax
		j := 0
		for i := range idx {
			if probs[i] >= thr {
				idx[j], probs[j] = idx[i], probs[i]
				j++
			}
		}
		idx, probs = idx[:j], probs[:j]
	}
	if len(idx) == 0 {
		return argmax(w)
	}
	total := 0.0
	for _, p := range probs {
		total += p
	}
	u := rng.Float64() * total
	for i, p := range probs {
		u -= p
		if u < 0 {
			return idx[i]
		}
	}
	return idx[len(idx)-1]
}

// nucleus64 keeps the smallest set of most probable candidates whose mass
// reaches topP. Instead of sorting the whole vocabulary it sorts only the
// candidates above a threshold, lowering the threshold until they hold at
// least topP of the mass; those always contain the nucleus.
func nucleus64(idx []int32, probs []float64, pmax, topP float64) ([]int32, []float64) {
	type cand struct {
		t int32
		p float64
	}
	var sel []cand
	for thr := pmax / 64; ; thr /= 64 {
		sel = sel[:0]
		mass := 0.0
		for i, p := range probs {
			if p >= thr {
				sel = append(sel, cand{idx[i], p})
				mass += p
			}
		}
		if mass >= topP || len(sel) == len(idx) || !(thr > 1e-300) { // (NaN-safe)
			break
		}
	}
	slices.SortFunc(sel, func(a, b cand) int {
		if c := cmp.Compare(b.p, a.p); c != 0 {
			return c
		}
		return cmp.Compare(a.t, b.t)
	})
	idx, probs = idx[:0], probs[:0]
	cum := 0.0
	for _, c := range sel {
		idx = append(idx, c.t)
		probs = append(probs, c.p)
		cum += c.p
		if cum >= topP {
			break
		}
	}
	return idx, probs
}
