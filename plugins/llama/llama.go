// Package llama is the model code of the Llama adapter: Llama 2 and 3 style
// models (RMSNorm, GQA attention, RoPE on llama.cpp's permuted q/k rows —
// the adjacent-pair rotation — with rope_freqs.weight divisors when present,
// SwiGLU feed-forward, tied or separate output). It is written once against
// sdk/ml; tensor names and metadata keys are llama.cpp's (see sdk/synth).
package llama

import (
	"fmt"
	"math"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/nn"
)

// Options configure Load (see nn.Options: Backend is required).
type Options = nn.Options

var builders = nn.Builders{"llama": build}

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

// Version is the adapter's version (set at build time with -ldflags -X).
var Version = "0.1.0"

// Info describes the Llama adapter.
func Info() sdk.Info {
	var dts []string
	for _, d := range ml.WeightDTypes {
		dts = append(dts, d.String())
	}
	return sdk.Info{Name: "llama", Version: Version, Architectures: Architectures(), DTypes: dts,
		Features: []string{"paged-kv", "prefix-cache", "logprobs", "cuda", "tensor-parallel"}}
}

// New returns the Llama adapter: the engine's continuous batching over this
// package's model.
func New(log hclog.Logger) sdk.Adapter {
	return engine.NewAdapter(NewLoader(log), log, engine.WithPlanner(NewPlanner(log)))
}

// NewPlanner returns the memory planner of the Llama adapter: what NewLoader
// would allocate for a request (weights, KV cache, workspace) and whether it
// fits the device, from the file's metadata and tensor infos only.
func NewPlanner(log hclog.Logger) engine.PlanFunc {
	return builders.Planner(footprints(), log)
}

// footprints are the memory footprints NewPlanner and NewLoader share.
func footprints() map[string]nn.Footprinter { return map[string]nn.Footprinter{"llama": footprint} }

// footprint mirrors build's allocations.
func footprint(f *gguf.File, s ml.Shard) (nn.Footprint, error) {
	hp, w := nn.Hparams{File: f, Arch: "llama"}, nn.NewWeights(f, nil)
	var fp nn.Footprint
	dd, err := nn.ReadDims(hp, w, true)
	if err != nil {
		return fp, err
	}
	gs, err := w.Shape("blk.0.ffn_gate.weight")
	if err != nil {
		return fp, err
	}
	if len(gs) != 2 {
		return fp, fmt.Errorf("tensor blk.0.ffn_gate.weight has shape %v: want 2 dimensions", gs)
	}
	if err := nn.CheckHeads("llama", dd.Heads, dd.KVHeads, s); err != nil {
		return fp, err
	}
	ranks := max(s.Size, 1) // a rank's heads and ff columns
	nh := dd.Heads / ranks
	fp.Arch, fp.Layers, fp.Width, fp.KVHeads, fp.HeadDim, fp.Vocab = "llama", dd.Layers, dd.Width, dd.KVHeads/ranks, dd.HeadDim, dd.Vocab
	dims, err := hp.IntOr("rope.dimension_count", fp.HeadDim)
	if err != nil {
		return fp, err
	}
	d, qd, kvd, ff := int64(fp.Width), int64(nh*fp.HeadDim), int64(fp.KVHeads*fp.HeadDim), int64(gs[1]/ranks)
	// rope_freqs.weight is read on the host; the RoPE table is uploaded
	fp.WeightBytes = nn.ShardWeightBytes(f, func(n string) bool { return n == "rope_freqs.weight" }, nn.VectorName, s) + 4*int64(dims/2)
	fp.ScratchFloats = 4*d + 2*qd + 2*kvd + 2*ff // x, h, o, f; q, att; k, v; gate, up
	return fp, nil
}

// NewLoader returns the engine.Loader of the Llama adapter (backend from the
// request, CUDA when usable; other architectures fail with
// sdk.ErrUnsupportedArchitecture). It honours LoadOptions.KVCacheFraction
// with the same sizing as NewPlanner (nn.Builders.LoaderWith).
func NewLoader(log hclog.Logger) engine.Loader { return builders.LoaderWith(footprints(), log) }

type layer struct {
	attnNorm, ffnNorm          ml.Tensor
	q, qb, k, kb, v, vb, o, ob ml.Tensor
	gate, up, down             ml.Tensor
}

// model is the Llama forward pass:
//
//	x = embed(tokens)
//	per layer: h = rmsnorm(x); q,k,v = h·W; rope(q,k) (adjacent pairs); x += attn·Wo
//	           h = rmsnorm(x); x += (silu(h·Wgate) * h·Wup)·Wdown
//	logits = rmsnorm(x)·Wout
type model struct {
	b                              ml.Backend
	comm                           ml.Comm // tensor-parallel group (nil: the whole model)
	w                              *nn.Weights
	s                              nn.Scratch
	d, nh, nkv, hd, ff, vocab      int
	eps, scale                     float32
	tokEmbd, outNorm, output       ml.Tensor
	layers                         []layer
	rope                           ml.Rope
	x, h, q, k, v, att, o, g, u, f ml.Tensor
}

func build(f *gguf.File, o nn.Options) (*nn.Runner, error) {
	o, err := o.Normalize(nn.TrainedContext(f))
	if err != nil {
		return nil, err
	}
	w := nn.NewWeights(f, o.Backend)
	w.Shard = o.Shard
	if o.Progress != nil {
		w.Progress = func(done int64) { o.Progress(done, 0) }
	}
	m := &model{b: o.Backend, w: w, s: nn.Scratch{B: o.Backend}}
	if o.Shard.Split() {
		m.comm = o.Shard.Comm
	}
	r, err := m.build(nn.Hparams{File: f, Arch: "llama"}, o)
	if err != nil {
		m.Close()
		return nil, err
	}
	return r, nil
}

func (m *model) build(hp nn.Hparams, o nn.Options) (*nn.Runner, error) {
	w := m.w
	dd, err := nn.ReadDims(hp, w, true)
	if err != nil {
		return nil, err
	}
	layers := dd.Layers
	if err := nn.CheckHeads("llama", dd.Heads, dd.KVHeads, o.Shard); err != nil {
		return nil, err
	}
	// with tensor parallelism this rank's heads and ff columns only
	// (Weights.Part slices the tensors given their full shapes)
	ranks := max(o.Shard.Size, 1)
	m.d, m.nh, m.nkv, m.hd, m.vocab = dd.Width, dd.Heads/ranks, dd.KVHeads/ranks, dd.HeadDim, dd.Vocab
	gs, err := w.Shape("blk.0.ffn_gate.weight")
	if err != nil {
		return nil, err
	}
	if len(gs) != 2 {
		return nil, fmt.Errorf("tensor blk.0.ffn_gate.weight has shape %v, want [%d, ff]", gs, m.d)
	}
	m.ff = gs[1] / ranks // Part checks that ranks divide it
	if n, err := hp.IntOr("expert_count", 0); err != nil || n != 0 {
		return nil, fmt.Errorf("metadata key llama.expert_count = %d: mixture-of-experts Llama models are not supported (%v)", n, err)
	}
	eps, err := hp.FloatOr("attention.layer_norm_rms_epsilon", 1e-5)
	if err != nil {
		return nil, err
	}
	m.eps, m.scale = float32(eps), float32(1/math.Sqrt(float64(m.hd)))

	base, err := hp.FloatOr("rope.freq_base", 10000)
	if err != nil {
		return nil, err
	}
	dims, err := hp.IntOr("rope.dimension_count", m.hd)
	if err != nil {
		return nil, err
	}
	if dims > m.hd || dims%2 != 0 || dims == 0 {
		return nil, fmt.Errorf("metadata key llama.rope.dimension_count = %d: must be even, > 0 and <= head dim %d", dims, m.hd)
	}
	var divisors []float32
	if w.Has("rope_freqs.weight") {
		if divisors, err = w.Host("rope_freqs.weight", dims/2); err != nil {
			return nil, err
		}
	}
	inv, err := ml.RopeInvFreq(base, dims, divisors)
	if err != nil {
		return nil, fmt.Errorf("rope: %w", err)
	}
	stype, err := hp.StringOr("rope.scaling.type", "none")
	if err != nil {
		return nil, err
	}
	switch stype {
	case "none", "":
	case "linear":
		factor, err := hp.FloatOr("rope.scaling.factor", 1)
		if err != nil {
			return nil, err
		}
		if !(factor > 0) {
			return nil, fmt.Errorf("metadata key llama.rope.scaling.factor = %g: must be > 0", factor)
		}
		for i := range inv {
			inv[i] /= float32(factor)
		}
	default:
		return nil, fmt.Errorf("metadata key llama.rope.scaling.type = %q: unsupported (none, linear; llama3 scaling comes as rope_freqs.weight)", stype)
	}
	invT, err := w.Upload(inv, dims/2)
	if err != nil {
		return nil, err
	}
	m.rope = ml.Rope{Mode: ml.RopeNormal, Dims: dims, InvFreq: invT, Scale: 1}

	d, ff, qd, kvd := m.d, m.ff, m.nh*m.hd, m.nkv*m.hd
	gff, gqd, gkvd := gs[1], dd.Heads*m.hd, dd.KVHeads*m.hd // full shapes of the split tensors
	if m.tokEmbd, err = w.Tensor("token_embd.weight", d, m.vocab); err != nil {
		return nil, err
	}
	if m.outNorm, err = w.Vector("output_norm.weight", d); err != nil {
		return nil, err
	}
	if w.Has("output.weight") {
		if m.output, err = w.Tensor("output.weight", d, m.vocab); err != nil {
			return nil, err
		}
	} else {
		m.output = m.tokEmbd
	}
	for i := range layers {
		p := fmt.Sprintf("blk.%d.", i)
		var L layer
		// this rank's part of each weight (nn.SplitOf); the whole tensor unsplit
		get := func(dst *ml.Tensor, name string, shape ...int) {
			if err == nil {
				*dst, err = w.Part(p+name, false, shape...)
			}
		}
		vec := func(dst *ml.Tensor, name string, optional bool, shape ...int) {
			if err != nil {
				return
			}
			if optional {
				*dst, err = w.OptionalPart(p+name, true, shape...)
			} else {
				*dst, err = w.Part(p+name, true, shape...)
			}
		}
		vec(&L.attnNorm, "attn_norm.weight", false, d)
		get(&L.q, "attn_q.weight", d, gqd)
		get(&L.k, "attn_k.weight", d, gkvd)
		get(&L.v, "attn_v.weight", d, gkvd)
		get(&L.o, "attn_output.weight", gqd, d)
		vec(&L.qb, "attn_q.bias", true, gqd)
		vec(&L.kb, "attn_k.bias", true, gkvd)
		vec(&L.vb, "attn_v.bias", true, gkvd)
		vec(&L.ob, "attn_output.bias", true, d)
		vec(&L.ffnNorm, "ffn_norm.weight", false, d)
		get(&L.gate, "ffn_gate.weight", d, gff)
		get(&L.up, "ffn_up.weight", d, gff)
		get(&L.down, "ffn_down.weight", gff, d)
		if err != nil {
			return nil, err
		}
		m.layers = append(m.layers, L)
	}
	n := o.MaxTokens
	s := &m.s
	m.x, m.h, m.o, m.f = s.Alloc(d, n), s.Alloc(d, n), s.Alloc(d, n), s.Alloc(d, n)
	m.q, m.att = s.Alloc(qd, n), s.Alloc(qd, n)
	m.k, m.v = s.Alloc(kvd, n), s.Alloc(kvd, n)
	m.g, m.u = s.Alloc(ff, n), s.Alloc(ff, n)
	if s.Err != nil {
		return nil, s.Err
	}
	return nn.Finish(o, w, m, nn.Model{Arch: "llama", Layers: layers, HeadDim: m.hd, KVHeads: m.nkv, Width: d, Vocab: m.vocab})
}

// Hidden runs the blocks (see nn.Net).
func (m *model) Hidden(st *nn.Staged) (ml.Tensor, error) {
	b, n := m.b, st.N
	var err error
	view := func(t ml.Tensor, shape ...int) ml.Tensor {
		if err != nil {
			return nil
		}
		var v ml.Tensor
		v, err = nn.View(b, t, n, shape...)
		return v
	}
	x, h, o, g, u, f := view(m.x), view(m.h), view(m.o), view(m.g), view(m.u), view(m.f)
	q2, k2, v2, att2 := view(m.q), view(m.k), view(m.v), view(m.att)
	q, k, v, att := view(m.q, m.hd, m.nh, 0), view(m.k, m.hd, m.nkv, 0), view(m.v, m.hd, m.nkv, 0), view(m.att, m.hd, m.nh, 0)
	if err != nil {
		return nil, err
	}
	b.Embed(x, m.tokEmbd, st.Tokens, false)
	attn := &ml.Attention{Scale: m.scale}
	for i := range m.layers {
		L := &m.layers[i]
		if i == 0 {
			b.RMSNorm(h, x, L.attnNorm, m.eps)
		} else {
			b.AddRMSNorm(x, h, f, L.attnNorm, m.eps)
		}
		b.MatMul(q2, h, L.q, L.qb)
		b.MatMul(k2, h, L.k, L.kb)
		b.MatMul(v2, h, L.v, L.vb)
		b.RoPE(q, st.Batch.Pos, &m.rope)
		b.RoPE(k, st.Batch.Pos, &m.rope)
		b.KVWrite(st.KV.K[i], st.KV.V[i], k, v, &st.Batch)
		b.Attend(att, q, st.KV.K[i], st.KV.V[i], &st.Batch, attn)
		b.MatMul(o, att2, L.o, L.ob) // split: this rank's heads' part, the bias on rank 0
		if m.comm != nil {
			m.comm.AllReduce(b, o)
		}
		b.AddRMSNorm(x, h, o, L.ffnNorm, m.eps)
		b.MatMul(g, h, L.gate, nil)
		b.MatMul(u, h, L.up, nil)
		b.SwiGLU(g, g, u)
		b.MatMul(f, g, L.down, nil)
		if m.comm != nil {
			m.comm.AllReduce(b, f)
		}
	}
	// nothing reads the last layer's q, k or norm output: the CUDA backend need not rotate / write them
	nn.Discard(b, q2, k2, h)
	b.Add(x, x, f)
	return x, b.Err()
}

// Head applies the output norm (in place on rows) and the LM head.
func (m *model) Head(dst, rows ml.Tensor) error {
	m.b.RMSNorm(rows, rows, m.outNorm, m.eps)
	m.b.MatMul(dst, rows, m.output, nil)
	return m.b.Err()
}

func (m *model) Close() error {
	m.s.Free()
	m.w.Close()
	return nil
}
