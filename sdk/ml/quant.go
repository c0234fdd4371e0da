package ml

import (
	"encoding/binary"
	"fmt"
	"math"
)

// This file holds the reference decoders of the GGUF weight formats, written
// from llama.cpp's dequantize_row_* (ggml-quants.c). They are hand-written
// because no Go library reads these block formats; the CPU backend calls them
// one row at a time inside its dot products, and the CUDA tests use them as
// the oracle.

// HalfToFloat converts an IEEE 754 binary16 value to float32.
func HalfToFloat(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h) & 0x3ff
	switch {
	case exp == 0 && mant == 0:
		return math.Float32frombits(sign)
	case exp == 0: // subnormal: mant * 2^-24
		f := float32(mant) * (1.0 / (1 << 24))
		if sign != 0 {
			f = -f
		}
		return f
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	}
	return math.Float32frombits(sign | (exp+112)<<23 | mant<<13)
}

// halfTable maps every binary16 bit pattern to its float32 value (256 KiB):
// a load instead of the branches of HalfToFloat in the hot loops.
var halfTable = func() *[1 << 16]float32 {
	var t [1 << 16]float32
	for i := range t {
		t[i] = HalfToFloat(uint16(i))
	}
	return &t
}()

// HalfTable returns the binary16 -> float32 lookup table (read-only).
func HalfTable() *[1 << 16]float32 { return halfTable }

// FloatToHalf converts a float32 to binary16 with round-to-nearest-even.
func FloatToHalf(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	if exp == 0xff { // inf / nan
		if mant != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		if e < -10 {
			return sign
		}
		mant |= 0x800000
		shift := uint32(14 - e)
		h := mant >> shift
		rem := mant & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rem > half || (rem == half && h&1 == 1) {
			h++
		}
		return sign | uint16(h)
	}
	h := uint32(e)<<10 | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++ // may carry into the exponent, which is correct
	}
	return sign | uint16(h)
}

// BF16ToFloat converts a bfloat16 value to float32.
func BF16ToFloat(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// E8M0ToFloat decodes an MXFP4 shared exponent: 2^(e-127) (e = 0 gives 2^-127).
func E8M0ToFloat(e uint8) float32 {
	if e == 0 {
		return math.Float32frombits(0x00400000)
	}
	return math.Float32frombits(uint32(e) << 23)
}

// MXFP4Values is the E2M1 code table: code c (4 bits, sign in bit 3) is
// MXFP4Values[c]. llama.cpp's kvalues_mxfp4 are these doubled, with the scale halved.
var MXFP4Values = [16]float32{0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6}

// DequantizeRow decodes len(dst) elements of type dt from src (which must
// hold exactly RowBytes(len(dst)) bytes) into dst.
func DequantizeRow(dt DType, src []byte, dst []float32) error {
	n, err := dt.RowBytes(len(dst))
	if err != nil {
		return err
	}
	if len(src) != n {
		return fmt.Errorf("ml: dequantize %s: %d bytes for %d elements, want %d", dt, len(src), len(dst), n)
	}
	dequantRow(dt, src, dst)
	return nil
}

// dequantRow is DequantizeRow without checks (sizes already validated).
func dequantRow(dt DType, src []byte, dst []float32) {
	switch dt {
	case F32:
		for i := range dst {
			dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:]))
		}
	case F16:
		for i := range dst {
			dst[i] = halfTable[binary.LittleEndian.Uint16(src[2*i:])]
		}
	case BF16:
		for i := range dst {
			dst[i] = BF16ToFloat(binary.LittleEndian.Uint16(src[2*i:]))
		}
	case Q8_0:
		for b := 0; b < len(dst)/32; b++ {
			blk := src[b*34 : b*34+34]
			d := halfTable[binary.LittleEndian.Uint16(blk)]
			y := dst[b*32 : b*32+32]
			for j := range 32 {
				y[j] = float32(int8(blk[2+j])) * d
			}
		}
	case Q4_0:
		for b := 0; b < len(dst)/32; b++ {
			blk := src[b*18 : b*18+18]
			d := HalfToFloat(binary.LittleEndian.Uint16(blk))
			y := dst[b*32 : b*32+32]
			for j := range 16 {
				q := blk[2+j]
				y[j] = float32(int(q&0xf)-8) * d
				y[j+16] = float32(int(q>>4)-8) * d
			}
		}
	case MXFP4:
		for b := 0; b < len(dst)/32; b++ {
			blk := src[b*17 : b*17+17]
			d := E8M0ToFloat(blk[0])
			y := dst[b*32 : b*32+32]
			for j := range 16 {
				q := blk[1+j]
				y[j] = MXFP4Values[q&0xf] * d
				y[j+16] = MXFP4Values[q>>4] * d
			}
		}
	case Q4_K:
		for b := 0; b < len(dst)/256; b++ {
			dequantQ4K(src[b*144:b*144+144], dst[b*256:b*256+256])
		}
	case Q6_K:
		for b := 0; b < len(dst)/256; b++ {
			dequantQ6K(src[b*210:b*210+210], dst[b*256:b*256+256])
		}
	default:
		panic("ml: dequantRow: unsupported " + dt.String()) // unreachable: RowBytes validated dt
	}
}

// scaleMinK4 is llama.cpp's get_scale_min_k4.
func scaleMinK4(j int, q []byte) (d, m uint8) {
	if j < 4 {
		return q[j] & 63, q[j+4] & 63
	}
	return (q[j+4] & 0xf) | ((q[j-4] >> 6) << 4), (q[j+4] >> 4) | ((q[j] >> 6) << 4)
}

// dequantQ4K decodes one block_q4_K {d f16, dmin f16, scales[12], qs[128]}.
func dequantQ4K(blk []byte, y []float32) {
	d := HalfToFloat(binary.LittleEndian.Uint16(blk[0:]))
	dmin := HalfToFloat(binary.LittleEndian.Uint16(blk[2:]))
	scales := blk[4:16]
	q := blk[16:144]
	is := 0
	for j := 0; j < 256; j += 64 {
		sc, m := scaleMinK4(is, scales)
		d1, m1 := d*float32(sc), dmin*float32(m)
		sc, m = scaleMinK4(is+1, scales)
		d2, m2 := d*float32(sc), dmin*float32(m)
		qq := q[j/2 : j/2+32]
		for l := range 32 {
			y[j+l] = d1*float32(qq[l]&0xf) - m1
			y[j+32+l] = d2*float32(qq[l]>>4) - m2
		}
		is += 2
	}
}

// dequantQ6K decodes one block_q6_K {ql[128], qh[64], scales int8[16], d f16}.
func dequantQ6K(blk []byte, y []float32) {
	d := HalfToFloat(binary.LittleEndian.Uint16(blk[208:]))
	for n := 0; n < 2; n++ {
		ql := blk[n*64 : n*64+64]
		qh := blk[128+n*32 : 128+n*32+32]
		sc := blk[192+n*8 : 192+n*8+8]
		yy := y[n*128 : n*128+128]
		for l := range 32 {
			is := l / 16
			q1 := int(int8((ql[l]&0xf)|((qh[l]>>0)&3)<<4)) - 32
			q2 := int(int8((ql[l+32]&0xf)|((qh[l]>>2)&3)<<4)) - 32
			q3 := int(int8((ql[l]>>4)|((qh[l]>>4)&3)<<4)) - 32
			q4 := int(int8((ql[l+32]>>4)|((qh[l]>>6)&3)<<4)) - 32
			yy[l] = d * float32(int8(sc[is])) * float32(q1)
			yy[l+32] = d * float32(int8(sc[is+2])) * float32(q2)
			yy[l+64] = d * float32(int8(sc[is+4])) * float32(q3)
			yy[l+96] = d * float32(int8(sc[is+6])) * float32(q4)
		}
	}
}

// DequantizeRowUnchecked is DequantizeRow for callers that validated sizes
// (hot loops of backends). It panics on an unknown type.
func DequantizeRowUnchecked(dt DType, src []byte, dst []float32) { dequantRow(dt, src, dst) }
