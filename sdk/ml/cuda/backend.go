// Package cuda is the GPU implementation of ml.Backend. It drives
// liborch_cuda.so (built from cuda/ by `make cuda`), which it loads at run
// time through purego — no cgo, so every binary builds without a CUDA
// toolkit, and a machine without the library or a GPU gets ErrUnavailable
// (the loader then says so and uses the CPU backend) instead of a crash.
//
// Weights are copied once to the device in their GGUF block format and read
// in place by the kernels. Every op enqueues on one CUDA stream and returns;
// only Read*, Sync and MemoryInfo wait. Run (ml.GraphBackend) captures a
// step into a CUDA graph the first time its key is seen and replays it after.
// Activations are float32; KV caches may be F32 or F16.
package cuda

import (
	"errors"
	"fmt"
	"math"
	"unsafe"

	"github.com/llama-orch/orch/sdk/ml"
)

// tensor is a CUDA tensor: a device pointer plus its type and shape.
type tensor struct {
	dt    ml.DType
	shape []int
	n     int
	ptr   uintptr // device address
	bytes int
	owned bool // allocated by Alloc/Weight (views: false)
	// weight: made by Weight (or a view of one): read-only device data, so a
	// bf16 copy of it stays valid (bf16cache.go)
	weight bool
	// rp: the allocation holds the rows repacked after the original bytes (weightrp.go; views: false)
	rp bool
	be *Backend
}

func (t *tensor) DType() ml.DType { return t.dt }
func (t *tensor) Shape() []int    { return t.shape }
func (t *tensor) Len() int        { return t.n }
func (t *tensor) String() string  { return fmt.Sprintf("cuda.Tensor(%s %v)", t.dt, t.shape) }

// Backend is the CUDA ml.Backend (and ml.GraphBackend).
type Backend struct {
	l         *lib
	ctx       uintptr
	name      string
	cc        int
	err       error
	scratch   map[string]*tensor
	retired   []uintptr
	graphs    map[string]uintptr
	capturing bool
	// Ops held back for merging (fuse.go); holdFlush while MatMul / RoPE
	// validate their own operands.
	pend      pending
	rn        rowsState // a held Embed (rowsnorm.go)
	holdFlush bool
	// ot times every op when ORCH_CUDA_OPTIME is set (optime.go); nil otherwise.
	ot *opTimer
	// gt times the idle gaps between replayed graphs when ORCH_CUDA_GAPTIME is set (gaptime.go).
	gt *gapTimer
	// bc: bf16 copies of quantized weights for the large-n matmul (bf16cache.go).
	bc bf16Cache
	// launches counts calls (call).
	launches uint64
	// afterAttend: the last launch was the decode attention (call; normfold.go's L2 prefetch).
	afterAttend bool
	// xt: h holds a norm fold's xt (normfold.go).
	xt xtState
	// ah: pinned buffers and events of step-ahead reads (ahead.go).
	ah aheadPool
}

var _ ml.GraphBackend = (*Backend)(nil)

// Available reports whether the CUDA backend can run here (library loads and
// a device exists); the error wraps ErrUnavailable with the reason.
func Available() error {
	l, err := loadLib()
	if err != nil {
		return err
	}
	var n int32
	if err := l.status("device_count", l.deviceCount(&n)); err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

// New opens device (0-based) and returns its backend.
func New(device int) (*Backend, error) {
	l, err := loadLib()
	if err != nil {
		return nil, err
	}
	var ctx uintptr
	if err := l.status("init", l.initCtx(int32(device), &ctx)); err != nil {
		if errors.Is(err, ErrUnavailable) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	b := &Backend{l: l, ctx: ctx, scratch: map[string]*tensor{}, graphs: map[string]uintptr{}}
	name := make([]byte, 256)
	var cc, sms int32
	var free, total int64
	if err := l.status("device_info", l.deviceInfo(ctx, &name[0], int64(len(name)), &cc, &sms, &free, &total)); err != nil {
		l.destroy(ctx)
		return nil, err
	}
	b.name = cstr(name)
	b.cc = int(cc)
	b.ot = newOpTimer()
	b.gt = newGapTimer()
	b.initBF16Cache()
	return b, nil
}

func cstr(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// LibraryPath is the path of the loaded liborch_cuda.so.
func (b *Backend) LibraryPath() string { return b.l.path }

// ComputeCapability is major*10+minor (90 for Hopper).
func (b *Backend) ComputeCapability() int { return b.cc }

func (b *Backend) Name() string       { return "cuda" }
func (b *Backend) DeviceName() string { return b.name }

// Close frees every tensor's memory, graphs and the context.
func (b *Backend) Close() error {
	if b.ctx == 0 {
		return nil
	}
	b.flush()
	b.closeAhead()
	for k, g := range b.graphs {
		b.l.graphDestroy(g)
		delete(b.graphs, k)
	}
	if b.ot != nil { // after the graphs that hold its event nodes
		b.ot.close(b)
	}
	if b.gt != nil {
		b.gt.close(b)
	}
	for _, s := range b.scratch {
		b.l.free(b.ctx, s.ptr)
	}
	b.bf16Close()
	for _, p := range b.retired {
		b.l.free(b.ctx, p)
	}
	err := b.l.status("destroy", b.l.destroy(b.ctx))
	b.ctx = 0
	return err
}

func (b *Backend) MemoryInfo() (free, total int64) {
	var cc, sms int32
	if b.l.deviceInfo(b.ctx, nil, 0, &cc, &sms, &free, &total) != stOK {
		return 0, 0
	}
	return free, total
}

func (b *Backend) Sync() error {
	b.flush()
	rc := b.l.sync(b.ctx)
	if b.ot != nil {
		b.ot.idle(b)
	}
	err := b.err
	b.err = nil
	if err == nil {
		err = b.l.status("sync", rc)
	}
	return err
}

// Err is the first op error so far; an op held back for merging (fuse.go) is
// launched first, so that its launch error is reported here as before.
func (b *Backend) Err() error {
	b.flush()
	return b.err
}

// fail records the first op error (sticky).
func (b *Backend) fail(err error) {
	if b.err == nil && err != nil {
		b.err = err
	}
}

func (b *Backend) failf(op, format string, args ...any) {
	b.fail(fmt.Errorf("cuda %s: %s", op, fmt.Sprintf(format, args...)))
}

// call records a C status as the sticky error.
func (b *Backend) call(op string, rc int32) {
	b.launches++
	b.afterAttend = op == "attend" && rc == stOK
	if rc != stOK {
		b.fail(b.l.status(op, rc))
		return
	}
	if b.ot != nil { // op timing (optime.go); while capturing, as a graph node
		b.ot.mark(b, op)
	}
}

func numel(shape []int) (int, error) {
	if len(shape) == 0 {
		return 0, errors.New("empty shape")
	}
	n := 1
	for _, d := range shape {
		if d <= 0 {
			return 0, fmt.Errorf("shape %v: dims must be > 0", shape)
		}
		if n > math.MaxInt/d {
			return 0, fmt.Errorf("shape %v overflows", shape)
		}
		n *= d
	}
	return n, nil
}

func tensorBytes(dt ml.DType, shape []int) (int, int, error) {
	n, err := numel(shape)
	if err != nil {
		return 0, 0, err
	}
	if !dt.Known() {
		return 0, 0, fmt.Errorf("unknown dtype %v", dt)
	}
	rb, err := dt.RowBytes(shape[0])
	if err != nil {
		return 0, 0, err
	}
	return n, rb * (n / shape[0]), nil
}

func (b *Backend) Alloc(dt ml.DType, shape ...int) (ml.Tensor, error) {
	switch dt {
	case ml.F32, ml.I32, ml.F16, ml.BF16:
	default:
		return nil, fmt.Errorf("cuda alloc: dtype %v: only F32, I32, F16, BF16", dt)
	}
	n, nb, err := tensorBytes(dt, shape)
	if err != nil {
		return nil, fmt.Errorf("cuda alloc: %w", err)
	}
	var p uintptr
	if err := b.l.status("alloc", b.l.malloc(b.ctx, int64(nb), &p)); err != nil {
		return nil, err
	}
	if err := b.l.status("alloc", b.l.memset(b.ctx, p, 0, int64(nb))); err != nil {
		b.l.free(b.ctx, p)
		return nil, err
	}
	return &tensor{dt: dt, shape: append([]int(nil), shape...), n: n, ptr: p, bytes: nb, owned: true, be: b}, nil
}

func (b *Backend) Weight(name string, dt ml.DType, shape []int, data []byte) (ml.Tensor, error) {
	n, nb, err := tensorBytes(dt, shape)
	if err != nil {
		return nil, fmt.Errorf("cuda weight %s: %w", name, err)
	}
	if len(data) != nb {
		return nil, fmt.Errorf("cuda weight %s: %d bytes, want %d for %v %v", name, len(data), nb, dt, shape)
	}
	var p uintptr
	rows, k, total, rp := b.rpShape(dt, shape) // room for the repacked rows after the original ones (weightrp.go)
	if rp && (!b.rpFits(total, nb) || b.l.malloc(b.ctx, total, &p) != stOK) {
		rp, p = false, 0
	}
	if !rp {
		if err := b.l.status("weight "+name, b.l.malloc(b.ctx, int64(nb), &p)); err != nil {
			return nil, err
		}
	}
	if err := b.l.status("weight "+name, b.l.memcpyH2D(b.ctx, p, &data[0], int64(nb))); err != nil {
		b.l.free(b.ctx, p)
		return nil, err
	}
	if rp {
		if err := b.l.status("weight "+name, b.l.weightRepack(b.ctx, p+uintptr(rpOffset(dt, rows, k)), p, int32(dt), rows, k)); err != nil {
			b.l.free(b.ctx, p)
			return nil, err
		}
	}
	if b.bc.names != nil { // (nil: a test's backend without New)
		b.bc.names[p] = name
	}
	return &tensor{dt: dt, shape: append([]int(nil), shape...), n: n, ptr: p, bytes: nb, owned: true, weight: true, rp: rp, be: b}, nil
}

func (b *Backend) Free(t ml.Tensor) {
	b.flush()
	ct, ok := t.(*tensor)
	if !ok || ct.be != b || !ct.owned || ct.ptr == 0 {
		return
	}
	b.forgetUnrotated(ct) // fuse.go foldAttend
	b.forgetXT(ct)        // normfold.go
	if ct.weight {
		b.bf16Drop(ct.ptr, ct.bytes)
	}
	b.call("free", b.l.free(b.ctx, ct.ptr))
	ct.ptr = 0
}

func (b *Backend) get(t ml.Tensor) (*tensor, error) {
	b.flush() // every op, read and write looks its operands up here: launch what is held back first
	ct, ok := t.(*tensor)
	if !ok || ct == nil {
		return nil, fmt.Errorf("tensor %v is not a CUDA tensor", t)
	}
	if ct.be != b {
		return nil, errors.New("tensor belongs to another backend")
	}
	if ct.ptr == 0 {
		return nil, errors.New("tensor was freed")
	}
	return ct, nil
}

func (b *Backend) Rows(t ml.Tensor, start, n int) (ml.Tensor, error) {
	ct, err := b.getKeepRows(t) // a view launches nothing: a held Embed stays held (rowsnorm.go)
	if err != nil {
		return nil, fmt.Errorf("cuda rows: %w", err)
	}
	outer := ct.shape[len(ct.shape)-1]
	if start < 0 || n <= 0 || start+n > outer {
		return nil, fmt.Errorf("cuda rows: [%d, %d) out of %d rows", start, start+n, outer)
	}
	rb := ct.bytes / outer
	shape := append([]int(nil), ct.shape...)
	shape[len(shape)-1] = n
	return &tensor{dt: ct.dt, shape: shape, n: ct.n / outer * n, ptr: ct.ptr + uintptr(start*rb), bytes: rb * n, weight: ct.weight, be: b}, nil
}

func (b *Backend) Reshape(t ml.Tensor, shape ...int) (ml.Tensor, error) {
	ct, err := b.get(t)
	if err != nil {
		return nil, fmt.Errorf("cuda reshape: %w", err)
	}
	n, nb, err := tensorBytes(ct.dt, shape)
	if err != nil || n != ct.n || nb != ct.bytes {
		return nil, fmt.Errorf("cuda reshape: %v -> %v: element count or block layout differs", ct.shape, shape)
	}
	return &tensor{dt: ct.dt, shape: append([]int(nil), shape...), n: n, ptr: ct.ptr, bytes: nb, weight: ct.weight, be: b}, nil
}

func (b *Backend) write(t ml.Tensor, dt ml.DType, src unsafe.Pointer, n, size int) error {
	ct, err := b.get(t)
	if err != nil {
		return fmt.Errorf("cuda write: %w", err)
	}
	b.touchUnrotated(ct, false) // fuse.go foldAttend
	b.touchXT(ct, false, false) // normfold.go
	if ct.dt != dt || n > ct.n {
		return fmt.Errorf("cuda write: %d %v values into %v", n, dt, ct)
	}
	if n == 0 {
		return nil
	}
	return b.l.status("write", b.l.memcpyH2D(b.ctx, ct.ptr, (*byte)(src), int64(n*size)))
}

func (b *Backend) WriteF32(t ml.Tensor, src []float32) error {
	if len(src) == 0 {
		return b.write(t, ml.F32, nil, 0, 4)
	}
	return b.write(t, ml.F32, unsafe.Pointer(&src[0]), len(src), 4)
}

func (b *Backend) WriteI32(t ml.Tensor, src []int32) error {
	if len(src) == 0 {
		return b.write(t, ml.I32, nil, 0, 4)
	}
	return b.write(t, ml.I32, unsafe.Pointer(&src[0]), len(src), 4)
}

func (b *Backend) read(t ml.Tensor, dt ml.DType, dst unsafe.Pointer, n, size int) error {
	if b.err != nil {
		return b.Sync()
	}
	ct, err := b.get(t)
	if err != nil {
		return fmt.Errorf("cuda read: %w", err)
	}
	b.touchUnrotated(ct, false) // fuse.go foldAttend
	b.touchXT(ct, false, false) // normfold.go
	if ct.dt != dt || n > ct.n {
		return fmt.Errorf("cuda read: %d %v values from %v", n, dt, ct)
	}
	if n == 0 {
		return b.Sync()
	}
	return b.l.status("read", b.l.memcpyD2H(b.ctx, (*byte)(dst), ct.ptr, int64(n*size)))
}

func (b *Backend) ReadF32(t ml.Tensor, dst []float32) error {
	if len(dst) == 0 {
		return b.read(t, ml.F32, nil, 0, 4)
	}
	return b.read(t, ml.F32, unsafe.Pointer(&dst[0]), len(dst), 4)
}

func (b *Backend) ReadI32(t ml.Tensor, dst []int32) error {
	if len(dst) == 0 {
		return b.read(t, ml.I32, nil, 0, 4)
	}
	return b.read(t, ml.I32, unsafe.Pointer(&dst[0]), len(dst), 4)
}

// scratchBuf returns an internal device buffer of at least bytes for name,
// grown on demand. Replaced buffers are kept until Close: a captured graph
// may still point at them.
func (b *Backend) scratchBuf(name string, bytes int) uintptr {
	if s, ok := b.scratch[name]; ok && s.bytes >= bytes {
		return s.ptr
	}
	if s, ok := b.scratch[name]; ok {
		b.retired = append(b.retired, s.ptr)
		delete(b.scratch, name)
	}
	var p uintptr
	want := bytes + bytes/4
	if err := b.l.status("scratch "+name, b.l.malloc(b.ctx, int64(want), &p)); err != nil {
		b.fail(err)
		return 0
	}
	b.scratch[name] = &tensor{ptr: p, bytes: want, be: b}
	return p
}

// Run implements ml.GraphBackend: the first call for key captures what
// record enqueues into a CUDA graph, later calls replay it.
func (b *Backend) Run(key string, record func()) error {
	b.flush() // not into the graph
	// (fuse.go foldAttend) a graph starts and ends with q / k as RoPE leaves them.
	b.rotateUnrotated()
	b.materializeXT() // (normfold.go) and with h the norm's output
	if b.err != nil {
		return b.err
	}
	if g, ok := b.graphs[key]; ok {
		launch := func() error { return b.l.status("graph_launch", b.l.graphLaunch(b.ctx, g)) }
		var err error
		if b.gt != nil {
			err = b.gt.around(b, launch)
		} else {
			err = launch()
		}
		if b.ot != nil && err == nil {
			b.ot.replayed(b, key)
		}
		return err
	}
	if b.capturing {
		return errors.New("cuda run: nested graph capture")
	}
	if err := b.l.status("graph_begin", b.l.graphBegin(b.ctx)); err != nil {
		return err
	}
	b.capturing = true
	if b.ot != nil {
		b.ot.beginCapture(b)
	}
	record()
	b.flush() // into the graph
	// Into the graph: a replay leaves q / k rotated, as the capture's ops did.
	b.rotateUnrotated()
	b.materializeXT()
	b.capturing = false
	var g uintptr
	endErr := b.l.status("graph_end", b.l.graphEnd(b.ctx, &g))
	if b.ot != nil {
		b.ot.endCapture(b, key, b.err == nil && endErr == nil)
	}
	if b.err != nil {
		if g != 0 {
			b.l.graphDestroy(g)
		}
		return b.err
	}
	if endErr != nil {
		return endErr
	}
	b.graphs[key] = g
	err := b.l.status("graph_launch", b.l.graphLaunch(b.ctx, g))
	if b.ot != nil && err == nil {
		b.ot.replayed(b, key)
	}
	return err
}

// ResetGraphs destroys every captured graph (e.g. after reallocating tensors
// that captured steps use).
func (b *Backend) ResetGraphs() {
	if len(b.graphs) > 0 {
		b.l.sync(b.ctx) // a step launched ahead may still run one of them
	}
	for k, g := range b.graphs {
		b.l.graphDestroy(g)
		delete(b.graphs, k)
	}
	if b.ot != nil {
		b.ot.forgetGraphs(b)
	}
}
