package server

import (
	"strings"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/chat"
	"github.com/llama-orch/orch/sdk/chat/harmony"
	"github.com/llama-orch/orch/sdk/chat/template"
	"github.com/llama-orch/orch/sdk/tokenizer"
)

// This file plugs the real tokenizer and chat formats (sdk/tokenizer,
// sdk/chat/harmony, sdk/chat/template) into the server's interfaces.

// NewModel describes a loaded model for AddModel: the tokenizer comes from
// the GGUF file, the chat format is harmony for gpt-oss and the file's chat
// template (or ChatML when it has none) otherwise.
func NewModel(id string, a sdk.Adapter, info sdk.ModelInfo, features []string, tok *tokenizer.Tokenizer) Model {
	t := SDKTokenizer{T: tok}
	var f ChatFormat
	if info.Architecture == "gpt-oss" {
		f = &HarmonyFormat{tok: tok}
	} else {
		f = NewTemplateFormat("template", templateRender(tok))
	}
	return Model{ID: id, Adapter: a, Info: info, Features: features, Tokenizer: t, Chat: f}
}

// SDKTokenizer adapts *tokenizer.Tokenizer to Tokenizer.
type SDKTokenizer struct{ T *tokenizer.Tokenizer }

// Encode implements Tokenizer.
func (s SDKTokenizer) Encode(text string, addSpecial, parseSpecial bool) []int32 {
	return s.T.Encode(text, tokenizer.EncodeOptions{AddSpecial: addSpecial, ParseSpecial: parseSpecial})
}

// Decode implements Tokenizer.
func (s SDKTokenizer) Decode(ids []int32) string { return s.T.Decode(ids) }

// NewStreamDecoder implements Tokenizer.
func (s SDKTokenizer) NewStreamDecoder() StreamDecoder { return s.T.NewStreamDecoder() }

// TokenText implements Tokenizer.
func (s SDKTokenizer) TokenText(id int32) string { return s.T.TokenText(id) }

// VocabSize implements Tokenizer.
func (s SDKTokenizer) VocabSize() int { return s.T.VocabSize() }

// EndOfGeneration implements Tokenizer.
func (s SDKTokenizer) EndOfGeneration() []int32 { return s.T.EndOfGeneration() }

func toChat(msgs []Message) []chat.Message {
	out := make([]chat.Message, len(msgs))
	for i, m := range msgs {
		cm := chat.Message{Role: m.Role, Content: m.Content, Name: m.Name, ToolCallID: m.ToolCallID, Reasoning: m.Reasoning}
		for _, tc := range m.ToolCalls {
			cm.ToolCalls = append(cm.ToolCalls, chat.ToolCall{ID: tc.ID, Name: tc.Name, Arguments: tc.Arguments})
		}
		out[i] = cm
	}
	return out
}

func toChatTools(tools []Tool) []chat.Tool {
	var out []chat.Tool
	for _, t := range tools {
		out = append(out, chat.Tool{Name: t.Name, Description: t.Description, Parameters: t.Parameters})
	}
	return out
}

// templateRender renders with the model's Jinja chat template.
func templateRender(tok *tokenizer.Tokenizer) RenderFunc {
	var bos, eos string
	if id, ok := tok.BOS(); ok {
		bos = tok.TokenText(id)
	}
	if id, ok := tok.EOS(); ok {
		eos = tok.TokenText(id)
	}
	tmpl := tok.ChatTemplate()
	return func(msgs []Message, tools []Tool) (string, error) {
		return template.Render(tmpl, toChat(msgs), template.Options{AddGenerationPrompt: true,
			BOSToken: bos, EOSToken: eos, Tools: toChatTools(tools)})
	}
}

// HarmonyFormat is the ChatFormat of gpt-oss: prompts rendered in OpenAI's
// harmony format, output parsed into reasoning (analysis channel), content
// (final channel) and tool calls (messages to functions.NAME).
//
// tool_choice "required" prefills the assistant turn with
// `<|channel|>commentary to=functions.` and a named choice with
// `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>`, so
// the model continues a call; "none" renders no tools.
type HarmonyFormat struct{ tok *tokenizer.Tokenizer }

// Name implements ChatFormat.
func (h *HarmonyFormat) Name() string { return "harmony" }

// SupportsReasoningEffort implements ChatFormat.
func (h *HarmonyFormat) SupportsReasoningEffort() bool { return true }

// Render implements ChatFormat.
func (h *HarmonyFormat) Render(msgs []Message, opts ChatOptions) (ChatPrompt, error) {
	o := harmony.Options{ReasoningEffort: opts.ReasoningEffort}
	if opts.ToolChoice != ToolChoiceNone {
		o.Tools = toChatTools(opts.Tools)
	}
	text, err := harmony.Render(toChat(msgs), o)
	if err != nil {
		return ChatPrompt{}, badParam("messages", "cannot render the conversation in harmony format: %v", err)
	}
	prefill := ""
	switch opts.ToolChoice {
	case ToolChoiceRequired:
		prefill = "<|channel|>commentary to=functions."
	case ToolChoiceNamed:
		prefill = "<|channel|>commentary to=functions." + opts.ToolName + " <|constrain|>json<|message|>"
	}
	return ChatPrompt{Text: text + prefill, NewParser: func() OutputParser {
		p := &harmonyParser{tok: h.tok, p: harmony.NewParser()}
		feedText(p.p, prefill, func(ev []harmony.Event) { p.events(ev) })
		return p
	}}, nil
}

// feedText feeds text with special tokens written out (<|...|>) to a parser.
func feedText(p *harmony.Parser, s string, out func([]harmony.Event)) {
	for s != "" {
		i := strings.Index(s, "<|")
		if i < 0 {
			out(p.Feed(s, false))
			return
		}
		if i > 0 {
			out(p.Feed(s[:i], false))
			s = s[i:]
		}
		j := strings.Index(s, "|>")
		if j < 0 {
			out(p.Feed(s, false))
			return
		}
		out(p.Feed(s[:j+2], true))
		s = s[j+2:]
	}
}

type harmonyParser struct {
	tok      *tokenizer.Tokenizer
	p        *harmony.Parser
	hdr      harmony.Header
	streamed bool // content of the current message went out as deltas
}

func isToolRecipient(r string) bool { return r != "" && r != "assistant" && r != "all" }

func (h *harmonyParser) events(evs []harmony.Event) []Delta {
	var out []Delta
	for _, ev := range evs {
		switch ev.Kind {
		case harmony.EventHeader:
			h.hdr, h.streamed = ev.Header, false
		case harmony.EventContent:
			h.streamed = true
			switch {
			case ev.Delta == "":
			case isToolRecipient(h.hdr.Recipient):
				// arguments arrive whole with EventEnd
			case h.hdr.Channel == "analysis":
				out = append(out, Delta{Kind: DeltaReasoning, Text: ev.Delta})
			default:
				out = append(out, Delta{Kind: DeltaContent, Text: ev.Delta})
			}
		case harmony.EventEnd:
			switch {
			case ev.Msg == nil:
			case isToolRecipient(ev.Msg.Recipient):
				out = append(out, Delta{Kind: DeltaToolCall, ToolName: strings.TrimPrefix(ev.Msg.Recipient, "functions."),
					Arguments: ev.Msg.Content})
			case !h.streamed && ev.Msg.Content != "":
				// A message that ended without <|message|> (malformed output):
				// the parser keeps its text as content without streaming it.
				kind := DeltaContent
				if ev.Msg.Channel == "analysis" {
					kind = DeltaReasoning
				}
				out = append(out, Delta{Kind: kind, Text: ev.Msg.Content})
			}
			h.hdr, h.streamed = harmony.Header{}, false
		}
	}
	return out
}

// Push implements OutputParser.
func (h *harmonyParser) Push(id int32, text string) []Delta {
	if id >= 0 && h.tok.IsSpecial(id) {
		return h.events(h.p.Feed(h.tok.TokenText(id), true))
	}
	if text == "" {
		return nil
	}
	return h.events(h.p.Feed(text, false))
}

// Finish implements OutputParser: the end token (<|return|>, <|call|>) closes
// the last message.
func (h *harmonyParser) Finish(stopToken int32, ok bool) []Delta {
	var out []Delta
	if ok && h.tok.IsSpecial(stopToken) {
		out = h.events(h.p.Feed(h.tok.TokenText(stopToken), true))
	}
	return append(out, h.events(h.p.Close())...)
}
