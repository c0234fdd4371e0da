// Package placement decides where a model runs on this host: on the CPU, on
// one GPU, as replicas on several GPUs (one adapter process per GPU, the
// model fits each), or split across GPUs (tensor parallelism, only for
// adapters that declare the "tensor-parallel" feature). The decision is a
// pure function (Decide) of the GPUs found (Devices, from nvidia-smi) and
// the adapter's memory plan (sdk.MemoryPlan), so it is tested with tables.
//
// GPUs are enumerated with nvidia-smi rather than NVML bindings because the
// host builds with CGO_ENABLED=0 and must not load the driver itself; one
// fork per serve start is cheap.
package placement

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/llama-orch/orch/sdk"
)

// FeatureTensorParallel is the sdk.Info feature an adapter declares when it
// can split one model across several GPUs.
const FeatureTensorParallel = "tensor-parallel"

// DefaultReserve is memory kept free on each GPU beyond the plan: the CUDA
// context, cuBLAS handles and allocator slack of one adapter process.
const DefaultReserve int64 = 512 << 20

// Device is one GPU as nvidia-smi reports it.
type Device struct {
	Index      int   // CUDA device index (what CUDA_VISIBLE_DEVICES takes)
	FreeBytes  int64 // free memory now
	TotalBytes int64
}

// smiArgs is the query Devices runs.
var smiArgs = []string{"--query-gpu=index,memory.free,memory.total", "--format=csv,noheader,nounits"}

// Devices lists the GPUs through nvidia-smi. No nvidia-smi on PATH means no
// GPUs: (nil, nil). nvidia-smi that fails (no driver, no device) returns no
// devices and an error saying why; callers log it and place on the CPU.
func Devices(ctx context.Context) ([]Device, error) {
	path, err := exec.LookPath("nvidia-smi")
	if err != nil {
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, path, smiArgs...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stdout.String() + " " + stderr.String())
		return nil, fmt.Errorf("nvidia-smi: %w: %s", err, msg)
	}
	return ParseSMI(stdout.Bytes())
}

// ParseSMI parses the output of
// `nvidia-smi --query-gpu=index,memory.free,memory.total --format=csv,noheader,nounits`
// (one line per GPU, memory in MiB).
func ParseSMI(out []byte) ([]Device, error) {
	var devs []Device
	for n, line := range strings.Split(string(out), "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		f := strings.Split(line, ",")
		if len(f) != 3 {
			return nil, fmt.Errorf("nvidia-smi line %d %q: want 3 comma-separated fields", n+1, line)
		}
		var v [3]int64
		for i := range f {
			x, err := strconv.ParseInt(strings.TrimSpace(f[i]), 10, 64)
			if err != nil || x < 0 {
				return nil, fmt.Errorf("nvidia-smi line %d %q: field %d is not a non-negative integer", n+1, line, i+1)
			}
			v[i] = x
		}
		devs = append(devs, Device{Index: int(v[0]), FreeBytes: v[1] << 20, TotalBytes: v[2] << 20})
	}
	return devs, nil
}

// Replicas is the configured replica count: a number, or All (every GPU
// the model fits).
type Replicas struct {
	N   int  // >= 1 when !All
	All bool // one replica per GPU that fits the model
}

// ParseReplicas parses a replicas setting: "" or "1" (one), "N", or "all".
func ParseReplicas(s string) (Replicas, error) {
	s = strings.TrimSpace(strings.ToLower(s))
	switch s {
	case "":
		return Replicas{N: 1}, nil
	case "all":
		return Replicas{All: true}, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		return Replicas{}, fmt.Errorf("replicas %q: want a positive number or \"all\": %w", s, sdk.ErrInvalidArgument)
	}
	return Replicas{N: n}, nil
}

func (r Replicas) String() string {
	if r.All {
		return "all"
	}
	return strconv.Itoa(max(r.N, 1))
}

// Kind is the shape of a placement.
type Kind int

const (
	CPU        Kind = iota // adapter processes without a GPU
	SingleGPU              // one adapter process on one GPU
	Replicated             // one adapter process per GPU, each holding the whole model
	Split                  // one model split across GPUs (tensor parallelism)
)

func (k Kind) String() string {
	switch k {
	case CPU:
		return "cpu"
	case SingleGPU:
		return "gpu"
	case Replicated:
		return "replicas"
	case Split:
		return "tensor-parallel"
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// Request is what Decide needs.
type Request struct {
	// Device is the model's configured device: "auto" (or ""), "cpu", "cuda".
	Device string
	// Plan is the adapter's memory plan for the model. A zero Total means
	// unknown (the adapter cannot plan): the model is assumed to fit.
	Plan sdk.MemoryPlan
	// GPUs found on the host (Devices).
	GPUs []Device
	// Replicas wanted (zero value: one).
	Replicas Replicas
	// TensorParallel: the adapter declares FeatureTensorParallel.
	TensorParallel bool
	// ForceSplit, when > 1, splits the model over that many ranks even when
	// it fits one GPU (models[].tensor_parallel, --tensor-parallel): a power
	// of two no larger than the GPU count, or any number up to MaxCPURanks
	// on the CPU (rank processes without a GPU; slow, for tests). 0 or 1
	// leaves the choice to memory (Split only when the model fits no GPU).
	// It needs TensorParallel and cannot be combined with replicas.
	ForceSplit int
	// SplitPlans are the adapter's own plans for one rank of a k-way split,
	// by k (asked with LoadOptions.Extra tp.size=k). Where present they
	// replace the estimate from Plan (weights/k + KV/k + workspace, which
	// misses the tensors every rank holds whole); a SplitPlan with Err says
	// the adapter cannot split k ways (a dimension does not divide), and
	// that k is not chosen.
	SplitPlans map[int]SplitPlan
	// Reserve is kept free on every GPU beyond the plan (DefaultReserve is
	// a sensible value; 0 keeps nothing).
	Reserve int64
}

// SplitPlan is the adapter's plan for rank 0 of a k-way split (rank 0 holds
// the few tensors added once, so its share is the largest), or why it
// cannot split k ways.
type SplitPlan struct {
	Plan sdk.MemoryPlan
	Err  error
}

// MaxCPURanks bounds a forced split on the CPU (a guard against a typo
// starting hundreds of processes).
const MaxCPURanks = 64

// Decision is where the model runs.
type Decision struct {
	Kind Kind
	// GPUs are the CUDA indices used, in ascending order: one per replica
	// (SingleGPU, Replicated) or the split group (Split; GPUs[r] is rank
	// r's). Empty for CPU, and for a Split on the CPU (forced split with
	// device cpu, or auto and no GPU): then Processes CPU ranks.
	GPUs []int
	// Processes is the number of adapter processes to start: len(GPUs),
	// or the replica (CPU) or rank (Split on the CPU) count.
	Processes int
	// PerGPUBytes is the planned allocation on each used GPU (0 on CPU or
	// when the plan is unknown).
	PerGPUBytes int64
	// Reason says why, for the log.
	Reason string
}

// ErrNoFit is matched (errors.Is) by the error Decide returns when the model
// cannot be placed on the GPUs; the message names needed and free bytes.
var ErrNoFit = errors.New("model does not fit")

// Decide places a model. It refuses (error) rather than guessing: a model
// that fits no GPU is not silently moved to the CPU when the device is
// "auto" and GPUs exist, and more replicas than fitting GPUs is an error.
func Decide(r Request) (Decision, error) {
	dev := strings.ToLower(strings.TrimSpace(r.Device))
	if dev == "" {
		dev = "auto"
	}
	if dev != "auto" && dev != "cpu" && dev != "cuda" {
		return Decision{}, fmt.Errorf("device %q: want auto, cpu or cuda: %w", r.Device, sdk.ErrInvalidArgument)
	}
	if !r.Replicas.All && r.Replicas.N < 0 {
		return Decision{}, fmt.Errorf("replicas %d: %w", r.Replicas.N, sdk.ErrInvalidArgument)
	}
	if r.Reserve < 0 {
		return Decision{}, fmt.Errorf("reserve %d bytes: %w", r.Reserve, sdk.ErrInvalidArgument)
	}
	wantN := max(r.Replicas.N, 1)
	if r.ForceSplit < 0 {
		return Decision{}, fmt.Errorf("tensor_parallel %d: want 0 or 1 (decide from memory) or a rank count >= 2: %w", r.ForceSplit, sdk.ErrInvalidArgument)
	}
	forced := r.ForceSplit > 1
	if forced {
		if !r.TensorParallel {
			return Decision{}, fmt.Errorf("tensor_parallel %d: the adapter cannot split a model across processes (it does not declare the %q feature): %w",
				r.ForceSplit, FeatureTensorParallel, sdk.ErrInvalidArgument)
		}
		if r.Replicas.All || wantN > 1 {
			return Decision{}, fmt.Errorf("tensor_parallel %d with replicas %s: replicas of a split model are not supported; set one or the other: %w",
				r.ForceSplit, r.Replicas, sdk.ErrInvalidArgument)
		}
	}
	if dev == "cpu" || (dev == "auto" && len(r.GPUs) == 0) {
		why := "device cpu"
		if dev == "auto" {
			why = "no GPU found"
		}
		if forced {
			if r.ForceSplit > MaxCPURanks {
				return Decision{}, fmt.Errorf("tensor_parallel %d on the CPU: at most %d ranks: %w", r.ForceSplit, MaxCPURanks, sdk.ErrInvalidArgument)
			}
			if _, err := r.rankShare(r.ForceSplit); err != nil {
				return Decision{}, fmt.Errorf("tensor_parallel %d: %w", r.ForceSplit, err)
			}
			return Decision{Kind: Split, Processes: r.ForceSplit,
				Reason: fmt.Sprintf("%s; tensor_parallel %d: %d CPU rank processes (slow: for tests, not for speed)", why, r.ForceSplit, r.ForceSplit)}, nil
		}
		if r.Replicas.All {
			wantN = 1 // "all" counts GPUs; on the CPU one process uses every core
		}
		return Decision{Kind: CPU, Processes: wantN, Reason: why}, nil
	}
	if len(r.GPUs) == 0 {
		return Decision{}, fmt.Errorf("device cuda: no GPU found (nvidia-smi lists none); use --device auto or cpu to run on the CPU")
	}
	seen := map[int]bool{}
	for _, g := range r.GPUs {
		if seen[g.Index] || g.Index < 0 || g.FreeBytes < 0 {
			return Decision{}, fmt.Errorf("GPU list: bad or duplicate index %d: %w", g.Index, sdk.ErrInvalidArgument)
		}
		seen[g.Index] = true
	}

	// GPUs by free memory, most first (index breaks ties).
	gpus := slices.Clone(r.GPUs)
	slices.SortStableFunc(gpus, func(a, b Device) int {
		if a.FreeBytes != b.FreeBytes {
			if a.FreeBytes > b.FreeBytes {
				return -1
			}
			return 1
		}
		return a.Index - b.Index
	})
	need := r.Plan.Total()
	known := need > 0
	if forced {
		return forceSplit(r, gpus)
	}
	var fit []Device
	for _, g := range gpus {
		if !known || need+r.Reserve <= g.FreeBytes {
			fit = append(fit, g)
		}
	}
	per := int64(0)
	if known {
		per = need
	}
	if len(fit) > 0 {
		n := wantN
		if r.Replicas.All {
			n = len(fit)
		}
		if n > len(fit) {
			return Decision{}, fmt.Errorf("%w: %d replicas wanted but the model (%s) fits only %d of %d GPUs (%s): %w",
				ErrNoFit, n, planString(r.Plan, r.Reserve), len(fit), len(gpus), freeString(gpus), sdk.ErrInvalidArgument)
		}
		idx := indices(fit[:n])
		d := Decision{Kind: SingleGPU, GPUs: idx, Processes: n, PerGPUBytes: per}
		if n > 1 {
			d.Kind = Replicated
			d.Reason = fmt.Sprintf("model fits one GPU; %s replicas", r.Replicas)
		} else {
			d.Reason = fmt.Sprintf("model fits GPU %d", idx[0])
		}
		if !known {
			d.Reason += " (no memory plan from the adapter)"
		}
		return d, nil
	}

	// Fits no single GPU.
	if !r.TensorParallel {
		return Decision{}, fmt.Errorf("%w: needs %s on one GPU, most free is %d bytes on GPU %d (%s); "+
			"the adapter cannot split a model across GPUs (no %q feature); try a smaller context length or --device cpu",
			ErrNoFit, planString(r.Plan, r.Reserve), gpus[0].FreeBytes, gpus[0].Index, freeString(gpus), FeatureTensorParallel)
	}
	if !r.Replicas.All && wantN > 1 {
		return Decision{}, fmt.Errorf("%w: the model fits no single GPU, and replicas of a split model are not supported (replicas %d)",
			ErrNoFit, wantN)
	}
	// Smallest power-of-two group whose every member holds its share
	// (rankShare) and that the adapter can split.
	var cannot []string
	for k := 2; k <= len(gpus); k *= 2 {
		share, err := r.rankShare(k)
		if err != nil {
			cannot = append(cannot, err.Error())
			continue
		}
		if share+r.Reserve <= gpus[k-1].FreeBytes {
			idx := indices(gpus[:k])
			return Decision{Kind: Split, GPUs: idx, Processes: k, PerGPUBytes: share,
				Reason: fmt.Sprintf("model fits no single GPU; split over %d GPUs, %d bytes each", k, share)}, nil
		}
	}
	why := ""
	if len(cannot) > 0 {
		why = "; " + strings.Join(cannot, "; ")
	}
	return Decision{}, fmt.Errorf("%w: needs %s, more than any power-of-two group of the %d GPUs holds (%s)%s",
		ErrNoFit, planString(r.Plan, r.Reserve), len(gpus), freeString(gpus), why)
}

// forceSplit places a forced split (ForceSplit > 1) on the GPUs (sorted
// most free first): the ForceSplit freest GPUs, each holding its share.
func forceSplit(r Request, gpus []Device) (Decision, error) {
	k := r.ForceSplit
	if k&(k-1) != 0 {
		return Decision{}, fmt.Errorf("tensor_parallel %d on GPUs: want a power of two (2, 4, 8; attention heads and feed-forward blocks split evenly): %w",
			k, sdk.ErrInvalidArgument)
	}
	if k > len(gpus) {
		return Decision{}, fmt.Errorf("tensor_parallel %d: only %d GPUs found (%s): %w", k, len(gpus), freeString(gpus), sdk.ErrInvalidArgument)
	}
	share, err := r.rankShare(k)
	if err != nil {
		return Decision{}, err
	}
	if share > 0 && share+r.Reserve > gpus[k-1].FreeBytes {
		return Decision{}, fmt.Errorf("%w: tensor_parallel %d: each rank needs %d bytes (%s, reserve %d), the %d freest GPUs have %s",
			ErrNoFit, k, share+r.Reserve, r.shareString(k), r.Reserve, k, freeString(gpus[:k]))
	}
	d := Decision{Kind: Split, GPUs: indices(gpus[:k]), Processes: k, PerGPUBytes: share,
		Reason: fmt.Sprintf("tensor_parallel %d: split over the %d freest GPUs", k, k)}
	if share > 0 {
		d.Reason += fmt.Sprintf(", %d bytes each", share)
	} else {
		d.Reason += " (no memory plan from the adapter)"
	}
	return d, nil
}

// rankShare is one rank's bytes in a k-way split (0: unknown): the
// adapter's SplitPlans[k] when it gave one, else an estimate from the whole
// plan: weights and KV divide (heads and feed-forward columns split), the
// workspace does not. The estimate misses the tensors every rank holds whole
// (embeddings, norms, router, output head: gpt-oss-20b at k=2 about 0.6 GB
// more per rank), so for a model that barely fits the ranks' Load fails with
// its out-of-memory error instead. An error: the adapter cannot split k ways.
func (r Request) rankShare(k int) (int64, error) {
	if sp, ok := r.SplitPlans[k]; ok {
		if sp.Err != nil {
			return 0, fmt.Errorf("the adapter cannot split the model %d ways: %w", k, sp.Err)
		}
		if sp.Plan.Total() > 0 {
			return sp.Plan.Total(), nil
		}
	}
	if r.Plan.Total() == 0 {
		return 0, nil
	}
	return ceilDiv(r.Plan.WeightBytes, int64(k)) + ceilDiv(r.Plan.KVBytes, int64(k)) + r.Plan.WorkspaceBytes, nil
}

// shareString says what rankShare(k) is made of.
func (r Request) shareString(k int) string {
	if sp, ok := r.SplitPlans[k]; ok && sp.Err == nil && sp.Plan.Total() > 0 {
		return fmt.Sprintf("the adapter's rank plan: weights %d, KV %d, workspace %d", sp.Plan.WeightBytes, sp.Plan.KVBytes, sp.Plan.WorkspaceBytes)
	}
	return fmt.Sprintf("weights/%d %d, KV/%d %d, workspace %d", k, ceilDiv(r.Plan.WeightBytes, int64(k)), k, ceilDiv(r.Plan.KVBytes, int64(k)), r.Plan.WorkspaceBytes)
}

func ceilDiv(a, b int64) int64 { return (a + b - 1) / b }

func indices(ds []Device) []int {
	out := make([]int, len(ds))
	for i, d := range ds {
		out[i] = d.Index
	}
	slices.Sort(out)
	return out
}

func planString(p sdk.MemoryPlan, reserve int64) string {
	return fmt.Sprintf("%d bytes (weights %d, KV %d, workspace %d, reserve %d)",
		p.Total()+reserve, p.WeightBytes, p.KVBytes, p.WorkspaceBytes, reserve)
}

func freeString(gpus []Device) string {
	parts := make([]string, 0, len(gpus))
	g := slices.Clone(gpus)
	slices.SortFunc(g, func(a, b Device) int { return a.Index - b.Index })
	for _, d := range g {
		parts = append(parts, fmt.Sprintf("GPU %d: %d bytes free", d.Index, d.FreeBytes))
	}
	return strings.Join(parts, ", ")
}
