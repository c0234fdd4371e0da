package server

import (
	"encoding/json"
	"strings"
)

// RenderFunc renders chat messages with a model's chat template (Jinja for
// llama/gpt2 files), ending with the assistant generation prompt.
type RenderFunc func(msgs []Message, tools []Tool) (string, error)

// TemplateFormat is the ChatFormat of models without harmony: the prompt
// comes from the model's chat template and tool calls follow the JSON
// tool-call convention below.
//
// JSON tool-call convention. When tools are offered (tool_choice auto,
// required or named), an assistant output is read as tool calls when the
// whole output, trimmed, is
//
//	{"name": "NAME", "arguments": {...}}            (or "parameters", as Llama 3.1 emits)
//	[{"name": ..., "arguments": ...}, ...]          (several calls)
//	<tool_call>{"name": ..., "arguments": ...}</tool_call>  (Hermes/Qwen style; may repeat)
//
// and every NAME is one of the offered tools; otherwise it is content. While
// streaming, output that starts like a tool call ({, [ or <tool_call>) is
// held until the end so half a call never reaches the client as content.
// tool_choice "required" prefills the assistant turn with `{"name": "` and
// a named choice with `{"name": "NAME", "arguments": `, so the model can only
// continue a call; the parser reads the prefill back in.
type TemplateFormat struct {
	name   string
	render RenderFunc
}

// NewTemplateFormat returns a TemplateFormat using render.
func NewTemplateFormat(name string, render RenderFunc) *TemplateFormat {
	return &TemplateFormat{name: name, render: render}
}

// Name implements ChatFormat.
func (f *TemplateFormat) Name() string { return f.name }

// SupportsReasoningEffort implements ChatFormat: templates have no reasoning levels.
func (f *TemplateFormat) SupportsReasoningEffort() bool { return false }

// Render implements ChatFormat.
func (f *TemplateFormat) Render(msgs []Message, opts ChatOptions) (ChatPrompt, error) {
	var tools []Tool
	if opts.ToolChoice != ToolChoiceNone {
		tools = opts.Tools
	}
	text, err := f.render(msgs, tools)
	if err != nil {
		return ChatPrompt{}, err
	}
	prefill := ""
	switch opts.ToolChoice {
	case ToolChoiceRequired:
		prefill = `{"name": "`
	case ToolChoiceNamed:
		n, _ := json.Marshal(opts.ToolName)
		prefill = `{"name": ` + string(n) + `, "arguments": `
	}
	names := map[string]bool{}
	for _, t := range tools {
		names[t.Name] = true
	}
	return ChatPrompt{Text: text + prefill, NewParser: func() OutputParser {
		if len(tools) == 0 {
			return plainParser{}
		}
		return &jsonToolParser{tools: names, buf: prefill, holding: prefill != ""}
	}}, nil
}

// jsonToolParser implements the JSON tool-call convention.
type jsonToolParser struct {
	tools   map[string]bool
	buf     string
	holding bool // output looks like a tool call: hold it
	decided bool // first non-space text seen
}

func (p *jsonToolParser) Push(_ int32, text string) []Delta {
	if p.holding {
		p.buf += text
		return nil
	}
	if p.decided {
		if text == "" {
			return nil
		}
		return []Delta{{Kind: DeltaContent, Text: text}}
	}
	p.buf += text
	t := strings.TrimLeft(p.buf, " \t\r\n")
	if t == "" {
		return nil
	}
	if strings.HasPrefix(t, "{") || strings.HasPrefix(t, "[") || strings.HasPrefix(t, "<tool_call>") {
		p.decided, p.holding = true, true
		return nil
	}
	if strings.HasPrefix("<tool_call>", t) {
		return nil // could still become <tool_call>
	}
	p.decided = true
	out := p.buf
	p.buf = ""
	return []Delta{{Kind: DeltaContent, Text: out}}
}

func (p *jsonToolParser) Finish(int32, bool) []Delta {
	buf := p.buf
	p.buf = ""
	if buf == "" {
		return nil
	}
	if p.holding {
		if calls, ok := parseToolCalls(buf, p.tools); ok {
			return calls
		}
	}
	return []Delta{{Kind: DeltaContent, Text: buf}}
}

type jsonCall struct {
	Name       string          `json:"name"`
	Arguments  json.RawMessage `json:"arguments"`
	Parameters json.RawMessage `json:"parameters"`
}

func (c jsonCall) delta() Delta {
	args := c.Arguments
	if len(args) == 0 {
		args = c.Parameters
	}
	a := string(args)
	if len(args) == 0 || string(args) == "null" {
		a = "{}"
	} else if args[0] == '"' { // arguments sent as a JSON string holding JSON
		var s string
		if json.Unmarshal(args, &s) == nil {
			a = s
		}
	}
	return Delta{Kind: DeltaToolCall, ToolName: c.Name, Arguments: a}
}

// parseToolCalls reads text written in the JSON tool-call convention.
func parseToolCalls(text string, tools map[string]bool) ([]Delta, bool) {
	t := strings.TrimSpace(text)
	var calls []jsonCall
	switch {
	case strings.HasPrefix(t, "<tool_call>"):
		for t != "" {
			rest, ok := strings.CutPrefix(t, "<tool_call>")
			if !ok {
				return nil, false
			}
			body, after, ok := strings.Cut(rest, "</tool_call>")
			if !ok {
				return nil, false
			}
			var c jsonCall
			if json.Unmarshal([]byte(strings.TrimSpace(body)), &c) != nil {
				return nil, false
			}
			calls = append(calls, c)
			t = strings.TrimSpace(after)
		}
	case strings.HasPrefix(t, "["):
		if json.Unmarshal([]byte(t), &calls) != nil {
			return nil, false
		}
	default:
		var c jsonCall
		if json.Unmarshal([]byte(t), &c) != nil {
			return nil, false
		}
		calls = []jsonCall{c}
	}
	if len(calls) == 0 {
		return nil, false
	}
	out := make([]Delta, 0, len(calls))
	for _, c := range calls {
		if !tools[c.Name] {
			return nil, false
		}
		out = append(out, c.delta())
	}
	return out, true
}
