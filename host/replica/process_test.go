package replica

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/host/placement"
	"github.com/llama-orch/orch/host/plugins"
	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/example"
)

// binDir holds orch-adapter-example, built once for the process tests.
var binDir string

func TestMain(m *testing.M) {
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	dir, err := os.MkdirTemp("", "orch-replica-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "orch-adapter-example"),
		"github.com/llama-orch/orch/sdk/example/cmd/orch-adapter-example")
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build example adapter:", err)
		return 1
	}
	binDir = dir
	return m.Run()
}

func examplePlugin(t *testing.T) plugins.Plugin {
	ps, err := plugins.Scan([]string{binDir}, hclog.NewNullLogger())
	require.NoError(t, err)
	require.Len(t, ps, 1)
	return ps[0]
}

func fakeGPUs(free ...int64) func(context.Context) ([]placement.Device, error) {
	return func(context.Context) ([]placement.Device, error) {
		var out []placement.Device
		for i, f := range free {
			out = append(out, placement.Device{Index: i, FreeBytes: f, TotalBytes: 80 << 30})
		}
		return out, nil
	}
}

// childEnv reads a member process's environment (Linux /proc).
func childEnv(t *testing.T, pid int) map[string]string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	require.NoError(t, err)
	env := map[string]string{}
	for _, kv := range bytes.Split(b, []byte{0}) {
		if k, v, ok := strings.Cut(string(kv), "="); ok {
			env[k] = v
		}
	}
	return env
}

func managed(s *Set, i int) *plugins.Managed { return s.mems[i].a.(*plugins.Managed) }

// Two real adapter processes "on two GPUs": each gets its own
// CUDA_VISIBLE_DEVICES; one is SIGKILLed mid-run; the set keeps serving,
// the supervisor relaunches and reloads it, the probe puts it back, and
// load spreads over both.
func TestOpenTwoProcessesFailover(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("reads /proc")
	}
	ctx := context.Background()
	s, dec, err := Open(ctx, examplePlugin(t), sdk.LoadRequest{Path: "unused"}, OpenOptions{})
	require.Error(t, err, "a missing model file fails in planning")
	require.Nil(t, s)
	_ = dec

	model := filepath.Join(t.TempDir(), "counter.json")
	require.NoError(t, example.WriteModel(model, example.ModelFile{Architecture: "example-counter", Name: "c", VocabSize: 64, ContextLength: 1 << 20}))
	req := sdk.LoadRequest{Path: model, Options: sdk.LoadOptions{Extra: map[string]string{"step_delay": "2ms"}}}
	s, dec, err = Open(ctx, examplePlugin(t), req, OpenOptions{
		Replicas: placement.Replicas{N: 2},
		Devices:  fakeGPUs(70<<30, 75<<30, 1<<20),
		Set:      Options{ProbeInterval: 20 * time.Millisecond, ProbeTimeout: 2 * time.Second},
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	assert.Equal(t, placement.Replicated, dec.Kind)
	assert.Equal(t, []int{0, 1}, dec.GPUs)
	require.Equal(t, 2, s.Len())
	for i, g := range dec.GPUs {
		env := childEnv(t, managed(s, i).Pid())
		assert.Equal(t, fmt.Sprint(g), env["CUDA_VISIBLE_DEVICES"], "member %d", i)
		assert.Equal(t, "0", env["NCCL_NVLS_ENABLE"], "NVLink multicast stays off")
		assert.Equal(t, fmt.Sprintf("gpu%d", g), s.Members()[i].Name)
	}
	_, err = s.Load(ctx, req, nil)
	require.NoError(t, err)

	var streams []*stream
	for i := range 4 {
		st := start(s, fmt.Sprintf("r%d", i), int32(i), 300)
		<-st.first
		streams = append(streams, st)
	}
	require.Equal(t, []int{2, 2}, inflight(s))
	oldPid := managed(s, 1).Pid()
	require.NoError(t, syscall.Kill(oldPid, syscall.SIGKILL))

	// Meanwhile new requests keep being served (by member 0).
	for i := range 5 {
		st := start(s, fmt.Sprintf("during%d", i), 1, 3)
		st.wait(t)
		require.NoError(t, st.err, "request during the outage")
		assert.Equal(t, []int32{2, 3, 4}, st.tokens)
	}
	crashed := 0
	for i, st := range streams {
		st.wait(t)
		if st.err != nil {
			assert.ErrorIs(t, st.err, sdk.ErrAdapterCrashed, "stream %d", i)
			crashed++
			continue
		}
		assert.Len(t, st.tokens, 300, "stream %d", i)
	}
	assert.Equal(t, 2, crashed, "the two streams on the killed member fail, the others finish")

	require.Eventually(t, func() bool { return s.Members()[1].Up }, 20*time.Second, 20*time.Millisecond,
		"the relaunched member comes back: %+v", s.Members())
	assert.NotEqual(t, oldPid, managed(s, 1).Pid())
	assert.Equal(t, 1, managed(s, 1).Restarts())
	assert.Equal(t, "1", childEnv(t, managed(s, 1).Pid())["CUDA_VISIBLE_DEVICES"], "the relaunch keeps the GPU")

	before := s.Members()
	var wg sync.WaitGroup
	var par []*stream
	for i := range 6 {
		st := start(s, fmt.Sprintf("after%d", i), 1, 50)
		par = append(par, st)
		wg.Add(1)
		go func() { defer wg.Done(); st.wait(t) }()
	}
	wg.Wait()
	for _, st := range par {
		require.NoError(t, st.err)
		assert.Len(t, st.tokens, 50)
	}
	after := s.Members()
	assert.Greater(t, after[0].Served, before[0].Served)
	assert.Greater(t, after[1].Served, before[1].Served, "the reloaded member takes requests again")
	stats, err := s.Stats(ctx)
	require.NoError(t, err)
	assert.Equal(t, 0, stats.Running)
}

func TestOpenCPUAndRefusal(t *testing.T) {
	ctx := context.Background()
	model := filepath.Join(t.TempDir(), "counter.json")
	require.NoError(t, example.WriteModel(model, example.ModelFile{Architecture: "example-counter", Name: "c", VocabSize: 64, ContextLength: 4096}))

	// No GPUs: the CPU, two processes when asked by number.
	s, dec, err := Open(ctx, examplePlugin(t), sdk.LoadRequest{Path: model}, OpenOptions{
		Replicas: placement.Replicas{N: 2}, Devices: fakeGPUs(),
	})
	require.NoError(t, err)
	assert.Equal(t, placement.CPU, dec.Kind)
	require.Equal(t, 2, s.Len())
	if runtime.GOOS == "linux" {
		_, has := childEnv(t, managed(s, 0).Pid())["CUDA_VISIBLE_DEVICES"]
		assert.False(t, has)
	}
	info, err := s.Load(ctx, sdk.LoadRequest{Path: model}, nil)
	require.NoError(t, err)
	assert.Equal(t, 64, info.VocabSize)
	require.NoError(t, s.Close(ctx))

	// GPUs too small for the plan plus the reserve: refused with numbers.
	_, _, err = Open(ctx, examplePlugin(t), sdk.LoadRequest{Path: model}, OpenOptions{Devices: fakeGPUs(1<<20, 2<<20)})
	require.ErrorIs(t, err, placement.ErrNoFit)
	assert.Contains(t, err.Error(), "most free is 2097152 bytes on GPU 1")

	// Listing GPUs fails: placed as if there were none.
	s, dec, err = Open(ctx, examplePlugin(t), sdk.LoadRequest{Path: model}, OpenOptions{
		Devices: func(context.Context) ([]placement.Device, error) { return nil, fmt.Errorf("nvidia-smi: no driver") },
	})
	require.NoError(t, err)
	assert.Equal(t, placement.CPU, dec.Kind)
	assert.Equal(t, 1, s.Len())
	require.NoError(t, s.Close(ctx))
}

// A split group of real adapter processes "on two GPUs": each rank gets its
// GPU; SIGKILL of a follower stops and relaunches the whole group (new
// processes for both ranks, model reloaded), which then serves again. The
// example adapter ignores the tp keys, so this tests the host side only.
func TestSplitProcessesRelaunchAsUnit(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("reads /proc")
	}
	ctx := context.Background()
	model := filepath.Join(t.TempDir(), "counter.json")
	require.NoError(t, example.WriteModel(model, example.ModelFile{Architecture: "example-counter", Name: "c", VocabSize: 64, ContextLength: 4096}))
	g, err := StartSplit(ctx, examplePlugin(t), placement.Decision{Kind: placement.Split, GPUs: []int{0, 1}, Processes: 2},
		OpenOptions{Name: "c", Supervise: plugins.SuperviseOptions{HealthInterval: 20 * time.Millisecond}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = g.Close(context.Background()) })
	pids := g.Pids()
	require.Len(t, pids, 2)
	for r, pid := range pids {
		env := childEnv(t, pid)
		assert.Equal(t, fmt.Sprint(r), env["CUDA_VISIBLE_DEVICES"], "rank %d", r)
		assert.Equal(t, "0", env["NCCL_NVLS_ENABLE"])
	}
	_, err = g.Load(ctx, sdk.LoadRequest{Path: model}, nil)
	require.NoError(t, err)
	toks, err := generate(ctx, g, 1, 3)
	require.NoError(t, err)
	assert.Equal(t, []int32{2, 3, 4}, toks)

	require.NoError(t, syscall.Kill(pids[1], syscall.SIGKILL))
	require.Eventually(t, func() bool { return g.Restarts() == 1 && g.WaitReady(doneCtx) == nil }, 20*time.Second, 10*time.Millisecond)
	now := g.Pids()
	require.Len(t, now, 2)
	assert.NotEqual(t, pids[0], now[0], "rank 0 was replaced too")
	assert.NotEqual(t, pids[1], now[1])
	assert.Error(t, syscall.Kill(pids[0], 0), "the old rank 0 process is gone")
	toks, err = generate(ctx, g, 1, 3)
	require.NoError(t, err, "the relaunched group reloaded the model")
	assert.Equal(t, []int32{2, 3, 4}, toks)
	require.NoError(t, g.Close(ctx))
	for _, pid := range now {
		assert.Eventually(t, func() bool { return syscall.Kill(pid, 0) != nil }, 5*time.Second, 10*time.Millisecond, "closed rank %d", pid)
	}

	// The example adapter cannot split: a forced split is refused.
	_, _, err = OpenModel(ctx, examplePlugin(t), sdk.LoadRequest{Path: model}, OpenOptions{TensorParallel: 2, Devices: fakeGPUs()})
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)
	assert.Contains(t, err.Error(), "tensor-parallel")
}
