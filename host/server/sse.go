package server

import (
	"bytes"
	"encoding/json"
	"net/http"
)

// sseWriter writes Server-Sent Events as OpenAI streams them:
// "data: <json>\n\n" per event and "data: [DONE]\n\n" at the end.
type sseWriter struct {
	w       http.ResponseWriter
	flusher http.Flusher
	err     error
	buf     bytes.Buffer  // one event, reused: no allocation per token
	enc     *json.Encoder // writes into buf
}

func newSSE(w http.ResponseWriter) *sseWriter {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("Connection", "keep-alive")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	f, _ := w.(http.Flusher)
	s := &sseWriter{w: w, flusher: f}
	s.enc = json.NewEncoder(&s.buf)
	s.flush()
	return s
}

func (s *sseWriter) flush() {
	if s.flusher != nil {
		s.flusher.Flush()
	}
}

// send writes one event; the first write error sticks (client gone).
func (s *sseWriter) send(v any) error {
	if s.err != nil {
		return s.err
	}
	s.buf.Reset()
	s.buf.WriteString("data: ")
	// Encode writes what json.Marshal returns, then '\n'
	if err := s.enc.Encode(v); err != nil {
		s.err = err
		return err
	}
	s.buf.WriteByte('\n')
	if _, err := s.w.Write(s.buf.Bytes()); err != nil {
		s.err = err
		return err
	}
	s.flush()
	return nil
}

func (s *sseWriter) done() {
	if s.err != nil {
		return
	}
	if _, err := s.w.Write([]byte("data: [DONE]\n\n")); err != nil {
		s.err = err
		return
	}
	s.flush()
}

// sendError writes an error event in the middle of a stream (after the 200
// status is already out), the way vLLM reports mid-stream failures.
func (s *sseWriter) sendError(err error) {
	ae := asAPIError(err)
	_ = s.send(errorBody{Error: errorObject{Message: ae.Message, Type: ae.Type, Param: strPtrOrNil(ae.Param), Code: strPtrOrNil(ae.Code)}})
}
