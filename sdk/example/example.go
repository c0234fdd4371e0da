// Package example is a complete orch adapter that needs no weights: its
// "model" is a counter (the next token is the last one plus one, modulo the
// vocabulary) described by a small JSON file. It exists to show the adapter
// contract end to end (docs/writing-an-adapter.md walks through it), to
// prove the conformance kit (sdk/adaptertest), and as the fixture the
// host's lifecycle tests launch as a real process.
//
// Real model adapters do not hand-write Generate like this: they implement
// engine.Model and wrap it with engine.NewAdapter, which provides batching,
// the KV cache, sampling and streaming.
package example

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
)

// ModelFile is the JSON content of an example model file.
type ModelFile struct {
	Format        string `json:"format"` // must be FormatID
	Architecture  string `json:"architecture"`
	Name          string `json:"name"`
	VocabSize     int    `json:"vocab_size"`
	ContextLength int    `json:"context_length"`
}

// FormatID marks example model files.
const FormatID = "orch-example-model"

// WriteModel writes an example model file (for tests and the guide).
func WriteModel(path string, m ModelFile) error {
	if m.Format == "" {
		m.Format = FormatID
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("encode example model: %w", err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("write example model: %w", err)
	}
	return nil
}

// DefaultStepDelay is the time the counter "spends" per generated token
// (LoadOptions.Extra["step_delay"] overrides it) so that streams are slow
// enough to cancel mid-way, as with a real model.
const DefaultStepDelay = time.Millisecond

// Adapter is the example adapter. It implements sdk.Adapter and sdk.Planner.
type Adapter struct {
	log   hclog.Logger
	archs []string

	mu      sync.Mutex
	model   *model
	running map[string]context.CancelCauseFunc
	nextID  atomic.Int64

	genTokens atomic.Int64
	genNanos  atomic.Int64
}

type model struct {
	file      ModelFile
	ctxLen    int
	stepDelay time.Duration
}

var (
	_ sdk.Adapter = (*Adapter)(nil)
	_ sdk.Planner = (*Adapter)(nil)
)

// New returns an adapter serving the given architectures.
func New(logger hclog.Logger, architectures []string) *Adapter {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	return &Adapter{log: logger, archs: architectures, running: map[string]context.CancelCauseFunc{}}
}

func (a *Adapter) readModel(path string) (ModelFile, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return ModelFile{}, fmt.Errorf("open model: %w", err)
	}
	var m ModelFile
	if err := json.Unmarshal(b, &m); err != nil || m.Format != FormatID {
		return ModelFile{}, fmt.Errorf("%s is not an example model file: %w", path, sdk.ErrInvalidArgument)
	}
	if !slices.Contains(a.archs, m.Architecture) {
		return ModelFile{}, fmt.Errorf("%w: %q (this adapter serves %v)", sdk.ErrUnsupportedArchitecture, m.Architecture, a.archs)
	}
	if m.VocabSize < 2 || m.ContextLength < 2 {
		return ModelFile{}, fmt.Errorf("%s: vocab_size and context_length must be at least 2: %w", path, sdk.ErrInvalidArgument)
	}
	return m, nil
}

// Plan implements sdk.Planner.
func (a *Adapter) Plan(_ context.Context, req sdk.LoadRequest) (sdk.MemoryPlan, error) {
	m, err := a.readModel(req.Path)
	if err != nil {
		return sdk.MemoryPlan{}, err
	}
	ctxLen := effectiveContext(m, req.Options)
	return sdk.MemoryPlan{Device: "cpu", WeightBytes: int64(m.VocabSize) * 4, KVBytes: int64(ctxLen) * 4}, nil
}

func effectiveContext(m ModelFile, o sdk.LoadOptions) int {
	if o.ContextLength > 0 && o.ContextLength < m.ContextLength {
		return o.ContextLength
	}
	return m.ContextLength
}

// Load implements sdk.Adapter.
func (a *Adapter) Load(ctx context.Context, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (sdk.ModelInfo, error) {
	if err := ctx.Err(); err != nil {
		return sdk.ModelInfo{}, err
	}
	if d := req.Options.Device; d != "" && d != "auto" && d != "cpu" {
		return sdk.ModelInfo{}, fmt.Errorf("device %q: the example adapter runs on the cpu only: %w", d, sdk.ErrInvalidArgument)
	}
	step := DefaultStepDelay
	if s, ok := req.Options.Extra["step_delay"]; ok {
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 {
			return sdk.ModelInfo{}, fmt.Errorf("extra option step_delay=%q: %w", s, sdk.ErrInvalidArgument)
		}
		step = d
	}
	a.mu.Lock()
	loaded := a.model != nil
	a.mu.Unlock()
	if loaded {
		return sdk.ModelInfo{}, sdk.ErrAlreadyLoaded
	}
	progress(sdk.LoadProgress{Stage: "open", Done: 0, Total: 1})
	m, err := a.readModel(req.Path)
	if err != nil {
		return sdk.ModelInfo{}, err
	}
	progress(sdk.LoadProgress{Stage: "weights", Done: 1, Total: 1})
	mod := &model{file: m, ctxLen: effectiveContext(m, req.Options), stepDelay: step}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.model != nil {
		return sdk.ModelInfo{}, sdk.ErrAlreadyLoaded
	}
	a.model = mod
	a.log.Info("model loaded", "model", req.Path, "arch", m.Architecture, "vocab", m.VocabSize, "context", mod.ctxLen)
	return sdk.ModelInfo{
		Architecture:  m.Architecture,
		Name:          m.Name,
		Backend:       "cpu",
		DeviceName:    "cpu (counter)",
		ContextLength: mod.ctxLen,
		VocabSize:     m.VocabSize,
		MaxSequences:  1 << 16,
		ParamCount:    int64(m.VocabSize),
		WeightBytes:   int64(m.VocabSize) * 4,
	}, nil
}

func (a *Adapter) loaded() (*model, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.model == nil {
		return nil, sdk.ErrNotLoaded
	}
	return a.model, nil
}

func (m *model) checkTokens(tokens []int32) error {
	if len(tokens) == 0 {
		return fmt.Errorf("empty prompt: %w", sdk.ErrInvalidArgument)
	}
	if len(tokens) > m.ctxLen {
		return &sdk.ContextTooLongError{Requested: len(tokens), Max: m.ctxLen}
	}
	for i, t := range tokens {
		if t < 0 || int(t) >= m.file.VocabSize {
			return fmt.Errorf("token %d at position %d is outside the vocabulary [0, %d): %w", t, i, m.file.VocabSize, sdk.ErrInvalidArgument)
		}
	}
	return nil
}

// logits of the counter model after token t: a peak of 10 at t+1, falling
// off with the distance from it.
func (m *model) logits(t int32, out []float32) {
	v := m.file.VocabSize
	for j := range out {
		d := (j - int(t) - 1 + v) % v
		out[j] = -0.01 * float32(d)
	}
	out[(int(t)+1)%v] = 10
}

// Generate implements sdk.Adapter.
func (a *Adapter) Generate(ctx context.Context, req sdk.GenerateRequest, emit func(sdk.Chunk) error) error {
	start := time.Now()
	m, err := a.loaded()
	if err != nil {
		return err
	}
	if err := m.checkTokens(req.Prompt); err != nil {
		return err
	}
	if req.MaxTokens <= 0 {
		return fmt.Errorf("max tokens %d: %w", req.MaxTokens, sdk.ErrInvalidArgument)
	}
	id := req.ID
	if id == "" {
		id = "anon-" + strconv.FormatInt(a.nextID.Add(1), 10)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	a.mu.Lock()
	if _, dup := a.running[id]; dup {
		a.mu.Unlock()
		return fmt.Errorf("request id %q is already running: %w", id, sdk.ErrInvalidArgument)
	}
	a.running[id] = cancel
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.running, id)
		a.mu.Unlock()
	}()

	var rng *rand.Rand
	if req.Sampling.Temperature > 0 {
		seed := req.Sampling.Seed
		if !req.Sampling.HasSeed {
			seed = uint64(time.Now().UnixNano())
		}
		rng = rand.New(rand.NewPCG(seed, 0x0c0ffee))
	}
	v := m.file.VocabSize
	logits := make([]float32, v)
	last := req.Prompt[len(req.Prompt)-1]
	limit := min(req.MaxTokens, m.ctxLen-len(req.Prompt))
	promptDone := time.Now()
	timings := func(n int) *sdk.Timings {
		now := time.Now()
		return &sdk.Timings{PromptTokens: len(req.Prompt), GeneratedTokens: n,
			PromptTime: promptDone.Sub(start), GenerateTime: now.Sub(promptDone)}
	}
	defer func() {
		a.genNanos.Add(int64(time.Since(promptDone)))
	}()
	for n := 0; ; n++ {
		if n >= limit {
			return emit(sdk.Chunk{Finish: sdk.FinishLength, Timings: timings(n)})
		}
		if m.stepDelay > 0 {
			t := time.NewTimer(m.stepDelay)
			select {
			case <-ctx.Done():
				t.Stop()
			case <-t.C:
			}
		}
		if ctx.Err() != nil {
			if parentCanceled(ctx) {
				// Cancel(id) was called: finish the stream politely.
				return emit(sdk.Chunk{Finish: sdk.FinishCanceled, Timings: timings(n)})
			}
			return ctx.Err()
		}
		m.logits(last, logits)
		for tok, b := range req.Sampling.LogitBias {
			if tok >= 0 && int(tok) < v {
				logits[tok] += b
			}
		}
		next := sample(logits, req.Sampling.Temperature, rng)
		chunk := sdk.Chunk{Tokens: []int32{next}}
		if req.Logprobs || req.TopLogprobs > 0 {
			chunk.Info = []sdk.TokenInfo{tokenInfo(logits, next, req.TopLogprobs)}
		}
		stop := n+1 >= req.MinTokens && slices.Contains(req.StopTokens, next)
		if stop {
			chunk.Finish = sdk.FinishStop
			chunk.Timings = timings(n + 1)
		}
		a.genTokens.Add(1)
		if err := emit(chunk); err != nil {
			return err
		}
		if stop {
			return nil
		}
		last = next
	}
}

// parentCanceled reports whether ctx ended because of Cancel(id) (or
// Unload) rather than because the caller went away: Cancel records
// errCanceledByID as the cause.
func parentCanceled(ctx context.Context) bool {
	return errors.Is(context.Cause(ctx), errCanceledByID)
}

var errCanceledByID = errors.New("canceled by request id")

func sample(logits []float32, temp float32, rng *rand.Rand) int32 {
	if temp <= 0 || rng == nil {
		best := 0
		for j, l := range logits {
			if l > logits[best] {
				best = j
			}
		}
		return int32(best)
	}
	mx := slices.Max(logits)
	var sum float64
	p := make([]float64, len(logits))
	for j, l := range logits {
		p[j] = math.Exp(float64((l - mx) / temp))
		sum += p[j]
	}
	r := rng.Float64() * sum
	for j := range p {
		r -= p[j]
		if r <= 0 {
			return int32(j)
		}
	}
	return int32(len(p) - 1)
}

func tokenInfo(logits []float32, tok int32, top int) sdk.TokenInfo {
	mx := slices.Max(logits)
	var sum float64
	for _, l := range logits {
		sum += math.Exp(float64(l - mx))
	}
	lse := float64(mx) + math.Log(sum)
	info := sdk.TokenInfo{Logprob: float32(float64(logits[tok]) - lse)}
	if top > 0 {
		idx := make([]int, len(logits))
		for i := range idx {
			idx[i] = i
		}
		slices.SortFunc(idx, func(x, y int) int { return cmp.Compare(logits[y], logits[x]) })
		for _, j := range idx[:min(top, len(idx))] {
			info.Top = append(info.Top, sdk.TokenLogprob{Token: int32(j), Logprob: float32(float64(logits[j]) - lse)})
		}
	}
	return info
}

// Cancel implements sdk.Adapter. Unknown ids are ignored.
func (a *Adapter) Cancel(_ context.Context, id string) error {
	a.mu.Lock()
	cancel := a.running[id]
	a.mu.Unlock()
	if cancel != nil {
		cancel(errCanceledByID)
	}
	return nil
}

// Evaluate implements sdk.Adapter.
func (a *Adapter) Evaluate(ctx context.Context, tokens []int32) (sdk.Logits, error) {
	m, err := a.loaded()
	if err != nil {
		return sdk.Logits{}, err
	}
	if err := m.checkTokens(tokens); err != nil {
		return sdk.Logits{}, err
	}
	v := m.file.VocabSize
	out := sdk.Logits{Rows: len(tokens), Vocab: v, Data: make([]float32, len(tokens)*v)}
	for i, t := range tokens {
		if err := ctx.Err(); err != nil {
			return sdk.Logits{}, err
		}
		m.logits(t, out.Data[i*v:(i+1)*v])
	}
	return out, nil
}

// Stats implements sdk.Adapter.
func (a *Adapter) Stats(context.Context) (sdk.Stats, error) {
	a.mu.Lock()
	running := len(a.running)
	a.mu.Unlock()
	st := sdk.Stats{Running: running}
	if ns := a.genNanos.Load(); ns > 0 {
		st.TokensPerSecond = float64(a.genTokens.Load()) / (float64(ns) / 1e9)
	}
	return st, nil
}

// Unload implements sdk.Adapter. It cancels running generations; unloading
// when nothing is loaded is not an error.
func (a *Adapter) Unload(context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, cancel := range a.running {
		cancel(errCanceledByID)
	}
	if a.model != nil {
		a.log.Info("model unloaded", "arch", a.model.file.Architecture)
	}
	a.model = nil
	return nil
}
