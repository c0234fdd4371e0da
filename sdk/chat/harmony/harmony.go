// Package harmony renders chat conversations in OpenAI's harmony format
// (gpt-oss) and parses the model's harmony output back into reasoning, final
// text and tool calls, as openai/harmony's renderer and StreamableParser do
// (docs/format.md of github.com/openai/harmony).
//
// Mapping from chat messages: system and developer messages become the
// developer message's "# Instructions"; the system message is generated from
// Options (identity, knowledge cutoff, date, reasoning effort, channels);
// function tools are listed in the developer message as a TypeScript-like
// "namespace functions"; an assistant message renders its Reasoning on the
// analysis channel, its tool calls on commentary addressed to
// functions.NAME (ending in <|call|>), and its Content on final (or, when it
// also makes tool calls, as a commentary preamble); tool results are
// messages from functions.NAME to the assistant. Chain of thought of turns
// that ended in a final answer is dropped, as the format guide asks; the
// analysis of an ongoing tool-calling turn is kept.
package harmony

import (
	"errors"
	"fmt"
	"strings"

	"github.com/llama-orch/orch/sdk/chat"
)

// Special tokens of the format.
const (
	TokStart     = "<|start|>"
	TokEnd       = "<|end|>"
	TokMessage   = "<|message|>"
	TokChannel   = "<|channel|>"
	TokConstrain = "<|constrain|>"
	TokReturn    = "<|return|>"
	TokCall      = "<|call|>"
)

// DefaultIdentity is the model identity gpt-oss was trained with.
const DefaultIdentity = "You are ChatGPT, a large language model trained by OpenAI."

// ErrInvalidConversation reports messages that cannot be rendered.
var ErrInvalidConversation = errors.New("invalid harmony conversation")

// Options shape the system and developer messages.
type Options struct {
	// ReasoningEffort is "low", "medium" (default) or "high".
	ReasoningEffort string
	// Tools are function tools (namespace "functions").
	Tools []chat.Tool
	// ModelIdentity defaults to DefaultIdentity.
	ModelIdentity string
	// KnowledgeCutoff defaults to "2024-06".
	KnowledgeCutoff string
	// CurrentDate ("2025-06-28") is omitted when empty.
	CurrentDate string
	// KeepAnalysis keeps the chain of thought of completed turns.
	KeepAnalysis bool
	// NoGenerationPrompt leaves off the trailing "<|start|>assistant".
	NoGenerationPrompt bool
}

// SystemMessage renders the system message content for o.
func SystemMessage(o Options) (string, error) {
	effort := o.ReasoningEffort
	switch effort {
	case "":
		effort = "medium"
	case "low", "medium", "high":
	default:
		return "", fmt.Errorf("%w: reasoning effort %q (want low, medium or high)", ErrInvalidConversation, effort)
	}
	id := o.ModelIdentity
	if id == "" {
		id = DefaultIdentity
	}
	cut := o.KnowledgeCutoff
	if cut == "" {
		cut = "2024-06"
	}
	top := []string{id, "Knowledge cutoff: " + cut}
	if o.CurrentDate != "" {
		top = append(top, "Current date: "+o.CurrentDate)
	}
	channels := "# Valid channels: analysis, commentary, final. Channel must be included for every message."
	if len(o.Tools) > 0 {
		channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
	}
	return strings.Join([]string{strings.Join(top, "\n"), "Reasoning: " + effort, channels}, "\n\n"), nil
}

// ToolsSection renders "# Tools" with the functions namespace.
func ToolsSection(tools []chat.Tool) string {
	lines := []string{"## functions\n", "namespace functions {\n"}
	for _, t := range tools {
		if t.Description != "" {
			for _, l := range strings.Split(strings.TrimSuffix(t.Description, "\n"), "\n") {
				lines = append(lines, "// "+strings.TrimSuffix(l, "\r"))
			}
		}
		if len(t.Parameters) > 0 && string(t.Parameters) != "null" {
			lines = append(lines, fmt.Sprintf("type %s = (_: %s) => any;\n", t.Name, schemaToTypeScript(t.Parameters, "")))
		} else {
			lines = append(lines, fmt.Sprintf("type %s = () => any;\n", t.Name))
		}
	}
	lines = append(lines, "} // namespace functions")
	return "# Tools\n\n" + strings.Join(lines, "\n")
}

// DeveloperMessage renders the developer message content ("" when there is
// nothing to say).
func DeveloperMessage(instructions string, tools []chat.Tool) string {
	var sections []string
	if instructions != "" {
		sections = append(sections, "# Instructions", instructions)
	}
	if len(tools) > 0 {
		sections = append(sections, ToolsSection(tools))
	}
	return strings.Join(sections, "\n\n")
}

// Header describes one harmony message.
type Header struct {
	Role        string // "assistant", "user", ...; for tool output the tool name (functions.NAME)
	Recipient   string // "functions.NAME" for a tool call, "assistant" for tool output
	Channel     string // analysis, commentary, final
	ContentType string // e.g. "json" or "<|constrain|>json"
}

// Msg is one rendered or parsed harmony message.
type Msg struct {
	Header
	Content string
	// End is the token that ended it: <|end|>, <|call|> or <|return|>.
	End string
}

// RenderMessage writes one message. The end token is <|call|> for an
// assistant message with a recipient, else m.End or <|end|>.
func RenderMessage(sb *strings.Builder, m Msg) {
	sb.WriteString(TokStart + m.Role)
	if m.Recipient != "" && m.Recipient != "all" {
		sb.WriteString(" to=" + m.Recipient)
	}
	if m.Channel != "" {
		sb.WriteString(TokChannel + m.Channel)
	}
	if m.ContentType != "" {
		sb.WriteString(" " + m.ContentType)
	}
	sb.WriteString(TokMessage + m.Content)
	switch {
	case m.Role == chat.RoleAssistant && m.Recipient != "":
		sb.WriteString(TokCall)
	case m.End != "":
		sb.WriteString(m.End)
	default:
		sb.WriteString(TokEnd)
	}
}

// Messages converts chat messages into harmony messages (system and
// developer first).
func Messages(msgs []chat.Message, o Options) ([]Msg, error) {
	sys, err := SystemMessage(o)
	if err != nil {
		return nil, err
	}
	out := []Msg{{Header: Header{Role: chat.RoleSystem}, Content: sys}}
	var instr []string
	for _, m := range msgs {
		if m.Role == chat.RoleSystem || m.Role == chat.RoleDeveloper {
			instr = append(instr, m.Content)
		}
	}
	if dev := DeveloperMessage(strings.Join(instr, "\n\n"), o.Tools); dev != "" {
		out = append(out, Msg{Header: Header{Role: chat.RoleDeveloper}, Content: dev})
	}
	// Chain of thought is dropped from assistant turns followed by a final
	// answer later in the conversation.
	lastFinal := -1
	for i, m := range msgs {
		if m.Role == chat.RoleAssistant && m.Content != "" && len(m.ToolCalls) == 0 {
			lastFinal = i
		}
	}
	callNames := map[string]string{}
	for i, m := range msgs {
		switch m.Role {
		case chat.RoleSystem, chat.RoleDeveloper:
		case chat.RoleUser:
			out = append(out, Msg{Header: Header{Role: chat.RoleUser}, Content: m.Content})
		case chat.RoleAssistant:
			if m.Reasoning != "" && (o.KeepAnalysis || i > lastFinal || (i == lastFinal && i == len(msgs)-1)) {
				out = append(out, Msg{Header: Header{Role: chat.RoleAssistant, Channel: "analysis"}, Content: m.Reasoning})
			}
			if len(m.ToolCalls) > 0 {
				if m.Content != "" {
					out = append(out, Msg{Header: Header{Role: chat.RoleAssistant, Channel: "commentary"}, Content: m.Content})
				}
				for _, tc := range m.ToolCalls {
					if tc.Name == "" {
						return nil, fmt.Errorf("%w: message %d: tool call without a name", ErrInvalidConversation, i)
					}
					callNames[tc.ID] = tc.Name
					out = append(out, Msg{Header: Header{Role: chat.RoleAssistant, Recipient: "functions." + tc.Name,
						Channel: "commentary", ContentType: TokConstrain + "json"}, Content: tc.Arguments})
				}
			} else if m.Content != "" {
				out = append(out, Msg{Header: Header{Role: chat.RoleAssistant, Channel: "final"}, Content: m.Content})
			}
		case chat.RoleTool:
			name := m.Name
			if name == "" {
				name = callNames[m.ToolCallID]
			}
			if name == "" {
				return nil, fmt.Errorf("%w: message %d: tool result without a name or a known tool_call_id", ErrInvalidConversation, i)
			}
			if !strings.Contains(name, ".") {
				name = "functions." + name
			}
			out = append(out, Msg{Header: Header{Role: name, Recipient: chat.RoleAssistant, Channel: "commentary"}, Content: m.Content})
		default:
			return nil, fmt.Errorf("%w: message %d: unknown role %q", ErrInvalidConversation, i, m.Role)
		}
	}
	return out, nil
}

// Render produces the prompt text (with special-token text, to be encoded
// with special parsing) ending in "<|start|>assistant".
func Render(msgs []chat.Message, o Options) (string, error) {
	hm, err := Messages(msgs, o)
	if err != nil {
		return "", err
	}
	return RenderMessages(hm, !o.NoGenerationPrompt), nil
}

// RenderMessages renders harmony messages, optionally followed by the
// generation prompt "<|start|>assistant".
func RenderMessages(msgs []Msg, generationPrompt bool) string {
	var sb strings.Builder
	for _, m := range msgs {
		RenderMessage(&sb, m)
	}
	if generationPrompt {
		sb.WriteString(TokStart + chat.RoleAssistant)
	}
	return sb.String()
}
