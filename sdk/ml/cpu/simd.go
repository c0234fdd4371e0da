package cpu

import (
	"github.com/llama-orch/orch/sdk/ml"
)

// Vector paths of the matrix products. Each output element is summed as in
// the portable dot: 8 lane sums over i ≡ j (mod 8), the tail (len%8
// elements) added to lane 0 in order, then ((s0+s1)+(s2+s3))+((s4+s5)+(s6+s7)).
// Only which outputs are computed together changes with the batch, never the
// order of the operations of one output, so results are batch invariant.

func reduce8(s []float32) float32 {
	s = s[:8]
	return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))
}

// dotAVX is dot(a, x) through the AVX2 kernel (len(a) > 0, len(x) >= len(a)).
func dotAVX(a, x []float32) float32 {
	n := len(a)
	x = x[:n]
	m := n &^ 7
	var acc [8]float32
	if m > 0 {
		dot1AVX(&a[0], &x[0], m, &acc)
	}
	for i := m; i < n; i++ {
		acc[0] += a[i] * x[i]
	}
	return reduce8(acc[:])
}

// dot4 sets out[r] = dot(a, x[r*ldx : r*ldx+len(a)]) for r = 0..3.
func dot4(a, x []float32, ldx int, out *[4]float32) {
	n := len(a)
	_ = x[3*ldx+n-1] // bounds for the kernel
	m := n &^ 7
	var acc [32]float32
	if m > 0 {
		dot4AVX(&a[0], &x[0], ldx, m, &acc)
	}
	for r := range 4 {
		s := acc[8*r : 8*r+8]
		xr := x[r*ldx : r*ldx+n]
		for i := m; i < n; i++ {
			s[0] += a[i] * xr[i]
		}
		out[r] = reduce8(s)
	}
}

// dot2x4 sets out[4k+r] = dot(w[k*ldw : k*ldw+in], x[r*ldx : r*ldx+in])
// for weight rows k = 0..1 and activation rows r = 0..3.
func dot2x4(w []float32, ldw int, x []float32, ldx, in int, out *[8]float32) {
	_ = w[ldw+in-1]
	_ = x[3*ldx+in-1]
	m := in &^ 7
	var acc [64]float32
	if m > 0 {
		dot2x4AVX(&w[0], ldw, &x[0], ldx, m, &acc)
	}
	for k := range 2 {
		wk := w[k*ldw : k*ldw+in]
		for r := range 4 {
			s := acc[32*k+8*r : 32*k+8*r+8]
			xr := x[r*ldx : r*ldx+in]
			for i := m; i < in; i++ {
				s[0] += wk[i] * xr[i]
			}
			out[4*k+r] = reduce8(s)
		}
	}
}

// dot4Q8_0 sets out[r] = dot(Q8_0 row r of w, x) for 4 rows of rb bytes
// (in elements each, in a multiple of 32).
func dot4Q8_0(x []float32, w []byte, rb, in int, out *[4]float32) {
	nb := in / 32
	_ = w[3*rb+34*nb-1]
	_ = x[32*nb-1]
	var acc [32]float32
	dot4Q8_0AVX(&x[0], &w[0], rb, nb, &acc)
	for r := range 4 {
		out[r] = reduce8(acc[8*r : 8*r+8])
	}
}

// dot4F16 sets out[r] = dot(f16 row r of w, x) for 4 rows of rb bytes
// (in elements each, in a multiple of 8).
func dot4F16(x []float32, w []byte, rb, in int, out *[4]float32) {
	_ = w[3*rb+2*in-1]
	_ = x[in-1]
	var acc [32]float32
	dot4F16AVX(&x[0], &w[0], rb, in, &acc)
	for r := range 4 {
		out[r] = reduce8(acc[8*r : 8*r+8])
	}
}

// decodeRow is ml.DequantizeRowUnchecked with vector decoders for F16, BF16,
// Q8_0, Q4_0 and MXFP4 (bit-identical: the same single rounding of q·d).
func decodeRow(dt ml.DType, raw []byte, dst []float32) {
	n := len(dst)
	if !useAVX || n == 0 {
		ml.DequantizeRowUnchecked(dt, raw, dst)
		return
	}
	switch dt {
	case ml.F16, ml.BF16:
		if n%8 == 0 {
			_ = raw[2*n-1]
			if dt == ml.F16 {
				cvtF16AVX(&dst[0], &raw[0], n)
			} else {
				cvtBF16AVX(&dst[0], &raw[0], n)
			}
			return
		}
	case ml.Q8_0, ml.Q4_0, ml.MXFP4:
		nb := n / 32
		_ = dst[32*nb-1]
		switch dt { // block bytes as constants (DType.BlockBytes is a map lookup)
		case ml.Q8_0:
			_ = raw[34*nb-1]
			cvtQ8_0AVX(&dst[0], &raw[0], nb)
		case ml.Q4_0:
			_ = raw[18*nb-1]
			cvtQ4_0AVX(&dst[0], &raw[0], nb)
		default:
			_ = raw[17*nb-1]
			cvtMXFP4AVX(&dst[0], &raw[0], nb, &ml.MXFP4Values)
		}
		return
	}
	ml.DequantizeRowUnchecked(dt, raw, dst)
}

// matRowsAVX is matRows on the AVX2 kernels. Output rows are split over the
// workers; each worker takes 4 weight rows at a time, decodes them once into
// its scratch (F32 rows are used in place) and multiplies them with every
// activation row, 4 activation rows per kernel call.
func (b *Backend) matRowsAVX(wdt ml.DType, wdata []byte, in, oLo, oHi int, x []float32, n int, bias []float32, out []float32, outStride int) {
	rb, _ := wdt.RowBytes(in)
	rowsOut := oHi - oLo
	var bufs [][]float32
	if wdt != ml.F32 {
		bufs = b.scratchFor(scratchMatRows, 4*in)
	}
	fusedF16 := wdt == ml.F16 && in%8 == 0
	b.parallel(rowsOut, func(w, lo, hi int) {
		var buf []float32
		if bufs != nil {
			buf = bufs[w]
		}
		var res [4]float32
		o := oLo + lo
		for ; o < oLo+hi; o += 4 {
			g := min(4, oLo+hi-o) // weight rows in this group
			// the group's weight rows as float32, row stride ws
			var wf []float32
			ws := in
			switch {
			case wdt == ml.F32:
				wf = f32view(wdata[o*rb : (o+g)*rb])
			case n == 1 && (fusedF16 || wdt == ml.Q8_0) && g == 4:
				// decode: fused kernels, no scratch
				if wdt == ml.Q8_0 {
					dot4Q8_0(x[:in], wdata[o*rb:(o+4)*rb], rb, in, &res)
				} else {
					dot4F16(x[:in], wdata[o*rb:(o+4)*rb], rb, in, &res)
				}
				for k := range 4 {
					out[o+k-oLo] = res[k] + biasAt(bias, o+k)
				}
				continue
			default:
				for k := range g {
					decodeRow(wdt, wdata[(o+k)*rb:(o+k+1)*rb], buf[k*in:(k+1)*in])
				}
				wf = buf[:g*in]
			}
			if n < 4 {
				// one activation row (or few): 4 weight rows per kernel call
				for r := range n {
					xr := x[r*in : (r+1)*in]
					k := 0
					if g == 4 {
						dot4(xr, wf, ws, &res)
						for ; k < 4; k++ {
							out[r*outStride+o+k-oLo] = res[k] + biasAt(bias, o+k)
						}
					}
					for ; k < g; k++ {
						out[r*outStride+o+k-oLo] = dotAVX(wf[k*ws:k*ws+in], xr) + biasAt(bias, o+k)
					}
				}
				continue
			}
			k := 0
			var res8 [8]float32
			for ; k+2 <= g; k += 2 {
				// two weight rows x four activation rows per kernel call
				b0, b1 := biasAt(bias, o+k), biasAt(bias, o+k+1)
				r := 0
				for ; r+4 <= n; r += 4 {
					dot2x4(wf[k*ws:], ws, x[r*in:], in, in, &res8)
					for j := range 4 {
						out[(r+j)*outStride+o+k-oLo] = res8[j] + b0
						out[(r+j)*outStride+o+k+1-oLo] = res8[4+j] + b1
					}
				}
				for ; r < n; r++ {
					xr := x[r*in : (r+1)*in]
					out[r*outStride+o+k-oLo] = dotAVX(wf[k*ws:k*ws+in], xr) + b0
					out[r*outStride+o+k+1-oLo] = dotAVX(wf[(k+1)*ws:(k+1)*ws+in], xr) + b1
				}
			}
			for ; k < g; k++ {
				wr := wf[k*ws : k*ws+in]
				bo := biasAt(bias, o+k)
				r := 0
				for ; r+4 <= n; r += 4 {
					dot4(wr, x[r*in:], in, &res)
					for j := range 4 {
						out[(r+j)*outStride+o+k-oLo] = res[j] + bo
					}
				}
				for ; r < n; r++ {
					out[r*outStride+o+k-oLo] = dotAVX(wr, x[r*in:(r+1)*in]) + bo
				}
			}
		}
	})
}

func biasAt(bias []float32, o int) float32 {
	if bias == nil {
		return 0
	}
	return bias[o]
}
