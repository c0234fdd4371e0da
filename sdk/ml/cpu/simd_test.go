package cpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// withAVX runs fn with the vector kernels on or off.
func withAVX(on bool, fn func()) {
	old := useAVX
	useAVX = on
	defer func() { useAVX = old }()
	fn()
}

func bits(v []float32) []uint32 {
	out := make([]uint32, len(v))
	for i, f := range v {
		out[i] = math.Float32bits(f)
	}
	return out
}

// The AVX2 kernels give bit-identical results to the portable code for
// every weight type, batch size (1..9, so every 4-row remainder), output
// count (groups of 4 weight rows plus a remainder, several workers) and,
// for F32, widths that are not a multiple of 8.
func TestAVXMatchesPortable(t *testing.T) {
	if !useAVX {
		t.Skip("no AVX2/F16C on this machine")
	}
	rng := rand.New(rand.NewPCG(31, 32))
	for _, threads := range []int{1, 3} {
		b := New(threads)
		for _, dt := range ml.WeightDTypes {
			ins := []int{256, 512}
			if dt == ml.F32 || dt == ml.F16 || dt == ml.BF16 {
				ins = append(ins, 13, 7, 40)
			}
			for _, in := range ins {
				out := 11
				wb, _ := randWeight(t, rng, dt, in, out)
				w, err := b.Weight("w", dt, []int{in, out}, wb)
				require.NoError(t, err)
				bias := tensorF32(t, b, randF32(rng, out, 1), out)
				for n := 1; n <= 9; n++ {
					name := fmt.Sprintf("t%d %s in=%d n=%d", threads, dt, in, n)
					x := tensorF32(t, b, randF32(rng, in*n, 1), in, n)
					run := func(on bool) []float32 {
						dst, err := b.Alloc(ml.F32, out, n)
						require.NoError(t, err)
						withAVX(on, func() { b.MatMul(dst, x, w, bias) })
						require.NoError(t, b.Sync(), name)
						return read(t, b, dst)
					}
					want := run(false)
					got := run(true)
					require.Equal(t, bits(want), bits(got), name)
				}
			}
		}
	}
}

// dot itself (used by attention too) matches for every length 1..70.
func TestDotAVXMatchesPortable(t *testing.T) {
	if !useAVX {
		t.Skip("no AVX2/F16C on this machine")
	}
	rng := rand.New(rand.NewPCG(33, 34))
	for n := 1; n <= 70; n++ {
		a, x := randF32(rng, n, 1), randF32(rng, n+3, 1)
		var want, got float32
		withAVX(false, func() { want = dot(a, x) })
		withAVX(true, func() { got = dot(a, x) })
		require.Equal(t, math.Float32bits(want), math.Float32bits(got), "n=%d", n)
		var four [4]float32
		xs := randF32(rng, 3*(n+5)+n, 1)
		dot4(a, xs, n+5, &four)
		for r := range 4 {
			withAVX(false, func() { want = dot(a, xs[r*(n+5):]) })
			require.Equal(t, math.Float32bits(want), math.Float32bits(four[r]), "dot4 n=%d r=%d", n, r)
		}
	}
}

// The vector F16 and Q8_0 decoders equal ml.DequantizeRow for random bit
// patterns (every scale, subnormals included; NaN/Inf skipped).
func TestDecodeRowAVX(t *testing.T) {
	if !useAVX {
		t.Skip("no AVX2/F16C on this machine")
	}
	rng := rand.New(rand.NewPCG(35, 36))
	for _, dt := range []ml.DType{ml.F16, ml.BF16, ml.Q8_0, ml.Q4_0, ml.MXFP4} {
		in := 4096
		rb, err := dt.RowBytes(in)
		require.NoError(t, err)
		raw := make([]byte, rb)
		for i := range raw {
			raw[i] = byte(rng.IntN(256))
		}
		// clear exponent-all-ones halves and scales (NaN payloads may differ)
		switch dt {
		case ml.F16, ml.Q8_0, ml.Q4_0:
			step := map[ml.DType]int{ml.F16: 2, ml.Q8_0: 34, ml.Q4_0: 18}[dt]
			for off := 0; off+1 < len(raw); off += step {
				if raw[off+1]&0x7c == 0x7c {
					raw[off+1] &^= 0x40
				}
			}
		case ml.BF16:
			for off := 0; off+1 < len(raw); off += 2 {
				if raw[off+1]&0x7f == 0x7f && raw[off]&0x80 != 0 {
					raw[off+1] &^= 0x40
				}
			}
		case ml.MXFP4:
			for off := 0; off < len(raw); off += 17 {
				if raw[off] == 255 {
					raw[off] = 254
				}
			}
			raw[0], raw[17] = 0, 1 // the e = 0 special case and the smallest normal scale
		}
		want := make([]float32, in)
		got := make([]float32, in)
		require.NoError(t, ml.DequantizeRow(dt, raw, want))
		decodeRow(dt, raw, got)
		require.Equal(t, bits(want), bits(got), "%s", dt)
	}
}
