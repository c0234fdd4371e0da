// Package engine is the architecture-independent serving core for adapters:
// request slots, continuous batching, paged KV cache, prefix cache, sampling
// and streaming. An adapter author implements Model (the forward pass over a
// paged KV cache) and gets an sdk.Adapter from NewAdapter.
package engine

import (
	"context"

	"github.com/llama-orch/orch/sdk"
)

// Spec describes a loaded model to the engine.
type Spec struct {
	Architecture  string
	VocabSize     int
	ContextLength int   // max tokens per sequence the model supports
	BlockSize     int   // tokens per KV block the model's cache uses (e.g. 16)
	NumBlocks     int   // KV blocks allocated by the model (shared pool)
	KVBlockBytes  int64 // bytes one KV block takes on the device (all layers)
	// SlidingWindow > 0 means some layers only attend to the last SlidingWindow
	// positions (informational; the block table always covers all positions).
	SlidingWindow int
}

// SeqInput is one sequence's part of a forward batch. Tokens are appended at
// positions [Pos, Pos+len(Tokens)) of the sequence. Blocks is the sequence's
// block table: Blocks[i] holds positions [i*BlockSize, (i+1)*BlockSize); it
// covers at least Pos+len(Tokens) positions. KV for positions < Pos was
// written by earlier calls (or is shared prefix blocks) and must not change.
type SeqInput struct {
	Tokens    []int32
	Pos       int
	Blocks    []int32
	AllLogits bool // return logits for every token, not only the last
}

// Batch is the input of one forward step: any mix of prefill chunks and
// single-token decodes.
type Batch struct {
	Seqs []SeqInput
}

// Output holds the logits of a forward step: for each SeqInput, one row of
// VocabSize float32 per returned position (1 row, or len(Tokens) rows when
// AllLogits).
type Output struct {
	Logits [][]float32 // Logits[i] = rows of sequence i, concatenated (rows*VocabSize)
}

// Model is what an architecture implements for the engine. The engine calls
// Forward from one goroutine at a time.
type Model interface {
	Spec() Spec
	Forward(ctx context.Context, b *Batch) (*Output, error)
	// CopyBlock copies KV block src into dst (copy-on-write of shared prefix blocks).
	CopyBlock(dst, src int32) error
	Close() error
}

// Loader opens a model for the engine: it reads req.Path, sizes the KV pool
// from req.Options (context length, max sequences, KV cache fraction of free
// memory), reports progress and returns the Model with the ModelInfo the
// adapter reports. Architectures provide one (e.g. gpt.Loader, llama.Loader).
type Loader func(ctx context.Context, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (Model, sdk.ModelInfo, error)

// GreedyModel is optionally implemented by models that can pick the argmax
// token on the device (no logits copied to the host). When every sequence
// that needs a token in a step decodes greedily with nothing that needs the
// logits on the host (no logit bias, penalties, logprobs or stop-token
// masking) and no sequence wants AllLogits, the engine calls ForwardGreedy
// instead of Forward. It returns one token per SeqInput: the argmax of the
// row Forward would return (ties to the lowest token id, like the host
// sampler); the engine ignores the tokens of unfinished prefill chunks.
type GreedyModel interface {
	Model
	ForwardGreedy(ctx context.Context, b *Batch) ([]int32, error)
}
