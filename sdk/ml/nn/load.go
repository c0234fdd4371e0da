package nn

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"sort"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/tp"
)

// MaxForwardTokens caps the default forward sub-batch (Options.MaxTokens):
// activations and scratch grow with it.
const MaxForwardTokens = 2048

// Options configure building a model from an open GGUF file.
type Options struct {
	Backend       ml.Backend // required
	NumBlocks     int        // KV blocks in the pool (0 = enough for one sequence of ContextLength)
	BlockSize     int        // tokens per KV block (0 = DefaultBlockSize)
	MaxTokens     int        // tokens per internal forward sub-batch (0 = the step budget, at most MaxForwardTokens)
	ContextLength int        // max tokens per sequence (0 = min(trained, 4096))
	KVType        ml.DType   // KV cache element type: F32 (the zero value), or F16/BF16 on the GPU
	// KV groups (see KVGroups): MaxSequences and StepTokens (the engine's
	// tokens per step, 0 = its default) size the window pools (0 sequences:
	// NumBlocks blocks, as the full pool); WindowBlocks > 0 sets each window
	// pool's blocks instead; SharedKV keeps one pool for all layers.
	MaxSequences int
	StepTokens   int
	WindowBlocks int
	SharedKV     bool
	// Shard places the model in a tensor-parallel group (docs/multi-gpu.md):
	// the builder binds rank Shard.Rank's part of every split weight
	// (Weights.Part), keeps its KV heads only and sums the ranks' partial
	// outputs with Shard.Comm.AllReduce after the attention output projection
	// and after the feed-forward. Size <= 1: the whole model.
	Shard ml.Shard
	// Progress, when set, receives the bytes of weights bound so far.
	Progress func(done, total int64)
}

// Normalize fills defaults given the model's trained context.
func (o Options) Normalize(trained int) (Options, error) {
	if o.Backend == nil {
		return o, errors.New("no backend given")
	}
	if o.Shard.Split() {
		if o.Shard.Rank < 0 || o.Shard.Rank >= o.Shard.Size {
			return o, fmt.Errorf("tensor-parallel rank %d of size %d: %w", o.Shard.Rank, o.Shard.Size, sdk.ErrInvalidArgument)
		}
		if o.Shard.Comm == nil {
			return o, fmt.Errorf("tensor-parallel rank %d of %d without a Comm: %w", o.Shard.Rank, o.Shard.Size, sdk.ErrInvalidArgument)
		}
	}
	if o.BlockSize <= 0 {
		o.BlockSize = DefaultBlockSize
	}
	if trained <= 0 {
		trained = 4096
	}
	if o.ContextLength <= 0 {
		o.ContextLength = min(trained, 4096)
	}
	o.ContextLength = min(o.ContextLength, trained)
	if o.NumBlocks <= 0 {
		o.NumBlocks = (o.ContextLength + o.BlockSize - 1) / o.BlockSize
	}
	if o.MaxTokens <= 0 {
		// The forward sub-batch follows the engine's step budget (explicit,
		// or engine.DefaultMaxBatchTokens), up to MaxForwardTokens: with
		// 256-token pieces (the default before session 7) a 2048-token step
		// ran the MoE GEMMs 8 times at n = 256 (the grouped MoE op is 2.37 ms
		// at n = 2048 vs ~0.6 at n = 256, per layer, H100).
		step := o.StepTokens
		if step <= 0 {
			step = engine.DefaultMaxBatchTokens
		}
		o.MaxTokens = min(step, MaxForwardTokens)
	}
	return o, nil
}

// Builder builds a Runner for one architecture from an open file. On error
// it frees what it allocated (not the file nor the backend).
type Builder func(f *gguf.File, o Options) (*Runner, error)

// Builders maps GGUF general.architecture values to builders.
type Builders map[string]Builder

// Architectures lists the served architectures, sorted.
func (bs Builders) Architectures() []string {
	out := make([]string, 0, len(bs))
	for a := range bs {
		out = append(out, a)
	}
	sort.Strings(out)
	return out
}

// Open builds the model in f (whose architecture must be served); the
// returned Runner closes f on Close.
func (bs Builders) Open(f *gguf.File, o Options) (*Runner, error) {
	arch := f.Architecture()
	build, ok := bs[arch]
	if !ok {
		return nil, fmt.Errorf("architecture %q (this adapter serves %v): %w", arch, bs.Architectures(), sdk.ErrUnsupportedArchitecture)
	}
	r, err := build(f, o)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", arch, err)
	}
	r.File = f
	return r, nil
}

// Load opens the GGUF at path and builds its model on o.Backend.
func (bs Builders) Load(path string, o Options) (*Runner, error) {
	f, err := gguf.Open(path)
	if err != nil {
		return nil, err
	}
	r, err := bs.Open(f, o)
	if err != nil {
		f.Close()
		return nil, err
	}
	return r, nil
}

// TrainedContext reads <arch>.context_length (0 when absent).
func TrainedContext(f *gguf.File) int {
	v, _ := f.ArchUint("context_length")
	if v > 1<<30 {
		return 1 << 30
	}
	return int(v)
}

// Loader returns an engine.Loader for these architectures: it opens the
// file, checks the architecture before anything else, picks the backend from
// req.Options.Device, sizes the KV pool (see Size) and builds the model.
// It does not honour LoadOptions.KVCacheFraction (it logs that it ignores
// one); LoaderWith does, given the architectures' footprints.
func (bs Builders) Loader(log hclog.Logger) engine.Loader { return bs.LoaderWith(nil, log) }

// LoaderWith is Loader that also honours LoadOptions.KVCacheFraction: for an
// architecture with a Footprinter in fps it sizes the KV pool from that
// fraction of the device's free memory (FreeMemory, read before the weights
// are uploaded) less the planned weights and workspace, exactly as Planner
// with the same fps does, and fails with an *sdk.OutOfMemoryError when that
// does not hold one full context. When the free memory is unknown, or the
// architecture has no footprint, it sizes the pool as Loader does and logs it.
//
// Tensor parallelism: when LoadOptions.Extra carries sdk/tp's keys (tp.rank,
// tp.size, tp.addr) the process is one rank of a split model. It joins the
// group (tp.Join) and its collectives (tp.NewComm: NCCL on a GPU with device
// collectives, else the host all-reduce), sizes its part (every rank takes
// the smallest KV pool any rank can hold: rank 0's engine allocates blocks
// for all), builds its shard (Options.Shard) and meets the others: a rank
// that fails breaks the group with its reason, so every rank's load fails.
// Rank 0's model is wrapped with tp.Lead (the engine drives it and every
// step is broadcast), the others' with tp.Follow (they run rank 0's steps
// and refuse requests of their own); a follower whose group breaks calls
// FollowerExit.
func (bs Builders) LoaderWith(fps map[string]Footprinter, log hclog.Logger) engine.Loader {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return func(ctx context.Context, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (engine.Model, sdk.ModelInfo, error) {
		if progress == nil {
			progress = func(sdk.LoadProgress) {}
		}
		progress(sdk.LoadProgress{Stage: "open"})
		f, err := gguf.Open(req.Path)
		if err != nil {
			return nil, sdk.ModelInfo{}, err
		}
		arch := f.Architecture()
		if _, ok := bs[arch]; !ok {
			f.Close()
			return nil, sdk.ModelInfo{}, fmt.Errorf("architecture %q (this adapter serves %v): %w", arch, bs.Architectures(), sdk.ErrUnsupportedArchitecture)
		}
		if err := ctx.Err(); err != nil {
			f.Close()
			return nil, sdk.ModelInfo{}, err
		}
		cfg, split, err := tp.ParseExtra(req.Options.Extra)
		if err != nil {
			f.Close()
			return nil, sdk.ModelInfo{}, err
		}
		be, err := OpenBackend(req.Options.Device, req.Options.Threads, log)
		if err != nil {
			f.Close()
			return nil, sdk.ModelInfo{}, err
		}
		// tensor parallelism: join the group first, so that any later
		// failure of one rank reaches every rank (fail breaks the group)
		var (
			g     *tp.Group
			shard ml.Shard
		)
		fail := func(err error) (engine.Model, sdk.ModelInfo, error) {
			if g != nil {
				g.Abort(fmt.Errorf("rank %d: %w", cfg.Rank, err))
				if shard.Comm != nil {
					shard.Comm.Close() //nolint:errcheck // the load error is what matters
				}
				g.Close() //nolint:errcheck // idem
			}
			be.Close()
			f.Close()
			return nil, sdk.ModelInfo{}, err
		}
		if split {
			progress(sdk.LoadProgress{Stage: "tensor-parallel group"})
			if g, err = tp.Join(ctx, cfg); err != nil {
				return fail(err)
			}
			comm, err := tp.NewComm(g, be)
			if err != nil {
				return fail(err)
			}
			shard = ml.Shard{Rank: cfg.Rank, Size: cfg.Size, Comm: comm}
			log.Info("tensor-parallel rank", "rank", cfg.Rank, "size", cfg.Size, "graphable", comm.Graphable())
		}
		sz, err := Size(req.Options, TrainedContext(f), be.Name())
		if err != nil {
			return fail(err)
		}
		if sz.Fraction > 0 {
			if footprint, ok := fps[arch]; ok {
				fp, err := footprint(f, ml.Shard{Rank: shard.Rank, Size: shard.Size})
				if err == nil {
					var lay layout
					lay, err = sizeFor(req, f, fp, be, log)
					sz.NumBlocks = lay.o.NumBlocks
				}
				if err != nil {
					return fail(fmt.Errorf("%s: %s: %w", req.Path, arch, err))
				}
			} else {
				log.Warn("kv_cache_fraction ignored: no memory footprint for this architecture; KV pool sized for context x sequences",
					"arch", arch, "kv_cache_fraction", sz.Fraction, "kv_blocks", sz.NumBlocks)
			}
		}
		if g != nil {
			n, err := agreeMin(g, sz.NumBlocks)
			if err != nil {
				return fail(fmt.Errorf("tensor-parallel KV pool: %w", err))
			}
			if n != sz.NumBlocks {
				log.Info("KV pool: the smallest any rank holds", "kv_blocks", n, "this_rank", sz.NumBlocks)
			}
			sz.NumBlocks = n
		}
		// progress total: the stored bytes this rank reads (its part of a split model)
		total := ShardWeightBytes(f, nil, nil, ml.Shard{Rank: shard.Rank, Size: shard.Size})
		r, err := bs.Open(f, Options{
			Backend: be, NumBlocks: sz.NumBlocks, BlockSize: sz.BlockSize, ContextLength: sz.Context, KVType: sz.KVType,
			MaxSequences: sz.MaxSeqs, StepTokens: sz.StepTokens, WindowBlocks: sz.WindowBlocks, SharedKV: sz.SharedKV, Shard: shard,
			Progress: func(done, _ int64) {
				progress(sdk.LoadProgress{Stage: "weights", Done: min(done, total), Total: total})
			},
		})
		if err != nil {
			return fail(err)
		}
		r.OwnBackend = true
		var model engine.Model = r
		if g != nil {
			r.OwnComm = true
			// every rank built its shard (or one broke the group)
			if err := g.Barrier(); err != nil {
				r.Close() //nolint:errcheck // the group's error is what matters
				g.Close() //nolint:errcheck // idem
				return nil, sdk.ModelInfo{}, fmt.Errorf("tensor-parallel rank %d: %w", cfg.Rank, err)
			}
			if cfg.Rank == 0 {
				model = tp.Lead(r, g)
			} else {
				rank, exit := cfg.Rank, FollowerExit // the hook of load time
				model = tp.Follow(r, g, func(err error) { exit(log, rank, err) })
			}
		}
		spec := r.Spec()
		name, _ := f.String("general.name")
		info := sdk.ModelInfo{
			Architecture: arch, Name: name, Backend: be.Name(), DeviceName: be.DeviceName(),
			ContextLength: spec.ContextLength, VocabSize: spec.VocabSize, MaxSequences: sz.MaxSeqs,
			ParamCount: r.Params, WeightBytes: r.WeightBytes, KVBytes: spec.KVBytes(),
		}
		log.Info("model built", "arch", arch, "backend", be.Name(), "context", spec.ContextLength,
			"kv_blocks", spec.NumBlocks, "block_size", spec.BlockSize, "params", r.Params, "tp_rank", shard.Rank, "tp_size", max(shard.Size, 1))
		for _, g := range spec.Groups {
			log.Info("KV group", "group", g.Name, "layers", g.Layers, "kv_blocks", g.NumBlocks, "bytes", int64(g.NumBlocks)*g.BlockBytes)
		}
		return model, info, nil
	}
}

// FollowerExit is called when a tensor-parallel follower's step loop ends
// (tp.Follow's done): err is nil after rank 0 closed the model, else why the
// group broke. A broken group cannot serve again, so by default the
// process logs the reason and exits with status 1: the host supervises the
// ranks as a unit and relaunches the group when one of them dies. Tests
// that run ranks in one process replace it.
var FollowerExit = func(log hclog.Logger, rank int, err error) {
	if err == nil {
		log.Info("tensor-parallel follower stopped: rank 0 closed the model", "rank", rank)
		return
	}
	log.Error("tensor-parallel group broken: exiting", "rank", rank, "error", err)
	os.Exit(1)
}

// agreeMin returns the smallest n over the ranks of g (collective: every
// rank calls it). Each rank's n travels in its own slots of a vector summed
// over the group (AllReduceF32), split in 16-bit halves so that any int32
// is exact in float32.
func agreeMin(g *tp.Group, n int) (int, error) {
	if n < 0 || n > math.MaxInt32 {
		return 0, fmt.Errorf("%d KV blocks: %w", n, sdk.ErrInvalidArgument)
	}
	v := make([]float32, 2*g.Size())
	v[2*g.Rank()], v[2*g.Rank()+1] = float32(n>>16), float32(n&0xffff)
	if err := g.AllReduceF32(v); err != nil {
		return 0, err
	}
	low := n
	for r := range g.Size() {
		low = min(low, int(v[2*r])<<16|int(v[2*r+1]))
	}
	return low, nil
}

// Model describes a built net to Finish.
type Model struct {
	Arch          string
	Layers        int
	HeadDim       int
	KVHeads       int
	Width         int
	Vocab         int
	SlidingWindow int
	// LayerWindows, when set, is each layer's attention window (0 = full);
	// layers with a window get their own KV pool (KVGroups). nil: one pool.
	LayerWindows []int
}

// Finish allocates the KV cache for m and wraps net in a Runner sized by o
// (already normalized). On error it closes net.
func Finish(o Options, w *Weights, net Net, m Model) (*Runner, error) {
	if len(m.LayerWindows) > 0 && len(m.LayerWindows) != m.Layers {
		net.Close()
		return nil, fmt.Errorf("model: %d layer windows for %d layers", len(m.LayerWindows), m.Layers)
	}
	kv, err := NewGroupedKVCache(o.Backend, o.KVType, m.Layers, m.HeadDim, m.KVHeads, o.BlockSize, o.NumBlocks, KVGroups(m.LayerWindows, o))
	if err != nil {
		net.Close()
		return nil, err
	}
	spec := engine.Spec{
		Architecture: m.Arch, VocabSize: m.Vocab, ContextLength: o.ContextLength,
		BlockSize: o.BlockSize, NumBlocks: kv.NumBlocks, KVBlockBytes: kv.BlockBytes(), SlidingWindow: m.SlidingWindow,
		Groups: kv.EngineGroups(),
	}
	r, err := NewRunner(o.Backend, kv, net, RunnerConfig{Spec: spec, Width: m.Width, MaxTokens: o.MaxTokens, Comm: o.Shard.Comm})
	if err != nil {
		kv.Free(o.Backend)
		net.Close()
		return nil, err
	}
	r.Params, r.WeightBytes = w.Params, w.Bytes
	return r, nil
}
