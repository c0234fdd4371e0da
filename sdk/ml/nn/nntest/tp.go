package nntest

// Tensor parallelism in one process, for the tests of split models: an
// in-process ml.Comm (goroutines meeting at a barrier over shared memory,
// summing in rank order so every rank gets bit-identical results) and
// SplitModel, which runs every call on all ranks at once and answers with
// rank 0's result, as sdk/tp's leader and followers do across processes.
// Written here rather than using sdk/tp's TCP group so that the model tests
// need no sockets and can inject a failing round (FailAt); the loader tests
// use the real group.

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/nn"
)

// localGroup is the shared state of LocalComms' ranks: one all-reduce round
// at a time. A round fills (every rank hands in its vector), sums in rank
// order, then drains (every rank copies the sum out) before the next fills.
type localGroup struct {
	mu       sync.Mutex
	cond     *sync.Cond
	size     int
	in       [][]float32
	arrived  int
	sum      []float32
	draining int // ranks yet to copy the sum out; > 0: the round is draining
	err      error
	calls    int // completed rounds
	failAt   int // > 0: the failAt-th round fails on every rank (tests)
}

// LocalComm is one rank of LocalComms.
type LocalComm struct {
	g    *localGroup
	rank int
	err  error
	host []float32
}

var _ ml.Comm = (*LocalComm)(nil)

// LocalComms returns the size ranks of an in-process tensor-parallel group.
// Each rank's AllReduce must be called from its own goroutine (it blocks
// until every rank called it). Closing any rank breaks the group: pending
// and later all-reduces of every rank fail (sticky, Err).
func LocalComms(size int) []*LocalComm {
	g := &localGroup{size: size, in: make([][]float32, size)}
	g.cond = sync.NewCond(&g.mu)
	out := make([]*LocalComm, size)
	for r := range out {
		out[r] = &LocalComm{g: g, rank: r}
	}
	return out
}

// FailAt makes the n-th all-reduce round (1-based, counted from now) fail on
// every rank, as a broken transport would.
func (c *LocalComm) FailAt(n int) {
	c.g.mu.Lock()
	c.g.failAt = c.g.calls + n
	c.g.mu.Unlock()
}

func (c *LocalComm) Rank() int       { return c.rank }
func (c *LocalComm) Size() int       { return c.g.size }
func (c *LocalComm) Graphable() bool { return false }
func (c *LocalComm) Err() error      { return c.err }

// Close breaks the group (every rank's pending and later calls fail).
func (c *LocalComm) Close() error {
	g := c.g
	g.mu.Lock()
	if g.err == nil {
		g.err = fmt.Errorf("tensor-parallel group closed by rank %d", c.rank)
	}
	g.cond.Broadcast()
	g.mu.Unlock()
	return nil
}

// AllReduce sums t over the ranks (read to the host, summed, written back).
func (c *LocalComm) AllReduce(b ml.Backend, t ml.Tensor) {
	if c.err != nil {
		return
	}
	if cap(c.host) < t.Len() {
		c.host = make([]float32, t.Len())
	}
	v := c.host[:t.Len()]
	if err := b.ReadF32(t, v); err != nil {
		c.err = fmt.Errorf("all-reduce: %w", err)
		return
	}
	if err := c.g.reduce(c.rank, v); err != nil {
		c.err = err
		return
	}
	if err := b.WriteF32(t, v); err != nil {
		c.err = fmt.Errorf("all-reduce: %w", err)
	}
}

func (g *localGroup) reduce(rank int, v []float32) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.draining > 0 && g.err == nil {
		g.cond.Wait()
	}
	if g.err != nil {
		return g.err
	}
	g.in[rank] = v
	g.arrived++
	if g.arrived == g.size {
		g.calls++
		switch {
		case g.failAt > 0 && g.calls == g.failAt:
			g.err = fmt.Errorf("all-reduce round %d: injected failure", g.calls)
		default:
			for r := range g.in {
				if len(g.in[r]) != len(v) {
					g.err = fmt.Errorf("all-reduce: rank %d sent %d floats, rank %d %d", r, len(g.in[r]), rank, len(v))
				}
			}
		}
		if g.err == nil {
			g.sum = make([]float32, len(v))
			for r := range g.in { // rank order: the same sum on every rank
				for i, x := range g.in[r] {
					g.sum[i] += x
				}
			}
			g.draining = g.size
		}
		g.cond.Broadcast()
	}
	for g.draining == 0 && g.err == nil {
		g.cond.Wait()
	}
	if g.err != nil {
		return g.err
	}
	copy(v, g.sum)
	g.draining--
	if g.draining == 0 {
		g.arrived = 0
		clear(g.in)
		g.cond.Broadcast()
	}
	return nil
}

// SplitModel runs a model split over ranks in one process: every call runs
// on all ranks concurrently (each rank's collectives meet the others') and
// returns rank 0's result (errors of every rank joined). A rank whose call
// fails closes its comm (when Comms is set), so the others' all-reduces fail
// instead of waiting for it, as sdk/tp's leader and followers do.
type SplitModel struct {
	Ranks []engine.Model
	Comms []*LocalComm // Comms[r] is rank r's (optional)
}

var (
	_ engine.GreedyModel = (*SplitModel)(nil)
	_ engine.GroupModel  = (*SplitModel)(nil)
)

func each[T any](s *SplitModel, f func(m engine.Model) (T, error)) (T, error) {
	res := make([]T, len(s.Ranks))
	errs := make([]error, len(s.Ranks))
	var wg sync.WaitGroup
	for r, m := range s.Ranks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[r], errs[r] = f(m)
			if errs[r] != nil && r < len(s.Comms) {
				s.Comms[r].Close() //nolint:errcheck // breaks the group: the others stop waiting
			}
		}()
	}
	wg.Wait()
	return res[0], errors.Join(errs...)
}

func (s *SplitModel) Spec() engine.Spec { return s.Ranks[0].Spec() }

func (s *SplitModel) Forward(ctx context.Context, b *engine.Batch) (*engine.Output, error) {
	return each(s, func(m engine.Model) (*engine.Output, error) { return m.Forward(ctx, b) })
}

func (s *SplitModel) ForwardGreedy(ctx context.Context, b *engine.Batch) ([]int32, error) {
	return each(s, func(m engine.Model) ([]int32, error) {
		gm, ok := m.(engine.GreedyModel)
		if !ok {
			return nil, errors.New("rank model is not an engine.GreedyModel")
		}
		return gm.ForwardGreedy(ctx, b)
	})
}

func (s *SplitModel) CopyBlock(dst, src int32) error {
	_, err := each(s, func(m engine.Model) (struct{}, error) { return struct{}{}, m.CopyBlock(dst, src) })
	return err
}

func (s *SplitModel) CopyGroupBlock(g int, dst, src int32) error {
	_, err := each(s, func(m engine.Model) (struct{}, error) {
		gm, ok := m.(engine.GroupModel)
		if !ok {
			return struct{}{}, errors.New("rank model is not an engine.GroupModel")
		}
		return struct{}{}, gm.CopyGroupBlock(g, dst, src)
	})
	return err
}

func (s *SplitModel) Close() error {
	var errs []error
	for _, m := range s.Ranks {
		errs = append(errs, m.Close())
	}
	return errors.Join(errs...)
}

// LoadSplit writes c and builds it split size ways with load, each rank on
// its own CPU backend (1 thread) over LocalComms, with Load's defaults for
// the KV pool; the model is closed when the test ends. It also returns the
// comms (for FailAt).
func LoadSplit(t *testing.T, c Config, size int, opts nn.Options, load func(path string, opts nn.Options) (engine.Model, error)) (*SplitModel, []*LocalComm) {
	t.Helper()
	return LoadSplitOn(t, MustWrite(t, c), size, opts, load, func(int) ml.Backend { return cpu.New(1) })
}

// LoadSplitOn is LoadSplit of the GGUF at path with rank r on backend(r)
// (e.g. one CUDA backend per rank on the same GPU); the backends are closed
// with the model.
func LoadSplitOn(t *testing.T, path string, size int, opts nn.Options, load func(path string, opts nn.Options) (engine.Model, error),
	backend func(rank int) ml.Backend) (*SplitModel, []*LocalComm) {
	t.Helper()
	if opts.NumBlocks == 0 {
		opts.NumBlocks = 64
	}
	if opts.BlockSize == 0 {
		opts.BlockSize = 4
	}
	if opts.WindowBlocks == 0 {
		opts.WindowBlocks = opts.NumBlocks
	}
	comms := LocalComms(size)
	s := &SplitModel{Comms: comms}
	var bes []ml.Backend
	for r := range size {
		o := opts
		o.Backend = backend(r)
		bes = append(bes, o.Backend)
		o.Shard = ml.Shard{Rank: r, Size: size, Comm: comms[r]}
		m, err := load(path, o)
		require.NoError(t, err, "rank %d", r)
		s.Ranks = append(s.Ranks, m)
	}
	t.Cleanup(func() {
		require.NoError(t, s.Close())
		for _, b := range bes {
			require.NoError(t, b.Close())
		}
	})
	return s, comms
}

// MaxRelErr is max|got-want| / max|want|.
func MaxRelErr(got, want []float32) float64 {
	var d, w float64
	for i := range want {
		d = max(d, math.Abs(float64(got[i])-float64(want[i])))
		w = max(w, math.Abs(float64(want[i])))
	}
	return d / w
}

// CompareSplit checks a split model against the whole model of the same
// file: logits within tol of max|logit| over a prefill of n tokens (all
// rows), the prompt decoded token by token, a batch mixing a prefill with
// a decode (shuffled block tables), and identical greedy continuations of
// steps tokens.
func CompareSplit(t *testing.T, ref, m engine.Model, n, steps int, tol float64) {
	t.Helper()
	spec := m.Spec()
	V, bs := spec.VocabSize, spec.BlockSize
	require.Equal(t, ref.Spec().VocabSize, V)
	rng := rand.New(rand.NewPCG(91, uint64(n)))
	prompt := Prompt(rng, n, V)
	ra, ma := newBlockAlloc(ref.Spec().NumBlocks, rng), newBlockAlloc(spec.NumBlocks, rng)
	want := Prefill(t, ref, prompt, ra.table(t, n, bs))
	got := Prefill(t, m, prompt, ma.table(t, n, bs))
	e := MaxRelErr(got, want)
	t.Logf("prefill %d tokens: max error / max|logit| %.3g", n, e)
	assert.LessOrEqual(t, e, tol, "prefill")

	blocks := ma.table(t, n, bs)
	var dec []float32
	for pos := 0; pos < n; pos++ {
		out, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt[pos : pos+1], Pos: pos, Blocks: blocks[:pos/bs+1]}}})
		require.NoError(t, err)
		dec = append(dec, out.Logits[0]...)
	}
	e = MaxRelErr(dec, want)
	t.Logf("decode %d steps: max error / max|logit| %.3g", n, e)
	assert.LessOrEqual(t, e, tol, "token-by-token decode")

	b1 := ma.table(t, n, bs)
	_, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt[:n-1], Blocks: b1}}})
	require.NoError(t, err)
	other := Prompt(rng, n/2+1, V)
	wantOther := Prefill(t, ref, other, ra.table(t, len(other), bs))
	out, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{
		{Tokens: other, Blocks: ma.table(t, len(other), bs), AllLogits: true},
		{Tokens: prompt[n-1:], Pos: n - 1, Blocks: b1},
	}})
	require.NoError(t, err)
	assert.LessOrEqual(t, MaxRelErr(out.Logits[0], wantOther), tol, "batched prefill")
	assert.LessOrEqual(t, MaxRelErr(out.Logits[1], want[(n-1)*V:]), tol, "batched decode")

	if steps > 0 {
		assert.Equal(t, Greedy(t, ref, prompt[:4], steps), Greedy(t, m, prompt[:4], steps), "greedy tokens")
	}
}

// CheckShardBytes builds every rank of c split size ways on counting CPU
// backends and asserts the per-rank accounting: each rank's weights equal
// its footprint's WeightBytes (fp, the rank's plan) and what it handed the
// backend; its KV cache is the whole model's over size; the ranks' weights
// add up to the whole model's plus (size-1) copies of the replicated part
// (replicated = what every rank holds beyond its 1/size share).
func CheckShardBytes(t *testing.T, c Config, size int, opts nn.Options, load func(path string, opts nn.Options) (engine.Model, error), fp nn.Footprinter) {
	t.Helper()
	path := MustWrite(t, c)
	if opts.NumBlocks == 0 {
		opts.NumBlocks = 16
	}
	build := func(s ml.Shard) (*nn.Runner, *Counting) {
		o := opts
		cb := &Counting{Backend: cpu.New(1)}
		o.Backend, o.Shard = cb, s
		m, err := load(path, o)
		require.NoError(t, err, "rank %d of %d", s.Rank, s.Size)
		t.Cleanup(func() { require.NoError(t, m.Close()) })
		r, ok := m.(*nn.Runner)
		require.True(t, ok, "load returns an *nn.Runner")
		return r, cb
	}
	whole, _ := build(ml.Shard{})
	wfp, err := OpenFootprint(path, fp)
	require.NoError(t, err)
	require.Equal(t, wfp.WeightBytes, whole.WeightBytes)
	comms := LocalComms(size)
	var sum, lead int64
	for r := range size {
		s := ml.Shard{Rank: r, Size: size, Comm: comms[r]}
		m, cb := build(s)
		rfp, err := OpenShardFootprint(path, fp, ml.Shard{Rank: r, Size: size})
		require.NoError(t, err)
		assert.Equal(t, rfp.WeightBytes, m.WeightBytes, "rank %d: weights == its plan", r)
		assert.LessOrEqual(t, cb.Weights, m.WeightBytes, "rank %d: bytes handed to the backend", r)
		assert.Equal(t, whole.KV.Bytes(), int64(size)*m.KV.Bytes(), "rank %d: KV = whole / size", r)
		assert.Equal(t, wfp.KVHeads, size*rfp.KVHeads)
		assert.Less(t, m.WeightBytes, whole.WeightBytes, "rank %d holds less than the whole model", r)
		sum += m.WeightBytes
		if r == 0 {
			lead = m.WeightBytes
		} else {
			assert.LessOrEqual(t, m.WeightBytes, lead, "rank 0 holds the biases the others do not")
		}
	}
	// replicated bytes: whole - split - leadOnly; sum = split + leadOnly + size*replicated
	var split, leadOnly int64
	f, err := gguf.Open(path)
	require.NoError(t, err)
	defer f.Close()
	for _, ti := range f.Tensors {
		n := ti.Size
		if nn.VectorName(ti.Name) && ml.DType(ti.Type) != ml.F32 {
			n = 4 * ti.Elements()
		}
		switch nn.SplitOf(ti.Name).Kind {
		case nn.SplitDim:
			split += n
		case nn.LeadOnly:
			leadOnly += n
		}
	}
	require.Positive(t, split)
	replicated := whole.WeightBytes - split - leadOnly
	assert.Equal(t, split+leadOnly+int64(size)*replicated, sum, "ranks' weights: whole + (size-1) x replicated")
}
