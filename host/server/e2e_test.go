package server

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/host/plugins"
	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/synth"
	"github.com/llama-orch/orch/sdk/tokenizer"
)

var (
	adaptersOnce sync.Once
	adaptersDir  string
	adaptersErr  error
	// builtAdapters says adaptersDir is ours to remove.
	builtAdapters bool
)

// buildAdapters returns a directory with orch-adapter-gpt and
// orch-adapter-llama: $ORCH_TEST_ADAPTERS_DIR, else the repository's bin/
// when `make build` put both there (make test builds first), else it builds
// them once per test binary into a temporary directory.
func buildAdapters(t *testing.T) string {
	t.Helper()
	adaptersOnce.Do(func() {
		root, err := filepath.Abs("../..")
		if err != nil {
			adaptersErr = err
			return
		}
		has := func(dir string) bool {
			for _, n := range []string{"orch-adapter-gpt", "orch-adapter-llama"} {
				if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
					return false
				}
			}
			return true
		}
		if d := os.Getenv("ORCH_TEST_ADAPTERS_DIR"); d != "" {
			adaptersDir = d
			return
		}
		if bin := filepath.Join(root, "bin"); has(bin) {
			adaptersDir = bin
			return
		}
		tmp, err := os.MkdirTemp("", "orch-server-e2e-")
		if err != nil {
			adaptersErr = err
			return
		}
		adaptersDir, builtAdapters = tmp, true
		cmd := exec.Command("go", "build", "-o", tmp+string(filepath.Separator),
			"./plugins/gpt/cmd/orch-adapter-gpt", "./plugins/llama/cmd/orch-adapter-llama")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			adaptersErr = fmt.Errorf("go build adapters: %w: %s", err, out)
		}
	})
	require.NoError(t, adaptersErr)
	t.Logf("adapters from %s", adaptersDir)
	return adaptersDir
}

func TestMain(m *testing.M) {
	code := m.Run()
	if builtAdapters {
		_ = os.RemoveAll(adaptersDir)
	}
	os.Exit(code)
}

type realModel struct {
	id   string
	arch string
	a    sdk.Adapter
}

// startRealServer serves tiny synthetic gpt2, llama and gpt-oss models through
// the real plugin runtime (adapter processes over gRPC, CPU backend).
func startRealServer(t *testing.T, o Options) (*Server, string, []realModel) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test with adapter processes: skipped in -short mode")
	}
	dir := buildAdapters(t)
	log := hclog.New(&hclog.LoggerOptions{Name: "e2e", Level: hclog.Warn, Output: os.Stderr})
	if o.Logger == nil {
		o.Logger = log
	}
	found, err := plugins.Scan([]string{dir}, log)
	require.NoError(t, err)
	s := New(o)
	tmp := t.TempDir()
	var models []realModel
	for _, arch := range []string{"gpt2", "llama", "gpt-oss"} {
		path := filepath.Join(tmp, arch+".gguf")
		require.NoError(t, synth.Write(path, synth.Options{Arch: arch, Size: "tiny", Seed: 1}, nil))
		f, err := gguf.Open(path)
		require.NoError(t, err)
		t.Cleanup(func() { _ = f.Close() })
		tok, err := tokenizer.FromGGUF(f)
		require.NoError(t, err)
		p, err := plugins.Select(found, arch, "")
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		a, err := plugins.Supervise(ctx, p, plugins.LaunchOptions{Logger: log}, plugins.SuperviseOptions{})
		require.NoError(t, err)
		t.Cleanup(func() {
			cctx, c := context.WithTimeout(context.Background(), 10*time.Second)
			defer c()
			_ = a.Close(cctx)
		})
		info, err := a.Load(ctx, sdk.LoadRequest{Path: path, Options: sdk.LoadOptions{Device: "cpu", MaxSequences: 4}}, nil)
		cancel()
		require.NoError(t, err)
		require.NoError(t, s.AddModel(NewModel(arch, a, info, p.Info.Features, tok)))
		models = append(models, realModel{id: arch, arch: arch, a: a})
	}
	s.SetReady(true)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
	})
	return s, "http://" + l.Addr().String(), models
}

func TestEndToEndRealAdapters(t *testing.T) {
	_, url, models := startRealServer(t, Options{})
	require.Equal(t, 200, doReq(t, "GET", url+"/health", nil).status)
	for _, m := range models {
		t.Run(m.id, func(t *testing.T) {
			// Non-streamed chat: greedy, max_tokens respected, usage consistent.
			body := map[string]any{"model": m.id, "messages": []map[string]any{{"role": "user", "content": "Hello there"}},
				"max_tokens": 6, "temperature": 0}
			r := doReq(t, "POST", url+"/v1/chat/completions", body)
			require.Equal(t, 200, r.status, "%s", r.body)
			var c ChatCompletion
			require.NoError(t, json.Unmarshal(r.body, &c))
			require.Len(t, c.Choices, 1)
			assert.Contains(t, []string{"stop", "length", "tool_calls"}, c.Choices[0].FinishReason)
			assert.LessOrEqual(t, c.Usage.CompletionTokens, 6)
			assert.Positive(t, c.Usage.PromptTokens)

			// Streamed completion equals the non-streamed one (greedy).
			cb := map[string]any{"model": m.id, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": true}
			r = doReq(t, "POST", url+"/v1/completions", cb)
			require.Equal(t, 200, r.status, "%s", r.body)
			var cc Completion
			require.NoError(t, json.Unmarshal(r.body, &cc))
			assert.Equal(t, 8, cc.Usage.CompletionTokens)
			assert.Equal(t, "length", *cc.Choices[0].FinishReason)
			cb["stream"] = true
			r = doReq(t, "POST", url+"/v1/completions", cb)
			require.Equal(t, 200, r.status)
			text := ""
			ev := sseEvents(t, r.body)
			assert.Equal(t, "[DONE]", ev[len(ev)-1])
			for _, e := range ev[:len(ev)-1] {
				var chunk Completion
				require.NoError(t, json.Unmarshal([]byte(e), &chunk))
				for _, ch := range chunk.Choices {
					text += ch.Text
				}
			}
			assert.Equal(t, cc.Choices[0].Text, text)

			// tokenize / detokenize round trip.
			r = doReq(t, "POST", url+"/tokenize", map[string]any{"model": m.id, "prompt": "Hello world", "add_special_tokens": false})
			require.Equal(t, 200, r.status, "%s", r.body)
			var tr TokenizeResponse
			require.NoError(t, json.Unmarshal(r.body, &tr))
			r = doReq(t, "POST", url+"/detokenize", map[string]any{"model": m.id, "tokens": tr.Tokens})
			require.Equal(t, 200, r.status)
			assert.Equal(t, "Hello world", r.json(t)["prompt"])

			// A client disconnect frees the adapter's sequence.
			ctx, cancel := context.WithCancel(context.Background())
			resp, rd := openStream(t, ctx, url+"/v1/completions", map[string]any{"model": m.id, "prompt": "x", "max_tokens": 200, "ignore_eos": true, "stream": true})
			require.Equal(t, 200, resp.StatusCode)
			nextEvent(t, rd)
			cancel()
			resp.Body.Close()
			eventually(t, "the adapter to stop the sequence", func() bool {
				st, err := m.a.Stats(context.Background())
				return err == nil && st.Running == 0
			})
		})
	}
}

// TestOpenAINodeClient runs testdata/openai-client/check.mjs (the official
// OpenAI Node client) against a server with real adapters. It needs node and
// `npm install` in testdata/openai-client; without them it is skipped.
func TestOpenAINodeClient(t *testing.T) {
	clientDir, err := filepath.Abs("testdata/openai-client")
	require.NoError(t, err)
	if _, err := os.Stat(filepath.Join(clientDir, "node_modules", "openai")); err != nil {
		t.Skip("OpenAI client check skipped: run `npm install` in host/server/testdata/openai-client (needs node >= 20)")
	}
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("OpenAI client check skipped: node is not installed")
	}
	_, url, models := startRealServer(t, Options{APIKeys: []string{"test-key"}})
	var ids []string
	for _, m := range models {
		ids = append(ids, m.id)
	}
	cmd := exec.Command(node, "check.mjs")
	cmd.Dir = clientDir
	cmd.Env = append(os.Environ(), "ORCH_BASE_URL="+url+"/v1", "ORCH_MODELS="+strings.Join(ids, ","), "ORCH_API_KEY=test-key")
	out, err := cmd.CombinedOutput()
	t.Logf("%s", out)
	require.NoError(t, err, "OpenAI client check failed")
	assert.Contains(t, string(out), "checks passed")
}
