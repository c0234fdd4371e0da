package engine

import (
	"cmp"
	"math"
	"math/rand/v2"
	"slices"
	"sync"

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

	work   []float32 // scratch, kept between tokens (no allocation per token)
	idx    []int32
	probs  []float32 // relative probabilities: dense (a row) or of idx
	blocks []float64 // dense draw: sums of sampleBlock probabilities
	sparse []float32
	sel    []cand
	// drawNucleus: mass per probability bucket, a bucket's sorted entries
	hist    []float64
	scratch []cand
	// par: goroutines the dense pass may use (sampleAll sets it: a few cores
	// when it samples one row alone, 1 when it spreads rows over them)
	par int
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
//
// Cost (session 8): this runs over the whole vocabulary for every sampled
// token (gpt-oss: 201,088 logits), so it works in float32 with relative
// probabilities p = exp((l - max) / T) (the max has p = 1, so min-p needs no
// normalisation and top-p compares against top_p x the sum), a polynomial
// exp (exp32: relative error < 1e-6 where it matters), and skips the exp of every logit with
// (l - max) / T < -expCut: those probabilities are below e^-40 = 4.2e-18 of
// the max, so all of them together hold less than V x 4.2e-18 (< 1e-12 for
// any vocabulary under 2^37) of the mass, far below float32 resolution of the
// sum. The sum is accumulated in float64. Candidates and probabilities live
// in buffers the sampler keeps (no allocation per token). The distribution
// is the float64 version's to ~1e-7; a seeded stream reproduces itself, and
// the token differs from the float64 version's only where the uniform draw
// falls within that rounding of a boundary.
func (s *sampler) draw(w []float32) int32 {
	invT := 1 / s.p.Temperature
	topk := s.p.TopK > 0 && s.p.TopK < len(w)
	mx := float32(math.Inf(-1))
	var idx []int32
	if topk {
		idx = topK(w, s.p.TopK, s.idx[:0])
		for _, t := range idx {
			mx = max(mx, w[t])
		}
	} else {
		for _, v := range w {
			if v > mx { // (NaN never: the builtin max would propagate it)
				mx = v
			}
		}
	}
	if !(mx > float32(math.Inf(-1))) {
		return argmax(w) // no candidate
	}
	if math.IsInf(float64(mx), 1) || topk {
		// sparse candidates: top-k's, or the +Inf logits (they share all the mass)
		if !topk {
			idx = s.idx[:0]
			for i, v := range w {
				if v == mx {
					idx = append(idx, int32(i))
				}
			}
		}
		probs := s.probs[:0]
		j := 0
		inf := math.IsInf(float64(mx), 1)
		for _, t := range idx {
			x := (w[t] - mx) * invT
			if inf && w[t] == mx {
				x = 0
			}
			if x >= -expCut { // (with +Inf logits only they pass: the others' x is -Inf or NaN)
				idx[j] = t
				probs = append(probs, exp32(x))
				j++
			}
		}
		s.probs = probs
		return s.drawSparse(w, idx[:j], probs)
	}
	// dense: the relative probability of every logit (0 when skipped, NaN, -Inf)
	probs := slices.Grow(s.probs[:0], len(w))[:len(w)]
	nb := (len(w) + sampleBlock - 1) / sampleBlock
	blocks := slices.Grow(s.blocks[:0], nb)[:nb]
	if k := min(s.par, nb/parBlocks); k > 1 {
		fillDenseParallel(w, mx, invT, probs, blocks, k)
	} else {
		fillDense(w, mx, invT, probs, blocks, 0, nb)
	}
	sum := 0.0
	for _, bs := range blocks { // in order: the same sum however the blocks were filled
		sum += bs
	}
	s.probs, s.blocks = probs, blocks
	tp, mp := float64(s.p.TopP), s.p.MinP
	if tp > 0 && tp < 1 {
		if tok, ok := s.drawNucleus(probs, tp*sum, mp); ok {
			return tok
		}
		return argmax(w) // min-p above 1 keeps nothing
	}
	if mp > 0 {
		idx, sp := s.idx[:0], s.sparse[:0]
		for i, p := range probs {
			if p >= mp {
				idx, sp = append(idx, int32(i)), append(sp, p)
			}
		}
		s.sparse = sp
		return s.drawSparse(w, idx, sp)
	}
	// the draw over the dense row: find the block, then the token
	u := s.rng.Float64() * sum
	for b, bs := range blocks {
		if u >= bs && b < nb-1 {
			u -= bs
			continue
		}
		lo, hi := b*sampleBlock, min((b+1)*sampleBlock, len(w))
		last := int32(-1)
		for i := lo; i < hi; i++ {
			if probs[i] > 0 {
				u -= float64(probs[i])
				last = int32(i)
				if u < 0 {
					return last
				}
			}
		}
		if last >= 0 {
			return last // rounding left u >= 0 at the end of the block
		}
	}
	return argmax(w)
}

// nucleusShift: drawNucleus buckets probabilities by their float bits above
// this (sign 0, 8 exponent and 4 mantissa bits: buckets ordered like the
// values, each within a factor 1 + 1/16).
const nucleusShift = 19

// drawNucleus draws from the top-p nucleus of a dense row of relative
// probabilities (the smallest set, by decreasing probability and then id,
// whose mass reaches target), then min-p, walking it in that order as the
// sparse nucleus does — without sorting the row: probabilities are bucketed
// by their top float bits, only the bucket where the mass from the top
// reaches target is sorted to cut the nucleus, and the draw sorts only the
// bucket its uniform falls in (a flat distribution's nucleus can hold most
// of a 200k vocabulary). ok is false when min-p keeps nothing.
func (s *sampler) drawNucleus(probs []float32, target float64, mp float32) (int32, bool) {
	nb := int(math.Float32bits(1)>>nucleusShift) + 1
	hist := slices.Grow(s.hist[:0], nb)[:nb]
	clear(hist)
	for _, p := range probs {
		if p > 0 {
			hist[math.Float32bits(p)>>nucleusShift] += float64(p)
		}
	}
	s.hist = hist
	c, above := nb-1, 0.0 // the bucket where the nucleus ends, the mass above it
	for ; c > 0 && above+hist[c] < target; c-- {
		above += hist[c]
	}
	sc := s.bucket(probs, c, s.sel[:0])
	cum, m := above, 0
	for m < len(sc) {
		cum += float64(sc[m].p)
		m++
		if cum >= target {
			break
		}
	}
	sc = sc[:m]
	s.sel = sc
	if mp > 0 {
		if mp > 1 {
			return 0, false
		}
		if int(math.Float32bits(mp)>>nucleusShift) > c {
			// min-p cuts inside the buckets above the nucleus's last: its set, sorted
			sel := s.sel[:0]
			for i, p := range probs {
				if p >= mp {
					sel = append(sel, cand{int32(i), p})
				}
			}
			sortCands(sel)
			s.sel = sel
			total := 0.0
			for _, cd := range sel {
				total += float64(cd.p)
			}
			return walk(sel, s.rng.Float64()*total), true
		}
		for k, cd := range sc { // sorted: keep the prefix >= mp
			if cd.p < mp {
				sc = sc[:k]
				break
			}
		}
	}
	total := above
	for _, cd := range sc {
		total += float64(cd.p)
	}
	u := s.rng.Float64() * total
	for b := nb - 1; b > c; b-- {
		if hist[b] == 0 {
			continue
		}
		if u < hist[b] {
			return s.walkBucket(probs, b, u), true
		}
		u -= hist[b]
	}
	if len(sc) == 0 { // rounding ran past the buckets above
		return s.walkBucket(probs, c+1, 0), true
	}
	for _, cd := range sc {
		u -= float64(cd.p)
		if u < 0 {
			return cd.t, true
		}
	}
	return sc[len(sc)-1].t, true
}

// bucket appends bucket b's entries of probs to dst, sorted by decreasing
// probability, then id.
func (s *sampler) bucket(probs []float32, b int, dst []cand) []cand {
	for i, p := range probs {
		if p > 0 && int(math.Float32bits(p)>>nucleusShift) == b {
			dst = append(dst, cand{int32(i), p})
		}
	}
	sortCands(dst)
	return dst
}

// walkBucket returns the token of bucket b (or, when b is empty, the next
// non-empty bucket above it) where u, the uniform's offset into the bucket,
// falls.
func (s *sampler) walkBucket(probs []float32, b int, u float64) int32 {
	nb := len(s.hist)
	for ; b < nb && s.hist[b] == 0; b++ {
	}
	if b >= nb {
		return argmax(probs)
	}
	sel := s.bucket(probs, b, s.scratch[:0])
	s.scratch = sel
	return walk(sel, u)
}

// walk returns the candidate where u (an offset into their mass) falls,
// the last one when rounding leaves u past the end.
func walk(sel []cand, u float64) int32 {
	if len(sel) == 0 {
		return 0
	}
	for _, cd := range sel {
		u -= float64(cd.p)
		if u < 0 {
			return cd.t
		}
	}
	return sel[len(sel)-1].t
}

func sortCands(sel []cand) {
	slices.SortFunc(sel, func(a, b cand) int {
		if c := cmp.Compare(b.p, a.p); c != 0 {
			return c
		}
		return cmp.Compare(a.t, b.t)
	})
}

// drawSparse draws from candidates idx of row w with relative probabilities
// probs (top-k, min-p: after top-p and min-p filtering in that order), in
// their order; nothing left: the argmax. It keeps the buffers for the next
// token.
func (s *sampler) drawSparse(w []float32, idx []int32, probs []float32) int32 {
	if tp := float64(s.p.TopP); tp > 0 && tp < 1 && s.p.TopK > 0 {
		total := 0.0
		for _, p := range probs {
			total += float64(p)
		}
		idx, probs, s.sel = nucleus(idx, probs, tp*total, s.sel)
	}
	if mp := s.p.MinP; mp > 0 && s.p.TopK > 0 {
		pmax := float32(0)
		for _, p := range probs {
			pmax = max(pmax, p)
		}
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
	s.idx = idx
	if len(idx) == 0 {
		return argmax(w) // (min-p above 1 keeps nothing)
	}
	total := 0.0
	for _, p := range probs {
		total += float64(p)
	}
	u := s.rng.Float64() * total
	for i, p := range probs {
		u -= float64(p)
		if u < 0 {
			return idx[i]
		}
	}
	return idx[len(idx)-1]
}

// sampleBlock: the dense draw keeps a float64 sum per this many logits.
const sampleBlock = 256

// fillDense writes the relative probabilities of w's blocks [b0, b1) into
// probs (0 where skipped, NaN, -Inf) and each block's sum into blocks.
func fillDense(w []float32, mx, invT float32, probs []float32, blocks []float64, b0, b1 int) {
	for b := b0; b < b1; b++ {
		lo, hi := b*sampleBlock, min((b+1)*sampleBlock, len(w))
		var acc [4]float64 // four chains: the float64 adds need not wait for each other
		for i := lo; i < hi; i++ {
			p := float32(0)
			// NaN and -Inf fail the comparison: never candidates
			if x := (w[i] - mx) * invT; x >= -expCut {
				p = exp32(x)
			}
			probs[i] = p
			acc[i&3] += float64(p)
		}
		blocks[b] = (acc[0] + acc[1]) + (acc[2] + acc[3])
	}
}

// fillDenseParallel is fillDense over all blocks in k goroutines (one row
// alone in the step, single-stream decode: its blocks over k cores).
func fillDenseParallel(w []float32, mx, invT float32, probs []float32, blocks []float64, k int) {
	nb := len(blocks)
	var wg sync.WaitGroup
	for j := 1; j < k; j++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fillDense(w, mx, invT, probs, blocks, nb*j/k, nb*(j+1)/k)
		}()
	}
	fillDense(w, mx, invT, probs, blocks, 0, nb/k)
	wg.Wait()
}

// parBlocks: a sampler with par > 1 splits the dense pass over up to par
// goroutines of at least this many blocks each (64k logits: below that the
// goroutines cost more than they save).
const parBlocks = 256

// expCut: draw skips the exp of logits with (l - max) / T below -expCut
// (relative probability < e^-40; see draw).
const expCut = 40

// exp32 is e^x for x in [-expCut, 0] in float32 (relative error < 3e-6,
// < 1e-6 above -10; exp32(0) = 1 exactly): 2^k x 2^f with k = round(x log2 e), |f| <= 1/2,
// 2^f by its Taylor series to degree 7 in f ln 2 (truncation < 6e-9). It is
// written out because math.Exp (float64) was most of the sampler's time.
func exp32(x float32) float32 {
	t := x * 1.442695040888963
	k := int32(t - 0.5) // t <= 0: truncation of t - 1/2 rounds t to the nearest integer
	f := (t - float32(k)) * 0.6931471805599453
	p := 1 + f*(1+f*(1.0/2+f*(1.0/6+f*(1.0/24+f*(1.0/120+f*(1.0/720+f*(1.0/5040)))))))
	return math.Float32frombits(math.Float32bits(p) + uint32(k)<<23)
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
// reaches target (top_p x the candidates' mass; probs need not be
// normalised). Instead of sorting the whole vocabulary it sorts only the
// candidates above a threshold, lowering the threshold until they hold at
// least target; those always contain the nucleus. sel is scratch (returned
// for reuse).
func nucleus(idx []int32, probs []float32, target float64, sel []cand) ([]int32, []float32, []cand) {
	pmax := float32(0)
	for _, p := range probs {
		pmax = max(pmax, p)
	}
	for thr := pmax / 64; ; thr /= 64 {
		sel = sel[:0]
		mass := 0.0
		for i, p := range probs {
			if p >= thr {
				sel = append(sel, cand{idx[i], p})
				mass += float64(p)
			}
		}
		if mass >= target || len(sel) == len(idx) || !(thr > 0) { // (NaN-safe)
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
		cum += float64(c.p)
		if cum >= target {
			break
		}
	}
	return idx, probs, sel
}

// cand is a nucleus candidate.
type cand struct {
	t int32
	p float32
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
