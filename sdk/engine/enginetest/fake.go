// Package enginetest holds a fake engine.Model for testing the serving engine
// and tools built on it (orch-host bench) without weights.
//
// The fake keeps a real paged KV pool: every (block, slot) stores the token
// and position written there. A forward pass reads the whole context of each
// token back through the sequence's block table and its logits are a
// deterministic function of everything it read, so a wrong block table, lost
// or overwritten KV, bad prefix sharing or a preemption bug changes the
// generated tokens (and reads of never-written or misplaced slots are
// reported as errors). It lives in a normal package, not a _test file,
// because the engine's tests and the bench command's tests both use it.
//
// With Config.Window the fake declares two KV groups like gpt-oss: group 0
// (full attention) and a window group with its own pool. It writes every
// token into both and checks that each token's window (the positions it
// would attend to in a window layer) reads back the right tokens through the
// window group's table, so a block freed too early or a wrong window table
// is an error; it also counts tables that hold more blocks than the window
// bound ceil((W+n)/BlockSize)+1 for a chunk of n tokens.
package enginetest

import (
	"context"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
)

// Config shapes a fake model.
type Config struct {
	Vocab         int           // vocabulary size (default 64)
	BlockSize     int           // tokens per KV block (default 4)
	NumBlocks     int           // KV blocks in the pool (default 256)
	ContextLength int           // max tokens per sequence (default 1024)
	StepCost      time.Duration // simulated time per Forward call (fixed cost, like reading the weights once)
	TokenCost     time.Duration // simulated time per token in a Forward call
	MaxSequences  int           // reported in ModelInfo (0 = let the engine choose)
	DeviceGreedy  bool          // the model implements engine.GreedyModel
	// DeviceSample: the model implements engine.SamplingModel (and
	// GreedyModel) with ml.SampleRowRef, the host twin of the CUDA sampler.
	DeviceSample bool
	// Window > 0 declares a second KV group of window layers with
	// WindowBlocks blocks (default NumBlocks) in its own pool.
	Window, WindowBlocks int
}

func (c Config) withDefaults() Config {
	if c.Vocab <= 0 {
		c.Vocab = 64
	}
	if c.BlockSize <= 0 {
		c.BlockSize = 4
	}
	if c.NumBlocks <= 0 {
		c.NumBlocks = 256
	}
	if c.ContextLength <= 0 {
		c.ContextLength = 1024
	}
	if c.Window > 0 && c.WindowBlocks <= 0 {
		c.WindowBlocks = c.NumBlocks
	}
	return c
}

type slot struct {
	tok, pos int32
	ok       bool
}

// Model is the fake. Counters are safe to read concurrently.
type Model struct {
	cfg Config
	kv  []slot // NumBlocks*BlockSize
	kvw []slot // WindowBlocks*BlockSize: the window group's pool

	busy   atomic.Bool
	closed atomic.Bool

	Forwards     atomic.Int64 // Forward calls
	Tokens       atomic.Int64 // tokens processed (prefill + decode)
	MaxBatchSeqs atomic.Int64 // largest number of sequences in one Forward
	MixedSteps   atomic.Int64 // Forward calls holding both a decode (1 token) and a prefill chunk (>1 token)
	MaxMixed     atomic.Int64 // most tokens in one such mixed Forward call
	Copies       atomic.Int64 // CopyBlock calls
	GreedySteps  atomic.Int64 // ForwardGreedy calls
	SampleSteps  atomic.Int64 // ForwardSample calls
	SampledRows  atomic.Int64 // tokens drawn by ForwardSample (greedy and sampled rows, not Host ones)
	WindowCopies atomic.Int64 // CopyGroupBlock calls
	// MaxWindowBlocks is the most window-group blocks one sequence's table
	// held in a Forward call; OverWindow counts tables holding more than
	// ceil((Window+n)/BlockSize)+1 blocks for a chunk of n tokens.
	MaxWindowBlocks, OverWindow atomic.Int64

	mu    sync.Mutex
	sizes []int // tokens per sequence of each step (last 1000 steps), for tests
}

// New makes a fake model.
func New(cfg Config) *Model {
	cfg = cfg.withDefaults()
	return &Model{cfg: cfg, kv: make([]slot, cfg.NumBlocks*cfg.BlockSize), kvw: make([]slot, cfg.WindowBlocks*cfg.BlockSize)}
}

// Loader returns an engine.Loader that makes a new fake per Load; got (if not
// nil) receives each model made.
func Loader(cfg Config, got func(*Model)) engine.Loader {
	return func(ctx context.Context, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (engine.Model, sdk.ModelInfo, error) {
		if err := ctx.Err(); err != nil {
			return nil, sdk.ModelInfo{}, err
		}
		m := New(cfg)
		progress(sdk.LoadProgress{Stage: "kv", Done: 1, Total: 1})
		if got != nil {
			got(m)
		}
		c := m.cfg
		var em engine.Model = m
		if c.DeviceGreedy {
			em = DeviceGreedy{m}
		}
		if c.DeviceSample {
			em = DeviceSampler{DeviceGreedy{m}}
		}
		return em, sdk.ModelInfo{
			Architecture: "fake", Name: "fake", Backend: "cpu", DeviceName: "cpu (fake)",
			ContextLength: c.ContextLength, VocabSize: c.Vocab, MaxSequences: c.MaxSequences,
			KVBytes: m.Spec().KVBytes(),
		}, nil
	}
}

// Spec implements engine.Model.
func (m *Model) Spec() engine.Spec {
	c := m.cfg
	s := engine.Spec{
		Architecture: "fake", VocabSize: c.Vocab, ContextLength: c.ContextLength,
		BlockSize: c.BlockSize, NumBlocks: c.NumBlocks, KVBlockBytes: int64(c.BlockSize * 8),
	}
	if c.Window > 0 {
		s.SlidingWindow = c.Window
		s.Groups = []engine.KVGroup{
			{Name: "full", Layers: 1, NumBlocks: c.NumBlocks, BlockBytes: s.KVBlockBytes},
			{Name: "window", Window: c.Window, Layers: 1, NumBlocks: c.WindowBlocks, BlockBytes: s.KVBlockBytes},
		}
	}
	return s
}

// Logits is the fake's logits row for a context hash (exported so tests can
// compute expected tokens independently of the engine).
func Logits(h uint64, vocab int, dst []float32) []float32 {
	for v := 0; v < vocab; v++ {
		x := mix(h ^ (uint64(v)+1)*0x9e3779b97f4a7c15)
		dst = append(dst, float32(x>>48)/8192-4)
	}
	return dst
}

// Step folds one (token, position) into a context hash; Root is the empty context.
func Step(h uint64, tok int32, pos int) uint64 {
	return mix(h ^ uint64(uint32(tok))<<20 ^ uint64(pos)*0xff51afd7ed558ccd)
}

// Root is the hash of the empty context.
const Root uint64 = 0x243f6a8885a308d3

func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// Greedy returns the tokens greedy decoding produces after prompt, computed
// directly (no KV cache): the reference the engine's output must equal.
func Greedy(prompt []int32, n, vocab int) []int32 {
	return continuation(prompt, n, vocab, func(row []float32, _ int) int32 {
		best := 0
		for v := range row {
			if row[v] > row[best] {
				best = v
			}
		}
		return int32(best)
	})
}

// continuation feeds prompt, then n tokens, each pick(logits of the context,
// its index), and returns those tokens.
func continuation(prompt []int32, n, vocab int, pick func(row []float32, i int) int32) []int32 {
	h := Root
	for i, t := range prompt {
		h = Step(h, t, i)
	}
	var out []int32
	row := make([]float32, 0, vocab)
	for len(out) < n {
		row = Logits(h, vocab, row[:0])
		tok := pick(row, len(out))
		h = Step(h, tok, len(prompt)+len(out))
		out = append(out, tok)
	}
	return out
}

// Sampled is the continuation a DeviceSampler draws for prompt with these
// settings: token i is ml.SampleRowRef of the context's logits with counter
// i (the reference for engine tests of device sampling).
func Sampled(prompt []int32, n, vocab int, p ml.SampleParams) []int32 {
	return continuation(prompt, n, vocab, func(row []float32, i int) int32 {
		p.Counter = uint64(i)
		return ml.SampleRowRef(row, p)
	})
}

// Forward implements engine.Model.
func (m *Model) Forward(ctx context.Context, b *engine.Batch) (*engine.Output, error) {
	if !m.busy.CompareAndSwap(false, true) {
		return nil, fmt.Errorf("fake: concurrent Forward calls")
	}
	defer m.busy.Store(false)
	if m.closed.Load() {
		return nil, fmt.Errorf("fake: model closed")
	}
	bs, vocab := m.cfg.BlockSize, m.cfg.Vocab
	out := &engine.Output{Logits: make([][]float32, len(b.Seqs))}
	tokens, decode, prefill := 0, false, false
	var sizes []int
	for i, s := range b.Seqs {
		if len(s.Tokens) == 0 || s.Pos < 0 || s.Pos+len(s.Tokens) > m.cfg.ContextLength {
			return nil, fmt.Errorf("fake: seq %d: %d tokens at position %d", i, len(s.Tokens), s.Pos)
		}
		if len(s.Blocks)*bs < s.Pos+len(s.Tokens) {
			return nil, fmt.Errorf("fake: seq %d: %d blocks cannot hold %d positions", i, len(s.Blocks), s.Pos+len(s.Tokens))
		}
		seen := make(map[int32]bool, len(s.Blocks))
		for _, blk := range s.Blocks {
			if blk < 0 || int(blk) >= m.cfg.NumBlocks || seen[blk] {
				return nil, fmt.Errorf("fake: seq %d: bad or repeated block %d in table %v", i, blk, s.Blocks)
			}
			seen[blk] = true
		}
		// Read the context back through the block table.
		h := Root
		for q := 0; q < s.Pos; q++ {
			sl := m.kv[int(s.Blocks[q/bs])*bs+q%bs]
			if !sl.ok || int(sl.pos) != q {
				return nil, fmt.Errorf("fake: seq %d: KV slot for position %d (block %d) holds %+v", i, q, s.Blocks[q/bs], sl)
			}
			h = Step(h, sl.tok, q)
		}
		var rows []float32
		for k, t := range s.Tokens {
			if t < 0 || int(t) >= vocab {
				return nil, fmt.Errorf("fake: seq %d: token %d outside vocabulary", i, t)
			}
			p := s.Pos + k
			m.kv[int(s.Blocks[p/bs])*bs+p%bs] = slot{tok: t, pos: int32(p), ok: true}
			h = Step(h, t, p)
			if s.AllLogits || k == len(s.Tokens)-1 {
				rows = Logits(h, vocab, rows)
			}
		}
		if m.cfg.Window > 0 {
			if err := m.window(i, s); err != nil {
				return nil, err
			}
		}
		out.Logits[i] = rows
		tokens += len(s.Tokens)
		if len(s.Tokens) == 1 {
			decode = true
		} else {
			prefill = true
		}
		sizes = append(sizes, len(s.Tokens))
	}
	m.Forwards.Add(1)
	m.Tokens.Add(int64(tokens))
	if decode && prefill {
		m.MixedSteps.Add(1)
		for {
			cur := m.MaxMixed.Load()
			if int64(tokens) <= cur || m.MaxMixed.CompareAndSwap(cur, int64(tokens)) {
				break
			}
		}
	}
	for {
		cur := m.MaxBatchSeqs.Load()
		if int64(len(b.Seqs)) <= cur || m.MaxBatchSeqs.CompareAndSwap(cur, int64(len(b.Seqs))) {
			break
		}
	}
	m.mu.Lock()
	m.sizes = append(m.sizes, sizes...)
	if len(m.sizes) > 100000 {
		m.sizes = m.sizes[len(m.sizes)-1000:]
	}
	m.mu.Unlock()
	if cost := m.cfg.StepCost + time.Duration(tokens)*m.cfg.TokenCost; cost > 0 {
		t := time.NewTimer(cost)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		}
	}
	return out, nil
}

// window writes s's tokens into the window group and checks that every
// token's window reads back through the window table (see the package doc).
func (m *Model) window(i int, s engine.SeqInput) error {
	bs, w := m.cfg.BlockSize, m.cfg.Window
	t := s.Blocks
	if s.GroupBlocks != nil {
		if len(s.GroupBlocks) != 2 || len(s.GroupBlocks[0]) != len(s.Blocks) {
			return fmt.Errorf("fake: seq %d: %d group tables", i, len(s.GroupBlocks))
		}
		t = s.GroupBlocks[1]
	}
	end := s.Pos + len(s.Tokens)
	if len(t)*bs < end {
		return fmt.Errorf("fake: seq %d: window table of %d blocks cannot hold %d positions", i, len(t), end)
	}
	lo := max(0, s.Pos-w+1) / bs // first block the chunk's first token sees
	held := 0
	seen := make(map[int32]bool, len(t))
	for j, blk := range t {
		if blk < 0 && j >= lo {
			return fmt.Errorf("fake: seq %d: window block %d (positions from %d) freed but visible from position %d: %v", i, j, j*bs, s.Pos, t)
		}
		if blk >= 0 {
			if int(blk) >= m.cfg.WindowBlocks || seen[blk] {
				return fmt.Errorf("fake: seq %d: bad or repeated window block %d in table %v", i, blk, t)
			}
			seen[blk] = true
			held++
		}
	}
	if bound := (w+len(s.Tokens)+bs-1)/bs + 1; held > bound {
		m.OverWindow.Add(1)
	}
	for {
		cur := m.MaxWindowBlocks.Load()
		if int64(held) <= cur || m.MaxWindowBlocks.CompareAndSwap(cur, int64(held)) {
			break
		}
	}
	for k, tok := range s.Tokens {
		p := s.Pos + k
		m.kvw[int(t[p/bs])*bs+p%bs] = slot{tok: tok, pos: int32(p), ok: true}
	}
	for p := s.Pos; p < end; p++ {
		for q := max(0, p-w+1); q <= p; q++ {
			got := m.kvw[int(t[q/bs])*bs+q%bs]
			want := m.kv[int(s.Blocks[q/bs])*bs+q%bs]
			if got != want {
				return fmt.Errorf("fake: seq %d: window KV for position %d (seen from %d) holds %+v, the full group %+v", i, q, p, got, want)
			}
		}
	}
	return nil
}

// DeviceGreedy is the fake with a "device" argmax: it implements engine.GreedyModel.
type DeviceGreedy struct{ *Model }

// ForwardGreedy implements engine.GreedyModel: the argmax of each row Forward returns.
func (g DeviceGreedy) ForwardGreedy(ctx context.Context, b *engine.Batch) ([]int32, error) {
	for _, s := range b.Seqs {
		if s.AllLogits {
			return nil, fmt.Errorf("fake: ForwardGreedy with AllLogits")
		}
	}
	out, err := g.Forward(ctx, b)
	if err != nil {
		return nil, err
	}
	g.GreedySteps.Add(1)
	toks := make([]int32, len(out.Logits))
	for i, row := range out.Logits {
		best := 0
		for v := range row {
			if row[v] > row[best] {
				best = v
			}
		}
		toks[i] = int32(best)
	}
	return toks, nil
}

// DeviceSampler is the fake with a "device" sampler: it implements
// engine.SamplingModel (and GreedyModel) with ml.SampleRowRef.
type DeviceSampler struct{ DeviceGreedy }

// DeviceSampling implements engine.SamplingModel.
func (d DeviceSampler) DeviceSampling() bool { return true }

// ForwardSample implements engine.SamplingModel: each non-Host row's token
// is ml.SampleRowRef of the row Forward returns; Host rows' logits are
// returned.
func (d DeviceSampler) ForwardSample(ctx context.Context, b *engine.Batch, specs []engine.SampleSpec) ([]int32, *engine.Output, error) {
	if len(specs) != len(b.Seqs) {
		return nil, nil, fmt.Errorf("fake: %d sample specs for %d sequences", len(specs), len(b.Seqs))
	}
	for _, s := range b.Seqs {
		if s.AllLogits {
			return nil, nil, fmt.Errorf("fake: ForwardSample with AllLogits")
		}
	}
	out, err := d.Forward(ctx, b)
	if err != nil {
		return nil, nil, err
	}
	d.SampleSteps.Add(1)
	toks := make([]int32, len(out.Logits))
	for i, sp := range specs {
		if sp.Host {
			continue
		}
		row := out.Logits[i]
		toks[i] = ml.SampleRowRef(row[len(row)-d.cfg.Vocab:], ml.SampleParams{Temperature: sp.Temperature, TopK: int32(min(sp.TopK, math.MaxInt32)),
			TopP: sp.TopP, MinP: sp.MinP, Seed: sp.Seed, Counter: sp.Index})
		out.Logits[i] = nil
		d.SampledRows.Add(1)
	}
	return toks, out, nil
}

// MaxChunk is the largest number of tokens any one sequence had in a Forward call.
func (m *Model) MaxChunk() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	best := 0
	for _, n := range m.sizes {
		best = max(best, n)
	}
	return best
}

// CopyBlock implements engine.Model: the block in every group (the ids of
// a caller that passes one table for all groups).
func (m *Model) CopyBlock(dst, src int32) error {
	if err := m.CopyGroupBlock(0, dst, src); err != nil {
		return err
	}
	if m.cfg.Window > 0 {
		return m.CopyGroupBlock(1, dst, src)
	}
	return nil
}

// CopyGroupBlock implements engine.GroupModel (group 1 is the window pool).
func (m *Model) CopyGroupBlock(group int, dst, src int32) error {
	kv, n, count := m.kv, int32(m.cfg.NumBlocks), &m.Copies
	if group == 1 && m.cfg.Window > 0 {
		kv, n, count = m.kvw, int32(m.cfg.WindowBlocks), &m.WindowCopies
	} else if group != 0 {
		return fmt.Errorf("fake: copy block of group %d", group)
	}
	if dst < 0 || dst >= n || src < 0 || src >= n {
		return fmt.Errorf("fake: copy group %d block %d -> %d out of range", group, src, dst)
	}
	bs := m.cfg.BlockSize
	copy(kv[int(dst)*bs:int(dst+1)*bs], kv[int(src)*bs:int(src+1)*bs])
	count.Add(1)
	return nil
}

// Close implements engine.Model.
func (m *Model) Close() error {
	m.closed.Store(true)
	return nil
}
