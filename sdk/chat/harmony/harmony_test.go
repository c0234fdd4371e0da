package harmony

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/chat"
	"github.com/llama-orch/orch/sdk/tokenizer"
	"github.com/llama-orch/orch/sdk/tokenizer/tiktoken"
)

var weatherTools = []chat.Tool{
	{Name: "get_location", Description: "Gets the location of the user."},
	{Name: "get_current_weather", Description: "Gets the current weather in the provided location.",
		Parameters: json.RawMessage(`{"type":"object","properties":{"location":{"type":"string","description":"The city and state, e.g. San Francisco, CA"},"format":{"type":"string","enum":["celsius","fahrenheit"],"default":"celsius"}},"required":["location"]}`)},
	{Name: "get_multiple_weathers", Description: "Gets the current weather in the provided list of locations.",
		Parameters: json.RawMessage(`{"type":"object","properties":{"locations":{"type":"array","items":{"type":"string"},"description":"List of city and state, e.g. [\"San Francisco, CA\", \"New York, NY\"]"},"format":{"type":"string","enum":["celsius","fahrenheit"],"default":"celsius"}},"required":["locations"]}`)},
}

// The function-calling example of openai/harmony docs/format.md.
const docSystemAndTools = `<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: 2025-06-28

Reasoning: high

# Valid channels: analysis, commentary, final. Channel must be included for every message.
Calls to these tools must go to the commentary channel: 'functions'.<|end|><|start|>developer<|message|># Instructions

Use a friendly tone.

# Tools

## functions

namespace functions {

// Gets the location of the user.
type get_location = () => any;

// Gets the current weather in the provided location.
type get_current_weather = (_: {
// The city and state, e.g. San Francisco, CA
location: string,
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

// Gets the current weather in the provided list of locations.
type get_multiple_weathers = (_: {
// List of city and state, e.g. ["San Francisco, CA", "New York, NY"]
locations: string[],
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

} // namespace functions<|end|><|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant`

var docOpts = Options{ReasoningEffort: "high", Tools: weatherTools, CurrentDate: "2025-06-28"}

func TestRenderDocExample(t *testing.T) {
	msgs := []chat.Message{
		{Role: "system", Content: "Use a friendly tone."},
		{Role: "user", Content: "What is the weather like in SF?"},
	}
	got, err := Render(msgs, docOpts)
	require.NoError(t, err)
	assert.Equal(t, docSystemAndTools, got)
}

func TestRenderToolConversation(t *testing.T) {
	msgs := []chat.Message{
		{Role: "system", Content: "Use a friendly tone."},
		{Role: "user", Content: "What is the weather like in SF?"},
		{Role: "assistant", Reasoning: "Need to use function get_weather.",
			ToolCalls: []chat.ToolCall{{ID: "call_1", Name: "get_weather", Arguments: `{"location":"San Francisco"}`}}},
		{Role: "tool", ToolCallID: "call_1", Content: `{"sunny": true, "temperature": 20}`},
	}
	got, err := Render(msgs, docOpts)
	require.NoError(t, err)
	want := strings.TrimSuffix(docSystemAndTools, "<|start|>assistant") +
		`<|start|>assistant<|channel|>analysis<|message|>Need to use function get_weather.<|end|>` +
		`<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"location":"San Francisco"}<|call|>` +
		`<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sunny": true, "temperature": 20}<|end|>` +
		`<|start|>assistant`
	assert.Equal(t, want, got)
}

func TestRenderDropsFinishedAnalysis(t *testing.T) {
	msgs := []chat.Message{
		{Role: "user", Content: "What is 2 + 2?"},
		{Role: "assistant", Reasoning: "Simple arithmetic.", Content: "2 + 2 = 4."},
		{Role: "user", Content: "What about 9 / 2?"},
	}
	got, err := Render(msgs, Options{})
	require.NoError(t, err)
	assert.NotContains(t, got, "Simple arithmetic")
	assert.True(t, strings.HasSuffix(got, `<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|end|><|start|>user<|message|>What about 9 / 2?<|end|><|start|>assistant`), got)
	assert.Contains(t, got, "Reasoning: medium")
	assert.NotContains(t, got, "<|start|>developer")

	got, err = Render(msgs, Options{KeepAnalysis: true})
	require.NoError(t, err)
	assert.Contains(t, got, "<|channel|>analysis<|message|>Simple arithmetic.<|end|>")

	_, err = Render(msgs, Options{ReasoningEffort: "extreme"})
	require.ErrorIs(t, err, ErrInvalidConversation)
	_, err = Render([]chat.Message{{Role: "tool", Content: "x"}}, Options{})
	require.ErrorIs(t, err, ErrInvalidConversation)
	_, err = Render([]chat.Message{{Role: "robot", Content: "x"}}, Options{})
	require.ErrorIs(t, err, ErrInvalidConversation)
}

// openai/harmony test-data/test_multi_turn_auto_drop_analysis.txt.
const refMultiTurn = "<|start|>developer<|message|>You are a helpful assistant that analyzes code and provides detailed feedback.<|end|><|start|>user<|message|>Can you help me optimize this Python function?\n\ndef fibonacci(n):\n    if n <= 1:\n        return n\n    return fibonacci(n-1) + fibonacci(n-2)<|end|><|start|>assistant<|channel|>final<|message|>This recursive Fibonacci has exponential time complexity. Would you like me to show optimized versions?<|end|><|start|>user<|message|>Yes, and benchmark them<|end|><|start|>assistant<|channel|>final<|message|>I'll benchmark both versions for you.<|end|><|start|>user<|message|>Run the benchmark for n=30<|end|><|start|>assistant<|channel|>analysis<|message|>I need to execute Python code to run the benchmark for n=30.<|end|><|start|>assistant to=functions.python<|channel|>commentary<|message|>{\"code\": \"import timeit\\n\\ndef fib_recursive(n):\\n    if n <= 1: return n\\n    return fib_recursive(n-1) + fib_recursive(n-2)\\n\\ndef fib_iter(n):\\n    if n <= 1: return n\\n    a, b = 0, 1\\n    for _ in range(2, n+1): a, b = b, a+b\\n    return b\\n\\nprint(timeit.timeit(lambda: fib_recursive(30), number=1))\\nprint(timeit.timeit(lambda: fib_iter(30), number=1000))\"}<|call|><|start|>assistant"

// TestReferenceRoundTrip parses the reference rendering into messages and
// renders them back to the same text.
func TestReferenceRoundTrip(t *testing.T) {
	body := strings.TrimSuffix(refMultiTurn, "<|start|>assistant")
	p := NewParser()
	p.Feed(TokStart, true) // the reference text starts with a full message
	p.role = ""
	msgs := feedText(p, strings.TrimPrefix(body, TokStart))
	require.Len(t, msgs, 8)
	assert.Equal(t, Header{Role: "developer"}, msgs[0].Header)
	assert.Equal(t, Header{Role: "assistant", Channel: "final"}, msgs[2].Header)
	assert.Equal(t, Header{Role: "assistant", Channel: "commentary", Recipient: "functions.python"}, msgs[7].Header)
	assert.Equal(t, TokCall, msgs[7].End)
	assert.Equal(t, refMultiTurn, RenderMessages(msgs, true))
}

func feedText(p *Parser, s string) []Msg {
	for len(s) > 0 {
		i := strings.Index(s, "<|")
		if i != 0 {
			if i < 0 {
				i = len(s)
			}
			p.Feed(s[:i], false)
			s = s[i:]
			continue
		}
		j := strings.Index(s, "|>") + 2
		p.Feed(s[:j], true)
		s = s[j:]
	}
	p.Close()
	return p.Messages()
}

func TestParseDocOutputs(t *testing.T) {
	msgs := Parse(`<|channel|>analysis<|message|>User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.<|end|><|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>`)
	require.Len(t, msgs, 2)
	r := Collect(msgs)
	assert.Equal(t, `User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.`, r.Reasoning)
	assert.Equal(t, "2 + 2 = 4.", r.Content)
	assert.Equal(t, TokReturn, msgs[1].End)

	msgs = Parse(`<|channel|>analysis<|message|>Need to use function get_weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location":"San Francisco"}<|call|>`)
	require.Len(t, msgs, 2)
	assert.Equal(t, Header{Role: "assistant", Channel: "commentary", Recipient: "functions.get_weather", ContentType: "<|constrain|>json"}, msgs[1].Header)
	r = Collect(msgs)
	require.Len(t, r.ToolCalls, 1)
	assert.Equal(t, chat.ToolCall{Name: "get_weather", Arguments: `{"location":"San Francisco"}`}, r.ToolCalls[0])
	assert.Equal(t, "Need to use function get_weather.", r.Reasoning)

	// Preamble then a tool call with the recipient before the channel and no space before <|constrain|>.
	msgs = Parse(`<|channel|>commentary<|message|>**Action plan**: go<|end|><|start|>assistant to=functions.generate_file<|channel|>commentary<|constrain|>json<|message|>{"path": "index.html"}<|call|>`)
	require.Len(t, msgs, 2)
	assert.Equal(t, "functions.generate_file", msgs[1].Recipient)
	assert.Equal(t, "<|constrain|>json", msgs[1].ContentType)
	r = Collect(msgs)
	assert.Equal(t, "**Action plan**: go", r.Content)
	require.Len(t, r.ToolCalls, 1)

	// Malformed output never fails: text without a header, truncated output.
	msgs = Parse("just text")
	require.Len(t, msgs, 1)
	assert.Equal(t, "just text", msgs[0].Content)
	msgs = Parse("<|channel|>final<|message|>cut off")
	require.Len(t, msgs, 1)
	assert.Equal(t, "cut off", msgs[0].Content)
	assert.Equal(t, "final", msgs[0].Channel)
}

var (
	o200kTok *tokenizer.Tokenizer
)

func o200k(t *testing.T) *tokenizer.Tokenizer {
	t.Helper()
	if o200kTok == nil {
		v, err := tiktoken.O200kHarmony()
		require.NoError(t, err)
		o200kTok, err = tokenizer.New(v)
		require.NoError(t, err)
	}
	return o200kTok
}

// The StreamableParser example of docs/format.md: token ids of model output.
func TestTokenParserDocTokens(t *testing.T) {
	tok := o200k(t)
	ids := []int32{200005, 35644, 200008, 1844, 31064, 25, 392, 4827, 382, 220, 17, 659, 220, 17, 16842, 12295, 81645,
		13, 51441, 6052, 13, 200007, 200006, 173781, 200005, 17196, 200008, 17, 659, 220, 17, 314, 220, 19, 13, 200002}
	p := NewTokenParser(tok)
	var deltas []string
	var headers []Header
	for _, id := range ids {
		for _, e := range p.Add(id) {
			switch e.Kind {
			case EventHeader:
				headers = append(headers, e.Header)
			case EventContent:
				deltas = append(deltas, e.Delta)
			}
		}
	}
	r := p.Result()
	assert.Equal(t, `User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.`, r.Reasoning)
	assert.Equal(t, "2 + 2 = 4.", r.Content)
	assert.Equal(t, []Header{{Role: "assistant", Channel: "analysis"}, {Role: "assistant", Channel: "final"}}, headers)
	assert.Equal(t, r.Reasoning+r.Content, strings.Join(deltas, ""))
}

// TestRenderEncodeParse renders a conversation, encodes it with special
// parsing, and parses an assistant continuation token by token, with
// multi-byte characters split across tokens.
func TestRenderEncodeParse(t *testing.T) {
	tok := o200k(t)
	prompt, err := Render([]chat.Message{{Role: "user", Content: "Say hi in Japanese"}}, Options{ReasoningEffort: "low"})
	require.NoError(t, err)
	ids := tok.Encode(prompt, tokenizer.EncodeOptions{ParseSpecial: true})
	start, _ := tok.TokenID(TokStart)
	assert.Equal(t, start, ids[len(ids)-2])
	assert.Equal(t, prompt, tok.Decode(ids))

	out := "<|channel|>analysis<|message|>Greeting → こんにちは 👋🏽<|end|><|start|>assistant<|channel|>final<|message|>こんにちは！🤖<|return|>"
	gen := tok.Encode(out, tokenizer.EncodeOptions{ParseSpecial: true})
	p := NewTokenParser(tok)
	var content strings.Builder
	for _, id := range gen {
		for _, e := range p.Add(id) {
			if e.Kind == EventContent {
				assert.True(t, utf8Valid(e.Delta), "delta %q", e.Delta)
				if e.Header.Channel == "final" {
					content.WriteString(e.Delta)
				}
			}
		}
	}
	r := p.Result()
	assert.Equal(t, "Greeting → こんにちは 👋🏽", r.Reasoning)
	assert.Equal(t, "こんにちは！🤖", r.Content)
	assert.Equal(t, r.Content, content.String())
	assert.Contains(t, tok.EndOfGeneration(), mustID(t, tok, TokReturn))
	assert.Contains(t, tok.EndOfGeneration(), mustID(t, tok, TokCall))
}

func mustID(t *testing.T, tok *tokenizer.Tokenizer, s string) int32 {
	id, ok := tok.TokenID(s)
	require.True(t, ok, s)
	return id
}

func utf8Valid(s string) bool { return strings.ToValidUTF8(s, "") == s }

func TestSchemaToTypeScript(t *testing.T) {
	for _, tc := range []struct{ schema, want string }{
		{`{"type":"object","properties":{}}`, "{\n}"},
		{`{"type":"integer"}`, "number"},
		{`{"type":["string","integer"]}`, "string | number"},
		{`{"type":"array"}`, "Array<any>"},
		{`{"type":"object","properties":{"n":{"type":"number","default":3},"s":{"type":"string","default":"x","nullable":true},"o":{"type":"object","properties":{"a":{"type":"boolean"}},"required":["a"]}},"required":["n"]}`,
			"{\nn: number, // default: 3\ns?: string | null, // default: \"x\"\no?: {\n    a: boolean,\n    },\n}"},
		{`{"oneOf":[{"type":"string","description":"a name"},{"type":"number","default":1}]}`, "\n | string // a name\n | number // default: 1"},
		{`not json`, "any"},
	} {
		assert.Equal(t, tc.want, schemaToTypeScript(json.RawMessage(tc.schema), ""), tc.schema)
	}
}
