package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
)

// genRequest is one validated generation: a prompt and n choices.
type genRequest struct {
	model       *servedModel
	reqID       string // X-Request-Id (logs)
	genID       string // unique id prefix for the adapter
	arrival     time.Time
	prompt      []int32
	promptIndex int // for completions with several prompts
	maxTokens   int
	minTokens   int
	stopTokens  []int32 // user stop_token_ids
	ignoreEOS   bool
	stops       []string
	sampling    sdk.SamplingParams
	logprobs    bool
	topLogprobs int
	n           int
	firstIndex  int                 // choice index of the first choice
	newParser   func() OutputParser // nil: plain text
	// singleToolCall drops tool calls after the first (parallel_tool_calls false).
	singleToolCall bool
}

// tokenLogprob is the logprob information of one generated token.
type tokenLogprob struct {
	id      int32
	logprob float32
	top     []sdk.TokenLogprob
}

// choiceEvent is a piece of one choice's output, in order per choice.
type choiceEvent struct {
	index    int
	deltas   []Delta
	logprobs []tokenLogprob
	finish   string // set on the last event of the choice
	tokens   int    // generated tokens so far (on the last event: total)
	err      error  // the choice failed (last event)
}

// errStopString aborts an adapter generation after a stop string matched.
var errStopString = errors.New("stop string matched")

// plainParser passes text through as content.
type plainParser struct{}

func (plainParser) Push(_ int32, text string) []Delta {
	if text == "" {
		return nil
	}
	return []Delta{{Kind: DeltaContent, Text: text}}
}
func (plainParser) Finish(int32, bool) []Delta { return nil }

// run starts every choice of gens; events arrive on the returned channel,
// which is closed when every choice has finished. ctx cancels them all.
func (s *Server) run(ctx context.Context, gens []*genRequest, log hclog.Logger) <-chan choiceEvent {
	total := 0
	for _, g := range gens {
		total += g.n
	}
	out := make(chan choiceEvent, 16*total)
	var wg sync.WaitGroup
	for _, g := range gens {
		for i := 0; i < g.n; i++ {
			wg.Add(1)
			go func(g *genRequest, i int) {
				defer wg.Done()
				s.runChoice(ctx, g, i, out, log)
			}(g, i)
		}
	}
	go func() { wg.Wait(); close(out) }()
	return out
}

func (s *Server) runChoice(ctx context.Context, g *genRequest, i int, out chan<- choiceEvent, log hclog.Logger) {
	m := g.model
	index := g.firstIndex + i
	id := fmt.Sprintf("%s-%d", g.genID, i)
	send := func(ev choiceEvent) bool {
		ev.index = index
		select {
		case out <- ev:
			return true
		case <-ctx.Done():
			return false
		}
	}

	stopSet := map[int32]bool{}
	var stopTokens []int32
	if !g.ignoreEOS {
		for _, t := range m.Tokenizer.EndOfGeneration() {
			stopSet[t] = true
			stopTokens = append(stopTokens, t)
		}
	}
	for _, t := range g.stopTokens {
		if !stopSet[t] {
			stopSet[t] = true
			stopTokens = append(stopTokens, t)
		}
	}
	sampling := g.sampling
	if sampling.HasSeed && i > 0 {
		sampling.Seed += uint64(i) // distinct but reproducible choices
	}
	req := sdk.GenerateRequest{
		ID: id, Prompt: g.prompt, MaxTokens: g.maxTokens, MinTokens: g.minTokens,
		StopTokens: stopTokens, Sampling: sampling, Logprobs: g.logprobs, TopLogprobs: g.topLogprobs,
	}

	var parser OutputParser = plainParser{}
	if g.newParser != nil {
		parser = g.newParser()
	}
	dec := m.Tokenizer.NewStreamDecoder()
	matcher := newStopMatcher(g.stops)
	generated := 0
	lastTok := time.Time{}
	finish := ""
	sawToolCall := false
	var pendingLP []tokenLogprob

	// process turns parser deltas into released deltas (stop strings applied).
	process := func(ds []Delta) (rel []Delta, stopped bool) {
		for _, d := range ds {
			switch d.Kind {
			case DeltaContent:
				if stopped {
					continue
				}
				txt, st := matcher.push(d.Text)
				if txt != "" {
					rel = append(rel, Delta{Kind: DeltaContent, Text: txt})
				}
				stopped = st
			case DeltaToolCall:
				if sawToolCall && g.singleToolCall {
					continue
				}
				sawToolCall = true
				rel = append(rel, d)
			default:
				if !stopped {
					rel = append(rel, d)
				}
			}
		}
		return rel, stopped
	}
	closeOut := func(stopToken int32, stoppedByToken bool) []Delta {
		var ds []Delta
		if txt := dec.Flush(); txt != "" {
			ds = append(ds, parser.Push(-1, txt)...)
		}
		ds = append(ds, parser.Finish(stopToken, stoppedByToken)...)
		rel, st := process(ds)
		if !st {
			if txt := matcher.flush(); txt != "" {
				rel = append(rel, Delta{Kind: DeltaContent, Text: txt})
			}
		}
		return rel
	}

	// A client disconnect or shutdown cancels ctx; tell the adapter too, so it
	// frees the sequence within one step even if the cancel races the stream.
	cancelAdapter := func() {
		cctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := m.Adapter.Cancel(cctx, id); err != nil && !errors.Is(err, context.Canceled) {
			log.Debug("adapter cancel", "gen_id", id, "error", err)
		}
	}
	stopCancel := context.AfterFunc(ctx, cancelAdapter)
	defer func() {
		// stop can win against a cancel that is still propagating; then the
		// AfterFunc never runs and the cancel is sent here.
		if stopCancel() && ctx.Err() != nil {
			cancelAdapter()
		}
	}()

	emit := func(c sdk.Chunk) error {
		now := time.Now()
		var ds []Delta
		var stopTok int32
		endedByToken := false
		for k, t := range c.Tokens {
			generated++
			if lastTok.IsZero() {
				if generated == 1 && i == 0 {
					m.metrics.ttft.Observe(now.Sub(g.arrival).Seconds())
				}
			} else if k == 0 {
				gap := now.Sub(lastTok).Seconds() / float64(len(c.Tokens))
				for range c.Tokens {
					m.metrics.itl.Observe(gap)
				}
			}
			if g.logprobs && k < len(c.Info) {
				pendingLP = append(pendingLP, tokenLogprob{id: t, logprob: c.Info[k].Logprob, top: c.Info[k].Top})
			}
			if c.Finish == sdk.FinishStop && k == len(c.Tokens)-1 && stopSet[t] {
				stopTok, endedByToken = t, true
				continue
			}
			ds = append(ds, parser.Push(t, dec.Add(t))...)
		}
		if len(c.Tokens) > 0 {
			lastTok = now
		}
		rel, stopped := process(ds)
		if stopped {
			finish = "stop"
			rel = append(rel, closeOutAfterStop(parser)...)
		} else if c.Finish != sdk.FinishNone {
			switch c.Finish {
			case sdk.FinishStop:
				finish = "stop"
			case sdk.FinishLength:
				finish = "length"
			case sdk.FinishCanceled:
				finish = "abort"
			default:
				finish = string(c.Finish)
			}
			rel = append(rel, closeOut(stopTok, endedByToken)...)
		}
		if len(rel) > 0 || len(pendingLP) > 0 {
			if !send(choiceEvent{deltas: rel, logprobs: pendingLP, tokens: generated}) {
				return ctx.Err()
			}
			pendingLP = nil
		}
		if stopped {
			return errStopString
		}
		return nil
	}

	err := m.Adapter.Generate(ctx, req, emit)
	m.metrics.genTok.Add(float64(generated))
	switch {
	case errors.Is(err, errStopString):
		err = nil
	case err == nil && finish == "":
		err = fmt.Errorf("adapter ended generation %s without a finish reason", id)
	}
	if err != nil {
		if ctx.Err() != nil {
			send(choiceEvent{finish: "abort", tokens: generated, err: ctx.Err()})
			return
		}
		log.Error("generation failed", "gen_id", id, "error", err)
		send(choiceEvent{finish: "error", tokens: generated, err: adapterError(err)})
		return
	}
	if finish == "stop" && sawToolCall {
		finish = "tool_calls"
	}
	send(choiceEvent{finish: finish, tokens: generated})
}

// closeOutAfterStop lets a parser flush after a stop string ended the
// generation. Content after the stop string is dropped; tool calls already
// complete are kept by the caller.
func closeOutAfterStop(p OutputParser) []Delta {
	var rel []Delta
	for _, d := range p.Finish(0, false) {
		if d.Kind == DeltaToolCall {
			rel = append(rel, d)
		}
	}
	return rel
}

// adapterError maps adapter errors to API errors.
func adapterError(err error) *APIError {
	var oom *sdk.OutOfMemoryError
	switch {
	case errors.Is(err, sdk.ErrContextTooLong):
		return badParam("max_tokens", "the request does not fit the model's context: %v", err)
	case errors.Is(err, sdk.ErrInvalidArgument):
		return badParam("", "the adapter rejected the request: %v", err)
	case errors.Is(err, sdk.ErrBusy):
		return unavailable("adapter_busy", fmt.Sprintf("the model is busy: %v", err), time.Second)
	case errors.As(err, &oom):
		return unavailable("out_of_memory", fmt.Sprintf("the model ran out of memory: %v", err), 5*time.Second)
	case errors.Is(err, sdk.ErrNotLoaded):
		return unavailable("model_not_loaded", fmt.Sprintf("the model is not loaded: %v", err), 5*time.Second)
	}
	return &APIError{Status: http.StatusInternalServerError, Type: "server_error", Code: "generation_failed",
		Message: fmt.Sprintf("generation failed: %v", err)}
}

// tokenString renders one token for logprobs: its text, or bytes:\xNN for a
// token that is not valid UTF-8 on its own (as vLLM does).
func tokenString(tok Tokenizer, id int32) (string, []int) {
	text := tok.Decode([]int32{id})
	b := make([]int, len(text))
	for i := 0; i < len(text); i++ {
		b[i] = int(text[i])
	}
	if utf8.ValidString(text) {
		return text, b
	}
	var sb strings.Builder
	sb.WriteString("bytes:")
	for i := 0; i < len(text); i++ {
		fmt.Fprintf(&sb, "\\x%02x", text[i])
	}
	return sb.String(), b
}
