package sdk

import (
	"errors"
	"fmt"
)

// Sentinel errors. They cross the gRPC wire as status codes with details and
// come back as the same values, so callers use errors.Is / errors.As.
var (
	ErrUnsupportedArchitecture = errors.New("unsupported architecture")
	ErrNotLoaded               = errors.New("no model loaded")
	ErrAlreadyLoaded           = errors.New("a model is already loaded")
	ErrContextTooLong          = errors.New("context too long")
	ErrCanceled                = errors.New("canceled")
	ErrInvalidArgument         = errors.New("invalid argument")
	ErrBusy                    = errors.New("adapter busy")
)

// OutOfMemoryError reports that an allocation could not be satisfied.
type OutOfMemoryError struct {
	Device    string
	Requested int64
	Free      int64
}

func (e *OutOfMemoryError) Error() string {
	return fmt.Sprintf("out of memory on %s: requested %d bytes, %d free", e.Device, e.Requested, e.Free)
}

// Errors added for the plugin runtime (wire protocol and host lifecycle).
var (
	// ErrAdapterCrashed is returned by the host side for calls that were in
	// flight (or issued) while the adapter process died.
	ErrAdapterCrashed = errors.New("adapter process crashed")
	// ErrNotImplemented is returned for optional methods (e.g. Plan) that the
	// adapter does not implement.
	ErrNotImplemented = errors.New("not implemented by the adapter")
)

// ContextTooLongError reports a request that does not fit the context. It
// matches ErrContextTooLong with errors.Is.
type ContextTooLongError struct {
	Requested int // tokens the request needs (prompt + max tokens, or prompt alone)
	Max       int // the model's effective context length
}

func (e *ContextTooLongError) Error() string {
	return fmt.Sprintf("context too long: %d tokens requested, at most %d", e.Requested, e.Max)
}

// Is makes errors.Is(err, ErrContextTooLong) true.
func (e *ContextTooLongError) Is(target error) bool { return target == ErrContextTooLong }
