package ml

import (
	"fmt"
	"math"
)

// RopeInvFreq returns the per-pair inverse frequencies base^(-2i/dims) for
// i < dims/2, each divided by divisors[i] when divisors is non-nil (llama.cpp's
// rope_freqs.weight "frequency factors", which is how GGUF stores Llama 3's
// rope scaling). Values are computed as transformers does (float32 pow).
func RopeInvFreq(base float64, dims int, divisors []float32) ([]float32, error) {
	if dims <= 0 || dims%2 != 0 {
		return nil, fmt.Errorf("ml: rope dims %d must be positive and even", dims)
	}
	if base <= 1 {
		return nil, fmt.Errorf("ml: rope base %g must be > 1", base)
	}
	if divisors != nil && len(divisors) != dims/2 {
		return nil, fmt.Errorf("ml: rope frequency factors: %d values, want %d", len(divisors), dims/2)
	}
	out := make([]float32, dims/2)
	for i := range out {
		// transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), in float32
		e := float32(2*i) / float32(dims)
		f := float32(1) / float32(math.Pow(float64(float32(base)), float64(e)))
		if divisors != nil {
			if !(divisors[i] > 0) {
				return nil, fmt.Errorf("ml: rope frequency factor %d is %g, must be > 0", i, divisors[i])
			}
			f /= divisors[i]
		}
		out[i] = f
	}
	return out, nil
}

// YaRN holds YaRN context-extension parameters (transformers' "yarn"
// rope_scaling).
type YaRN struct {
	Factor      float64 // context scaling factor (gpt-oss: 32)
	OrigContext int     // original_max_position_embeddings (gpt-oss: 4096)
	BetaFast    float64 // 0 means 32
	BetaSlow    float64 // 0 means 1
	Truncate    bool    // round the correction range (llama.cpp, transformers default); gpt-oss uses false
	AttnFactor  float64 // 0 means 0.1*ln(Factor)+1
}

// YaRNInvFreq computes YaRN's blended inverse frequencies and attention factor
// exactly as transformers' _compute_yarn_parameters (the factor multiplies
// cos and sin: use it as Rope.Scale).
func YaRNInvFreq(base float64, dims int, y YaRN) ([]float32, float32, error) {
	if y.Factor <= 0 || y.OrigContext <= 0 {
		return nil, 0, fmt.Errorf("ml: yarn factor %g / original context %d must be > 0", y.Factor, y.OrigContext)
	}
	if dims <= 0 || dims%2 != 0 || base <= 1 {
		return nil, 0, fmt.Errorf("ml: yarn: dims %d must be positive even and base %g > 1", dims, base)
	}
	betaFast, betaSlow := y.BetaFast, y.BetaSlow
	if betaFast == 0 {
		betaFast = 32
	}
	if betaSlow == 0 {
		betaSlow = 1
	}
	attn := y.AttnFactor
	if attn == 0 {
		attn = 1
		if y.Factor > 1 {
			attn = 0.1*math.Log(y.Factor) + 1
		}
	}
	corrDim := func(rot float64) float64 {
		return float64(dims) * math.Log(float64(y.OrigContext)/(rot*2*math.Pi)) / (2 * math.Log(base))
	}
	low, high := corrDim(betaFast), corrDim(betaSlow)
	if y.Truncate {
		low, high = math.Floor(low), math.Ceil(high)
	}
	low = math.Max(low, 0)
	high = math.Min(high, float64(dims-1))
	if low == high {
		high += 0.001
	}
	out := make([]float32, dims/2)
	for i := range out {
		e := float32(2*i) / float32(dims)
		pos := float32(math.Pow(float64(float32(base)), float64(e)))
		extra := float32(1) / pos
		inter := float32(1) / (float32(y.Factor) * pos)
		ramp := float32((float64(i) - low) / (high - low))
		ramp = min(max(ramp, 0), 1)
		ef := 1 - ramp // extrapolation factor
		out[i] = inter*(1-ef) + extra*ef
	}
	return out, float32(attn), nil
}
