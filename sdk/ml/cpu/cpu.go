// Package cpu is the pure-Go reference implementation of ml.Backend. It runs
// every op immediately on the calling goroutine, splitting the work over all
// cores (goroutines over rows, heads or experts). Activations are float32;
// weights are read in place from their GGUF bytes and decoded one row at a
// time inside the matrix products (never whole tensors). Results do not
// depend on how tokens are batched: every output element is computed by the
// same code in the same order whatever the batch, so a batch of sequences
// gives bit-identical results to each sequence alone.
//
// On amd64 CPUs with AVX2 and F16C the matrix products run through small
// assembly kernels (dot_amd64.s; Go does not vectorise, and these products
// are nearly all of the time): a batch decodes each weight row once and
// multiplies it with every activation row, 2 weight rows x 4 activation rows
// per kernel call. They compute the same 8 partial sums in the same order as
// the portable Go code (separate multiply and add, no FMA), so results are
// bit-identical with or without them and whatever the batch (simd.go).
package cpu

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"unsafe"

	"github.com/llama-orch/orch/sdk/ml"
)

// tensor is the CPU tensor: a byte slice plus typed views of it.
type tensor struct {
	dt    ml.DType
	shape []int
	n     int
	data  []byte
	f32   []float32 // dt == F32
	i32   []int32   // dt == I32
	view  bool
	be    *Backend
}

func (t *tensor) DType() ml.DType { return t.dt }
func (t *tensor) Shape() []int    { return t.shape }
func (t *tensor) Len() int        { return t.n }

// Backend is the CPU ml.Backend.
type Backend struct {
	threads int
	err     error
	mu      sync.Mutex
	scratch [][]float32 // per-worker scratch buffers
}

var _ ml.Backend = (*Backend)(nil)

// New returns a CPU backend using threads goroutines per op (0 = all cores).
func New(threads int) *Backend {
	if threads <= 0 {
		threads = runtime.NumCPU()
	}
	return &Backend{threads: threads}
}

// Threads is the number of worker goroutines per op.
func (b *Backend) Threads() int { return b.threads }

func (b *Backend) Name() string       { return "cpu" }
func (b *Backend) DeviceName() string { return fmt.Sprintf("cpu (%d threads)", b.threads) }
func (b *Backend) Close() error       { return nil }

func (b *Backend) MemoryInfo() (free, total int64) { return 0, 0 }

func (b *Backend) Sync() error {
	err := b.err
	b.err = nil
	return err
}

func (b *Backend) Err() error { return b.err }

// fail records the first op error.
func (b *Backend) fail(op string, format string, args ...any) {
	if b.err == nil {
		b.err = fmt.Errorf("cpu %s: %s", op, fmt.Sprintf(format, args...))
	}
}

func numel(shape []int) (int, error) {
	if len(shape) == 0 {
		return 0, errors.New("empty shape")
	}
	n := 1
	for _, d := range shape {
		if d <= 0 {
			return 0, fmt.Errorf("shape %v: dimensions must be > 0", shape)
		}
		if n > (1<<62)/d {
			return 0, fmt.Errorf("shape %v: too many elements", shape)
		}
		n *= d
	}
	return n, nil
}

func (b *Backend) wrap(dt ml.DType, shape []int, data []byte, view bool) *tensor {
	n, _ := numel(shape)
	t := &tensor{dt: dt, shape: append([]int(nil), shape...), n: n, data: data, view: view, be: b}
	switch dt {
	case ml.F32:
		if len(data) > 0 {
			t.f32 = unsafe.Slice((*float32)(unsafe.Pointer(&data[0])), n)
		}
	case ml.I32:
		if len(data) > 0 {
			t.i32 = unsafe.Slice((*int32)(unsafe.Pointer(&data[0])), n)
		}
	}
	return t
}

func (b *Backend) Alloc(dt ml.DType, shape ...int) (ml.Tensor, error) {
	if dt != ml.F32 && dt != ml.I32 {
		return nil, fmt.Errorf("cpu alloc: dtype %s not supported (F32 or I32)", dt)
	}
	n, err := numel(shape)
	if err != nil {
		return nil, fmt.Errorf("cpu alloc: %w", err)
	}
	// allocate as []float32 / []int32 so the memory is 4-byte aligned
	buf := make([]float32, n)
	data := unsafe.Slice((*byte)(unsafe.Pointer(&buf[0])), 4*n)
	return b.wrap(dt, shape, data, false), nil
}

func (b *Backend) Weight(name string, dt ml.DType, shape []int, data []byte) (ml.Tensor, error) {
	if !dt.Known() || dt == ml.I32 {
		return nil, fmt.Errorf("cpu weight %s: unsupported dtype %s", name, dt)
	}
	n, err := numel(shape)
	if err != nil {
		return nil, fmt.Errorf("cpu weight %s: %w", name, err)
	}
	rb, err := dt.RowBytes(shape[0])
	if err != nil {
		return nil, fmt.Errorf("cpu weight %s: %w", name, err)
	}
	if want := rb * (n / shape[0]); len(data) != want {
		return nil, fmt.Errorf("cpu weight %s: %d bytes, want %d for %s %v", name, len(data), want, dt, shape)
	}
	if dt == ml.F32 && uintptr(unsafe.Pointer(&data[0]))%4 != 0 {
		// unaligned F32 data (never the case for GGUF, whose data is 32-byte aligned): copy
		c := make([]float32, n)
		cb := unsafe.Slice((*byte)(unsafe.Pointer(&c[0])), 4*n)
		copy(cb, data)
		data = cb
	}
	return b.wrap(dt, shape, data, false), nil
}

func (b *Backend) Free(t ml.Tensor) {}

func (b *Backend) get(t ml.Tensor) (*tensor, error) {
	if t == nil {
		return nil, errors.New("nil tensor")
	}
	ct, ok := t.(*tensor)
	if !ok || ct.be != b {
		return nil, fmt.Errorf("tensor %T is not from this backend", t)
	}
	return ct, nil
}

func (b *Backend) Rows(t ml.Tensor, start, n int) (ml.Tensor, error) {
	ct, err := b.get(t)
	if err != nil {
		return nil, fmt.Errorf("cpu rows: %w", err)
	}
	outer := ct.shape[len(ct.shape)-1]
	if start < 0 || n <= 0 || start+n > outer {
		return nil, fmt.Errorf("cpu rows: [%d,%d) out of range of %d rows", start, start+n, outer)
	}
	rowBytes := len(ct.data) / outer
	shape := append([]int(nil), ct.shape...)
	shape[len(shape)-1] = n
	return b.wrap(ct.dt, shape, ct.data[start*rowBytes:(start+n)*rowBytes], true), nil
}

func (b *Backend) Reshape(t ml.Tensor, shape ...int) (ml.Tensor, error) {
	ct, err := b.get(t)
	if err != nil {
		return nil, fmt.Errorf("cpu reshape: %w", err)
	}
	n, err := numel(shape)
	if err != nil {
		return nil, fmt.Errorf("cpu reshape: %w", err)
	}
	if n != ct.n {
		return nil, fmt.Errorf("cpu reshape: %v has %d elements, tensor %v has %d", shape, n, ct.shape, ct.n)
	}
	if ct.dt.Quantized() {
		if _, err := ct.dt.RowBytes(shape[0]); err != nil {
			return nil, fmt.Errorf("cpu reshape: %w", err)
		}
	}
	return b.wrap(ct.dt, shape, ct.data, true), nil
}

func (b *Backend) WriteF32(t ml.Tensor, src []float32) error {
	ct, err := b.get(t)
	if err != nil {
		return fmt.Errorf("cpu write: %w", err)
	}
	if ct.dt != ml.F32 || len(src) > ct.n {
		return fmt.Errorf("cpu write: %d float32 into %s tensor of %d", len(src), ct.dt, ct.n)
	}
	copy(ct.f32, src)
	return nil
}

func (b *Backend) WriteI32(t ml.Tensor, src []int32) error {
	ct, err := b.get(t)
	if err != nil {
		return fmt.Errorf("cpu write: %w", err)
	}
	if ct.dt != ml.I32 || len(src) > ct.n {
		return fmt.Errorf("cpu write: %d int32 into %s tensor of %d", len(src), ct.dt, ct.n)
	}
	copy(ct.i32, src)
	return nil
}

func (b *Backend) ReadF32(t ml.Tensor, dst []float32) error {
	if b.err != nil {
		return b.Sync()
	}
	ct, err := b.get(t)
	if err != nil {
		return fmt.Errorf("cpu read: %w", err)
	}
	if len(dst) > ct.n {
		return fmt.Errorf("cpu read: %d elements from a tensor of %d", len(dst), ct.n)
	}
	if ct.dt == ml.F32 {
		copy(dst, ct.f32)
		return nil
	}
	if ct.dt.Quantized() || ct.dt == ml.I32 {
		if ct.dt == ml.I32 {
			return errors.New("cpu read: ReadF32 of an I32 tensor")
		}
	}
	// F16/BF16/quantized weights: decode row by row
	row := ct.shape[0]
	rb, _ := ct.dt.RowBytes(row)
	tmp := make([]float32, row)
	for r := 0; r*row < len(dst); r++ {
		ml.DequantizeRowUnchecked(ct.dt, ct.data[r*rb:(r+1)*rb], tmp)
		copy(dst[r*row:], tmp)
	}
	return nil
}

func (b *Backend) ReadI32(t ml.Tensor, dst []int32) error {
	if b.err != nil {
		return b.Sync()
	}
	ct, err := b.get(t)
	if err != nil {
		return fmt.Errorf("cpu read: %w", err)
	}
	if ct.dt != ml.I32 || len(dst) > ct.n {
		return fmt.Errorf("cpu read: %d int32 from %s tensor of %d", len(dst), ct.dt, ct.n)
	}
	copy(dst, ct.i32)
	return nil
}

// parallel runs fn(worker, lo, hi) over [0, n) split into contiguous chunks,
// one per worker goroutine (fewer when n is small).
func (b *Backend) parallel(n int, fn func(w, lo, hi int)) {
	if n <= 0 {
		return
	}
	w := b.threads
	if w > n {
		w = n
	}
	if w == 1 {
		fn(0, 0, n)
		return
	}
	var wg sync.WaitGroup
	chunk := (n + w - 1) / w
	for i := 0; i < w; i++ {
		lo := i * chunk
		hi := min(lo+chunk, n)
		if lo >= hi {
			break
		}
		wg.Add(1)
		go func(i, lo, hi int) {
			defer wg.Done()
			fn(i, lo, hi)
		}(i, lo, hi)
	}
	wg.Wait()
}

// Scratch slots of scratchFor: one per op that keeps per-worker buffers.
const (
	scratchMatRows = iota
	scratchAttend
	scratchRoPE
	scratchEmbed
)

// scratchFor returns per-worker float32 buffers of at least size elements
// for slot k (several independent scratch areas per op).
func (b *Backend) scratchFor(k, size int) [][]float32 {
	b.mu.Lock()
	defer b.mu.Unlock()
	need := (k + 1) * b.threads
	for len(b.scratch) < need {
		b.scratch = append(b.scratch, nil)
	}
	bufs := b.scratch[k*b.threads : (k+1)*b.threads]
	for i := range bufs {
		if cap(bufs[i]) < size {
			bufs[i] = make([]float32, size)
		}
		bufs[i] = bufs[i][:size]
	}
	return bufs
}
