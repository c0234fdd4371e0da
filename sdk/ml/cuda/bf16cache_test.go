package cuda

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

func TestBF16CacheEnv(t *testing.T) {
	for _, c := range []struct {
		v, r      string
		on        bool
		cap, res  int64
		wantError bool
	}{
		{"", "", true, 0, -1, false},
		{"off", "", false, 0, -1, false},
		{"0", "", false, 0, -1, false},
		{"on", "", true, 0, -1, false},
		{"auto", "2048", true, 0, 2 << 30, false},
		{" 512 ", "", true, 512 << 20, -1, false},
		{"on", "0", true, 0, 0, false},
		{"-5", "", false, 0, -1, true},
		{"lots", "", false, 0, -1, true},
		{"on", "x", false, 0, -1, true},
		{"on", "-1", false, 0, -1, true},
	} {
		on, cp, res, err := bf16CacheEnv(c.v, c.r)
		if c.wantError {
			require.Error(t, err, "%q %q", c.v, c.r)
			continue
		}
		require.NoError(t, err, "%q %q", c.v, c.r)
		assert.Equal(t, c.on, on, "%q", c.v)
		assert.Equal(t, c.cap, cp, "%q", c.v)
		assert.Equal(t, c.res, res, "%q", c.r)
	}
}

// largeNPath must agree with MatMul's routing (ops.go) for the default
// settings: the GEMV / v9 / qgemm below denseV2From, the large-n path from
// it, and for F16 / K-quants above 8 tokens.
func TestLargeNPath(t *testing.T) {
	defer func(a, b, c bool, d int) { gemmV1, gemvPin9, gemvWide, denseV2From = a, b, c, d }(gemmV1, gemvPin9, gemvWide, denseV2From)
	gemmV1, gemvPin9, gemvWide, denseV2From = false, false, true, 17
	for n, want := range map[int]bool{1: false, 8: false, 9: false, 16: false, 17: true, 64: true, 2048: true} {
		assert.Equal(t, want, largeNPath(ml.Q8_0, n), "Q8_0 n=%d", n)
	}
	assert.True(t, largeNPath(ml.F16, 9))
	assert.True(t, largeNPath(ml.Q6_K, 12))
	assert.False(t, largeNPath(ml.F16, 8))
	gemvPin9 = true // ORCH_CUDA_GEMV=v9: v9 up to 64
	assert.False(t, largeNPath(ml.Q8_0, 64))
	assert.True(t, largeNPath(ml.Q8_0, 65))
	gemvPin9, gemmV1 = false, true // ORCH_CUDA_GEMM=v1: every n > 8
	assert.True(t, largeNPath(ml.MXFP4, 9))
	gemmV1, denseV2From = false, 65 // session 5's border: qgemm to 64
	assert.False(t, largeNPath(ml.Q8_0, 64))
	assert.True(t, largeNPath(ml.Q8_0, 65))
	assert.True(t, bf16Eligible(ml.Q8_0) && bf16Eligible(ml.F16) && !bf16Eligible(ml.F32) && !bf16Eligible(ml.BF16))
}
