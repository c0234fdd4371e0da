package harmony

import (
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/llama-orch/orch/sdk/chat"
	"github.com/llama-orch/orch/sdk/tokenizer"
)

// EventKind tells what a parser Event reports.
type EventKind int

const (
	// EventHeader: a message header is complete (Event.Header is set).
	EventHeader EventKind = iota
	// EventContent: more content of the current message (Event.Delta).
	EventContent
	// EventEnd: the current message is complete (Event.Msg is set).
	EventEnd
)

// Event is one step of streaming output.
type Event struct {
	Kind   EventKind
	Header Header
	Delta  string
	Msg    *Msg
}

type parseState int

const (
	stHeader parseState = iota
	stContent
	stExpectStart
)

// Parser reads a model's harmony output incrementally, like openai/harmony's
// StreamableParser, but lenient: malformed output never fails, it ends up as
// content. Feed it the text of each generated token. Content deltas never
// split a UTF-8 character. Not safe for concurrent use.
type Parser struct {
	state   parseState
	role    string // role known before the header (the prompt's "<|start|>assistant")
	header  strings.Builder
	cur     Msg
	content strings.Builder
	pending []byte
	msgs    []Msg
}

// NewParser parses output that follows a prompt ending in "<|start|>assistant".
func NewParser() *Parser { return &Parser{state: stHeader, role: chat.RoleAssistant} }

// Feed consumes one token's text; special says whether it is a special
// (control) token such as <|channel|>.
func (p *Parser) Feed(text string, special bool) []Event {
	var ev []Event
	if special {
		switch p.state {
		case stHeader:
			switch text {
			case TokMessage:
				p.cur = Msg{Header: parseHeader(p.header.String(), p.role)}
				p.role = ""
				p.header.Reset()
				p.content.Reset()
				p.state = stContent
				return append(ev, Event{Kind: EventHeader, Header: p.cur.Header})
			case TokStart:
				p.header.Reset()
				p.role = ""
				return nil
			case TokEnd, TokCall, TokReturn:
				// A message without <|message|>: keep what came as content.
				h := p.header.String()
				p.cur = Msg{Header: parseHeader("", p.role)}
				if p.cur.Role == "" {
					p.cur.Role = chat.RoleAssistant
				}
				p.content.Reset()
				p.content.WriteString(h)
				return p.end(text)
			default:
				p.header.WriteString(text)
				return nil
			}
		case stContent:
			switch text {
			case TokEnd, TokCall, TokReturn:
				return p.end(text)
			case TokStart: // a missing <|end|>
				ev = p.end(TokEnd)
				p.state = stHeader
				return ev
			}
			return p.text(text)
		case stExpectStart:
			if text == TokStart {
				p.state = stHeader
				p.role = ""
				p.header.Reset()
				return nil
			}
			return nil
		}
	}
	switch p.state {
	case stHeader:
		p.header.WriteString(text)
		return nil
	case stExpectStart:
		if strings.TrimSpace(text) == "" {
			return nil
		}
		// Text outside a message: treat it as an assistant message.
		p.cur = Msg{Header: Header{Role: chat.RoleAssistant}}
		p.content.Reset()
		p.state = stContent
		ev = append(ev, Event{Kind: EventHeader, Header: p.cur.Header})
	}
	return append(ev, p.text(text)...)
}

func (p *Parser) text(s string) []Event {
	p.pending = append(p.pending, s...)
	var out []byte
	i := 0
	for i < len(p.pending) {
		r, w := utf8.DecodeRune(p.pending[i:])
		if r == utf8.RuneError && w <= 1 {
			if !utf8.FullRune(p.pending[i:]) {
				break
			}
			out = append(out, "\uFFFD"...)
			i++
			continue
		}
		out = append(out, p.pending[i:i+w]...)
		i += w
	}
	p.pending = append(p.pending[:0], p.pending[i:]...)
	if len(out) == 0 {
		return nil
	}
	p.content.Write(out)
	return []Event{{Kind: EventContent, Header: p.cur.Header, Delta: string(out)}}
}

func (p *Parser) end(tok string) []Event {
	var ev []Event
	if len(p.pending) > 0 {
		d := strings.ToValidUTF8(string(p.pending), "\uFFFD")
		p.pending = p.pending[:0]
		p.content.WriteString(d)
		ev = append(ev, Event{Kind: EventContent, Header: p.cur.Header, Delta: d})
	}
	m := p.cur
	m.Content = p.content.String()
	m.End = tok
	p.msgs = append(p.msgs, m)
	p.content.Reset()
	p.state = stExpectStart
	return append(ev, Event{Kind: EventEnd, Header: m.Header, Msg: &p.msgs[len(p.msgs)-1]})
}

// Close ends the output (the model stopped without an end token); an open
// message is completed.
func (p *Parser) Close() []Event {
	switch p.state {
	case stContent:
		return p.end("")
	case stHeader:
		if p.header.Len() > 0 {
			return p.Feed(TokEnd, true)
		}
	}
	return nil
}

// Messages are the completed messages so far.
func (p *Parser) Messages() []Msg { return p.msgs }

// CurrentHeader is the header of the message being read (ok false between
// messages or inside a header).
func (p *Parser) CurrentHeader() (Header, bool) {
	return p.cur.Header, p.state == stContent
}

// parseHeader follows openai/harmony's parse_header_from_string. role is
// the role known from the prompt ("" when the header names it).
func parseHeader(h, role string) Header {
	var out Header
	if i := strings.Index(h, TokChannel); i >= 0 {
		after := h[i+len(TokChannel):]
		end := strings.IndexFunc(after, func(r rune) bool { return unicode.IsSpace(r) || r == '<' })
		if end < 0 {
			end = len(after)
		}
		out.Channel = after[:end]
		h = h[:i] + after[end:]
	}
	h = strings.TrimSpace(h)
	if strings.Contains(h, TokConstrain) {
		h = strings.TrimSpace(strings.ReplaceAll(h, TokConstrain, " "+TokConstrain))
	}
	parts := strings.Fields(h)
	if role == "" && len(parts) > 0 {
		switch parts[0] {
		case chat.RoleSystem, chat.RoleDeveloper, chat.RoleUser, chat.RoleAssistant, chat.RoleTool:
			role = parts[0]
		default:
			role = parts[0] // a tool's name, e.g. functions.get_weather
		}
		parts = parts[1:]
	} else if len(parts) > 0 && parts[0] == role {
		parts = parts[1:]
	}
	out.Role = role
	if len(parts) > 0 {
		n := len(parts)
		last := parts[n-1]
		parts = parts[:n-1]
		switch {
		case strings.HasPrefix(last, "to="):
			out.Recipient = last[3:]
		case n == 1 && !strings.HasPrefix(last, TokConstrain):
			out.Recipient = last
		default:
			out.ContentType = last
			if len(parts) > 0 {
				out.Recipient = strings.TrimPrefix(parts[len(parts)-1], "to=")
			}
		}
	}
	return out
}

// Result is the assistant's output split the way the chat API returns it.
type Result struct {
	Reasoning string
	Content   string
	ToolCalls []chat.ToolCall
}

// Collect turns parsed messages into a Result: analysis is reasoning,
// final (and commentary without a recipient: preambles) is content, and
// messages addressed to functions.NAME (or another tool) are tool calls.
func Collect(msgs []Msg) Result {
	var r Result
	for _, m := range msgs {
		switch {
		case m.Recipient != "" && m.Recipient != chat.RoleAssistant && m.Recipient != "all":
			r.ToolCalls = append(r.ToolCalls, chat.ToolCall{Name: strings.TrimPrefix(m.Recipient, "functions."), Arguments: m.Content})
		case m.Channel == "analysis":
			r.Reasoning += m.Content
		default:
			r.Content += m.Content
		}
	}
	return r
}

// Result collects the completed messages.
func (p *Parser) Result() Result { return Collect(p.msgs) }

// TokenParser feeds a Parser with token ids.
type TokenParser struct {
	*Parser
	tok *tokenizer.Tokenizer
}

// NewTokenParser parses ids generated after a harmony prompt.
func NewTokenParser(tok *tokenizer.Tokenizer) *TokenParser {
	return &TokenParser{Parser: NewParser(), tok: tok}
}

// Add consumes one generated id.
func (p *TokenParser) Add(id int32) []Event {
	if p.tok.IsSpecial(id) {
		return p.Feed(p.tok.TokenText(id), true)
	}
	return p.Feed(p.tok.Decode([]int32{id}), false)
}

// Parse parses complete output text (special tokens as text), e.g. for
// tests or non-streaming use.
func Parse(output string) []Msg {
	p := NewParser()
	for len(output) > 0 {
		i := strings.Index(output, "<|")
		if i < 0 {
			p.Feed(output, false)
			break
		}
		if i > 0 {
			p.Feed(output[:i], false)
			output = output[i:]
			continue
		}
		j := strings.Index(output, "|>")
		if j < 0 {
			p.Feed(output, false)
			break
		}
		tok := output[:j+2]
		switch tok {
		case TokStart, TokEnd, TokMessage, TokChannel, TokConstrain, TokReturn, TokCall:
			p.Feed(tok, true)
		default:
			p.Feed(tok, false)
		}
		output = output[j+2:]
	}
	p.Close()
	return p.Messages()
}
