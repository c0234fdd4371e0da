package server

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// outcome is how a served request ended, for metrics.
type outcome struct {
	finish  string // finish reason of the first choice
	aborted bool   // client went away or shutdown canceled it
	err     error  // adapter failure
}

// execute admits the request, runs its generations and hands the events to
// consume, which writes the response. It does the accounting shared by both
// completion endpoints (in-flight tracking, queue, metrics, logs).
func (s *Server) execute(w http.ResponseWriter, r *http.Request, m *servedModel, gens []*genRequest,
	consume func(ctx context.Context, events <-chan choiceEvent) outcome) {
	s.inflight.Add(1)
	defer s.inflight.Add(-1)
	reqID := requestID(r.Context())
	log := s.log.With("request_id", reqID, "model", m.ID)

	// The generation context ends with the client connection, or when a
	// shutdown stops waiting for in-flight requests.
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	stop := context.AfterFunc(s.baseCtx, cancel)
	defer stop()

	arrival := time.Now()
	release, waited, err := s.admit(ctx, m)
	if err != nil {
		if ctx.Err() != nil {
			log.Info("client went away while queued", "queued", waited)
			return
		}
		writeError(w, err)
		return
	}
	defer release()

	// Adapter-side ids carry the request id, so adapter logs can be matched
	// with the host's; the random part keeps them unique if a client reuses one.
	genID := reqID + "." + newID()[:8]
	promptTokens := 0
	for _, g := range gens {
		g.model, g.reqID, g.genID, g.arrival = m, reqID, genID+"-"+strconv.Itoa(g.promptIndex), arrival
		promptTokens += len(g.prompt)
	}
	m.metrics.promptTok.Add(float64(promptTokens))
	log.Debug("generation started", "prompt_tokens", promptTokens, "choices", len(gens)*gens[0].n, "queued", waited)

	o := consume(ctx, s.run(ctx, gens, log))
	m.metrics.e2e.Observe(time.Since(arrival).Seconds())
	switch {
	case o.aborted:
		m.metrics.aborted.Inc()
		log.Info("generation aborted", "reason", context.Cause(ctx))
	case o.err != nil:
		m.metrics.failed.Inc()
	default:
		m.metrics.success(o.finish)
	}
}

// collect drains events into per-choice results (non-streamed responses).
type choiceResult struct {
	content    string
	reasoning  string
	toolCalls  []Delta
	logprobs   []tokenLogprob
	finish     string
	tokens     int
	hasContent bool
}

// collectAll reads every event. It returns the results indexed by choice,
// whether the request was aborted, and the first adapter error.
func collectAll(ctx context.Context, events <-chan choiceEvent, total int) ([]choiceResult, bool, error) {
	res := make([]choiceResult, total)
	// text grows in builders: += per event would copy it once per token
	content := make([]strings.Builder, total)
	reasoning := make([]strings.Builder, total)
	var firstErr error
	aborted := false
	for ev := range events {
		if ev.index < 0 || ev.index >= total {
			continue
		}
		c := &res[ev.index]
		for _, d := range ev.deltas {
			switch d.Kind {
			case DeltaContent:
				content[ev.index].WriteString(d.Text)
				c.hasContent = true
			case DeltaReasoning:
				reasoning[ev.index].WriteString(d.Text)
			case DeltaToolCall:
				c.toolCalls = append(c.toolCalls, d)
			}
		}
		c.logprobs = append(c.logprobs, ev.logprobs...)
		if ev.tokens > c.tokens {
			c.tokens = ev.tokens
		}
		if ev.finish != "" {
			c.finish = ev.finish
		}
		if ev.err != nil {
			if ctx.Err() != nil || errors.Is(ev.err, context.Canceled) {
				aborted = true
			} else if firstErr == nil {
				firstErr = ev.err
			}
		}
	}
	for i := range res {
		res[i].content, res[i].reasoning = content[i].String(), reasoning[i].String()
	}
	if ctx.Err() != nil {
		aborted = true
	}
	return res, aborted, firstErr
}
