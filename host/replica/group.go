package replica

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/host/plugins"
	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/tp"
)

// RankProcess is one rank of a tensor-parallel group: an adapter process
// the group drives directly. *plugins.Instance implements it. A rank that
// also has Ping(time.Duration) error is health-checked with it.
type RankProcess interface {
	sdk.Adapter
	// Close unloads (bounded by ctx) and stops the process.
	Close(ctx context.Context) error
	// Exited reports whether the process has exited.
	Exited() bool
}

// RankLauncher starts the process of rank r with env added to its
// environment (CUDA_VISIBLE_DEVICES, MulticastOffEnv) and log as its logger.
type RankLauncher func(ctx context.Context, rank int, env map[string]string, log hclog.Logger) (RankProcess, error)

// PluginRanks is the RankLauncher of plugin p: plugins.Launch with env.
func PluginRanks(p plugins.Plugin) RankLauncher {
	return func(ctx context.Context, _ int, env map[string]string, log hclog.Logger) (RankProcess, error) {
		return plugins.Launch(ctx, p, plugins.LaunchOptions{Env: env, Logger: log})
	}
}

// GroupOptions configure StartGroup.
type GroupOptions struct {
	// Name prefixes the ranks' names in logs: "<Name>.tp<r>".
	Name   string
	Logger hclog.Logger
	// GPUs: rank r runs on CUDA device GPUs[r] (CUDA_VISIBLE_DEVICES). Empty:
	// Size CPU ranks.
	GPUs []int
	// Size is the number of ranks (>= 2); with GPUs it must be len(GPUs)
	// (0 takes len(GPUs)).
	Size int
	// Launch starts one rank's process (PluginRanks(p) for an adapter
	// plugin; tests pass fakes).
	Launch RankLauncher
	// Supervise: HealthInterval, PingTimeout, the relaunch backoff,
	// MaxRestarts and OnRestart apply to the group as a unit.
	Supervise plugins.SuperviseOptions
	// Addr picks rank 0's rendezvous address for each Load;
	// default FreeLoopbackAddr.
	Addr func() (string, error)
	// CrashGrace is how long a call that failed on rank 0 with an error
	// that is not about the request waits for a rank process to be seen
	// dead (a follower's death reaches rank 0 as a broken all-reduce
	// first) before the error is returned as it is. Default 500 ms.
	CrashGrace time.Duration
}

// FreeLoopbackAddr returns 127.0.0.1:<port> for a port that was free a
// moment ago (listen on :0, close). Rank 0 binds it inside its Load; another
// process taking the port in between fails that Load, and the supervisor's
// relaunch (or the caller's retry) picks a new one.
func FreeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("pick a rendezvous port: %w", err)
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		return "", fmt.Errorf("pick a rendezvous port: %w", err)
	}
	return addr, nil
}

// generation is one set of rank processes; a relaunch makes a new one.
type generation struct {
	ranks []RankProcess
	since time.Time
	dead  atomic.Bool // the group saw a rank die (or killed them)
}

// Group is a tensor-parallel group: one model split over Size adapter
// processes (ranks) that meet inside Load (tp.rank / tp.size / tp.addr in
// LoadOptions.Extra) and in all-reduces of every forward step. It
// implements sdk.Adapter: Load loads every rank concurrently, Generate,
// Evaluate, Cancel and Stats go to rank 0 (which runs the engine and
// broadcasts each step to the others); Unload and Close reach every rank.
//
// The ranks are one unit: when any rank process dies (or stops answering
// its health ping), every rank is stopped, calls in flight and calls made
// until the group is back fail with errors matching sdk.ErrAdapterCrashed,
// and the whole group is relaunched (capped exponential backoff) and
// reloaded with the last model on a fresh rendezvous port. A group that gave
// up (SuperviseOptions.MaxRestarts) keeps failing with that error.
type Group struct {
	name string
	log  hclog.Logger
	o    GroupOptions
	size int
	sem  chan struct{} // one Load / Unload / relaunch at a time (ctx-aware)

	mu       sync.Mutex
	gen      *generation // nil while down
	ready    chan struct{}
	closed   bool
	failed   error
	pending  *generation // detached after a death, waiting for the relaunch
	lastLoad *sdk.LoadRequest
	info     sdk.ModelInfo
	restarts int
	backoff  time.Duration

	kick chan struct{}
	done chan struct{}
	wg   sync.WaitGroup
}

var _ sdk.Adapter = (*Group)(nil)

// StartGroup launches the ranks (concurrently) and starts supervising them.
// The group is not loaded: call Load, and Close when done.
func StartGroup(ctx context.Context, o GroupOptions) (*Group, error) {
	if o.Launch == nil {
		return nil, fmt.Errorf("tensor-parallel group: no launcher: %w", sdk.ErrInvalidArgument)
	}
	size := o.Size
	if len(o.GPUs) > 0 {
		if size != 0 && size != len(o.GPUs) {
			return nil, fmt.Errorf("tensor-parallel group: size %d but %d GPUs: %w", size, len(o.GPUs), sdk.ErrInvalidArgument)
		}
		size = len(o.GPUs)
	}
	if size < 2 {
		return nil, fmt.Errorf("tensor-parallel group: %d ranks, want at least 2: %w", size, sdk.ErrInvalidArgument)
	}
	if o.Logger == nil {
		o.Logger = hclog.NewNullLogger()
	}
	if o.Name == "" {
		o.Name = "model"
	}
	if o.Addr == nil {
		o.Addr = FreeLoopbackAddr
	}
	if o.CrashGrace <= 0 {
		o.CrashGrace = 500 * time.Millisecond
	}
	so := &o.Supervise
	if so.HealthInterval <= 0 {
		so.HealthInterval = time.Second
	}
	if so.PingTimeout <= 0 {
		so.PingTimeout = 5 * time.Second
	}
	if so.MinBackoff <= 0 {
		so.MinBackoff = 100 * time.Millisecond
	}
	if so.MaxBackoff <= 0 {
		so.MaxBackoff = 30 * time.Second
	}
	so.MaxBackoff = max(so.MaxBackoff, so.MinBackoff)
	if so.StableAfter <= 0 {
		so.StableAfter = time.Minute
	}
	s := &Group{
		name: o.Name, log: o.Logger, o: o, size: size, sem: make(chan struct{}, 1),
		ready: make(chan struct{}), backoff: so.MinBackoff,
		kick: make(chan struct{}, 1), done: make(chan struct{}),
	}
	g, err := s.launch(ctx)
	if err != nil {
		return nil, err
	}
	s.gen = g
	close(s.ready)
	s.log.Info("tensor-parallel group started", "model", s.name, "ranks", size, "gpus", fmt.Sprint(o.GPUs))
	s.wg.Add(1)
	go s.loop()
	return s, nil
}

// Size is the number of ranks.
func (s *Group) Size() int { return s.size }

// Restarts is how many times the group was relaunched.
func (s *Group) Restarts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.restarts
}

// Pids are the rank processes' ids, rank order (nil while the group is
// down; 0 for a rank that does not tell).
func (s *Group) Pids() []int {
	s.mu.Lock()
	g := s.gen
	s.mu.Unlock()
	if g == nil {
		return nil
	}
	out := make([]int, len(g.ranks))
	for r, rp := range g.ranks {
		if p, ok := rp.(interface{ Pid() int }); ok {
			out[r] = p.Pid()
		}
	}
	return out
}

func (s *Group) rankName(r int) string { return s.name + ".tp" + strconv.Itoa(r) }

// launch starts every rank's process concurrently; on any failure the
// others are stopped and every failure is reported.
func (s *Group) launch(ctx context.Context) (*generation, error) {
	ranks := make([]RankProcess, s.size)
	errs := make([]error, s.size)
	var wg sync.WaitGroup
	for r := range s.size {
		env := maps.Clone(MulticastOffEnv)
		if len(s.o.GPUs) > 0 {
			env["CUDA_VISIBLE_DEVICES"] = strconv.Itoa(s.o.GPUs[r])
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			rp, err := s.o.Launch(ctx, r, env, s.log.Named(s.rankName(r)))
			if err == nil && rp == nil {
				err = errors.New("launcher returned no process")
			}
			ranks[r], errs[r] = rp, err
		}()
	}
	wg.Wait()
	var failed []error
	for r, err := range errs {
		if err != nil {
			failed = append(failed, fmt.Errorf("launch rank %s: %w", s.rankName(r), err))
		}
	}
	g := &generation{ranks: ranks, since: time.Now()}
	if len(failed) > 0 {
		stopRanks(g, time.Second)
		return nil, errors.Join(failed...)
	}
	return g, nil
}

// stopRanks stops a generation's processes: rank 0 first (its Unload
// tells the followers to stop), then the others concurrently; each Unload
// is bounded by unload.
func stopRanks(g *generation, unload time.Duration) error {
	g.dead.Store(true)
	closeOne := func(r int) error {
		rp := g.ranks[r]
		if rp == nil {
			return nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), unload)
		defer cancel()
		err := rp.Close(ctx)
		if err != nil && !IsMemberDown(err) && !errors.Is(err, sdk.ErrNotLoaded) {
			return fmt.Errorf("rank %d: %w", r, err)
		}
		return nil
	}
	errs := make([]error, len(g.ranks))
	errs[0] = closeOne(0)
	var wg sync.WaitGroup
	for r := 1; r < len(g.ranks); r++ {
		wg.Add(1)
		go func() { defer wg.Done(); errs[r] = closeOne(r) }()
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (s *Group) acquire(ctx context.Context) error {
	select {
	case s.sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("tensor-parallel group %s: %w", s.name, ctx.Err())
	}
}

func (s *Group) releaseSem() { <-s.sem }

// lockGen waits until the group is up and takes the Load/Unload semaphore
// with the generation still current (the supervisor takes the semaphore to
// relaunch, so it is not held while waiting).
func (s *Group) lockGen(ctx context.Context) (*generation, error) {
	for {
		g, err := s.waitGen(ctx)
		if err != nil {
			return nil, err
		}
		if err := s.acquire(ctx); err != nil {
			return nil, err
		}
		s.mu.Lock()
		cur := s.gen
		s.mu.Unlock()
		if cur == g {
			return g, nil
		}
		s.releaseSem()
	}
}

// WaitReady blocks until the group's processes are up (and, after a
// relaunch, the model reloaded). With a done ctx it answers at once, which
// is how a replica Set sees a restarting member.
func (s *Group) WaitReady(ctx context.Context) error {
	_, err := s.waitGen(ctx)
	return err
}

func (s *Group) waitGen(ctx context.Context) (*generation, error) {
	for {
		s.mu.Lock()
		switch {
		case s.closed:
			s.mu.Unlock()
			return nil, fmt.Errorf("tensor-parallel group %s: %w", s.name, plugins.ErrClosed)
		case s.failed != nil:
			err := s.failed
			s.mu.Unlock()
			return nil, err
		case s.gen != nil:
			g := s.gen
			s.mu.Unlock()
			return g, nil
		}
		ready := s.ready
		s.mu.Unlock()
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, fmt.Errorf("tensor-parallel group %s is restarting: %w: %w", s.name, sdk.ErrAdapterCrashed, ctx.Err())
		}
	}
}

// current is the generation calls go to; while the group is being
// relaunched, calls fail at once (sdk.ErrAdapterCrashed) rather than wait
// for a reload that can take minutes.
func (s *Group) current() (*generation, error) {
	return s.waitGen(doneCtx)
}

// withRank is req as rank r of the group meeting at addr sees it.
func (s *Group) withRank(req sdk.LoadRequest, r int, addr string) sdk.LoadRequest {
	extra := make(map[string]string, len(req.Options.Extra)+3)
	maps.Copy(extra, req.Options.Extra)
	extra[tp.ExtraRank] = strconv.Itoa(r)
	extra[tp.ExtraSize] = strconv.Itoa(s.size)
	extra[tp.ExtraAddr] = addr
	req.Options.Extra = extra
	if len(s.o.GPUs) == 0 && req.Options.Threads == 0 {
		// CPU ranks share the cores instead of each taking all of them.
		req.Options.Threads = max(1, runtime.NumCPU()/s.size)
	}
	return req
}

// A rank whose previous (cancelled) Load is still unwinding answers
// ErrAlreadyLoaded; loadGen retries it this often, this far apart.
const (
	alreadyLoadedRetries = 50
	alreadyLoadedWait    = 100 * time.Millisecond
)

// loadGen loads req on every rank of g concurrently (they rendezvous in
// Load). The first rank to fail cancels the others' Load; every rank's error
// is reported, and the ranks that did load are unloaded again. On failure
// reusable says whether g's processes can take another Load (none exited,
// every loaded rank unloaded).
func (s *Group) loadGen(ctx context.Context, g *generation, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (info sdk.ModelInfo, reusable bool, err error) {
	addr, err := s.o.Addr()
	if err != nil {
		return sdk.ModelInfo{}, true, err
	}
	if progress == nil {
		progress = func(sdk.LoadProgress) {}
	}
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pm := newProgressMerger(s.size, progress)
	infos := make([]sdk.ModelInfo, s.size)
	errs := make([]error, s.size)
	var first atomic.Int32
	first.Store(-1)
	var wg sync.WaitGroup
	for r := range s.size {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for attempt := 0; ; attempt++ {
				infos[r], errs[r] = g.ranks[r].Load(lctx, s.withRank(req, r, addr), func(p sdk.LoadProgress) { pm.update(r, p) })
				// The group holds no model here, so a rank answering
				// ErrAlreadyLoaded is still finishing a Load that a failed
				// group load cancelled (the RPC returned on our side before
				// the rank saw the cancellation): wait for it, briefly.
				if !errors.Is(errs[r], sdk.ErrAlreadyLoaded) || attempt >= alreadyLoadedRetries {
					break
				}
				select {
				case <-time.After(alreadyLoadedWait):
					continue
				case <-lctx.Done():
				}
				break
			}
			if errs[r] != nil {
				first.CompareAndSwap(-1, int32(r))
				cancel() // the others would wait for this rank at the rendezvous
			}
		}()
	}
	wg.Wait()
	if f := int(first.Load()); f >= 0 {
		failed := []error{fmt.Errorf("rank %d: %w", f, errs[f])}
		reusable = true
		for r, err := range errs {
			if err != nil {
				if r != f {
					failed = append(failed, fmt.Errorf("rank %d: %w", r, err))
				}
				reusable = reusable && !IsMemberDown(err) && !g.ranks[r].Exited()
				continue
			}
			// loaded while another rank failed: its group is broken
			uctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if uerr := g.ranks[r].Unload(uctx); uerr != nil && !errors.Is(uerr, sdk.ErrNotLoaded) {
				s.log.Warn("unloading a rank after a failed group load", "rank", r, "error", uerr)
				reusable = false
			}
			cancel()
		}
		return sdk.ModelInfo{}, reusable, fmt.Errorf("tensor-parallel load of %s over %d ranks (rendezvous %s): %w", req.Path, s.size, addr, errors.Join(failed...))
	}
	info = infos[0]
	for r := 1; r < s.size; r++ {
		in := infos[r]
		if in.VocabSize != info.VocabSize || in.ContextLength != info.ContextLength || in.Architecture != info.Architecture {
			s.log.Warn("tensor-parallel ranks differ", "rank", r, "vocab", in.VocabSize, "context_length", in.ContextLength,
				"rank0_vocab", info.VocabSize, "rank0_context_length", info.ContextLength)
		}
		info.WeightBytes += in.WeightBytes
		info.KVBytes += in.KVBytes
		info.ParamCount += in.ParamCount
	}
	if info.DeviceName == "" {
		info.DeviceName = info.Backend
	}
	info.DeviceName = fmt.Sprintf("%d x %s, tensor-parallel", s.size, info.DeviceName)
	return info, true, nil
}

// Load implements sdk.Adapter: every rank loads its shard concurrently
// (rank 0 listens at a fresh loopback port, the others connect). Progress
// is merged over the ranks. ModelInfo is rank 0's with WeightBytes, KVBytes
// and ParamCount summed over the ranks (replicated tensors count once per
// rank) and DeviceName "<size> x <rank 0's device>, tensor-parallel". If any
// rank fails, the others' Load is cancelled, ranks that loaded are unloaded
// again and every rank's error is returned; the group stays up unloaded,
// unless a rank process died or would not unload: then the whole group is
// restarted (unloaded).
func (s *Group) Load(ctx context.Context, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (sdk.ModelInfo, error) {
	g, err := s.lockGen(ctx)
	if err != nil {
		return sdk.ModelInfo{}, err
	}
	defer s.releaseSem()
	s.mu.Lock()
	loaded := s.lastLoad != nil
	s.mu.Unlock()
	if loaded {
		return sdk.ModelInfo{}, sdk.ErrAlreadyLoaded
	}
	info, reusable, err := s.loadGen(ctx, g, req, progress)
	if err != nil {
		if !reusable {
			s.retire(g, "a rank died or would not unload after a failed load", false)
		}
		return sdk.ModelInfo{}, err
	}
	s.mu.Lock()
	if s.gen != g {
		s.mu.Unlock()
		return sdk.ModelInfo{}, fmt.Errorf("tensor-parallel group %s: a rank died while loading: %w", s.name, sdk.ErrAdapterCrashed)
	}
	r := req
	s.lastLoad = &r
	s.info = info
	s.mu.Unlock()
	s.log.Info("tensor-parallel group loaded", "model", req.Path, "ranks", s.size, "device", info.DeviceName)
	return info, nil
}

// retire takes g out of service and has the supervisor stop its processes
// and start a new group (reloading the last model). crash: a rank died (logs
// an error; otherwise the group is restarted after a failed Load).
func (s *Group) retire(g *generation, why string, crash bool) {
	s.mu.Lock()
	if s.gen != g || s.closed {
		s.mu.Unlock()
		return
	}
	s.gen = nil
	s.ready = make(chan struct{})
	s.pending = g
	g.dead.Store(true)
	s.mu.Unlock()
	if crash {
		s.log.Error("tensor-parallel rank down; restarting the whole group", "model", s.name, "reason", why)
	} else {
		s.log.Warn("restarting the tensor-parallel group", "model", s.name, "reason", why)
	}
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// requestError: err is about the request or the caller, not the ranks.
func requestError(err error) bool {
	for _, e := range []error{sdk.ErrInvalidArgument, sdk.ErrContextTooLong, sdk.ErrBusy, sdk.ErrNotLoaded,
		sdk.ErrAlreadyLoaded, sdk.ErrCanceled, sdk.ErrNotImplemented, sdk.ErrUnsupportedArchitecture,
		context.Canceled, context.DeadlineExceeded} {
		if errors.Is(err, e) {
			return true
		}
	}
	var oom *sdk.OutOfMemoryError
	return errors.As(err, &oom)
}

// deadRank returns a rank of g whose process exited, waiting up to wait for
// one to be seen; -1 if none.
func deadRank(g *generation, wait time.Duration) int {
	deadline := time.Now().Add(wait)
	for {
		for r, rp := range g.ranks {
			if rp.Exited() {
				return r
			}
		}
		if g.dead.Load() {
			return 0 // the group killed them
		}
		if time.Now().After(deadline) {
			return -1
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// check classifies the error of a call that rank 0 of g answered.
func (s *Group) check(ctx context.Context, g *generation, err error) error {
	if err == nil {
		return nil
	}
	if g.dead.Load() {
		return fmt.Errorf("tensor-parallel group %s went down: %w: %w", s.name, sdk.ErrAdapterCrashed, err)
	}
	if IsMemberDown(err) {
		s.retire(g, "rank 0: "+err.Error(), true)
		return fmt.Errorf("tensor-parallel group %s: rank 0: %w: %w", s.name, sdk.ErrAdapterCrashed, err)
	}
	if ctx.Err() != nil || requestError(err) {
		return err
	}
	if r := deadRank(g, s.o.CrashGrace); r >= 0 {
		s.retire(g, fmt.Sprintf("rank %d exited", r), true)
		return fmt.Errorf("tensor-parallel group %s: rank %d died: %w: %w", s.name, r, sdk.ErrAdapterCrashed, err)
	}
	return err
}

// Generate implements sdk.Adapter (rank 0 serves every request).
func (s *Group) Generate(ctx context.Context, req sdk.GenerateRequest, emit func(sdk.Chunk) error) error {
	g, err := s.current()
	if err != nil {
		return err
	}
	return s.check(ctx, g, g.ranks[0].Generate(ctx, req, emit))
}

// Cancel implements sdk.Adapter; a group that is down has nothing to
// cancel (its requests failed).
func (s *Group) Cancel(ctx context.Context, id string) error {
	s.mu.Lock()
	g := s.gen
	s.mu.Unlock()
	if g == nil {
		return nil
	}
	err := s.check(ctx, g, g.ranks[0].Cancel(ctx, id))
	if errors.Is(err, sdk.ErrAdapterCrashed) {
		return nil
	}
	return err
}

// Evaluate implements sdk.Adapter (rank 0 runs the step on every rank).
func (s *Group) Evaluate(ctx context.Context, tokens []int32) (sdk.Logits, error) {
	g, err := s.current()
	if err != nil {
		return sdk.Logits{}, err
	}
	l, err := g.ranks[0].Evaluate(ctx, tokens)
	return l, s.check(ctx, g, err)
}

// Stats implements sdk.Adapter: rank 0's (it runs the engine).
func (s *Group) Stats(ctx context.Context) (sdk.Stats, error) {
	g, err := s.current()
	if err != nil {
		return sdk.Stats{}, err
	}
	st, err := g.ranks[0].Stats(ctx)
	return st, s.check(ctx, g, err)
}

// Unload implements sdk.Adapter: rank 0 first (its engine's Close tells the
// followers to stop), then the others. A group that is down just forgets
// the model (the relaunch loads nothing).
func (s *Group) Unload(ctx context.Context) error {
	if err := s.acquire(ctx); err != nil {
		return err
	}
	defer s.releaseSem()
	s.mu.Lock()
	g := s.gen
	s.lastLoad = nil
	s.info = sdk.ModelInfo{}
	s.mu.Unlock()
	if g == nil {
		return nil
	}
	ignore := func(err error) bool { return err == nil || errors.Is(err, sdk.ErrNotLoaded) || IsMemberDown(err) }
	errs := make([]error, s.size)
	if err := g.ranks[0].Unload(ctx); !ignore(err) {
		errs[0] = fmt.Errorf("rank 0: %w", err)
	}
	var wg sync.WaitGroup
	for r := 1; r < s.size; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := g.ranks[r].Unload(ctx); !ignore(err) {
				errs[r] = fmt.Errorf("rank %d: %w", r, err)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Close stops supervision and every rank (rank 0 first, each unloaded
// within ctx).
func (s *Group) Close(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	g, pending := s.gen, s.pending
	s.gen, s.pending = nil, nil
	select {
	case <-s.ready:
	default:
		close(s.ready)
	}
	s.mu.Unlock()
	close(s.done)
	s.wg.Wait()
	if pending != nil {
		_ = stopRanks(pending, time.Second)
	}
	if g == nil {
		return nil
	}
	unload := 30 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		unload = max(time.Until(dl), time.Millisecond)
	}
	if err := stopRanks(g, unload); err != nil {
		return fmt.Errorf("close tensor-parallel group %s: %w", s.name, err)
	}
	return nil
}

// loop supervises the group: it pings every rank each HealthInterval and
// restarts the whole group when one is dead or a call saw it die.
func (s *Group) loop() {
	defer s.wg.Done()
	t := time.NewTicker(s.o.Supervise.HealthInterval)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		case <-s.kick:
		}
		s.mu.Lock()
		g, pending := s.gen, s.pending
		s.pending = nil
		s.mu.Unlock()
		if pending != nil {
			s.relaunch(pending)
			continue
		}
		if g == nil {
			continue
		}
		if r, err := s.unhealthy(g); r >= 0 {
			s.retire(g, fmt.Sprintf("rank %d: %v", r, err), true)
			continue
		}
		if time.Since(g.since) >= s.o.Supervise.StableAfter {
			s.mu.Lock()
			s.backoff = s.o.Supervise.MinBackoff
			s.mu.Unlock()
		}
	}
}

// unhealthy returns the first rank that exited or does not answer a ping.
func (s *Group) unhealthy(g *generation) (int, error) {
	for r, rp := range g.ranks {
		if rp.Exited() {
			return r, errors.New("process exited")
		}
		if p, ok := rp.(interface{ Ping(time.Duration) error }); ok {
			if err := p.Ping(s.o.Supervise.PingTimeout); err != nil {
				return r, err
			}
		}
	}
	return -1, nil
}

// relaunch stops a retired generation and starts a new one, reloading the
// last model, with capped exponential backoff between attempts.
func (s *Group) relaunch(old *generation) {
	_ = stopRanks(old, 2*time.Second)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-s.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	for attempt := 1; ; attempt++ {
		s.mu.Lock()
		delay := s.backoff
		s.backoff = min(2*s.backoff, s.o.Supervise.MaxBackoff)
		s.mu.Unlock()
		select {
		case <-s.done:
			return
		case <-time.After(delay):
		}
		if err := s.acquire(ctx); err != nil {
			return
		}
		g, err := s.start(ctx)
		s.releaseSem()
		if err == nil {
			s.mu.Lock()
			if s.closed {
				s.mu.Unlock()
				_ = stopRanks(g, time.Second)
				return
			}
			s.gen = g
			s.restarts++
			n := s.restarts
			close(s.ready)
			s.mu.Unlock()
			s.log.Info("tensor-parallel group relaunched", "model", s.name, "ranks", s.size, "restarts", n)
			if s.o.Supervise.OnRestart != nil {
				s.o.Supervise.OnRestart(n)
			}
			return
		}
		s.log.Error("relaunching the tensor-parallel group failed", "model", s.name, "attempt", attempt, "error", err)
		if ctx.Err() != nil {
			return
		}
		if m := s.o.Supervise.MaxRestarts; m > 0 && attempt >= m {
			s.mu.Lock()
			s.failed = fmt.Errorf("tensor-parallel group %s: gave up after %d relaunch attempts: %w: %w", s.name, attempt, sdk.ErrAdapterCrashed, err)
			close(s.ready)
			s.mu.Unlock()
			return
		}
	}
}

// start launches a new generation and reloads the last model in it.
func (s *Group) start(ctx context.Context) (*generation, error) {
	g, err := s.launch(ctx)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	load := s.lastLoad
	s.mu.Unlock()
	if load == nil {
		return g, nil
	}
	if _, _, err := s.loadGen(ctx, g, *load, nil); err != nil {
		_ = stopRanks(g, time.Second)
		return nil, fmt.Errorf("reload %s: %w", load.Path, err)
	}
	s.log.Info("model reloaded after relaunch", "model", load.Path, "ranks", s.size)
	return g, nil
}
