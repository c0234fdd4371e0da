package placement

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
)

const gib = int64(1) << 30

func gpus(free ...int64) []Device {
	out := make([]Device, len(free))
	for i, f := range free {
		out[i] = Device{Index: i, FreeBytes: f * gib, TotalBytes: 80 * gib}
	}
	return out
}

func plan(w, kv, ws int64) sdk.MemoryPlan {
	return sdk.MemoryPlan{WeightBytes: w * gib, KVBytes: kv * gib, WorkspaceBytes: ws * gib}
}

func TestDecide(t *testing.T) {
	small := plan(12, 4, 1)  // gpt-oss-20b-like: 17 GiB
	big := plan(61, 16, 4)   // gpt-oss-120b-like with a long context: 81 GiB
	huge := plan(140, 16, 2) // llama-70B F16-like
	tests := []struct {
		name    string
		req     Request
		kind    Kind
		gpus    []int
		procs   int
		per     int64
		errHas  []string
		errNoFt bool
	}{
		{name: "no gpus auto -> cpu", req: Request{Plan: small}, kind: CPU, procs: 1},
		{name: "no gpus auto, all -> one cpu process", req: Request{Plan: small, Replicas: Replicas{All: true}}, kind: CPU, procs: 1},
		{name: "cpu forced with gpus", req: Request{Device: "cpu", Plan: small, GPUs: gpus(80)}, kind: CPU, procs: 1},
		{name: "cpu replicas by number", req: Request{Device: "cpu", Plan: small, Replicas: Replicas{N: 2}}, kind: CPU, procs: 2},
		{name: "cuda without gpus", req: Request{Device: "cuda", Plan: small}, errHas: []string{"no GPU found"}},
		{name: "bad device", req: Request{Device: "tpu", Plan: small}, errHas: []string{"tpu"}},
		{name: "one gpu fits", req: Request{Plan: small, GPUs: gpus(79)}, kind: SingleGPU, gpus: []int{0}, procs: 1, per: small.Total()},
		{name: "picks the freer gpu", req: Request{Plan: small, GPUs: gpus(10, 70)}, kind: SingleGPU, gpus: []int{1}, procs: 1, per: small.Total()},
		{name: "two replicas", req: Request{Plan: small, GPUs: gpus(79, 79), Replicas: Replicas{N: 2}}, kind: Replicated, gpus: []int{0, 1}, procs: 2, per: small.Total()},
		{name: "all replicas skips a full gpu", req: Request{Plan: small, GPUs: gpus(79, 5, 79, 79), Replicas: Replicas{All: true}}, kind: Replicated, gpus: []int{0, 2, 3}, procs: 3, per: small.Total()},
		{name: "all with one fitting gpu", req: Request{Plan: small, GPUs: gpus(5, 79), Replicas: Replicas{All: true}}, kind: SingleGPU, gpus: []int{1}, procs: 1, per: small.Total()},
		{name: "too many replicas", req: Request{Plan: small, GPUs: gpus(79, 5), Replicas: Replicas{N: 2}}, errHas: []string{"2 replicas", "fits only 1 of 2", "GPU 1: 5368709120 bytes free"}, errNoFt: true},
		{name: "reserve tips the balance", req: Request{Plan: small, GPUs: gpus(17), Reserve: DefaultReserve}, errHas: []string{"reserve 536870912"}, errNoFt: true},
		{name: "reserve fits", req: Request{Plan: small, GPUs: gpus(18), Reserve: DefaultReserve}, kind: SingleGPU, gpus: []int{0}, procs: 1, per: small.Total()},
		{name: "unknown plan fits", req: Request{GPUs: gpus(1, 1), Replicas: Replicas{All: true}}, kind: Replicated, gpus: []int{0, 1}, procs: 2},
		{name: "big without tp refused", req: Request{Plan: big, GPUs: gpus(79, 79)},
			errHas: []string{"tensor-parallel", "86973087744 bytes", "most free is 84825604096 bytes on GPU 0"}, errNoFt: true},
		{name: "big split over two", req: Request{Plan: big, GPUs: gpus(79, 79), TensorParallel: true}, kind: Split, gpus: []int{0, 1}, procs: 2,
			per: (61*gib)/2 + (16*gib)/2 + 4*gib},
		{name: "huge needs four", req: Request{Plan: huge, GPUs: gpus(79, 79, 79, 79), TensorParallel: true}, kind: Split, gpus: []int{0, 1, 2, 3}, procs: 4,
			per: (140*gib)/4 + (16*gib)/4 + 2*gib},
		{name: "huge with three gpus refused", req: Request{Plan: huge, GPUs: gpus(79, 79, 79), TensorParallel: true}, errHas: []string{"power-of-two"}, errNoFt: true},
		{name: "split with replicas refused", req: Request{Plan: big, GPUs: gpus(79, 79, 79, 79), TensorParallel: true, Replicas: Replicas{N: 2}},
			errHas: []string{"replicas of a split model"}, errNoFt: true},
		// Forced splits (tensor_parallel N).
		{name: "forced split of a model that fits one gpu", req: Request{Plan: small, GPUs: gpus(79, 79), TensorParallel: true, ForceSplit: 2},
			kind: Split, gpus: []int{0, 1}, procs: 2, per: (12*gib)/2 + (4*gib)/2 + 1*gib},
		{name: "forced split takes the freest gpus", req: Request{Plan: small, GPUs: gpus(20, 79, 5, 60), TensorParallel: true, ForceSplit: 2},
			kind: Split, gpus: []int{1, 3}, procs: 2, per: (12*gib)/2 + (4*gib)/2 + 1*gib},
		{name: "forced split of four", req: Request{Plan: big, GPUs: gpus(79, 79, 79, 79), TensorParallel: true, ForceSplit: 4},
			kind: Split, gpus: []int{0, 1, 2, 3}, procs: 4, per: (61*gib)/4 + (16*gib)/4 + 4*gib},
		{name: "forced split without a plan", req: Request{GPUs: gpus(1, 1), TensorParallel: true, ForceSplit: 2}, kind: Split, gpus: []int{0, 1}, procs: 2},
		{name: "forced 1 is unsplit", req: Request{Plan: small, GPUs: gpus(79, 79), TensorParallel: true, ForceSplit: 1}, kind: SingleGPU, gpus: []int{0}, procs: 1, per: small.Total()},
		{name: "forced split on the cpu", req: Request{Device: "cpu", Plan: small, GPUs: gpus(79), TensorParallel: true, ForceSplit: 2}, kind: Split, procs: 2},
		{name: "forced split, auto and no gpu", req: Request{Plan: small, TensorParallel: true, ForceSplit: 3}, kind: Split, procs: 3},
		{name: "forced split on the cpu, too many ranks", req: Request{Device: "cpu", TensorParallel: true, ForceSplit: MaxCPURanks + 1}, errHas: []string{"at most 64 ranks"}},
		{name: "forced split not a power of two", req: Request{Plan: small, GPUs: gpus(79, 79, 79), TensorParallel: true, ForceSplit: 3}, errHas: []string{"tensor_parallel 3", "power of two"}},
		{name: "forced split more than the gpus", req: Request{Plan: small, GPUs: gpus(79, 79), TensorParallel: true, ForceSplit: 4}, errHas: []string{"tensor_parallel 4", "only 2 GPUs"}},
		{name: "forced split, adapter cannot split", req: Request{Plan: small, GPUs: gpus(79, 79), ForceSplit: 2}, errHas: []string{"does not declare", "tensor-parallel"}},
		{name: "forced split with replicas", req: Request{Plan: small, GPUs: gpus(79, 79, 79, 79), TensorParallel: true, ForceSplit: 2, Replicas: Replicas{N: 2}},
			errHas: []string{"replicas 2", "not supported"}},
		{name: "forced split with replicas all", req: Request{Device: "cpu", TensorParallel: true, ForceSplit: 2, Replicas: Replicas{All: true}},
			errHas: []string{"replicas all", "not supported"}},
		{name: "forced split, share does not fit", req: Request{Plan: huge, GPUs: gpus(79, 79), TensorParallel: true, ForceSplit: 2, Reserve: DefaultReserve},
			errHas: []string{"tensor_parallel 2", "each rank needs"}, errNoFt: true},
		// The adapter's own per-rank plans (SplitPlans) replace the estimate.
		{name: "forced split uses the rank plan", req: Request{Plan: small, GPUs: gpus(79, 79), TensorParallel: true, ForceSplit: 2,
			SplitPlans: map[int]SplitPlan{2: {Plan: plan(7, 2, 1)}}}, kind: Split, gpus: []int{0, 1}, procs: 2, per: plan(7, 2, 1).Total()},
		{name: "forced split, rank plan does not fit", req: Request{Plan: small, GPUs: gpus(9, 9), TensorParallel: true, ForceSplit: 2,
			SplitPlans: map[int]SplitPlan{2: {Plan: plan(7, 2, 1)}}, Reserve: DefaultReserve},
			errHas: []string{"each rank needs", "the adapter's rank plan: weights 7516192768"}, errNoFt: true},
		{name: "forced split the adapter cannot do", req: Request{Plan: small, GPUs: gpus(79, 79, 79, 79), TensorParallel: true, ForceSplit: 4,
			SplitPlans: map[int]SplitPlan{4: {Err: errors.New("ffn_down_exps: 90 blocks do not split 4 ways")}}},
			errHas: []string{"cannot split the model 4 ways", "90 blocks"}},
		{name: "forced split on the cpu the adapter cannot do", req: Request{Device: "cpu", TensorParallel: true, ForceSplit: 3,
			SplitPlans: map[int]SplitPlan{3: {Err: errors.New("8 heads do not split 3 ways")}}},
			errHas: []string{"tensor_parallel 3", "cannot split the model 3 ways: 8 heads"}},
		{name: "no fit: skips a size the adapter cannot split", req: Request{Plan: big, GPUs: gpus(79, 79, 79, 79), TensorParallel: true,
			SplitPlans: map[int]SplitPlan{2: {Err: errors.New("heads do not divide")}}},
			kind: Split, gpus: []int{0, 1, 2, 3}, procs: 4, per: (61*gib)/4 + (16*gib)/4 + 4*gib},
		{name: "no fit: the rank plan is larger than the estimate", req: Request{Plan: big, GPUs: gpus(44, 44, 44, 44), TensorParallel: true,
			SplitPlans: map[int]SplitPlan{2: {Plan: plan(36, 8, 4)}, 4: {Plan: plan(20, 4, 4)}}},
			kind: Split, gpus: []int{0, 1, 2, 3}, procs: 4, per: plan(20, 4, 4).Total()},
		{name: "no fit: no size works, says why", req: Request{Plan: big, GPUs: gpus(79, 79), TensorParallel: true,
			SplitPlans: map[int]SplitPlan{2: {Err: errors.New("heads do not divide")}}},
			errHas: []string{"cannot split the model 2 ways: heads do not divide"}, errNoFt: true},
		{name: "negative tensor_parallel", req: Request{Plan: small, TensorParallel: true, ForceSplit: -1}, errHas: []string{"tensor_parallel -1"}},
		{name: "duplicate gpu index", req: Request{Plan: small, GPUs: []Device{{Index: 0, FreeBytes: gib}, {Index: 0, FreeBytes: gib}}}, errHas: []string{"duplicate"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, err := Decide(tc.req)
			if len(tc.errHas) > 0 {
				require.Error(t, err)
				for _, s := range tc.errHas {
					assert.Contains(t, err.Error(), s)
				}
				assert.Equal(t, tc.errNoFt, errorsIsNoFit(err), "ErrNoFit match")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.kind, d.Kind, d.Reason)
			assert.Equal(t, tc.gpus, d.GPUs)
			assert.Equal(t, tc.procs, d.Processes)
			assert.Equal(t, tc.per, d.PerGPUBytes)
			assert.NotEmpty(t, d.Reason)
		})
	}
}

func errorsIsNoFit(err error) bool { return errors.Is(err, ErrNoFit) }

func TestParseReplicas(t *testing.T) {
	for in, want := range map[string]Replicas{"": {N: 1}, "1": {N: 1}, " 3 ": {N: 3}, "ALL": {All: true}} {
		got, err := ParseReplicas(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, in := range []string{"0", "-2", "two", "1.5"} {
		_, err := ParseReplicas(in)
		assert.ErrorIs(t, err, sdk.ErrInvalidArgument, in)
	}
	assert.Equal(t, "all", Replicas{All: true}.String())
	assert.Equal(t, "2", Replicas{N: 2}.String())
}

func TestParseSMI(t *testing.T) {
	devs, err := ParseSMI([]byte("0, 80000, 81559\n1, 1024, 81559\n\n"))
	require.NoError(t, err)
	assert.Equal(t, []Device{
		{Index: 0, FreeBytes: 80000 << 20, TotalBytes: 81559 << 20},
		{Index: 1, FreeBytes: 1024 << 20, TotalBytes: 81559 << 20},
	}, devs)
	devs, err = ParseSMI(nil)
	require.NoError(t, err)
	assert.Empty(t, devs)
	for _, bad := range []string{"0, 1", "0, x, 2", "0, -1, 2", "No devices were found"} {
		_, err := ParseSMI([]byte(bad))
		assert.Error(t, err, bad)
	}
}

// TestDevicesFakeSMI runs Devices against fake nvidia-smi scripts on PATH.
func TestDevicesFakeSMI(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("shell script fake")
	}
	ctx := context.Background()
	write := func(body string) {
		dir := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(dir, "nvidia-smi"), []byte("#!/bin/sh\n"+body), 0o755))
		t.Setenv("PATH", dir)
	}
	write(`[ "$1" = "--query-gpu=index,memory.free,memory.total" ] || exit 3
echo "0, 2048, 4096"
echo "1, 1024, 4096"
`)
	devs, err := Devices(ctx)
	require.NoError(t, err)
	assert.Equal(t, []Device{{Index: 0, FreeBytes: 2 * gib, TotalBytes: 4 * gib}, {Index: 1, FreeBytes: gib, TotalBytes: 4 * gib}}, devs)

	write("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9\n")
	devs, err = Devices(ctx)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "NVIDIA driver")
	assert.Empty(t, devs)

	t.Setenv("PATH", t.TempDir()) // no nvidia-smi at all
	devs, err = Devices(ctx)
	require.NoError(t, err)
	assert.Empty(t, devs)
}
