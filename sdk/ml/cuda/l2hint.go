package cuda

import (
	"os"

	"github.com/llama-orch/orch/sdk/ml"
)

// L2 hints (ml.L2HintBackend, session 11, opt-in with ORCH_CUDA_L2_HINT=1):
// the net names the weight read after the next Attend (the out projection);
// the folded decode attention kernel (orch_attention_rope) prefetches it
// into L2 before its pdl_wait, so the projection's one-token GEMV, bound by
// memory latency, reads it from L2. A library without orch_l2_hint ignores
// the hint.

var _ ml.L2HintBackend = (*Backend)(nil)

type l2Hint struct {
	ptr   uintptr
	bytes int64
}

// PrefetchHint implements ml.L2HintBackend: the hint is kept for the next
// Attend (no op is launched or held here).
func (b *Backend) PrefetchHint(w ml.Tensor) {
	if b.l.l2Hint == nil || os.Getenv("ORCH_CUDA_L2_HINT") != "1" {
		return
	}
	if ct, ok := w.(*tensor); ok && ct != nil && ct.ptr != 0 {
		b.hint = l2Hint{ct.ptr, int64(ct.bytes)}
	}
}

// passHint hands the kept hint to the library right before an attention
// call (which consumes it) and forgets it.
func (b *Backend) passHint() {
	if b.hint.ptr != 0 {
		b.l.l2Hint(b.ctx, b.hint.ptr, b.hint.bytes)
		b.hint = l2Hint{}
	}
}
