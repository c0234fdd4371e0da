package server

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestLoadSoak is the load and soak check: many concurrent clients on
// loopback, most streaming, some disconnecting mid-stream, some finding the
// queue full (429). It passes when there are no errors besides those, no
// goroutine or heap growth, and every request is accounted for in /metrics
// (successes + aborts + queue rejections = requests sent).
//
// By default it runs 2 s against fake adapters (part of the normal test run).
// The soak:   ORCH_SOAK=3m ORCH_SOAK_CLIENTS=64 go test -run LoadSoak -timeout 10m ./host/server/
// with real adapter processes on tiny models: add ORCH_SOAK_REAL=1.
func TestLoadSoak(t *testing.T) {
	dur := 2 * time.Second
	if v := os.Getenv("ORCH_SOAK"); v != "" {
		d, err := time.ParseDuration(v)
		require.NoError(t, err, "ORCH_SOAK")
		dur = d
	}
	clients := 32
	if v := os.Getenv("ORCH_SOAK_CLIENTS"); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(t, err, "ORCH_SOAK_CLIENTS")
		clients = n
	}
	var url string
	var srv *Server
	var modelIDs []string
	var active func() int
	if os.Getenv("ORCH_SOAK_REAL") != "" {
		s, u, models := startRealServer(t, Options{MaxQueue: 8})
		srv, url = s, u
		for _, m := range models {
			modelIDs = append(modelIDs, m.id)
		}
		active = func() int {
			n := 0
			for _, m := range models {
				if st, err := m.a.Stats(context.Background()); err == nil {
					n += st.Running
				}
			}
			return n
		}
	} else {
		ts := startServer(t, time.Millisecond, func(o *Options, m *Model) {
			m.MaxRunning = 8
			o.MaxQueue = 16
			o.RetryAfter = time.Second
		})
		srv, url, modelIDs, active = ts.srv, ts.url, []string{"fake"}, ts.adapter.numActive
	}

	tr := &http.Transport{MaxIdleConns: 256, MaxIdleConnsPerHost: 256}
	client := &http.Client{Transport: tr}
	defer tr.CloseIdleConnections()

	var sent, completed, disconnected, rejected atomic.Int64
	var unexpected sync.Map
	record := func(format string, args ...any) { unexpected.Store(fmt.Sprintf(format, args...), true) }

	one := func(rng *rand.Rand) {
		model := modelIDs[rng.IntN(len(modelIDs))]
		kind := rng.IntN(20)
		stream := kind < 17
		disconnectAfter := -1
		if kind < 5 {
			disconnectAfter = 1 + rng.IntN(6)
		}
		var body map[string]any
		if rng.IntN(2) == 0 {
			body = map[string]any{"model": model, "prompt": "Once upon a time", "max_tokens": 8 + rng.IntN(24), "ignore_eos": true, "stream": stream}
		} else {
			body = map[string]any{"model": model, "messages": []map[string]any{{"role": "user", "content": "Tell me a story"}},
				"max_tokens": 8 + rng.IntN(24), "stream": stream, "stop": []string{"zzzz"}}
		}
		path := "/v1/completions"
		if _, chat := body["messages"]; chat {
			path = "/v1/chat/completions"
		}
		b, _ := json.Marshal(body)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, "POST", url+path, strings.NewReader(string(b)))
		req.Header.Set("Content-Type", "application/json")
		sent.Add(1)
		resp, err := client.Do(req)
		if err != nil {
			record("transport error: %v", err)
			return
		}
		defer resp.Body.Close()
		switch resp.StatusCode {
		case 200:
		case 429:
			if resp.Header.Get("Retry-After") == "" {
				record("429 without Retry-After")
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			rejected.Add(1)
			time.Sleep(time.Duration(5+rng.IntN(10)) * time.Millisecond)
			return
		default:
			msg, _ := io.ReadAll(resp.Body)
			record("status %d: %s", resp.StatusCode, msg)
			return
		}
		if !stream {
			var out map[string]any
			if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || out["choices"] == nil {
				record("bad non-stream body: %v", err)
				return
			}
			completed.Add(1)
			return
		}
		rd := bufio.NewReader(resp.Body)
		events := 0
		for {
			line, err := rd.ReadString('\n')
			if err != nil {
				record("stream ended without [DONE]: %v", err)
				return
			}
			d, ok := strings.CutPrefix(strings.TrimSpace(line), "data: ")
			if !ok {
				continue
			}
			if d == "[DONE]" {
				completed.Add(1)
				return
			}
			if strings.Contains(d, `"error"`) {
				record("error event: %s", d)
				return
			}
			events++
			if events == disconnectAfter {
				cancel()
				disconnected.Add(1)
				return
			}
		}
	}

	// Warm up, then take the baselines.
	for i := 0; i < 4; i++ {
		one(rand.New(rand.NewPCG(uint64(i), 99)))
	}
	tr.CloseIdleConnections()
	runtime.GC()
	time.Sleep(50 * time.Millisecond)
	baseG := runtime.NumGoroutine()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	baseHeap := ms.HeapAlloc

	deadline := time.Now().Add(dur)
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(c), 7))
			for time.Now().Before(deadline) {
				one(rng)
			}
		}(c)
	}
	wg.Wait()

	unexpected.Range(func(k, _ any) bool { t.Errorf("unexpected: %s", k); return true })
	eventually(t, "in-flight requests to end", func() bool { return srv.inflight.Load() == 0 })
	eventually(t, "adapters to be idle", func() bool { return active() == 0 })

	m := scrape(t, url)
	var success, aborted, queueFull, failed, running, waiting float64
	for k, v := range m {
		switch {
		case strings.HasPrefix(k, "vllm:request_success_total{"):
			success += v
		case strings.HasPrefix(k, "orch:request_aborted_total{"):
			aborted += v
		case strings.HasPrefix(k, "orch:request_rejected_total{") && strings.Contains(k, `reason="queue_full"`):
			queueFull += v
		case strings.HasPrefix(k, "orch:request_failed_total{"):
			failed += v
		case strings.HasPrefix(k, "vllm:num_requests_running{"):
			running += v
		case strings.HasPrefix(k, "vllm:num_requests_waiting{"):
			waiting += v
		}
	}
	total := float64(sent.Load())
	t.Logf("%s, %d clients: sent %d, completed %d, disconnected %d, rejected %d; metrics: success %.0f, aborted %.0f, queue_full %.0f, failed %.0f",
		dur, clients, sent.Load(), completed.Load(), disconnected.Load(), rejected.Load(), success, aborted, queueFull, failed)
	assert.Equal(t, total, success+aborted+queueFull+failed, "every request is accounted for in /metrics")
	assert.Zero(t, failed)
	assert.Equal(t, float64(rejected.Load()), queueFull)
	// A disconnect can race the last token (then the server counts a success),
	// never the other way round.
	assert.LessOrEqual(t, aborted, float64(disconnected.Load()))
	assert.GreaterOrEqual(t, success, float64(completed.Load()))
	assert.Zero(t, running)
	assert.Zero(t, waiting)
	assert.Positive(t, disconnected.Load())
	assert.Positive(t, completed.Load())

	tr.CloseIdleConnections()
	eventually(t, "goroutines to return to the baseline", func() bool {
		runtime.GC()
		return runtime.NumGoroutine() <= baseG+5
	})
	runtime.GC()
	runtime.ReadMemStats(&ms)
	assert.Less(t, float64(ms.HeapAlloc), float64(baseHeap)+64<<20, "heap grew from %d to %d bytes", baseHeap, ms.HeapAlloc)
}
