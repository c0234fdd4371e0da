// Package gpt is the model code of the GPT adapter: OpenAI's gpt-oss
// (RMSNorm, GQA attention with sinks and alternating sliding windows, RoPE
// NeoX + YaRN, MXFP4 mixture of experts with a clamped SwiGLU) and the GPT-2
// family (LayerNorm, GELU, MHA with a fused qkv, learned positions). It is
// written once against sdk/ml and runs on every backend; tensor names and
// metadata keys are llama.cpp's (see sdk/synth).
package gpt

import (
	"fmt"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/nn"
)

// Options configure Load (see nn.Options: Backend is required).
type Options = nn.Options

// Architectures served by this package.
var builders = nn.Builders{"gpt-oss": buildGPTOSS, "gpt2": buildGPT2}

// Architectures lists the GGUF architectures this package serves.
func Architectures() []string { return builders.Architectures() }

// Load opens the GGUF at path and builds its model on opts.Backend. Close
// the model to unmap the file; the backend stays the caller's.
func Load(path string, opts Options) (engine.Model, error) {
	r, err := builders.Load(path, opts)
	if err != nil {
		return nil, err
	}
	return r, nil
}

// NewLoader returns the engine.Loader of the GPT adapter: it picks the
// backend from the request (CUDA when usable, else CPU), sizes the KV pool
// and builds a gpt-oss or gpt2 model; other architectures fail with
// sdk.ErrUnsupportedArchitecture. It honours LoadOptions.KVCacheFraction
// with the same sizing as NewPlanner (nn.Builders.LoaderWith).
func NewLoader(log hclog.Logger) engine.Loader { return builders.LoaderWith(footprints(), log) }

// Version is the adapter's version (set at build time with -ldflags -X).
var Version = "0.1.0"

// Info describes the GPT adapter.
func Info() sdk.Info {
	return sdk.Info{
		Name: "gpt", Version: Version, Architectures: Architectures(),
		DTypes:   dtypeNames(),
		Features: []string{"paged-kv", "prefix-cache", "logprobs", "cuda", "tensor-parallel"},
	}
}

func dtypeNames() []string {
	var out []string
	for _, d := range ml.WeightDTypes {
		out = append(out, d.String())
	}
	return out
}

// New returns the GPT adapter: the engine's continuous batching over this
// package's models.
func New(log hclog.Logger) sdk.Adapter {
	return engine.NewAdapter(NewLoader(log), log, engine.WithPlanner(NewPlanner(log)))
}

// NewPlanner returns the memory planner of the GPT adapter: what NewLoader
// would allocate for a request (weights, KV cache, workspace) and whether it
// fits the device, from the file's metadata and tensor infos only.
func NewPlanner(log hclog.Logger) engine.PlanFunc {
	return builders.Planner(footprints(), log)
}

// footprints are the memory footprints NewPlanner and NewLoader share.
func footprints() map[string]nn.Footprinter {
	return map[string]nn.Footprinter{"gpt-oss": footprintGPTOSS, "gpt2": footprintGPT2}
}

// footprintGPTOSS mirrors buildGPTOSS's allocations.
func footprintGPTOSS(f *gguf.File, s ml.Shard) (nn.Footprint, error) {
	hp, w := nn.Hparams{File: f, Arch: "gpt-oss"}, nn.NewWeights(f, nil)
	var fp nn.Footprint
	dd, err := nn.ReadDims(hp, w, false)
	if err != nil {
		return fp, err
	}
	gs, err := w.Shape("blk.0.ffn_gate_exps.weight")
	if err != nil {
		return fp, err
	}
	if len(gs) != 3 {
		return fp, fmt.Errorf("tensor blk.0.ffn_gate_exps.weight has shape %v: want 3 dimensions", gs)
	}
	if err := nn.CheckHeads("gpt-oss", dd.Heads, dd.KVHeads, s); err != nil {
		return fp, err
	}
	ranks := max(s.Size, 1) // a rank's heads and ff columns
	nh := dd.Heads / ranks
	fp.Arch, fp.Layers, fp.Width, fp.KVHeads, fp.HeadDim, fp.Vocab = "gpt-oss", dd.Layers, dd.Width, dd.KVHeads/ranks, dd.HeadDim, dd.Vocab
	dims, err := hp.IntOr("rope.dimension_count", fp.HeadDim)
	if err != nil {
		return fp, err
	}
	ne, err := hp.Int("expert_count")
	if err != nil {
		return fp, err
	}
	k, err := hp.Int("expert_used_count")
	if err != nil {
		return fp, err
	}
	window, err := hp.IntOr("attention.sliding_window", 0)
	if err != nil {
		return fp, err
	}
	fp.SlidingWindow, fp.LayerWindows = window, ossWindows(fp.Layers, window)
	d, qd, kvd, ff := int64(fp.Width), int64(nh*fp.HeadDim), int64(fp.KVHeads*fp.HeadDim), int64(gs[1]/ranks)
	fp.WeightBytes = nn.ShardWeightBytes(f, nil, nn.VectorName, s) + 4*int64(dims/2) // + the uploaded RoPE table
	// x, h, moe, o; q, att; k, v — and the CUDA MoE's per-token buffers
	// (router logits, ids, weights, gate, up, down outputs per chosen expert)
	fp.ScratchFloats = 4*d + 2*qd + 2*kvd + int64(ne) + int64(k)*(2+2*ff+d)
	return fp, nil
}

// footprintGPT2 mirrors buildGPT2's allocations.
func footprintGPT2(f *gguf.File, s ml.Shard) (nn.Footprint, error) {
	hp, w := nn.Hparams{File: f, Arch: "gpt2"}, nn.NewWeights(f, nil)
	var fp nn.Footprint
	var err error
	if fp.Layers, err = hp.Int("block_count"); err != nil {
		return fp, err
	}
	if fp.Width, err = hp.Int("embedding_length"); err != nil {
		return fp, err
	}
	if fp.KVHeads, err = hp.Int("attention.head_count"); err != nil {
		return fp, err
	}
	es, err := w.Shape("token_embd.weight")
	if err != nil {
		return fp, err
	}
	ps, err := w.Shape("position_embd.weight")
	if err != nil {
		return fp, err
	}
	us, err := w.Shape("blk.0.ffn_up.weight")
	if err != nil {
		return fp, err
	}
	if len(es) != 2 || len(ps) != 2 || len(us) != 2 {
		return fp, fmt.Errorf("tensor shapes token_embd %v, position_embd %v, blk.0.ffn_up %v: want 2 dimensions", es, ps, us)
	}
	fp.Arch, fp.Vocab, fp.HeadDim = "gpt2", es[1], fp.Width/fp.KVHeads
	if err := nn.CheckHeads("gpt2", fp.KVHeads, fp.KVHeads, s); err != nil {
		return fp, err
	}
	ranks := max(s.Size, 1) // a rank's heads and ff columns
	fp.KVHeads /= ranks
	// the learned position table bounds the context (as in buildGPT2)
	fp.Trained = nn.TrainedContext(f)
	if fp.Trained == 0 || ps[1] < fp.Trained {
		fp.Trained = ps[1]
	}
	fp.WeightBytes = nn.ShardWeightBytes(f, nil, nn.VectorName, s)
	ad := int64(fp.KVHeads * fp.HeadDim)                             // a rank's attention width
	fp.ScratchFloats = 4*int64(fp.Width) + 4*ad + int64(us[1]/ranks) // x, h, o, ffo; q, k, v, att; up
	return fp, nil
}
