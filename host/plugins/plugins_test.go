package plugins

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/host/config"
	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/example"
)

// binDir holds the example adapter built twice: orch-adapter-example
// (architecture example-counter) and orch-adapter-example2 (example-b).
// noisyDir holds orch-adapter-noisy (testdata/noisy).
var binDir, noisyDir string

func TestMain(m *testing.M) {
	if os.Getenv("ORCH_TEST_HOST_HELPER") != "" {
		os.Exit(hostHelper())
	}
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	dir, err := os.MkdirTemp("", "orch-plugins-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	builds := []struct{ name, ldflags string }{
		{"orch-adapter-example", ""},
		{"orch-adapter-example2", "-X main.name=example2 -X main.version=0.2.0 -X main.architectures=example-b,example-c"},
	}
	for _, b := range builds {
		cmd := exec.Command("go", "build", "-ldflags", b.ldflags, "-o", filepath.Join(dir, b.name),
			"github.com/llama-orch/orch/sdk/example/cmd/orch-adapter-example")
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build example adapter:", err)
			return 1
		}
	}
	noisyDir = filepath.Join(dir, "noisy")
	cmd := exec.Command("go", "build", "-o", filepath.Join(noisyDir, "orch-adapter-noisy"), "./testdata/noisy")
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build noisy adapter:", err)
		return 1
	}
	binDir = dir
	return m.Run()
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func testLogger(t *testing.T) (hclog.Logger, *syncBuffer) {
	buf := &syncBuffer{}
	return hclog.New(&hclog.LoggerOptions{Name: "host", Level: hclog.Debug, Output: buf}), buf
}

func writeModel(t *testing.T, arch string) string {
	path := filepath.Join(t.TempDir(), arch+".json")
	require.NoError(t, example.WriteModel(path, example.ModelFile{Architecture: arch, Name: arch, VocabSize: 50, ContextLength: 100000}))
	return path
}

func scanAll(t *testing.T) []Plugin {
	log, _ := testLogger(t)
	ps, err := Scan([]string{binDir}, log)
	require.NoError(t, err)
	require.Len(t, ps, 2)
	return ps
}

func TestScanDescribeSelect(t *testing.T) {
	extra := t.TempDir()
	// Not executable, and executable but not an adapter: both skipped.
	require.NoError(t, os.WriteFile(filepath.Join(extra, "orch-adapter-notexec"), []byte("x"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(extra, "orch-adapter-broken"), []byte("#!/bin/sh\nexit 1\n"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(extra, "unrelated"), []byte("#!/bin/sh\n"), 0o755))
	log, logs := testLogger(t)
	ps, err := Scan([]string{binDir, filepath.Join(extra, "missing"), extra}, log)
	require.NoError(t, err)
	require.Len(t, ps, 2)
	assert.Contains(t, logs.String(), "orch-adapter-broken", "a broken adapter is reported")

	assert.Equal(t, "example", ps[0].Name)
	assert.Equal(t, sdk.Info{Name: "example", Version: "0.1.0", Architectures: []string{"example-counter"},
		DTypes: []string{"F32"}, Features: []string{"logprobs"}}, ps[0].Info)
	assert.Equal(t, filepath.Join(binDir, "orch-adapter-example"), ps[0].Path)
	assert.Len(t, ps[0].Checksum, 32)
	assert.Equal(t, "example2", ps[1].Name)
	assert.Equal(t, []string{"example-b", "example-c"}, ps[1].Info.Architectures)

	// A second scan is served from the cache: same result.
	again, err := Scan([]string{binDir}, log)
	require.NoError(t, err)
	assert.Equal(t, ps, again)

	p, err := Select(ps, "example-c", "")
	require.NoError(t, err)
	assert.Equal(t, "example2", p.Name)
	p, err = Select(ps, "example-counter", "")
	require.NoError(t, err)
	assert.Equal(t, "example", p.Name)
	p, err = Select(ps, "example-counter", "example2") // pinned
	require.NoError(t, err)
	assert.Equal(t, "example2", p.Name)

	_, err = Select(ps, "llama", "")
	require.ErrorIs(t, err, ErrNoAdapter)
	assert.Contains(t, err.Error(), `"llama"`)
	assert.Contains(t, err.Error(), "example [example-counter]")
	assert.Contains(t, err.Error(), "example2 [example-b, example-c]")
	_, err = Select(ps, "llama", "gpt")
	require.ErrorIs(t, err, ErrNoAdapter)
	assert.Contains(t, err.Error(), `"gpt"`)
	_, err = Select(nil, "llama", "")
	assert.ErrorContains(t, err, "no adapters are installed")
}

func TestChildEnv(t *testing.T) {
	t.Setenv("ORCH_TEST_FOO", "1")
	t.Setenv("CUDA_VISIBLE_DEVICES", "3")
	t.Setenv("SECRET_TOKEN", "x")
	t.Setenv("NV_NSIGHT_INJECTION_PORT_BASE", "49152") // a profiler's injection reaches the adapter
	t.Setenv("NCCL_DEBUG", "INFO")
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Debug})
	env := childEnv(LaunchOptions{Env: map[string]string{"CUDA_VISIBLE_DEVICES": "0"}, Logger: log})
	assert.Contains(t, env, "ORCH_TEST_FOO=1")
	assert.Contains(t, env, "CUDA_VISIBLE_DEVICES=0")
	assert.Contains(t, env, "ORCH_LOG_LEVEL=debug")
	assert.NotContains(t, env, "CUDA_VISIBLE_DEVICES=3")
	assert.Contains(t, env, "NV_NSIGHT_INJECTION_PORT_BASE=49152")
	assert.Contains(t, env, "NCCL_DEBUG=INFO")
	for _, kv := range env {
		assert.False(t, strings.HasPrefix(kv, "SECRET_TOKEN="), "host env leaked: %s", kv)
	}
}

func generate(ctx context.Context, a sdk.Adapter, n int) ([]int32, error) {
	var toks []int32
	err := a.Generate(ctx, sdk.GenerateRequest{Prompt: []int32{1, 2}, MaxTokens: n}, func(c sdk.Chunk) error {
		toks = append(toks, c.Tokens...)
		return nil
	})
	return toks, err
}

func TestLaunchLoadGenerateLogs(t *testing.T) {
	ps := scanAll(t)
	log, logs := testLogger(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	inst, err := Launch(ctx, ps[0], LaunchOptions{Logger: log, SecureConfig: true, Env: map[string]string{"CUDA_VISIBLE_DEVICES": ""}})
	require.NoError(t, err)
	pid := inst.Pid()
	require.NotZero(t, pid)

	info, err := inst.Describe(ctx)
	require.NoError(t, err)
	assert.Equal(t, ps[0].Info, info)

	_, err = generate(ctx, inst, 3)
	require.ErrorIs(t, err, sdk.ErrNotLoaded, "typed errors cross the process boundary")

	mi, err := inst.Load(ctx, sdk.LoadRequest{Path: writeModel(t, "example-counter")}, nil)
	require.NoError(t, err)
	assert.Equal(t, "example-counter", mi.Architecture)
	toks, err := generate(ctx, inst, 3)
	require.NoError(t, err)
	assert.Equal(t, []int32{3, 4, 5}, toks)

	_, err = inst.Load(ctx, sdk.LoadRequest{Path: writeModel(t, "llama")}, nil)
	assert.ErrorIs(t, err, sdk.ErrAlreadyLoaded)

	// The adapter's own log line shows up in the host log under its name.
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "model loaded") }, 5*time.Second, 10*time.Millisecond)
	for _, line := range strings.Split(logs.String(), "\n") {
		if strings.Contains(line, "model loaded") {
			assert.Contains(t, line, "orch-adapter-example")
			assert.Contains(t, line, "[INFO]")
		}
	}

	require.NoError(t, inst.Close(ctx))
	assert.True(t, inst.Exited())
	assert.True(t, processGone(pid), "adapter process %d still running after Close", pid)
}

func TestSecureConfigRejectsChangedBinary(t *testing.T) {
	dir := t.TempDir()
	src, err := os.ReadFile(filepath.Join(binDir, "orch-adapter-example"))
	require.NoError(t, err)
	path := filepath.Join(dir, "orch-adapter-example")
	require.NoError(t, os.WriteFile(path, src, 0o755))
	ps, err := Scan([]string{dir}, nil)
	require.NoError(t, err)
	require.Len(t, ps, 1)
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.Write([]byte{0})
	require.NoError(t, err)
	require.NoError(t, f.Close())
	_, err = Launch(context.Background(), ps[0], LaunchOptions{SecureConfig: true})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "binary changed")
}

func TestCrashMidStreamRelaunchesAndReloads(t *testing.T) {
	ps := scanAll(t)
	log, logs := testLogger(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	m, err := Supervise(ctx, ps[0], LaunchOptions{Logger: log}, SuperviseOptions{HealthInterval: 100 * time.Millisecond, MinBackoff: 50 * time.Millisecond})
	require.NoError(t, err)
	defer func() { _ = m.Close(context.Background()) }()
	_, err = m.Load(ctx, sdk.LoadRequest{Path: writeModel(t, "example-counter"), Options: sdk.LoadOptions{Extra: map[string]string{"step_delay": "2ms"}}}, nil)
	require.NoError(t, err)
	before, err := generate(ctx, m, 5)
	require.NoError(t, err)

	pid := m.Pid()
	require.NotZero(t, pid)
	got := 0
	start := time.Now()
	err = m.Generate(ctx, sdk.GenerateRequest{Prompt: []int32{1}, MaxTokens: 50000}, func(c sdk.Chunk) error {
		if got += len(c.Tokens); got == 5 {
			require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
		}
		return nil
	})
	require.Error(t, err, "a request whose adapter died must fail")
	assert.ErrorIs(t, err, sdk.ErrAdapterCrashed)
	assert.Less(t, time.Since(start), 10*time.Second, "the failure must be prompt, not a hang")
	assert.Less(t, got, 50000)

	// The next request waits for the relaunch and succeeds on the reloaded model.
	after, err := generate(ctx, m, 5)
	require.NoError(t, err)
	assert.Equal(t, before, after)
	assert.Equal(t, 1, m.Restarts())
	assert.NotEqual(t, pid, m.Pid())
	assert.True(t, processGone(pid))
	assert.Contains(t, logs.String(), "model reloaded after relaunch")

	// An adapter that dies while idle is found by the health check.
	pid = m.Pid()
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	require.Eventually(t, func() bool { return m.Restarts() == 2 }, 10*time.Second, 10*time.Millisecond,
		"the health check must notice an idle adapter's death")
	after, err = generate(ctx, m, 5)
	require.NoError(t, err)
	assert.Equal(t, before, after)
}

func TestTwoAdaptersServeTwoModels(t *testing.T) {
	ps := scanAll(t)
	log, _ := testLogger(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	models := map[string]string{"example-counter": writeModel(t, "example-counter"), "example-b": writeModel(t, "example-b")}
	served := map[string]*Managed{}
	for arch, path := range models {
		p, err := Select(ps, arch, "")
		require.NoError(t, err)
		m, err := Supervise(ctx, p, LaunchOptions{Logger: log}, SuperviseOptions{})
		require.NoError(t, err)
		defer func() { _ = m.Close(context.Background()) }()
		mi, err := m.Load(ctx, sdk.LoadRequest{Path: path}, nil)
		require.NoError(t, err)
		assert.Equal(t, arch, mi.Architecture)
		served[arch] = m
	}
	assert.Equal(t, "example", served["example-counter"].Plugin().Name)
	assert.Equal(t, "example2", served["example-b"].Plugin().Name)
	assert.NotEqual(t, served["example-counter"].Pid(), served["example-b"].Pid())

	var wg sync.WaitGroup
	for arch, m := range served {
		wg.Go(func() {
			toks, err := generate(ctx, m, 4)
			assert.NoError(t, err, arch)
			assert.Equal(t, []int32{3, 4, 5, 6}, toks, arch)
		})
	}
	wg.Wait()
}

// processGone reports whether pid has exited (a zombie counts as exited:
// in a container, nobody may reap an orphan).
func processGone(pid int) bool {
	if err := syscall.Kill(pid, 0); err != nil {
		return true
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] == 'Z' || s[i+2] == 'X'
	}
	return false
}

// hostHelper is a host-like parent: it launches the example adapter, prints
// the adapter's pid and waits to be killed.
func hostHelper() int {
	if os.Getenv("ORCH_TEST_NO_PDEATHSIG") != "" {
		disablePdeathsig = true
	}
	p := Plugin{Name: "example", Path: os.Getenv("ORCH_TEST_HOST_HELPER")}
	inst, err := Launch(context.Background(), p, LaunchOptions{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	fmt.Println(inst.Pid())
	time.Sleep(time.Minute)
	return 0
}

func TestHostSIGKILLLeavesNoAdapter(t *testing.T) {
	for _, mode := range []string{"pdeathsig", "parent-watch-only"} {
		t.Run(mode, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "ORCH_TEST_HOST_HELPER="+filepath.Join(binDir, "orch-adapter-example"))
			if mode == "parent-watch-only" {
				cmd.Env = append(cmd.Env, "ORCH_TEST_NO_PDEATHSIG=1")
			}
			cmd.Stderr = os.Stderr
			out, err := cmd.StdoutPipe()
			require.NoError(t, err)
			require.NoError(t, cmd.Start())
			line, err := bufio.NewReader(out).ReadString('\n')
			require.NoError(t, err, "helper did not report the adapter pid")
			pid, err := strconv.Atoi(strings.TrimSpace(line))
			require.NoError(t, err)
			require.False(t, processGone(pid), "adapter should be running")

			require.NoError(t, cmd.Process.Kill()) // SIGKILL: the host gets no chance to clean up
			_ = cmd.Wait()
			require.Eventually(t, func() bool { return processGone(pid) }, 10*time.Second, 20*time.Millisecond,
				"adapter %d outlived its host", pid)
		})
	}
}

func TestNativeStdoutDoesNotBreakHandshake(t *testing.T) {
	log, logs := testLogger(t)
	ps, err := Scan([]string{noisyDir}, log)
	require.NoError(t, err)
	require.Len(t, ps, 1, "the noisy adapter must still describe itself; log:\n%s", logs.String())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	inst, err := Launch(ctx, ps[0], LaunchOptions{Logger: log})
	require.NoError(t, err)
	defer func() { _ = inst.Close(ctx) }()
	_, err = inst.Load(ctx, sdk.LoadRequest{Path: writeModel(t, "noisy")}, nil)
	require.NoError(t, err)
	toks, err := generate(ctx, inst, 2)
	require.NoError(t, err)
	assert.Equal(t, []int32{3, 4}, toks)
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "cuda init: hello from native code") },
		5*time.Second, 10*time.Millisecond, "native stdout output goes to the host log via stderr")
}

func TestPinFor(t *testing.T) {
	cfg := config.PluginsConfig{Architectures: map[string]string{"llama": "llama-fast"}}
	assert.Equal(t, "mine", PinFor(cfg, config.ModelConfig{Adapter: "mine"}, "llama"))
	assert.Equal(t, "llama-fast", PinFor(cfg, config.ModelConfig{}, "llama"))
	assert.Equal(t, "", PinFor(cfg, config.ModelConfig{}, "gpt2"))
}

func TestCancelReachesAdapterProcess(t *testing.T) {
	ps := scanAll(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	inst, err := Launch(ctx, ps[0], LaunchOptions{})
	require.NoError(t, err)
	defer func() { _ = inst.Close(ctx) }()
	_, err = inst.Load(ctx, sdk.LoadRequest{Path: writeModel(t, "example-counter"), Options: sdk.LoadOptions{Extra: map[string]string{"step_delay": "2ms"}}}, nil)
	require.NoError(t, err)

	gctx, gcancel := context.WithCancel(ctx)
	n := 0
	err = inst.Generate(gctx, sdk.GenerateRequest{Prompt: []int32{1}, MaxTokens: 50000}, func(c sdk.Chunk) error {
		if n += len(c.Tokens); n == 3 {
			gcancel()
		}
		return nil
	})
	assert.ErrorIs(t, err, context.Canceled)
	assert.NotErrorIs(t, err, sdk.ErrAdapterCrashed)
	require.Eventually(t, func() bool {
		st, err := inst.Stats(ctx)
		return err == nil && st.Running == 0
	}, 2*time.Second, 5*time.Millisecond, "the adapter's generation must stop when the host cancels")
	assert.False(t, inst.Exited())
}

func TestSupervisorGivesUpWithoutHanging(t *testing.T) {
	dir := t.TempDir()
	src, err := os.ReadFile(filepath.Join(binDir, "orch-adapter-example"))
	require.NoError(t, err)
	path := filepath.Join(dir, "orch-adapter-example")
	require.NoError(t, os.WriteFile(path, src, 0o755))
	ps, err := Scan([]string{dir}, nil)
	require.NoError(t, err)
	require.Len(t, ps, 1)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m, err := Supervise(ctx, ps[0], LaunchOptions{}, SuperviseOptions{HealthInterval: 50 * time.Millisecond, MinBackoff: 10 * time.Millisecond, MaxRestarts: 2})
	require.NoError(t, err)
	defer func() { _ = m.Close(context.Background()) }()
	require.NoError(t, os.Remove(path)) // relaunching will fail
	require.NoError(t, syscall.Kill(m.Pid(), syscall.SIGKILL))

	// Every call fails (first against the dead process, then while it is
	// relaunched, then because the supervisor gave up); none hangs.
	start := time.Now()
	for {
		_, err = generate(ctx, m, 2)
		require.Error(t, err)
		require.ErrorIs(t, err, sdk.ErrAdapterCrashed)
		if strings.Contains(err.Error(), "gave up after 2 relaunch attempts") {
			break
		}
		require.Less(t, time.Since(start), 10*time.Second, "the supervisor did not give up")
		time.Sleep(10 * time.Millisecond)
	}
	require.NoError(t, m.Close(ctx))
	_, err = generate(ctx, m, 2)
	assert.ErrorIs(t, err, ErrClosed)
}
