package nn

// Memory planning: what Loader would allocate for a request, computed from
// the GGUF metadata and tensor infos only (no weight is read), with the same
// sizing code (Size, Options.Normalize) the loader uses, so that the plan
// equals what a load reports in sdk.ModelInfo (WeightBytes, KVBytes).

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
)

// Footprint is what an architecture's builder will allocate for a file,
// read from its metadata and tensor infos.
type Footprint struct {
	Model // Layers, HeadDim, KVHeads, Width and Vocab size the KV cache and the runner
	// Trained is the trained context the builder normalizes against (0 =
	// TrainedContext(f)); GPT-2 caps it at its position table.
	Trained int
	// WeightBytes is what Weights.Bytes will be after binding: stored
	// tensor bytes, F32 bytes of vectors stored in other types, and F32
	// tables the builder uploads (see WeightBytes).
	WeightBytes int64
	// ScratchFloats is the F32 activation elements per token of MaxTokens:
	// the Net's Scratch buffers and, where an op keeps its own per-token
	// buffers on the backend (the CUDA MoE), those too.
	ScratchFloats int64
}

// Footprinter reads one architecture's Footprint from an open file, for
// rank s.Rank of a model split s.Size ways (tensor parallelism: the rank's
// part of the weights, its KV heads and activations; the whole model when
// s.Size <= 1).
type Footprinter func(f *gguf.File, s ml.Shard) (Footprint, error)

// WeightBytes sums what Weights.Bytes counts when a builder binds every
// tensor of f except those skip names (tensors the builder reads on the
// host, e.g. rope_freqs.weight): the stored size for tensors bound with
// Tensor, 4 bytes per element for tensors vector names (bound with Vector)
// that are stored in another type than F32. nil predicates mean none.
func WeightBytes(f *gguf.File, skip, vector func(name string) bool) int64 {
	var total int64
	for _, t := range f.Tensors {
		if skip != nil && skip(t.Name) {
			continue
		}
		if vector != nil && vector(t.Name) && ml.DType(t.Type) != ml.F32 {
			total += 4 * t.Elements()
			continue
		}
		total += t.Size
	}
	return total
}

// KVBlockBytes is the size of one KV block over all layers (K and V), the
// same as KVCache.BlockBytes of the cache NewKVCache would allocate.
func KVBlockBytes(dt ml.DType, layers, headDim, kvHeads, blockSize int) int64 {
	el := int64(4)
	if dt != ml.F32 {
		el = 2
	}
	return int64(layers) * 2 * int64(headDim*kvHeads*blockSize) * el
}

// RunnerBytes is what NewRunner allocates for its staging tensors (token
// ids, positions, slots, gathered rows, a logits chunk, block tables).
func RunnerBytes(width, vocab, contextLength, blockSize, maxTokens int) int64 {
	return RunnerGroupBytes(width, vocab, contextLength, blockSize, maxTokens, 1)
}

// RunnerGroupBytes is RunnerBytes for a cache of kvGroups KV groups: each
// group past the first has its own slots and block tables.
func RunnerGroupBytes(width, vocab, contextLength, blockSize, maxTokens, kvGroups int) int64 {
	if maxTokens <= 0 {
		maxTokens = 256
	}
	m := int64(maxTokens)
	logitRows := max(1, min(m, int64((64<<20)/(4*max(vocab, 1)))))
	tableBlocks := max(1, int64((contextLength+blockSize-1)/max(blockSize, 1)))
	table := min(m*tableBlocks, 1<<24)
	i32 := 6*m + table + int64(max(kvGroups-1, 0))*(m+table)
	return 4 * (i32 + int64(width)*m + int64(vocab)*logitRows)
}

// Workspace margins on top of the counted buffers: the CUDA backend's
// cuBLAS workspace, captured decode graphs and allocator slack; on the CPU
// the Go runtime's slack around the buffers.
const (
	CUDAMargin int64 = 256 << 20
	CPUMargin  int64 = 16 << 20
)

// Planner returns an engine.PlanFunc for these architectures (pass it with
// engine.WithPlanner next to bs.LoaderWith(fps, ...)). It opens the file
// (metadata and tensor infos only), checks the architecture first, resolves
// the device as the loader does (OpenBackend: auto means CUDA when usable),
// reads its free memory (FreeMemory), sizes the KV pool as the loader does
// (Size, and with a KVCacheFraction FractionBlocks) and returns the plan, or
// the plan and an *sdk.OutOfMemoryError when it does not fit on the CPU or
// on an explicit cuda:N. With "auto" or "cuda" on a GPU the plan carries
// GPU 0's free bytes but does not refuse: the host places the model on
// whichever GPU has room (host/placement) and says so when none has; a
// fraction-sized pool is then planned at one full context (plannedBlocks).
func (bs Builders) Planner(fps map[string]Footprinter, log hclog.Logger) engine.PlanFunc {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return func(ctx context.Context, req sdk.LoadRequest) (sdk.MemoryPlan, error) {
		f, err := gguf.Open(req.Path)
		if err != nil {
			return sdk.MemoryPlan{}, err
		}
		defer f.Close()
		arch := f.Architecture()
		if _, ok := bs[arch]; !ok {
			return sdk.MemoryPlan{}, fmt.Errorf("architecture %q (this adapter serves %v): %w", arch, bs.Architectures(), sdk.ErrUnsupportedArchitecture)
		}
		footprint, ok := fps[arch]
		if !ok {
			return sdk.MemoryPlan{}, fmt.Errorf("memory plan for architecture %q: %w", arch, sdk.ErrNotImplemented)
		}
		shard, err := PlanShard(req.Options.Extra)
		if err != nil {
			return sdk.MemoryPlan{}, err
		}
		fp, err := footprint(f, shard)
		if err != nil {
			return sdk.MemoryPlan{}, fmt.Errorf("%s: %w", arch, err)
		}
		if err := ctx.Err(); err != nil {
			return sdk.MemoryPlan{}, err
		}
		// the loader logs which backend it picks and why; here it is only probed
		be, err := OpenBackend(req.Options.Device, req.Options.Threads, hclog.NewNullLogger())
		if err != nil {
			return sdk.MemoryPlan{}, err
		}
		defer be.Close()
		pinned := true // the request names the one device the model goes to
		if be.Name() == "cuda" {
			pinned = strings.Contains(req.Options.Device, ":")
		}
		lay, err := sizeFor(req, f, fp, be, log)
		lay.o.NumBlocks, err = plannedBlocks(lay, pinned, err)
		if err != nil {
			return sdk.MemoryPlan{}, fmt.Errorf("%s: %w", req.Path, err)
		}
		o, sz, free, device := lay.o, lay.sz, lay.free, lay.device
		// "auto" or "cuda" leave the GPU to the host's placement, which
		// checks the plan against every GPU's free memory: refuse here only
		// for the CPU and an explicit cuda:N.
		check := free
		if !pinned {
			check = 0
		}
		plan, err := engine.PlanBytes(device, fp.WeightBytes, int64(o.NumBlocks)*lay.blockBytes+lay.fixedKV, lay.workspace, check)
		plan.FreeBytes = free
		log.Debug("memory plan", "arch", arch, "device", device, "weights", plan.WeightBytes,
			"kv", plan.KVBytes, "kv_blocks", o.NumBlocks, "workspace", plan.WorkspaceBytes, "free", free)
		if err != nil {
			return plan, fmt.Errorf("%s at context %d x %d sequences (weights %d, KV %d, workspace %d bytes): %w",
				req.Path, o.ContextLength, sz.MaxSeqs, plan.WeightBytes, plan.KVBytes, plan.WorkspaceBytes, err)
		}
		return plan, nil
	}
}

// FreeMemory returns the free bytes of be's device, 0 when unknown: the
// CUDA backend's MemoryInfo, on the CPU MemAvailable of /proc/meminfo. The
// planner and the loader both read it once, before any weight is uploaded,
// so that a fraction-sized KV pool is the same in the plan and the load.
// It is a variable so that tests can inject free memory.
var FreeMemory = func(be ml.Backend) int64 {
	if be.Name() == "cuda" {
		free, _ := be.MemoryInfo()
		return free
	}
	return MemAvailable()
}

// layout is what the planner and the loader decide for a request.
type layout struct {
	o          Options // normalized; NumBlocks final
	sz         Sizing
	device     string // "cpu" or "cuda:N"
	free       int64  // FreeMemory at sizing time (0 = unknown)
	blockBytes int64  // one block of KV group 0 (of all layers without groups)
	fixedKV    int64  // the other KV groups' pools (window pools: sized by sequences, not by NumBlocks)
	workspace  int64
	minBlocks  int // one full context
}

// sizeFor sizes req on be for a file whose footprint is fp: Size, Normalize,
// the KV block and workspace bytes and, with a KVCacheFraction, NumBlocks
// from free memory (FractionBlocks); when the free memory is unknown it
// keeps Size's NumBlocks and logs that. The planner and the loader share it,
// so that plan == load.
func sizeFor(req sdk.LoadRequest, f *gguf.File, fp Footprint, be ml.Backend, log hclog.Logger) (layout, error) {
	var lay layout
	lay.device, lay.free = be.Name(), FreeMemory(be)
	margin := CPUMargin
	if lay.device == "cuda" {
		lay.device, margin = cudaDevice(req.Options.Device), CUDAMargin
	}
	sz, err := Size(req.Options, TrainedContext(f), be.Name())
	if err != nil {
		return lay, err
	}
	trained := fp.Trained
	if trained <= 0 {
		trained = TrainedContext(f)
	}
	o, err := Options{Backend: be, NumBlocks: sz.NumBlocks, BlockSize: sz.BlockSize,
		ContextLength: sz.Context, KVType: sz.KVType,
		MaxSequences: sz.MaxSeqs, StepTokens: sz.StepTokens, WindowBlocks: sz.WindowBlocks, SharedKV: sz.SharedKV}.Normalize(trained)
	if err != nil {
		return lay, err
	}
	lay.sz = sz
	groups := KVGroups(fp.LayerWindows, o)
	lay.blockBytes, lay.fixedKV = GroupKVBytes(o.KVType, fp.Layers, fp.HeadDim, fp.KVHeads, o.BlockSize, groups)
	lay.workspace = 4*fp.ScratchFloats*int64(o.MaxTokens) +
		RunnerGroupBytes(fp.Width, fp.Vocab, o.ContextLength, o.BlockSize, o.MaxTokens, max(len(groups), 1)) + margin
	lay.minBlocks = (o.ContextLength + o.BlockSize - 1) / o.BlockSize
	lay.o = o
	if sz.Fraction > 0 {
		if lay.free <= 0 {
			log.Info("free memory unknown: KV pool sized for context x sequences, not kv_cache_fraction",
				"device", lay.device, "kv_cache_fraction", sz.Fraction, "kv_blocks", o.NumBlocks)
			return lay, nil
		}
		n, err := fractionBlocks(lay.device, sz.Fraction, lay.free, fp.WeightBytes, lay.workspace, lay.fixedKV, lay.blockBytes, lay.minBlocks)
		if err != nil {
			return lay, err
		}
		lay.o.NumBlocks = n
		log.Debug("KV pool sized from free memory", "device", lay.device, "kv_cache_fraction", sz.Fraction,
			"free", lay.free, "weights", fp.WeightBytes, "workspace", lay.workspace, "kv_blocks", n)
	}
	return lay, nil
}

// plannedBlocks is the KV pool a plan reports for lay (sizeFor's result
// and error). On the CPU or an explicit cuda:N it is what the load
// allocates. With a kv_cache_fraction and "auto" or "cuda" on a GPU, the
// host's placement picks the GPU with the plan, and the adapter process on
// that GPU then takes the fraction of that GPU's free memory: the plan
// reports the least the model needs there (one full context), not the
// fraction of GPU 0 (with a fraction near 1 that plus placement's reserve
// would fit no GPU), and not refuse for GPU 0.
func plannedBlocks(lay layout, pinned bool, err error) (int, error) {
	var oom *sdk.OutOfMemoryError
	if !pinned && lay.sz.Fraction > 0 && lay.free > 0 && (err == nil || errors.As(err, &oom)) {
		return lay.minBlocks, nil
	}
	return lay.o.NumBlocks, err
}

// maxKVBlocks bounds a fraction-sized pool (block ids are int32 on the device).
const maxKVBlocks = math.MaxInt32

// FractionBlocks sizes a KV pool from a fraction of free memory:
// floor(fraction x (free - weights - workspace) / blockBytes) blocks (at most
// maxKVBlocks). It is deliberately not capped at context x sequences: more
// blocks hold more prefix cache. Fewer than minBlocks (one full context) is
// an *sdk.OutOfMemoryError on device, wrapped with the numbers.
func FractionBlocks(device string, fraction float64, free, weights, workspace, blockBytes int64, minBlocks int) (int, error) {
	return fractionBlocks(device, fraction, free, weights, workspace, 0, blockBytes, minBlocks)
}

// fractionBlocks is FractionBlocks where fixedKV bytes of the fraction go
// to pools of a fixed size first (the window groups' pools).
func fractionBlocks(device string, fraction float64, free, weights, workspace, fixedKV, blockBytes int64, minBlocks int) (int, error) {
	if math.IsNaN(fraction) || fraction <= 0 || fraction > 1 || blockBytes <= 0 || minBlocks <= 0 {
		return 0, fmt.Errorf("KV pool from fraction %v, block of %d bytes, at least %d blocks: %w",
			fraction, blockBytes, minBlocks, sdk.ErrInvalidArgument)
	}
	left := free - weights - workspace
	var n int64
	if left > 0 {
		n = int64(min(math.Floor((fraction*float64(left)-float64(fixedKV))/float64(blockBytes)), maxKVBlocks))
	}
	if n < int64(minBlocks) {
		need := int64(minBlocks)*blockBytes + fixedKV
		oom := &sdk.OutOfMemoryError{Device: device, Free: free,
			Requested: weights + workspace + int64(math.Ceil(float64(need)/fraction))}
		return 0, fmt.Errorf("kv_cache_fraction %v of the %d bytes left after weights (%d) and workspace (%d) holds %d KV blocks of %d bytes; one full context needs %d: %w",
			fraction, max(left, 0), weights, workspace, n, blockBytes, minBlocks, oom)
	}
	return int(n), nil
}

// cudaDevice names the GPU a "cuda", "cuda:N" or "auto" request uses.
func cudaDevice(device string) string {
	dev := strings.ToLower(strings.TrimSpace(device))
	if strings.HasPrefix(dev, "cuda:") {
		return dev
	}
	return "cuda:0"
}

// MemAvailable returns MemAvailable of /proc/meminfo in bytes (0 when
// unknown, e.g. not on Linux). Read by hand: it is one line of one file.
func MemAvailable() int64 {
	fh, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer fh.Close()
	return parseMemAvailable(bufio.NewScanner(fh))
}

func parseMemAvailable(sc *bufio.Scanner) int64 {
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "MemAvailable:")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			return 0
		}
		kb, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil || kb < 0 {
			return 0
		}
		if len(fields) > 1 && fields[1] != "kB" {
			return 0
		}
		return kb << 10
	}
	return 0
}

// VectorName reports whether the served architectures bind a tensor with
// Weights.Vector (as F32): norm weights, biases and attention sinks.
func VectorName(name string) bool {
	return strings.HasSuffix(name, ".bias") || strings.HasSuffix(name, "norm.weight") ||
		strings.HasSuffix(name, "attn_sinks.weight")
}
