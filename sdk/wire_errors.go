package sdk

// Typed errors on the wire. An adapter's error becomes a gRPC status with a
// google.rpc.ErrorInfo detail (domain ErrorDomain, a reason, and numbers in
// metadata); the client turns it back into the same Go error, so the host
// uses errors.Is / errors.As and never matches on text.
//
//	Go error                      code                reason
//	*OutOfMemoryError             ResourceExhausted   OUT_OF_MEMORY (device, requested, free)
//	*ContextTooLongError          OutOfRange          CONTEXT_TOO_LONG (requested, max)
//	ErrContextTooLong             OutOfRange          CONTEXT_TOO_LONG
//	ErrUnsupportedArchitecture    InvalidArgument     UNSUPPORTED_ARCHITECTURE
//	ErrInvalidArgument            InvalidArgument     INVALID_ARGUMENT
//	ErrNotLoaded                  FailedPrecondition  NOT_LOADED
//	ErrAlreadyLoaded              FailedPrecondition  ALREADY_LOADED
//	ErrBusy                       ResourceExhausted   BUSY
//	ErrCanceled, context.Canceled Canceled            CANCELED
//	context.DeadlineExceeded      DeadlineExceeded    DEADLINE_EXCEEDED
//	ErrNotImplemented             Unimplemented       NOT_IMPLEMENTED
//	ErrAdapterCrashed             Unavailable         ADAPTER_CRASHED
//	panic in a handler            Internal            PANIC
//	anything else                 Unknown             (no detail; message kept)
//
// A status without our detail maps by code: Unavailable (the transport
// broke: the process died) -> ErrAdapterCrashed, Canceled -> ErrCanceled,
// Unimplemented -> ErrNotImplemented, DeadlineExceeded ->
// context.DeadlineExceeded.

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ErrorDomain is the ErrorInfo domain of orch's typed wire errors.
const ErrorDomain = "orch.adapter.v1"

// Reasons in ErrorInfo.
const (
	reasonOOM            = "OUT_OF_MEMORY"
	reasonContextTooLong = "CONTEXT_TOO_LONG"
	reasonUnsupported    = "UNSUPPORTED_ARCHITECTURE"
	reasonInvalid        = "INVALID_ARGUMENT"
	reasonNotLoaded      = "NOT_LOADED"
	reasonAlreadyLoaded  = "ALREADY_LOADED"
	reasonBusy           = "BUSY"
	reasonCanceled       = "CANCELED"
	reasonDeadline       = "DEADLINE_EXCEEDED"
	reasonNotImplemented = "NOT_IMPLEMENTED"
	reasonCrashed        = "ADAPTER_CRASHED"
	reasonPanic          = "PANIC"
)

var sentinels = []struct {
	err    error
	code   codes.Code
	reason string
}{
	{ErrContextTooLong, codes.OutOfRange, reasonContextTooLong},
	{ErrUnsupportedArchitecture, codes.InvalidArgument, reasonUnsupported},
	{ErrInvalidArgument, codes.InvalidArgument, reasonInvalid},
	{ErrNotLoaded, codes.FailedPrecondition, reasonNotLoaded},
	{ErrAlreadyLoaded, codes.FailedPrecondition, reasonAlreadyLoaded},
	{ErrBusy, codes.ResourceExhausted, reasonBusy},
	{ErrCanceled, codes.Canceled, reasonCanceled},
	{context.Canceled, codes.Canceled, reasonCanceled},
	{context.DeadlineExceeded, codes.DeadlineExceeded, reasonDeadline},
	{ErrNotImplemented, codes.Unimplemented, reasonNotImplemented},
	{ErrAdapterCrashed, codes.Unavailable, reasonCrashed},
}

// RemoteError is an error that came over the wire. Its message is the
// adapter's; Unwrap gives the typed error it stands for (a sentinel,
// *OutOfMemoryError, *ContextTooLongError) or nil.
type RemoteError struct {
	Code   codes.Code
	Reason string
	Msg    string
	err    error
}

func (e *RemoteError) Error() string { return e.Msg }

// Unwrap returns the typed error, so errors.Is / errors.As see through.
func (e *RemoteError) Unwrap() error { return e.err }

// toStatus converts an adapter error into a gRPC status error.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	var re *RemoteError
	if errors.As(err, &re) && re.err == nil {
		// An untyped error relayed from elsewhere: keep its code.
		return status.Error(re.Code, err.Error())
	}
	if _, ok := status.FromError(err); ok && !errors.As(err, &re) {
		return err // already a status (the adapter chose a code itself)
	}
	var oom *OutOfMemoryError
	if errors.As(err, &oom) {
		return withInfo(codes.ResourceExhausted, err.Error(), reasonOOM, map[string]string{
			"device":    oom.Device,
			"requested": strconv.FormatInt(oom.Requested, 10),
			"free":      strconv.FormatInt(oom.Free, 10),
		})
	}
	var ctl *ContextTooLongError
	if errors.As(err, &ctl) {
		return withInfo(codes.OutOfRange, err.Error(), reasonContextTooLong, map[string]string{
			"requested": strconv.Itoa(ctl.Requested),
			"max":       strconv.Itoa(ctl.Max),
		})
	}
	for _, s := range sentinels {
		if errors.Is(err, s.err) {
			return withInfo(s.code, err.Error(), s.reason, nil)
		}
	}
	return status.Error(codes.Unknown, err.Error())
}

func withInfo(code codes.Code, msg, reason string, md map[string]string) error {
	st := status.New(code, msg)
	if d, err := st.WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain, Metadata: md}); err == nil {
		st = d
	}
	return st.Err()
}

// fromStatus converts a gRPC error from the wire back into the Go error it
// stands for. Errors that are not statuses are returned unchanged.
func fromStatus(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	re := &RemoteError{Code: st.Code(), Msg: st.Message()}
	for _, d := range st.Details() {
		info, ok := d.(*errdetails.ErrorInfo)
		if !ok || info.GetDomain() != ErrorDomain {
			continue
		}
		re.Reason = info.GetReason()
		md := info.GetMetadata()
		switch re.Reason {
		case reasonOOM:
			req, _ := strconv.ParseInt(md["requested"], 10, 64)
			free, _ := strconv.ParseInt(md["free"], 10, 64)
			re.err = &OutOfMemoryError{Device: md["device"], Requested: req, Free: free}
		case reasonContextTooLong:
			if md["max"] != "" {
				req, _ := strconv.Atoi(md["requested"])
				maxTok, _ := strconv.Atoi(md["max"])
				re.err = &ContextTooLongError{Requested: req, Max: maxTok}
			} else {
				re.err = ErrContextTooLong
			}
		case reasonPanic:
			re.err = nil
		default:
			for _, s := range sentinels {
				if s.reason == re.Reason {
					re.err = s.err
					break
				}
			}
		}
		return re
	}
	switch st.Code() {
	case codes.Unavailable:
		re.err = ErrAdapterCrashed
		re.Msg = fmt.Sprintf("%v: %s", ErrAdapterCrashed, st.Message())
	case codes.Canceled:
		re.err = ErrCanceled
	case codes.Unimplemented:
		re.err = ErrNotImplemented
	case codes.DeadlineExceeded:
		re.err = context.DeadlineExceeded
	}
	return re
}
