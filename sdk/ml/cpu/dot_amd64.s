#include "textflag.h"

// AVX2 kernels for the float32 inner products. Every kernel keeps, per
// output, one 8-lane accumulator where lane j sums the products of elements
// i ≡ j (mod 8) in increasing i, with a separate multiply and add (VMULPS then
// VADDPS, never a fused FMA): exactly the 8 partial sums s0..s7 of the
// portable dot in ops.go. The caller adds the tail and reduces the lanes in
// the same order as the portable code, so results are bit-identical.

// func dot1AVX(a, x *float32, n int, acc *[8]float32)
// n is a multiple of 8.
TEXT ·dot1AVX(SB), NOSPLIT, $0-32
	MOVQ a+0(FP), SI
	MOVQ x+8(FP), DI
	MOVQ n+16(FP), CX
	MOVQ acc+24(FP), DX
	VXORPS Y0, Y0, Y0
	SHRQ $3, CX
	JZ   done1
loop1:
	VMOVUPS (SI), Y1
	VMULPS  (DI), Y1, Y1
	VADDPS  Y1, Y0, Y0
	ADDQ    $32, SI
	ADDQ    $32, DI
	DECQ    CX
	JNZ     loop1
done1:
	VMOVUPS Y0, (DX)
	VZEROUPPER
	RET

// func dot4AVX(a, x *float32, ldx, n int, acc *[32]float32)
// Four outputs: a · x[r*ldx : r*ldx+n] for r = 0..3 (a is read once for all
// four). n is a multiple of 8.
TEXT ·dot4AVX(SB), NOSPLIT, $0-40
	MOVQ a+0(FP), SI
	MOVQ x+8(FP), DI
	MOVQ ldx+16(FP), BX
	MOVQ n+24(FP), CX
	MOVQ acc+32(FP), DX
	SHLQ $2, BX
	LEAQ (DI)(BX*1), R8
	LEAQ (R8)(BX*1), R9
	LEAQ (R9)(BX*1), R10
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	XORQ AX, AX
	SHRQ $3, CX
	JZ   done4
loop4:
	VMOVUPS (SI)(AX*1), Y4
	VMULPS  (DI)(AX*1), Y4, Y5
	VADDPS  Y5, Y0, Y0
	VMULPS  (R8)(AX*1), Y4, Y6
	VADDPS  Y6, Y1, Y1
	VMULPS  (R9)(AX*1), Y4, Y7
	VADDPS  Y7, Y2, Y2
	VMULPS  (R10)(AX*1), Y4, Y8
	VADDPS  Y8, Y3, Y3
	ADDQ    $32, AX
	DECQ    CX
	JNZ     loop4
done4:
	VMOVUPS Y0, (DX)
	VMOVUPS Y1, 32(DX)
	VMOVUPS Y2, 64(DX)
	VMOVUPS Y3, 96(DX)
	VZEROUPPER
	RET

// func dot4F16AVX(x *float32, w *byte, ldw, n int, acc *[32]float32)
// Four outputs: dot(f16 row r of w, x) for r = 0..3, rows ldw bytes apart,
// n (a multiple of 8) elements each; half -> float conversion is exact.
TEXT ·dot4F16AVX(SB), NOSPLIT, $0-40
	MOVQ x+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ ldw+16(FP), BX
	MOVQ n+24(FP), CX
	MOVQ acc+32(FP), DX
	LEAQ (DI)(BX*1), R8
	LEAQ (R8)(BX*1), R9
	LEAQ (R9)(BX*1), R10
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	XORQ AX, AX
	XORQ R11, R11
	SHRQ $3, CX
	JZ   doneh
looph:
	VMOVUPS   (SI)(AX*1), Y4
	VCVTPH2PS (DI)(R11*1), Y5
	VMULPS    Y4, Y5, Y5
	VADDPS    Y5, Y0, Y0
	VCVTPH2PS (R8)(R11*1), Y6
	VMULPS    Y4, Y6, Y6
	VADDPS    Y6, Y1, Y1
	VCVTPH2PS (R9)(R11*1), Y7
	VMULPS    Y4, Y7, Y7
	VADDPS    Y7, Y2, Y2
	VCVTPH2PS (R10)(R11*1), Y8
	VMULPS    Y4, Y8, Y8
	VADDPS    Y8, Y3, Y3
	ADDQ      $32, AX
	ADDQ      $16, R11
	DECQ      CX
	JNZ       looph
doneh:
	VMOVUPS Y0, (DX)
	VMOVUPS Y1, 32(DX)
	VMOVUPS Y2, 64(DX)
	VMOVUPS Y3, 96(DX)
	VZEROUPPER
	RET

// func cvtF16AVX(dst *float32, src *byte, n int)
// Decodes n (a multiple of 8) halves to float32, exactly.
TEXT ·cvtF16AVX(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	SHRQ $3, CX
	JZ   donec
loopc:
	VCVTPH2PS (SI), Y0
	VMOVUPS   Y0, (DI)
	ADDQ      $16, SI
	ADDQ      $32, DI
	DECQ      CX
	JNZ       loopc
donec:
	VZEROUPPER
	RET

// func cvtQ8_0AVX(dst *float32, src *byte, nb int)
// Decodes nb Q8_0 blocks (f16 scale d, 32 int8 q) to float32(q)*d, the
// same single rounding as ml.DequantizeRow.
TEXT ·cvtQ8_0AVX(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ nb+16(FP), CX
	TESTQ CX, CX
	JZ   doneq
loopq:
	MOVWLZX      (SI), AX
	MOVQ         AX, X0
	VCVTPH2PS    X0, X0
	VBROADCASTSS X0, Y0
	VPMOVSXBD    2(SI), Y1
	VCVTDQ2PS    Y1, Y1
	VMULPS       Y0, Y1, Y1
	VMOVUPS      Y1, (DI)
	VPMOVSXBD    10(SI), Y2
	VCVTDQ2PS    Y2, Y2
	VMULPS       Y0, Y2, Y2
	VMOVUPS      Y2, 32(DI)
	VPMOVSXBD    18(SI), Y3
	VCVTDQ2PS    Y3, Y3
	VMULPS       Y0, Y3, Y3
	VMOVUPS      Y3, 64(DI)
	VPMOVSXBD    26(SI), Y4
	VCVTDQ2PS    Y4, Y4
	VMULPS       Y0, Y4, Y4
	VMOVUPS      Y4, 96(DI)
	ADDQ         $34, SI
	ADDQ         $128, DI
	DECQ         CX
	JNZ          loopq
doneq:
	VZEROUPPER
	RET

// func dot2x4AVX(w *float32, ldw int, x *float32, ldx, n int, acc *[64]float32)
// Eight outputs: w[k*ldw:] · x[r*ldx:] for weight rows k = 0..1 and
// activation rows r = 0..3, acc[32*(4k+r):] their lane sums. Each loaded
// vector serves 2 or 4 products (half the loads of dot4AVX per product).
// n is a multiple of 8.
TEXT ·dot2x4AVX(SB), NOSPLIT, $0-48
	MOVQ w+0(FP), SI
	MOVQ ldw+8(FP), R12
	MOVQ x+16(FP), DI
	MOVQ ldx+24(FP), BX
	MOVQ n+32(FP), CX
	MOVQ acc+40(FP), DX
	SHLQ $2, R12
	ADDQ SI, R12
	SHLQ $2, BX
	LEAQ (DI)(BX*1), R8
	LEAQ (R8)(BX*1), R9
	LEAQ (R9)(BX*1), R10
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	VXORPS Y4, Y4, Y4
	VXORPS Y5, Y5, Y5
	VXORPS Y6, Y6, Y6
	VXORPS Y7, Y7, Y7
	XORQ AX, AX
	SHRQ $3, CX
	JZ   done24
loop24:
	VMOVUPS (SI)(AX*1), Y8
	VMOVUPS (R12)(AX*1), Y9
	VMOVUPS (DI)(AX*1), Y10
	VMULPS  Y10, Y8, Y11
	VADDPS  Y11, Y0, Y0
	VMULPS  Y10, Y9, Y12
	VADDPS  Y12, Y4, Y4
	VMOVUPS (R8)(AX*1), Y13
	VMULPS  Y13, Y8, Y14
	VADDPS  Y14, Y1, Y1
	VMULPS  Y13, Y9, Y15
	VADDPS  Y15, Y5, Y5
	VMOVUPS (R9)(AX*1), Y10
	VMULPS  Y10, Y8, Y11
	VADDPS  Y11, Y2, Y2
	VMULPS  Y10, Y9, Y12
	VADDPS  Y12, Y6, Y6
	VMOVUPS (R10)(AX*1), Y13
	VMULPS  Y13, Y8, Y14
	VADDPS  Y14, Y3, Y3
	VMULPS  Y13, Y9, Y15
	VADDPS  Y15, Y7, Y7
	ADDQ    $32, AX
	DECQ    CX
	JNZ     loop24
done24:
	VMOVUPS Y0, (DX)
	VMOVUPS Y1, 32(DX)
	VMOVUPS Y2, 64(DX)
	VMOVUPS Y3, 96(DX)
	VMOVUPS Y4, 128(DX)
	VMOVUPS Y5, 160(DX)
	VMOVUPS Y6, 192(DX)
	VMOVUPS Y7, 224(DX)
	VZEROUPPER
	RET

// func cvtBF16AVX(dst *float32, src *byte, n int)
// Decodes n (a multiple of 8) bfloat16 values: the bits shifted up 16.
TEXT ·cvtBF16AVX(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	SHRQ $3, CX
	JZ   doneb
loopb:
	VPMOVZXWD (SI), Y0
	VPSLLD    $16, Y0, Y0
	VMOVUPS   Y0, (DI)
	ADDQ      $16, SI
	ADDQ      $32, DI
	DECQ      CX
	JNZ       loopb
doneb:
	VZEROUPPER
	RET

// func cvtQ4_0AVX(dst *float32, src *byte, nb int)
// Decodes nb Q4_0 blocks (f16 scale d, 16 bytes of nibbles: low nibbles are
// elements 0..15, high nibbles 16..31) to float32(q-8)*d.
TEXT ·cvtQ4_0AVX(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ nb+16(FP), CX
	MOVL $15, AX
	MOVQ AX, X13
	VPBROADCASTD X13, Y13
	MOVL $8, AX
	MOVQ AX, X14
	VPBROADCASTD X14, Y14
	TESTQ CX, CX
	JZ   done40
loop40:
	MOVWLZX      (SI), AX
	MOVQ         AX, X0
	VCVTPH2PS    X0, X0
	VBROADCASTSS X0, Y0
	VPMOVZXBD    2(SI), Y1
	VPAND        Y13, Y1, Y2
	VPSUBD       Y14, Y2, Y2
	VCVTDQ2PS    Y2, Y2
	VMULPS       Y0, Y2, Y2
	VMOVUPS      Y2, (DI)
	VPSRLD       $4, Y1, Y3
	VPSUBD       Y14, Y3, Y3
	VCVTDQ2PS    Y3, Y3
	VMULPS       Y0, Y3, Y3
	VMOVUPS      Y3, 64(DI)
	VPMOVZXBD    10(SI), Y1
	VPAND        Y13, Y1, Y2
	VPSUBD       Y14, Y2, Y2
	VCVTDQ2PS    Y2, Y2
	VMULPS       Y0, Y2, Y2
	VMOVUPS      Y2, 32(DI)
	VPSRLD       $4, Y1, Y3
	VPSUBD       Y14, Y3, Y3
	VCVTDQ2PS    Y3, Y3
	VMULPS       Y0, Y3, Y3
	VMOVUPS      Y3, 96(DI)
	ADDQ         $18, SI
	ADDQ         $128, DI
	DECQ         CX
	JNZ          loop40
done40:
	VZEROUPPER
	RET

// func cvtMXFP4AVX(dst *float32, src *byte, nb int, table *[16]float32)
// Decodes nb MXFP4 blocks (E8M0 scale byte, 16 bytes of E2M1 nibbles, low
// nibbles elements 0..15) to table[code]*d with d = 2^(e-127) (e = 0:
// 2^-127), as ml.DequantizeRow. The 16-entry lookup is two 8-entry VPERMPS
// (low 3 bits of the code) blended on bit 3.
TEXT ·cvtMXFP4AVX(SB), NOSPLIT, $0-32
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ nb+16(FP), CX
	MOVQ table+24(FP), DX
	VMOVUPS (DX), Y15
	VMOVUPS 32(DX), Y14
	MOVL $0x00400000, R11
	TESTQ CX, CX
	JZ   donemx
loopmx:
	MOVBLZX      (SI), AX
	SHLL         $23, AX
	TESTL        AX, AX
	CMOVLEQ      R11, AX
	MOVQ         AX, X0
	VBROADCASTSS X0, Y0
	// bytes 0..7: elements 0..7 (low nibbles), 16..23 (high)
	VPMOVZXBD    1(SI), Y1
	VPERMPS      Y15, Y1, Y2
	VPERMPS      Y14, Y1, Y3
	VPSLLD       $28, Y1, Y4
	VBLENDVPS    Y4, Y3, Y2, Y2
	VMULPS       Y0, Y2, Y2
	VMOVUPS      Y2, (DI)
	VPSRLD       $4, Y1, Y5
	VPERMPS      Y15, Y5, Y6
	VPERMPS      Y14, Y5, Y7
	VPSLLD       $28, Y5, Y8
	VBLENDVPS    Y8, Y7, Y6, Y6
	VMULPS       Y0, Y6, Y6
	VMOVUPS      Y6, 64(DI)
	// bytes 8..15: elements 8..15 (low), 24..31 (high)
	VPMOVZXBD    9(SI), Y1
	VPERMPS      Y15, Y1, Y2
	VPERMPS      Y14, Y1, Y3
	VPSLLD       $28, Y1, Y4
	VBLENDVPS    Y4, Y3, Y2, Y2
	VMULPS       Y0, Y2, Y2
	VMOVUPS      Y2, 32(DI)
	VPSRLD       $4, Y1, Y5
	VPERMPS      Y15, Y5, Y6
	VPERMPS      Y14, Y5, Y7
	VPSLLD       $28, Y5, Y8
	VBLENDVPS    Y8, Y7, Y6, Y6
	VMULPS       Y0, Y6, Y6
	VMOVUPS      Y6, 96(DI)
	ADDQ         $17, SI
	ADDQ         $128, DI
	DECQ         CX
	JNZ          loopmx
donemx:
	VZEROUPPER
	RET

// func dot4Q8_0AVX(x *float32, w *byte, ldw, nb int, acc *[32]float32)
// Four outputs: dot(Q8_0 row r of w, x) for r = 0..3, rows ldw bytes apart,
// nb blocks each: ((float32(q)*d)*x) added lane-wise, as dequantize + dot.
TEXT ·dot4Q8_0AVX(SB), NOSPLIT, $0-40
	MOVQ x+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ ldw+16(FP), BX
	MOVQ nb+24(FP), CX
	MOVQ acc+32(FP), DX
	LEAQ (DI)(BX*1), R8
	LEAQ (R8)(BX*1), R9
	LEAQ (R9)(BX*1), R10
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	XORQ R11, R11
	TESTQ CX, CX
	JZ   doneq4
loopq4:
	VMOVUPS (SI), Y4
	VMOVUPS 32(SI), Y5
	VMOVUPS 64(SI), Y6
	VMOVUPS 96(SI), Y7
	MOVWLZX      (DI)(R11*1), AX
	MOVQ         AX, X8
	VCVTPH2PS    X8, X8
	VBROADCASTSS X8, Y8
	VPMOVSXBD    2(DI)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y4, Y9, Y9
	VADDPS       Y9, Y0, Y0
	VPMOVSXBD    10(DI)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y5, Y9, Y9
	VADDPS       Y9, Y0, Y0
	VPMOVSXBD    18(DI)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y6, Y9, Y9
	VADDPS       Y9, Y0, Y0
	VPMOVSXBD    26(DI)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y7, Y9, Y9
	VADDPS       Y9, Y0, Y0
	MOVWLZX      (R8)(R11*1), AX
	MOVQ         AX, X8
	VCVTPH2PS    X8, X8
	VBROADCASTSS X8, Y8
	VPMOVSXBD    2(R8)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y4, Y9, Y9
	VADDPS       Y9, Y1, Y1
	VPMOVSXBD    10(R8)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y5, Y9, Y9
	VADDPS       Y9, Y1, Y1
	VPMOVSXBD    18(R8)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y6, Y9, Y9
	VADDPS       Y9, Y1, Y1
	VPMOVSXBD    26(R8)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y7, Y9, Y9
	VADDPS       Y9, Y1, Y1
	MOVWLZX      (R9)(R11*1), AX
	MOVQ         AX, X8
	VCVTPH2PS    X8, X8
	VBROADCASTSS X8, Y8
	VPMOVSXBD    2(R9)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y4, Y9, Y9
	VADDPS       Y9, Y2, Y2
	VPMOVSXBD    10(R9)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y5, Y9, Y9
	VADDPS       Y9, Y2, Y2
	VPMOVSXBD    18(R9)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y6, Y9, Y9
	VADDPS       Y9, Y2, Y2
	VPMOVSXBD    26(R9)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y7, Y9, Y9
	VADDPS       Y9, Y2, Y2
	MOVWLZX      (R10)(R11*1), AX
	MOVQ         AX, X8
	VCVTPH2PS    X8, X8
	VBROADCASTSS X8, Y8
	VPMOVSXBD    2(R10)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y4, Y9, Y9
	VADDPS       Y9, Y3, Y3
	VPMOVSXBD    10(R10)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y5, Y9, Y9
	VADDPS       Y9, Y3, Y3
	VPMOVSXBD    18(R10)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y6, Y9, Y9
	VADDPS       Y9, Y3, Y3
	VPMOVSXBD    26(R10)(R11*1), Y9
	VCVTDQ2PS    Y9, Y9
	VMULPS       Y8, Y9, Y9
	VMULPS       Y7, Y9, Y9
	VADDPS       Y9, Y3, Y3
	ADDQ $128, SI
	ADDQ $34, R11
	DECQ CX
	JNZ  loopq4
doneq4:
	VMOVUPS Y0, (DX)
	VMOVUPS Y1, 32(DX)
	VMOVUPS Y2, 64(DX)
	VMOVUPS Y3, 96(DX)
	VZEROUPPER
	RET
