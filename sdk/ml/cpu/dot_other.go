//go:build !amd64

package cpu

// useAVX is false off amd64: the portable kernels run.
var useAVX = false

func dot1AVX(a, x *float32, n int, acc *[8]float32)                { panic("cpu: no AVX") }
func dot4AVX(a, x *float32, ldx, n int, acc *[32]float32)          { panic("cpu: no AVX") }
func dot4F16AVX(x *float32, w *byte, ldw, n int, acc *[32]float32) { panic("cpu: no AVX") }
func cvtF16AVX(dst *float32, src *byte, n int)                     { panic("cpu: no AVX") }

func cvtQ8_0AVX(dst *float32, src *byte, nb int) { panic("cpu: no AVX") }

func dot2x4AVX(w *float32, ldw int, x *float32, ldx, n int, acc *[64]float32) { panic("cpu: no AVX") }

func cvtBF16AVX(dst *float32, src *byte, n int)                       { panic("cpu: no AVX") }
func cvtQ4_0AVX(dst *float32, src *byte, nb int)                      { panic("cpu: no AVX") }
func cvtMXFP4AVX(dst *float32, src *byte, nb int, table *[16]float32) { panic("cpu: no AVX") }

func dot4Q8_0AVX(x *float32, w *byte, ldw, nb int, acc *[32]float32) { panic("cpu: no AVX") }
