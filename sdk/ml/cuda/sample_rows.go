package cuda

import (
	"sync"

	"github.com/ebitengine/purego"

	"github.com/llama-orch/orch/sdk/ml"
)

var _ ml.SamplingBackend = (*Backend)(nil)

// orch_sample_rows is optional (session 8): bound here on first use rather
// than in lib.bind, so a library without it only turns device sampling off.
var sampleRowsFn struct {
	once sync.Once
	fn   func(ctx, out, logits uintptr, n, vocab int64, params uintptr, filters int32) int32
}

func (b *Backend) sampleRowsEntry() func(ctx, out, logits uintptr, n, vocab int64, params uintptr, filters int32) int32 {
	if b.l == nil || b.l.handle == 0 {
		return nil
	}
	sampleRowsFn.once.Do(func() {
		if _, err := purego.Dlsym(b.l.handle, "orch_sample_rows"); err == nil {
			purego.RegisterLibFunc(&sampleRowsFn.fn, b.l.handle, "orch_sample_rows")
		}
	})
	return sampleRowsFn.fn
}

// SampleRowsAvailable reports whether the library has orch_sample_rows.
func (b *Backend) SampleRowsAvailable() bool { return b.sampleRowsEntry() != nil }

// SampleRows draws one token per row of x [v, n] on the GPU with per-row
// settings (ml.SamplingBackend; cuda/src/sample_rows.cuh).
func (b *Backend) SampleRows(dst, x, params ml.Tensor, filters int) {
	const op = "sample_rows"
	d, xx, p := b.arg(op, "dst", dst, ml.I32), b.arg(op, "x", x, ml.F32), b.arg(op, "params", params, ml.I32)
	if d == nil || xx == nil || p == nil {
		return
	}
	v, n := rows2(xx)
	if d.n < n || p.n < ml.SampleParamsWords*n || filters < 0 || filters > 3 {
		b.failf(op, "dst of %d, params of %d words, filters %d for %d rows", d.n, p.n, filters, n)
		return
	}
	fn := b.sampleRowsEntry()
	if fn == nil {
		b.failf(op, "%v: the CUDA library has no orch_sample_rows (rebuild with make cuda)", ErrUnsupported)
		return
	}
	b.call(op, fn(b.ctx, d.ptr, xx.ptr, int64(n), int64(v), p.ptr, int32(filters)))
}
