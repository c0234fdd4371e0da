package replica

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/host/placement"
	"github.com/llama-orch/orch/host/plugins"
	"github.com/llama-orch/orch/sdk"
)

// MulticastOffEnv is set in every member's environment: NVLink multicast
// (NVLS) stays off in NCCL, NVSHMEM and PyTorch, as the GPU machines
// require (a program using it can take shared GPUs out of service). The
// plugin runtime passes only PATH, HOME, ORCH_*, CUDA_* ... to adapters, so
// these would otherwise be dropped; no adapter uses NCCL yet, this keeps
// the rule when one does (docs/multi-gpu.md).
var MulticastOffEnv = map[string]string{
	"NCCL_NVLS_ENABLE":                 "0",
	"NVSHMEM_DISABLE_NVLS":             "1",
	"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}

// OpenOptions configure Open.
type OpenOptions struct {
	// Replicas wanted (zero value: one).
	Replicas placement.Replicas
	// Logger for the set and the adapters (members log as <name>.gpu<i>).
	Logger hclog.Logger
	// Supervise tunes each member's supervision (relaunch on crash).
	Supervise plugins.SuperviseOptions
	// Set tunes the set (probe interval); its Logger defaults to Logger.
	Set Options
	// Devices lists the GPUs; nil means placement.Devices (nvidia-smi).
	// Tests pass a fixed list.
	Devices func(ctx context.Context) ([]placement.Device, error)
	// Reserve is passed to placement.Decide; negative means 0, zero means
	// placement.DefaultReserve.
	Reserve int64
}

// Open places the model of req and starts its adapter processes: it lists
// the GPUs, asks the adapter for a memory plan (in a short-lived planning
// process; sdk.ErrNotImplemented means no plan), decides with
// placement.Decide and starts one supervised adapter per GPU with
// CUDA_VISIBLE_DEVICES=<index> (or the CPU replica count without it). The
// returned set is not loaded: call Load, and Close when done. It is what
// the serve command calls in place of plugins.Supervise.
func Open(ctx context.Context, p plugins.Plugin, req sdk.LoadRequest, o OpenOptions) (*Set, placement.Decision, error) {
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
	plan, err := planModel(ctx, p, req, log)
	if err != nil {
		return nil, placement.Decision{}, err
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
		TensorParallel: slices.Contains(p.Info.Features, placement.FeatureTensorParallel),
		Reserve:        reserve,
	})
	if err != nil {
		return nil, placement.Decision{}, fmt.Errorf("place %s: %w", req.Path, err)
	}
	if dec.Kind == placement.Split {
		return nil, dec, fmt.Errorf("place %s: %s: tensor parallelism is not implemented by the host (docs/multi-gpu.md)", req.Path, dec.Reason)
	}
	log.Info("placement", "model", req.Path, "kind", dec.Kind.String(), "gpus", fmt.Sprint(dec.GPUs),
		"processes", dec.Processes, "bytes_per_gpu", dec.PerGPUBytes, "reason", dec.Reason)

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
			return nil, dec, fmt.Errorf("launch adapter %s for %s: %w", p.Name, name, err)
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
		return nil, dec, err
	}
	return s, dec, nil
}

// planModel asks a planning adapter process for the model's memory plan.
// A zero plan means the adapter cannot plan.
func planModel(ctx context.Context, p plugins.Plugin, req sdk.LoadRequest, log hclog.Logger) (sdk.MemoryPlan, error) {
	inst, err := plugins.Launch(ctx, p, plugins.LaunchOptions{Logger: log.Named(p.Name + ".plan")})
	if err != nil {
		return sdk.MemoryPlan{}, fmt.Errorf("plan %s: %w", req.Path, err)
	}
	defer func() { _ = inst.Close(context.Background()) }()
	plan, err := inst.Plan(ctx, req)
	if errors.Is(err, sdk.ErrNotImplemented) {
		log.Debug("adapter cannot plan memory; assuming the model fits", "adapter", p.Name)
		return sdk.MemoryPlan{}, nil
	}
	if err != nil {
		return sdk.MemoryPlan{}, fmt.Errorf("plan %s in adapter %s: %w", req.Path, p.Name, err)
	}
	return plan, nil
}
