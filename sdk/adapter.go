// Package sdk is what adapter authors import: the adapter contract (plain Go
// types and interfaces, no protobuf in the public API) and Serve, the single
// call an adapter's main makes.
//
// An adapter owns one model on one device and speaks token ids. The host owns
// text: HTTP API, chat templates, tokenization, stop strings.
package sdk

import (
	"context"
	"time"
)

// Info describes an adapter binary. It is answered by the Describe RPC.
type Info struct {
	Name          string   // short name, e.g. "gpt"; the binary is orch-adapter-<Name>
	Version       string   // semantic version of the adapter
	Architectures []string // GGUF general.architecture values served, verbatim ("gpt-oss", "gpt2")
	DTypes        []string // weight types understood ("F32", "Q8_0", "MXFP4", ...)
	Features      []string // optional capabilities ("cuda", "paged-kv", "prefix-cache", "logprobs")
}

// LoadOptions tune how a model is loaded. Zero values mean "adapter default".
type LoadOptions struct {
	Device          string            // "auto" (default), "cpu" or "cuda"
	ContextLength   int               // max tokens per sequence; 0 = model's trained context (capped by memory)
	MaxSequences    int               // max concurrent sequences in a batch
	KVCacheFraction float64           // fraction of free device memory given to the KV cache
	Threads         int               // CPU threads; 0 = all cores
	Extra           map[string]string // adapter-specific options
}

// LoadRequest asks the adapter to load a model file. Weights never cross the
// wire: the adapter opens (mmaps) Path itself.
type LoadRequest struct {
	Path    string
	Options LoadOptions
}

// LoadProgress is streamed while a model loads.
type LoadProgress struct {
	Stage string // "open", "weights", "kv", "warmup", ...
	Done  int64
	Total int64
}

// ModelInfo is what a loaded model reports.
type ModelInfo struct {
	Architecture  string
	Name          string // general.name
	Backend       string // "cpu" or "cuda"
	DeviceName    string // "NVIDIA H100 80GB HBM3", "cpu (16 threads)"
	ContextLength int    // effective max tokens per sequence
	VocabSize     int
	MaxSequences  int
	ParamCount    int64
	WeightBytes   int64
	KVBytes       int64
}

// MemoryPlan is what a model will need on a device, computed before loading.
type MemoryPlan struct {
	Device         string
	WeightBytes    int64
	KVBytes        int64
	WorkspaceBytes int64
	FreeBytes      int64 // free memory on the device when planned; 0 if unknown
}

// Total is the sum of the planned allocations.
func (p MemoryPlan) Total() int64 { return p.WeightBytes + p.KVBytes + p.WorkspaceBytes }

// SamplingParams control token selection. Temperature 0 means greedy.
type SamplingParams struct {
	Temperature       float32
	TopK              int     // 0 = off
	TopP              float32 // 0 or 1 = off
	MinP              float32 // 0 = off
	Seed              uint64
	HasSeed           bool
	RepetitionPenalty float32 // 0 or 1 = off
	PresencePenalty   float32
	FrequencyPenalty  float32
	LogitBias         map[int32]float32
}

// GenerateRequest asks for a continuation of Prompt.
type GenerateRequest struct {
	ID          string // request id, unique per host; used by Cancel and in logs
	Prompt      []int32
	MaxTokens   int     // generation stops with FinishLength after this many tokens; 0 = until the context is full
	MinTokens   int     // stop tokens are ignored before this many tokens
	StopTokens  []int32 // generation stops (FinishStop) after emitting one of these (it is included in the chunk)
	Sampling    SamplingParams
	TopLogprobs int  // number of top alternatives per token (0 = none)
	Logprobs    bool // report the chosen token's logprob
}

// FinishReason says why a generation ended.
type FinishReason string

const (
	FinishNone     FinishReason = ""
	FinishStop     FinishReason = "stop"
	FinishLength   FinishReason = "length"
	FinishCanceled FinishReason = "canceled"
	FinishError    FinishReason = "error"
)

// TokenLogprob is a token with its log probability.
type TokenLogprob struct {
	Token   int32
	Logprob float32
}

// TokenInfo carries logprobs of one generated token.
type TokenInfo struct {
	Logprob float32
	Top     []TokenLogprob
}

// Timings are reported with the last chunk of a generation.
type Timings struct {
	PromptTokens    int
	CachedTokens    int // prompt tokens served from the prefix cache
	GeneratedTokens int
	QueueTime       time.Duration
	PromptTime      time.Duration // time to first token, minus queue time
	GenerateTime    time.Duration
}

// Chunk is one streamed piece of a generation: one or more tokens, and on the
// last chunk a finish reason and timings.
type Chunk struct {
	Tokens  []int32
	Info    []TokenInfo // parallel to Tokens when logprobs were requested
	Finish  FinishReason
	Timings *Timings
}

// Stats is a snapshot of an adapter's serving state.
type Stats struct {
	Running         int
	Waiting         int
	KVUsedBlocks    int
	KVTotalBlocks   int
	PrefixQueries   int64
	PrefixHits      int64
	TokensPerSecond float64
}

// Logits is the result of Evaluate: Rows x Vocab float32 values, row-major.
type Logits struct {
	Rows  int
	Vocab int
	Data  []float32
}

// Adapter is what a plugin implements. All methods must be safe for
// concurrent use; Generate is called concurrently for concurrent requests.
type Adapter interface {
	// Load loads the model at req.Path, reporting progress through the callback.
	Load(ctx context.Context, req LoadRequest, progress func(LoadProgress)) (ModelInfo, error)
	// Generate streams chunks to emit until the generation ends or ctx is
	// canceled. emit returning an error aborts the generation.
	Generate(ctx context.Context, req GenerateRequest, emit func(Chunk) error) error
	// Cancel stops the generation with the given request id, if running.
	Cancel(ctx context.Context, id string) error
	// Evaluate runs tokens through the model from an empty context and returns
	// logits for every position.
	Evaluate(ctx context.Context, tokens []int32) (Logits, error)
	// Stats reports serving state.
	Stats(ctx context.Context) (Stats, error)
	// Unload frees the model. Load may be called again afterwards.
	Unload(ctx context.Context) error
}

// Planner is optionally implemented by adapters that can compute a memory
// plan before loading.
type Planner interface {
	Plan(ctx context.Context, req LoadRequest) (MemoryPlan, error)
}
