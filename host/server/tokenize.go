package server

import (
	"net/http"
)

// handleTokenize answers POST /tokenize (vLLM's shape): a prompt is encoded
// as /v1/completions would, messages as /v1/chat/completions would.
func (s *Server) handleTokenize(w http.ResponseWriter, r *http.Request) {
	var req TokenizeRequest
	m := s.decodeFor(w, r, &req, func() string { return req.Model })
	if m == nil {
		return
	}
	var ids []int32
	switch {
	case req.Prompt != nil && req.Messages != nil:
		writeError(w, badParam("messages", "send either prompt or messages, not both"))
		return
	case req.Prompt != nil:
		add := true
		if req.AddSpecialTokens != nil {
			add = *req.AddSpecialTokens
		}
		ids = m.Tokenizer.Encode(*req.Prompt, add, true)
	case req.Messages != nil:
		if m.Chat == nil {
			writeError(w, unsupportedParam("messages", "model %s has no chat format", m.ID))
			return
		}
		msgs, err := chatMessages(req.Messages)
		if err != nil {
			writeError(w, err)
			return
		}
		p, err := m.Chat.Render(msgs, ChatOptions{ToolChoice: ToolChoiceNone})
		if err != nil {
			writeError(w, asRenderError(err))
			return
		}
		ids = m.Tokenizer.Encode(p.Text, false, true)
	default:
		writeError(w, badParam("prompt", "prompt or messages is required"))
		return
	}
	resp := TokenizeResponse{Count: len(ids), MaxModelLen: m.Info.ContextLength, Tokens: ids}
	if resp.Tokens == nil {
		resp.Tokens = []int32{}
	}
	if req.ReturnTokenStrs {
		for _, id := range ids {
			resp.TokenStrs = append(resp.TokenStrs, m.Tokenizer.TokenText(id))
		}
	}
	writeJSON(w, http.StatusOK, resp)
}

// handleDetokenize answers POST /detokenize.
func (s *Server) handleDetokenize(w http.ResponseWriter, r *http.Request) {
	var req DetokenizeRequest
	m := s.decodeFor(w, r, &req, func() string { return req.Model })
	if m == nil {
		return
	}
	vocab := m.Tokenizer.VocabSize()
	ids := make([]int32, len(req.Tokens))
	for i, t := range req.Tokens {
		if t < 0 || int(t) >= vocab {
			writeError(w, badParam("tokens", "token id %d at index %d is outside the vocabulary (0..%d)", t, i, vocab-1))
			return
		}
		ids[i] = int32(t)
	}
	writeJSON(w, http.StatusOK, DetokenizeResponse{Prompt: m.Tokenizer.Decode(ids)})
}
