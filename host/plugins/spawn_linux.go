package plugins

import (
	"os/exec"
	"runtime"
	"sync"
	"syscall"
)

// On Linux the adapter gets SIGKILL when the host dies (Pdeathsig). The
// kernel sends it when the *thread* that forked the child exits, and the Go
// runtime does end threads (a goroutine that exits while locked to its
// thread takes the thread with it), so every adapter is forked from one
// goroutine locked to an OS thread that lives as long as the host.

// disablePdeathsig is a test hook: it lets a test prove that sdk.Serve's
// parent watch alone also ends an orphaned adapter.
var disablePdeathsig bool

func setPdeathsig(cmd *exec.Cmd) {
	if disablePdeathsig {
		return
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}

var (
	spawnOnce sync.Once
	spawnCh   chan func()
)

// spawn runs f on the dedicated spawner thread and waits for it.
func spawn(f func()) {
	spawnOnce.Do(func() {
		spawnCh = make(chan func())
		go func() {
			runtime.LockOSThread() // never unlocked: the thread must outlive every child
			for g := range spawnCh {
				g()
			}
		}()
	})
	done := make(chan struct{})
	spawnCh <- func() { defer close(done); f() }
	<-done
}
