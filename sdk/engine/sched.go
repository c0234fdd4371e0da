package engine

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/ml"
)

// How the engine serves (the design in one place):
//
// Requests: Generate and Evaluate validate their tokens, queue a seq in the
// bounded FIFO waiting queue (full: sdk.ErrBusy) and then only read their
// own output buffer; the scheduler never blocks on a slow client.
//
// One scheduler goroutine (loop) repeats a step:
//  1. reap: sequences canceled (Cancel(id), ctx, emit error) leave the batch
//     and free their blocks before anything else runs;
//  2. admit: waiting sequences join the running batch in arrival order while
//     there is a slot (max sequences) and blocks for their whole uncached
//     prompt plus one spare block per running sequence; the head of the queue
//     is never overtaken. Admission looks the prompt up in the prefix cache;
//  3. plan: every decoding sequence gets its one token, prefilling sequences
//     share the rest of the token budget (oldest first; with decodes in the
//     step the smaller mixed budget), so a long prompt is prefilled in
//     chunks mixed with the running decodes. Blocks are
//     allocated as positions need them; when the pool is exhausted the
//     youngest running sequence is preempted (blocks freed, back to the
//     queue in arrival order, recomputed from its prompt and generated tokens
//     when readmitted — its full blocks usually come back from the prefix
//     cache). A sequence never writes into a block someone else can read:
//     such a block is copied first (Model.CopyBlock);
//  4. forward: one Model.Forward (or GreedyModel.ForwardGreedy when only
//     plain greedy tokens are needed, or SamplingModel.ForwardSample when a
//     sequence's token can be drawn on the device: sampler.device; unless
//     WithDeviceSampling(false) / engine.device_sample=false) over the mixed
//     batch;
//  5. sample and stream: finished prefills and decodes not drawn on the
//     device sample their next token on the host (in parallel over
//     sequences for big batches), full
//     blocks are registered in the prefix cache, stop conditions are checked;
//     then the stats are published and the tokens and final chunks delivered.
//
// KV groups (Spec.Groups; see the package doc): each group has its own
// blockPool and each sequence one table per group, all indexed by logical
// block. Group 0 drives the prefix keys. Every step the scheduler allocates
// in all groups (exhausting any one preempts), and after it trims each
// window group's table to the blocks the sequence's next query can see,
// releasing the rest at once (a registered block goes to its pool's LRU).

// sched is a loaded model with its scheduler goroutine.
//
// One goroutine (loop) owns the running batch, the block pool and every call
// into the model. Request goroutines only touch the waiting queue, the id map
// and the published stats, under mu, and read their own sequence's output
// buffer.
type sched struct {
	model   Model
	spec    Spec
	log     hclog.Logger
	ctxLen  int // max tokens per sequence (prompt + generated)
	maxSeqs int
	budget  int // tokens per forward step
	mixed   int // tokens per forward step that carries decodes (<= budget)
	queue   int // max waiting requests
	prefix  bool

	pool    *blockPool    // scheduler-owned; groups[0].pool
	groups  []kvGroup     // scheduler-owned: one per KV group (one when the model declares none)
	gm      GroupModel    // the model when it declares groups, else nil
	sm      SamplingModel // the model when it samples on the device (unless WithDeviceSampling(false)), else nil
	chunk   int           // max prefill tokens of one sequence in one step (window pools bound it)
	running []*seq        // scheduler-owned, in arrival order
	ended   []ending      // scheduler-owned: finished, to be ended by flush
	pushed  []pushed      // scheduler-owned: tokens to deliver in flush
	jobs    []sampleJob

	mu       sync.Mutex
	waiting  []*seq // arrival order; preempted sequences go back in order
	byID     map[string]*seq
	closed   bool
	arrivals uint64
	stats    sdk.Stats
	rate     rateMeter

	wake   chan struct{}
	cancel context.CancelFunc
	done   chan struct{}
}

func newSched(m Model, info sdk.ModelInfo, lo sdk.LoadOptions, o options, log hclog.Logger) (*sched, sdk.ModelInfo, error) {
	spec := m.Spec()
	switch {
	case spec.VocabSize <= 0:
		return nil, info, fmt.Errorf("engine: model spec: vocab size %d", spec.VocabSize)
	case spec.BlockSize <= 0 || spec.NumBlocks <= 0:
		return nil, info, fmt.Errorf("engine: model spec: %d KV blocks of %d tokens", spec.NumBlocks, spec.BlockSize)
	case spec.ContextLength <= 0:
		return nil, info, fmt.Errorf("engine: model spec: context length %d", spec.ContextLength)
	}
	ctxLen := spec.ContextLength
	if lo.ContextLength > 0 && lo.ContextLength < ctxLen {
		ctxLen = lo.ContextLength
	}
	maxSeqs := o.maxSeqs
	if maxSeqs <= 0 {
		maxSeqs = lo.MaxSequences
	}
	if maxSeqs <= 0 {
		maxSeqs = info.MaxSequences
	}
	if maxSeqs <= 0 {
		maxSeqs = 16
	}
	budget := max(o.maxBatchTokens, maxSeqs, 1)
	if o.maxBatchTokens <= 0 {
		budget = max(DefaultMaxBatchTokens, maxSeqs)
	}
	// A sequence alone must always fit in every pool: that is what makes
	// preemption (of others) always able to make progress.
	groups, gm, chunk, ctxLen, err := newGroups(m, spec, budget, ctxLen)
	if err != nil {
		return nil, info, err
	}
	queue := o.maxQueue
	if queue <= 0 {
		queue = 256
	}
	info.ContextLength = ctxLen
	info.MaxSequences = maxSeqs
	if info.VocabSize == 0 {
		info.VocabSize = spec.VocabSize
	}
	if info.Architecture == "" {
		info.Architecture = spec.Architecture
	}
	if info.KVBytes == 0 {
		info.KVBytes = spec.KVBytes()
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &sched{
		model: m, spec: spec, log: log,
		ctxLen: ctxLen, maxSeqs: maxSeqs, budget: budget, mixed: mixedBudget(o.mixedTokens, budget), queue: queue, prefix: o.prefixCache,
		pool: groups[0].pool, groups: groups, gm: gm, chunk: chunk,
		byID:   make(map[string]*seq),
		wake:   make(chan struct{}, 1),
		cancel: cancel,
		done:   make(chan struct{}),
	}
	for _, g := range groups {
		e.stats.KVTotalBlocks += g.pool.total()
	}
	if sm, ok := m.(SamplingModel); ok && sm.DeviceSampling() && !o.hostSample {
		e.sm = sm
	}
	go e.loop(ctx)
	return e, info, nil
}

// kvGroup is one KV group's pool as the scheduler sees it.
type kvGroup struct {
	window int // 0: full attention
	pool   *blockPool
}

// newGroups makes the scheduler's pools for spec and returns them with the
// largest prefill chunk of one sequence that every window pool can hold
// (alone, with a copy-on-write block in flight), at most budget, and the
// context cap the full pools impose.
func newGroups(m Model, spec Spec, budget, ctxLen int) ([]kvGroup, GroupModel, int, int, error) {
	bs := spec.BlockSize
	if len(spec.Groups) < 2 {
		return []kvGroup{{pool: newBlockPool(spec.NumBlocks, bs)}}, nil, budget, min(ctxLen, spec.NumBlocks*bs), nil
	}
	gm, ok := m.(GroupModel)
	if !ok {
		return nil, nil, 0, 0, fmt.Errorf("engine: model spec declares %d KV groups but the model does not implement GroupModel", len(spec.Groups))
	}
	if g := spec.Groups[0]; g.Window != 0 {
		return nil, nil, 0, 0, fmt.Errorf("engine: model spec: KV group 0 (%s) has window %d: group 0 must be a full-attention group", g.Name, g.Window)
	}
	if g := spec.Groups[0]; g.NumBlocks != spec.NumBlocks || g.BlockBytes != spec.KVBlockBytes {
		return nil, nil, 0, 0, fmt.Errorf("engine: model spec: KV group 0 has %d blocks of %d bytes, the spec %d of %d",
			g.NumBlocks, g.BlockBytes, spec.NumBlocks, spec.KVBlockBytes)
	}
	chunk := budget
	groups := make([]kvGroup, len(spec.Groups))
	for i, g := range spec.Groups {
		if g.NumBlocks <= 0 || g.Window < 0 {
			return nil, nil, 0, 0, fmt.Errorf("engine: model spec: KV group %d (%s): %d blocks, window %d", i, g.Name, g.NumBlocks, g.Window)
		}
		groups[i] = kvGroup{window: g.Window, pool: newBlockPool(g.NumBlocks, bs)}
		if g.Window == 0 {
			ctxLen = min(ctxLen, g.NumBlocks*bs)
		}
	}
	for i, g := range spec.Groups {
		if g.Window == 0 || g.NumBlocks >= (ctxLen+bs-1)/bs+1 {
			continue // holds a whole context (and a copy-on-write block)
		}
		// n tokens at c span at most floor((n+W-2)/bs)+2 blocks (see the
		// package doc); one more for a copy-on-write in flight.
		n := (g.NumBlocks-2)*bs - g.Window + 1
		if n < 1 {
			return nil, nil, 0, 0, fmt.Errorf("engine: model spec: KV group %d (%s): %d blocks of %d tokens cannot hold a window of %d",
				i, g.Name, g.NumBlocks, bs, g.Window)
		}
		chunk = min(chunk, n)
	}
	return groups, gm, chunk, ctxLen, nil
}

// low is the first logical block group g must keep for a query at position
// c (0 for full attention).
func (e *sched) low(g, c int) int {
	w := e.groups[g].window
	if w == 0 {
		return 0
	}
	return max(0, c-w+1) / e.spec.BlockSize
}

// trim releases the window groups' blocks that s's next query (at
// s.computed) can no longer see; their table entries become -1.
func (e *sched) trim(s *seq) {
	for g := 1; g < len(s.tables); g++ {
		if e.groups[g].window == 0 {
			continue
		}
		t := s.tables[g]
		for i := min(e.low(g, s.computed), len(t)) - 1; i >= 0 && t[i] >= 0; i-- {
			e.groups[g].pool.release(t[i])
			t[i] = -1
		}
	}
}

// seq is one request (a generation or an evaluation) in the scheduler.
type seq struct {
	id      string
	arrival uint64
	req     sdk.GenerateRequest
	eval    bool

	// scheduler-owned
	tokens    []int32   // prompt, then generated tokens
	nPrompt   int       // prompt length
	computed  int       // tokens whose KV is in the cache: positions [0, computed)
	tables    [][]int32 // block table per KV group (-1: freed behind a window)
	keys      []uint64  // prefix keys of the first len(keys) full blocks
	generated int
	samp      *sampler
	admitted  bool
	cached    int // prompt tokens served from the prefix cache at first admission
	rows      []float32
	tEnqueue  time.Time
	tAdmit    time.Time
	tFirst    time.Time
	tLast     time.Time

	canceled atomic.Bool
	queued   bool // in e.waiting (guarded by e.mu)

	// output, guarded by omu
	omu     sync.Mutex
	otoks   []int32
	oinfo   []sdk.TokenInfo
	done    bool
	finish  sdk.FinishReason
	err     error
	timings *sdk.Timings
	notify  chan struct{}
}

func (s *seq) signal() {
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

func (s *seq) push(tok int32, info *sdk.TokenInfo) {
	s.omu.Lock()
	s.otoks = append(s.otoks, tok)
	if info != nil {
		s.oinfo = append(s.oinfo, *info)
	}
	s.omu.Unlock()
	s.signal()
}

// end finishes the sequence once; later calls do nothing.
func (s *seq) end(reason sdk.FinishReason, err error, now time.Time) {
	s.omu.Lock()
	if s.done {
		s.omu.Unlock()
		return
	}
	s.done, s.finish, s.err = true, reason, err
	t := &sdk.Timings{PromptTokens: s.nPrompt, CachedTokens: s.cached, GeneratedTokens: s.generated}
	if !s.tAdmit.IsZero() {
		t.QueueTime = s.tAdmit.Sub(s.tEnqueue)
		if !s.tFirst.IsZero() {
			t.PromptTime = s.tFirst.Sub(s.tAdmit)
			t.GenerateTime = s.tLast.Sub(s.tFirst)
		}
	} else {
		t.QueueTime = now.Sub(s.tEnqueue)
	}
	s.timings = t
	s.omu.Unlock()
	s.signal()
}

func (s *seq) take() (toks []int32, info []sdk.TokenInfo, done bool) {
	s.omu.Lock()
	defer s.omu.Unlock()
	toks, info = s.otoks, s.oinfo
	s.otoks, s.oinfo = nil, nil
	return toks, info, s.done
}

func (e *sched) wakeup() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

func (e *sched) validate(tokens []int32) error {
	if len(tokens) == 0 {
		return fmt.Errorf("empty prompt: %w", sdk.ErrInvalidArgument)
	}
	if len(tokens) > e.ctxLen {
		return &sdk.ContextTooLongError{Requested: len(tokens), Max: e.ctxLen}
	}
	for i, t := range tokens {
		if t < 0 || int(t) >= e.spec.VocabSize {
			return fmt.Errorf("token %d at position %d outside the vocabulary [0, %d): %w", t, i, e.spec.VocabSize, sdk.ErrInvalidArgument)
		}
	}
	return nil
}

// submit queues s; it fails when the adapter is closing, the queue is full
// or the id is in use.
func (e *sched) submit(s *seq) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return sdk.ErrNotLoaded
	}
	if len(e.waiting) >= e.queue {
		return fmt.Errorf("%d requests waiting: %w", len(e.waiting), sdk.ErrBusy)
	}
	if s.id != "" {
		if _, dup := e.byID[s.id]; dup {
			return fmt.Errorf("request id %q already in use: %w", s.id, sdk.ErrInvalidArgument)
		}
		e.byID[s.id] = s
	}
	e.arrivals++
	s.arrival = e.arrivals
	s.tEnqueue = time.Now()
	s.queued = true
	e.waiting = append(e.waiting, s)
	e.stats.Waiting = len(e.waiting)
	e.wakeup()
	return nil
}

// abandon marks s canceled: a queued sequence is dropped at once, a running
// one is freed by the scheduler before its next step.
func (e *sched) abandon(s *seq, reason sdk.FinishReason) {
	s.canceled.Store(true)
	e.mu.Lock()
	if s.queued {
		e.removeWaitingLocked(s)
		e.forgetLocked(s)
		e.mu.Unlock()
		s.end(reason, nil, time.Now())
		return
	}
	e.mu.Unlock()
	e.wakeup()
}

func (e *sched) removeWaitingLocked(s *seq) {
	if i := slices.Index(e.waiting, s); i >= 0 {
		e.waiting = slices.Delete(e.waiting, i, i+1)
	}
	s.queued = false
	e.stats.Waiting = len(e.waiting)
}

func (e *sched) forgetLocked(s *seq) {
	if s.id != "" && e.byID[s.id] == s {
		delete(e.byID, s.id)
	}
}

func (e *sched) cancelID(id string) {
	e.mu.Lock()
	s := e.byID[id]
	e.mu.Unlock()
	if s != nil {
		e.abandon(s, sdk.FinishCanceled)
	}
}

func (e *sched) generate(ctx context.Context, req sdk.GenerateRequest, emit func(sdk.Chunk) error) error {
	if err := e.validate(req.Prompt); err != nil {
		return fmt.Errorf("generate %s: %w", req.ID, err)
	}
	if req.MaxTokens < 0 || req.MinTokens < 0 || req.TopLogprobs < 0 {
		return fmt.Errorf("generate %s: negative max/min tokens or top logprobs: %w", req.ID, sdk.ErrInvalidArgument)
	}
	sp := req.Sampling
	if sp.Temperature < 0 || sp.TopK < 0 || sp.TopP < 0 || sp.TopP > 1 || sp.MinP < 0 || sp.MinP > 1 || sp.RepetitionPenalty < 0 {
		return fmt.Errorf("generate %s: sampling parameters out of range: %w", req.ID, sdk.ErrInvalidArgument)
	}
	if req.TopLogprobs > e.spec.VocabSize {
		req.TopLogprobs = e.spec.VocabSize
	}
	s := &seq{
		id: req.ID, req: req,
		tokens:  slices.Clone(req.Prompt),
		nPrompt: len(req.Prompt),
		samp:    newSampler(req),
		notify:  make(chan struct{}, 1),
	}
	if err := e.submit(s); err != nil {
		return fmt.Errorf("generate %s: %w", req.ID, err)
	}
	for {
		select {
		case <-s.notify:
		case <-ctx.Done():
			e.abandon(s, sdk.FinishCanceled)
			return fmt.Errorf("generate %s: %w: %w", req.ID, sdk.ErrCanceled, ctx.Err())
		}
		toks, info, done := s.take()
		var ch sdk.Chunk
		if len(toks) > 0 {
			ch.Tokens = toks
			ch.Info = info
		}
		if done && s.err != nil {
			if len(toks) > 0 {
				_ = emit(ch) // deliver what was generated; the error follows
			}
			return fmt.Errorf("generate %s: %w", req.ID, s.err)
		}
		if done {
			ch.Finish, ch.Timings = s.finish, s.timings
		}
		if len(ch.Tokens) > 0 || done {
			if err := emit(ch); err != nil {
				if !done {
					e.abandon(s, sdk.FinishCanceled)
				}
				return fmt.Errorf("generate %s: emit: %w", req.ID, err)
			}
		}
		if done {
			return nil
		}
	}
}

func (e *sched) evaluate(ctx context.Context, tokens []int32) (sdk.Logits, error) {
	if err := e.validate(tokens); err != nil {
		return sdk.Logits{}, fmt.Errorf("evaluate: %w", err)
	}
	s := &seq{
		eval:    true,
		tokens:  slices.Clone(tokens),
		nPrompt: len(tokens),
		notify:  make(chan struct{}, 1),
	}
	if err := e.submit(s); err != nil {
		return sdk.Logits{}, fmt.Errorf("evaluate: %w", err)
	}
	for {
		select {
		case <-s.notify:
		case <-ctx.Done():
			e.abandon(s, sdk.FinishCanceled)
			return sdk.Logits{}, fmt.Errorf("evaluate: %w: %w", sdk.ErrCanceled, ctx.Err())
		}
		if _, _, done := s.take(); !done {
			continue
		}
		if s.err != nil {
			return sdk.Logits{}, fmt.Errorf("evaluate: %w", s.err)
		}
		if s.finish == sdk.FinishCanceled {
			return sdk.Logits{}, fmt.Errorf("evaluate: %w", sdk.ErrCanceled)
		}
		return sdk.Logits{Rows: len(tokens), Vocab: e.spec.VocabSize, Data: s.rows}, nil
	}
}

func (e *sched) snapshot() sdk.Stats {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.stats
	st.TokensPerSecond = e.rate.rate(time.Now())
	return st
}

// close stops the scheduler, fails every request still in it and closes the model.
func (e *sched) close() error {
	e.mu.Lock()
	e.closed = true
	e.mu.Unlock()
	e.cancel()
	<-e.done
	now := time.Now()
	e.mu.Lock()
	waiting := e.waiting
	e.waiting = nil
	e.mu.Unlock()
	for _, x := range e.pushed {
		x.s.push(x.tok, x.info)
	}
	for _, x := range e.ended {
		x.s.end(x.reason, x.err, x.at)
	}
	e.pushed, e.ended = nil, nil
	for _, s := range append(e.running, waiting...) {
		s.end(sdk.FinishError, fmt.Errorf("model unloaded: %w", sdk.ErrNotLoaded), now)
	}
	e.running = nil
	if err := e.model.Close(); err != nil {
		return fmt.Errorf("close model: %w", err)
	}
	return nil
}

func (e *sched) loop(ctx context.Context) {
	defer close(e.done)
	for ctx.Err() == nil {
		e.reap()
		e.admit()
		e.flush(0, time.Now())
		if len(e.running) == 0 {
			select {
			case <-e.wake:
			case <-ctx.Done():
			}
			continue
		}
		ran := e.step(ctx)
		e.flush(0, time.Now())
		if !ran {
			// Nothing could be scheduled (should not happen): wait for a change.
			select {
			case <-e.wake:
			case <-ctx.Done():
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
}

// reap frees canceled running sequences.
func (e *sched) reap() {
	now := time.Now()
	e.running = slices.DeleteFunc(e.running, func(s *seq) bool {
		if !s.canceled.Load() {
			return false
		}
		e.finish(s, sdk.FinishCanceled, nil, now)
		return true
	})
}

// finish releases s's blocks and queues its end, which flush delivers after
// the stats are published (so a client that sees its last chunk also sees its
// blocks freed). The caller removes s from running.
func (e *sched) finish(s *seq, reason sdk.FinishReason, err error, now time.Time) {
	e.freeBlocks(s)
	e.mu.Lock()
	e.forgetLocked(s)
	e.mu.Unlock()
	e.ended = append(e.ended, ending{s, reason, err, now})
}

type ending struct {
	s      *seq
	reason sdk.FinishReason
	err    error
	at     time.Time
}

type pushed struct {
	s    *seq
	tok  int32
	info *sdk.TokenInfo
}

// flush publishes the stats, then delivers the step's tokens and ends the
// finished sequences.
func (e *sched) flush(generated int, now time.Time) {
	e.publish(generated, now)
	for _, x := range e.pushed {
		x.s.push(x.tok, x.info)
	}
	clear(e.pushed)
	e.pushed = e.pushed[:0]
	for _, x := range e.ended {
		x.s.end(x.reason, x.err, x.at)
	}
	clear(e.ended)
	e.ended = e.ended[:0]
}

func (e *sched) freeBlocks(s *seq) {
	for g, t := range s.tables {
		for _, b := range t {
			if b >= 0 {
				e.groups[g].pool.release(b)
			}
		}
	}
	s.tables, s.keys = nil, nil
}

// prefixFor shrinks a group-0 prefix hit of the prompt tokens to the longest
// one whose blocks every other group still holds under the same keys (a
// window group only the blocks the first recomputed query can see: KV of
// one layer at a position depends on the tokens up to it only, so a block
// registered under a key holds the same KV in any sequence). It returns the
// hit length in blocks and, per group, the table of the retained hit blocks
// (-1 below the window); tabs[0] is hit[:k].
func (e *sched) prefixFor(tokens []int32, hit []int32, keys []uint64) (k int, tabs [][]int32) {
	bs := e.spec.BlockSize
	tabs = make([][]int32, len(e.groups))
	for k = len(hit); k > 0; k-- {
		c := min(k*bs, len(tokens)-1)
		ok := true
		for g := 1; g < len(e.groups) && ok; g++ {
			t := tabs[g][:0]
			for i := 0; i < k; i++ {
				if i < e.low(g, c) {
					t = append(t, -1)
					continue
				}
				parent := rootKey
				if i > 0 {
					parent = keys[i-1]
				}
				b, found := e.groups[g].pool.find(keys[i], parent, tokens[i*bs:(i+1)*bs])
				if !found {
					ok = false
					break
				}
				t = append(t, b)
			}
			tabs[g] = t
		}
		if ok {
			break
		}
	}
	tabs[0] = hit[:k:k]
	for g := 1; g < len(tabs); g++ {
		tabs[g] = tabs[g][:k:k]
	}
	return k, tabs
}

// admit moves waiting sequences into the running batch, FIFO, while there are
// slots and blocks for their whole remaining prompt plus one spare block per
// running sequence (so admissions do not immediately force preemptions).
func (e *sched) admit() {
	now := time.Now()
	e.mu.Lock()
	defer e.mu.Unlock()
	for len(e.waiting) > 0 && len(e.running) < e.maxSeqs {
		s := e.waiting[0]
		bs := e.spec.BlockSize
		var hit []int32
		var keys []uint64
		if e.prefix && !s.eval {
			hit, keys = e.pool.lookup(s.tokens, len(s.tokens)/bs)
		}
		k, tabs := e.prefixFor(s.tokens, hit, keys)
		var cached, need, avail, short int
		plan := func() bool {
			cached = min(k*bs, len(s.tokens)-1)
			fits := true
			for g := range e.groups {
				n := e.need(g, len(s.tokens), cached, k)
				a := e.groups[g].pool.available() - e.groups[g].pool.unpinned(tabs[g])
				if len(e.running) > 0 {
					n += len(e.running)
				}
				if n > a && fits {
					fits, short, need, avail = false, g, n, a
				}
			}
			return fits
		}
		fits := plan()
		if !fits && len(e.running) == 0 && k > 0 {
			// an alone sequence always fits without the cache
			k, tabs = 0, make([][]int32, len(e.groups))
			fits = plan()
		}
		if !fits && len(e.running) == 0 {
			// Cannot happen while prompts fit ctxLen <= pool; never hang on it.
			e.waiting = e.waiting[1:]
			s.queued = false
			e.forgetLocked(s)
			e.ended = append(e.ended, ending{s, sdk.FinishError, fmt.Errorf("%d tokens need %d KV blocks of group %d, the pool has %d: %w",
				len(s.tokens), need, short, avail, sdk.ErrContextTooLong), now})
			continue
		}
		if !fits {
			break
		}
		keys = keys[:k:k]
		for g, t := range tabs {
			for _, b := range t {
				if b >= 0 {
					e.groups[g].pool.retain(b)
				}
			}
		}
		if e.prefix && !s.eval {
			e.stats.PrefixQueries++
			if k > 0 {
				e.stats.PrefixHits++
			}
		}
		s.tables, s.keys, s.computed = tabs, keys, cached
		if !s.admitted {
			s.admitted, s.cached, s.tAdmit = true, cached, now
		}
		e.waiting = e.waiting[1:]
		s.queued = false
		e.running = append(e.running, s)
	}
	e.stats.Waiting = len(e.waiting)
	e.stats.Running = len(e.running)
}

// need is the blocks group g must still allocate to admit a prompt of n
// tokens of which cached are in the cache, with k hit blocks retained: the
// uncached prompt for a full group; for a window group the blocks of its
// first chunk and the window before it (it is trimmed as it goes). One more
// for the copy-on-write of a partly recomputed last hit block.
func (e *sched) need(g, n, cached, k int) int {
	bs := e.spec.BlockSize
	cow := 0
	if cached < k*bs {
		cow = 1
	}
	if e.groups[g].window == 0 {
		return (n+bs-1)/bs - k + cow
	}
	lo := e.low(g, cached)
	end := cached + min(n-cached, e.chunk) // first chunk: positions [cached, end)
	span := (end-1)/bs - lo + 1
	return span - max(0, k-lo) + cow
}

// preempt takes the running sequence at index i out of the batch, frees its
// blocks and puts it back in the waiting queue in arrival order; it is
// recomputed (prompt and generated tokens) when readmitted.
func (e *sched) preempt(i int) {
	s := e.running[i]
	e.running = slices.Delete(e.running, i, i+1)
	e.freeBlocks(s)
	s.computed = 0
	s.rows = s.rows[:0]
	e.log.Debug("preempted", "request_id", s.id, "tokens", len(s.tokens))
	e.mu.Lock()
	j, _ := slices.BinarySearchFunc(e.waiting, s.arrival, func(w *seq, a uint64) int {
		switch {
		case w.arrival < a:
			return -1
		case w.arrival > a:
			return 1
		}
		return 0
	})
	e.waiting = slices.Insert(e.waiting, j, s)
	s.queued = true
	e.stats.Waiting = len(e.waiting)
	e.mu.Unlock()
}

// ensure gives s blocks for positions [0, upto) and a private block for its
// next write, preempting the youngest running sequences when the pool is
// exhausted. It reports false when s itself had to go (preempted or failed).
func (e *sched) ensure(s *seq, upto int) bool {
	bs := e.spec.BlockSize
	for {
		ok, err := e.grow(s, upto, bs)
		if err != nil {
			i := slices.Index(e.running, s)
			e.running = slices.Delete(e.running, i, i+1)
			e.finish(s, sdk.FinishError, err, time.Now())
			return false
		}
		if ok {
			return true
		}
		last := len(e.running) - 1
		if e.running[last] != s {
			e.preempt(last)
			continue
		}
		if last == 0 {
			// Alone and still out of blocks: cannot happen while ctxLen
			// fits the pool, but never loop or crash on it.
			e.running = e.running[:0]
			err := fmt.Errorf("KV cache exhausted by one sequence of %d tokens (%d blocks of %d): %w",
				upto, e.pool.total(), bs, sdk.ErrContextTooLong)
			e.finish(s, sdk.FinishError, err, time.Now())
			return false
		}
		e.preempt(last)
		return false
	}
}

// grow does the allocation part of ensure in every KV group; ok is false
// when a pool ran out.
func (e *sched) grow(s *seq, upto, bs int) (bool, error) {
	e.trim(s)
	for g := range e.groups {
		pool, t := e.groups[g].pool, s.tables[g]
		if j := s.computed / bs; j < len(t) && t[j] >= 0 && pool.shared(t[j]) {
			nb, ok := pool.alloc()
			if !ok {
				return false, nil
			}
			var err error
			if e.gm != nil {
				err = e.gm.CopyGroupBlock(g, nb, t[j])
			} else {
				err = e.model.CopyBlock(nb, t[j])
			}
			if err != nil {
				pool.release(nb)
				return false, fmt.Errorf("copy KV block %d to %d (group %d): %w", t[j], nb, g, err)
			}
			pool.release(t[j])
			t[j] = nb
			if g == 0 && j < len(s.keys) {
				s.keys = s.keys[:j]
			}
		}
		for len(t)*bs < upto {
			b, ok := pool.alloc()
			if !ok {
				s.tables[g] = t
				return false, nil
			}
			t = append(t, b)
		}
		s.tables[g] = t
	}
	return true, nil
}

// mixedBudget is the token budget of a step with decodes: n (0 = the whole
// budget), at most the budget.
func mixedBudget(n, budget int) int {
	if n <= 0 {
		return budget
	}
	return min(n, budget)
}

// step plans one forward batch, runs it and handles its logits. It reports
// whether anything ran.
func (e *sched) step(ctx context.Context) bool {
	decodes := 0
	for _, s := range e.running {
		if len(s.tokens)-s.computed == 1 {
			decodes++
		}
	}
	limit := e.budget
	if decodes > 0 {
		limit = max(e.mixed, decodes)
	}
	prefill := limit - decodes
	var batch Batch
	var in []*seq
	for i := 0; i < len(e.running); i++ {
		s := e.running[i]
		n := len(s.tokens) - s.computed
		if n > 1 {
			n = min(n, prefill, e.chunk)
			if n <= 0 {
				continue
			}
		}
		if !e.ensure(s, s.computed+n) {
			i-- // s left the batch; e.running shifted (only entries after i can have gone)
			continue
		}
		if n > 1 {
			prefill -= n
		}
		si := SeqInput{
			Tokens:    s.tokens[s.computed : s.computed+n],
			Pos:       s.computed,
			Blocks:    s.tables[0],
			AllLogits: s.eval,
		}
		if len(e.groups) > 1 {
			si.GroupBlocks = s.tables
		}
		batch.Seqs = append(batch.Seqs, si)
		in = append(in, s)
	}
	if len(in) == 0 {
		return false
	}
	// Device-side argmax when nothing in the step needs logits on the host.
	gm, greedy := e.model.(GreedyModel)
	for k, s := range in {
		if !greedy {
			break
		}
		finishing := s.computed+len(batch.Seqs[k].Tokens) == len(s.tokens)
		greedy = !s.eval && (!finishing || s.samp.plain(s.generated))
	}
	var specs []SampleSpec
	if !greedy {
		specs = e.deviceSpecs(in, &batch)
	}
	var out *Output
	var picked []int32
	var err error
	switch {
	case greedy:
		picked, err = e.forwardGreedy(ctx, gm, &batch)
	case specs != nil:
		picked, out, err = e.forwardSample(ctx, &batch, specs)
	default:
		out, err = e.forward(ctx, &batch)
		if err == nil {
			err = e.checkOutput(&batch, out)
		}
	}
	now := time.Now()
	if err != nil {
		if ctx.Err() != nil {
			return true // unloading; close() fails the requests
		}
		e.log.Error("forward failed", "seqs", len(in), "error", err)
		for _, s := range in {
			e.finish(s, sdk.FinishError, fmt.Errorf("forward: %w", err), now)
		}
		e.running = slices.DeleteFunc(e.running, func(s *seq) bool { return slices.Contains(in, s) })
		return true
	}
	var gone []*seq
	jobs := e.jobs[:0]
	for k, s := range in {
		s.computed += len(batch.Seqs[k].Tokens)
		e.register(s)
		e.trim(s)
		if s.eval {
			s.rows = append(s.rows, out.Logits[k]...)
			if s.computed == len(s.tokens) {
				gone = append(gone, s)
				e.finish(s, sdk.FinishStop, nil, now)
			}
			continue
		}
		if s.computed < len(s.tokens) {
			continue // more prompt to prefill
		}
		j := sampleJob{s: s}
		if greedy || (specs != nil && !specs[k].Host) {
			j.tok, j.done = picked[k], true
		} else {
			rows := out.Logits[k]
			j.row = rows[len(rows)-e.spec.VocabSize:]
			if e.sm != nil {
				// a step that could not use ForwardSample (an evaluation in it): a token the device would
				// draw is drawn by its host twin, so the request's tokens do not depend on the step
				if sp, ok := s.samp.device(s.generated); ok {
					j.twin = &sp
				}
			}
		}
		jobs = append(jobs, j)
	}
	if !greedy {
		sampleAll(jobs, e.spec.VocabSize)
	}
	for _, j := range jobs {
		s, tok := j.s, j.tok
		s.samp.accept(tok)
		s.tokens = append(s.tokens, tok)
		s.generated++
		if s.tFirst.IsZero() {
			s.tFirst = now
		}
		s.tLast = now
		e.pushed = append(e.pushed, pushed{s, tok, j.info})
		if reason := e.stopReason(s, tok); reason != sdk.FinishNone {
			gone = append(gone, s)
			e.finish(s, reason, nil, now)
		}
	}
	if len(gone) > 0 {
		e.running = slices.DeleteFunc(e.running, func(s *seq) bool { return slices.Contains(gone, s) })
	}
	generated := len(jobs)
	clear(jobs)
	e.jobs = jobs[:0]
	e.flush(generated, now)
	return true
}

// sampleJob is one sequence's token choice after a forward step.
type sampleJob struct {
	s    *seq
	row  []float32
	tok  int32
	info *sdk.TokenInfo
	done bool        // tok was picked on the device
	twin *SampleSpec // draw with the device sampler's host twin (ml.SampleRowRef), not the host sampler
}

// pick samples j's token from its row on the host.
func (j *sampleJob) pick(par int) {
	if j.twin != nil {
		sp := j.twin
		j.tok = ml.SampleRowRef(j.row, ml.SampleParams{Temperature: sp.Temperature, TopK: int32(max(min(sp.TopK, math.MaxInt32), 0)),
			TopP: sp.TopP, MinP: sp.MinP, Seed: sp.Seed, Counter: sp.Index})
		return
	}
	j.s.samp.par = par
	j.tok, j.info = j.s.samp.sample(j.row, j.s.generated)
}

// deviceSpecs returns the SampleSpecs of a step for the model's device
// sampler, or nil when the step has no sequence to sample there (or the model
// has none). Each sequence's path depends on its own parameters only
// (sampler.device): a step mixes device-drawn rows, greedy rows (temperature
// 0: the device argmax) and rows whose logits go to the host.
func (e *sched) deviceSpecs(in []*seq, b *Batch) []SampleSpec {
	if e.sm == nil {
		return nil
	}
	specs := make([]SampleSpec, len(in))
	any := false
	for k, s := range in {
		if s.eval {
			return nil // AllLogits rows: Forward
		}
		if s.computed+len(b.Seqs[k].Tokens) < len(s.tokens) {
			continue // unfinished prefill chunk: its token is ignored (greedy spec: the cheapest)
		}
		if sp, ok := s.samp.device(s.generated); ok {
			specs[k], any = sp, true
		} else if !s.samp.plain(s.generated) {
			specs[k].Host = true
		}
	}
	if !any {
		return nil
	}
	return specs
}

// forwardSample calls the model's device sampler, turning a panic into an
// error, and checks its tokens and host rows.
func (e *sched) forwardSample(ctx context.Context, b *Batch, specs []SampleSpec) (toks []int32, out *Output, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("model panic: %v\n%s", r, debug.Stack())
		}
	}()
	toks, out, err = e.sm.ForwardSample(ctx, b, specs)
	if err != nil {
		return nil, nil, err
	}
	if len(toks) != len(b.Seqs) {
		return nil, nil, fmt.Errorf("model returned %d sampled tokens for %d sequences", len(toks), len(b.Seqs))
	}
	host := false
	for i, sp := range specs {
		if sp.Host {
			host = true
			continue
		}
		if toks[i] < 0 || int(toks[i]) >= e.spec.VocabSize {
			return nil, nil, fmt.Errorf("model returned sampled token %d outside the vocabulary", toks[i])
		}
	}
	if !host {
		return toks, out, nil
	}
	if out == nil || len(out.Logits) != len(b.Seqs) {
		return nil, nil, errors.New("model returned no logits for the host-sampled sequences")
	}
	for i, sp := range specs {
		if sp.Host && len(out.Logits[i]) != e.spec.VocabSize {
			return nil, nil, fmt.Errorf("model returned %d logits for host-sampled sequence %d, want %d", len(out.Logits[i]), i, e.spec.VocabSize)
		}
	}
	return toks, out, nil
}

// sampleAll samples the jobs' tokens, spreading big batches over the cores.
// Each sequence has its own sampler and random stream, so the result does not
// depend on how the work is split.
func sampleAll(jobs []sampleJob, vocab int) {
	workers := min(runtime.GOMAXPROCS(0), len(jobs))
	host := 0
	for i := range jobs {
		if !jobs[i].done {
			host++
		}
	}
	if workers < 2 || host*vocab < 1<<18 {
		par := 1
		if host == 1 {
			par = min(runtime.GOMAXPROCS(0), 4)
		}
		for i := range jobs {
			if j := &jobs[i]; !j.done {
				j.pick(par)
			}
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(jobs) {
					return
				}
				if j := &jobs[i]; !j.done {
					j.pick(1)
				}
			}
		}()
	}
	wg.Wait()
}

// forwardGreedy calls the model's device argmax, turning a panic into an error.
func (e *sched) forwardGreedy(ctx context.Context, gm GreedyModel, b *Batch) (toks []int32, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("model panic: %v\n%s", r, debug.Stack())
		}
	}()
	toks, err = gm.ForwardGreedy(ctx, b)
	if err == nil && len(toks) != len(b.Seqs) {
		err = fmt.Errorf("model returned %d greedy tokens for %d sequences", len(toks), len(b.Seqs))
	}
	for i := 0; err == nil && i < len(toks); i++ {
		if toks[i] < 0 || int(toks[i]) >= e.spec.VocabSize {
			err = fmt.Errorf("model returned greedy token %d outside the vocabulary", toks[i])
		}
	}
	return toks, err
}

func (e *sched) stopReason(s *seq, tok int32) sdk.FinishReason {
	if s.generated >= s.req.MinTokens && slices.Contains(s.req.StopTokens, tok) {
		return sdk.FinishStop
	}
	if s.req.MaxTokens > 0 && s.generated >= s.req.MaxTokens {
		return sdk.FinishLength
	}
	if len(s.tokens) > e.ctxLen {
		return sdk.FinishLength // the new token has no position left to be fed at
	}
	return sdk.FinishNone
}

// register records the sequence's newly completed full blocks in the prefix cache.
func (e *sched) register(s *seq) {
	if !e.prefix {
		return
	}
	bs := e.spec.BlockSize
	for i := len(s.keys); (i+1)*bs <= s.computed && i < len(s.tables[0]); i++ {
		parent := rootKey
		if i > 0 {
			parent = s.keys[i-1]
		}
		seg := s.tokens[i*bs : (i+1)*bs]
		s.keys = append(s.keys, e.pool.register(s.tables[0][i], parent, seg))
		for g := 1; g < len(s.tables); g++ {
			if i < len(s.tables[g]) && s.tables[g][i] >= 0 {
				e.groups[g].pool.register(s.tables[g][i], parent, seg)
			}
		}
	}
}

// forward calls the model, turning a panic into an error.
func (e *sched) forward(ctx context.Context, b *Batch) (out *Output, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("model panic: %v\n%s", r, debug.Stack())
		}
	}()
	out, err = e.model.Forward(ctx, b)
	if err == nil && out == nil {
		err = errors.New("model returned no output")
	}
	return out, err
}

func (e *sched) checkOutput(b *Batch, out *Output) error {
	if len(out.Logits) != len(b.Seqs) {
		return fmt.Errorf("model returned logits for %d sequences, batch has %d", len(out.Logits), len(b.Seqs))
	}
	for i, si := range b.Seqs {
		rows := 1
		if si.AllLogits {
			rows = len(si.Tokens)
		}
		if len(out.Logits[i]) != rows*e.spec.VocabSize {
			return fmt.Errorf("model returned %d logits for sequence %d, want %d rows of %d",
				len(out.Logits[i]), i, rows, e.spec.VocabSize)
		}
	}
	return nil
}

func (e *sched) publish(generated int, now time.Time) {
	e.mu.Lock()
	e.rate.add(now, generated)
	e.stats.Running = len(e.running)
	e.stats.Waiting = len(e.waiting)
	e.stats.KVUsedBlocks = 0
	for _, g := range e.groups {
		e.stats.KVUsedBlocks += g.pool.used
	}
	e.mu.Unlock()
}

// rateMeter measures generated tokens per second over the last few seconds.
type rateMeter struct {
	marks []rateMark
}

type rateMark struct {
	t time.Time
	n int
}

const rateWindow = 5 * time.Second

func (r *rateMeter) add(now time.Time, n int) {
	if n > 0 {
		r.marks = append(r.marks, rateMark{now, n})
	}
	i := 0
	for i < len(r.marks) && now.Sub(r.marks[i].t) > rateWindow {
		i++
	}
	r.marks = r.marks[i:]
}

func (r *rateMeter) rate(now time.Time) float64 {
	total := 0
	var first time.Time
	for _, m := range r.marks {
		if now.Sub(m.t) > rateWindow {
			continue
		}
		if first.IsZero() {
			first = m.t
		}
		total += m.n
	}
	if total == 0 {
		return 0
	}
	span := now.Sub(first)
	if span < time.Second {
		span = time.Second
	}
	return float64(total) / span.Seconds()
}
