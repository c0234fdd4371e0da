package server

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// openStream starts a streaming request and returns the response with a
// reader positioned at the first event.
func openStream(t *testing.T, ctx context.Context, url string, body any) (*http.Response, *bufio.Reader) {
	t.Helper()
	b, err := json.Marshal(body)
	require.NoError(t, err)
	req, err := http.NewRequestWithContext(ctx, "POST", url, strings.NewReader(string(b)))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	return resp, bufio.NewReader(resp.Body)
}

// nextEvent reads the next SSE data payload.
func nextEvent(t *testing.T, r *bufio.Reader) string {
	t.Helper()
	for {
		line, err := r.ReadString('\n')
		require.NoError(t, err)
		if d, ok := strings.CutPrefix(strings.TrimRight(line, "\n"), "data: "); ok {
			return d
		}
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestClientDisconnectCancelsGeneration(t *testing.T) {
	ts := startServer(t, 10*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	resp, rd := openStream(t, ctx, ts.url+"/v1/chat/completions", chatBody("endless", map[string]any{"stream": true}))
	require.Equal(t, 200, resp.StatusCode)
	for i := 0; i < 4; i++ {
		nextEvent(t, rd)
	}
	require.Equal(t, 1, ts.adapter.numActive())
	cancel()
	resp.Body.Close()
	eventually(t, "the adapter generation to stop", func() bool { return ts.adapter.numActive() == 0 })
	// Cancel is sent from its own goroutine when the request context ends.
	eventually(t, "Cancel to reach the adapter", func() bool {
		ts.adapter.mu.Lock()
		defer ts.adapter.mu.Unlock()
		return len(ts.adapter.canceled) > 0
	})
	ts.adapter.mu.Lock()
	reqs, canceled, afterStop := ts.adapter.reqs, ts.adapter.canceled, ts.adapter.afterStop
	ts.adapter.mu.Unlock()
	require.Len(t, reqs, 1)
	assert.Contains(t, canceled, reqs[0].ID, "Cancel was sent to the adapter with the generation id")
	assert.LessOrEqual(t, afterStop, 1, "at most one step after the disconnect")
	eventually(t, "the abort to be counted", func() bool { return scrape(t, ts.url)[`orch:request_aborted_total{model_name="fake"}`] == 1 })
}

func TestQueueFullIs429(t *testing.T) {
	ts := startServer(t, 5*time.Millisecond, func(o *Options, m *Model) {
		m.MaxRunning = 1
		o.MaxQueue = 1
		o.RetryAfter = 3 * time.Second
	})
	ctxA, cancelA := context.WithCancel(context.Background())
	defer cancelA()
	respA, rdA := openStream(t, ctxA, ts.url+"/v1/chat/completions", chatBody("endless", map[string]any{"stream": true}))
	require.Equal(t, 200, respA.StatusCode)
	nextEvent(t, rdA)

	// B waits in the queue.
	var wg sync.WaitGroup
	var bStatus int
	var bBody string
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("say:queued", nil))
		bStatus, bBody = r.status, string(r.body)
	}()
	eventually(t, "B to wait", func() bool { return scrape(t, ts.url)[`vllm:num_requests_waiting{model_name="fake"}`] == 1 })
	assert.Equal(t, 1.0, scrape(t, ts.url)[`vllm:num_requests_running{model_name="fake"}`])

	// C finds the queue full.
	r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("say:x", nil))
	e := errorOf(t, r, 429, "")
	assert.Equal(t, "queue_full", e["code"])
	assert.Equal(t, "3", r.header.Get("Retry-After"))

	// A ends; B runs to completion.
	cancelA()
	respA.Body.Close()
	wg.Wait()
	assert.Equal(t, 200, bStatus, bBody)
	assert.Contains(t, bBody, `"queued"`)
	m := scrape(t, ts.url)
	assert.Equal(t, 1.0, m[`orch:request_rejected_total{model_name="fake",reason="queue_full"}`])
	assert.Equal(t, 0.0, m[`vllm:num_requests_waiting{model_name="fake"}`])
	assert.Equal(t, 2.0, m[`vllm:request_queue_time_seconds_count{model_name="fake"}`])
}

func TestGracefulShutdown(t *testing.T) {
	t.Run("finishes in-flight", func(t *testing.T) {
		ts := startServer(t, 5*time.Millisecond)
		ctx := context.Background()
		resp, rd := openStream(t, ctx, ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "endless", "max_tokens": 20, "stream": true})
		nextEvent(t, rd)
		done := make(chan error, 1)
		go func() {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			done <- ts.srv.Shutdown(sctx)
		}()
		eventually(t, "draining", func() bool { return ts.srv.draining.Load() })
		var finish string
		for {
			ev := nextEvent(t, rd)
			if ev == "[DONE]" {
				break
			}
			var c Completion
			require.NoError(t, json.Unmarshal([]byte(ev), &c))
			for _, ch := range c.Choices {
				if ch.FinishReason != nil {
					finish = *ch.FinishReason
				}
			}
		}
		resp.Body.Close()
		assert.Equal(t, "length", finish, "the in-flight stream ran to its end")
		require.NoError(t, <-done)
	})
	t.Run("cancels after grace", func(t *testing.T) {
		ts := startServer(t, 5*time.Millisecond)
		resp, rd := openStream(t, context.Background(), ts.url+"/v1/chat/completions", chatBody("endless", map[string]any{"stream": true}))
		nextEvent(t, rd)
		done := make(chan error, 1)
		go func() {
			sctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
			defer cancel()
			done <- ts.srv.Shutdown(sctx)
		}()
		eventually(t, "draining", func() bool { return ts.srv.draining.Load() })
		// New generation requests are refused while draining.
		h := ts.srv.Handler()
		rec := httptestPost(h, "/v1/chat/completions", chatBody("say:x", nil))
		assert.Equal(t, 503, rec.Code)
		assert.Equal(t, 503, httptestDo(ts.srv, "GET", "/health").Code)
		// The endless stream ends when the grace period ends: finish_reason
		// "abort", then [DONE].
		var rest strings.Builder
		for {
			line, err := rd.ReadString('\n')
			rest.WriteString(line)
			if err != nil {
				break
			}
		}
		resp.Body.Close()
		require.NoError(t, <-done)
		assert.Contains(t, rest.String(), `"finish_reason":"abort"`)
		assert.True(t, strings.HasSuffix(rest.String(), "data: [DONE]\n\n"), rest.String())
		assert.Equal(t, 0, ts.adapter.numActive())
	})
}

func TestShutdownCancelsNonStreamed(t *testing.T) {
	ts := startServer(t, 5*time.Millisecond)
	res := make(chan httpResult, 1)
	go func() {
		res <- doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "endless", "max_tokens": 200})
	}()
	eventually(t, "the generation to start", func() bool { return ts.adapter.numActive() == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	require.NoError(t, ts.srv.Shutdown(ctx))
	e := errorOf(t, <-res, 503, "")
	assert.Equal(t, "shutting_down", e["code"])
}

func TestMetrics(t *testing.T) {
	ts := startServer(t, 0)
	for i := 0; i < 2; i++ {
		require.Equal(t, 200, doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "say:abc"}).status)
	}
	require.Equal(t, 200, doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "xy", "max_tokens": 3}).status)
	doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "x", "top_p": 9})
	m := scrape(t, ts.url)
	l := `{model_name="fake"}`
	assert.Equal(t, float64(2*len("say:abc")+2), m["vllm:prompt_tokens_total"+l])
	assert.Equal(t, float64(2*4+3), m["vllm:generation_tokens_total"+l])
	assert.Equal(t, 2.0, m[`vllm:request_success_total{finished_reason="stop",model_name="fake"}`])
	assert.Equal(t, 1.0, m[`vllm:request_success_total{finished_reason="length",model_name="fake"}`])
	assert.Equal(t, 1.0, m[`orch:request_rejected_total{model_name="fake",reason="invalid"}`])
	assert.Equal(t, 3.0, m["vllm:e2e_request_latency_seconds_count"+l])
	assert.Equal(t, 3.0, m["vllm:time_to_first_token_seconds_count"+l])
	assert.Equal(t, float64(2*3+2), m["vllm:inter_token_latency_seconds_count"+l])
	assert.Equal(t, 0.25, m["vllm:kv_cache_usage_perc"+l])
	assert.Equal(t, 0.0, m["vllm:num_requests_running"+l])
}

var metricLine = regexp.MustCompile(`^([^\s{]+(?:\{[^}]*\})?)\s+(\S+)$`)

// scrape reads /metrics into "name{labels}" -> value.
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	r := doReq(t, "GET", url+"/metrics", nil)
	require.Equal(t, 200, r.status)
	out := map[string]float64{}
	for _, line := range strings.Split(string(r.body), "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		if m := metricLine.FindStringSubmatch(line); m != nil {
			v, err := strconv.ParseFloat(m[2], 64)
			if err == nil {
				out[m[1]] = v
			}
		}
	}
	return out
}

func TestClientGoneWhileQueued(t *testing.T) {
	ts := startServer(t, 5*time.Millisecond, func(o *Options, m *Model) {
		m.MaxRunning = 1
		o.MaxQueue = 2
	})
	ctxA, cancelA := context.WithCancel(context.Background())
	defer cancelA()
	respA, rdA := openStream(t, ctxA, ts.url+"/v1/chat/completions", chatBody("endless", map[string]any{"stream": true}))
	require.Equal(t, 200, respA.StatusCode)
	nextEvent(t, rdA)

	ctxB, cancelB := context.WithCancel(context.Background())
	errB := make(chan error, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctxB, "POST", ts.url+"/v1/completions", strings.NewReader(`{"model":"fake","prompt":"say:b"}`))
		_, err := http.DefaultClient.Do(req)
		errB <- err
	}()
	eventually(t, "B to wait", func() bool { return scrape(t, ts.url)[`vllm:num_requests_waiting{model_name="fake"}`] == 1 })
	cancelB()
	require.Error(t, <-errB)
	eventually(t, "B to leave the queue", func() bool {
		m := scrape(t, ts.url)
		return m[`vllm:num_requests_waiting{model_name="fake"}`] == 0 && m[`orch:request_aborted_total{model_name="fake"}`] == 1
	})
	ts.adapter.mu.Lock()
	n := len(ts.adapter.reqs)
	ts.adapter.mu.Unlock()
	assert.Equal(t, 1, n, "the queued request never reached the adapter")
	cancelA()
	respA.Body.Close()
}

func TestBodyTooLarge(t *testing.T) {
	ts := startServer(t, 0)
	big := `{"model":"fake","prompt":"` + strings.Repeat("a", maxBodyBytes) + `"}`
	r := doReq(t, "POST", ts.url+"/v1/completions", big)
	errorOf(t, r, 413, "")
}
