package cuda

import (
	"errors"
	"fmt"
	"sync"

	"github.com/llama-orch/orch/sdk/ml"
)

// CommIDBytes is the size of an NCCL bootstrap id (NCCL_UNIQUE_ID_BYTES).
const CommIDBytes = 128

var _ ml.CollectiveBackend = (*Backend)(nil)

// commUnavailable wraps ErrUnavailable with the library's reason (where it
// looked for libnccl).
func (b *Backend) commUnavailable(op string, rc int32) error {
	err := b.l.status(op, rc)
	if rc == stUnsupported {
		return fmt.Errorf("%w: no device-side collectives: %w", ErrUnavailable, err)
	}
	return err
}

// NCCLVersion reports the NCCL version liborch_cuda.so loaded ("2.21.5") and
// from where, or an error wrapping ErrUnavailable when libnccl was not found
// ($ORCH_NCCL_LIB, then libnccl.so.2 / libnccl.so on the loader's path).
func (b *Backend) NCCLVersion() (version, path string, err error) {
	if b.ctx == 0 {
		return "", "", errors.New("cuda comm: backend is closed")
	}
	var v int32
	if rc := b.l.commAvailable(b.ctx, &v); rc != stOK {
		return "", "", b.commUnavailable("comm_available", rc)
	}
	buf := make([]byte, 1024)
	if rc := b.l.commLibrary(&buf[0], int64(len(buf))); rc != stOK {
		return "", "", b.commUnavailable("comm_library", rc)
	}
	return ncclVersionString(int(v)), cstr(buf), nil
}

// ncclVersionString decodes NCCL_VERSION_CODE (X*10000 + Y*100 + Z since
// 2.9; X*1000 + Y*100 + Z before).
func ncclVersionString(v int) string {
	if v >= 10000 {
		return fmt.Sprintf("%d.%d.%d", v/10000, v/100%100, v%100)
	}
	return fmt.Sprintf("%d.%d.%d", v/1000, v/100%10, v%100)
}

// CommID implements ml.CollectiveBackend: a new NCCL bootstrap id (rank 0
// only; CommIDBytes long). Errors wrap ErrUnavailable when NCCL is missing.
func (b *Backend) CommID() ([]byte, error) {
	if b.ctx == 0 {
		return nil, errors.New("cuda comm id: backend is closed")
	}
	id := make([]byte, CommIDBytes)
	if rc := b.l.commUniqueID(b.ctx, &id[0]); rc != stOK {
		return nil, b.commUnavailable("comm_unique_id", rc)
	}
	return id, nil
}

// NewComm implements ml.CollectiveBackend: joins the NCCL group of id as
// rank of size on this backend's device. It blocks until every rank joined
// (NCCL has no timeout there: a rank that never calls NewComm blocks the
// others, so callers bound the group's start themselves). The Comm's
// AllReduce runs on this backend's stream and may be recorded by Run.
func (b *Backend) NewComm(id []byte, rank, size int) (ml.Comm, error) {
	if len(id) != CommIDBytes {
		return nil, fmt.Errorf("cuda comm: id of %d bytes, want %d (from CommID on rank 0)", len(id), CommIDBytes)
	}
	if size < 1 || rank < 0 || rank >= size {
		return nil, fmt.Errorf("cuda comm: rank %d of size %d", rank, size)
	}
	if b.ctx == 0 {
		return nil, errors.New("cuda comm: backend is closed")
	}
	var h uintptr
	if rc := b.l.commInit(b.ctx, &id[0], int32(rank), int32(size), &h); rc != stOK {
		return nil, b.commUnavailable(fmt.Sprintf("comm_init (rank %d of %d)", rank, size), rc)
	}
	return &comm{b: b, h: h, rank: rank, size: size}, nil
}

// comm is one rank's NCCL communicator (ml.Comm). Its mutex serialises the
// C calls on the communicator (NCCL forbids concurrent use of one) except
// Abort's, which runs outside it (see Abort).
type comm struct {
	b          *Backend
	rank, size int

	mu       sync.Mutex
	h        uintptr       // orch_comm*; 0 once closed
	aborting chan struct{} // non-nil once Abort started; closed when its C call returned
	err      error
}

func (c *comm) Rank() int       { return c.rank }
func (c *comm) Size() int       { return c.size }
func (c *comm) Graphable() bool { return true }

// failLocked records err as the comm's and the backend's sticky error.
func (c *comm) failLocked(err error) {
	if c.err == nil {
		c.err = err
	}
	c.b.fail(err)
}

// AllReduce enqueues the in-place sum of t over the group on b's stream. b
// must be the backend the comm was made from, t an F32 tensor of it. After
// an error it enqueues nothing: after b's, or after this comm's (aborted, or
// a failed all-reduce), which it records on b again so that the step's Sync
// fails too. Like every op of b, not safe concurrently with b's other ops.
func (c *comm) AllReduce(b ml.Backend, t ml.Tensor) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.err != nil:
		c.b.fail(c.err) // the step fails on b's Sync too, not only on Err
		return
	case b != ml.Backend(c.b):
		c.failLocked(fmt.Errorf("cuda allreduce: backend %v is not the one the comm was made on", b))
		return
	case c.h == 0:
		c.failLocked(errors.New("cuda allreduce: comm is closed"))
		return
	case c.b.ctx == 0:
		c.failLocked(errors.New("cuda allreduce: backend is closed"))
		return
	case c.b.err != nil:
		return
	}
	ct := c.b.arg("allreduce", "t", t, ml.F32)
	if ct == nil {
		c.failLocked(c.b.err)
		return
	}
	if rc := c.b.l.commAllreduceF32(c.b.ctx, c.h, ct.ptr, int64(ct.n)); rc != stOK {
		c.failLocked(c.b.l.status(fmt.Sprintf("allreduce (rank %d of %d, %d floats)", c.rank, c.size, ct.n), rc))
	}
}

// Err returns the first error of an AllReduce, or one NCCL reports for the
// communicator asynchronously (a peer died, a transport failed).
func (c *comm) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil && c.h != 0 && c.aborting == nil {
		if rc := c.b.l.commAsyncError(c.h); rc != stOK {
			c.err = c.b.l.status(fmt.Sprintf("comm (rank %d of %d)", c.rank, c.size), rc)
		}
	}
	return c.err
}

// Abort abandons the group (ncclCommAbort): all-reduces in flight on the GPU
// end with undefined results instead of waiting for a peer that died, so a
// goroutine blocked in the backend's Sync or Read returns. Later AllReduce
// calls fail; Err reports the abort. sdk/tp calls it (from another goroutine)
// when its group breaks; Close must still be called.
//
// NCCL's abort returns only once no CUDA graph holds collectives of the
// communicator (it waits for their release), so while the backend keeps
// captured graphs that recorded this comm, Abort blocks until Close (which
// destroys them) — it is called outside the comm's lock for that reason.
func (c *comm) Abort() error {
	c.mu.Lock()
	if c.h == 0 || c.aborting != nil {
		c.mu.Unlock()
		return nil
	}
	h := c.h
	done := make(chan struct{})
	c.aborting = done
	if c.err == nil {
		c.err = fmt.Errorf("cuda comm (rank %d of %d): aborted", c.rank, c.size)
	}
	c.mu.Unlock()
	defer close(done)
	return c.b.l.status("comm_abort", c.b.l.commAbort(h))
}

// Close leaves the group and frees the communicator (aborts it when it holds
// an asynchronous error). It first destroys the backend's captured graphs
// (ResetGraphs: NCCL's destroy waits until no graph holds the comm's
// collectives), so call it from the goroutine that runs the backend's ops,
// and before the backend's Close. Recent NCCL's destroy synchronises with
// the other ranks: every rank closes its comm, or a broken group is aborted
// (Abort) first.
func (c *comm) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.h == 0 {
		return nil
	}
	h := c.h
	c.h = 0
	if c.b.ctx != 0 {
		c.b.ResetGraphs()
	}
	if c.aborting != nil {
		<-c.aborting // the abort's C call may still be waiting for those graphs
	}
	return c.b.l.status("comm_destroy", c.b.l.commDestroy(h))
}
