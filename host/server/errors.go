package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// APIError is an error answered as OpenAI's error object:
// {"error": {"message", "type", "param", "code"}}.
type APIError struct {
	Status     int
	Message    string
	Type       string
	Param      string
	Code       string
	RetryAfter time.Duration // sets Retry-After when > 0
}

func (e *APIError) Error() string {
	if e.Param != "" {
		return fmt.Sprintf("%d %s (param %s): %s", e.Status, e.Type, e.Param, e.Message)
	}
	return fmt.Sprintf("%d %s: %s", e.Status, e.Type, e.Message)
}

type errorBody struct {
	Error errorObject `json:"error"`
}

type errorObject struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}

func strPtrOrNil(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// badParam is a 400 naming the offending parameter.
func badParam(param, format string, args ...any) *APIError {
	return &APIError{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: param,
		Message: fmt.Sprintf(format, args...)}
}

// unsupportedParam is a 400 for a parameter the model cannot honour.
func unsupportedParam(param, format string, args ...any) *APIError {
	e := badParam(param, format, args...)
	e.Code = "unsupported_parameter"
	return e
}

func notFound(code, format string, args ...any) *APIError {
	return &APIError{Status: http.StatusNotFound, Type: "not_found_error", Code: code, Message: fmt.Sprintf(format, args...)}
}

func internalError(format string, args ...any) *APIError {
	return &APIError{Status: http.StatusInternalServerError, Type: "server_error", Code: "internal_error", Message: fmt.Sprintf(format, args...)}
}

func unavailable(code, msg string, retry time.Duration) *APIError {
	return &APIError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: code, Message: msg, RetryAfter: retry}
}

// asAPIError turns any error into an APIError (500 unless it already is one).
func asAPIError(err error) *APIError {
	var ae *APIError
	if errors.As(err, &ae) {
		return ae
	}
	return internalError("%v", err)
}

func writeError(w http.ResponseWriter, err error) {
	ae := asAPIError(err)
	if ae.RetryAfter > 0 {
		secs := int((ae.RetryAfter + time.Second - 1) / time.Second)
		w.Header().Set("Retry-After", strconv.Itoa(secs))
	}
	writeJSON(w, ae.Status, errorBody{Error: errorObject{
		Message: ae.Message, Type: ae.Type, Param: strPtrOrNil(ae.Param), Code: strPtrOrNil(ae.Code),
	}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
}

// maxBodyBytes bounds a request body (prompts of a 131072-token context fit easily).
const maxBodyBytes = 32 << 20

// decodeBody decodes a JSON request body strictly: unknown fields are a 400
// naming the field (a parameter we cannot honour must not be silently ignored).
func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	body := http.MaxBytesReader(w, r.Body, maxBodyBytes)
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		var ute *json.UnmarshalTypeError
		var se *json.SyntaxError
		switch {
		case errors.As(err, &mbe):
			return &APIError{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error",
				Message: fmt.Sprintf("request body larger than %d bytes", mbe.Limit)}
		case errors.As(err, &ute):
			field := strings.TrimPrefix(ute.Field, "samplingFields.")
			return badParam(field, "invalid type for %q: expected %s, got JSON %s", field, ute.Type, ute.Value)
		case errors.As(err, &se):
			return badParam("", "request body is not valid JSON: %v (offset %d)", err, se.Offset)
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			name := strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
			return unsupportedParam(name, "unsupported parameter %q: this server does not implement it", name)
		case err.Error() == "EOF":
			return badParam("", "request body is empty; expected a JSON object")
		default:
			// Custom UnmarshalJSON errors (e.g. stop) come here wrapped by encoding/json.
			return badParam("", "invalid request body: %v", err)
		}
	}
	if dec.More() {
		return badParam("", "request body has data after the JSON object")
	}
	return nil
}
