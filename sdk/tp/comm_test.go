package tp

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
)

func newComms(t *testing.T, gs []*Group, backends []ml.Backend) ([]ml.Comm, []error) {
	t.Helper()
	comms := make([]ml.Comm, len(gs))
	errs := onAll(gs, func(g *Group) error {
		c, err := NewComm(g, backends[g.Rank()])
		comms[g.Rank()] = c
		return err
	})
	return comms, errs
}

func cpuBackends(n int) []ml.Backend {
	bs := make([]ml.Backend, n)
	for i := range bs {
		bs[i] = cpu.New(1)
	}
	return bs
}

func TestHostCommCPU(t *testing.T) {
	gs := newGroups(t, 2, 0)
	bs := cpuBackends(2)
	comms, errs := newComms(t, gs, bs)
	for r := range gs {
		require.NoError(t, errs[r])
		assert.Equal(t, r, comms[r].Rank())
		assert.Equal(t, 2, comms[r].Size())
		assert.False(t, comms[r].Graphable())
	}

	// [4, 3] activations; rank r holds r+1 times (i + 0.25).
	ts := make([]ml.Tensor, 2)
	for r, b := range bs {
		x, err := b.Alloc(ml.F32, 4, 3)
		require.NoError(t, err)
		v := make([]float32, 12)
		for i := range v {
			v[i] = float32(r+1) * (float32(i) + 0.25)
		}
		require.NoError(t, b.WriteF32(x, v))
		ts[r] = x
	}
	for range 3 { // repeated, as the layers do
		var wg sync.WaitGroup
		for r := range gs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				comms[r].AllReduce(bs[r], ts[r])
			}()
		}
		wg.Wait()
	}
	for r, b := range bs {
		require.NoError(t, comms[r].Err())
		got := make([]float32, 12)
		require.NoError(t, b.ReadF32(ts[r], got))
		for i, x := range got {
			// Round 1: r0 = a, r1 = 2a -> both 3a; round 2: 6a; round 3: 12a.
			want := (float32(i) + 0.25) * 12
			assert.Equal(t, want, x, "rank %d [%d]", r, i)
		}
	}

	// A view (rows of a bigger tensor) works as well.
	for r, b := range bs {
		v, err := b.Rows(ts[r], 1, 1)
		require.NoError(t, err)
		ts[r] = v
	}
	onAll(gs, func(g *Group) error { comms[g.Rank()].AllReduce(bs[g.Rank()], ts[g.Rank()]); return nil })
	got := make([]float32, 4)
	require.NoError(t, bs[0].ReadF32(ts[0], got))
	assert.Equal(t, (4+0.25)*24, float64(got[0]))

	for _, c := range comms {
		require.NoError(t, c.Close())
	}
	// The comm does not own the group.
	assert.NoError(t, gs[0].Err())
}

// A rank that passes a bad tensor keeps the error and breaks the group, so
// the other rank does not wait for it.
func TestHostCommLocalFailure(t *testing.T) {
	gs := newGroups(t, 2, 0)
	bs := cpuBackends(2)
	comms, errs := newComms(t, gs, bs)
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	x0, err := bs[0].Alloc(ml.F32, 8)
	require.NoError(t, err)
	x1, err := bs[1].Alloc(ml.I32, 8)
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		comms[0].AllReduce(bs[0], x0)
		close(done)
	}()
	comms[1].AllReduce(bs[1], x1)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("rank 0 still waiting after rank 1 failed")
	}
	assert.ErrorContains(t, comms[1].Err(), "want F32")
	require.Error(t, comms[0].Err())
	assert.ErrorIs(t, comms[0].Err(), ErrBroken)
	assert.ErrorContains(t, comms[0].Err(), "want F32")
	// Sticky: later calls are no-ops that keep the first error.
	first := comms[0].Err()
	comms[0].AllReduce(bs[0], x0)
	assert.Equal(t, first, comms[0].Err())
}

// collBackend is a CPU backend with fake device collectives: NewComm blocks
// until all ranks joined, like ncclCommInitRank.
type collBackend struct {
	*cpu.Backend
	hub     *collHub
	idErr   error
	initErr error
}

type collHub struct {
	mu      sync.Mutex
	ids     [][]byte
	joined  int
	size    int
	all     chan struct{}
	aborted int
	// abortWaitsForClose makes Abort block until the comm's Close.
	abortWaitsForClose bool
}

func (b *collBackend) CommID() ([]byte, error) {
	if b.idErr != nil {
		return nil, b.idErr
	}
	return []byte("fake-nccl-id"), nil
}

func (b *collBackend) NewComm(id []byte, rank, size int) (ml.Comm, error) {
	b.hub.mu.Lock()
	b.hub.ids = append(b.hub.ids, append([]byte(nil), id...))
	b.hub.mu.Unlock()
	if b.initErr != nil {
		return nil, b.initErr
	}
	b.hub.mu.Lock()
	b.hub.joined++
	if b.hub.joined == size {
		close(b.hub.all)
	}
	b.hub.mu.Unlock()
	<-b.hub.all // blocks forever when a rank never joins (like NCCL)
	return &fakeDevComm{rank: rank, size: size, hub: b.hub, released: make(chan struct{})}, nil
}

type fakeDevComm struct {
	rank, size int
	hub        *collHub
	mu         sync.Mutex
	closed     bool
	released   chan struct{} // closed by Close
}

func (c *fakeDevComm) Rank() int                       { return c.rank }
func (c *fakeDevComm) Size() int                       { return c.size }
func (c *fakeDevComm) AllReduce(ml.Backend, ml.Tensor) {}
func (c *fakeDevComm) Graphable() bool                 { return true }
func (c *fakeDevComm) Err() error                      { return nil }
func (c *fakeDevComm) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closed {
		c.closed = true
		close(c.released)
	}
	return nil
}

// Abort, like ncclCommAbort with captured graphs, returns only once Close
// released them (when the hub says so).
func (c *fakeDevComm) Abort() error {
	c.hub.mu.Lock()
	c.hub.aborted++
	wait := c.hub.abortWaitsForClose
	c.hub.mu.Unlock()
	if wait {
		<-c.released
	}
	return nil
}

func collBackends(n int) ([]ml.Backend, *collHub) {
	hub := &collHub{size: n, all: make(chan struct{})}
	bs := make([]ml.Backend, n)
	for i := range bs {
		bs[i] = &collBackend{Backend: cpu.New(1), hub: hub}
	}
	return bs, hub
}

func TestDeviceComm(t *testing.T) {
	gs := newGroups(t, 3, 0)
	bs, hub := collBackends(3)
	comms, errs := newComms(t, gs, bs)
	for r := range gs {
		require.NoError(t, errs[r], "rank %d", r)
		assert.True(t, comms[r].Graphable(), "rank %d has the device comm", r)
		assert.Equal(t, r, comms[r].Rank())
	}
	require.Len(t, hub.ids, 3)
	for _, id := range hub.ids {
		assert.Equal(t, "fake-nccl-id", string(id))
	}
	// The group breaking aborts the device comms (a rank blocked in a
	// collective must return); Close after that is fine.
	require.NoError(t, gs[1].Close())
	assert.Eventually(t, func() bool {
		hub.mu.Lock()
		defer hub.mu.Unlock()
		return hub.aborted == 3
	}, 5*time.Second, 5*time.Millisecond)
	for _, c := range comms {
		require.NoError(t, c.Close())
	}
}

func TestDeviceCommClosedCleanlyNoAbort(t *testing.T) {
	gs := newGroups(t, 2, 0)
	bs, hub := collBackends(2)
	comms, errs := newComms(t, gs, bs)
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	for _, c := range comms {
		require.NoError(t, c.Close())
	}
	for _, g := range gs {
		require.NoError(t, g.Close())
	}
	time.Sleep(20 * time.Millisecond)
	hub.mu.Lock()
	defer hub.mu.Unlock()
	assert.Equal(t, 0, hub.aborted)
}

func TestCommEnvOverride(t *testing.T) {
	t.Setenv(EnvComm, "host")
	gs := newGroups(t, 2, 0)
	bs, hub := collBackends(2)
	comms, errs := newComms(t, gs, bs)
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	assert.False(t, comms[0].Graphable())
	assert.False(t, comms[1].Graphable())
	assert.Empty(t, hub.ids)
}

func TestCommBootstrapErrors(t *testing.T) {
	t.Run("bad env", func(t *testing.T) {
		t.Setenv(EnvComm, "nccl2")
		gs := newGroups(t, 2, 0)
		_, errs := newComms(t, gs, cpuBackends(2))
		assert.ErrorContains(t, errs[0], `ORCH_TP_COMM="nccl2"`)
		assert.ErrorContains(t, errs[1], "rank 0 could not set up the comm")
		assert.NoError(t, gs[0].Err(), "a configuration error leaves the group usable")
	})
	t.Run("device required", func(t *testing.T) {
		t.Setenv(EnvComm, "device")
		gs := newGroups(t, 2, 0)
		_, errs := newComms(t, gs, cpuBackends(2))
		assert.ErrorContains(t, errs[0], "no device collectives")
		assert.Error(t, errs[1])
	})
	t.Run("comm id fails", func(t *testing.T) {
		gs := newGroups(t, 2, 0)
		bs, _ := collBackends(2)
		bs[0].(*collBackend).idErr = errors.New("libnccl.so.2 not found")
		_, errs := newComms(t, gs, bs)
		assert.ErrorContains(t, errs[0], "libnccl.so.2 not found")
		assert.ErrorContains(t, errs[0], "ORCH_TP_COMM=host")
		assert.ErrorContains(t, errs[1], "libnccl.so.2 not found")
	})
	t.Run("follower without collectives", func(t *testing.T) {
		gs := newGroups(t, 2, 0)
		bs, hub := collBackends(2)
		bs[1] = cpu.New(1)
		_, errs := newComms(t, gs, bs)
		assert.ErrorContains(t, errs[0], "1 rank(s) have no device collectives")
		assert.ErrorContains(t, errs[1], "the cpu backend has none")
		assert.Empty(t, hub.ids, "nobody entered NewComm")
	})
	t.Run("init fails on one rank", func(t *testing.T) {
		gs := newGroups(t, 3, 0)
		bs, _ := collBackends(3)
		bs[2].(*collBackend).initErr = errors.New("nccl: unhandled cuda error")
		start := time.Now()
		_, errs := newComms(t, gs, bs) // ranks 0 and 1 block in NewComm until the group breaks
		assert.Less(t, time.Since(start), 5*time.Second)
		for r, err := range errs {
			require.Error(t, err, "rank %d", r)
			assert.ErrorContains(t, err, "unhandled cuda error", "rank %d", r)
		}
	})
}

func TestNewCommNil(t *testing.T) {
	_, err := NewComm(nil, cpu.New(1))
	assert.Error(t, err)
}

// The shutdown order of a rank: the group breaks (Abort starts, and may wait
// for Close), then the model closes the comm: no deadlock.
func TestDeviceCommCloseWhileAbortWaits(t *testing.T) {
	gs := newGroups(t, 2, 0)
	bs, hub := collBackends(2)
	hub.abortWaitsForClose = true
	comms, errs := newComms(t, gs, bs)
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	require.NoError(t, gs[0].Close())
	assert.Eventually(t, func() bool {
		hub.mu.Lock()
		defer hub.mu.Unlock()
		return hub.aborted == 2
	}, 5*time.Second, 5*time.Millisecond)
	done := make(chan struct{})
	go func() {
		for _, c := range comms {
			_ = c.Close()
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("comm Close deadlocked with the Abort in flight")
	}
}
