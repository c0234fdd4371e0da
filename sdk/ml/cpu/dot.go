package cpu

import (
	"encoding/binary"
	"math"

	"github.com/llama-orch/orch/sdk/ml"
)

// Fused dequantize-and-dot kernels for single-token rows (decode). Each one
// computes exactly what ml.DequantizeRow followed by dot computes — the same
// rounded weight value w, the same products w*x, the same 8 partial sums in
// the same order — so the fused and the dequantize-once paths give
// bit-identical results (batch invariance), while decode skips the write and
// re-read of a decoded row.

var halfTable = ml.HalfTable()

// hasFusedDot reports whether dotQuant has a fused kernel for dt.
func hasFusedDot(dt ml.DType) bool {
	switch dt {
	case ml.F16, ml.BF16, ml.Q8_0, ml.Q4_0, ml.MXFP4:
		return true
	}
	return false
}

// dotQuant is dot(dequant(raw), x) for the types of hasFusedDot.
func dotQuant(dt ml.DType, raw []byte, x []float32) float32 {
	switch dt {
	case ml.F16:
		return dotF16(raw, x)
	case ml.BF16:
		return dotBF16(raw, x)
	case ml.Q8_0:
		return dotQ8_0(raw, x)
	case ml.Q4_0:
		return dotQ4_0(raw, x)
	case ml.MXFP4:
		return dotMXFP4(raw, x)
	}
	panic("cpu: no fused dot for " + dt.String())
}

func dotF16(raw []byte, x []float32) float32 {
	n := len(raw) / 2
	x = x[:n]
	var s0, s1, s2, s3, s4, s5, s6, s7 float32
	i := 0
	h := halfTable
	for ; i+8 <= n; i += 8 {
		r := raw[2*i : 2*i+16]
		xx := x[i : i+8]
		s0 += h[binary.LittleEndian.Uint16(r[0:])] * xx[0]
		s1 += h[binary.LittleEndian.Uint16(r[2:])] * xx[1]
		s2 += h[binary.LittleEndian.Uint16(r[4:])] * xx[2]
		s3 += h[binary.LittleEndian.Uint16(r[6:])] * xx[3]
		s4 += h[binary.LittleEndian.Uint16(r[8:])] * xx[4]
		s5 += h[binary.LittleEndian.Uint16(r[10:])] * xx[5]
		s6 += h[binary.LittleEndian.Uint16(r[12:])] * xx[6]
		s7 += h[binary.LittleEndian.Uint16(r[14:])] * xx[7]
	}
	for ; i < n; i++ {
		s0 += h[binary.LittleEndian.Uint16(raw[2*i:])] * x[i]
	}
	return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
}

func bf16(b []byte) float32 { return math.Float32frombits(uint32(binary.LittleEndian.Uint16(b)) << 16) }

func dotBF16(raw []byte, x []float32) float32 {
	n := len(raw) / 2
	x = x[:n]
	var s0, s1, s2, s3, s4, s5, s6, s7 float32
	i := 0
	for ; i+8 <= n; i += 8 {
		r := raw[2*i : 2*i+16]
		xx := x[i : i+8]
		s0 += bf16(r[0:]) * xx[0]
		s1 += bf16(r[2:]) * xx[1]
		s2 += bf16(r[4:]) * xx[2]
		s3 += bf16(r[6:]) * xx[3]
		s4 += bf16(r[8:]) * xx[4]
		s5 += bf16(r[10:]) * xx[5]
		s6 += bf16(r[12:]) * xx[6]
		s7 += bf16(r[14:]) * xx[7]
	}
	for ; i < n; i++ {
		s0 += bf16(raw[2*i:]) * x[i]
	}
	return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
}

func dotQ8_0(raw []byte, x []float32) float32 {
	nb := len(raw) / 34
	x = x[:nb*32]
	var s0, s1, s2, s3, s4, s5, s6, s7 float32
	for b := 0; b < nb; b++ {
		blk := raw[b*34 : b*34+34]
		d := halfTable[binary.LittleEndian.Uint16(blk)]
		q := blk[2:34]
		xb := x[b*32 : b*32+32]
		for j := 0; j < 32; j += 8 {
			qq := q[j : j+8]
			xx := xb[j : j+8]
			s0 += float32(int8(qq[0])) * d * xx[0]
			s1 += float32(int8(qq[1])) * d * xx[1]
			s2 += float32(int8(qq[2])) * d * xx[2]
			s3 += float32(int8(qq[3])) * d * xx[3]
			s4 += float32(int8(qq[4])) * d * xx[4]
			s5 += float32(int8(qq[5])) * d * xx[5]
			s6 += float32(int8(qq[6])) * d * xx[6]
			s7 += float32(int8(qq[7])) * d * xx[7]
		}
	}
	return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
}

func dotQ4_0(raw []byte, x []float32) float32 {
	nb := len(raw) / 18
	x = x[:nb*32]
	var s0, s1, s2, s3, s4, s5, s6, s7 float32
	for b := 0; b < nb; b++ {
		blk := raw[b*18 : b*18+18]
		d := halfTable[binary.LittleEndian.Uint16(blk)]
		q := blk[2:18]
		xb := x[b*32 : b*32+32]
		for half := 0; half < 2; half++ {
			sh := uint(4 * half)
			for j := 0; j < 16; j += 8 {
				qq := q[j : j+8]
				xx := xb[16*half+j : 16*half+j+8]
				s0 += float32(int(qq[0]>>sh&0xf)-8) * d * xx[0]
				s1 += float32(int(qq[1]>>sh&0xf)-8) * d * xx[1]
				s2 += float32(int(qq[2]>>sh&0xf)-8) * d * xx[2]
				s3 += float32(int(qq[3]>>sh&0xf)-8) * d * xx[3]
				s4 += float32(int(qq[4]>>sh&0xf)-8) * d * xx[4]
				s5 += float32(int(qq[5]>>sh&0xf)-8) * d * xx[5]
				s6 += float32(int(qq[6]>>sh&0xf)-8) * d * xx[6]
				s7 += float32(int(qq[7]>>sh&0xf)-8) * d * xx[7]
			}
		}
	}
	return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
}

func dotMXFP4(raw []byte, x []float32) float32 {
	nb := len(raw) / 17
	x = x[:nb*32]
	v := &ml.MXFP4Values
	var s0, s1, s2, s3, s4, s5, s6, s7 float32
	for b := 0; b < nb; b++ {
		blk := raw[b*17 : b*17+17]
		d := ml.E8M0ToFloat(blk[0])
		q := blk[1:17]
		xb := x[b*32 : b*32+32]
		for half := 0; half < 2; half++ {
			sh := uint(4 * half)
			for j := 0; j < 16; j += 8 {
				qq := q[j : j+8]
				xx := xb[16*half+j : 16*half+j+8]
				s0 += v[qq[0]>>sh&0xf] * d * xx[0]
				s1 += v[qq[1]>>sh&0xf] * d * xx[1]
				s2 += v[qq[2]>>sh&0xf] * d * xx[2]
				s3 += v[qq[3]>>sh&0xf] * d * xx[3]
				s4 += v[qq[4]>>sh&0xf] * d * xx[4]
				s5 += v[qq[5]>>sh&0xf] * d * xx[5]
				s6 += v[qq[6]>>sh&0xf] * d * xx[6]
				s7 += v[qq[7]>>sh&0xf] * d * xx[7]
			}
		}
	}
	return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
}
