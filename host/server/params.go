package server

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"

	"github.com/llama-orch/orch/sdk"
)

// Limits on request parameters (OpenAI's where it has one).
const (
	maxN           = 128
	maxTopLogprobs = 20
	maxStops       = 16
)

// commonParams validates the fields both endpoints share and fills g.
// maxTokens is the already chosen max_tokens/max_completion_tokens pointer.
func commonParams(f *samplingFields, maxTokens *int, m *servedModel, g *genRequest, promptParam string) error {
	vocab := m.Tokenizer.VocabSize()
	sp := sdk.SamplingParams{Temperature: 1, TopP: 1}
	if f.Temperature != nil {
		t := *f.Temperature
		if math.IsNaN(t) || t < 0 || t > 2 {
			return badParam("temperature", "temperature must be between 0 and 2, got %v", t)
		}
		sp.Temperature = float32(t)
	}
	if f.TopP != nil {
		p := *f.TopP
		if math.IsNaN(p) || p <= 0 || p > 1 {
			return badParam("top_p", "top_p must be in (0, 1], got %v", p)
		}
		sp.TopP = float32(p)
	}
	if f.TopK != nil {
		k := *f.TopK
		if k < -1 {
			return badParam("top_k", "top_k must be -1 or 0 (off) or a positive number, got %d", k)
		}
		if k > 0 {
			sp.TopK = k
		}
	}
	if f.MinP != nil {
		p := *f.MinP
		if math.IsNaN(p) || p < 0 || p > 1 {
			return badParam("min_p", "min_p must be between 0 and 1, got %v", p)
		}
		sp.MinP = float32(p)
	}
	if f.Seed != nil {
		sp.Seed, sp.HasSeed = uint64(*f.Seed), true
	}
	for _, pp := range []struct {
		name string
		v    *float64
		dst  *float32
	}{{"presence_penalty", f.PresencePenalty, &sp.PresencePenalty}, {"frequency_penalty", f.FrequencyPenalty, &sp.FrequencyPenalty}} {
		if pp.v != nil {
			if math.IsNaN(*pp.v) || *pp.v < -2 || *pp.v > 2 {
				return badParam(pp.name, "%s must be between -2 and 2, got %v", pp.name, *pp.v)
			}
			*pp.dst = float32(*pp.v)
		}
	}
	if f.RepetitionPenalty != nil {
		r := *f.RepetitionPenalty
		if math.IsNaN(r) || r <= 0 || r > 10 {
			return badParam("repetition_penalty", "repetition_penalty must be in (0, 10], got %v", r)
		}
		sp.RepetitionPenalty = float32(r)
	}
	if len(f.LogitBias) > 0 {
		sp.LogitBias = make(map[int32]float32, len(f.LogitBias))
		for k, v := range f.LogitBias {
			id, err := strconv.ParseInt(k, 10, 32)
			if err != nil || id < 0 || int(id) >= vocab {
				return badParam("logit_bias", "logit_bias key %q is not a token id of this model (0..%d)", k, vocab-1)
			}
			if math.IsNaN(v) || v < -100 || v > 100 {
				return badParam("logit_bias", "logit_bias value for %s must be between -100 and 100, got %v", k, v)
			}
			sp.LogitBias[int32(id)] = float32(v)
		}
	}
	g.sampling = sp

	g.n = 1
	if f.N != nil {
		if *f.N < 1 || *f.N > maxN {
			return badParam("n", "n must be between 1 and %d, got %d", maxN, *f.N)
		}
		g.n = *f.N
	}
	if len(f.Stop) > maxStops {
		return badParam("stop", "at most %d stop strings are supported, got %d", maxStops, len(f.Stop))
	}
	for _, s := range f.Stop {
		if s == "" {
			return badParam("stop", "stop strings must not be empty")
		}
	}
	g.stops = f.Stop
	for _, t := range f.StopTokenIDs {
		if t < 0 || int(t) >= vocab {
			return badParam("stop_token_ids", "stop token id %d is outside the vocabulary (0..%d)", t, vocab-1)
		}
		g.stopTokens = append(g.stopTokens, int32(t))
	}
	if f.StreamOptions != nil && !f.Stream {
		return badParam("stream_options", "stream_options is only allowed when stream is true")
	}
	g.ignoreEOS = f.IgnoreEOS
	if f.MinTokens < 0 {
		return badParam("min_tokens", "min_tokens must be >= 0, got %d", f.MinTokens)
	}
	g.minTokens = f.MinTokens

	// Context length: prompt + max_tokens must fit.
	ctxLen := m.Info.ContextLength
	if len(g.prompt) == 0 {
		return badParam(promptParam, "the prompt is empty after tokenization")
	}
	if ctxLen > 0 && len(g.prompt) >= ctxLen {
		return &APIError{Status: 400, Type: "invalid_request_error", Param: promptParam, Code: "context_length_exceeded",
			Message: fmt.Sprintf("This model's maximum context length is %d tokens. However, your prompt has %d tokens, leaving no room for a completion.", ctxLen, len(g.prompt))}
	}
	if maxTokens != nil {
		if *maxTokens < 1 {
			return badParam("max_tokens", "max_tokens must be at least 1, got %d", *maxTokens)
		}
		if ctxLen > 0 && len(g.prompt)+*maxTokens > ctxLen {
			return &APIError{Status: 400, Type: "invalid_request_error", Param: "max_tokens", Code: "context_length_exceeded",
				Message: fmt.Sprintf("This model's maximum context length is %d tokens. However, you requested %d tokens (%d in the prompt, %d for the completion). Please reduce the prompt or max_tokens.",
					ctxLen, len(g.prompt)+*maxTokens, len(g.prompt), *maxTokens)}
		}
		g.maxTokens = *maxTokens
	} else {
		g.maxTokens = ctxLen - len(g.prompt)
		if ctxLen <= 0 {
			g.maxTokens = 16
		}
	}
	if g.minTokens > g.maxTokens {
		return badParam("min_tokens", "min_tokens (%d) must not exceed max_tokens (%d)", g.minTokens, g.maxTokens)
	}
	return nil
}

// checkLogprobs validates a logprobs request against the model.
func checkLogprobs(m *servedModel, param string, top int) error {
	if !m.hasFeature("logprobs") {
		return unsupportedParam(param, "model %s (adapter without the \"logprobs\" feature) cannot return logprobs", m.ID)
	}
	if top < 0 || top > maxTopLogprobs {
		return badParam(param, "%s must be between 0 and %d, got %d", param, maxTopLogprobs, top)
	}
	return nil
}

// rawIsNull reports whether a raw JSON value is absent or null.
func rawIsNull(r json.RawMessage) bool {
	return len(r) == 0 || string(r) == "null"
}
