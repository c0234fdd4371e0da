package server

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
)

func httptestDo(s *Server, method, path string) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	s.Handler().ServeHTTP(rec, httptest.NewRequest(method, path, nil))
	return rec
}

type httpResult struct {
	status int
	header http.Header
	body   []byte
}

func (r httpResult) json(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	require.NoError(t, json.Unmarshal(r.body, &m), "body: %s", r.body)
	return m
}

func doReq(t *testing.T, method, url string, body any, hdr ...string) httpResult {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		buf, err := json.Marshal(b)
		require.NoError(t, err)
		rd = bytes.NewReader(buf)
	}
	req, err := http.NewRequest(method, url, rd)
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return httpResult{status: resp.StatusCode, header: resp.Header, body: b}
}

// sseEvents splits an SSE body into its data payloads.
func sseEvents(t *testing.T, body []byte) []string {
	t.Helper()
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if d, ok := strings.CutPrefix(line, "data: "); ok {
			out = append(out, d)
		} else {
			require.Empty(t, line, "unexpected SSE line")
		}
	}
	return out
}

// errorOf checks an OpenAI-shaped error and returns its object.
func errorOf(t *testing.T, r httpResult, status int, param string) map[string]any {
	t.Helper()
	require.Equal(t, status, r.status, "body: %s", r.body)
	m := r.json(t)
	e, ok := m["error"].(map[string]any)
	require.True(t, ok, "no error object: %s", r.body)
	assert.NotEmpty(t, e["message"])
	assert.NotEmpty(t, e["type"])
	if param != "" {
		assert.Equal(t, param, e["param"], "message: %v", e["message"])
	}
	return e
}

func chatBody(content string, extra map[string]any) map[string]any {
	b := map[string]any{"model": "fake", "messages": []map[string]any{{"role": "user", "content": content}}}
	for k, v := range extra {
		b[k] = v
	}
	return b
}

func TestChatNonStream(t *testing.T) {
	ts := startServer(t, 0)
	r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("say:Hello there", nil), "X-Request-Id", "my-req-1")
	require.Equal(t, 200, r.status, "%s", r.body)
	assert.Equal(t, "my-req-1", r.header.Get("X-Request-Id"))
	var c ChatCompletion
	require.NoError(t, json.Unmarshal(r.body, &c))
	assert.Equal(t, "chat.completion", c.Object)
	assert.Equal(t, "fake", c.Model)
	require.Len(t, c.Choices, 1)
	assert.Equal(t, "Hello there", *c.Choices[0].Message.Content)
	assert.Equal(t, "assistant", c.Choices[0].Message.Role)
	assert.Equal(t, "stop", c.Choices[0].FinishReason)
	prompt := fakeTok{}.Encode("user: say:Hello there\nassistant:", false, true)
	assert.Equal(t, len(prompt), c.Usage.PromptTokens)
	assert.Equal(t, len("Hello there")+1, c.Usage.CompletionTokens) // + <eos>
	assert.Equal(t, c.Usage.PromptTokens+c.Usage.CompletionTokens, c.Usage.TotalTokens)
	// The adapter saw the rendered prompt and the end-of-generation tokens.
	require.Len(t, ts.adapter.reqs, 1)
	assert.Equal(t, prompt, ts.adapter.reqs[0].Prompt)
	assert.ElementsMatch(t, []int32{fakeEOS, fakeEOT}, ts.adapter.reqs[0].StopTokens)
}

func TestChatStream(t *testing.T) {
	ts := startServer(t, 0)
	r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("say:Hi!", map[string]any{
		"stream": true, "stream_options": map[string]any{"include_usage": true}}))
	require.Equal(t, 200, r.status, "%s", r.body)
	assert.Equal(t, "text/event-stream", r.header.Get("Content-Type"))
	ev := sseEvents(t, r.body)
	require.GreaterOrEqual(t, len(ev), 4)
	assert.Equal(t, "[DONE]", ev[len(ev)-1])
	var text strings.Builder
	var finish string
	var usage *Usage
	for i, e := range ev[:len(ev)-1] {
		var c ChatCompletionChunk
		require.NoError(t, json.Unmarshal([]byte(e), &c), e)
		assert.Equal(t, "chat.completion.chunk", c.Object)
		if i == 0 {
			assert.Equal(t, "assistant", c.Choices[0].Delta.Role)
		}
		if c.Usage != nil {
			usage = c.Usage
			assert.Empty(t, c.Choices)
			assert.Equal(t, len(ev)-2, i, "usage must be the last chunk")
			continue
		}
		require.Len(t, c.Choices, 1)
		if c.Choices[0].Delta.Content != nil {
			text.WriteString(*c.Choices[0].Delta.Content)
		}
		if c.Choices[0].FinishReason != nil {
			finish = *c.Choices[0].FinishReason
		}
	}
	assert.Equal(t, "Hi!", text.String())
	assert.Equal(t, "stop", finish)
	require.NotNil(t, usage)
	assert.Equal(t, 4, usage.CompletionTokens)

	// Without include_usage there is no usage chunk.
	r = doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("say:Hi!", map[string]any{"stream": true}))
	for _, e := range sseEvents(t, r.body) {
		assert.NotContains(t, e, `"usage"`)
	}
}

func TestStopStringsNeverLeak(t *testing.T) {
	ts := startServer(t, 0)
	for _, tc := range []struct {
		name, say string
		stop      any
		want      string
	}{
		{"single", "Hello STOP world", "STOP", "Hello "},
		{"list earliest", "one two three", []string{"three", "two"}, "one "},
		{"prefix not a stop", "ST STOP", "STOP", "ST "},
		{"no match flushes held text", "abc ST", "STOP", "abc ST"},
		{"multibyte", "héllo wörld", "wö", "héllo "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, stream := range []bool{false, true} {
				r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("say:"+tc.say, map[string]any{"stop": tc.stop, "stream": stream}))
				require.Equal(t, 200, r.status, "%s", r.body)
				got, finish := "", ""
				if stream {
					for _, e := range sseEvents(t, r.body) {
						if e == "[DONE]" {
							continue
						}
						var c ChatCompletionChunk
						require.NoError(t, json.Unmarshal([]byte(e), &c))
						for _, ch := range c.Choices {
							if ch.Delta.Content != nil {
								got += *ch.Delta.Content
							}
							if ch.FinishReason != nil {
								finish = *ch.FinishReason
							}
						}
					}
				} else {
					var c ChatCompletion
					require.NoError(t, json.Unmarshal(r.body, &c))
					got, finish = *c.Choices[0].Message.Content, c.Choices[0].FinishReason
				}
				assert.Equal(t, tc.want, got, "stream=%v", stream)
				assert.Equal(t, "stop", finish)
			}
		})
	}
}

func TestStopMatcherHoldsBackPrefixes(t *testing.T) {
	m := newStopMatcher([]string{"</end>"})
	var out []string
	for _, piece := range []string{"ab", "c<", "/e", "nX", "y</", "end>", "zz"} {
		r, st := m.push(piece)
		out = append(out, r)
		if st {
			break
		}
	}
	assert.Equal(t, []string{"ab", "c", "", "</enX", "y", ""}, out)
}

func TestStopTokenIDsAndIgnoreEOS(t *testing.T) {
	ts := startServer(t, 0)
	// stop_token_ids: 'o' ends the generation; its text is not returned.
	r := doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "say:hello", "stop_token_ids": []int{'o'}})
	require.Equal(t, 200, r.status, "%s", r.body)
	var c Completion
	require.NoError(t, json.Unmarshal(r.body, &c))
	assert.Equal(t, "hell", c.Choices[0].Text)
	assert.Equal(t, "stop", *c.Choices[0].FinishReason)
	// ignore_eos: generation runs to max_tokens past <eos>; EOS is not a stop token.
	r = doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "say:hi", "ignore_eos": true, "max_tokens": 5})
	require.Equal(t, 200, r.status, "%s", r.body)
	require.NoError(t, json.Unmarshal(r.body, &c))
	assert.Equal(t, "length", *c.Choices[0].FinishReason)
	assert.Equal(t, 5, c.Usage.CompletionTokens)
	assert.Equal(t, "hi<eos>xx", c.Choices[0].Text)
	last := ts.adapter.reqs[len(ts.adapter.reqs)-1]
	assert.Empty(t, last.StopTokens)
	// min_tokens reaches the adapter.
	r = doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "say:a", "min_tokens": 3, "max_tokens": 8})
	require.Equal(t, 200, r.status, "%s", r.body)
	last = ts.adapter.reqs[len(ts.adapter.reqs)-1]
	assert.Equal(t, 3, last.MinTokens)
}

func TestCompletions(t *testing.T) {
	ts := startServer(t, 0)
	r := doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "abc", "max_tokens": 6, "echo": true})
	require.Equal(t, 200, r.status, "%s", r.body)
	var c Completion
	require.NoError(t, json.Unmarshal(r.body, &c))
	assert.Equal(t, "text_completion", c.Object)
	assert.Equal(t, "abc"+"abc ab", c.Choices[0].Text)
	assert.Equal(t, "length", *c.Choices[0].FinishReason)
	assert.Equal(t, 6, c.Usage.CompletionTokens)
	assert.Equal(t, 3, c.Usage.PromptTokens)

	// Token-id prompts and several prompts with n=2: choices indexed prompt*n+i.
	r = doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake",
		"prompt": [][]int{{'s', 'a', 'y', ':', 'A'}, {'s', 'a', 'y', ':', 'B'}}, "n": 2})
	require.Equal(t, 200, r.status, "%s", r.body)
	require.NoError(t, json.Unmarshal(r.body, &c))
	require.Len(t, c.Choices, 4)
	for i, want := range []string{"A", "A", "B", "B"} {
		assert.Equal(t, i, c.Choices[i].Index)
		assert.Equal(t, want, c.Choices[i].Text)
	}

	// Streamed completion.
	r = doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "say:xyz", "stream": true,
		"stream_options": map[string]any{"include_usage": true}})
	require.Equal(t, 200, r.status)
	ev := sseEvents(t, r.body)
	assert.Equal(t, "[DONE]", ev[len(ev)-1])
	text := ""
	var usage *Usage
	for _, e := range ev[:len(ev)-1] {
		var c Completion
		require.NoError(t, json.Unmarshal([]byte(e), &c))
		for _, ch := range c.Choices {
			text += ch.Text
		}
		if c.Usage != nil {
			usage = c.Usage
		}
	}
	assert.Equal(t, "xyz", text)
	require.NotNil(t, usage)
	assert.Equal(t, 4, usage.CompletionTokens)
}

func TestNChoicesAndSeed(t *testing.T) {
	ts := startServer(t, 0)
	r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("say:yo", map[string]any{"n": 3, "seed": 7, "stream": true}))
	require.Equal(t, 200, r.status, "%s", r.body)
	texts := map[int]string{}
	finishes := map[int]string{}
	for _, e := range sseEvents(t, r.body) {
		if e == "[DONE]" {
			continue
		}
		var c ChatCompletionChunk
		require.NoError(t, json.Unmarshal([]byte(e), &c))
		for _, ch := range c.Choices {
			if ch.Delta.Content != nil {
				texts[ch.Index] += *ch.Delta.Content
			}
			if ch.FinishReason != nil {
				finishes[ch.Index] = *ch.FinishReason
			}
		}
	}
	assert.Equal(t, map[int]string{0: "yo", 1: "yo", 2: "yo"}, texts)
	assert.Equal(t, map[int]string{0: "stop", 1: "stop", 2: "stop"}, finishes)
	seeds := map[uint64]bool{}
	for _, q := range ts.adapter.reqs {
		assert.True(t, q.Sampling.HasSeed)
		seeds[q.Sampling.Seed] = true
	}
	assert.Len(t, seeds, 3, "each choice gets its own seed")
}

func TestSamplingParamsReachAdapter(t *testing.T) {
	ts := startServer(t, 0)
	r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("say:k", map[string]any{
		"temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 11, "presence_penalty": 0.5,
		"frequency_penalty": -0.5, "repetition_penalty": 1.1, "logit_bias": map[string]float64{"65": 5}, "max_completion_tokens": 9}))
	require.Equal(t, 200, r.status, "%s", r.body)
	q := ts.adapter.reqs[0]
	assert.InDelta(t, 0.5, q.Sampling.Temperature, 1e-6)
	assert.InDelta(t, 0.9, q.Sampling.TopP, 1e-6)
	assert.Equal(t, 40, q.Sampling.TopK)
	assert.InDelta(t, 0.05, q.Sampling.MinP, 1e-6)
	assert.Equal(t, uint64(11), q.Sampling.Seed)
	assert.InDelta(t, 0.5, q.Sampling.PresencePenalty, 1e-6)
	assert.InDelta(t, -0.5, q.Sampling.FrequencyPenalty, 1e-6)
	assert.InDelta(t, 1.1, q.Sampling.RepetitionPenalty, 1e-6)
	assert.Equal(t, map[int32]float32{65: 5}, q.Sampling.LogitBias)
	assert.Equal(t, 9, q.MaxTokens)
}

func TestLogprobs(t *testing.T) {
	ts := startServer(t, 0)
	r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("say:ab", map[string]any{"logprobs": true, "top_logprobs": 2}))
	require.Equal(t, 200, r.status, "%s", r.body)
	var c ChatCompletion
	require.NoError(t, json.Unmarshal(r.body, &c))
	lp := c.Choices[0].Logprobs
	require.NotNil(t, lp)
	require.Len(t, lp.Content, 3) // a, b, <eos>
	assert.Equal(t, "a", lp.Content[0].Token)
	assert.Equal(t, []int{'a'}, lp.Content[0].Bytes)
	assert.InDelta(t, -0.25, lp.Content[0].Logprob, 1e-6)
	require.Len(t, lp.Content[0].TopLogprobs, 2)
	assert.Equal(t, "b", lp.Content[0].TopLogprobs[1].Token)

	r = doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "say:ab", "logprobs": 1})
	require.Equal(t, 200, r.status, "%s", r.body)
	var cc Completion
	require.NoError(t, json.Unmarshal(r.body, &cc))
	require.NotNil(t, cc.Choices[0].Logprobs)
	assert.Equal(t, []string{"a", "b", "<eos>"}, cc.Choices[0].Logprobs.Tokens)
	assert.Equal(t, []int{0, 1, 2}, cc.Choices[0].Logprobs.TextOffset)
	assert.Equal(t, map[string]float64{"a": -0.25}, cc.Choices[0].Logprobs.TopLogprobs[0])

	// A model whose adapter cannot return logprobs: 400 naming the parameter.
	ts2 := startServer(t, 0, func(o *Options, m *Model) { m.Features = nil })
	errorOf(t, doReq(t, "POST", ts2.url+"/v1/chat/completions", chatBody("x", map[string]any{"logprobs": true})), 400, "top_logprobs")
	errorOf(t, doReq(t, "POST", ts2.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "x", "logprobs": 2}), 400, "logprobs")
}

func TestValidationErrors(t *testing.T) {
	ts := startServer(t, 0)
	chat := ts.url + "/v1/chat/completions"
	cmpl := ts.url + "/v1/completions"
	long := strings.Repeat("z", 300)
	for _, tc := range []struct {
		name   string
		url    string
		body   any
		status int
		param  string
	}{
		{"not json", chat, "{", 400, ""},
		{"empty body", chat, "", 400, ""},
		{"unknown field", chat, chatBody("x", map[string]any{"frobnicate": 1}), 400, "frobnicate"},
		{"wrong type", chat, chatBody("x", map[string]any{"temperature": "hot"}), 400, "temperature"},
		{"no messages", chat, map[string]any{"model": "fake", "messages": []any{}}, 400, "messages"},
		{"bad role", chat, map[string]any{"model": "fake", "messages": []map[string]any{{"role": "robot", "content": "x"}}}, 400, "messages[0].role"},
		{"image part", chat, map[string]any{"model": "fake", "messages": []map[string]any{{"role": "user", "content": []map[string]any{{"type": "image_url"}}}}}, 400, "messages[0].content[0].type"},
		{"tool without id", chat, map[string]any{"model": "fake", "messages": []map[string]any{{"role": "tool", "content": "x"}}}, 400, "messages[0].tool_call_id"},
		{"temperature", chat, chatBody("x", map[string]any{"temperature": 3}), 400, "temperature"},
		{"top_p", chat, chatBody("x", map[string]any{"top_p": 0}), 400, "top_p"},
		{"top_k", chat, chatBody("x", map[string]any{"top_k": -2}), 400, "top_k"},
		{"min_p", chat, chatBody("x", map[string]any{"min_p": 1.5}), 400, "min_p"},
		{"presence", chat, chatBody("x", map[string]any{"presence_penalty": 5}), 400, "presence_penalty"},
		{"frequency", chat, chatBody("x", map[string]any{"frequency_penalty": -5}), 400, "frequency_penalty"},
		{"repetition", chat, chatBody("x", map[string]any{"repetition_penalty": 0}), 400, "repetition_penalty"},
		{"logit_bias key", chat, chatBody("x", map[string]any{"logit_bias": map[string]float64{"99999": 1}}), 400, "logit_bias"},
		{"n", chat, chatBody("x", map[string]any{"n": 0}), 400, "n"},
		{"max_tokens", chat, chatBody("x", map[string]any{"max_tokens": 0}), 400, "max_tokens"},
		{"max_tokens over context", chat, chatBody("x", map[string]any{"max_tokens": 250}), 400, "max_tokens"},
		{"prompt over context", chat, chatBody(long, nil), 400, "messages"},
		{"completion prompt over context", cmpl, map[string]any{"model": "fake", "prompt": long}, 400, "prompt"},
		{"min_tokens > max", chat, chatBody("x", map[string]any{"min_tokens": 5, "max_tokens": 2}), 400, "min_tokens"},
		{"stop_token_ids", chat, chatBody("x", map[string]any{"stop_token_ids": []int{100000}}), 400, "stop_token_ids"},
		{"empty stop", chat, chatBody("x", map[string]any{"stop": ""}), 400, "stop"},
		{"stream_options without stream", chat, chatBody("x", map[string]any{"stream_options": map[string]any{"include_usage": true}}), 400, "stream_options"},
		{"top_logprobs without logprobs", chat, chatBody("x", map[string]any{"top_logprobs": 2}), 400, "top_logprobs"},
		{"top_logprobs too many", chat, chatBody("x", map[string]any{"logprobs": true, "top_logprobs": 21}), 400, "top_logprobs"},
		{"json_schema", chat, chatBody("json", map[string]any{"response_format": map[string]any{"type": "json_schema"}}), 400, "response_format.type"},
		{"json_object without json", chat, chatBody("x", map[string]any{"response_format": map[string]any{"type": "json_object"}}), 400, "response_format"},
		{"reasoning_effort unsupported", chat, chatBody("x", map[string]any{"reasoning_effort": "high"}), 400, "reasoning_effort"},
		{"reasoning_effort bad", chat, chatBody("x", map[string]any{"reasoning_effort": "max"}), 400, "reasoning_effort"},
		{"tool type", chat, chatBody("x", map[string]any{"tools": []map[string]any{{"type": "code"}}}), 400, "tools[0].type"},
		{"tool_choice unknown fn", chat, chatBody("x", map[string]any{"tools": []map[string]any{{"type": "function", "function": map[string]any{"name": "f"}}},
			"tool_choice": map[string]any{"type": "function", "function": map[string]any{"name": "g"}}}), 400, "tool_choice"},
		{"tool_choice required without tools", chat, chatBody("x", map[string]any{"tool_choice": "required"}), 400, "tool_choice"},
		{"max_tokens disagree", chat, chatBody("x", map[string]any{"max_tokens": 3, "max_completion_tokens": 4}), 400, "max_tokens"},
		{"prompt missing", cmpl, map[string]any{"model": "fake"}, 400, "prompt"},
		{"prompt token out of vocab", cmpl, map[string]any{"model": "fake", "prompt": []int{1, 5000}}, 400, "prompt"},
		{"suffix", cmpl, map[string]any{"model": "fake", "prompt": "x", "suffix": "y"}, 400, "suffix"},
		{"echo with logprobs", cmpl, map[string]any{"model": "fake", "prompt": "x", "echo": true, "logprobs": 1}, 400, "echo"},
		{"unknown model", chat, map[string]any{"model": "gpt-9", "messages": []map[string]any{{"role": "user", "content": "x"}}}, 404, "model"},
		{"unknown route", ts.url + "/v1/embeddings", map[string]any{}, 404, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			errorOf(t, doReq(t, "POST", tc.url, tc.body), tc.status, tc.param)
		})
	}
	e := errorOf(t, doReq(t, "POST", chat, map[string]any{"model": "gpt-9", "messages": []map[string]any{{"role": "user", "content": "x"}}}), 404, "model")
	assert.Contains(t, e["message"], "fake", "404 names the served models")
	assert.Equal(t, "model_not_found", e["code"])
	assert.Empty(t, ts.adapter.reqs, "no invalid request reached the adapter")
}

func TestModelsHealthTokenize(t *testing.T) {
	ts := startServer(t, 0)
	r := doReq(t, "GET", ts.url+"/v1/models", nil)
	require.Equal(t, 200, r.status)
	var ml ModelList
	require.NoError(t, json.Unmarshal(r.body, &ml))
	require.Len(t, ml.Data, 1)
	assert.Equal(t, "fake", ml.Data[0].ID)
	assert.Equal(t, 256, ml.Data[0].MaxModelLen)
	assert.Equal(t, 200, doReq(t, "GET", ts.url+"/v1/models/fake", nil).status)
	errorOf(t, doReq(t, "GET", ts.url+"/v1/models/nope", nil), 404, "model")

	assert.Equal(t, 200, doReq(t, "GET", ts.url+"/health", nil).status)
	ts.srv.SetReady(false)
	assert.Equal(t, 503, doReq(t, "GET", ts.url+"/health", nil).status)
	ts.srv.SetReady(true)

	r = doReq(t, "POST", ts.url+"/tokenize", map[string]any{"model": "fake", "prompt": "hi<eos>", "return_token_strs": true})
	require.Equal(t, 200, r.status, "%s", r.body)
	var tr TokenizeResponse
	require.NoError(t, json.Unmarshal(r.body, &tr))
	assert.Equal(t, []int32{'h', 'i', fakeEOS}, tr.Tokens)
	assert.Equal(t, 3, tr.Count)
	assert.Equal(t, []string{"h", "i", "<eos>"}, tr.TokenStrs)
	r = doReq(t, "POST", ts.url+"/tokenize", map[string]any{"model": "fake", "messages": []map[string]any{{"role": "user", "content": "q"}}})
	require.Equal(t, 200, r.status, "%s", r.body)
	require.NoError(t, json.Unmarshal(r.body, &tr))
	assert.Equal(t, fakeTok{}.Encode("user: q\nassistant:", false, true), tr.Tokens)
	errorOf(t, doReq(t, "POST", ts.url+"/tokenize", map[string]any{"model": "fake"}), 400, "prompt")

	r = doReq(t, "POST", ts.url+"/detokenize", map[string]any{"model": "fake", "tokens": []int{'o', 'k', fakeEOS}})
	require.Equal(t, 200, r.status, "%s", r.body)
	assert.Equal(t, "ok<eos>", r.json(t)["prompt"])
	errorOf(t, doReq(t, "POST", ts.url+"/detokenize", map[string]any{"model": "fake", "tokens": []int{-1}}), 400, "tokens")
	errorOf(t, doReq(t, "POST", ts.url+"/detokenize", map[string]any{"model": "zzz", "tokens": []int{1}}), 404, "model")
}

func TestHealthBeforeModels(t *testing.T) {
	s := New(Options{})
	r := httptestDo(s, "GET", "/health")
	assert.Equal(t, 503, r.Code)
	assert.Contains(t, r.Body.String(), "loading")
}

func TestAPIKeys(t *testing.T) {
	ts := startServer(t, 0, func(o *Options, m *Model) { o.APIKeys = []string{"k1", "k2"} })
	e := errorOf(t, doReq(t, "GET", ts.url+"/v1/models", nil), 401, "")
	assert.Equal(t, "invalid_api_key", e["code"])
	errorOf(t, doReq(t, "GET", ts.url+"/v1/models", nil, "Authorization", "Bearer nope"), 401, "")
	errorOf(t, doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("x", nil), "Authorization", "k1"), 401, "")
	assert.Equal(t, 200, doReq(t, "GET", ts.url+"/v1/models", nil, "Authorization", "Bearer k2").status)
	assert.Equal(t, 200, doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("say:x", nil), "Authorization", "Bearer k1").status)
	// health and metrics stay open for probes and scrapers.
	assert.Equal(t, 200, doReq(t, "GET", ts.url+"/health", nil).status)
	assert.Equal(t, 200, doReq(t, "GET", ts.url+"/metrics", nil).status)
}

func TestAdapterErrors(t *testing.T) {
	ts := startServer(t, 0)
	ts.adapter.failWith = errors.Join(errors.New("boom"))
	e := errorOf(t, doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("say:x", nil)), 500, "")
	assert.Contains(t, e["message"], "boom")
	// Streaming: the error arrives as an SSE error event, then [DONE].
	r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("say:x", map[string]any{"stream": true}))
	require.Equal(t, 200, r.status)
	ev := sseEvents(t, r.body)
	assert.Contains(t, ev[len(ev)-2], `"error"`)
	assert.Equal(t, "[DONE]", ev[len(ev)-1])
	ts.adapter.failWith = fmt.Errorf("wrapped: %w", sdk.ErrContextTooLong)
	errorOf(t, doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "x"}), 400, "max_tokens")
	ts.adapter.failWith = &sdk.OutOfMemoryError{Device: "cuda:0", Requested: 10, Free: 1}
	e = errorOf(t, doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "x"}), 503, "")
	assert.Equal(t, "out_of_memory", e["code"])
	ts.adapter.failWith = fmt.Errorf("wrapped: %w", sdk.ErrBusy)
	r = doReq(t, "POST", ts.url+"/v1/completions", map[string]any{"model": "fake", "prompt": "x"})
	errorOf(t, r, 503, "")
	assert.NotEmpty(t, r.header.Get("Retry-After"))
}

func httptestPost(h http.Handler, path string, body any) *httptest.ResponseRecorder {
	b, _ := json.Marshal(body)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", path, bytes.NewReader(b)))
	return rec
}
