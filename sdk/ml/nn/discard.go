package nn

import "github.com/llama-orch/orch/sdk/ml"

// Discard tells b that the contents of ts are no longer needed
// (ml.Discarder); a no-op on backends without it. Models call it at the end
// of Hidden for the per-step workspace nothing reads after the last layer
// (q, k, the norm output), so that the CUDA backend does not rotate or
// materialise them for nobody.
func Discard(b ml.Backend, ts ...ml.Tensor) {
	if d, ok := b.(ml.Discarder); ok {
		d.Discard(ts...)
	}
}
