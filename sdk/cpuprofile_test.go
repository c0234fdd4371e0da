package sdk

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"
)

func TestStartCPUProfile(t *testing.T) {
	dir := t.TempDir()
	t.Setenv(EnvCPUProfile, filepath.Join(dir, "cpu-%p.pprof"))
	t.Setenv(EnvCPUProfile+"_SECONDS", "1")
	startCPUProfile(hclog.NewNullLogger())
	want := filepath.Join(dir, "cpu-"+strconv.Itoa(os.Getpid())+".pprof")
	require.Eventually(t, func() bool {
		st, err := os.Stat(want)
		return err == nil && st.Size() > 0
	}, 5*time.Second, 50*time.Millisecond)
}
