package cpu

import "golang.org/x/sys/cpu"

// useAVX selects the AVX2 kernels of dot_amd64.s (hand-written assembly
// because Go does not vectorise loops and the float32 products are the bulk
// of the CPU backend's time). They compute the same 8 partial sums in the
// same order as the portable code, so the choice never changes a result.
var useAVX = cpu.X86.HasAVX2 && cpu.X86.HasF16C

//go:noescape
func dot1AVX(a, x *float32, n int, acc *[8]float32)

//go:noescape
func dot4AVX(a, x *float32, ldx, n int, acc *[32]float32)

//go:noescape
func dot4F16AVX(x *float32, w *byte, ldw, n int, acc *[32]float32)

//go:noescape
func cvtF16AVX(dst *float32, src *byte, n int)

//go:noescape
func cvtQ8_0AVX(dst *float32, src *byte, nb int)

//go:noescape
func dot2x4AVX(w *float32, ldw int, x *float32, ldx, n int, acc *[64]float32)

//go:noescape
func cvtBF16AVX(dst *float32, src *byte, n int)

//go:noescape
func cvtQ4_0AVX(dst *float32, src *byte, nb int)

//go:noescape
func cvtMXFP4AVX(dst *float32, src *byte, nb int, table *[16]float32)

//go:noescape
func dot4Q8_0AVX(x *float32, w *byte, ldw, nb int, acc *[32]float32)
