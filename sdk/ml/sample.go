package ml

import (
	"cmp"
	"math"
	"slices"
)

// SampleParams are one row's settings for SamplingBackend.SampleRows (the
// C struct orch_sample_params, cuda/include/orch_cuda.h).
type SampleParams struct {
	Temperature float32 // below SampleMinTemperature (or NaN): greedy, the argmax (lowest index on ties)
	TopK        int32   // in (0, vocab): keep the k largest logits (all ties at the k-th); else off
	TopP        float32 // in (0, 1): keep the smallest top set holding this share of the (top-k) mass; else off
	MinP        float32 // > 0: keep p >= MinP * p_max
	Seed        uint64  // the request's seed
	Counter     uint64  // the token's index in the request: a fresh draw per token, the same on a replay
}

// SampleMinTemperature: below it a row is greedy (as the engine's host
// sampler).
const SampleMinTemperature = 1e-5

// SampleParamsWords is the size of one packed SampleParams in int32 words.
const SampleParamsWords = 8

// PackSampleParams writes ps in the device layout (orch_sample_params:
// temperature, top_p, min_p, top_k, seed, counter; little-endian words) into
// dst, which must hold SampleParamsWords*len(ps) words.
func PackSampleParams(dst []int32, ps []SampleParams) {
	for i, p := range ps {
		w := dst[i*SampleParamsWords : (i+1)*SampleParamsWords]
		w[0] = int32(math.Float32bits(p.Temperature))
		w[1] = int32(math.Float32bits(p.TopP))
		w[2] = int32(math.Float32bits(p.MinP))
		w[3] = p.TopK
		w[4], w[5] = int32(uint32(p.Seed)), int32(uint32(p.Seed>>32))
		w[6], w[7] = int32(uint32(p.Counter)), int32(uint32(p.Counter>>32))
	}
}

// UnpackSampleParams is the inverse of PackSampleParams: the settings of
// len(w) / SampleParamsWords rows.
func UnpackSampleParams(w []int32) []SampleParams {
	ps := make([]SampleParams, len(w)/SampleParamsWords)
	for i := range ps {
		r := w[i*SampleParamsWords : (i+1)*SampleParamsWords]
		ps[i] = SampleParams{Temperature: math.Float32frombits(uint32(r[0])), TopP: math.Float32frombits(uint32(r[1])),
			MinP: math.Float32frombits(uint32(r[2])), TopK: r[3], Seed: uint64(uint32(r[4])) | uint64(uint32(r[5]))<<32,
			Counter: uint64(uint32(r[6])) | uint64(uint32(r[7]))<<32}
	}
	return ps
}

func (p SampleParams) greedy() bool        { return !(p.Temperature >= SampleMinTemperature) }
func (p SampleParams) topK(v int) bool     { return p.TopK > 0 && int(p.TopK) < v }
func (p SampleParams) topP() bool          { return p.TopP > 0 && p.TopP < 1 }
func (p SampleParams) minP() bool          { return p.MinP > 0 }
func (p SampleParams) filtered(v int) bool { return !p.greedy() && (p.topK(v) || p.topP() || p.minP()) }

// SampleFilters is the filters argument SampleRows needs for these rows of
// a vocabulary of v: 0 when no row samples with a filter, else 1 + the
// threshold searches a row needs (top-k, top-p: 0 to 2).
func SampleFilters(v int, ps []SampleParams) int {
	f := 0
	for _, p := range ps {
		if p.filtered(v) {
			n := 1
			if p.topK(v) {
				n++
			}
			if p.topP() {
				n++
			}
			f = max(f, n)
		}
	}
	return f
}

// sampleKey is the order-preserving key of a float (sr_key).
func sampleKey(f float32) uint32 {
	u := math.Float32bits(f)
	if u&0x80000000 != 0 {
		return ^u
	}
	return u | 0x80000000
}

func sampleMix(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
	z = (z ^ (z >> 27)) * 0x94D049BB133111EB
	return z ^ (z >> 31)
}

// SampleGumbel is the noise of element i of a row with this seed and
// counter (sr_gumbel): Gumbel(0, 1) from 32 bits of SplitMix64, never above
// 22.9.
func SampleGumbel(seed, counter uint64, i int) float32 {
	base := sampleMix(seed ^ sampleMix(counter+0x632BE59BD9B4E019))
	h := sampleMix(base + uint64(i+1)*0x9E3779B97F4A7C15)
	u := (float32(uint32(h>>32)) + 0.5) * 2.3283064365386963e-10
	return float32(-math.Log(float64(float32(-math.Log1p(-float64(u))))))
}

// sampleThreshold is the key of the smallest logit top-k then top-p keep
// of the finite candidates cand (max mx): their order is needed only down
// to that logit, so only the candidates above a cut are sorted, the cut
// lowered (by 4, 16, 64 ... T below the max) until they hold the k and the
// top_p mass (a full sort of a 200k vocabulary took ~20 ms; the engine uses
// this on the host when a step cannot sample on the device).
func sampleThreshold(cand []float32, mx float32, p SampleParams, v int) uint32 {
	invT := 1 / float64(p.Temperature)
	mass := func(x float32) float64 { return math.Exp((float64(x) - float64(mx)) * invT) }
	tot := 0.0 // top-p's mass when there is no top-k: every candidate's
	if p.topP() && !(p.topK(v) && int(p.TopK) < len(cand)) {
		for _, x := range cand {
			tot += mass(x)
		}
	}
	var top []float32
	for drop := 4.0; ; drop *= 4 {
		c := float32(float64(mx) - drop*float64(p.Temperature))
		top = top[:0]
		for _, x := range cand {
			if x >= c {
				top = append(top, x)
			}
		}
		all := len(top) == len(cand) || math.IsInf(float64(c), -1)
		slices.SortFunc(top, func(a, b float32) int { return cmp.Compare(b, a) })
		thr, keep, ok := uint32(0), len(top), true
		if p.topK(v) && int(p.TopK) < len(cand) {
			k := int(p.TopK)
			if len(top) < k && !all {
				continue
			}
			thr, keep = sampleKey(top[k-1]), k
			for keep < len(top) && top[keep] == top[k-1] {
				keep++
			}
			tot = 0
			for _, x := range top[:keep] {
				tot += mass(x)
			}
		}
		if p.topP() {
			ok = false
			cum := 0.0
			for _, x := range top[:keep] {
				cum += mass(x)
				if cum >= float64(p.TopP)*tot {
					thr, ok = sampleKey(x), true
					break
				}
			}
		}
		if ok || all {
			return thr
		}
	}
}

// SampleRowRef is the host reference of SampleRows for one row: greedy rows
// the argmax (NaN never wins; ties and -Inf rows: the lowest index), sampled
// rows the argmax over the kept logits of l/T + SampleGumbel — an exact draw
// from softmax(l/T) over the set top-k, then top-p (of the top-k mass), then
// min-p keep, threshold sets by logit (all ties at a threshold kept). Rows
// without a finite candidate give 0; +Inf logits take all the mass (the
// first wins). Float32 like the kernels (whose logf may differ in the last
// bit: near ties can resolve differently).
func SampleRowRef(l []float32, p SampleParams) int32 {
	if p.greedy() {
		best, bi := float32(math.Inf(-1)), -1
		for i, v := range l {
			if v > best || (v == best && bi < 0) {
				best, bi = v, i
			}
		}
		return int32(max(bi, 0))
	}
	inf := float32(math.Inf(1))
	mx := float32(math.Inf(-1))
	var cand []float32
	for _, v := range l {
		if v > -inf {
			mx = max(mx, v)
			if p.filtered(len(l)) {
				cand = append(cand, v)
			}
		}
	}
	thr, cut := uint32(0), float32(math.Inf(-1))
	if p.filtered(len(l)) && mx > -inf && mx < inf {
		thr = sampleThreshold(cand, mx, p, len(l))
		if p.minP() {
			cut = mx + p.Temperature*float32(math.Log(float64(p.MinP)))
		}
	}
	if mx == inf {
		cut = inf
	}
	invT := 1 / p.Temperature
	best, bi := float32(math.Inf(-1)), -1
	for i, v := range l {
		if !(v > -inf) || !(v >= cut) || sampleKey(v) < thr {
			continue
		}
		s := v * invT
		if s+23 < best {
			continue
		}
		if x := s + SampleGumbel(p.Seed, p.Counter, i); x > best || (x == best && bi < 0) {
			best, bi = x, i
		}
	}
	return int32(max(bi, 0))
}
