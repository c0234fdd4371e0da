package tp

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/llama-orch/orch/sdk/ml"
)

// EnvComm selects the all-reduce transport, read on rank 0 only (its
// choice is broadcast, so every rank agrees): "" or "auto" uses the
// backend's device collectives (NCCL) when the backend has them
// (ml.CollectiveBackend), else the host comm over the group; "host" forces
// the host comm (debugging); "device" requires device collectives.
const EnvComm = "ORCH_TP_COMM"

// Comm modes in NewComm's bootstrap message (its first byte).
const (
	commHost   byte = 1
	commDevice byte = 2 // followed by the backend's CommID bytes
	commFailed byte = 3 // followed by rank 0's error text
)

// aborter is implemented by device comms that can abandon collectives in
// flight (ncclCommAbort): NewComm calls Abort (from another goroutine) when
// the group breaks, so a rank blocked in a device all-reduce whose peer
// died returns instead of hanging. The comm's Close is still called after
// Abort, possibly while Abort runs. A group also "breaks" at a normal
// shutdown (the leader's Close closes it), so Abort precedes Close there
// too.
type aborter interface {
	Abort() error
}

// NewComm makes the all-reduce handle of this rank for model code
// (ml.Shard.Comm), collectively: every rank of g must call it, each with its
// own backend. Rank 0 picks the transport (see EnvComm) and broadcasts it:
//   - device: rank 0 calls b.CommID, broadcasts the id, every rank calls
//     b.NewComm(id, rank, size) (NCCL) and the ranks confirm to each other
//     that all succeeded. If the device comm has an Abort method it is called
//     when g breaks (a rank blocked in a collective then returns).
//   - host: AllReduce reads the tensor to the host (b.ReadF32), sums it
//     over g (AllReduceF32) and writes it back (b.WriteF32); not graphable.
//
// A failure on any rank is returned on every rank; a rank whose device
// NewComm fails breaks g (the others would wait for it inside theirs). The
// returned Comm does not own g: closing it leaves g open (the caller closes
// g).
func NewComm(g *Group, b ml.Backend) (ml.Comm, error) {
	if g == nil || b == nil {
		return nil, errors.New("tp: NewComm needs a group and a backend")
	}
	var msg []byte
	if g.Rank() == 0 {
		msg = chooseComm(b, os.Getenv(EnvComm))
	}
	msg, err := g.Broadcast(msg)
	if err != nil {
		return nil, fmt.Errorf("tp: comm bootstrap: %w", err)
	}
	if len(msg) == 0 {
		return nil, errors.New("tp: comm bootstrap: empty message from rank 0")
	}
	switch msg[0] {
	case commHost:
		return &hostComm{g: g}, nil
	case commDevice:
		return newDeviceComm(g, b, msg[1:])
	case commFailed:
		if g.Rank() == 0 {
			return nil, fmt.Errorf("tp: %s", msg[1:])
		}
		return nil, fmt.Errorf("tp: rank 0 could not set up the comm: %s", msg[1:])
	}
	return nil, fmt.Errorf("tp: comm bootstrap: unknown mode %d from rank 0", msg[0])
}

// chooseComm is rank 0's bootstrap message.
func chooseComm(b ml.Backend, env string) []byte {
	cb, collective := b.(ml.CollectiveBackend)
	switch env {
	case "host":
		return []byte{commHost}
	case "", "auto":
		if !collective {
			return []byte{commHost}
		}
	case "device":
		if !collective {
			return append([]byte{commFailed}, fmt.Sprintf("%s=device but the %s backend has no device collectives", EnvComm, b.Name())...)
		}
	default:
		return append([]byte{commFailed}, fmt.Sprintf("%s=%q: want auto, host or device", EnvComm, env)...)
	}
	id, err := cb.CommID()
	if err != nil {
		return append([]byte{commFailed}, fmt.Sprintf("device comm id on the %s backend: %v (%s=host uses the host all-reduce instead)", b.Name(), err, EnvComm)...)
	}
	return append([]byte{commDevice}, id...)
}

func newDeviceComm(g *Group, b ml.Backend, id []byte) (ml.Comm, error) {
	// First agree that every rank can take part: a rank missing from
	// NewComm would leave the others blocked inside it.
	var c ml.Comm
	cb, ok := b.(ml.CollectiveBackend)
	flag := []float32{0}
	if !ok {
		flag[0] = 1
	}
	if err := g.AllReduceF32(flag); err != nil {
		return nil, fmt.Errorf("tp: comm bootstrap: %w", err)
	}
	if flag[0] != 0 {
		if !ok {
			return nil, fmt.Errorf("tp: rank %d: rank 0 chose device collectives but the %s backend has none", g.Rank(), b.Name())
		}
		return nil, fmt.Errorf("tp: rank %d: %v rank(s) have no device collectives (rank 0 chose them)", g.Rank(), flag[0])
	}
	// NewComm blocks until every rank joined; if the group breaks meanwhile
	// (a rank failed), stop waiting.
	type result struct {
		c   ml.Comm
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := cb.NewComm(id, g.Rank(), g.Size())
		done <- result{c, err}
	}()
	var err error
	select {
	case r := <-done:
		c, err = r.c, r.err
	case <-g.Done():
		go func() { // close the comm should the backend still return one
			if r := <-done; r.c != nil {
				_ = r.c.Close()
			}
		}()
		return nil, fmt.Errorf("tp: device comm init: %w", g.Err())
	}
	if err == nil && c == nil {
		err = errors.New("backend returned no comm")
	}
	if err != nil {
		// The other ranks may be blocked inside their NewComm waiting for
		// this one: breaking the group releases them (see above).
		err = fmt.Errorf("tp: rank %d: device comm init: %w", g.Rank(), err)
		g.Abort(err)
		return nil, err
	}
	// Every rank got here with a comm (a rank that failed broke the group,
	// and this exchange then fails).
	if err := g.Barrier(); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("tp: device comm init: %w", err)
	}
	if a, ok := c.(aborter); ok {
		c = watchComm(c, a, g)
	}
	return c, nil
}

// abortingComm aborts the device comm when the group breaks before Close.
type abortingComm struct {
	ml.Comm
	stop chan struct{}
	once sync.Once
	wg   sync.WaitGroup
}

func watchComm(c ml.Comm, a aborter, g *Group) ml.Comm {
	w := &abortingComm{Comm: c, stop: make(chan struct{})}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		select {
		case <-g.Done():
			_ = a.Abort()
		case <-w.stop:
		}
	}()
	return w
}

// Close closes the device comm, then waits for the watcher: an Abort in
// flight may wait for the comm's Close (NCCL's abort waits until no
// captured graph holds the comm, and Close releases them), so Close must
// not wait for the watcher first.
func (w *abortingComm) Close() error {
	w.once.Do(func() { close(w.stop) })
	err := w.Comm.Close()
	w.wg.Wait()
	return err
}

// hostComm all-reduces through host memory over the TCP group: for CPU
// backends (where it costs two copies) and for debugging device runs.
type hostComm struct {
	g      *Group
	buf    []float32
	err    error
	closed bool
}

func (c *hostComm) Rank() int       { return c.g.Rank() }
func (c *hostComm) Size() int       { return c.g.Size() }
func (c *hostComm) Graphable() bool { return false }
func (c *hostComm) Err() error      { return c.err }

func (c *hostComm) Close() error {
	c.closed = true
	return nil
}

// AllReduce sums t over the ranks. Any failure is kept in Err and, when it
// is local (a bad tensor, a backend error), breaks the group: the other
// ranks are waiting for this rank and must not hang.
func (c *hostComm) AllReduce(b ml.Backend, t ml.Tensor) {
	if c.err != nil {
		return
	}
	fail := func(err error) {
		c.err = fmt.Errorf("tp: rank %d all-reduce: %w", c.g.Rank(), err)
		c.g.Abort(err)
	}
	switch {
	case c.closed:
		fail(errors.New("comm closed"))
		return
	case b == nil || t == nil:
		fail(errors.New("nil backend or tensor"))
		return
	case t.DType() != ml.F32:
		fail(fmt.Errorf("tensor is %v, want F32", t.DType()))
		return
	}
	n := t.Len()
	if cap(c.buf) < n {
		c.buf = make([]float32, n)
	}
	v := c.buf[:n]
	if err := b.ReadF32(t, v); err != nil {
		fail(fmt.Errorf("read: %w", err))
		return
	}
	if err := c.g.AllReduceF32(v); err != nil {
		c.err = fmt.Errorf("tp: rank %d all-reduce: %w", c.g.Rank(), err)
		return
	}
	if err := b.WriteF32(t, v); err != nil {
		fail(fmt.Errorf("write: %w", err))
	}
}
