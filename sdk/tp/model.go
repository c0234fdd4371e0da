package tp

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"time"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
)

// Lead wraps rank 0's model for the engine: every call (Forward,
// ForwardGreedy, ForwardSample, CopyBlock, CopyGroupBlock, Close) is first
// broadcast to the followers as a step message, then run on m. The result
// implements engine.GreedyModel, engine.GroupModel and engine.SamplingModel
// exactly when m does (the engine type-asserts them); DeviceSampling is m's.
//
// A step, once broadcast, always runs to its end on m: its context is
// detached from cancellation (the followers are already running it, and a
// rank that stopped half-way would leave the others waiting in an
// all-reduce). A step that fails on this rank, or panics, breaks the group:
// the ranks cannot tell how far the others got. A broken group fails every
// later call. Close broadcasts Close, closes g (releasing the followers),
// then m.
func Lead(m engine.Model, g *Group) engine.Model {
	l := &leader{m: m, g: g}
	l.rm, _ = m.(engine.GreedyModel)
	l.gm, _ = m.(engine.GroupModel)
	l.sm, _ = m.(engine.SamplingModel)
	return wrap(l, m)
}

type leader struct {
	m      engine.Model
	gm     engine.GroupModel
	rm     engine.GreedyModel
	sm     engine.SamplingModel
	g      *Group
	mu     sync.Mutex
	closed bool
}

// core is what the leader and the follower implement for the optional
// engine interfaces; wrap exposes those of the rank's model only.
type core interface {
	engine.Model
	forwardGreedy(ctx context.Context, b *engine.Batch) ([]int32, error)
	copyGroupBlock(group int, dst, src int32) error
	deviceSampling() bool
	forwardSample(ctx context.Context, b *engine.Batch, specs []engine.SampleSpec) ([]int32, *engine.Output, error)
}

// One type per optional interface; the wrappers below embed a set of them.
type (
	greedyCap struct{ c core }
	groupCap  struct{ c core }
	sampleCap struct{ c core }
)

func (w greedyCap) ForwardGreedy(ctx context.Context, b *engine.Batch) ([]int32, error) {
	return w.c.forwardGreedy(ctx, b)
}
func (w groupCap) CopyGroupBlock(group int, dst, src int32) error {
	return w.c.copyGroupBlock(group, dst, src)
}
func (w sampleCap) DeviceSampling() bool { return w.c.deviceSampling() }
func (w sampleCap) ForwardSample(ctx context.Context, b *engine.Batch, specs []engine.SampleSpec) ([]int32, *engine.Output, error) {
	return w.c.forwardSample(ctx, b, specs)
}

type (
	withGreedy struct {
		core
		greedyCap
	}
	withGroup struct {
		core
		groupCap
	}
	withSample struct {
		core
		sampleCap
	}
	withGreedyGroup struct {
		core
		greedyCap
		groupCap
	}
	withGreedySample struct {
		core
		greedyCap
		sampleCap
	}
	withGroupSample struct {
		core
		groupCap
		sampleCap
	}
	withGreedyGroupSample struct {
		core
		greedyCap
		groupCap
		sampleCap
	}
)

// wrap returns c with the optional engine interfaces that m implements.
func wrap(c core, m engine.Model) engine.Model {
	_, greedy := m.(engine.GreedyModel)
	_, group := m.(engine.GroupModel)
	_, sample := m.(engine.SamplingModel)
	r, g, s := greedyCap{c}, groupCap{c}, sampleCap{c}
	switch {
	case greedy && group && sample:
		return withGreedyGroupSample{c, r, g, s}
	case greedy && group:
		return withGreedyGroup{c, r, g}
	case greedy && sample:
		return withGreedySample{c, r, s}
	case group && sample:
		return withGroupSample{c, g, s}
	case greedy:
		return withGreedy{c, r}
	case group:
		return withGroup{c, g}
	case sample:
		return withSample{c, s}
	}
	return c
}

func (l *leader) Spec() engine.Spec { return l.m.Spec() }

// step broadcasts s, then runs it locally with a context that cannot be
// cancelled mid-step.
func (l *leader) step(ctx context.Context, s step, run func(ctx context.Context) error) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("tp: %v on a closed model", s.Op)
	}
	if err := ctx.Err(); err != nil {
		return err // nothing sent yet: the ranks stay in step
	}
	if _, err := l.g.Broadcast(encodeStep(s)); err != nil {
		return fmt.Errorf("tp: %v: %w", s.Op, err)
	}
	err := protect(func() error { return run(context.WithoutCancel(ctx)) })
	if err != nil {
		l.g.Abort(fmt.Errorf("%v failed on the leader: %w", s.Op, err))
		return fmt.Errorf("tp: rank 0: %v: %w", s.Op, err)
	}
	if gerr := l.g.Err(); gerr != nil {
		// A follower failed during the step: its result cannot be trusted.
		return fmt.Errorf("tp: %v: %w", s.Op, gerr)
	}
	return nil
}

// protect runs f, turning a panic into an error.
func protect(f func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic: %v\n%s", r, debug.Stack())
		}
	}()
	return f()
}

func (l *leader) Forward(ctx context.Context, b *engine.Batch) (*engine.Output, error) {
	var out *engine.Output
	err := l.step(ctx, step{Op: opForward, Batch: b}, func(ctx context.Context) error {
		var err error
		out, err = l.m.Forward(ctx, b)
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

func (l *leader) forwardGreedy(ctx context.Context, b *engine.Batch) ([]int32, error) {
	var toks []int32
	err := l.step(ctx, step{Op: opForwardGreedy, Batch: b}, func(ctx context.Context) error {
		var err error
		toks, err = l.rm.ForwardGreedy(ctx, b)
		return err
	})
	if err != nil {
		return nil, err
	}
	return toks, nil
}

func (l *leader) deviceSampling() bool { return l.sm.DeviceSampling() }

func (l *leader) forwardSample(ctx context.Context, b *engine.Batch, specs []engine.SampleSpec) ([]int32, *engine.Output, error) {
	if b == nil || len(specs) != len(b.Seqs) {
		// Checked before the broadcast: the model would refuse it on every
		// rank, and a failed step breaks the group.
		n := 0
		if b != nil {
			n = len(b.Seqs)
		}
		return nil, nil, fmt.Errorf("tp: ForwardSample: %d specs for a batch of %d sequences: %w", len(specs), n, sdk.ErrInvalidArgument)
	}
	var toks []int32
	var out *engine.Output
	err := l.step(ctx, step{Op: opForwardSample, Batch: b, Specs: specs}, func(ctx context.Context) error {
		var err error
		toks, out, err = l.sm.ForwardSample(ctx, b, specs)
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	return toks, out, nil
}

func (l *leader) CopyBlock(dst, src int32) error {
	return l.step(context.Background(), step{Op: opCopyBlock, Dst: dst, Src: src}, func(context.Context) error {
		return l.m.CopyBlock(dst, src)
	})
}

func (l *leader) copyGroupBlock(group int, dst, src int32) error {
	if group < 0 {
		// Checked here: the step message cannot carry it, and the model
		// would refuse it anyway.
		return fmt.Errorf("tp: CopyGroupBlock: group %d out of range", group)
	}
	return l.step(context.Background(), step{Op: opCopyGroupBlock, Group: group, Dst: dst, Src: src}, func(context.Context) error {
		return l.gm.CopyGroupBlock(group, dst, src)
	})
}

// Close tells the followers to stop (they close their models), leaves the
// group and closes m.
func (l *leader) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	// A broken group fails this broadcast: its followers have stopped
	// already, and the calls that met the break reported it.
	_, _ = l.g.Broadcast(encodeStep(step{Op: opClose}))
	// Closing the group first releases the followers (they wait for it,
	// see serve) while m frees its memory.
	_ = l.g.Close()
	return l.m.Close()
}

// Follow runs a follower rank: a goroutine receives the leader's step
// messages over g and runs each on m (results are dropped; the leader has
// its own), until the leader sends Close, the group breaks, or the returned
// model is closed. Then it leaves the group, closes m and calls done once
// with the reason: nil after the leader's Close or a local Close, else the
// error (done may be nil).
//
// A step that fails on this rank (or a message that does not decode) breaks
// the group, with the reason sent to the others, so the leader's next
// broadcast or all-reduce fails instead of waiting.
//
// The returned model reports m's Spec (and DeviceSampling) and implements
// engine.GreedyModel, engine.GroupModel and engine.SamplingModel when m
// does, but refuses every call from its own engine (Forward, ForwardGreedy,
// ForwardSample, CopyBlock, CopyGroupBlock): a follower serves no requests.
// Its Close stops the loop and closes m.
func Follow(m engine.Model, g *Group, done func(error)) engine.Model {
	f := &follower{m: m, g: g, exited: make(chan struct{})}
	go f.loop(done)
	return wrap(f, m)
}

type follower struct {
	m         engine.Model
	g         *Group
	exited    chan struct{}
	closeMu   sync.Mutex
	closing   bool
	closeOnce sync.Once
	closeErr  error
}

func (f *follower) forwardGreedy(context.Context, *engine.Batch) ([]int32, error) {
	return nil, f.refuse("ForwardGreedy")
}
func (f *follower) copyGroupBlock(int, int32, int32) error {
	return f.refuse("CopyGroupBlock")
}
func (f *follower) deviceSampling() bool { return f.m.(engine.SamplingModel).DeviceSampling() }
func (f *follower) forwardSample(context.Context, *engine.Batch, []engine.SampleSpec) ([]int32, *engine.Output, error) {
	return nil, nil, f.refuse("ForwardSample")
}

// ErrFollower is returned by a follower's model for calls its own engine
// makes: only rank 0 serves requests.
var ErrFollower = errors.New("tensor-parallel follower serves no requests")

func (f *follower) refuse(call string) error {
	return fmt.Errorf("tp: %s: rank %d is a tensor-parallel follower (rank 0 serves): %w", call, f.g.Rank(), ErrFollower)
}

func (f *follower) Spec() engine.Spec { return f.m.Spec() }

func (f *follower) Forward(context.Context, *engine.Batch) (*engine.Output, error) {
	return nil, f.refuse("Forward")
}

func (f *follower) CopyBlock(int32, int32) error { return f.refuse("CopyBlock") }

// Close stops the loop (leaving the group) and closes m.
func (f *follower) Close() error {
	f.closeMu.Lock()
	f.closing = true
	f.closeMu.Unlock()
	_ = f.g.Close()
	<-f.exited
	return f.closeModel()
}

func (f *follower) closeModel() error {
	f.closeOnce.Do(func() { f.closeErr = f.m.Close() })
	return f.closeErr
}

func (f *follower) isClosing() bool {
	f.closeMu.Lock()
	defer f.closeMu.Unlock()
	return f.closing
}

// closeLinger bounds how long a follower waits, after the leader's Close
// message, for the leader to close the group.
const closeLinger = 5 * time.Second

func (f *follower) loop(done func(error)) {
	reason := f.serve()
	_ = f.g.Close()
	if err := f.closeModel(); err != nil && reason == nil {
		reason = fmt.Errorf("tp: rank %d: closing the model: %w", f.g.Rank(), err)
	}
	close(f.exited)
	if done != nil {
		done(reason)
	}
}

// serve runs steps until Close or an error (the reason; nil for a clean
// stop).
func (f *follower) serve() error {
	ctx := context.Background()
	for {
		msg, err := f.g.Broadcast(nil)
		if err != nil {
			if f.isClosing() {
				return nil
			}
			return fmt.Errorf("tp: rank %d waiting for the next step: %w", f.g.Rank(), err)
		}
		s, err := decodeStep(msg)
		if err != nil {
			f.g.Abort(err)
			return fmt.Errorf("tp: rank %d: %w", f.g.Rank(), err)
		}
		if s.Op == opClose {
			// Wait for the leader to close the connection before closing
			// ours: if this rank hung up first, rank 0 could take it for a
			// lost rank and tell the others, racing its own Close message.
			t := time.NewTimer(closeLinger)
			defer t.Stop()
			select {
			case <-f.g.Done():
			case <-t.C:
			}
			return nil
		}
		if err := protect(func() error { return f.run(ctx, s) }); err != nil {
			if f.isClosing() {
				return nil // closed locally mid-step
			}
			err = fmt.Errorf("%v failed on rank %d: %w", s.Op, f.g.Rank(), err)
			f.g.Abort(err)
			return fmt.Errorf("tp: %w", err)
		}
	}
}

func (f *follower) run(ctx context.Context, s step) error {
	switch s.Op {
	case opForward:
		_, err := f.m.Forward(ctx, s.Batch)
		return err
	case opForwardGreedy:
		rm, ok := f.m.(engine.GreedyModel)
		if !ok {
			return errors.New("this rank's model has no ForwardGreedy")
		}
		_, err := rm.ForwardGreedy(ctx, s.Batch)
		return err
	case opForwardSample:
		sm, ok := f.m.(engine.SamplingModel)
		if !ok {
			return errors.New("this rank's model has no ForwardSample")
		}
		// The same specs as rank 0 (Host rows included: the lm head is
		// replicated, so every rank can); the tokens are dropped.
		_, _, err := sm.ForwardSample(ctx, s.Batch, s.Specs)
		return err
	case opCopyBlock:
		return f.m.CopyBlock(s.Dst, s.Src)
	case opCopyGroupBlock:
		gm, ok := f.m.(engine.GroupModel)
		if !ok {
			return errors.New("this rank's model has no CopyGroupBlock")
		}
		return gm.CopyGroupBlock(s.Group, s.Dst, s.Src)
	}
	return fmt.Errorf("unexpected step %v", s.Op)
}
