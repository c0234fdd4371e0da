//go:build !linux

package sdk

import "os"

// protectStdout is Linux-only (dup3); elsewhere stdout stays as it is and
// native code must not print to it before the handshake.
func protectStdout() (*os.File, error) { return os.Stdout, nil }
