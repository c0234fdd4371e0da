package engine

import (
	"cmp"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
)

func TestBlockPoolAllocReleaseEvict(t *testing.T) {
	p := newBlockPool(3, 2)
	a, ok := p.alloc()
	require.True(t, ok)
	b, _ := p.alloc()
	c, _ := p.alloc()
	_, ok = p.alloc()
	assert.False(t, ok, "pool exhausted")
	assert.Equal(t, 3, p.used)
	assert.ElementsMatch(t, []int32{0, 1, 2}, []int32{a, b, c})

	ka := p.register(a, rootKey, []int32{1, 2})
	kb := p.register(b, ka, []int32{3, 4})
	assert.True(t, p.shared(a), "registered blocks are read-only")
	p.release(a)
	p.release(b)
	p.release(b) // double release is ignored
	assert.Equal(t, 1, p.used)
	assert.Equal(t, 2, p.available())

	blocks, keys := p.lookup([]int32{1, 2, 3, 4, 5}, 10)
	assert.Equal(t, []int32{a, b}, blocks)
	assert.Equal(t, []uint64{ka, kb}, keys)
	blocks, _ = p.lookup([]int32{1, 2, 3, 9}, 10)
	assert.Equal(t, []int32{a}, blocks, "stops at the first differing block")
	blocks, _ = p.lookup([]int32{1, 2, 3, 4}, 1)
	assert.Equal(t, []int32{a}, blocks, "maxBlocks caps the match")

	// Retaining a cached block pins it: alloc must evict the other one.
	p.retain(b)
	assert.Equal(t, 1, p.available())
	d, ok := p.alloc()
	require.True(t, ok)
	assert.Equal(t, a, d, "the unpinned cached block is evicted")
	blocks, _ = p.lookup([]int32{1, 2, 3, 4}, 10)
	assert.Empty(t, blocks, "evicted prefix is gone (and b's chain starts at a)")
	_, ok = p.alloc()
	assert.False(t, ok)
}

func TestBlockPoolLRUOrder(t *testing.T) {
	p := newBlockPool(3, 1)
	var keys []uint64
	for i := range 3 {
		b, _ := p.alloc()
		keys = append(keys, p.register(b, rootKey, []int32{int32(i)}))
	}
	p.release(1) // least recently used
	p.release(0)
	p.release(2)
	b, _ := p.alloc()
	assert.Equal(t, int32(1), b)
	got, _ := p.lookup([]int32{0}, 1)
	assert.Equal(t, []int32{0}, got)
	got, _ = p.lookup([]int32{1}, 1)
	assert.Empty(t, got)
	_ = keys
}

func TestBlockPoolVerifiesKeys(t *testing.T) {
	p := newBlockPool(2, 2)
	a, _ := p.alloc()
	p.register(a, rootKey, []int32{1, 2})
	// Forge a collision: the key of {5, 6} points at a block holding {1, 2}.
	p.index[chainKey(rootKey, []int32{5, 6})] = a
	got, _ := p.lookup([]int32{5, 6}, 1)
	assert.Empty(t, got, "a colliding key never shares wrong KV")
	// Registering an already-known prefix keeps the second block private.
	b, _ := p.alloc()
	p.register(b, rootKey, []int32{1, 2})
	assert.False(t, p.shared(b))
}

func newTestSampler(sp sdk.SamplingParams) *sampler {
	return newSampler(sdk.GenerateRequest{Sampling: sp})
}

func TestGreedyAndBias(t *testing.T) {
	s := newTestSampler(sdk.SamplingParams{})
	tok, info := s.sample([]float32{1, 3, 3, 2}, 0)
	assert.Equal(t, int32(1), tok, "ties go to the lowest id")
	assert.Nil(t, info)
	s = newTestSampler(sdk.SamplingParams{LogitBias: map[int32]float32{3: 5, 99: 1, -1: 1}})
	tok, _ = s.sample([]float32{1, 3, 3, 2}, 0)
	assert.Equal(t, int32(3), tok)
}

func TestPenalties(t *testing.T) {
	s := newSampler(sdk.GenerateRequest{Prompt: []int32{1}, Sampling: sdk.SamplingParams{RepetitionPenalty: 2}})
	tok, _ := s.sample([]float32{0, 3, 2, -1}, 0)
	assert.Equal(t, int32(2), tok, "3/2 < 2")

	s = newTestSampler(sdk.SamplingParams{PresencePenalty: 0.5, FrequencyPenalty: 0.4})
	logits := []float32{0, 2, 1.5, 0}
	tok, _ = s.sample(logits, 0)
	require.Equal(t, int32(1), tok)
	s.accept(tok)
	tok, _ = s.sample(logits, 1)
	assert.Equal(t, int32(2), tok, "2-0.5-0.4 < 1.5")
	assert.Equal(t, float32(2), logits[1], "the model's logits are not modified")
}

func TestMinTokensMasksStop(t *testing.T) {
	s := newSampler(sdk.GenerateRequest{StopTokens: []int32{0}, MinTokens: 2})
	logits := []float32{5, 1, 0}
	tok, _ := s.sample(logits, 1)
	assert.Equal(t, int32(1), tok)
	tok, _ = s.sample(logits, 2)
	assert.Equal(t, int32(0), tok)
}

func softmax(w []float32, temp float64) []float64 {
	out := make([]float64, len(w))
	m := math.Inf(-1)
	for _, v := range w {
		m = max(m, float64(v)/temp)
	}
	sum := 0.0
	for i, v := range w {
		out[i] = math.Exp(float64(v)/temp - m)
		sum += out[i]
	}
	for i := range out {
		out[i] /= sum
	}
	return out
}

// nucleusRef is the textbook top-p: sort everything, cut where the mass
// reaches target (top_p for normalised p).
func nucleusRef(p []float64, target float64) map[int32]bool {
	idx := make([]int32, len(p))
	for i := range idx {
		idx[i] = int32(i)
	}
	slices.SortFunc(idx, func(a, b int32) int {
		if c := cmp.Compare(p[b], p[a]); c != 0 {
			return c
		}
		return cmp.Compare(a, b)
	})
	keep := map[int32]bool{}
	cum := 0.0
	for _, t := range idx {
		keep[t] = true
		cum += p[t]
		if cum >= target {
			break
		}
	}
	return keep
}

func TestNucleusMatchesFullSort(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 1))
	for trial := range 200 {
		n := 1 + r.IntN(3000)
		w := make([]float32, n)
		scale := []float64{0.1, 1, 5, 20}[trial%4]
		for i := range w {
			w[i] = float32(r.NormFloat64() * scale)
		}
		p := softmax(w, 1)
		topP := r.Float64()
		idx := make([]int32, n)
		for i := range idx {
			idx[i] = int32(i)
		}
		p32 := make([]float32, n) // the sampler's relative probabilities
		p64 := make([]float64, n)
		sum, pm := 0.0, slices.Max(p)
		for i, x := range p {
			p32[i] = float32(x / pm)
			p64[i] = float64(p32[i])
			sum += p64[i]
		}
		got, _, _ := nucleus(idx, p32, topP*sum, nil)
		want := nucleusRef(p64, topP*sum)
		require.Len(t, got, len(want), "trial %d n %d topP %.3f", trial, n, topP)
		for _, tk := range got {
			require.True(t, want[tk])
		}
	}
}

func TestSamplingFilters(t *testing.T) {
	r := rand.New(rand.NewPCG(2, 2))
	w := make([]float32, 500)
	for i := range w {
		w[i] = float32(r.NormFloat64() * 3)
	}
	p := softmax(w, 0.7)
	pmax := slices.Max(p)
	order := make([]int32, len(w))
	for i := range order {
		order[i] = int32(i)
	}
	slices.SortFunc(order, func(a, b int32) int { return cmp.Compare(w[b], w[a]) })
	top5 := map[int32]bool{}
	for _, t := range order[:5] {
		top5[t] = true
	}
	nuc := nucleusRef(p, 0.6)

	sk := newTestSampler(sdk.SamplingParams{Temperature: 0.7, TopK: 5, HasSeed: true, Seed: 1})
	sp := newTestSampler(sdk.SamplingParams{Temperature: 0.7, TopP: 0.6, HasSeed: true, Seed: 2})
	sm := newTestSampler(sdk.SamplingParams{Temperature: 0.7, MinP: 0.2, HasSeed: true, Seed: 3})
	seenK := map[int32]bool{}
	for range 2000 {
		tk, _ := sk.sample(w, 0)
		assert.True(t, top5[tk])
		seenK[tk] = true
		tp, _ := sp.sample(w, 0)
		assert.True(t, nuc[tp])
		tm, _ := sm.sample(w, 0)
		assert.GreaterOrEqual(t, p[tm], 0.2*pmax)
	}
	assert.Greater(t, len(seenK), 1, "top-k samples, not argmax")
}

func TestSamplingDistribution(t *testing.T) {
	w := []float32{0, 1, 2, 0.5}
	want := softmax(w, 1)
	s := newTestSampler(sdk.SamplingParams{Temperature: 1, Seed: 9, HasSeed: true})
	counts := make([]float64, len(w))
	const n = 40000
	for range n {
		tk, _ := s.sample(w, 0)
		counts[tk]++
	}
	for i := range w {
		assert.InDelta(t, want[i], counts[i]/n, 0.015, "token %d", i)
	}
}

func TestSeedReproducible(t *testing.T) {
	w := make([]float32, 100)
	for i := range w {
		w[i] = float32(i % 7)
	}
	draw := func(seed uint64) []int32 {
		s := newTestSampler(sdk.SamplingParams{Temperature: 1, Seed: seed, HasSeed: true})
		var out []int32
		for range 50 {
			tk, _ := s.sample(w, 0)
			out = append(out, tk)
		}
		return out
	}
	assert.Equal(t, draw(5), draw(5))
	assert.NotEqual(t, draw(5), draw(6))
}

func TestLogprobInfo(t *testing.T) {
	w := []float32{0, 1, 2, 0.5}
	in := logprobInfo(w, 1, 10)
	p := softmax(w, 1)
	assert.InDelta(t, math.Log(p[1]), float64(in.Logprob), 1e-6)
	require.Len(t, in.Top, 4)
	assert.Equal(t, []int32{2, 1, 3, 0}, []int32{in.Top[0].Token, in.Top[1].Token, in.Top[2].Token, in.Top[3].Token})
	sum := 0.0
	for _, x := range in.Top {
		sum += math.Exp(float64(x.Logprob))
	}
	assert.InDelta(t, 1, sum, 1e-6)
}

func TestTopKMatchesSort(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 3))
	for trial := range 300 {
		n := 1 + r.IntN(2000)
		w := make([]float32, n)
		for i := range w {
			w[i] = float32(r.IntN(50)) // many ties
			if r.IntN(20) == 0 {
				w[i] = float32(math.Inf(-1))
			}
		}
		k := 1 + r.IntN(n)
		got := topK(w, k, nil)
		ref := make([]int32, 0, n)
		for i, v := range w {
			if !math.IsInf(float64(v), -1) {
				ref = append(ref, int32(i))
			}
		}
		slices.SortFunc(ref, func(a, b int32) int {
			if c := cmp.Compare(w[b], w[a]); c != 0 {
				return c
			}
			return cmp.Compare(a, b)
		})
		ref = ref[:min(k, len(ref))]
		slices.Sort(got)
		slices.Sort(ref)
		require.Equal(t, ref, got, "trial %d n %d k %d", trial, n, k)
	}
}

// FuzzSample: any logits (NaN, ±Inf included) and any valid parameters give
// a token inside the vocabulary, never a panic.
func FuzzSample(f *testing.F) {
	f.Add([]byte{0, 0, 128, 63, 0, 0, 0, 64}, float32(1), 2, float32(0.9), float32(0.1), float32(1.2), uint64(1))
	f.Add([]byte{0, 0, 192, 127, 0, 0, 128, 255, 0, 0, 128, 127}, float32(0.5), 0, float32(0), float32(0), float32(0), uint64(2))
	f.Fuzz(func(t *testing.T, raw []byte, temp float32, topK int, topP, minP, rep float32, seed uint64) {
		n := len(raw) / 4
		if n == 0 || n > 4096 {
			return
		}
		logits := make([]float32, n)
		for i := range logits {
			logits[i] = math.Float32frombits(uint32(raw[4*i]) | uint32(raw[4*i+1])<<8 | uint32(raw[4*i+2])<<16 | uint32(raw[4*i+3])<<24)
		}
		clamp := func(x float32) float32 {
			if math.IsNaN(float64(x)) || x < 0 {
				return 0
			}
			return min(x, 1)
		}
		if math.IsNaN(float64(temp)) || temp < 0 {
			temp = 0
		}
		sp := sdk.SamplingParams{Temperature: temp, TopK: max(topK, 0) % (n + 2), TopP: clamp(topP), MinP: clamp(minP),
			RepetitionPenalty: 1 + clamp(rep), PresencePenalty: 0.5, Seed: seed, HasSeed: true,
			LogitBias: map[int32]float32{0: 1}}
		s := newSampler(sdk.GenerateRequest{Prompt: []int32{0, int32(n - 1)}, Sampling: sp, StopTokens: []int32{0}, MinTokens: 1, TopLogprobs: 3})
		for g := range 3 {
			tok, info := s.sample(logits, g)
			if tok < 0 || int(tok) >= n {
				t.Fatalf("token %d outside [0, %d)", tok, n)
			}
			if info == nil {
				t.Fatal("no logprobs")
			}
			s.accept(tok)
		}
	})
}
