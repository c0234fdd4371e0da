package plugins

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
)

// ErrClosed is returned by calls on a closed *Managed.
var ErrClosed = errors.New("adapter is closed")

// SuperviseOptions tune supervision. Zero values mean the defaults.
type SuperviseOptions struct {
	HealthInterval time.Duration // between health checks; default 1 s
	PingTimeout    time.Duration // default 5 s
	MinBackoff     time.Duration // first relaunch delay; default 100 ms
	MaxBackoff     time.Duration // cap of the doubling delay; default 30 s
	StableAfter    time.Duration // uptime after which the backoff resets; default 1 min
	MaxRestarts    int           // consecutive failed relaunch attempts before giving up; 0 = never give up
	// OnRestart, if set, is called after each successful relaunch with the
	// number of relaunches so far.
	OnRestart func(restarts int)
}

func (o *SuperviseOptions) defaults() {
	if o.HealthInterval <= 0 {
		o.HealthInterval = time.Second
	}
	if o.PingTimeout <= 0 {
		o.PingTimeout = 5 * time.Second
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = 100 * time.Millisecond
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 30 * time.Second
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = o.MinBackoff
	}
	if o.StableAfter <= 0 {
		o.StableAfter = time.Minute
	}
}

// Managed is a supervised adapter: it implements sdk.Adapter, health-checks
// the process, relaunches it when it dies (capped exponential backoff) and
// reloads the last model loaded through it. Calls in flight when the
// process dies fail with an error matching sdk.ErrAdapterCrashed; calls made
// while it is being relaunched wait for it (bounded by their ctx).
type Managed struct {
	plugin Plugin
	lopts  LaunchOptions
	sopts  SuperviseOptions
	log    hclog.Logger

	mu       sync.Mutex
	cur      *Instance     // nil while relaunching
	since    time.Time     // when cur started
	ready    chan struct{} // closed while cur != nil, or on close/give-up
	closed   bool
	failed   error
	lastLoad *sdk.LoadRequest
	dead     *Instance // detached after a crashed call, waiting for relaunch
	restarts int
	backoff  time.Duration

	kick chan struct{}
	done chan struct{}
	wg   sync.WaitGroup
}

var _ sdk.Adapter = (*Managed)(nil)

// Supervise launches p and supervises it until Close.
func Supervise(ctx context.Context, p Plugin, lopts LaunchOptions, sopts SuperviseOptions) (*Managed, error) {
	sopts.defaults()
	if lopts.Logger == nil {
		lopts.Logger = hclog.NewNullLogger()
	}
	inst, err := Launch(ctx, p, lopts)
	if err != nil {
		return nil, err
	}
	m := &Managed{
		plugin: p, lopts: lopts, sopts: sopts, log: lopts.Logger,
		cur: inst, since: time.Now(), ready: make(chan struct{}),
		backoff: sopts.MinBackoff,
		kick:    make(chan struct{}, 1), done: make(chan struct{}),
	}
	close(m.ready)
	m.wg.Add(1)
	go m.loop()
	return m, nil
}

// Plugin returns the supervised plugin.
func (m *Managed) Plugin() Plugin { return m.plugin }

// Info returns the adapter's Info.
func (m *Managed) Info() sdk.Info { return m.plugin.Info }

// Restarts returns how many times the adapter was relaunched.
func (m *Managed) Restarts() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.restarts
}

// Pid returns the current adapter process id (0 while relaunching).
func (m *Managed) Pid() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cur == nil {
		return 0
	}
	return m.cur.Pid()
}

// WaitReady blocks until an adapter process is up (and its model reloaded).
func (m *Managed) WaitReady(ctx context.Context) error {
	_, err := m.instance(ctx)
	return err
}

func (m *Managed) instance(ctx context.Context) (*Instance, error) {
	for {
		m.mu.Lock()
		switch {
		case m.closed:
			m.mu.Unlock()
			return nil, fmt.Errorf("adapter %s: %w", m.plugin.Name, ErrClosed)
		case m.failed != nil:
			err := m.failed
			m.mu.Unlock()
			return nil, err
		case m.cur != nil:
			inst := m.cur
			m.mu.Unlock()
			return inst, nil
		}
		ready := m.ready
		m.mu.Unlock()
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, fmt.Errorf("adapter %s is restarting: %w", m.plugin.Name, ctx.Err())
		}
	}
}

// after inspects a call's error: when the adapter crashed, the instance is
// detached at once (so that the next call waits for the relaunch instead of
// hitting the dead process) and the supervisor is woken.
func (m *Managed) after(inst *Instance, err error) error {
	if errors.Is(err, sdk.ErrAdapterCrashed) {
		m.mu.Lock()
		if m.detachLocked(inst) {
			m.dead = inst
		}
		m.mu.Unlock()
		select {
		case m.kick <- struct{}{}:
		default:
		}
	}
	return err
}

// detachLocked makes dead no longer current; false if it was not current.
func (m *Managed) detachLocked(dead *Instance) bool {
	if m.cur != dead || m.closed {
		return false
	}
	m.cur = nil
	m.ready = make(chan struct{})
	return true
}

// Load implements sdk.Adapter; the request is remembered and replayed after
// a relaunch.
func (m *Managed) Load(ctx context.Context, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (sdk.ModelInfo, error) {
	inst, err := m.instance(ctx)
	if err != nil {
		return sdk.ModelInfo{}, err
	}
	info, err := inst.Load(ctx, req, progress)
	if err == nil {
		m.mu.Lock()
		r := req
		m.lastLoad = &r
		m.mu.Unlock()
	}
	return info, m.after(inst, err)
}

// Plan asks the adapter for a memory plan.
func (m *Managed) Plan(ctx context.Context, req sdk.LoadRequest) (sdk.MemoryPlan, error) {
	inst, err := m.instance(ctx)
	if err != nil {
		return sdk.MemoryPlan{}, err
	}
	p, err := inst.Plan(ctx, req)
	return p, m.after(inst, err)
}

// Generate implements sdk.Adapter.
func (m *Managed) Generate(ctx context.Context, req sdk.GenerateRequest, emit func(sdk.Chunk) error) error {
	inst, err := m.instance(ctx)
	if err != nil {
		return err
	}
	return m.after(inst, inst.Generate(ctx, req, emit))
}

// Cancel implements sdk.Adapter.
func (m *Managed) Cancel(ctx context.Context, id string) error {
	inst, err := m.instance(ctx)
	if err != nil {
		return err
	}
	return m.after(inst, inst.Cancel(ctx, id))
}

// Evaluate implements sdk.Adapter.
func (m *Managed) Evaluate(ctx context.Context, tokens []int32) (sdk.Logits, error) {
	inst, err := m.instance(ctx)
	if err != nil {
		return sdk.Logits{}, err
	}
	l, err := inst.Evaluate(ctx, tokens)
	return l, m.after(inst, err)
}

// Stats implements sdk.Adapter.
func (m *Managed) Stats(ctx context.Context) (sdk.Stats, error) {
	inst, err := m.instance(ctx)
	if err != nil {
		return sdk.Stats{}, err
	}
	s, err := inst.Stats(ctx)
	return s, m.after(inst, err)
}

// Unload implements sdk.Adapter; after it, a relaunch loads nothing.
func (m *Managed) Unload(ctx context.Context) error {
	inst, err := m.instance(ctx)
	if err != nil {
		return err
	}
	err = inst.Unload(ctx)
	if err == nil {
		m.mu.Lock()
		m.lastLoad = nil
		m.mu.Unlock()
	}
	return m.after(inst, err)
}

// Close stops supervision, unloads the model and stops the process.
func (m *Managed) Close(ctx context.Context) error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	inst, dead := m.cur, m.dead
	m.cur, m.dead = nil, nil
	m.wakeLocked()
	m.mu.Unlock()
	close(m.done)
	m.wg.Wait()
	if dead != nil {
		dead.kill()
	}
	if inst != nil {
		return inst.Close(ctx)
	}
	return nil
}

func (m *Managed) wakeLocked() {
	select {
	case <-m.ready:
	default:
		close(m.ready)
	}
}

func (m *Managed) loop() {
	defer m.wg.Done()
	t := time.NewTicker(m.sopts.HealthInterval)
	defer t.Stop()
	for {
		select {
		case <-m.done:
			return
		case <-t.C:
		case <-m.kick:
		}
		m.mu.Lock()
		inst, since, dead := m.cur, m.since, m.dead
		m.dead = nil
		m.mu.Unlock()
		if dead != nil {
			m.log.Error("adapter crashed; relaunching", "plugin", m.plugin.Name)
			m.relaunch(dead)
			continue
		}
		if inst == nil {
			continue
		}
		err := inst.Ping(m.sopts.PingTimeout)
		if err == nil {
			if time.Since(since) >= m.sopts.StableAfter {
				m.mu.Lock()
				m.backoff = m.sopts.MinBackoff
				m.mu.Unlock()
			}
			continue
		}
		m.mu.Lock()
		detached := m.detachLocked(inst)
		m.mu.Unlock()
		if detached {
			m.log.Error("adapter is down; relaunching", "plugin", m.plugin.Name, "error", err)
			m.relaunch(inst)
		}
	}
}

// relaunch replaces a dead (already detached) instance, retrying with
// capped exponential backoff.
func (m *Managed) relaunch(dead *Instance) {
	dead.kill()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-m.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	for attempt := 1; ; attempt++ {
		m.mu.Lock()
		delay := m.backoff
		m.backoff = min(2*m.backoff, m.sopts.MaxBackoff)
		m.mu.Unlock()
		select {
		case <-m.done:
			return
		case <-time.After(delay):
		}
		inst, err := m.start(ctx)
		if err == nil {
			m.mu.Lock()
			if m.closed {
				m.mu.Unlock()
				_ = inst.Close(context.Background())
				return
			}
			m.cur, m.since = inst, time.Now()
			m.restarts++
			n := m.restarts
			close(m.ready)
			m.mu.Unlock()
			m.log.Info("adapter relaunched", "plugin", m.plugin.Name, "pid", inst.Pid(), "restarts", n)
			if m.sopts.OnRestart != nil {
				m.sopts.OnRestart(n)
			}
			return
		}
		m.log.Error("relaunching adapter failed", "plugin", m.plugin.Name, "attempt", attempt, "error", err)
		if m.sopts.MaxRestarts > 0 && attempt >= m.sopts.MaxRestarts {
			m.mu.Lock()
			m.failed = fmt.Errorf("adapter %s: gave up after %d relaunch attempts: %w: %w", m.plugin.Name, attempt, sdk.ErrAdapterCrashed, err)
			m.wakeLocked()
			m.mu.Unlock()
			return
		}
	}
}

// start launches a fresh process and reloads the last model.
func (m *Managed) start(ctx context.Context) (*Instance, error) {
	inst, err := Launch(ctx, m.plugin, m.lopts)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	load := m.lastLoad
	m.mu.Unlock()
	if load != nil {
		if _, err := inst.Load(ctx, *load, func(sdk.LoadProgress) {}); err != nil {
			inst.kill()
			return nil, fmt.Errorf("reload %s: %w", load.Path, err)
		}
		m.log.Info("model reloaded after relaunch", "plugin", m.plugin.Name, "model", load.Path)
	}
	return inst, nil
}
