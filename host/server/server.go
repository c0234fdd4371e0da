// Package server is orch-host's OpenAI-compatible HTTP API: chat and text
// completions (streamed over SSE or not), /v1/models, /health, /metrics
// (Prometheus, vLLM metric names), /tokenize and /detokenize, Bearer API keys,
// a bounded per-model request queue (429 + Retry-After when full), request ids
// and graceful shutdown.
//
// The server owns text: it renders chat prompts (ChatFormat), tokenizes
// (Tokenizer), applies stop strings and parses tool calls and reasoning out of
// the generated tokens. Models run behind sdk.Adapter and speak token ids, so
// the same code drives an in-process fake in tests and a plugin process in
// production.
//
// Behaviour worth knowing:
//
//   - Request bodies are decoded strictly: an unknown field is a 400 naming it
//     (code unsupported_parameter), as is a parameter the model cannot honour
//     (logprobs on an adapter without the "logprobs" feature, reasoning_effort
//     on a non-harmony model, suffix, json_schema, non-text content parts).
//   - `model` may be omitted when exactly one model is served; an unknown one
//     is a 404 (code model_not_found) listing the served ids.
//   - Context length: prompt >= context is a 400 on messages/prompt; prompt +
//     max_tokens > context is a 400 on max_tokens (code
//     context_length_exceeded). Without max_tokens the rest of the context is
//     the limit.
//   - Stop strings (`stop`) are matched on the content text; text that could
//     still become a stop string is held back until decided, so the stop text
//     never reaches the client. stop_token_ids (vLLM) add stop tokens; the
//     model's end-of-generation tokens stop generation unless ignore_eos;
//     min_tokens is passed to the adapter, which ignores stop tokens until then.
//     End-of-generation tokens are counted in usage but never returned as text.
//   - n > 1 runs n generations concurrently; with a seed, choice i uses seed+i
//     (distinct, reproducible choices).
//   - response_format json_object is validated as OpenAI does (the messages
//     must mention JSON) but the output is not grammar-constrained: adapters
//     sample freely, so the client must still validate the JSON.
//   - Tools: gpt-oss uses harmony (reasoning -> reasoning_content, messages to
//     functions.NAME -> tool_calls); other models use the JSON tool-call
//     convention documented on TemplateFormat. tool_choice required/named
//     prefill the assistant turn so the model continues a call;
//     parallel_tool_calls false keeps only the first call.
//   - /v1/completions prompts are encoded with BOS/EOS per the model's metadata
//     and with special-token text parsed (so raw harmony or template prompts
//     can be sent); chat prompts come from the chat format.
//   - Queue: each model admits Model.MaxRunning generations (default: the
//     adapter's MaxSequences) and lets Options.MaxQueue more wait; further
//     requests get 429 with Retry-After. A request counts once whatever its n.
//   - A client disconnect cancels the generation context (which cancels the
//     adapter's Generate stream) and also calls Adapter.Cancel with the
//     generation id (request id + random suffix), so the sequence is freed
//     within one engine step.
//   - Shutdown: new requests get 503 (code shutting_down); running ones may
//     finish until the Shutdown context ends, then they are canceled.
//   - Metrics: vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
//     vllm:e2e_request_latency_seconds, vllm:request_queue_time_seconds,
//     vllm:num_requests_running, vllm:num_requests_waiting,
//     vllm:prompt_tokens_total, vllm:generation_tokens_total,
//     vllm:kv_cache_usage_perc (from Adapter.Stats at scrape time),
//     vllm:request_success_total{finished_reason}, and orch:request_aborted_total,
//     orch:request_rejected_total{reason}, orch:request_failed_total; all with
//     model_name. For each model, success + aborted + rejected + failed counts
//     every completion request that named it and decoded (the load test checks
//     the sum against the requests it sent).
package server

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Options configure a Server.
type Options struct {
	Logger hclog.Logger
	// APIKeys, when non-empty, are the accepted Bearer tokens for /v1/*,
	// /tokenize and /detokenize (/health and /metrics stay open).
	APIKeys []string
	// MaxQueue is how many requests per model may wait for a running slot;
	// beyond it requests get 429 with Retry-After. 0 means 64; negative means
	// no waiting at all.
	MaxQueue int
	// RetryAfter is the Retry-After hint on 429/503 (default 1s).
	RetryAfter time.Duration
	// Registry receives the metrics (default: a new registry with the Go and
	// process collectors).
	Registry *prometheus.Registry
}

// Server is the HTTP API. Create it with New, add models with AddModel, mark
// it ready with SetReady and serve Handler().
type Server struct {
	opts    Options
	log     hclog.Logger
	reg     *prometheus.Registry
	metrics *metrics
	handler http.Handler

	mu     sync.RWMutex
	models map[string]*servedModel
	order  []string
	ready  atomic.Bool

	draining   atomic.Bool
	baseCtx    context.Context // canceled when shutdown gives up waiting
	baseCancel context.CancelFunc
	inflight   atomic.Int64 // generation requests being served
	genSeq     atomic.Uint64
	httpSrv    *http.Server
}

// New creates a Server with no models.
func New(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	if opts.MaxQueue == 0 {
		opts.MaxQueue = 64
	}
	if opts.RetryAfter <= 0 {
		opts.RetryAfter = time.Second
	}
	reg := opts.Registry
	if reg == nil {
		reg = prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	s := &Server{opts: opts, log: opts.Logger, reg: reg, models: map[string]*servedModel{}}
	s.baseCtx, s.baseCancel = context.WithCancel(context.Background())
	s.metrics = newMetrics(reg)

	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/chat/completions", s.auth(s.handleChat))
	mux.HandleFunc("POST /v1/completions", s.auth(s.handleCompletions))
	mux.HandleFunc("GET /v1/models", s.auth(s.handleModels))
	mux.HandleFunc("GET /v1/models/{id...}", s.auth(s.handleModel))
	mux.HandleFunc("POST /tokenize", s.auth(s.handleTokenize))
	mux.HandleFunc("POST /detokenize", s.auth(s.handleDetokenize))
	mux.HandleFunc("GET /health", s.handleHealth)
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, notFound("unknown_url", "unknown route %s %s", r.Method, r.URL.Path))
	})
	s.handler = s.withRequestID(mux)
	return s
}

// AddModel registers a loaded model under m.ID.
func (s *Server) AddModel(m Model) error {
	if m.ID == "" {
		return errors.New("server: model id is empty")
	}
	if m.Adapter == nil || m.Tokenizer == nil {
		return fmt.Errorf("server: model %q needs an adapter and a tokenizer", m.ID)
	}
	if m.Created == 0 {
		m.Created = time.Now().Unix()
	}
	running := m.MaxRunning
	if running <= 0 {
		running = m.Info.MaxSequences
	}
	if running <= 0 {
		running = 8
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.models[m.ID]; dup {
		return fmt.Errorf("server: model id %q is served twice; give the models distinct names", m.ID)
	}
	mm := s.metrics.forModel(m.ID)
	sm := &servedModel{Model: m, metrics: mm}
	sm.gate = newGate(running, s.opts.MaxQueue, func(r, w int) {
		mm.running.Set(float64(r))
		mm.waiting.Set(float64(w))
	})
	s.models[m.ID] = sm
	s.order = append(s.order, m.ID)
	s.metrics.kvCollector.add(sm)
	s.log.Info("serving model", "model", m.ID, "arch", m.Info.Architecture, "context_length", m.Info.ContextLength,
		"max_running", running, "max_queue", s.opts.MaxQueue)
	return nil
}

// SetReady marks the server ready (/health answers 200) once models are loaded.
func (s *Server) SetReady(ready bool) { s.ready.Store(ready) }

// Handler is the HTTP handler of the API.
func (s *Server) Handler() http.Handler { return s.handler }

// Serve serves the API on l until Shutdown.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	s.httpSrv = &http.Server{Handler: s.handler, ReadHeaderTimeout: 30 * time.Second,
		ErrorLog: s.log.StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true})}
	srv := s.httpSrv
	s.mu.Unlock()
	err := srv.Serve(l)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Shutdown stops accepting requests (new ones get 503), lets in-flight
// requests finish until ctx is done, then cancels the rest (streams end with
// finish_reason "abort") and waits for them to unwind.
func (s *Server) Shutdown(ctx context.Context) error {
	s.draining.Store(true)
	s.ready.Store(false)
	s.mu.RLock()
	srv := s.httpSrv
	s.mu.RUnlock()
	done := make(chan struct{})
	go func() {
		for s.inflight.Load() > 0 {
			time.Sleep(10 * time.Millisecond)
		}
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		s.log.Warn("shutdown: canceling in-flight generations")
		s.baseCancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			err = errors.New("server: in-flight requests did not end 10s after cancel")
		}
	}
	if srv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if e := srv.Shutdown(sctx); e != nil && err == nil {
			err = fmt.Errorf("server: http shutdown: %w", e)
		}
	}
	s.baseCancel()
	return err
}

// shuttingDown reports that Shutdown gave up waiting and canceled generations.
func (s *Server) shuttingDown() bool { return s.baseCtx.Err() != nil }

// writeShutdownError answers a non-streamed request that shutdown canceled
// (a client that went away gets nothing).
func (s *Server) writeShutdownError(w http.ResponseWriter) {
	if s.shuttingDown() {
		writeError(w, unavailable("shutting_down", "the server shut down before the request finished", s.opts.RetryAfter))
	}
}

// lookup finds a served model; an unknown id is a 404 naming the served ones.
func (s *Server) lookup(id string) (*servedModel, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if id == "" {
		if len(s.order) == 1 {
			return s.models[s.order[0]], nil
		}
		e := badParam("model", "the model parameter is required; served models: %s", strings.Join(s.order, ", "))
		return nil, e
	}
	m, ok := s.models[id]
	if !ok {
		served := append([]string(nil), s.order...)
		sort.Strings(served)
		e := notFound("model_not_found", "The model `%s` does not exist. Served models: %s", id, strings.Join(served, ", "))
		e.Param = "model"
		return nil, e
	}
	return m, nil
}

// decodeFor decodes the request body into v and looks up the model that
// model (read once v is decoded) names. On failure it writes the error
// response and returns nil.
func (s *Server) decodeFor(w http.ResponseWriter, r *http.Request, v any, model func() string) *servedModel {
	if err := decodeBody(w, r, v); err != nil {
		writeError(w, err)
		return nil
	}
	m, err := s.lookup(model())
	if err != nil {
		writeError(w, err)
		return nil
	}
	return m
}

type ctxKey int

const requestIDKey ctxKey = 0

// requestID returns the request id stored by withRequestID.
func requestID(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey).(string)
	return id
}

func newID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// validRequestID accepts client ids that are safe to log and echo.
func validRequestID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for _, c := range id {
		if c < 0x21 || c > 0x7e {
			return false
		}
	}
	return true
}

// withRequestID takes X-Request-Id from the request (or makes one), answers
// it in the response header and logs each request with it.
func (s *Server) withRequestID(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("X-Request-Id")
		if !validRequestID(id) {
			id = newID()
		}
		w.Header().Set("X-Request-Id", id)
		r = r.WithContext(context.WithValue(r.Context(), requestIDKey, id))
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		next.ServeHTTP(sw, r)
		if r.URL.Path != "/health" && r.URL.Path != "/metrics" {
			s.log.Info("request", "request_id", id, "method", r.Method, "path", r.URL.Path,
				"status", sw.status(), "duration", time.Since(start).Round(time.Microsecond))
		}
	})
}

// statusWriter records the status code; it keeps http.Flusher working.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) status() int {
	if w.code == 0 {
		return http.StatusOK
	}
	return w.code
}

// auth checks the Bearer API key when keys are configured.
func (s *Server) auth(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if len(s.opts.APIKeys) > 0 {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			valid := false
			if ok {
				for _, k := range s.opts.APIKeys {
					if subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), []byte(k)) == 1 {
						valid = true
					}
				}
			}
			if !valid {
				w.Header().Set("WWW-Authenticate", `Bearer realm="orch"`)
				msg := "Incorrect API key provided."
				if !ok {
					msg = "Missing API key: send it as 'Authorization: Bearer <key>'."
				}
				writeError(w, &APIError{Status: http.StatusUnauthorized, Type: "authentication_error",
					Code: "invalid_api_key", Message: msg})
				return
			}
		}
		h(w, r)
	}
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	s.mu.RLock()
	n := len(s.models)
	s.mu.RUnlock()
	switch {
	case s.draining.Load():
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"status": "shutting_down"})
	case !s.ready.Load() || n == 0:
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"status": "loading", "models": n})
	default:
		writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "models": n})
	}
}

func (s *Server) modelObject(m *servedModel) ModelObject {
	return ModelObject{ID: m.ID, Object: "model", Created: m.Created, OwnedBy: "orch",
		MaxModelLen: m.Info.ContextLength, Root: m.Info.Name}
}

func (s *Server) handleModels(w http.ResponseWriter, r *http.Request) {
	s.mu.RLock()
	list := ModelList{Object: "list", Data: []ModelObject{}}
	for _, id := range s.order {
		list.Data = append(list.Data, s.modelObject(s.models[id]))
	}
	s.mu.RUnlock()
	writeJSON(w, http.StatusOK, list)
}

func (s *Server) handleModel(w http.ResponseWriter, r *http.Request) {
	m, err := s.lookup(r.PathValue("id"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, s.modelObject(m))
}

// admit checks that the server takes requests and waits for a model slot.
// It returns the release function and the queue time.
func (s *Server) admit(ctx context.Context, m *servedModel) (func(), time.Duration, error) {
	if s.draining.Load() {
		m.metrics.rejected("shutting_down")
		return nil, 0, unavailable("shutting_down", "the server is shutting down", s.opts.RetryAfter)
	}
	release, waited, err := m.gate.acquire(ctx)
	if errors.Is(err, errQueueFull) {
		m.metrics.rejected("queue_full")
		return nil, 0, &APIError{Status: http.StatusTooManyRequests, Type: "rate_limit_error", Code: "queue_full",
			Message:    fmt.Sprintf("model %s is at capacity and its queue (%d) is full; retry later", m.ID, s.opts.MaxQueue),
			RetryAfter: s.opts.RetryAfter}
	}
	if err != nil {
		m.metrics.aborted.Inc()
		return nil, waited, err
	}
	m.metrics.queue.Observe(waited.Seconds())
	return release, waited, nil
}
