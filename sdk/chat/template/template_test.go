package template

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/chat"
)

type testCase struct {
	Name     string
	NoGen    bool `json:"no_gen"`
	Tools    bool
	Messages []struct {
		chat.Message
		ReasoningContent string `json:"reasoning_content"`
		ToolCalls        []struct {
			ID, Name, Arguments string
		} `json:"tool_calls"`
	}
}

func loadCases(t *testing.T) ([]chat.Tool, []testCase) {
	b, err := os.ReadFile("testdata/cases.json")
	require.NoError(t, err)
	var spec struct {
		Tools []chat.Tool
		Cases []testCase
	}
	require.NoError(t, json.Unmarshal(b, &spec))
	return spec.Tools, spec.Cases
}

func (c testCase) messages() []chat.Message {
	var out []chat.Message
	for _, m := range c.Messages {
		cm := m.Message
		cm.Reasoning = m.ReasoningContent
		cm.ToolCalls = nil
		for _, tc := range m.ToolCalls {
			cm.ToolCalls = append(cm.ToolCalls, chat.ToolCall{ID: tc.ID, Name: tc.Name, Arguments: tc.Arguments})
		}
		out = append(out, cm)
	}
	return out
}

// TestTemplatesMatchJinja2 renders real model templates (testdata/templates)
// with the cases of testdata/cases.json and compares with Python Jinja2's
// output (testdata/expected.json, from gen_expected.py).
func TestTemplatesMatchJinja2(t *testing.T) {
	tools, cases := loadCases(t)
	b, err := os.ReadFile("testdata/expected.json")
	require.NoError(t, err)
	var expected map[string]struct {
		Text  *string
		Error string
	}
	require.NoError(t, json.Unmarshal(b, &expected))
	files, err := filepath.Glob("testdata/templates/*.jinja")
	require.NoError(t, err)
	sort.Strings(files)
	require.NotEmpty(t, files)
	now := func() time.Time { return time.Date(2026, 11, 25, 18, 43, 0, 0, time.UTC) }
	for _, f := range files {
		src, err := os.ReadFile(f)
		require.NoError(t, err)
		for _, c := range cases {
			key := filepath.Base(f) + "/" + c.Name
			t.Run(key, func(t *testing.T) {
				want, ok := expected[key]
				require.True(t, ok, "no expected output for %s: rerun gen_expected.py", key)
				o := Options{AddGenerationPrompt: !c.NoGen, BOSToken: "<|begin_of_text|>", EOSToken: "<|eot_id|>",
					Vars: map[string]any{"date_string": "25 Nov 2026"}, Now: now}
				if c.Tools {
					o.Tools = tools
				}
				got, err := Render(string(src), c.messages(), o)
				if want.Text == nil {
					require.Error(t, err, "Jinja2 raised %s", want.Error)
					assert.ErrorIs(t, err, ErrTemplate)
					return
				}
				require.NoError(t, err)
				assert.Equal(t, *want.Text, got)
			})
		}
	}
}

func TestFallback(t *testing.T) {
	got, err := Render("", []chat.Message{{Role: "system", Content: "S"}, {Role: "user", Content: "U"}}, Options{AddGenerationPrompt: true})
	require.NoError(t, err)
	assert.Equal(t, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n", got)
}

func TestErrors(t *testing.T) {
	_, err := Render("{% if %}", nil, Options{})
	require.ErrorIs(t, err, ErrTemplate)
	_, err = Render("{{ raise_exception('nope') }}", nil, Options{})
	require.ErrorIs(t, err, ErrTemplate)
	assert.Contains(t, err.Error(), "nope")
}

func TestStrftime(t *testing.T) {
	tm := time.Date(2026, 1, 5, 15, 4, 9, 0, time.UTC)
	assert.Equal(t, "05 Jan 2026 15:04:09 PM Monday 005 %q 26", strftime(tm, "%d %b %Y %H:%M:%S %p %A %j %q %y"))
	assert.Equal(t, strings.Repeat("x", 3), strftime(tm, "xxx"))
}

func TestRewriteTojson(t *testing.T) {
	for in, want := range map[string]string{
		"{{ t | tojson(indent=4) }}":                    "{{ __orch_tojson(t, indent=4) }}",
		"{{- a.b['c'][0] |tojson(indent=2) + 'x' }}":    "{{- __orch_tojson(a.b['c'][0], indent=2) + 'x' }}",
		"{{ x | trim | tojson(indent=4) }}":             "{{ __orch_tojson(x | trim, indent=4) }}",
		"{{ f(a, b) | tojson(separators=(',', ':')) }}": "{{ __orch_tojson(f(a, b), separators=(',', ':')) }}",
		"{{ x | tojson }} {{ y | tojson() }}":           "{{ x | tojson }} {{ y | tojson() }}",
		"{{ 'a' ~ (x | tojson(indent=4)) }}":            "{{ 'a' ~ (__orch_tojson(x, indent=4)) }}",
	} {
		assert.Equal(t, want, rewriteTojson(in), in)
	}
	assert.Equal(t, "1.0 1e-05 1e+16 100000.0 0.5 -2.25", strings.Join([]string{pyFloat(1), pyFloat(1e-5), pyFloat(1e16), pyFloat(1e5), pyFloat(0.5), pyFloat(-2.25)}, " "))
}
