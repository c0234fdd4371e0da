package cli

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/host/config"
	"github.com/llama-orch/orch/host/defaultmodel"
	"github.com/llama-orch/orch/host/placement"
	"github.com/llama-orch/orch/host/plugins"
)

// TestServeTensorParallelCPU serves the embedded GPT-2 through the real gpt
// adapter twice, unsplit and with tensor_parallel 2 on the CPU (two rank
// processes meeting over loopback TCP), and checks that greedy completions
// through the HTTP API are the same text.
func TestServeTensorParallelCPU(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and launches adapter binaries")
	}
	dir := t.TempDir()
	build := exec.Command("go", "build", "-o", filepath.Join(dir, "orch-adapter-gpt"), "github.com/llama-orch/orch/plugins/gpt/cmd/orch-adapter-gpt")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	outb, err := build.CombinedOutput()
	require.NoError(t, err, string(outb))
	found, err := plugins.Scan([]string{dir}, hclog.NewNullLogger())
	require.NoError(t, err)
	require.Len(t, found, 1)
	require.True(t, slices.Contains(found[0].Info.Features, placement.FeatureTensorParallel),
		"the gpt adapter declares %s", placement.FeatureTensorParallel)
	path, err := defaultmodel.PathIn(t.TempDir())
	require.NoError(t, err)

	complete := func(tpSize int) (string, string) {
		cfg := config.Default()
		cfg.Server.Addr = "127.0.0.1:0"
		cfg.Plugins.Dir = dir
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var errOut syncBuf
		cmd := &cobra.Command{}
		cmd.SetErr(&errOut)
		var logs syncBuf
		log := hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Info})
		done := make(chan error, 1)
		mc := config.ModelConfig{Path: path, Name: "austen", Device: "cpu", ContextLength: 128, MaxSequences: 2, TensorParallel: tpSize}
		go func() { done <- runServe(ctx, cfg, []config.ModelConfig{mc}, time.Second, log, cmd) }()
		re := regexp.MustCompile(`listening on (http://\S+)`)
		var url string
		require.Eventually(t, func() bool {
			if m := re.FindStringSubmatch(errOut.String()); m != nil {
				url = m[1]
			}
			return url != ""
		}, 10*time.Second, 5*time.Millisecond)
		require.Eventually(t, func() bool {
			select {
			case err := <-done:
				require.NoError(t, err, logs.String())
				t.Fatal("serve ended early")
			default:
			}
			r, err := http.Get(url + "/health")
			if err != nil {
				return false
			}
			r.Body.Close()
			return r.StatusCode == 200
		}, 25*time.Second, 20*time.Millisecond)
		r, err := http.Post(url+"/v1/completions", "application/json",
			strings.NewReader(`{"model":"austen","prompt":"It is a truth universally acknowledged","max_tokens":24,"temperature":0,"ignore_eos":true}`))
		require.NoError(t, err)
		defer r.Body.Close()
		require.Equal(t, 200, r.StatusCode)
		var resp struct {
			Choices []struct {
				Text string `json:"text"`
			} `json:"choices"`
		}
		require.NoError(t, json.NewDecoder(r.Body).Decode(&resp))
		require.Len(t, resp.Choices, 1)
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(20 * time.Second):
			t.Fatal("serve did not shut down")
		}
		return resp.Choices[0].Text, logs.String()
	}
	whole, _ := complete(0)
	split, logs := complete(2)
	t.Logf("unsplit %q, split %q", whole, split)
	assert.NotEmpty(t, whole)
	assert.Equal(t, whole, split, "greedy completion, split over 2 CPU ranks vs unsplit")
	assert.Contains(t, logs, "kind=tensor-parallel", "placement chose the split")
	assert.Contains(t, logs, "tensor-parallel group loaded")

	// logits and bench take --tensor-parallel too.
	t.Setenv("ORCH_PLUGINS__DIR", dir) // logits has no --plugins-dir
	tokens := "464,3290,318,257,1310"
	logitsOf := func(extra ...string) []float32 {
		out := filepath.Join(t.TempDir(), "l.npy")
		root := NewRoot()
		var stdout, stderr syncBuf
		root.SetOut(&stdout)
		root.SetErr(&stderr)
		root.SetArgs(append([]string{"logits", "--model", path, "--device", "cpu", "--tokens", tokens,
			"--out", out, "--log-level", "warn"}, extra...))
		require.NoError(t, root.Execute(), stderr.String())
		return readNPY(t, out)
	}
	lw, ls := logitsOf(), logitsOf("--tensor-parallel", "2")
	require.Equal(t, len(lw), len(ls))
	require.NotEmpty(t, lw)
	maxAbs, maxDiff := 0.0, 0.0
	for i := range lw {
		maxAbs = math.Max(maxAbs, math.Abs(float64(lw[i])))
		maxDiff = math.Max(maxDiff, math.Abs(float64(lw[i]-ls[i])))
	}
	t.Logf("logits: max |logit| %.3f, max |split - whole| %.3g", maxAbs, maxDiff)
	assert.LessOrEqual(t, maxDiff, 1e-4*maxAbs)

	root := NewRoot()
	var stdout, stderr syncBuf
	root.SetOut(&stdout)
	root.SetErr(&stderr)
	root.SetArgs([]string{"bench", "--model", path, "--plugins-dir", dir, "-p", "16", "-n", "4", "-r", "1",
		"--device", "cpu", "--tensor-parallel", "2", "--log-level", "warn"})
	require.NoError(t, root.Execute(), stderr.String())
	t.Log("\n" + stdout.String())
	assert.Contains(t, stdout.String(), "2 x cpu")
	assert.Regexp(t, `\| tg4 \| [0-9.]+ ± [0-9.]+ \|`, stdout.String())
}

// readNPY reads a 2-D little-endian float32 .npy file (format 1.0).
func readNPY(t *testing.T, path string) []float32 {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Greater(t, len(b), 10)
	require.Equal(t, "\x93NUMPY", string(b[:6]))
	hlen := int(binary.LittleEndian.Uint16(b[8:10]))
	require.Contains(t, string(b[10:10+hlen]), "'<f4'")
	data := b[10+hlen:]
	out := make([]float32, len(data)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
	}
	return out
}
