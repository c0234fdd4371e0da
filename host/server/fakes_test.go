package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
)

// Fake tokenizer: ids 0..255 are bytes, then special tokens.
var fakeSpecials = []string{"<eos>", "<eot>", "<|channel|>", "<|message|>", "<|end|>"}

const fakeEOS, fakeEOT = 256, 257

type fakeTok struct{}

func (fakeTok) Encode(text string, addSpecial, parseSpecial bool) []int32 {
	var out []int32
	for len(text) > 0 {
		if parseSpecial {
			matched := false
			for i, s := range fakeSpecials {
				if strings.HasPrefix(text, s) {
					out = append(out, int32(256+i))
					text = text[len(s):]
					matched = true
					break
				}
			}
			if matched {
				continue
			}
		}
		out = append(out, int32(text[0]))
		text = text[1:]
	}
	return out
}

func (fakeTok) Decode(ids []int32) string {
	var sb strings.Builder
	for _, id := range ids {
		sb.WriteString(fakeTok{}.TokenText(id))
	}
	return sb.String()
}

func (fakeTok) TokenText(id int32) string {
	switch {
	case id >= 0 && id < 256:
		return string([]byte{byte(id)})
	case id >= 256 && int(id) < 256+len(fakeSpecials):
		return fakeSpecials[id-256]
	}
	return ""
}

func (fakeTok) VocabSize() int                  { return 256 + len(fakeSpecials) }
func (fakeTok) EndOfGeneration() []int32        { return []int32{fakeEOS, fakeEOT} }
func (fakeTok) NewStreamDecoder() StreamDecoder { return &fakeDec{} }

type fakeDec struct{ pending []byte }

func (d *fakeDec) Add(id int32) string {
	d.pending = append(d.pending, fakeTok{}.TokenText(id)...)
	n := len(d.pending)
	for n > 0 && !utf8.Valid(d.pending[:n]) {
		n--
	}
	if n == 0 {
		return ""
	}
	out := string(d.pending[:n])
	d.pending = d.pending[n:]
	return out
}

func (d *fakeDec) Flush() string { out := string(d.pending); d.pending = nil; return out }

// fakeAdapter generates a scripted continuation: the text after the last
// "say:" in the prompt, then <eos>; without "say:", "abc " forever. Each
// token is one step of `step`.
type fakeAdapter struct {
	step     time.Duration
	failWith error
	scriptFn func(prompt []int32) []int32 // replaces the "say:" script when set

	mu        sync.Mutex
	canceled  []string
	active    map[string]bool
	reqs      []sdk.GenerateRequest
	afterStop int // tokens emitted after the generation's ctx was canceled
	started   chan string
}

func newFakeAdapter(step time.Duration) *fakeAdapter {
	return &fakeAdapter{step: step, active: map[string]bool{}}
}

func (a *fakeAdapter) Load(context.Context, sdk.LoadRequest, func(sdk.LoadProgress)) (sdk.ModelInfo, error) {
	return sdk.ModelInfo{}, nil
}

func (a *fakeAdapter) script(prompt []int32) []int32 {
	if a.scriptFn != nil {
		return a.scriptFn(prompt)
	}
	text := fakeTok{}.Decode(prompt)
	if i := strings.LastIndex(text, "say:"); i >= 0 {
		s := text[i+4:]
		if j := strings.Index(s, "\n"); j >= 0 {
			s = s[:j]
		}
		return append(fakeTok{}.Encode(s, false, true), fakeEOS)
	}
	return nil
}

func (a *fakeAdapter) Generate(ctx context.Context, req sdk.GenerateRequest, emit func(sdk.Chunk) error) error {
	a.mu.Lock()
	a.reqs = append(a.reqs, req)
	a.active[req.ID] = true
	started := a.started
	a.mu.Unlock()
	defer func() { a.mu.Lock(); delete(a.active, req.ID); a.mu.Unlock() }()
	if started != nil {
		started <- req.ID
	}
	if a.failWith != nil {
		return a.failWith
	}
	script := a.script(req.Prompt)
	stop := map[int32]bool{}
	for _, t := range req.StopTokens {
		stop[t] = true
	}
	for n := 0; ; n++ {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		a.mu.Lock()
		canceled := !a.active[req.ID]
		a.mu.Unlock()
		if canceled {
			return emit(sdk.Chunk{Finish: sdk.FinishCanceled})
		}
		var tok int32
		if script != nil {
			if n < len(script) {
				tok = script[n]
			} else {
				tok = 'x' // past the script (ignore_eos): filler
			}
		} else {
			tok = int32("abc "[n%4])
		}
		if tok == fakeEOS && n < req.MinTokens {
			tok = 'm'
		}
		c := sdk.Chunk{Tokens: []int32{tok}}
		if req.Logprobs {
			info := sdk.TokenInfo{Logprob: -0.25}
			for k := 0; k < req.TopLogprobs; k++ {
				info.Top = append(info.Top, sdk.TokenLogprob{Token: tok + int32(k), Logprob: -0.25 - float32(k)})
			}
			c.Info = []sdk.TokenInfo{info}
		}
		switch {
		case stop[tok] && n+1 >= req.MinTokens:
			c.Finish = sdk.FinishStop
		case n+1 >= req.MaxTokens:
			c.Finish = sdk.FinishLength
		}
		if c.Finish != sdk.FinishNone {
			c.Timings = &sdk.Timings{PromptTokens: len(req.Prompt), GeneratedTokens: n + 1}
		}
		if ctx.Err() != nil {
			a.mu.Lock()
			a.afterStop++
			a.mu.Unlock()
		}
		if err := emit(c); err != nil {
			return err
		}
		if c.Finish != sdk.FinishNone {
			return nil
		}
		if a.step > 0 {
			select {
			case <-time.After(a.step):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
}

func (a *fakeAdapter) Cancel(_ context.Context, id string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.canceled = append(a.canceled, id)
	delete(a.active, id)
	return nil
}

func (a *fakeAdapter) Evaluate(context.Context, []int32) (sdk.Logits, error) {
	return sdk.Logits{}, errors.New("not implemented")
}

func (a *fakeAdapter) Stats(context.Context) (sdk.Stats, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return sdk.Stats{Running: len(a.active), KVUsedBlocks: 3, KVTotalBlocks: 12}, nil
}

func (a *fakeAdapter) Unload(context.Context) error { return nil }

func (a *fakeAdapter) numActive() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.active)
}

// simpleRender is a stand-in chat template: "role: content\n" lines, then "assistant:".
func simpleRender(msgs []Message, tools []Tool) (string, error) {
	var sb strings.Builder
	for _, m := range msgs {
		fmt.Fprintf(&sb, "%s: %s\n", m.Role, m.Content)
	}
	for _, t := range tools {
		fmt.Fprintf(&sb, "tool %s\n", t.Name)
	}
	sb.WriteString("assistant:")
	return sb.String(), nil
}

type testServer struct {
	srv     *Server
	url     string
	adapter *fakeAdapter
}

type serverOpt func(*Options, *Model)

// startServer runs a Server with one fake model "fake" on a real loopback listener.
func startServer(t *testing.T, step time.Duration, opts ...serverOpt) *testServer {
	t.Helper()
	a := newFakeAdapter(step)
	o := Options{Logger: hclog.New(&hclog.LoggerOptions{Name: "server", Level: hclog.Error, Output: os.Stderr})}
	m := Model{ID: "fake", Adapter: a, Tokenizer: fakeTok{}, Chat: NewTemplateFormat("simple", simpleRender),
		Info: sdk.ModelInfo{Architecture: "fake", ContextLength: 256, MaxSequences: 4}, Features: []string{"logprobs"}}
	for _, f := range opts {
		f(&o, &m)
	}
	s := New(o)
	require.NoError(t, s.AddModel(m))
	s.SetReady(true)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
	})
	return &testServer{srv: s, url: "http://" + l.Addr().String(), adapter: a}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}
