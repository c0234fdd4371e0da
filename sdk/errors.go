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
