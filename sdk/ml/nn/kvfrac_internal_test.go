package nn

import (
	"fmt"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
)

func TestFractionBlocks(t *testing.T) {
	const mib = int64(1) << 20
	// 0.5 x (20 GiB - 10 GiB - 2 GiB) / 1 MiB = 4096 blocks
	n, err := FractionBlocks("cuda:0", 0.5, 20<<30, 10<<30, 2<<30, mib, 256)
	require.NoError(t, err)
	assert.Equal(t, 4096, n)
	// floor, and not capped at what context x sequences needs
	n, err = FractionBlocks("cpu", 0.9, 1000*mib+mib/2, 0, 0, mib, 1)
	require.NoError(t, err)
	assert.Equal(t, 900, n) // 0.9 x 1000.5 = 900.45
	n, err = FractionBlocks("cpu", 1, 100*mib, 30*mib, 20*mib, mib, 50)
	require.NoError(t, err)
	assert.Equal(t, 50, n, "exactly one context fits")
	// bounded for absurd free memory
	n, err = FractionBlocks("cpu", 1, math.MaxInt64, 0, 0, 1, 1)
	require.NoError(t, err)
	assert.Equal(t, maxKVBlocks, n)

	// less than one full context: out of memory, with the numbers
	_, err = FractionBlocks("cuda:1", 0.5, 100*mib, 30*mib, 20*mib, mib, 26)
	var oom *sdk.OutOfMemoryError
	require.ErrorAs(t, err, &oom)
	assert.Equal(t, "cuda:1", oom.Device)
	assert.Equal(t, 100*mib, oom.Free)
	assert.Equal(t, 30*mib+20*mib+52*mib, oom.Requested, "free needed so that half of what is left holds 26 blocks")
	assert.Contains(t, err.Error(), "kv_cache_fraction 0.5")
	assert.Contains(t, err.Error(), "holds 25 KV blocks")
	// weights and workspace alone exceed free memory
	_, err = FractionBlocks("cpu", 1, 10*mib, 30*mib, 20*mib, mib, 1)
	require.ErrorAs(t, err, &oom)
	assert.Contains(t, err.Error(), "holds 0 KV blocks")

	for _, fr := range []float64{0, -0.1, 1.5, math.NaN()} {
		_, err = FractionBlocks("cpu", fr, 100*mib, 0, 0, mib, 1)
		assert.ErrorIs(t, err, sdk.ErrInvalidArgument, "%v", fr)
	}
	_, err = FractionBlocks("cpu", 0.5, 100*mib, 0, 0, 0, 1)
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
}

func TestSizeFraction(t *testing.T) {
	for _, fr := range []float64{-0.5, 1.01, 2, math.NaN(), math.Inf(1)} {
		_, err := Size(sdk.LoadOptions{KVCacheFraction: fr}, 1024, "cpu")
		require.ErrorIs(t, err, sdk.ErrInvalidArgument, "%v", fr)
		assert.Contains(t, err.Error(), "kv_cache_fraction")
	}
	s, err := Size(sdk.LoadOptions{KVCacheFraction: 0.75}, 1024, "cpu")
	require.NoError(t, err)
	assert.Equal(t, 0.75, s.Fraction)
	s, err = Size(sdk.LoadOptions{KVCacheFraction: 1}, 1024, "cpu")
	require.NoError(t, err)
	assert.Equal(t, 1.0, s.Fraction)
	s, err = Size(sdk.LoadOptions{}, 1024, "cpu")
	require.NoError(t, err)
	assert.Zero(t, s.Fraction)
	// an explicit num_blocks wins over the fraction
	s, err = Size(sdk.LoadOptions{KVCacheFraction: 0.5, Extra: map[string]string{"num_blocks": "7"}}, 1024, "cpu")
	require.NoError(t, err)
	assert.Zero(t, s.Fraction)
	assert.Equal(t, 7, s.NumBlocks)
}

func TestPlannedBlocks(t *testing.T) {
	oom := fmt.Errorf("x: %w", &sdk.OutOfMemoryError{Device: "cuda:0"})
	frac := layout{o: Options{NumBlocks: 900}, sz: Sizing{Fraction: 0.9}, free: 1 << 30, minBlocks: 16}
	// CPU or cuda:N: what the load allocates, and its error
	n, err := plannedBlocks(frac, true, nil)
	require.NoError(t, err)
	assert.Equal(t, 900, n)
	_, err = plannedBlocks(frac, true, oom)
	assert.ErrorIs(t, err, oom)
	// auto/cuda on a GPU with a fraction: one full context, never refused
	n, err = plannedBlocks(frac, false, nil)
	require.NoError(t, err)
	assert.Equal(t, 16, n)
	n, err = plannedBlocks(frac, false, oom)
	require.NoError(t, err)
	assert.Equal(t, 16, n)
	// other errors stay errors; without a fraction or free memory, as sized
	_, err = plannedBlocks(frac, false, sdk.ErrInvalidArgument)
	assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
	plain := layout{o: Options{NumBlocks: 64}, free: 1 << 30, minBlocks: 16}
	n, err = plannedBlocks(plain, false, nil)
	require.NoError(t, err)
	assert.Equal(t, 64, n)
	unknown := frac
	unknown.free, unknown.o.NumBlocks = 0, 64
	n, err = plannedBlocks(unknown, false, nil)
	require.NoError(t, err)
	assert.Equal(t, 64, n)
}
