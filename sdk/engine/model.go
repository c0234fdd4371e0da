// Package engine is the architecture-independent serving core for adapters:
// request slots, continuous batching, paged KV cache, prefix cache, sampling
// and streaming. An adapter author implements Model (the forward pass over a
// paged KV cache) and gets an sdk.Adapter from NewAdapter.
//
// KV groups (sliding-window layers keep only the window). A model may split
// its layers into KV groups (Spec.Groups): group 0 and any other full-
// attention group hold the whole context; a window group (gpt-oss's even
// layers, window 128) only ever reads the last Window positions. Each group
// has its own block pool (its layers' cache tensors have that many blocks,
// so a window pool costs ~maxSeqs x (window + chunk) tokens, not the
// context) and each sequence one block table per group, all indexed by
// logical block (position / BlockSize) so that the backends' attention
// needs no change: a layer is handed its group's table. The scheduler:
//   - allocates positions in every group as they are needed; after each
//     step it releases a window group's blocks below (next position - W + 1)
//     / BlockSize at once (table entry -1). A prefill chunk of n tokens
//     starting at c thus holds blocks from (c-W+1)/BlockSize to
//     (c+n-1)/BlockSize: at most ceil((W+n)/BlockSize)+1. The per-sequence
//     prefill chunk is capped so that one sequence alone (plus a copy-on-
//     write block) always fits every window pool;
//   - admits a sequence when every group has the blocks it needs (full
//     groups: the uncached prompt; window groups: the first chunk and its
//     window) plus one spare per running sequence; when any pool runs dry
//     while running, the youngest sequence is preempted (its blocks in all
//     groups freed), as before: never corrupt, never out of memory;
//   - prefix cache: blocks of every group are registered under the same
//     chain key (the key names the token prefix, and a layer's KV at a
//     position depends on the tokens up to it only). A window block released
//     behind the window stays cached (LRU, evictable) in its pool. A prefix
//     hit of k blocks in group 0 is used only as far as each window group
//     still holds, under the same keys, the blocks the first recomputed
//     query sees (from (c-W+1)/BlockSize, c = the cached tokens); otherwise
//     it shrinks to the longest prefix that qualifies, or recomputes. A
//     reused prefix therefore gives the same tokens as a fresh run.
//
// Models that declare no groups get exactly the single shared pool and
// table of before.
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
	// positions (informational; Groups says which layers and how the KV of
	// those layers is kept).
	SlidingWindow int
	// Groups, when it has two or more entries, splits the layers into KV
	// groups, each with its own block pool and block tables (see KVGroup and
	// the package doc). Groups[0] is the group that NumBlocks, KVBlockBytes
	// and SeqInput.Blocks refer to: a full-attention group (Window 0) whose
	// NumBlocks and BlockBytes equal those fields. A model that declares groups must implement GroupModel;
	// the engine then copies blocks with CopyGroupBlock only. Empty (or one
	// group): one block table for all layers, as NumBlocks and KVBlockBytes
	// say.
	Groups []KVGroup
}

// KVGroup is a set of layers that share a KV block pool and block tables.
// A window group's layers attend only to the last Window positions, so the
// engine keeps only the blocks a future query of the sequence can still see
// and frees the others (its pool is sized for that, not for the context).
type KVGroup struct {
	Name       string // for logs, e.g. "full" or "window 128"
	Window     int    // > 0: the layers see keys at positions > q-Window; 0: full causal attention
	Layers     int    // layers in the group (informational)
	NumBlocks  int    // blocks in the group's pool
	BlockBytes int64  // bytes one block takes on the device over the group's layers
}

// KVBytes is the device memory of a spec's KV pools: the sum over its
// groups, or NumBlocks x KVBlockBytes when it declares none.
func (s Spec) KVBytes() int64 {
	if len(s.Groups) < 2 {
		return int64(s.NumBlocks) * s.KVBlockBytes
	}
	var n int64
	for _, g := range s.Groups {
		n += int64(g.NumBlocks) * g.BlockBytes
	}
	return n
}

// SeqInput is one sequence's part of a forward batch. Tokens are appended at
// positions [Pos, Pos+len(Tokens)) of the sequence. Blocks is the sequence's
// block table: Blocks[i] holds positions [i*BlockSize, (i+1)*BlockSize); it
// covers at least Pos+len(Tokens) positions. KV for positions < Pos was
// written by earlier calls (or is shared prefix blocks) and must not change.
//
// With KV groups (Spec.Groups), GroupBlocks[g] is the block table of group g
// (GroupBlocks[0] is Blocks). Tables are indexed by logical block (position
// / BlockSize) in every group; a window group's table holds -1 for blocks no
// token of this step can see (they were freed), and the model must not read
// them. GroupBlocks nil with a grouped model (direct callers, tests): every
// group uses Blocks, whose ids must then fit every group's pool.
type SeqInput struct {
	Tokens      []int32
	Pos         int
	Blocks      []int32
	AllLogits   bool // return logits for every token, not only the last
	GroupBlocks [][]int32
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

// GroupModel is implemented by models that declare KV groups
// (Spec.Groups): CopyGroupBlock copies block src of group g's pool into
// block dst of the same pool, in the group's layers only. (Model.CopyBlock
// of such a model copies the block in every layer, for callers that pass
// one table for all groups; see SeqInput.)
type GroupModel interface {
	Model
	CopyGroupBlock(group int, dst, src int32) error
}

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

// SampleSpec is one sequence's token choice in a SamplingModel step.
type SampleSpec struct {
	// Host: return the row's logits in Output.Logits (as Forward) instead of
	// a token; the engine samples it on the host.
	Host bool
	// Temperature below 1e-5: the argmax (as ForwardGreedy). Otherwise an
	// exact draw from softmax(logits / Temperature) restricted to the top-k
	// (TopK in (0, vocab); ties at the k-th all kept), then the top-p share
	// of their mass (TopP in (0, 1)), then p >= MinP * p_max (MinP > 0).
	Temperature float32
	TopK        int
	TopP, MinP  float32
	// The draw is a pure function of the logits row and (Seed, Index), the
	// index of the token in the request: the same for a seeded request in
	// any batch, fresh for every token.
	Seed, Index uint64
}

// SamplingModel is optionally implemented by models that can draw tokens on
// the device (temperature / top-k / top-p / min-p; no logits copied to the
// host). When DeviceSampling reports true, a step in which some sequence
// samples with nothing else that needs its logits on the host (no logit
// bias, penalties, logprobs or stop-token masking) calls ForwardSample with
// one SampleSpec per SeqInput (AllLogits never set). It returns one token
// per SeqInput (ignored where Host) and, when any spec is Host, an Output
// whose Logits[i] holds the row Forward would return for those i (nil
// elsewhere). Tokens of unfinished prefill chunks are ignored.
//
// A drawn token must be ml.SampleRowRef's for the row and the spec's
// settings (Counter = Index), up to float rounding in near ties: in a step
// that cannot use ForwardSample (an evaluation's AllLogits rows in it) the
// engine draws such a sequence's token with ml.SampleRowRef on the host, so
// a seeded request's tokens do not depend on what shares its steps.
type SamplingModel interface {
	Model
	DeviceSampling() bool
	ForwardSample(ctx context.Context, b *Batch, specs []SampleSpec) ([]int32, *Output, error)
}
