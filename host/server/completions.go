package server

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"
)

// completionPrompts reads `prompt`: a string, a list of strings, a list of
// token ids or a list of lists of token ids.
func completionPrompts(raw json.RawMessage, tok Tokenizer) ([][]int32, []string, error) {
	if rawIsNull(raw) {
		return nil, nil, badParam("prompt", "prompt is required")
	}
	vocab := tok.VocabSize()
	checkIDs := func(ids []int64, param string) ([]int32, error) {
		out := make([]int32, len(ids))
		for i, id := range ids {
			if id < 0 || int(id) >= vocab {
				return nil, badParam(param, "token id %d is outside the vocabulary (0..%d)", id, vocab-1)
			}
			out[i] = int32(id)
		}
		return out, nil
	}
	var one string
	if err := json.Unmarshal(raw, &one); err == nil {
		return [][]int32{tok.Encode(one, true, true)}, []string{one}, nil
	}
	var many []string
	if err := json.Unmarshal(raw, &many); err == nil {
		if len(many) == 0 {
			return nil, nil, badParam("prompt", "prompt list is empty")
		}
		var out [][]int32
		for _, p := range many {
			out = append(out, tok.Encode(p, true, true))
		}
		return out, many, nil
	}
	var ids []int64
	if err := json.Unmarshal(raw, &ids); err == nil {
		t, err := checkIDs(ids, "prompt")
		if err != nil {
			return nil, nil, err
		}
		return [][]int32{t}, []string{tok.Decode(t)}, nil
	}
	var lists [][]int64
	if err := json.Unmarshal(raw, &lists); err == nil {
		if len(lists) == 0 {
			return nil, nil, badParam("prompt", "prompt list is empty")
		}
		var out [][]int32
		var texts []string
		for i, l := range lists {
			t, err := checkIDs(l, fmt.Sprintf("prompt[%d]", i))
			if err != nil {
				return nil, nil, err
			}
			out = append(out, t)
			texts = append(texts, tok.Decode(t))
		}
		return out, texts, nil
	}
	return nil, nil, badParam("prompt", "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids")
}

const maxPrompts = 64

func (s *Server) handleCompletions(w http.ResponseWriter, r *http.Request) {
	var req CompletionRequest
	m := s.decodeFor(w, r, &req, func() string { return req.Model })
	if m == nil {
		return
	}
	gens, texts, err := s.prepareCompletions(&req, m)
	if err != nil {
		m.metrics.rejected("invalid")
		writeError(w, err)
		return
	}
	n := gens[0].n
	total := n * len(gens)
	id := "cmpl-" + newID()
	created := time.Now().Unix()
	promptTokens := 0
	for _, g := range gens {
		promptTokens += len(g.prompt)
	}
	echoOf := func(index int) string {
		if req.Echo {
			return texts[index/n]
		}
		return ""
	}
	if req.Stream {
		includeUsage := req.StreamOptions != nil && req.StreamOptions.IncludeUsage
		s.execute(w, r, m, gens, func(ctx context.Context, events <-chan choiceEvent) outcome {
			sse := newSSE(w)
			chunk := func(choices ...CompletionChoice) Completion {
				return Completion{ID: id, Object: "text_completion", Created: created, Model: m.ID, Choices: choices}
			}
			if req.Echo {
				for i := 0; i < total; i++ {
					_ = sse.send(chunk(CompletionChoice{Index: i, Text: echoOf(i)}))
				}
			}
			tokens := make([]int, total)
			offsets := make([]int, total)
			finished := make([]bool, total)
			first := ""
			var firstErr error
			for ev := range events {
				if ev.tokens > tokens[ev.index] {
					tokens[ev.index] = ev.tokens
				}
				text := ""
				for _, d := range ev.deltas {
					if d.Kind == DeltaContent {
						text += d.Text
					}
				}
				if text != "" || len(ev.logprobs) > 0 {
					c := CompletionChoice{Index: ev.index, Text: text}
					if gens[0].logprobs {
						c.Logprobs = completionLogprobs(m.Tokenizer, ev.logprobs, offsets[ev.index])
					}
					offsets[ev.index] += len(text)
					_ = sse.send(chunk(c))
				}
				if ev.err != nil && ctx.Err() == nil && firstErr == nil {
					firstErr = ev.err
					sse.sendError(ev.err)
				}
				if ev.finish != "" && ev.err == nil {
					f := ev.finish
					if ev.index == 0 {
						first = f
					}
					finished[ev.index] = true
					_ = sse.send(chunk(CompletionChoice{Index: ev.index, FinishReason: &f}))
				}
			}
			if ctx.Err() != nil || sse.err != nil {
				if s.shuttingDown() {
					for i, done := range finished {
						if !done {
							f := "abort"
							_ = sse.send(chunk(CompletionChoice{Index: i, FinishReason: &f}))
						}
					}
					sse.done()
				}
				return outcome{aborted: true}
			}
			if includeUsage {
				u := &Usage{PromptTokens: promptTokens}
				for _, t := range tokens {
					u.CompletionTokens += t
				}
				u.TotalTokens = u.PromptTokens + u.CompletionTokens
				c := chunk()
				c.Choices = []CompletionChoice{}
				c.Usage = u
				_ = sse.send(c)
			}
			sse.done()
			return outcome{finish: first, err: firstErr}
		})
		return
	}
	s.execute(w, r, m, gens, func(ctx context.Context, events <-chan choiceEvent) outcome {
		res, aborted, ferr := collectAll(ctx, events, total)
		if aborted {
			s.writeShutdownError(w)
			return outcome{aborted: true}
		}
		if ferr != nil {
			writeError(w, ferr)
			return outcome{err: ferr}
		}
		resp := Completion{ID: id, Object: "text_completion", Created: created, Model: m.ID,
			Usage: &Usage{PromptTokens: promptTokens}}
		for i, c := range res {
			f := c.finish
			ch := CompletionChoice{Index: i, Text: echoOf(i) + c.content, FinishReason: &f}
			if gens[0].logprobs {
				ch.Logprobs = completionLogprobs(m.Tokenizer, c.logprobs, len(echoOf(i)))
			}
			resp.Choices = append(resp.Choices, ch)
			resp.Usage.CompletionTokens += c.tokens
		}
		resp.Usage.TotalTokens = resp.Usage.PromptTokens + resp.Usage.CompletionTokens
		writeJSON(w, http.StatusOK, resp)
		return outcome{finish: res[0].finish}
	})
}

// prepareCompletions validates a completion request; one genRequest per prompt.
func (s *Server) prepareCompletions(req *CompletionRequest, m *servedModel) ([]*genRequest, []string, error) {
	if req.Suffix != nil && *req.Suffix != "" {
		return nil, nil, unsupportedParam("suffix", "suffix (fill-in-the-middle) is not supported")
	}
	prompts, texts, err := completionPrompts(req.Prompt, m.Tokenizer)
	if err != nil {
		return nil, nil, err
	}
	if len(prompts) > maxPrompts {
		return nil, nil, badParam("prompt", "at most %d prompts per request, got %d", maxPrompts, len(prompts))
	}
	lp, top := false, 0
	if req.Logprobs != nil {
		top = *req.Logprobs
		if err := checkLogprobs(m, "logprobs", top); err != nil {
			return nil, nil, err
		}
		lp = true
		if req.Echo {
			return nil, nil, unsupportedParam("echo", "echo together with logprobs needs prompt logprobs, which this server does not return")
		}
	}
	var gens []*genRequest
	for i, p := range prompts {
		g := &genRequest{prompt: p, promptIndex: i, logprobs: lp, topLogprobs: top}
		param := "prompt"
		if len(prompts) > 1 {
			param = fmt.Sprintf("prompt[%d]", i)
		}
		if err := commonParams(&req.samplingFields, req.MaxTokens, m, g, param); err != nil {
			return nil, nil, err
		}
		g.firstIndex = i * g.n
		gens = append(gens, g)
	}
	return gens, texts, nil
}

// completionLogprobs renders logprobs in the legacy completions format.
func completionLogprobs(tok Tokenizer, lps []tokenLogprob, offset int) *CompletionLogprobs {
	out := &CompletionLogprobs{Tokens: []string{}, TokenLogprobs: []float64{}, TopLogprobs: []map[string]float64{}, TextOffset: []int{}}
	for _, lp := range lps {
		text, _ := tokenString(tok, lp.id)
		out.Tokens = append(out.Tokens, text)
		out.TokenLogprobs = append(out.TokenLogprobs, float64(lp.logprob))
		top := map[string]float64{}
		for _, t := range lp.top {
			tt, _ := tokenString(tok, t.Token)
			if _, dup := top[tt]; !dup {
				top[tt] = float64(t.Logprob)
			}
		}
		out.TopLogprobs = append(out.TopLogprobs, top)
		out.TextOffset = append(out.TextOffset, offset)
		offset += len(tok.Decode([]int32{lp.id}))
	}
	return out
}
