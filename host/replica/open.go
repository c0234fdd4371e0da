package replica

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/host/placement"
	"github.com/llama-orch/orch/host/plugins"
	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/tp"
)

// MulticastOffEnv is set in every member's environment: NVLink multicast
// (NVLS) stays off in NCCL, NVSHMEM and PyTorch, as the GPU machines
// require (a program using it can take shared GPUs out of service). The
// plugin runtime passes only PATH, HOME, ORCH_*, CUDA_* ... to adapters, so
// these would otherwise be dropped. Tensor-parallel ranks use NCCL
// (docs/multi-gpu.md).
var MulticastOffEnv = map[string]string{
	"NCCL_NVLS_ENABLE":                 "0",
	"NVSHMEM_DISABLE_NVLS":             "1",
	"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}

// OpenOptions configure Open and OpenModel.
type OpenOptions struct {
	// Replicas wanted (zero value: one).
	Replicas placement.Replicas
	// TensorParallel > 1 splits the model over that many ranks even when it
	// fits one GPU (placement.Request.ForceSplit); 0 or 1: split only when
	// it fits no GPU. Only OpenModel starts split models.
	TensorParallel int
	// Name is the model's name in logs (split ranks log as <Name>.tp<r>);
	// default: the plugin's name.
	Name string
	// Logger for the set and the adapters (members log as <name>.gpu<i>).
	Logger hclog.Logger
	// Supervise tunes each member's supervision (relaunch on crash); for a
	// split model, the group's.
	Supervise plugins.SuperviseOptions
	// Set tunes the set (probe interval); its Logger defaults to Logger.
	Set Options
	// Devices lists the GPUs; nil means placement.Devices (nvidia-smi).
	// Tests pass a fixed list.
	Devices func(ctx context.Context) ([]placement.Device, error)
	// Reserve is passed to placement.Decide; negative means 0, zero means
	// placement.DefaultReserve.
	Reserve int64
	// CrashGrace is GroupOptions.CrashGrace for split models.
	CrashGrace time.Duration
}

// Model is a placed model's adapter: a replica *Set or, for a split model,
// a tensor-parallel *Group. The serve command needs no more than this.
type Model interface {
	sdk.Adapter
	Close(ctx context.Context) error
}

// Open places the model of req and starts its adapter processes: it lists
// the GPUs, asks the adapter for a memory plan (in a short-lived planning
// process; sdk.ErrNotImplemented means no plan), decides with
// placement.Decide and starts one supervised adapter per GPU with
// CUDA_VISIBLE_DEVICES=<index> (or the CPU replica count without it). The
// returned set is not loaded: call Load, and Close when done. A split
// placement is refused here; OpenModel starts those.
func Open(ctx context.Context, p plugins.Plugin, req sdk.LoadRequest, o OpenOptions) (*Set, placement.Decision, error) {
	dec, err := place(ctx, p, req, o)
	if err != nil {
		return nil, placement.Decision{}, err
	}
	if dec.Kind == placement.Split {
		return nil, dec, fmt.Errorf("place %s: %s: a split model needs replica.OpenModel", req.Path, dec.Reason)
	}
	s, err := openSet(ctx, p, dec, o)
	return s, dec, err
}

// OpenModel is Open for every placement: a replica *Set for the CPU, one
// GPU or replicas, a tensor-parallel *Group (StartSplit) for a split. It is
// what the serve command calls in place of plugins.Supervise. The model is
// not loaded: call Load (for a group it passes tp.rank/size/addr to every
// rank), and Close when done.
func OpenModel(ctx context.Context, p plugins.Plugin, req sdk.LoadRequest, o OpenOptions) (Model, placement.Decision, error) {
	dec, err := place(ctx, p, req, o)
	if err != nil {
		return nil, placement.Decision{}, err
	}
	if dec.Kind == placement.Split {
		g, err := StartSplit(ctx, p, dec, o)
		if err != nil {
			return nil, dec, fmt.Errorf("start %s: %w", req.Path, err)
		}
		return g, dec, nil
	}
	s, err := openSet(ctx, p, dec, o)
	if err != nil {
		return nil, dec, err
	}
	return s, dec, nil
}

// StartSplit starts the tensor-parallel group of a Split decision: one
// adapter process of p per rank (on GPU dec.GPUs[r], or dec.Processes CPU
// ranks), supervised as a unit.
func StartSplit(ctx context.Context, p plugins.Plugin, dec placement.Decision, o OpenOptions) (*Group, error) {
	if dec.Kind != placement.Split {
		return nil, fmt.Errorf("start split: placement is %s, not a split: %w", dec.Kind, sdk.ErrInvalidArgument)
	}
	log := o.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	name := o.Name
	if name == "" {
		name = p.Name
	}
	if len(dec.GPUs) == 0 {
		log.Warn("tensor-parallel ranks on the CPU: every step crosses processes through the host; slow, meant for tests",
			"model", name, "ranks", dec.Processes)
	}
	return StartGroup(ctx, GroupOptions{
		Name: name, Logger: log, GPUs: dec.GPUs, Size: dec.Processes, Launch: PluginRanks(p),
		Supervise: o.Supervise, CrashGrace: o.CrashGrace,
	})
}

// place lists the GPUs, plans and decides.
func place(ctx context.Context, p plugins.Plugin, req sdk.LoadRequest, o OpenOptions) (placement.Decision, error) {
	log := o.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	devices := o.Devices
	if devices == nil {
		devices = placement.Devices
	}
	gpus, err := devices(ctx)
	if err != nil {
		log.Warn("listing GPUs failed; placing as if there were none", "error", err)
		gpus = nil
	}
	canSplit := slices.Contains(p.Info.Features, placement.FeatureTensorParallel)
	var sizes []int // k-way splits to ask rank plans for
	switch {
	case !canSplit:
	case o.TensorParallel > 1:
		sizes = []int{o.TensorParallel}
	case strings.ToLower(req.Options.Device) != "cpu":
		for k := 2; k <= len(gpus); k *= 2 {
			sizes = append(sizes, k)
		}
	}
	plan, splits, err := planModel(ctx, p, req, sizes, log)
	if err != nil {
		return placement.Decision{}, err
	}
	reserve := o.Reserve
	switch {
	case reserve == 0:
		reserve = placement.DefaultReserve
	case reserve < 0:
		reserve = 0
	}
	dec, err := placement.Decide(placement.Request{
		Device: req.Options.Device, Plan: plan, GPUs: gpus, Replicas: o.Replicas,
		TensorParallel: canSplit, ForceSplit: o.TensorParallel, SplitPlans: splits,
		Reserve: reserve,
	})
	if err != nil {
		return placement.Decision{}, fmt.Errorf("place %s: %w", req.Path, err)
	}
	log.Info("placement", "model", req.Path, "kind", dec.Kind.String(), "gpus", fmt.Sprint(dec.GPUs),
		"processes", dec.Processes, "bytes_per_gpu", dec.PerGPUBytes, "reason", dec.Reason)
	return dec, nil
}

// openSet starts the supervised members of a CPU, SingleGPU or Replicated
// decision.
func openSet(ctx context.Context, p plugins.Plugin, dec placement.Decision, o OpenOptions) (*Set, error) {
	log := o.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	var members []Member
	closeAll := func() {
		for _, m := range members {
			_ = m.Adapter.(*plugins.Managed).Close(context.Background())
		}
	}
	for i := range dec.Processes {
		name := "cpu" + strconv.Itoa(i)
		env := maps.Clone(MulticastOffEnv)
		if dec.Kind != placement.CPU {
			name = "gpu" + strconv.Itoa(dec.GPUs[i])
			env["CUDA_VISIBLE_DEVICES"] = strconv.Itoa(dec.GPUs[i])
		}
		m, err := plugins.Supervise(ctx, p, plugins.LaunchOptions{Env: env, Logger: log.Named(name)}, o.Supervise)
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("launch adapter %s for %s: %w", p.Name, name, err)
		}
		members = append(members, Member{Name: name, Adapter: m})
	}
	so := o.Set
	if so.Logger == nil {
		so.Logger = log
	}
	s, err := New(members, so)
	if err != nil {
		closeAll()
		return nil, err
	}
	return s, nil
}

// planModel asks a planning adapter process for the model's memory plan
// (a zero plan means the adapter cannot plan) and, for each k in sizes, the
// plan of rank 0 of a k-way split (LoadOptions.Extra tp.size=k, tp.rank=0).
// A split plan the adapter refuses is kept with its error (placement then
// does not split that way); none are asked when the adapter cannot plan.
func planModel(ctx context.Context, p plugins.Plugin, req sdk.LoadRequest, sizes []int, log hclog.Logger) (sdk.MemoryPlan, map[int]placement.SplitPlan, error) {
	inst, err := plugins.Launch(ctx, p, plugins.LaunchOptions{Logger: log.Named(p.Name + ".plan")})
	if err != nil {
		return sdk.MemoryPlan{}, nil, fmt.Errorf("plan %s: %w", req.Path, err)
	}
	defer func() { _ = inst.Close(context.Background()) }()
	plan, err := inst.Plan(ctx, req)
	if errors.Is(err, sdk.ErrNotImplemented) {
		log.Debug("adapter cannot plan memory; assuming the model fits", "adapter", p.Name)
		return sdk.MemoryPlan{}, nil, nil
	}
	if err != nil {
		return sdk.MemoryPlan{}, nil, fmt.Errorf("plan %s in adapter %s: %w", req.Path, p.Name, err)
	}
	var splits map[int]placement.SplitPlan
	for _, k := range sizes {
		r := req
		r.Options.Extra = maps.Clone(req.Options.Extra)
		if r.Options.Extra == nil {
			r.Options.Extra = map[string]string{}
		}
		r.Options.Extra[tp.ExtraSize] = strconv.Itoa(k)
		r.Options.Extra[tp.ExtraRank] = "0"
		sp, err := inst.Plan(ctx, r)
		if errors.Is(err, sdk.ErrNotImplemented) {
			continue
		}
		if err != nil && ctx.Err() != nil {
			return sdk.MemoryPlan{}, nil, fmt.Errorf("plan %s: %w", req.Path, err)
		}
		if splits == nil {
			splits = map[int]placement.SplitPlan{}
		}
		splits[k] = placement.SplitPlan{Plan: sp, Err: err}
		log.Debug("split memory plan", "model", req.Path, "ranks", k, "weights", sp.WeightBytes, "kv", sp.KVBytes,
			"workspace", sp.WorkspaceBytes, "error", err)
	}
	return plan, splits, nil
}
