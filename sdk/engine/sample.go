package engine

import (
	"cmp"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/llama-orch/orch/sdk"
)

// sampler picks a request's tokens from logits rows on the host. Each request
// has its own sampler and random stream, so a seeded request produces the
// same tokens whatever else is in the batch.
//
// Order of operations (the same as vLLM's): logit bias, repetition penalty
// (prompt and generated tokens, divide positive / multiply negative logits as
// in transformers), presence and frequency penalties (generated tokens, as in
// OpenAI's API), masking of stop tokens before MinTokens; then greedy
// (temperature below 1e-5, lowest id on ties) or temperature, top-k, top-p, min-p and a
// draw. Logprobs are those of the model's raw distribution (log-softmax of the
// unmodified logits), the convention of vLLM's default "raw_logprobs".
type sampler struct {
	p         sdk.SamplingParams
	seed      uint64 // the request's seed (or a random one): the host stream's and the device draws'
	rng       *rand.Rand
	seen      map[int32]struct{} // prompt + generated tokens (repetition penalty)
	counts    map[int32]int      // generated tokens (presence/frequency penalties)
	stop      []int32
	minTokens int
	logprobs  bool
	top       int

	work  []float32
	idx   []int32
	probs []float64
}

func newSampler(req sdk.GenerateRequest) *sampler {
	seed := req.Sampling.Seed
	if !req.Sampling.HasSeed {
		seed = rand.Uint64()
	}
	s := &sampler{
		p:         req.Sampling,
		seed:      seed,
		rng:       rand.New(rand.NewPCG(seed, seed^0x2545f4914f6cdd1d)),
		counts:    make(map[int32]int),
		stop:      req.StopTokens,
		minTokens: req.MinTokens,
		logprobs:  req.Logprobs || req.TopLogprobs > 0,
		top:       req.TopLogprobs,
	}
	if rp := req.Sampling.RepetitionPenalty; rp > 0 && rp != 1 {
		s.seen = make(map[int32]struct{}, len(req.Prompt))
		for _, t := range req.Prompt {
			s.seen[t] = struct{}{}
		}
	}
	return s
}

// plain reports whether the next token is simply the argmax of the model's
// logits, so a device-side argmax (GreedyModel) can replace the host sampler.
func (s *sampler) plain(generated int) bool {
	return s.p.Temperature < minTemperature && len(s.p.LogitBias) == 0 && s.seen == nil &&
		s.p.PresencePenalty == 0 && s.p.FrequencyPenalty == 0 && !s.logprobs &&
		(generated >= s.minTokens || len(s.stop) == 0)
}

// device returns the settings of the next token's draw on the device
// (SamplingModel), or false when it needs the host: greedy decoding (plain
// greedy steps go to GreedyModel; a greedy row in a sampled step is a
// SampleSpec with temperature 0, see sched.deviceSpecs), logit bias,
// penalties, logprobs or stop-token masking. Like plain, it depends on the
// request's parameters and the number of tokens generated only, so a seeded
// request takes the same path, and gives the same tokens, in any batch.
func (s *sampler) device(generated int) (SampleSpec, bool) {
	if s.p.Temperature < minTemperature || math.IsNaN(float64(s.p.Temperature)) || len(s.p.LogitBias) > 0 || s.seen != nil ||
		s.p.PresencePenalty != 0 || s.p.FrequencyPenalty != 0 || s.logprobs || (generated < s.minTokens && len(s.stop) > 0) {
		return SampleSpec{}, false
	}
	return SampleSpec{Temperature: s.p.Temperature, TopK: s.p.TopK, TopP: s.p.TopP, MinP: s.p.MinP,
		Seed: s.seed, Index: uint64(generated)}, true
}

// accept records a generated token for the penalties.
func (s *sampler) accept(tok int32) {
	s.counts[tok]++
	if s.seen != nil {
		s.seen[tok] = struct{}{}
	}
}

// sample picks the next token from one logits row; generated is the number of
// tokens generated so far. info is nil unless logprobs were requested.
func (s *sampler) sample(logits []float32, generated int) (int32, *sdk.TokenInfo) {
	masked := generated < s.minTokens && len(s.stop) > 0
	w := logits
	if len(s.p.LogitBias) > 0 || s.seen != nil || s.p.PresencePenalty != 0 || s.p.FrequencyPenalty != 0 || masked {
		w = append(s.work[:0], logits...) // the model's row stays intact for logprobs
		s.work = w
	}
	for t, b := range s.p.LogitBias {
		if int(t) >= 0 && int(t) < len(w) {
			w[t] += b
		}
	}
	if rp := s.p.RepetitionPenalty; s.seen != nil {
		for t := range s.seen {
			if int(t) < 0 || int(t) >= len(w) {
				continue
			}
			if w[t] > 0 {
				w[t] /= rp
			} else {
				w[t] *= rp
			}
		}
	}
	if s.p.PresencePenalty != 0 || s.p.FrequencyPenalty != 0 {
		for t, c := range s.counts {
			if int(t) >= 0 && int(t) < len(w) {
				w[t] -= s.p.PresencePenalty + s.p.FrequencyPenalty*float32(c)
			}
		}
	}
	if masked {
		for _, t := range s.stop {
			if int(t) >= 0 && int(t) < len(w) {
				w[t] = float32(math.Inf(-1))
			}
		}
	}
	var tok int32
	if s.p.Temperature < minTemperature {
		tok = argmax(w)
	} else {
		tok = s.draw(w)
	}
	if !s.logprobs {
		return tok, nil
	}
	return tok, logprobInfo(logits, tok, s.top)
}

// argmax returns the index of the largest value (lowest index on ties; NaN
// never wins; 0 when nothing is larger than -Inf). The loop is kept minimal:
// it runs over the whole vocabulary for every greedy token.
// minTemperature: below it sampling is greedy (1/T would overflow the
// scaled logits).
const minTemperature = 1e-5

func argmax(w []float32) int32 {
	best, bv := 0, float32(math.Inf(-1))
	for i, v := range w {
		if v > bv {
			best, bv = i, v
		}
	}
	return int32(best)
}

// draw samples from temperature-scaled, top-k/top-p/min-p filtered logits.
func (s *sampler) draw(w []float32) int32 {
	invT := 1 / float64(s.p.Temperature)
	idx := s.idx[:0]
	if k := s.p.TopK; k > 0 && k < len(w) {
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
	probs := s.probs[:0]
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
	if tp := float64(s.p.TopP); tp > 0 && tp < 1 {
		idx, probs = nucleus(idx, probs, pmax, tp)
	}
	if mp := float64(s.p.MinP); mp > 0 {
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
	s.idx, s.probs = idx, probs
	if len(idx) == 0 {
		return argmax(w)
	}
	total := 0.0
	for _, p := range probs {
		total += p
	}
	u := s.rng.Float64() * total
	for i, p := range probs {
		u -= p
		if u < 0 {
			return idx[i]
		}
	}
	return idx[len(idx)-1]
}

// topK returns, in dst's storage, the indices of the k largest finite values
// of w (ties: lower index first), in no particular order. It is a quickselect
// (O(V)): sorting a 200k vocabulary per token would cost milliseconds.
func topK(w []float32, k int, dst []int32) []int32 {
	idx := dst[:0]
	for i, v := range w {
		if !math.IsInf(float64(v), -1) && !math.IsNaN(float64(v)) {
			idx = append(idx, int32(i))
		}
	}
	if len(idx) <= k {
		return idx
	}
	better := func(a, b int32) bool { return w[a] > w[b] || (w[a] == w[b] && a < b) }
	lo, hi := 0, len(idx)-1
	for lo < hi {
		// median of three as pivot, moved to hi
		mid := lo + (hi-lo)/2
		if better(idx[mid], idx[lo]) {
			idx[mid], idx[lo] = idx[lo], idx[mid]
		}
		if better(idx[hi], idx[lo]) {
			idx[hi], idx[lo] = idx[lo], idx[hi]
		}
		if better(idx[mid], idx[hi]) {
			idx[mid], idx[hi] = idx[hi], idx[mid]
		}
		pivot := idx[hi]
		store := lo
		for i := lo; i < hi; i++ {
			if better(idx[i], pivot) {
				idx[i], idx[store] = idx[store], idx[i]
				store++
			}
		}
		idx[store], idx[hi] = idx[hi], idx[store]
		switch {
		case store == k-1:
			return idx[:k]
		case store > k-1:
			hi = store - 1
		default:
			lo = store + 1
		}
	}
	return idx[:k]
}

// nucleus keeps the smallest set of most probable candidates whose mass
// reaches topP. Instead of sorting the whole vocabulary it sorts only the
// candidates above a threshold, lowering the threshold until they hold at
// least topP of the mass; those always contain the nucleus.
func nucleus(idx []int32, probs []float64, pmax, topP float64) ([]int32, []float64) {
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

// logprobInfo computes the chosen token's logprob and the top alternatives
// from the raw logits.
func logprobInfo(logits []float32, tok int32, top int) *sdk.TokenInfo {
	maxv := math.Inf(-1)
	for _, v := range logits {
		maxv = max(maxv, float64(v))
	}
	sum := 0.0
	for _, v := range logits {
		sum += math.Exp(float64(v) - maxv)
	}
	lse := maxv + math.Log(sum)
	info := &sdk.TokenInfo{Logprob: float32(float64(logits[tok]) - lse)}
	if top <= 0 {
		return info
	}
	top = min(top, len(logits))
	best := make([]sdk.TokenLogprob, 0, top+1)
	for i, v := range logits {
		if len(best) == top && v <= best[top-1].Logprob {
			continue
		}
		j := len(best)
		for j > 0 && v > best[j-1].Logprob {
			j--
		}
		best = slices.Insert(best, j, sdk.TokenLogprob{Token: int32(i), Logprob: v})
		if len(best) > top {
			best = best[:top]
		}
	}
	for i := range best {
		best[i].Logprob = float32(float64(best[i].Logprob) - lse)
	}
	info.Top = best
	return info
}
