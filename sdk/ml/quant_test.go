package ml

import (
	"encoding/binary"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestHalf(t *testing.T) {
	cases := map[uint16]float32{0x3c00: 1, 0xc000: -2, 0x0001: 1.0 / (1 << 24), 0x7bff: 65504, 0x3555: 0.33325195, 0x0000: 0}
	for h, f := range cases {
		assert.Equal(t, f, HalfToFloat(h), "%#04x", h)
		assert.Equal(t, h, FloatToHalf(f), "%g", f)
	}
	assert.True(t, math.IsInf(float64(HalfToFloat(0x7c00)), 1))
	assert.Equal(t, uint16(0x7c00), FloatToHalf(1e6))
	// round to nearest even: 1 + 2^-11 is halfway between 1 and 1+2^-10
	assert.Equal(t, uint16(0x3c00), FloatToHalf(1+1.0/2048))
	assert.Equal(t, float32(1), BF16ToFloat(0x3f80))
	assert.Equal(t, float32(-2), BF16ToFloat(0xc000))
}

func TestE8M0(t *testing.T) {
	assert.Equal(t, float32(1), E8M0ToFloat(127))
	assert.Equal(t, float32(2), E8M0ToFloat(128))
	assert.Equal(t, float32(0.25), E8M0ToFloat(125))
	assert.Equal(t, float32(math.Ldexp(1, -127)), E8M0ToFloat(0))
}

func TestDequantKnownValues(t *testing.T) {
	t.Run("Q8_0", func(t *testing.T) {
		blk := make([]byte, 34)
		binary.LittleEndian.PutUint16(blk, 0x3400) // 0.25
		blk[2] = byte(0xfd)                        // -3
		blk[33] = 127
		y := make([]float32, 32)
		require.NoError(t, DequantizeRow(Q8_0, blk, y))
		assert.Equal(t, float32(-0.75), y[0])
		assert.Equal(t, float32(31.75), y[31])
		assert.Equal(t, float32(0), y[1])
	})
	t.Run("Q4_0", func(t *testing.T) {
		blk := make([]byte, 18)
		binary.LittleEndian.PutUint16(blk, 0x4000) // 2
		blk[2] = 0x9a
		y := make([]float32, 32)
		require.NoError(t, DequantizeRow(Q4_0, blk, y))
		assert.Equal(t, float32(4), y[0])   // (0xa-8)*2
		assert.Equal(t, float32(2), y[16])  // (0x9-8)*2
		assert.Equal(t, float32(-16), y[1]) // (0-8)*2
	})
	t.Run("MXFP4", func(t *testing.T) {
		blk := make([]byte, 17)
		blk[0] = 128 // scale 2
		blk[1] = 0x2f
		blk[16] = 0x73 // element 15: code 3 (1.5), element 31: code 7 (6)
		y := make([]float32, 32)
		require.NoError(t, DequantizeRow(MXFP4, blk, y))
		assert.Equal(t, float32(-12), y[0]) // code 0xf = -6
		assert.Equal(t, float32(2), y[16])  // code 2 = 1
		assert.Equal(t, float32(3), y[15])
		assert.Equal(t, float32(12), y[31])
		assert.Equal(t, float32(0), y[1])
	})
	t.Run("Q4_K", func(t *testing.T) {
		blk := make([]byte, 144)
		binary.LittleEndian.PutUint16(blk[0:], 0x3c00) // d 1
		binary.LittleEndian.PutUint16(blk[2:], 0x3800) // dmin 0.5
		sc := blk[4:16]
		sc[0], sc[4] = 0x42, 3 // sub-block 0: scale 2, min 3; high bits of sc[0] feed sub-block 4's scale
		sc[1], sc[5] = 4, 1    // sub-block 1: scale 4, min 1
		sc[8] = 0x21           // sub-block 4: scale 1|(1<<4)=17, min 2|(0<<4)=2
		qs := blk[16:]
		qs[0] = 0x51
		qs[64] = 0x03
		y := make([]float32, 256)
		require.NoError(t, DequantizeRow(Q4_K, blk, y))
		assert.Equal(t, float32(2*1-1.5), y[0])
		assert.Equal(t, float32(4*5-0.5), y[32])
		assert.Equal(t, float32(17*3-1), y[128])
		assert.Equal(t, float32(-1.5), y[1])
	})
	t.Run("Q6_K", func(t *testing.T) {
		blk := make([]byte, 210)
		ql, qh, sc := blk[0:128], blk[128:192], blk[192:208]
		binary.LittleEndian.PutUint16(blk[208:], 0x3800) // d 0.5
		ql[0], ql[32], qh[0] = 0x21, 0x43, 0xe4
		sc[0], sc[2], sc[4], sc[6] = 3, 0xfe, 5, 1 // 0xfe = -2
		ql[64], qh[32], sc[8] = 0x0f, 0x03, 1
		y := make([]float32, 256)
		require.NoError(t, DequantizeRow(Q6_K, blk, y))
		assert.Equal(t, float32(-46.5), y[0])
		assert.Equal(t, float32(13), y[32])
		assert.Equal(t, float32(5), y[64])
		assert.Equal(t, float32(10), y[96])
		assert.Equal(t, float32(15.5), y[128])
	})
	t.Run("F16/BF16/F32", func(t *testing.T) {
		y := make([]float32, 2)
		require.NoError(t, DequantizeRow(F16, []byte{0x00, 0x3c, 0x00, 0xc0}, y))
		assert.Equal(t, []float32{1, -2}, y)
		require.NoError(t, DequantizeRow(BF16, []byte{0x80, 0x3f, 0x00, 0xc0}, y))
		assert.Equal(t, []float32{1, -2}, y)
		require.NoError(t, DequantizeRow(F32, []byte{0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0}, y))
		assert.Equal(t, []float32{1, -2}, y)
	})
}

func TestDequantErrors(t *testing.T) {
	assert.Error(t, DequantizeRow(Q8_0, make([]byte, 34), make([]float32, 31)))
	assert.Error(t, DequantizeRow(Q8_0, make([]byte, 33), make([]float32, 32)))
	assert.Error(t, DequantizeRow(DType(99), make([]byte, 4), make([]float32, 1)))
	_, err := ParseDType("Q9_9")
	assert.Error(t, err)
	d, err := ParseDType("MXFP4")
	require.NoError(t, err)
	assert.Equal(t, MXFP4, d)
	n, err := Q4_K.RowBytes(512)
	require.NoError(t, err)
	assert.Equal(t, 288, n)
}

func TestRopeFreqs(t *testing.T) {
	f, err := RopeInvFreq(10000, 8, nil)
	require.NoError(t, err)
	for i, v := range f {
		assert.InDelta(t, math.Pow(10000, -float64(2*i)/8), v, 1e-6)
	}
	f2, err := RopeInvFreq(10000, 8, []float32{1, 2, 4, 8})
	require.NoError(t, err)
	assert.InDelta(t, f[3]/8, f2[3], 1e-9)
	_, err = RopeInvFreq(10000, 7, nil)
	assert.Error(t, err)
	_, err = RopeInvFreq(10000, 8, []float32{1})
	assert.Error(t, err)

	// YaRN: high-frequency dims keep their frequency, low-frequency dims are
	// divided by the factor; the attention factor is 0.1 ln(32) + 1.
	y, attn, err := YaRNInvFreq(150000, 64, YaRN{Factor: 32, OrigContext: 4096})
	require.NoError(t, err)
	assert.InDelta(t, 0.1*math.Log(32)+1, attn, 1e-6)
	assert.InDelta(t, 1.0, y[0], 1e-7)
	last := math.Pow(150000, -62.0/64)
	assert.InDelta(t, last/32, y[31], last*1e-5)
	// non-truncated correction range (transformers, truncate=False): low = 8.09..., high = 17.40...
	dim := 64.0
	low := dim * math.Log(4096/(32*2*math.Pi)) / (2 * math.Log(150000))
	high := dim * math.Log(4096/(1*2*math.Pi)) / (2 * math.Log(150000))
	i := 12
	ramp := (float64(i) - low) / (high - low)
	base := math.Pow(150000, -float64(2*i)/dim)
	want := base/32*ramp + base*(1-ramp)
	assert.InDelta(t, want, y[i], want*1e-5)
}
