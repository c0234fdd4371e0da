package nn

import (
	"bufio"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
)

func TestParseMemAvailable(t *testing.T) {
	parse := func(s string) int64 { return parseMemAvailable(bufio.NewScanner(strings.NewReader(s))) }
	assert.Equal(t, int64(2048)<<10, parse("MemTotal:  9999 kB\nMemFree: 1 kB\nMemAvailable:    2048 kB\n"))
	assert.Zero(t, parse("MemTotal: 9999 kB\n"), "no MemAvailable line")
	assert.Zero(t, parse("MemAvailable: lots kB\n"))
	assert.Zero(t, parse("MemAvailable: 5 MB\n"), "unknown unit")
	assert.Zero(t, parse("MemAvailable:\n"))
	assert.Zero(t, parse(""))
}

func TestKVBlockBytesMatchesCache(t *testing.T) {
	b := cpu.New(1)
	kv, err := NewKVCache(b, ml.F32, 3, 16, 2, 8, 4)
	require.NoError(t, err)
	defer kv.Free(b)
	assert.Equal(t, kv.BlockBytes(), KVBlockBytes(ml.F32, 3, 16, 2, 8))
	// F16/BF16 caches are GPU-only; their size is half (KVCache.BlockBytes's rule)
	half := &KVCache{DType: ml.F16, K: make([]ml.Tensor, 3), HeadDim: 16, KVHeads: 2, BlockSize: 8}
	assert.Equal(t, half.BlockBytes(), KVBlockBytes(ml.F16, 3, 16, 2, 8))
	assert.Equal(t, KVBlockBytes(ml.F32, 3, 16, 2, 8)/2, KVBlockBytes(ml.BF16, 3, 16, 2, 8))
}

func TestRunnerBytesMatchesRunner(t *testing.T) {
	for _, c := range []struct{ width, vocab, ctx, bs, maxTok int }{
		{64, 300, 256, 16, 0}, {32, 1 << 20, 1000, 16, 64}, {8, 10, 1 << 20, 1, 4096},
	} {
		b := &countAlloc{Backend: cpu.New(1)}
		spec := RunnerConfig{Width: c.width, MaxTokens: c.maxTok}
		spec.Spec.VocabSize, spec.Spec.ContextLength, spec.Spec.BlockSize = c.vocab, c.ctx, c.bs
		r, err := NewRunner(b, nil, nil, spec)
		require.NoError(t, err)
		r.freeStaging()
		assert.Equal(t, b.n, RunnerBytes(c.width, c.vocab, c.ctx, c.bs, c.maxTok), "%+v", c)
	}
}

type countAlloc struct {
	ml.Backend
	n int64
}

func (c *countAlloc) Alloc(dt ml.DType, shape ...int) (ml.Tensor, error) {
	t, err := c.Backend.Alloc(dt, shape...)
	if err == nil {
		c.n += 4 * int64(t.Len()) // F32 and I32
	}
	return t, err
}

func TestVectorName(t *testing.T) {
	for _, n := range []string{"output_norm.weight", "blk.0.attn_q.bias", "blk.3.attn_sinks.weight", "blk.1.post_attention_norm.weight", "blk.0.ffn_gate_exps.bias"} {
		assert.True(t, VectorName(n), n)
	}
	for _, n := range []string{"token_embd.weight", "blk.0.attn_q.weight", "rope_freqs.weight", "blk.0.ffn_gate_exps.weight"} {
		assert.False(t, VectorName(n), n)
	}
}
