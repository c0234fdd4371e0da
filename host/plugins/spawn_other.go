//go:build !linux

package plugins

import "os/exec"

var disablePdeathsig bool

// setPdeathsig is Linux-only; elsewhere sdk.Serve's parent watch ends
// orphaned adapters.
func setPdeathsig(*exec.Cmd) {}

func spawn(f func()) { f() }
