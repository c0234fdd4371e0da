//go:build gpu

package cuda

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// Child-process environment of TestCommAllReduce (one process per rank, each
// seeing one GPU, as sdk/tp runs ranks).
const (
	envCommRank = "ORCH_TEST_COMM_RANK"
	envCommSize = "ORCH_TEST_COMM_SIZE"
	envCommID   = "ORCH_TEST_COMM_ID_FILE"
	envCommSeed = "ORCH_TEST_COMM_SEED"
)

// TestCommAllReduce runs the NCCL all-reduce between two ranks: without the
// rank environment it re-executes this test binary twice (CUDA_VISIBLE_DEVICES
// = the first two GPUs) and checks both children pass; each child checks sums
// of small integers exactly and of random floats within rounding, directly
// and inside a captured graph replayed 3 times, and prints the per-call time
// of decode-sized all-reduces in a graph (the per-layer cost of TP decode).
func TestCommAllReduce(t *testing.T) {
	if os.Getenv(envCommRank) != "" {
		commChild(t)
		return
	}
	var n int32
	if rc := gpu.l.deviceCount(&n); rc != stOK || n < 2 {
		t.Skipf("TestCommAllReduce needs 2 GPUs, this process sees %d", n)
	}
	if v, p, err := gpu.NCCLVersion(); err != nil {
		t.Skipf("TestCommAllReduce: %v (set ORCH_NCCL_LIB to libnccl.so.2)", err)
	} else {
		t.Logf("NCCL %s from %s", v, p)
	}
	devs := []string{"0", "1"}
	if vis := os.Getenv("CUDA_VISIBLE_DEVICES"); vis != "" {
		if f := strings.Split(vis, ","); len(f) >= 2 {
			devs = f[:2]
		}
	}
	idFile := filepath.Join(t.TempDir(), "nccl-id")
	seedStr := strconv.FormatUint(seed, 10)
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()
	outs := make([]strings.Builder, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for r := range 2 {
		cmd := exec.CommandContext(ctx, os.Args[0], "-test.run", "^TestCommAllReduce$", "-test.v", "-test.timeout", "140s")
		cmd.Env = append(os.Environ(), "CUDA_VISIBLE_DEVICES="+strings.TrimSpace(devs[r]),
			envCommRank+"="+strconv.Itoa(r), envCommSize+"=2", envCommID+"="+idFile, envCommSeed+"="+seedStr,
			"NCCL_NVLS_ENABLE=0") // multicast stays off (also the library's default)
		cmd.Stdout = &outs[r]
		cmd.Stderr = &outs[r]
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[r] = cmd.Run()
		}()
	}
	wg.Wait()
	for r := range 2 {
		t.Logf("rank %d (CUDA_VISIBLE_DEVICES=%s):\n%s", r, devs[r], outs[r].String())
	}
	for r := range 2 {
		require.NoError(t, errs[r], "rank %d failed (output above)", r)
		require.Contains(t, outs[r].String(), "--- PASS: TestCommAllReduce", "rank %d did not run the test", r)
	}
}

// commInputs returns rank r's input of n floats for case (it, kind): small
// integers (sums exact in fp32) or N(0,1) floats; every rank can rebuild
// every other rank's input from the shared seed.
func commInputs(sd uint64, r, n, it int, ints bool) []float32 {
	v := make([]float32, n)
	if ints {
		for i := range v {
			v[i] = float32((i*7+r*13+it*29)%201 - 100)
		}
		return v
	}
	rng := rand.New(rand.NewPCG(sd, uint64(r)<<32|uint64(n)<<8|uint64(it)))
	for i := range v {
		v[i] = float32(rng.NormFloat64())
	}
	return v
}

// checkSum compares got with the sum over ranks of their inputs, times mul:
// exactly for integer inputs, else within fp32 rounding of the summands.
func checkSum(t *testing.T, what string, got []float32, sd uint64, size, it int, ints bool, mul float64) {
	t.Helper()
	n := len(got)
	want := make([]float64, n)
	mag := make([]float64, n)
	for r := range size {
		for i, x := range commInputs(sd, r, n, it, ints) {
			want[i] += float64(x)
			mag[i] += math.Abs(float64(x))
		}
	}
	bad := 0
	for i := range got {
		w := want[i] * mul
		tol := 0.0
		if !ints {
			tol = 4e-7*mag[i]*math.Abs(mul) + 1e-7
		}
		if d := math.Abs(float64(got[i]) - w); !(d <= tol) {
			if bad < 5 {
				t.Errorf("%s: [%d] = %v, want %v (tol %.3g)", what, i, got[i], w, tol)
			}
			bad++
		}
	}
	require.Zero(t, bad, "%s: %d of %d elements wrong", what, bad, n)
}

func commChild(t *testing.T) {
	rank, err := strconv.Atoi(os.Getenv(envCommRank))
	require.NoError(t, err)
	size, err := strconv.Atoi(os.Getenv(envCommSize))
	require.NoError(t, err)
	sd, err := strconv.ParseUint(os.Getenv(envCommSeed), 10, 64)
	require.NoError(t, err)
	idFile := os.Getenv(envCommID)
	v, p, err := gpu.NCCLVersion()
	require.NoError(t, err)
	t.Logf("rank %d of %d on %s: NCCL %s from %s, NCCL_NVLS_ENABLE=%q", rank, size, gpu.DeviceName(), v, p,
		os.Getenv("NCCL_NVLS_ENABLE"))

	id := exchangeID(t, rank, idFile)
	t0 := time.Now()
	c, err := gpu.NewComm(id, rank, size)
	require.NoError(t, err)
	t.Logf("rank %d joined in %v", rank, time.Since(t0).Round(time.Millisecond))
	defer func() { require.NoError(t, c.Close()) }()
	require.Equal(t, rank, c.Rank())
	require.Equal(t, size, c.Size())
	require.True(t, c.Graphable())

	for _, n := range []int{1, 2880, 1 << 20} {
		buf, err := gpu.Alloc(ml.F32, n)
		require.NoError(t, err)
		got := make([]float32, n)
		for _, ints := range []bool{true, false} {
			name := fmt.Sprintf("n=%d ints=%v", n, ints)
			// Direct (eager) all-reduce.
			require.NoError(t, gpu.WriteF32(buf, commInputs(sd, rank, n, 0, ints)))
			c.AllReduce(gpu, buf)
			require.NoError(t, gpu.ReadF32(buf, got))
			checkSum(t, name+" direct", got, sd, size, 0, ints, 1)
		}
		// Captured between two ops (ordering inside the graph): y = x + x,
		// all-reduce y, z = y + y  =>  z = 4 * sum. Captured on the first run
		// and replayed 3 times, each on fresh inputs written before the launch.
		z, err := gpu.Alloc(ml.F32, n)
		require.NoError(t, err)
		key := fmt.Sprintf("comm-%d", n)
		for it := 1; it <= 4; it++ {
			for _, ints := range []bool{true, false} {
				name := fmt.Sprintf("n=%d ints=%v graph replay %d", n, ints, it)
				require.NoError(t, gpu.WriteF32(buf, commInputs(sd, rank, n, it, ints)))
				gpu.Fill(z, float32(math.NaN()))
				require.NoError(t, gpu.Run(key+fmt.Sprint(ints), func() {
					gpu.Add(buf, buf, buf)
					c.AllReduce(gpu, buf)
					gpu.Add(z, buf, buf)
				}))
				require.NoError(t, gpu.ReadF32(z, got))
				checkSum(t, name, got, sd, size, it, ints, 4)
			}
		}
		gpu.Free(z)
		gpu.Free(buf)
	}
	require.NoError(t, c.Err())
	require.NoError(t, gpu.Sync())

	// Both ranks time (their calls must match); rank 0 prints.
	logTiming := func(format string, args ...any) {
		if rank == 0 {
			t.Logf(format, args...)
		}
	}
	// Timing: the all-reduce per layer point of TP decode (gpt-oss: 2880
	// floats = 11.5 KB per token; Llama 70B: 8192 floats = 32 KB), a batch of
	// 8 gpt-oss tokens, and 4 MB (bandwidth). Inside a graph (20 back-to-back
	// per replay, as in a decode graph) and eager (host launch included).
	for _, n := range []int{2880, 8192, 8 * 2880, 1 << 20} {
		buf, err := gpu.Alloc(ml.F32, n)
		require.NoError(t, err)
		graphUS := 1e3 * timeKernel(t, 30, 20, func() { c.AllReduce(gpu, buf) })
		eagerUS := 1e3 * timeMs(t, 30, func() { c.AllReduce(gpu, buf) })
		bytes := 4 * n
		logTiming("allreduce timing rank %d: %d floats (%.1f KB): graph %.1f us per call, eager %.1f us per call, %.1f GB/s bus",
			rank, n, float64(bytes)/1024, graphUS, eagerUS, float64(bytes)*2*float64(size-1)/float64(size)/(graphUS*1e3))
		require.NoError(t, c.Err())
		gpu.Free(buf)
	}
	require.NoError(t, gpu.Sync())

	// Abort (sdk/tp aborts a device comm when its group breaks), on a second
	// group so that both ranks abort: all-reduces after it fail on Err and on
	// the backend's Sync, and Close still frees it.
	c2, err := gpu.NewComm(exchangeID(t, rank, idFile+".2"), rank, size)
	require.NoError(t, err)
	buf, err := gpu.Alloc(ml.F32, 64)
	require.NoError(t, err)
	got := make([]float32, 64)
	require.NoError(t, gpu.WriteF32(buf, commInputs(sd, rank, 64, 9, true)))
	c2.AllReduce(gpu, buf)
	require.NoError(t, gpu.ReadF32(buf, got))
	checkSum(t, "second comm", got, sd, size, 9, true, 1)
	// Barrier on the first comm: the peer is done with c2 before either aborts it.
	c.AllReduce(gpu, buf)
	require.NoError(t, gpu.Sync())
	a, ok := c2.(interface{ Abort() error })
	require.True(t, ok, "the CUDA comm has Abort (sdk/tp's aborter)")
	require.NoError(t, a.Abort())
	require.ErrorContains(t, c2.Err(), "aborted")
	c2.AllReduce(gpu, buf)
	require.ErrorContains(t, gpu.Sync(), "aborted")
	require.NoError(t, c2.Close())
	require.NoError(t, gpu.Sync())
	gpu.Free(buf)
}

// exchangeID: rank 0 makes the group's id and writes it to path (renamed
// into place, so no rank reads a partial id); the others poll for it.
func exchangeID(t *testing.T, rank int, path string) []byte {
	if rank == 0 {
		id, err := gpu.CommID()
		require.NoError(t, err)
		require.Len(t, id, CommIDBytes)
		require.NoError(t, os.WriteFile(path+".tmp", id, 0o600))
		require.NoError(t, os.Rename(path+".tmp", path))
		return id
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		id, err := os.ReadFile(path)
		if err == nil {
			return id
		}
		require.True(t, time.Now().Before(deadline), "rank 0's id never appeared in %s", path)
		time.Sleep(20 * time.Millisecond)
	}
}
