package server

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/synth"
	"github.com/llama-orch/orch/sdk/tokenizer"
)

var weatherTool = []map[string]any{{"type": "function", "function": map[string]any{
	"name": "get_weather", "description": "Weather for a city",
	"parameters": map[string]any{"type": "object", "properties": map[string]any{"city": map[string]any{"type": "string"}}}}}}

func TestJSONToolCallConvention(t *testing.T) {
	ts := startServer(t, 0)
	for _, tc := range []struct {
		name, say string
		calls     int
		args      string
		content   string
	}{
		{"object", `{"name": "get_weather", "arguments": {"city": "Paris"}}`, 1, `{"city": "Paris"}`, ""},
		{"parameters key", `{"name": "get_weather", "parameters": {"city": "Oslo"}}`, 1, `{"city": "Oslo"}`, ""},
		{"array", `[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_weather", "arguments": {"city": "B"}}]`, 2, `{"city": "A"}`, ""},
		{"hermes tags", `<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>`, 1, `{"city": "Rome"}`, ""},
		{"unknown function is content", `{"name": "launch", "arguments": {}}`, 0, "", `{"name": "launch", "arguments": {}}`},
		{"plain text", `It is sunny.`, 0, "", "It is sunny."},
		{"broken json is content", `{"name": "get_weather", "argu`, 0, "", `{"name": "get_weather", "argu`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, stream := range []bool{false, true} {
				r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("say:"+tc.say, map[string]any{"tools": weatherTool, "stream": stream}))
				require.Equal(t, 200, r.status, "%s", r.body)
				var calls []ToolCall
				content, finish := "", ""
				if stream {
					for _, e := range sseEvents(t, r.body) {
						if e == "[DONE]" {
							continue
						}
						var c ChatCompletionChunk
						require.NoError(t, json.Unmarshal([]byte(e), &c))
						for _, ch := range c.Choices {
							if ch.Delta.Content != nil {
								content += *ch.Delta.Content
							}
							for _, tc := range ch.Delta.ToolCalls {
								require.NotNil(t, tc.Index)
								assert.Equal(t, len(calls), *tc.Index)
								calls = append(calls, tc)
							}
							if ch.FinishReason != nil {
								finish = *ch.FinishReason
							}
						}
					}
				} else {
					var c ChatCompletion
					require.NoError(t, json.Unmarshal(r.body, &c))
					m := c.Choices[0].Message
					if m.Content != nil {
						content = *m.Content
					}
					calls, finish = m.ToolCalls, c.Choices[0].FinishReason
				}
				require.Len(t, calls, tc.calls, "stream=%v", stream)
				assert.Equal(t, tc.content, content, "stream=%v", stream)
				if tc.calls > 0 {
					assert.Equal(t, "tool_calls", finish)
					assert.Equal(t, "get_weather", calls[0].Function.Name)
					assert.JSONEq(t, tc.args, calls[0].Function.Arguments)
					assert.True(t, strings.HasPrefix(calls[0].ID, "call_"))
					assert.Equal(t, "function", calls[0].Type)
				} else {
					assert.Equal(t, "stop", finish)
				}
			}
		})
	}
	// parallel_tool_calls false keeps the first call only.
	r0 := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody(`say:[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_weather", "arguments": {"city": "B"}}]`,
		map[string]any{"tools": weatherTool, "parallel_tool_calls": false}))
	require.Equal(t, 200, r0.status, "%s", r0.body)
	var c0 ChatCompletion
	require.NoError(t, json.Unmarshal(r0.body, &c0))
	require.Len(t, c0.Choices[0].Message.ToolCalls, 1)
	assert.JSONEq(t, `{"city": "A"}`, c0.Choices[0].Message.ToolCalls[0].Function.Arguments)

	// tool_choice none: the same output is plain content and tools are not rendered.
	r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody(`say:{"name": "get_weather", "arguments": {}}`, map[string]any{"tools": weatherTool, "tool_choice": "none"}))
	require.Equal(t, 200, r.status)
	var c ChatCompletion
	require.NoError(t, json.Unmarshal(r.body, &c))
	assert.Empty(t, c.Choices[0].Message.ToolCalls)
	assert.NotContains(t, fakeTok{}.Decode(ts.adapter.reqs[len(ts.adapter.reqs)-1].Prompt), "tool get_weather")
}

func TestJSONToolChoiceForcedPrefill(t *testing.T) {
	ts := startServer(t, 0)
	// Named choice: the prompt ends with the call's opening; the model only writes the arguments.
	ts.adapter.scriptFn = func([]int32) []int32 { return append(fakeTok{}.Encode(`{"city": "Lima"}}`, false, false), fakeEOS) }
	r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("weather?", map[string]any{"tools": weatherTool,
		"tool_choice": map[string]any{"type": "function", "function": map[string]any{"name": "get_weather"}}}))
	require.Equal(t, 200, r.status, "%s", r.body)
	var c ChatCompletion
	require.NoError(t, json.Unmarshal(r.body, &c))
	require.Len(t, c.Choices[0].Message.ToolCalls, 1)
	assert.JSONEq(t, `{"city": "Lima"}`, c.Choices[0].Message.ToolCalls[0].Function.Arguments)
	prompt := fakeTok{}.Decode(ts.adapter.reqs[0].Prompt)
	assert.True(t, strings.HasSuffix(prompt, `assistant:{"name": "get_weather", "arguments": `), prompt)
	// required: the prefill opens a call, the model names the function.
	ts.adapter.scriptFn = func([]int32) []int32 {
		return append(fakeTok{}.Encode(`get_weather", "arguments": {"city": "Quito"}}`, false, false), fakeEOS)
	}
	r = doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("weather?", map[string]any{"tools": weatherTool, "tool_choice": "required"}))
	require.Equal(t, 200, r.status, "%s", r.body)
	require.NoError(t, json.Unmarshal(r.body, &c))
	require.Len(t, c.Choices[0].Message.ToolCalls, 1)
	assert.Equal(t, "get_weather", c.Choices[0].Message.ToolCalls[0].Function.Name)
}

// harmonyTokenizer is the tokenizer of the tiny synthetic gpt-oss model
// (byte-level BPE with the harmony special tokens).
func harmonyTokenizer(t *testing.T) *tokenizer.Tokenizer {
	t.Helper()
	path := filepath.Join(t.TempDir(), "gpt-oss.gguf")
	require.NoError(t, synth.Write(path, synth.Options{Arch: "gpt-oss", Size: "tiny", Seed: 1}, nil))
	f, err := gguf.Open(path)
	require.NoError(t, err)
	t.Cleanup(func() { _ = f.Close() })
	tok, err := tokenizer.FromGGUF(f)
	require.NoError(t, err)
	return tok
}

func TestHarmonyReasoningAndToolCalls(t *testing.T) {
	tok := harmonyTokenizer(t)
	ret, ok := tok.TokenID("<|return|>")
	require.True(t, ok)
	call, ok := tok.TokenID("<|call|>")
	require.True(t, ok)
	var output []int32
	ts := startServer(t, 0, func(o *Options, m *Model) {
		m.Info.Architecture = "gpt-oss"
		m.Info.ContextLength = 4096
		*m = NewModel("fake", m.Adapter, m.Info, m.Features, tok)
	})
	ts.adapter.scriptFn = func([]int32) []int32 { return output }

	output = append(tok.Encode("<|channel|>analysis<|message|>User wants hi.<|end|><|start|>assistant<|channel|>final<|message|>Hi there!",
		tokenizer.EncodeOptions{ParseSpecial: true}), ret)
	for _, stream := range []bool{false, true} {
		r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("hello", map[string]any{"reasoning_effort": "low", "stream": stream}))
		require.Equal(t, 200, r.status, "%s", r.body)
		content, reasoning, finish := collectChat(t, r, stream)
		assert.Equal(t, "Hi there!", content, "stream=%v", stream)
		assert.Equal(t, "User wants hi.", reasoning, "stream=%v", stream)
		assert.Equal(t, "stop", finish)
	}
	prompt := tok.Decode(ts.adapter.reqs[0].Prompt)
	assert.Contains(t, prompt, "Reasoning: low")
	assert.True(t, strings.HasSuffix(prompt, "<|start|>assistant"), prompt)

	// A tool call: commentary to=functions.NAME, ended by <|call|>.
	output = append(tok.Encode(`<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}`,
		tokenizer.EncodeOptions{ParseSpecial: true}), call)
	r := doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("weather in Paris?", map[string]any{"tools": weatherTool}))
	require.Equal(t, 200, r.status, "%s", r.body)
	var c ChatCompletion
	require.NoError(t, json.Unmarshal(r.body, &c))
	msg := c.Choices[0].Message
	require.Len(t, msg.ToolCalls, 1)
	assert.Equal(t, "get_weather", msg.ToolCalls[0].Function.Name)
	assert.JSONEq(t, `{"city":"Paris"}`, msg.ToolCalls[0].Function.Arguments)
	assert.Equal(t, "tool_calls", c.Choices[0].FinishReason)
	require.NotNil(t, msg.ReasoningContent)
	assert.Equal(t, "Need weather.", *msg.ReasoningContent)
	assert.Contains(t, tok.Decode(ts.adapter.reqs[len(ts.adapter.reqs)-1].Prompt), "get_weather")

	// Named tool choice prefills the call header; the model writes only the arguments.
	output = append(tok.Encode(`{"city":"Bern"}`, tokenizer.EncodeOptions{}), call)
	r = doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("weather?", map[string]any{"tools": weatherTool,
		"tool_choice": map[string]any{"type": "function", "function": map[string]any{"name": "get_weather"}}}))
	require.Equal(t, 200, r.status, "%s", r.body)
	require.NoError(t, json.Unmarshal(r.body, &c))
	require.Len(t, c.Choices[0].Message.ToolCalls, 1)
	assert.JSONEq(t, `{"city":"Bern"}`, c.Choices[0].Message.ToolCalls[0].Function.Arguments)
	assert.True(t, strings.HasSuffix(tok.Decode(ts.adapter.reqs[len(ts.adapter.reqs)-1].Prompt),
		"<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"))

	// Malformed output (no header) still reaches the client as content.
	output = append(tok.Encode("just words", tokenizer.EncodeOptions{}), ret)
	r = doReq(t, "POST", ts.url+"/v1/chat/completions", chatBody("hello", nil))
	require.Equal(t, 200, r.status)
	content, _, _ := collectChat(t, r, false)
	assert.Equal(t, "just words", content)
}

// collectChat returns content, reasoning and the finish reason of choice 0.
func collectChat(t *testing.T, r httpResult, stream bool) (string, string, string) {
	t.Helper()
	if !stream {
		var c ChatCompletion
		require.NoError(t, json.Unmarshal(r.body, &c))
		m := c.Choices[0].Message
		content, reasoning := "", ""
		if m.Content != nil {
			content = *m.Content
		}
		if m.ReasoningContent != nil {
			reasoning = *m.ReasoningContent
		}
		return content, reasoning, c.Choices[0].FinishReason
	}
	content, reasoning, finish := "", "", ""
	for _, e := range sseEvents(t, r.body) {
		if e == "[DONE]" {
			continue
		}
		var c ChatCompletionChunk
		require.NoError(t, json.Unmarshal([]byte(e), &c))
		for _, ch := range c.Choices {
			if ch.Delta.Content != nil {
				content += *ch.Delta.Content
			}
			if ch.Delta.ReasoningContent != nil {
				reasoning += *ch.Delta.ReasoningContent
			}
			if ch.FinishReason != nil {
				finish = *ch.FinishReason
			}
		}
	}
	return content, reasoning, finish
}
