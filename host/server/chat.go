package server

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"
)

var validRoles = map[string]bool{"system": true, "developer": true, "user": true, "assistant": true, "tool": true}

// messageContent reads a message's content: a string, null, or a list of
// {"type": "text", "text": ...} parts (other part types are not supported).
func messageContent(raw json.RawMessage, param string) (string, bool, error) {
	if rawIsNull(raw) {
		return "", false, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, true, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", false, badParam(param, "content must be a string or a list of content parts")
	}
	var sb strings.Builder
	for j, p := range parts {
		if p.Type != "text" {
			return "", false, unsupportedParam(fmt.Sprintf("%s[%d].type", param, j),
				"content part type %q is not supported by this server (text only)", p.Type)
		}
		sb.WriteString(p.Text)
	}
	return sb.String(), true, nil
}

// chatMessages validates the request's messages.
func chatMessages(in []ChatMessageIn) ([]Message, error) {
	if len(in) == 0 {
		return nil, badParam("messages", "messages must contain at least one message")
	}
	out := make([]Message, 0, len(in))
	for i, m := range in {
		p := fmt.Sprintf("messages[%d]", i)
		if !validRoles[m.Role] {
			return nil, badParam(p+".role", "role %q is not one of system, developer, user, assistant, tool", m.Role)
		}
		text, has, err := messageContent(m.Content, p+".content")
		if err != nil {
			return nil, err
		}
		if !has && !(m.Role == "assistant" && len(m.ToolCalls) > 0) {
			return nil, badParam(p+".content", "content is required for a %s message", m.Role)
		}
		if m.Role == "tool" && m.ToolCallID == "" {
			return nil, badParam(p+".tool_call_id", "a tool message needs tool_call_id")
		}
		msg := Message{Role: m.Role, Content: text, Name: m.Name, ToolCallID: m.ToolCallID, Reasoning: m.ReasoningContent}
		if msg.Reasoning == "" {
			msg.Reasoning = m.Reasoning
		}
		if len(m.ToolCalls) > 0 && m.Role != "assistant" {
			return nil, badParam(p+".tool_calls", "only assistant messages carry tool_calls")
		}
		for j, tc := range m.ToolCalls {
			if tc.Function.Name == "" {
				return nil, badParam(fmt.Sprintf("%s.tool_calls[%d].function.name", p, j), "tool call without a function name")
			}
			msg.ToolCalls = append(msg.ToolCalls, ToolCallOut{ID: tc.ID, Name: tc.Function.Name, Arguments: tc.Function.Arguments})
		}
		out = append(out, msg)
	}
	return out, nil
}

// chatTools validates tools and tool_choice.
func chatTools(req *ChatCompletionRequest) (ChatOptions, error) {
	var o ChatOptions
	names := map[string]bool{}
	for i, t := range req.Tools {
		if t.Type != "function" {
			return o, unsupportedParam(fmt.Sprintf("tools[%d].type", i), "tool type %q is not supported (function only)", t.Type)
		}
		if t.Function.Name == "" {
			return o, badParam(fmt.Sprintf("tools[%d].function.name", i), "a tool needs a function name")
		}
		if !rawIsNull(t.Function.Parameters) {
			var obj map[string]any
			if err := json.Unmarshal(t.Function.Parameters, &obj); err != nil {
				return o, badParam(fmt.Sprintf("tools[%d].function.parameters", i), "parameters must be a JSON Schema object")
			}
		}
		names[t.Function.Name] = true
		o.Tools = append(o.Tools, Tool{Name: t.Function.Name, Description: t.Function.Description, Parameters: t.Function.Parameters})
	}
	o.ToolChoice = ToolChoiceAuto
	if len(o.Tools) == 0 {
		o.ToolChoice = ToolChoiceNone
	}
	if rawIsNull(req.ToolChoice) {
		return o, nil
	}
	var mode string
	if err := json.Unmarshal(req.ToolChoice, &mode); err == nil {
		switch ToolChoiceMode(mode) {
		case ToolChoiceNone:
			o.ToolChoice = ToolChoiceNone
		case ToolChoiceAuto, ToolChoiceRequired:
			if len(o.Tools) == 0 {
				return o, badParam("tool_choice", "tool_choice %q needs tools", mode)
			}
			o.ToolChoice = ToolChoiceMode(mode)
		default:
			return o, badParam("tool_choice", "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}, got %q", mode)
		}
		return o, nil
	}
	var named struct {
		Type     string `json:"type"`
		Function struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	if err := json.Unmarshal(req.ToolChoice, &named); err != nil || named.Type != "function" {
		return o, badParam("tool_choice", "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")
	}
	if !names[named.Function.Name] {
		return o, badParam("tool_choice", "tool_choice names function %q, which is not in tools", named.Function.Name)
	}
	o.ToolChoice, o.ToolName = ToolChoiceNamed, named.Function.Name
	return o, nil
}

func (s *Server) handleChat(w http.ResponseWriter, r *http.Request) {
	var req ChatCompletionRequest
	m := s.decodeFor(w, r, &req, func() string { return req.Model })
	if m == nil {
		return
	}
	g, err := s.prepareChat(&req, m)
	if err != nil {
		m.metrics.rejected("invalid")
		writeError(w, err)
		return
	}
	includeUsage := req.StreamOptions != nil && req.StreamOptions.IncludeUsage
	id := "chatcmpl-" + newID()
	created := time.Now().Unix()
	if req.Stream {
		s.execute(w, r, m, []*genRequest{g}, func(ctx context.Context, ev <-chan choiceEvent) outcome {
			return s.streamChat(ctx, w, m, id, created, g, includeUsage, ev)
		})
		return
	}
	s.execute(w, r, m, []*genRequest{g}, func(ctx context.Context, ev <-chan choiceEvent) outcome {
		res, aborted, ferr := collectAll(ctx, ev, g.n)
		if aborted {
			s.writeShutdownError(w)
			return outcome{aborted: true}
		}
		if ferr != nil {
			writeError(w, ferr)
			return outcome{err: ferr}
		}
		resp := ChatCompletion{ID: id, Object: "chat.completion", Created: created, Model: m.ID,
			Usage: &Usage{PromptTokens: len(g.prompt)}}
		for i, c := range res {
			content := c.content
			msg := ChatMessageOut{Role: "assistant", Content: &content}
			if len(c.toolCalls) > 0 && content == "" {
				msg.Content = nil
			}
			if c.reasoning != "" {
				rc := c.reasoning
				msg.ReasoningContent = &rc
			}
			for _, tc := range c.toolCalls {
				msg.ToolCalls = append(msg.ToolCalls, ToolCall{ID: "call_" + newID(), Type: "function",
					Function: FunctionCall{Name: tc.ToolName, Arguments: tc.Arguments}})
			}
			ch := ChatChoice{Index: i, Message: msg, FinishReason: c.finish}
			if g.logprobs {
				ch.Logprobs = &ChatLogprobs{Content: chatLogprobs(m.Tokenizer, c.logprobs)}
			}
			resp.Choices = append(resp.Choices, ch)
			resp.Usage.CompletionTokens += c.tokens
		}
		resp.Usage.TotalTokens = resp.Usage.PromptTokens + resp.Usage.CompletionTokens
		writeJSON(w, http.StatusOK, resp)
		return outcome{finish: res[0].finish}
	})
}

// prepareChat validates a chat request, renders and tokenizes its prompt.
func (s *Server) prepareChat(req *ChatCompletionRequest, m *servedModel) (*genRequest, error) {
	if m.Chat == nil {
		return nil, unsupportedParam("messages", "model %s has no chat format (no chat template); use /v1/completions", m.ID)
	}
	msgs, err := chatMessages(req.Messages)
	if err != nil {
		return nil, err
	}
	opts, err := chatTools(req)
	if err != nil {
		return nil, err
	}
	switch req.ReasoningEffort {
	case "":
	case "low", "medium", "high":
		if !m.Chat.SupportsReasoningEffort() {
			return nil, unsupportedParam("reasoning_effort", "model %s (%s chat format) does not support reasoning_effort", m.ID, m.Chat.Name())
		}
		opts.ReasoningEffort = req.ReasoningEffort
	default:
		return nil, badParam("reasoning_effort", "reasoning_effort must be low, medium or high, got %q", req.ReasoningEffort)
	}
	if rf := req.ResponseFormat; rf != nil {
		switch rf.Type {
		case "", "text":
		case "json_object":
			// As OpenAI does: JSON mode requires the conversation to ask for JSON.
			found := false
			for _, msg := range msgs {
				if strings.Contains(strings.ToLower(msg.Content), "json") {
					found = true
				}
			}
			if !found {
				return nil, badParam("response_format", "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.")
			}
			opts.JSONObject = true
		default:
			return nil, unsupportedParam("response_format.type", "response_format type %q is not supported (text or json_object)", rf.Type)
		}
	}
	g := &genRequest{}
	// parallel_tool_calls false: only the first tool call of a turn is returned.
	g.singleToolCall = req.ParallelToolCalls != nil && !*req.ParallelToolCalls
	if req.Logprobs {
		top := 0
		if req.TopLogprobs != nil {
			top = *req.TopLogprobs
		}
		if err := checkLogprobs(m, "top_logprobs", top); err != nil {
			return nil, err
		}
		g.logprobs, g.topLogprobs = true, top
	} else if req.TopLogprobs != nil {
		return nil, badParam("top_logprobs", "top_logprobs requires logprobs to be true")
	}
	maxTok := req.MaxCompletionTokens
	if maxTok == nil {
		maxTok = req.MaxTokens
	} else if req.MaxTokens != nil && *req.MaxTokens != *maxTok {
		return nil, badParam("max_tokens", "max_tokens and max_completion_tokens disagree; send one")
	}
	prompt, err := m.Chat.Render(msgs, opts)
	if err != nil {
		return nil, asRenderError(err)
	}
	g.prompt = m.Tokenizer.Encode(prompt.Text, false, true)
	g.newParser = prompt.NewParser
	if err := commonParams(&req.samplingFields, maxTok, m, g, "messages"); err != nil {
		return nil, err
	}
	return g, nil
}

// asRenderError turns a chat-format failure into a 400 on messages unless it
// already is an API error.
func asRenderError(err error) error {
	if _, ok := err.(*APIError); ok {
		return err
	}
	return badParam("messages", "cannot render the chat prompt: %v", err)
}

// chatLogprobs renders logprobs in the chat format.
func chatLogprobs(tok Tokenizer, lps []tokenLogprob) []ChatTokenLogprob {
	out := make([]ChatTokenLogprob, 0, len(lps))
	for _, lp := range lps {
		text, b := tokenString(tok, lp.id)
		e := ChatTokenLogprob{Token: text, Logprob: float64(lp.logprob), Bytes: b, TopLogprobs: []ChatTopLogprob{}}
		for _, t := range lp.top {
			tt, tb := tokenString(tok, t.Token)
			e.TopLogprobs = append(e.TopLogprobs, ChatTopLogprob{Token: tt, Logprob: float64(t.Logprob), Bytes: tb})
		}
		out = append(out, e)
	}
	return out
}

// streamChat writes chat completion chunks as SSE.
func (s *Server) streamChat(ctx context.Context, w http.ResponseWriter, m *servedModel, id string, created int64,
	g *genRequest, includeUsage bool, events <-chan choiceEvent) outcome {
	sse := newSSE(w)
	chunk := func(choices ...ChatChunkChoice) ChatCompletionChunk {
		return ChatCompletionChunk{ID: id, Object: "chat.completion.chunk", Created: created, Model: m.ID, Choices: choices}
	}
	empty := ""
	for i := 0; i < g.n; i++ {
		_ = sse.send(chunk(ChatChunkChoice{Index: i, Delta: ChatMessageOut{Role: "assistant", Content: &empty}}))
	}
	toolIdx := make([]int, g.n)
	tokens := make([]int, g.n)
	finished := make([]bool, g.n)
	first := ""
	var firstErr error
	aborted := false
	for ev := range events {
		if ev.tokens > tokens[ev.index] {
			tokens[ev.index] = ev.tokens
		}
		var lp *ChatLogprobs
		if g.logprobs && len(ev.logprobs) > 0 {
			lp = &ChatLogprobs{Content: chatLogprobs(m.Tokenizer, ev.logprobs)}
		}
		// Consecutive deltas of one kind go out in one chunk.
		var delta ChatMessageOut
		var content, reasoning strings.Builder
		hasContent, hasReasoning := false, false
		flush := func() {
			if hasContent {
				c := content.String()
				delta.Content = &c
			}
			if hasReasoning {
				rc := reasoning.String()
				delta.ReasoningContent = &rc
			}
			if hasContent || hasReasoning || len(delta.ToolCalls) > 0 || lp != nil {
				_ = sse.send(chunk(ChatChunkChoice{Index: ev.index, Delta: delta, Logprobs: lp}))
				lp = nil
			}
			delta, hasContent, hasReasoning = ChatMessageOut{}, false, false
			content.Reset()
			reasoning.Reset()
		}
		for _, d := range ev.deltas {
			switch d.Kind {
			case DeltaContent:
				content.WriteString(d.Text)
				hasContent = true
			case DeltaReasoning:
				reasoning.WriteString(d.Text)
				hasReasoning = true
			case DeltaToolCall:
				flush()
				idx := toolIdx[ev.index]
				toolIdx[ev.index]++
				delta.ToolCalls = []ToolCall{{Index: &idx, ID: "call_" + newID(), Type: "function",
					Function: FunctionCall{Name: d.ToolName, Arguments: d.Arguments}}}
				flush()
			}
		}
		flush()
		if ev.err != nil {
			if ctx.Err() != nil {
				aborted = true
			} else if firstErr == nil {
				firstErr = ev.err
				sse.sendError(ev.err)
			}
		}
		if ev.finish != "" && ev.err == nil {
			f := ev.finish
			if ev.index == 0 {
				first = f
			}
			finished[ev.index] = true
			_ = sse.send(chunk(ChatChunkChoice{Index: ev.index, Delta: ChatMessageOut{}, FinishReason: &f}))
		}
	}
	if ctx.Err() != nil || sse.err != nil {
		if s.shuttingDown() {
			// The client is still there: end its stream properly.
			for i, done := range finished {
				if !done {
					f := "abort"
					_ = sse.send(chunk(ChatChunkChoice{Index: i, Delta: ChatMessageOut{}, FinishReason: &f}))
				}
			}
			sse.done()
		}
		return outcome{aborted: true}
	}
	if includeUsage {
		u := &Usage{PromptTokens: len(g.prompt)}
		for _, t := range tokens {
			u.CompletionTokens += t
		}
		u.TotalTokens = u.PromptTokens + u.CompletionTokens
		c := chunk()
		c.Choices = []ChatChunkChoice{}
		c.Usage = u
		_ = sse.send(c)
	}
	sse.done()
	if aborted {
		return outcome{aborted: true}
	}
	return outcome{finish: first, err: firstErr}
}
