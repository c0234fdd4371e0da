package engine

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
)

// Option configures NewAdapter.
type Option func(*options)

type options struct {
	maxBatchTokens int
	mixedTokens    int
	maxQueue       int
	maxSeqs        int
	prefixCache    bool
	hostSample     bool // never use the model's device sampler (SamplingModel)
	planner        PlanFunc
}

// DefaultMaxBatchTokens is the token budget of one forward step when none is
// given (engine.max_batch_tokens / WithMaxBatchTokens). 2048 since session 7:
// a 2048-token step lets the CUDA backend run each prefill GEMM once over
// 2048 rows (gpt-oss pp2048 on an H100: 12,238 tok/s in 512-token steps with
// 256-token sub-batches, 33,205 in 2048-token steps; docs/perf.md); the cost
// is a longer step (decodes of other streams wait for it) when a long prompt
// arrives while others decode.
const DefaultMaxBatchTokens = 2048

// WithMaxBatchTokens sets the token budget of one forward step (decodes plus
// prefill chunks; default DefaultMaxBatchTokens, never less than the max
// sequences). A long
// prompt is prefilled in chunks of at most this many tokens, mixed with the
// running decodes.
func WithMaxBatchTokens(n int) Option { return func(o *options) { o.maxBatchTokens = n } }

// DefaultMixedBatchTokens is the token budget of a step that carries
// decodes (WithMixedBatchTokens), when it is below the step budget: prefill
// chunks then share what the decodes leave of it, so that a burst of long
// prompts stalls the running streams for a 512-token step rather than a
// 2048-token one (H100, gpt-oss, 64 streams x pp128+tg128: inter-token
// latency p99 30.5 ms vs 61.1 ms, the same tok/s). A step with no decodes
// uses the whole step budget.
const DefaultMixedBatchTokens = 512

// WithMixedBatchTokens sets the token budget of a step that carries decodes
// (default DefaultMixedBatchTokens; never more than the step budget, never
// less than the decodes). A step without decodes uses the whole step budget.
func WithMixedBatchTokens(n int) Option { return func(o *options) { o.mixedTokens = n } }

// WithMaxQueue bounds the waiting queue (default 256); Generate returns
// sdk.ErrBusy when it is full.
func WithMaxQueue(n int) Option { return func(o *options) { o.maxQueue = n } }

// WithMaxSequences caps the running batch. Without it the cap is
// LoadOptions.MaxSequences, else the loader's ModelInfo.MaxSequences, else 16.
func WithMaxSequences(n int) Option { return func(o *options) { o.maxSeqs = n } }

// WithPrefixCache turns prefix caching on (the default) or off.
func WithPrefixCache(on bool) Option { return func(o *options) { o.prefixCache = on } }

// WithDeviceSampling turns drawing tokens on the device (for models that
// implement SamplingModel) on (the default) or off: off, every token that
// is not plain greedy is sampled on the host from the copied logits.
func WithDeviceSampling(on bool) Option { return func(o *options) { o.hostSample = !on } }

// WithPlanner gives the adapter a memory planner: the adapter returned by
// NewAdapter then implements sdk.Planner.
func WithPlanner(p PlanFunc) Option { return func(o *options) { o.planner = p } }

// LoadOptions.Extra keys the engine reads (the host passes them through from
// its configuration); they override the Options given to NewAdapter.
const (
	ExtraMaxBatchTokens = "engine.max_batch_tokens"   // integer > 0
	ExtraMixedTokens    = "engine.mixed_batch_tokens" // integer > 0
	ExtraMaxQueue       = "engine.max_queue"          // integer > 0
	ExtraPrefixCache    = "engine.prefix_cache"       // true or false
	ExtraDeviceSample   = "engine.device_sample"      // true or false (WithDeviceSampling)
)

func (o options) withExtra(extra map[string]string) (options, error) {
	positive := func(key string, dst *int) error {
		v, ok := extra[key]
		if !ok {
			return nil
		}
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return fmt.Errorf("option %s=%q: want a positive integer: %w", key, v, sdk.ErrInvalidArgument)
		}
		*dst = n
		return nil
	}
	if err := positive(ExtraMaxBatchTokens, &o.maxBatchTokens); err != nil {
		return o, err
	}
	if err := positive(ExtraMixedTokens, &o.mixedTokens); err != nil {
		return o, err
	}
	if err := positive(ExtraMaxQueue, &o.maxQueue); err != nil {
		return o, err
	}
	if v, ok := extra[ExtraPrefixCache]; ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return o, fmt.Errorf("option %s=%q: want true or false: %w", ExtraPrefixCache, v, sdk.ErrInvalidArgument)
		}
		o.prefixCache = b
	}
	if v, ok := extra[ExtraDeviceSample]; ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return o, fmt.Errorf("option %s=%q: want true or false: %w", ExtraDeviceSample, v, sdk.ErrInvalidArgument)
		}
		o.hostSample = !b
	}
	return o, nil
}

// adapter is the sdk.Adapter NewAdapter returns.
type adapter struct {
	load Loader
	log  hclog.Logger
	opts options

	mu      sync.RWMutex
	eng     *sched // nil when no model is loaded
	loading bool   // a Load is running
}

// plannedAdapter adds sdk.Planner.
type plannedAdapter struct{ *adapter }

func (p plannedAdapter) Plan(ctx context.Context, req sdk.LoadRequest) (sdk.MemoryPlan, error) {
	return p.opts.planner(ctx, req)
}

// NewAdapter turns a Loader (an architecture's model code) into a complete
// sdk.Adapter with continuous batching, a paged KV cache, a prefix cache and
// host-side sampling.
func NewAdapter(load Loader, log hclog.Logger, opts ...Option) sdk.Adapter {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	o := options{maxBatchTokens: DefaultMaxBatchTokens, mixedTokens: DefaultMixedBatchTokens, maxQueue: 256, prefixCache: true}
	for _, f := range opts {
		f(&o)
	}
	a := &adapter{load: load, log: log, opts: o}
	if o.planner != nil {
		return plannedAdapter{a}
	}
	return a
}

func (a *adapter) Load(ctx context.Context, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (sdk.ModelInfo, error) {
	if progress == nil {
		progress = func(sdk.LoadProgress) {}
	}
	if a.load == nil {
		return sdk.ModelInfo{}, fmt.Errorf("engine: no loader: %w", sdk.ErrInvalidArgument)
	}
	opts, err := a.opts.withExtra(req.Options.Extra)
	if err != nil {
		return sdk.ModelInfo{}, fmt.Errorf("load %s: %w", req.Path, err)
	}
	// The lock is not held while the loader runs (a big model takes minutes):
	// meanwhile other calls answer ErrNotLoaded and a second Load
	// ErrAlreadyLoaded.
	a.mu.Lock()
	if a.eng != nil || a.loading {
		a.mu.Unlock()
		return sdk.ModelInfo{}, sdk.ErrAlreadyLoaded
	}
	a.loading = true
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.loading = false
		a.mu.Unlock()
	}()
	m, info, err := a.load(ctx, req, progress)
	if err != nil {
		return sdk.ModelInfo{}, fmt.Errorf("load %s: %w", req.Path, err)
	}
	if m == nil {
		return sdk.ModelInfo{}, fmt.Errorf("load %s: loader returned no model", req.Path)
	}
	eng, info, err := newSched(m, info, req.Options, opts, a.log)
	if err != nil {
		if cerr := m.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		return sdk.ModelInfo{}, fmt.Errorf("load %s: %w", req.Path, err)
	}
	a.mu.Lock()
	a.eng = eng
	a.mu.Unlock()
	a.log.Info("model loaded", "model", req.Path, "arch", info.Architecture, "backend", info.Backend,
		"kv_blocks", eng.spec.NumBlocks, "block_size", eng.spec.BlockSize, "context", eng.ctxLen, "max_seqs", eng.maxSeqs)
	return info, nil
}

func (a *adapter) current() (*sched, error) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.eng == nil {
		return nil, sdk.ErrNotLoaded
	}
	return a.eng, nil
}

func (a *adapter) Generate(ctx context.Context, req sdk.GenerateRequest, emit func(sdk.Chunk) error) error {
	e, err := a.current()
	if err != nil {
		return err
	}
	return e.generate(ctx, req, emit)
}

func (a *adapter) Cancel(_ context.Context, id string) error {
	e, err := a.current()
	if err != nil {
		return err
	}
	e.cancelID(id)
	return nil
}

func (a *adapter) Evaluate(ctx context.Context, tokens []int32) (sdk.Logits, error) {
	e, err := a.current()
	if err != nil {
		return sdk.Logits{}, err
	}
	return e.evaluate(ctx, tokens)
}

func (a *adapter) Stats(context.Context) (sdk.Stats, error) {
	e, err := a.current()
	if err != nil {
		return sdk.Stats{}, err
	}
	return e.snapshot(), nil
}

func (a *adapter) Unload(context.Context) error {
	a.mu.Lock()
	e := a.eng
	a.eng = nil
	a.mu.Unlock()
	if e == nil {
		return nil // nothing loaded: unloading is idempotent
	}
	return e.close()
}
