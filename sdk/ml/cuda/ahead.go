package cuda

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"github.com/llama-orch/orch/sdk/ml"
)

// Step-ahead reads (ml.AheadBackend, session 11): a decode step's tokens are
// copied into pinned host memory behind the step and an event is recorded
// after the copy, so the runner can queue the next step before it waits for
// this one's tokens. ReadI32 (the plain read) waits for the whole stream,
// which then would include the next step. Each read takes a slot (pinned
// buffer + event) from a small pool; a dropped read's slot may be reused at
// once, since a later copy into it is queued after the dropped one.
// AdvanceStep (orch_step_advance) writes the next step's inputs from this
// one's on the device (ORCH_CUDA_STEP_ADVANCE=0 or a library without it:
// the runner uploads them). ORCH_CUDA_STEP_AHEAD=0 turns both off (the
// runner then reads as before); so do a library without
// orch_memcpy_d2h_async / orch_event_sync and op timing (ORCH_CUDA_OPTIME
// reads its events with stream waits).
//
// The copy is a kernel where the library has orch_read_i32_host (session 14;
// ORCH_CUDA_READ_KERNEL=0: cudaMemcpyAsync). With the copy-engine D2H
// between the step's argmax and step_advance the device idled ~13 us a step
// (CUPTI, H100; taken for the copy engine's setup and the waits between the
// engines); a kernel follows the argmax on the SMs, and step_advance (PDL)
// may start under its tail. It writes the pinned slot through its mapped
// address; the event recorded after it makes the values visible to Wait.

type aheadSlot struct {
	host unsafe.Pointer // pinned, cap int32 values
	cap  int
	ev   uintptr
}

type aheadPool struct {
	free []*aheadSlot
	all  []*aheadSlot
}

var _ ml.AheadBackend = (*Backend)(nil)

// StepAhead implements ml.AheadBackend.
func (b *Backend) StepAhead() bool {
	return b.l.memcpyD2HAsync != nil && b.ot == nil && os.Getenv("ORCH_CUDA_STEP_AHEAD") != "0"
}

// slot returns a free slot holding at least n values.
func (b *Backend) aheadSlot(n int) (*aheadSlot, error) {
	p := &b.ah
	for len(p.free) > 0 {
		s := p.free[len(p.free)-1]
		p.free = p.free[:len(p.free)-1]
		if s.cap >= n {
			return s, nil
		}
		// too small: never reused (freed at Close with the others)
	}
	s := &aheadSlot{cap: max(n, 256)}
	if err := b.l.status("host_alloc", b.l.hostAlloc(int64(4*s.cap), &s.host)); err != nil {
		return nil, err
	}
	if err := b.l.status("event_create", b.l.eventCreate(&s.ev)); err != nil {
		b.l.hostFree(s.host)
		return nil, err
	}
	p.all = append(p.all, s)
	return s, nil
}

// ReadI32Async implements ml.AheadBackend.
func (b *Backend) ReadI32Async(t ml.Tensor) (ml.PendingI32, error) {
	if !b.StepAhead() {
		return nil, errors.New("cuda: step-ahead reads are off")
	}
	if b.capturing {
		return nil, errors.New("cuda: read during graph capture")
	}
	ct, err := b.get(t)
	if err != nil {
		return nil, fmt.Errorf("cuda read: %w", err)
	}
	if b.err != nil {
		return nil, b.Sync()
	}
	b.touchUnrotated(ct, false) // as read
	b.touchXT(ct, false, false)
	if ct.dt != ml.I32 {
		return nil, fmt.Errorf("cuda read: I32 values from %v", ct)
	}
	s, err := b.aheadSlot(ct.n)
	if err != nil {
		return nil, err
	}
	var rc int32
	if b.l.readI32Host != nil && os.Getenv("ORCH_CUDA_READ_KERNEL") != "0" {
		rc = b.l.readI32Host(b.ctx, s.host, ct.ptr, int64(ct.n))
	} else {
		rc = b.l.memcpyD2HAsync(b.ctx, s.host, ct.ptr, int64(4*ct.n))
	}
	if err := b.l.status("read", rc); err != nil {
		b.ah.free = append(b.ah.free, s)
		return nil, err
	}
	if err := b.l.status("read", b.l.eventRecord(b.ctx, s.ev)); err != nil {
		b.ah.free = append(b.ah.free, s) // its copy is queued: a later one into it is queued after
		return nil, err
	}
	return &aheadRead{b: b, s: s, n: ct.n}, nil
}

type aheadRead struct {
	b *Backend
	s *aheadSlot
	n int
}

func (r *aheadRead) Wait(dst []int32) error {
	if r.s == nil {
		return errors.New("cuda read: waited twice")
	}
	if len(dst) > r.n {
		r.Drop()
		return fmt.Errorf("cuda read: %d values from a read of %d", len(dst), r.n)
	}
	err := r.b.l.status("read", r.b.l.eventSync(r.s.ev))
	if err == nil {
		copy(dst, unsafe.Slice((*int32)(r.s.host), r.n))
	}
	r.Drop()
	return err
}

func (r *aheadRead) Drop() {
	if r.s != nil {
		r.b.ah.free = append(r.b.ah.free, r.s)
		r.s = nil
	}
}

// AdvanceStep implements ml.AheadBackend.
func (b *Backend) AdvanceStep(buf ml.Tensor, seg int, inc uint32, src, params ml.Tensor, n int) bool {
	const op = "step_advance"
	if b.l.stepAdvance == nil || os.Getenv("ORCH_CUDA_STEP_ADVANCE") == "0" {
		return false
	}
	d, s := b.arg(op, "buf", buf, ml.I32), b.arg(op, "src", src, ml.I32)
	if d == nil || s == nil {
		return true // the sticky error fails the step
	}
	var pp uintptr
	if params != nil {
		pt := b.arg(op, "params", params, ml.I32)
		if pt == nil {
			return true
		}
		if pt.n < ml.SampleParamsWords*n {
			b.failf(op, "params of %d values for %d rows", pt.n, n)
			return true
		}
		pp = pt.ptr
	}
	top := 0
	for i := 1; i < 32; i++ {
		if inc>>i&1 != 0 {
			top = i
		}
	}
	if !b.StepAhead() || inc&1 != 0 || n < 0 || n > seg || s.n < n || d.n < top*seg+n {
		b.failf(op, "%d rows, segments of %d (inc %#x) in %d values, %d tokens (step-ahead on: %t)", n, seg, inc, d.n, s.n,
			b.StepAhead())
		return true
	}
	b.call(op, b.l.stepAdvance(b.ctx, d.ptr, int64(seg), inc, s.ptr, pp, int32(n)))
	return true
}

// closeAhead frees the slots (after a stream sync: a queued copy or read
// kernel may still write into one).
func (b *Backend) closeAhead() {
	if len(b.ah.all) == 0 {
		return
	}
	b.l.sync(b.ctx)
	for _, s := range b.ah.all {
		b.l.eventDestroy(s.ev)
		b.l.hostFree(s.host)
	}
	b.ah = aheadPool{}
}
