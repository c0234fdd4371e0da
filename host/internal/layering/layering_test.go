package layering

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const module = "github.com/llama-orch/orch"

func goCmd(t *testing.T, env []string, args ...string) string {
	t.Helper()
	cmd := exec.Command("go", args...)
	cmd.Dir = filepath.Join("..", "..", "..")
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "go %s: %s", strings.Join(args, " "), stderr.String())
	return string(out)
}

// deps maps each package matching pattern to its module-internal dependencies.
func deps(t *testing.T, pattern string) map[string][]string {
	out := goCmd(t, nil, "list", "-deps=false", "-f", `{{.ImportPath}}{{range .Deps}} {{.}}{{end}}`, pattern)
	m := map[string][]string{}
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		for _, d := range f[1:] {
			if strings.HasPrefix(d, module+"/") {
				m[f[0]] = append(m[f[0]], d)
			}
		}
	}
	return m
}

func TestSDKImportsNoHostOrPlugins(t *testing.T) {
	m := deps(t, "./sdk/...")
	require.NotEmpty(t, m, "go list found no sdk packages with module dependencies")
	for pkg, ds := range m {
		for _, d := range ds {
			assert.False(t, strings.HasPrefix(d, module+"/host") || strings.HasPrefix(d, module+"/plugins"),
				"%s depends on %s: sdk must not import host/ or plugins/", pkg, d)
		}
	}
}

func TestPluginsImportNoHost(t *testing.T) {
	m := deps(t, "./plugins/...")
	require.NotEmpty(t, m, "go list found no plugins packages with module dependencies")
	for pkg, ds := range m {
		for _, d := range ds {
			assert.False(t, strings.HasPrefix(d, module+"/host"), "%s depends on %s: plugins must not import host/", pkg, d)
		}
	}
}

func TestHostBuildsWithoutCgo(t *testing.T) {
	if testing.Short() {
		t.Skip("builds orch-host")
	}
	goCmd(t, []string{"CGO_ENABLED=0"}, "build", "-o", os.DevNull, "./host/cmd/orch-host")
}
