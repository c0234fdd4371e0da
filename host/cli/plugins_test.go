package cli

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestPluginsCommandListsAdapters(t *testing.T) {
	dir := t.TempDir()
	build := exec.Command("go", "build", "-ldflags", "-X main.name=listed -X main.version=9.9.9 -X main.architectures=gpt2,llama",
		"-o", filepath.Join(dir, "orch-adapter-listed"), "github.com/llama-orch/orch/sdk/example/cmd/orch-adapter-example")
	out, err := build.CombinedOutput()
	require.NoError(t, err, "build example adapter: %s", out)

	t.Setenv("ORCH_PLUGINS__DIR", "")
	root := NewRoot()
	var stdout, stderr bytes.Buffer
	root.SetOut(&stdout)
	root.SetErr(&stderr)
	root.SetArgs([]string{"plugins", "--plugins-dir", dir})
	require.NoError(t, root.Execute(), stderr.String())
	assert.Contains(t, stdout.String(), "NAME")
	assert.Regexp(t, `listed\s+9\.9\.9\s+gpt2,llama\s+`+regexp.QuoteMeta(filepath.Join(dir, "orch-adapter-listed")), stdout.String())
}
