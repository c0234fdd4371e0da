package cli

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/host/config"
	"github.com/llama-orch/orch/host/plugins"
	"github.com/llama-orch/orch/host/server"
	"github.com/llama-orch/orch/sdk"
)

// byteTok is a byte-level tokenizer for the serve test (256 = end of text).
type byteTok struct{}

func (byteTok) Encode(text string, _, _ bool) []int32 {
	out := make([]int32, len(text))
	for i := range text {
		out[i] = int32(text[i])
	}
	return out
}
func (byteTok) Decode(ids []int32) string {
	var b []byte
	for _, id := range ids {
		if id < 256 {
			b = append(b, byte(id))
		}
	}
	return string(b)
}
func (t byteTok) NewStreamDecoder() server.StreamDecoder { return &byteDec{} }
func (byteTok) TokenText(id int32) string                { return byteTok{}.Decode([]int32{id}) }
func (byteTok) VocabSize() int                           { return 257 }
func (byteTok) EndOfGeneration() []int32                 { return []int32{256} }

type byteDec struct{}

func (*byteDec) Add(id int32) string { return byteTok{}.Decode([]int32{id}) }
func (*byteDec) Flush() string       { return "" }

// echoAdapter answers "ok" then end of text.
type echoAdapter struct{ unloaded bool }

func (*echoAdapter) Load(context.Context, sdk.LoadRequest, func(sdk.LoadProgress)) (sdk.ModelInfo, error) {
	return sdk.ModelInfo{}, nil
}
func (*echoAdapter) Generate(_ context.Context, _ sdk.GenerateRequest, emit func(sdk.Chunk) error) error {
	return emit(sdk.Chunk{Tokens: []int32{'o', 'k', 256}, Finish: sdk.FinishStop})
}
func (*echoAdapter) Cancel(context.Context, string) error { return nil }
func (*echoAdapter) Evaluate(context.Context, []int32) (sdk.Logits, error) {
	return sdk.Logits{}, errors.New("no")
}
func (*echoAdapter) Stats(context.Context) (sdk.Stats, error) { return sdk.Stats{}, nil }
func (a *echoAdapter) Unload(context.Context) error           { a.unloaded = true; return nil }

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func TestServeLoadsServesAndShutsDown(t *testing.T) {
	old := serveOpenModel
	t.Cleanup(func() { serveOpenModel = old })
	var closed []string
	serveOpenModel = func(ctx context.Context, cfg *config.Config, _ []plugins.Plugin, mc config.ModelConfig, log hclog.Logger) (loadedModel, error) {
		if strings.Contains(mc.Path, "broken") {
			return loadedModel{}, errors.New(mc.Path + ": no adapter serves architecture \"x\"")
		}
		return loadedModel{
			model: server.Model{ID: modelID(mc), Adapter: &echoAdapter{}, Tokenizer: byteTok{}, Chat: server.NewTemplateFormat("t",
				func(msgs []server.Message, _ []server.Tool) (string, error) { return msgs[0].Content, nil }),
				Info: sdk.ModelInfo{ContextLength: 64}},
			close: func(context.Context) error { closed = append(closed, modelID(mc)); return nil },
		}, nil
	}
	cfg := config.Default()
	cfg.Server.Addr = "127.0.0.1:0"
	cfg.Server.APIKeys = []string{"sekrit"}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var errOut syncBuf
	cmd := &cobra.Command{}
	cmd.SetErr(&errOut)
	done := make(chan error, 1)
	go func() {
		done <- runServe(ctx, cfg, []config.ModelConfig{{Path: "/models/tiny.gguf"}, {Path: "/m/other.gguf", Name: "named"}}, time.Second, hclog.NewNullLogger(), cmd)
	}()
	re := regexp.MustCompile(`listening on (http://\S+)`)
	var url string
	require.Eventually(t, func() bool {
		m := re.FindStringSubmatch(errOut.String())
		if m != nil {
			url = m[1]
		}
		return url != ""
	}, 5*time.Second, 5*time.Millisecond)
	require.Eventually(t, func() bool {
		r, err := http.Get(url + "/health")
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == 200
	}, 5*time.Second, 5*time.Millisecond)

	get := func(path, key string) (int, string) {
		req, _ := http.NewRequest("GET", url+path, nil)
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		r, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer r.Body.Close()
		b, _ := io.ReadAll(r.Body)
		return r.StatusCode, string(b)
	}
	code, _ := get("/v1/models", "")
	assert.Equal(t, 401, code)
	code, body := get("/v1/models", "sekrit")
	assert.Equal(t, 200, code)
	assert.Contains(t, body, `"id":"tiny"`)
	assert.Contains(t, body, `"id":"named"`)
	req, _ := http.NewRequest("POST", url+"/v1/completions", strings.NewReader(`{"model":"tiny","prompt":"hi"}`))
	req.Header.Set("Authorization", "Bearer sekrit")
	r, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	assert.Equal(t, 200, r.StatusCode)
	assert.Contains(t, string(b), `"text":"ok"`)

	cancel() // SIGINT/SIGTERM
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not shut down")
	}
	assert.ElementsMatch(t, []string{"tiny", "named"}, closed, "every model is closed on shutdown")

	// A model that cannot be loaded stops serve with an error naming it.
	err = runServe(context.Background(), cfg, []config.ModelConfig{{Path: "/models/broken.gguf"}}, time.Second, hclog.NewNullLogger(), cmd)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "broken.gguf")
}

func TestServeModelID(t *testing.T) {
	assert.Equal(t, "gpt-oss-20b", modelID(config.ModelConfig{Path: "/x/gpt-oss-20b.gguf"}))
	assert.Equal(t, "mine", modelID(config.ModelConfig{Path: "/x/a.gguf", Name: "mine"}))
}
