// Package replica serves one model from several identical adapter processes
// (typically one per GPU, each started with CUDA_VISIBLE_DEVICES=<i>). A Set
// implements sdk.Adapter over its members: Load loads every member in
// parallel, Generate and Evaluate go to the least loaded member that is up,
// a member whose call fails because its process died is taken out of
// rotation until it answers a health probe again, and a request that failed
// before it streamed anything is retried once on another member. The set
// keeps serving while at least one member is up.
//
// Load balancing is by requests in flight as the set counts them (not by
// polling members' Stats): that is exact for requests routed through the
// set, costs no RPC per request, and reacts at once.
//
// A model split over several processes (tensor parallelism) is a Group
// instead (group.go): its ranks load together, only rank 0 serves, and they
// are supervised and relaunched as one unit. OpenModel places a model and
// returns whichever of the two it needs.
package replica

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/llama-orch/orch/host/plugins"
	"github.com/llama-orch/orch/sdk"
)

// ErrNoMember is returned (wrapped with sdk.ErrAdapterCrashed) when no
// member is up to take a call.
var ErrNoMember = errors.New("no replica is up")

// Member is one adapter of a set.
type Member struct {
	Name    string // for logs and MemberStatus, e.g. "gpu0"
	Adapter sdk.Adapter
}

// Options tune a Set. Zero values mean the defaults.
type Options struct {
	Logger hclog.Logger
	// ProbeInterval is how often members that are down are probed with
	// Stats; default 1 s.
	ProbeInterval time.Duration
	// ProbeTimeout bounds one probe; default 5 s.
	ProbeTimeout time.Duration
}

// MemberStatus is a snapshot of one member, for metrics and tests.
type MemberStatus struct {
	Name     string
	Loaded   bool  // holds the model (its Load succeeded and no Unload since)
	Up       bool  // in rotation
	InFlight int   // Generate/Evaluate calls running on it now
	Served   int64 // Generate/Evaluate calls routed to it so far
	Failures int64 // calls that failed because the member was down
}

type member struct {
	name string
	a    sdk.Adapter

	// guarded by Set.mu
	loaded   bool
	up       bool
	inflight int
	served   int64
	failures int64
}

type running struct {
	m        *member
	canceled bool
}

// Set is a replica set. It implements sdk.Adapter and is safe for
// concurrent use.
type Set struct {
	log   hclog.Logger
	opts  Options
	mems  []*member
	loadM sync.Mutex // serializes Load/Unload

	mu     sync.Mutex
	rr     int // round-robin start for ties
	ids    map[string]*running
	info   sdk.ModelInfo
	closed bool

	stop chan struct{}
	wg   sync.WaitGroup
}

var _ sdk.Adapter = (*Set)(nil)

// New makes a set over members (at least one) and starts its health prober.
// Members start up and not loaded; Close stops the prober and closes the
// members that have a Close(ctx) method (*plugins.Managed, *plugins.Instance).
func New(members []Member, opts Options) (*Set, error) {
	if len(members) == 0 {
		return nil, fmt.Errorf("replica set: no members: %w", sdk.ErrInvalidArgument)
	}
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	if opts.ProbeInterval <= 0 {
		opts.ProbeInterval = time.Second
	}
	if opts.ProbeTimeout <= 0 {
		opts.ProbeTimeout = 5 * time.Second
	}
	s := &Set{log: opts.Logger, opts: opts, ids: map[string]*running{}, stop: make(chan struct{})}
	for i, m := range members {
		if m.Adapter == nil {
			return nil, fmt.Errorf("replica set: member %d has no adapter: %w", i, sdk.ErrInvalidArgument)
		}
		name := m.Name
		if name == "" {
			name = fmt.Sprintf("replica%d", i)
		}
		s.mems = append(s.mems, &member{name: name, a: m.Adapter, up: true})
	}
	s.wg.Add(1)
	go s.probeLoop()
	return s, nil
}

// Len is the number of members.
func (s *Set) Len() int { return len(s.mems) }

// Members reports each member's state.
func (s *Set) Members() []MemberStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]MemberStatus, len(s.mems))
	for i, m := range s.mems {
		out[i] = MemberStatus{Name: m.name, Loaded: m.loaded, Up: m.up, InFlight: m.inflight, Served: m.served, Failures: m.failures}
	}
	return out
}

// IsMemberDown reports whether err means the member that returned it is
// gone (its process crashed or was closed, or its connection is
// unavailable), as opposed to an error about the request.
func IsMemberDown(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, sdk.ErrAdapterCrashed) || errors.Is(err, plugins.ErrClosed) {
		return true
	}
	if st, ok := status.FromError(err); ok {
		switch st.Code() {
		case codes.Unavailable:
			return true
		case codes.Canceled:
			// grpc.ErrClientConnClosing: the supervisor closed the connection
			// of a member it is relaunching (not the caller's cancellation,
			// which is "context canceled").
			return strings.HasSuffix(st.Message(), clientConnClosing) // FromError prefixes wrapping messages
		}
	}
	return false
}

// clientConnClosing is the message of grpc.ErrClientConnClosing (deprecated
// as a value, still what a call on a closed connection returns).
const clientConnClosing = "grpc: the client connection is closing"

// readier is implemented by *plugins.Managed: WaitReady with a done
// context answers at once whether a process is up.
type readier interface{ WaitReady(context.Context) error }

var doneCtx = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

func notReady(a sdk.Adapter) bool {
	r, ok := a.(readier)
	return ok && r.WaitReady(doneCtx) != nil
}

// retryable: the call may go to another member (nothing was emitted).
func retryable(err error) bool { return IsMemberDown(err) || errors.Is(err, sdk.ErrBusy) }

// pick reserves the least loaded member that is up and loaded, skipping
// exclude; ties go round robin.
func (s *Set) pick(exclude *member) (*member, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("replica set: %w", plugins.ErrClosed)
	}
	var best *member
	anyLoaded := false
	n := len(s.mems)
	for k := range n {
		m := s.mems[(s.rr+k)%n]
		anyLoaded = anyLoaded || m.loaded
		if !m.loaded || !m.up || m == exclude {
			continue
		}
		if notReady(m.a) {
			// A supervised member that is being relaunched would make the
			// call wait for its restart and reload: take it out instead.
			m.up = false
			m.failures++
			s.log.Warn("replica is restarting; taken out of rotation", "replica", m.name)
			continue
		}
		if best == nil || m.inflight < best.inflight {
			best = m
		}
	}
	if best == nil {
		if !anyLoaded {
			return nil, sdk.ErrNotLoaded
		}
		return nil, fmt.Errorf("replica set: %w: %w", sdk.ErrAdapterCrashed, ErrNoMember)
	}
	s.rr = (s.rr + 1) % n
	best.inflight++
	best.served++
	return best, nil
}

func (s *Set) release(m *member) {
	s.mu.Lock()
	m.inflight--
	s.mu.Unlock()
}

// fail takes m out of rotation after a call failed because it is down.
func (s *Set) fail(m *member, err error) {
	s.mu.Lock()
	was := m.up
	m.up = false
	m.failures++
	s.mu.Unlock()
	if was {
		s.log.Warn("replica down; taken out of rotation", "replica", m.name, "error", err)
	}
}

// done releases m after a call and takes it out of rotation when err says
// it is down.
func (s *Set) done(m *member, err error) {
	s.release(m)
	if IsMemberDown(err) {
		s.fail(m, err)
	}
}

// Load implements sdk.Adapter: every member loads the model in parallel;
// progress is merged (per stage, the sum over members). It succeeds when
// at least one member loaded; members that failed are logged and left out
// of rotation until the next Load. ModelInfo is the first loaded member's,
// with MaxSequences summed over the loaded members (the set's capacity).
func (s *Set) Load(ctx context.Context, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (sdk.ModelInfo, error) {
	s.loadM.Lock()
	defer s.loadM.Unlock()
	s.mu.Lock()
	for _, m := range s.mems {
		if m.loaded {
			s.mu.Unlock()
			return sdk.ModelInfo{}, sdk.ErrAlreadyLoaded
		}
	}
	s.mu.Unlock()
	if progress == nil {
		progress = func(sdk.LoadProgress) {}
	}
	pm := newProgressMerger(len(s.mems), progress)
	infos := make([]sdk.ModelInfo, len(s.mems))
	errs := make([]error, len(s.mems))
	var wg sync.WaitGroup
	for i, m := range s.mems {
		wg.Add(1)
		go func() {
			defer wg.Done()
			infos[i], errs[i] = m.a.Load(ctx, req, func(p sdk.LoadProgress) { pm.update(i, p) })
		}()
	}
	wg.Wait()
	var first *sdk.ModelInfo
	var failed []error
	loaded := 0
	s.mu.Lock()
	for i, m := range s.mems {
		if errs[i] != nil {
			failed = append(failed, fmt.Errorf("replica %s: %w", m.name, errs[i]))
			continue
		}
		m.loaded, m.up = true, true
		loaded++
		if first == nil {
			first = &infos[i]
			s.info = infos[i]
			s.info.MaxSequences = 0
		}
		s.info.MaxSequences += infos[i].MaxSequences
	}
	info := s.info
	s.mu.Unlock()
	if first == nil {
		return sdk.ModelInfo{}, errors.Join(failed...)
	}
	for i, m := range s.mems {
		if errs[i] == nil && (infos[i].VocabSize != first.VocabSize || infos[i].ContextLength != first.ContextLength) {
			s.log.Warn("replicas differ", "replica", m.name, "vocab", infos[i].VocabSize, "context_length", infos[i].ContextLength,
				"first_vocab", first.VocabSize, "first_context_length", first.ContextLength)
		}
	}
	for _, err := range failed {
		s.log.Error("replica failed to load; serving without it", "error", err)
	}
	s.log.Info("replica set loaded", "model", req.Path, "replicas", loaded, "of", len(s.mems))
	return info, nil
}

// Generate implements sdk.Adapter.
func (s *Set) Generate(ctx context.Context, req sdk.GenerateRequest, emit func(sdk.Chunk) error) error {
	m, err := s.pick(nil)
	if err != nil {
		return err
	}
	var run *running
	if req.ID != "" {
		run = &running{m: m}
		s.mu.Lock()
		s.ids[req.ID] = run
		s.mu.Unlock()
		defer func() {
			s.mu.Lock()
			if s.ids[req.ID] == run {
				delete(s.ids, req.ID)
			}
			s.mu.Unlock()
		}()
	}
	emitted := false
	wrapped := func(c sdk.Chunk) error {
		emitted = true
		return emit(c)
	}
	err = m.a.Generate(ctx, req, wrapped)
	s.done(m, err)
	if err == nil || emitted || ctx.Err() != nil || !retryable(err) {
		if emitted && IsMemberDown(err) {
			return fmt.Errorf("replica %s died mid-stream: %w", m.name, err)
		}
		return err
	}
	first := m
	m, perr := s.pick(first)
	if perr != nil {
		return fmt.Errorf("replica %s: %w (no other replica to retry on: %v)", first.name, err, perr)
	}
	if run != nil {
		s.mu.Lock()
		run.m = m
		canceled := run.canceled
		s.mu.Unlock()
		if canceled {
			s.release(m)
			return emit(sdk.Chunk{Finish: sdk.FinishCanceled, Timings: &sdk.Timings{PromptTokens: len(req.Prompt)}})
		}
	}
	s.log.Debug("retrying request on another replica", "request_id", req.ID, "failed", first.name, "replica", m.name, "error", err)
	err = m.a.Generate(ctx, req, emit)
	s.done(m, err)
	return err
}

// Cancel implements sdk.Adapter: it goes to the member running id (unknown
// ids are ignored, as sdk.Adapter allows).
func (s *Set) Cancel(ctx context.Context, id string) error {
	s.mu.Lock()
	run := s.ids[id]
	var m *member
	if run != nil {
		run.canceled = true
		if run.m.up {
			m = run.m // a member that is down fails the request on its own
		}
	}
	s.mu.Unlock()
	if m == nil {
		return nil
	}
	err := m.a.Cancel(ctx, id)
	if IsMemberDown(err) {
		return nil // its Generate fails (and is retried or reported) on its own
	}
	return err
}

// Evaluate implements sdk.Adapter: the least loaded member answers; a
// member found down is replaced once.
func (s *Set) Evaluate(ctx context.Context, tokens []int32) (sdk.Logits, error) {
	var exclude *member
	for attempt := 0; ; attempt++ {
		m, err := s.pick(exclude)
		if err != nil {
			return sdk.Logits{}, err
		}
		l, err := m.a.Evaluate(ctx, tokens)
		s.done(m, err)
		if err == nil || attempt > 0 || ctx.Err() != nil || !retryable(err) {
			return l, err
		}
		exclude = m
	}
}

// Stats implements sdk.Adapter: the sum over the members that are up and
// answer (TokensPerSecond too: the set's aggregate rate). It fails only
// when no member answers.
func (s *Set) Stats(ctx context.Context) (sdk.Stats, error) {
	s.mu.Lock()
	var ms []*member
	for _, m := range s.mems {
		if m.up && !notReady(m.a) {
			ms = append(ms, m)
		}
	}
	s.mu.Unlock()
	type res struct {
		st  sdk.Stats
		err error
	}
	out := make([]res, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i].st, out[i].err = m.a.Stats(ctx)
		}()
	}
	wg.Wait()
	var sum sdk.Stats
	var errs []error
	ok := 0
	for i, r := range out {
		if r.err != nil {
			if IsMemberDown(r.err) {
				s.fail(ms[i], r.err)
			}
			errs = append(errs, fmt.Errorf("replica %s: %w", ms[i].name, r.err))
			continue
		}
		ok++
		sum.Running += r.st.Running
		sum.Waiting += r.st.Waiting
		sum.KVUsedBlocks += r.st.KVUsedBlocks
		sum.KVTotalBlocks += r.st.KVTotalBlocks
		sum.PrefixQueries += r.st.PrefixQueries
		sum.PrefixHits += r.st.PrefixHits
		sum.TokensPerSecond += r.st.TokensPerSecond
	}
	if ok == 0 {
		if len(errs) == 0 {
			return sdk.Stats{}, fmt.Errorf("replica set: %w: %w", sdk.ErrAdapterCrashed, ErrNoMember)
		}
		return sdk.Stats{}, errors.Join(errs...)
	}
	return sum, nil
}

// Unload implements sdk.Adapter: every member unloads (members that are
// down too: a relaunched process reloads its last model otherwise).
func (s *Set) Unload(ctx context.Context) error {
	s.loadM.Lock()
	defer s.loadM.Unlock()
	errs := make([]error, len(s.mems))
	var wg sync.WaitGroup
	for i, m := range s.mems {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = m.a.Unload(ctx)
		}()
	}
	wg.Wait()
	s.mu.Lock()
	var out []error
	for i, m := range s.mems {
		m.loaded = false
		err := errs[i]
		if err != nil && !errors.Is(err, sdk.ErrNotLoaded) && !IsMemberDown(err) {
			out = append(out, fmt.Errorf("replica %s: %w", m.name, err))
		}
	}
	s.info = sdk.ModelInfo{}
	s.mu.Unlock()
	return errors.Join(out...)
}

// Close stops the prober and closes every member that has a Close(ctx)
// method (unloading first, as plugins.Managed.Close does).
func (s *Set) Close(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	close(s.stop)
	s.wg.Wait()
	errs := make([]error, len(s.mems))
	var wg sync.WaitGroup
	for i, m := range s.mems {
		c, ok := m.a.(interface{ Close(context.Context) error })
		if !ok {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.Close(ctx); err != nil {
				errs[i] = fmt.Errorf("replica %s: %w", m.name, err)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// probeLoop puts members that are down back into rotation once they
// answer Stats again (a supervised member answers after its relaunch and
// model reload).
func (s *Set) probeLoop() {
	defer s.wg.Done()
	t := time.NewTicker(s.opts.ProbeInterval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		s.mu.Lock()
		var down []*member
		for _, m := range s.mems {
			if m.loaded && !m.up {
				down = append(down, m)
			}
		}
		s.mu.Unlock()
		for _, m := range down {
			ctx, cancel := context.WithTimeout(context.Background(), s.opts.ProbeTimeout)
			go func() { // a probe must not outlive Close
				select {
				case <-s.stop:
					cancel()
				case <-ctx.Done():
				}
			}()
			_, err := m.a.Stats(ctx)
			cancel()
			if err != nil {
				continue
			}
			s.mu.Lock()
			back := m.loaded && !m.up
			if back {
				m.up = true
			}
			s.mu.Unlock()
			if back {
				s.log.Info("replica back in rotation", "replica", m.name)
			}
		}
	}
}

// progressMerger merges members' load progress: for each stage, Done and
// Total are the sums of the members' latest values in that stage.
type progressMerger struct {
	mu   sync.Mutex
	out  func(sdk.LoadProgress)
	last []map[string]sdk.LoadProgress
}

func newProgressMerger(n int, out func(sdk.LoadProgress)) *progressMerger {
	pm := &progressMerger{out: out, last: make([]map[string]sdk.LoadProgress, n)}
	for i := range pm.last {
		pm.last[i] = map[string]sdk.LoadProgress{}
	}
	return pm
}

func (pm *progressMerger) update(i int, p sdk.LoadProgress) {
	pm.mu.Lock()
	defer pm.mu.Unlock()
	pm.last[i][p.Stage] = p
	merged := sdk.LoadProgress{Stage: p.Stage}
	var total int64
	seen := 0
	for _, m := range pm.last {
		if q, ok := m[p.Stage]; ok {
			merged.Done += q.Done
			total += q.Total
			seen++
		}
	}
	// Members that have not reached this stage yet count with this
	// member's total (they load the same file), so Total does not grow
	// while the stage runs.
	merged.Total = total + int64(len(pm.last)-seen)*p.Total
	pm.out(merged)
}
