package sdk

import (
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
)

// EnvCPUProfile names a file ("%p" = the process id) that an adapter process
// writes a Go CPU profile of its first ORCH_CPUPROFILE_SECONDS seconds
// (default 20) to: a measurement aid for the host-side cost of a decode step
// (go tool pprof <adapter binary> FILE). A timed window, not "until exit":
// orch-host stops adapters by killing them.
const EnvCPUProfile = "ORCH_CPUPROFILE"

func startCPUProfile(logger hclog.Logger) {
	path := os.Getenv(EnvCPUProfile)
	if path == "" {
		return
	}
	path = strings.ReplaceAll(path, "%p", strconv.Itoa(os.Getpid()))
	secs := 20
	if v, err := strconv.Atoi(os.Getenv(EnvCPUProfile + "_SECONDS")); err == nil && v > 0 {
		secs = v
	}
	f, err := os.Create(path)
	if err != nil {
		logger.Warn("cpu profile not started", "file", path, "error", err)
		return
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		logger.Warn("cpu profile not started", "file", path, "error", err)
		_ = f.Close()
		return
	}
	logger.Info("cpu profile started", "file", path, "seconds", secs)
	go func() {
		time.Sleep(time.Duration(secs) * time.Second)
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			logger.Warn("cpu profile", "file", path, "error", err)
			return
		}
		logger.Info("cpu profile written", "file", path)
	}()
}
