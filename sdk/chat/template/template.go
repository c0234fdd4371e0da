// Package template renders chat prompts with the Jinja chat template a model
// carries in its GGUF metadata (tokenizer.chat_template), the way Hugging
// Face's apply_chat_template does (trim_blocks and lstrip_blocks on,
// raise_exception, strftime_now, namespace, tojson ...).
//
// The engine is github.com/ardanlabs/jinja, a pure-Go Jinja built for chat
// templates: it renders the real Llama 3.x, Qwen, Mistral and gpt-oss
// templates identically to Python's Jinja2 (see template_test.go and
// testdata/gen_expected.py, which produced the expected outputs with Jinja2
// 3.1.6).
//
// Models without a template get Fallback, a ChatML layout
// ("<|im_start|>role\ncontent<|im_end|>\n"), which is also what llama.cpp
// uses when a GGUF has no template.
package template

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/ardanlabs/jinja"

	"github.com/llama-orch/orch/sdk/chat"
)

// Fallback is the ChatML template used when a model has none.
const Fallback = `{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}`

// ErrTemplate wraps template compile and render failures (including
// raise_exception from the template).
var ErrTemplate = errors.New("chat template")

// Options are the variables templates expect besides messages.
type Options struct {
	AddGenerationPrompt bool
	BOSToken, EOSToken  string
	Tools               []chat.Tool
	// Vars are extra variables (date_string, enable_thinking,
	// reasoning_effort, ...).
	Vars map[string]any
	// Now, when set, backs strftime_now (tests pin the date); otherwise
	// the engine's clock is used.
	Now func() time.Time
}

var cache sync.Map // template source -> *jinja.Template

func compile(src string) (*jinja.Template, error) {
	if t, ok := cache.Load(src); ok {
		return t.(*jinja.Template), nil
	}
	t, err := jinja.Compile(rewriteTojson(src))
	if err != nil {
		return nil, fmt.Errorf("%w: compile: %w", ErrTemplate, err)
	}
	cache.Store(src, t)
	return t, nil
}

// Render renders msgs with tmpl ("" selects Fallback). Compiled templates
// are cached by source.
func Render(tmpl string, msgs []chat.Message, o Options) (string, error) {
	if tmpl == "" {
		tmpl = Fallback
	}
	t, err := compile(tmpl)
	if err != nil {
		return "", err
	}
	out, err := t.RenderValues(Data(msgs, o))
	if err != nil {
		return "", fmt.Errorf("%w: render: %w", ErrTemplate, err)
	}
	return out, nil
}

// Data builds the template variables Hugging Face templates read:
// messages (role, content, and where set name, tool_call_id,
// reasoning_content and thinking, tool_calls with id, type "function" and
// function.name / function.arguments parsed from JSON), tools (type
// "function" with function name/description/parameters),
// add_generation_prompt, bos_token, eos_token and Vars. Dicts keep their
// key order (JSON objects the order of the text), as Python's do.
func Data(msgs []chat.Message, o Options) map[string]jinja.Value {
	ms := make([]jinja.Value, 0, len(msgs))
	for _, m := range msgs {
		d := jinja.NewDict()
		dd := d.AsDict()
		dd.Set("role", jinja.NewString(m.Role))
		dd.Set("content", jinja.NewString(m.Content))
		if m.Name != "" {
			dd.Set("name", jinja.NewString(m.Name))
		}
		if m.ToolCallID != "" {
			dd.Set("tool_call_id", jinja.NewString(m.ToolCallID))
		}
		if m.Reasoning != "" {
			dd.Set("reasoning_content", jinja.NewString(m.Reasoning))
			dd.Set("thinking", jinja.NewString(m.Reasoning))
		}
		if len(m.ToolCalls) > 0 {
			calls := make([]jinja.Value, 0, len(m.ToolCalls))
			for _, c := range m.ToolCalls {
				call := jinja.NewDict()
				if c.ID != "" {
					call.AsDict().Set("id", jinja.NewString(c.ID))
				}
				call.AsDict().Set("type", jinja.NewString("function"))
				fn := jinja.NewDict()
				fn.AsDict().Set("name", jinja.NewString(c.Name))
				fn.AsDict().Set("arguments", jsonValue([]byte(c.Arguments)))
				call.AsDict().Set("function", fn)
				calls = append(calls, call)
			}
			dd.Set("tool_calls", jinja.NewList(calls))
		}
		ms = append(ms, d)
	}
	data := map[string]jinja.Value{}
	for k, v := range o.Vars {
		data[k] = jinja.FromGoValue(v)
	}
	if o.Now != nil {
		now := o.Now
		data["strftime_now"] = jinja.NewCallable("strftime_now", func(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
			f := "%Y-%m-%d"
			if len(args) > 0 && args[0].IsString() {
				f = args[0].AsString()
			}
			return jinja.NewString(strftime(now(), f)), nil
		})
	}
	data[tojsonGlobal] = jinja.NewCallable(tojsonGlobal, orchTojson)
	data["messages"] = jinja.NewList(ms)
	data["add_generation_prompt"] = jinja.NewBool(o.AddGenerationPrompt)
	data["bos_token"] = jinja.NewString(o.BOSToken)
	data["eos_token"] = jinja.NewString(o.EOSToken)
	if len(o.Tools) > 0 {
		tools := make([]jinja.Value, 0, len(o.Tools))
		for _, t := range o.Tools {
			fn := jinja.NewDict()
			fn.AsDict().Set("name", jinja.NewString(t.Name))
			if t.Description != "" {
				fn.AsDict().Set("description", jinja.NewString(t.Description))
			}
			if len(t.Parameters) > 0 {
				fn.AsDict().Set("parameters", jsonValue(t.Parameters))
			}
			tool := jinja.NewDict()
			tool.AsDict().Set("type", jinja.NewString("function"))
			tool.AsDict().Set("function", fn)
			tools = append(tools, tool)
		}
		data["tools"] = jinja.NewList(tools)
	}
	return data
}

// jsonValue decodes JSON text into ordered template values, keeping the
// text as a string when it is not JSON.
func jsonValue(b []byte) jinja.Value {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	v, err := decodeValue(d)
	if err != nil || d.More() {
		return jinja.NewString(string(b))
	}
	if _, err := d.Token(); err != io.EOF {
		return jinja.NewString(string(b))
	}
	return v
}

func decodeValue(d *json.Decoder) (jinja.Value, error) {
	t, err := d.Token()
	if err != nil {
		return jinja.Undefined(), err
	}
	switch x := t.(type) {
	case json.Delim:
		switch x {
		case '{':
			v := jinja.NewDict()
			for d.More() {
				k, err := d.Token()
				if err != nil {
					return v, err
				}
				ks, _ := k.(string)
				e, err := decodeValue(d)
				if err != nil {
					return v, err
				}
				v.AsDict().Set(ks, e)
			}
			_, err := d.Token()
			return v, err
		case '[':
			var items []jinja.Value
			for d.More() {
				e, err := decodeValue(d)
				if err != nil {
					return jinja.Undefined(), err
				}
				items = append(items, e)
			}
			_, err := d.Token()
			return jinja.NewList(items), err
		}
		return jinja.Undefined(), fmt.Errorf("unexpected %v", x)
	default:
		return jinja.FromGoValue(x), nil
	}
}
