package sdk

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// protectStdout points file descriptor 1 at stderr and returns an *os.File
// on the original stdout for go-plugin's handshake. Native code (C, CUDA)
// that prints to stdout while the adapter initialises would otherwise
// corrupt the handshake line the host reads; now such output lands on
// stderr, where the host logs it under the adapter's name.
func protectStdout() (*os.File, error) {
	saved, err := unix.Dup(1)
	if err != nil {
		return nil, fmt.Errorf("dup stdout: %w", err)
	}
	unix.CloseOnExec(saved)
	if err := unix.Dup3(2, 1, 0); err != nil {
		_ = unix.Close(saved)
		return nil, fmt.Errorf("redirect stdout to stderr: %w", err)
	}
	return os.NewFile(uintptr(saved), "/dev/stdout"), nil
}
