package synth

import (
	"fmt"
	"math"

	"github.com/llama-orch/orch/sdk/gguf"
)

// Architecture ids (GGUF general.architecture).
const (
	ArchGPTOSS = "gpt-oss"
	ArchGPT2   = "gpt2"
	ArchLlama  = "llama"
)

// InitKind says how a tensor's values are drawn.
type InitKind int

const (
	// InitRandom: zero-mean values with standard deviation Std (uniform
	// distribution; quantized types get a block scale that matches Std).
	InitRandom InitKind = iota
	// InitNorm: 1 + Std * noise (norm weights).
	InitNorm
	// InitRopeFreqs: Llama 3.1 per-frequency RoPE divisors (rope_freqs.weight).
	InitRopeFreqs
)

// TensorSpec is one tensor a model file holds.
type TensorSpec struct {
	Name  string
	Type  gguf.Type
	Shape []int64 // ggml ne order: Shape[0] contiguous
	Init  InitKind
	Std   float64
}

// Elements is the product of Shape.
func (t TensorSpec) Elements() int64 {
	n := int64(1)
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// Bytes is the tensor's data size.
func (t TensorSpec) Bytes() int64 {
	n, _ := t.Type.RowBytes(t.Elements())
	return n
}

// Tensors lists, in file order, every tensor of a model with configuration c,
// with llama.cpp's names, shapes (ne order) and the dtypes of c. This is the
// single source of truth for tensor names used by synth; model code may use
// it to know what to expect.
//
// gpt-oss (llama.cpp LLM_ARCH_OPENAI_MOE), d = Embd, q = Heads*HeadDim,
// kv = KVHeads*HeadDim, f = ExpertFF, E = Experts, V = vocab:
//
//	token_embd.weight                 [d, V]        EmbdType (Q8_0)
//	blk.N.attn_norm.weight            [d]           F32
//	blk.N.attn_q.weight / .bias       [d, q] / [q]  MatType (Q8_0) / F32
//	blk.N.attn_k.weight / .bias       [d, kv] / [kv]
//	blk.N.attn_v.weight / .bias       [d, kv] / [kv]
//	blk.N.attn_output.weight / .bias  [q, d] / [d]
//	blk.N.attn_sinks.weight           [Heads]       F32
//	blk.N.post_attention_norm.weight  [d]           F32
//	blk.N.ffn_gate_inp.weight / .bias [d, E] / [E]  F32 (router)
//	blk.N.ffn_gate_exps.weight / .bias [d, f, E] / [f, E]  ExpertType (MXFP4) / F32
//	blk.N.ffn_up_exps.weight / .bias   [d, f, E] / [f, E]
//	blk.N.ffn_down_exps.weight / .bias [f, d, E] / [d, E]
//	output_norm.weight                [d]           F32
//	output.weight                     [d, V]        OutType (Q8_0)
//
// gpt2 (LayerNorm with bias, fused QKV, learned positions), f = FF, C = Context:
//
//	token_embd.weight                [d, V]      EmbdType
//	position_embd.weight             [d, C]      F32
//	blk.N.attn_norm.weight / .bias   [d]         F32
//	blk.N.attn_qkv.weight / .bias    [d, 3d] / [3d]  MatType / F32
//	blk.N.attn_output.weight / .bias [d, d] / [d]
//	blk.N.ffn_norm.weight / .bias    [d]         F32
//	blk.N.ffn_up.weight / .bias      [d, f] / [f]
//	blk.N.ffn_down.weight / .bias    [f, d] / [d]
//	output_norm.weight / .bias       [d]         F32
//	output.weight                    [d, V]      OutType (llama.cpp's converter writes the tied copy)
//
// llama (RMSNorm, SwiGLU, RoPE, GQA; q/k rows in llama.cpp's permuted order):
//
//	token_embd.weight         [d, V]   EmbdType
//	rope_freqs.weight         [HeadDim/2] F32 (only when RopeFreqs: Llama 3.1 scaling)
//	blk.N.attn_norm.weight    [d]      F32
//	blk.N.attn_q.weight       [d, q]   MatType
//	blk.N.attn_k.weight       [d, kv]
//	blk.N.attn_v.weight       [d, kv]
//	blk.N.attn_output.weight  [q, d]
//	blk.N.ffn_norm.weight     [d]      F32
//	blk.N.ffn_gate.weight     [d, f]   MatType
//	blk.N.ffn_up.weight       [d, f]
//	blk.N.ffn_down.weight     [f, d]
//	output_norm.weight        [d]      F32
//	output.weight             [d, V]   OutType
func Tensors(c Config) ([]TensorSpec, error) {
	if err := c.validate(); err != nil {
		return nil, err
	}
	d, V := int64(c.Embd), int64(c.VocabSize)
	q, kv := int64(c.Heads*c.HeadDim), int64(c.KVHeads*c.HeadDim)
	is := func(in int64) float64 { return 1 / math.Sqrt(float64(in)) }
	var ts []TensorSpec
	add := func(name string, t gguf.Type, init InitKind, std float64, shape ...int64) {
		ts = append(ts, TensorSpec{Name: name, Type: t, Shape: shape, Init: init, Std: std})
	}
	const f32 = gguf.TypeF32
	// Residual-branch outputs are scaled down so the residual stream grows
	// slowly with depth; logits get std ~3 for a useful spread.
	outStd := 3 * is(d)
	branch := 0.5
	switch c.Arch {
	case ArchGPTOSS:
		f, E := int64(c.ExpertFF), int64(c.Experts)
		add("token_embd.weight", c.EmbdType, InitRandom, 1, d, V)
		for i := 0; i < c.Layers; i++ {
			p := fmt.Sprintf("blk.%d.", i)
			add(p+"attn_norm.weight", f32, InitNorm, 0.1, d)
			add(p+"attn_q.weight", c.MatType, InitRandom, is(d), d, q)
			add(p+"attn_q.bias", f32, InitRandom, 0.1, q)
			add(p+"attn_k.weight", c.MatType, InitRandom, is(d), d, kv)
			add(p+"attn_k.bias", f32, InitRandom, 0.1, kv)
			add(p+"attn_v.weight", c.MatType, InitRandom, is(d), d, kv)
			add(p+"attn_v.bias", f32, InitRandom, 0.1, kv)
			add(p+"attn_output.weight", c.MatType, InitRandom, branch*is(q), q, d)
			add(p+"attn_output.bias", f32, InitRandom, 0.05, d)
			add(p+"attn_sinks.weight", f32, InitRandom, 1, int64(c.Heads))
			add(p+"post_attention_norm.weight", f32, InitNorm, 0.1, d)
			add(p+"ffn_gate_inp.weight", f32, InitRandom, is(d), d, E)
			add(p+"ffn_gate_inp.bias", f32, InitRandom, 0.1, E)
			add(p+"ffn_gate_exps.weight", c.ExpertType, InitRandom, is(d), d, f, E)
			add(p+"ffn_gate_exps.bias", f32, InitRandom, 0.1, f, E)
			add(p+"ffn_up_exps.weight", c.ExpertType, InitRandom, is(d), d, f, E)
			add(p+"ffn_up_exps.bias", f32, InitRandom, 0.1, f, E)
			add(p+"ffn_down_exps.weight", c.ExpertType, InitRandom, branch*is(f), f, d, E)
			add(p+"ffn_down_exps.bias", f32, InitRandom, 0.05, d, E)
		}
		add("output_norm.weight", f32, InitNorm, 0.1, d)
		add("output.weight", c.OutType, InitRandom, outStd, d, V)
	case ArchGPT2:
		f := int64(c.FF)
		add("token_embd.weight", c.EmbdType, InitRandom, 0.5, d, V)
		add("position_embd.weight", f32, InitRandom, 0.2, d, int64(c.Context))
		for i := 0; i < c.Layers; i++ {
			p := fmt.Sprintf("blk.%d.", i)
			add(p+"attn_norm.weight", f32, InitNorm, 0.1, d)
			add(p+"attn_norm.bias", f32, InitRandom, 0.05, d)
			add(p+"attn_qkv.weight", c.MatType, InitRandom, is(d), d, 3*d)
			add(p+"attn_qkv.bias", f32, InitRandom, 0.1, 3*d)
			add(p+"attn_output.weight", c.MatType, InitRandom, branch*is(d), d, d)
			add(p+"attn_output.bias", f32, InitRandom, 0.05, d)
			add(p+"ffn_norm.weight", f32, InitNorm, 0.1, d)
			add(p+"ffn_norm.bias", f32, InitRandom, 0.05, d)
			add(p+"ffn_up.weight", c.MatType, InitRandom, is(d), d, f)
			add(p+"ffn_up.bias", f32, InitRandom, 0.1, f)
			add(p+"ffn_down.weight", c.MatType, InitRandom, branch*is(f), f, d)
			add(p+"ffn_down.bias", f32, InitRandom, 0.05, d)
		}
		add("output_norm.weight", f32, InitNorm, 0.1, d)
		add("output_norm.bias", f32, InitRandom, 0.05, d)
		add("output.weight", c.OutType, InitRandom, outStd, d, V)
	case ArchLlama:
		f := int64(c.FF)
		add("token_embd.weight", c.EmbdType, InitRandom, 1, d, V)
		if c.RopeFreqs {
			add("rope_freqs.weight", f32, InitRopeFreqs, 0, int64(c.HeadDim/2))
		}
		for i := 0; i < c.Layers; i++ {
			p := fmt.Sprintf("blk.%d.", i)
			add(p+"attn_norm.weight", f32, InitNorm, 0.1, d)
			add(p+"attn_q.weight", c.MatType, InitRandom, is(d), d, q)
			add(p+"attn_k.weight", c.MatType, InitRandom, is(d), d, kv)
			add(p+"attn_v.weight", c.MatType, InitRandom, is(d), d, kv)
			add(p+"attn_output.weight", c.MatType, InitRandom, branch*is(q), q, d)
			add(p+"ffn_norm.weight", f32, InitNorm, 0.1, d)
			add(p+"ffn_gate.weight", c.MatType, InitRandom, is(d), d, f)
			add(p+"ffn_up.weight", c.MatType, InitRandom, is(d), d, f)
			add(p+"ffn_down.weight", c.MatType, InitRandom, branch*is(f), f, d)
		}
		add("output_norm.weight", f32, InitNorm, 0.1, d)
		add("output.weight", c.OutType, InitRandom, outStd, d, V)
	default:
		return nil, fmt.Errorf("synth: unknown architecture %q", c.Arch)
	}
	for _, t := range ts {
		if t.Shape[0]%int64(t.Type.BlockSize()) != 0 {
			return nil, fmt.Errorf("synth: tensor %s: row length %d is not a multiple of the %s block size %d", t.Name, t.Shape[0], t.Type, t.Type.BlockSize())
		}
	}
	return ts, nil
}

// metadata returns the architecture's hyperparameter keys (without the
// tokenizer), with gguf-py's value types (uint32 counts, float32 reals).
func metadata(c Config) []KeyValue {
	a := c.Arch + "."
	kv := []KeyValue{
		{"general.architecture", c.Arch},
		{"general.type", "model"},
		{"general.name", c.Name},
		{"general.quantization_version", uint32(2)},
		{"general.file_type", fileType(c)},
		{a + "block_count", uint32(c.Layers)},
		{a + "context_length", uint32(c.Context)},
		{a + "embedding_length", uint32(c.Embd)},
		{a + "feed_forward_length", uint32(c.FF)},
		{a + "attention.head_count", uint32(c.Heads)},
	}
	switch c.Arch {
	case ArchGPTOSS:
		kv = append(kv,
			KeyValue{a + "attention.head_count_kv", uint32(c.KVHeads)},
			KeyValue{a + "rope.freq_base", c.RopeBase},
			KeyValue{a + "attention.layer_norm_rms_epsilon", c.NormEps},
			KeyValue{a + "expert_count", uint32(c.Experts)},
			KeyValue{a + "expert_used_count", uint32(c.ExpertsUsed)},
			KeyValue{a + "attention.key_length", uint32(c.HeadDim)},
			KeyValue{a + "attention.value_length", uint32(c.HeadDim)},
			KeyValue{a + "attention.sliding_window", uint32(c.SlidingWindow)},
			KeyValue{a + "expert_feed_forward_length", uint32(c.ExpertFF)},
		)
		if c.YarnFactor > 0 {
			kv = append(kv,
				KeyValue{a + "rope.scaling.type", "yarn"},
				KeyValue{a + "rope.scaling.factor", c.YarnFactor},
				KeyValue{a + "rope.scaling.original_context_length", uint32(c.YarnOrigContext)},
			)
		}
	case ArchGPT2:
		kv = append(kv, KeyValue{a + "attention.layer_norm_epsilon", c.NormEps})
	case ArchLlama:
		kv = append(kv,
			KeyValue{a + "attention.head_count_kv", uint32(c.KVHeads)},
			KeyValue{a + "rope.freq_base", c.RopeBase},
			KeyValue{a + "attention.layer_norm_rms_epsilon", c.NormEps},
			KeyValue{a + "attention.key_length", uint32(c.HeadDim)},
			KeyValue{a + "attention.value_length", uint32(c.HeadDim)},
			KeyValue{a + "rope.dimension_count", uint32(c.HeadDim)},
			KeyValue{a + "vocab_size", uint32(c.VocabSize)},
		)
	}
	return kv
}

// KeyValue is one metadata entry in file order.
type KeyValue struct {
	Key   string
	Value any
}

// fileType is llama.cpp's general.file_type (enum llama_ftype) for c's main weight type.
func fileType(c Config) uint32 {
	main := c.MatType
	if c.Arch == ArchGPTOSS && c.ExpertType == gguf.TypeMXFP4 {
		return 38 // LLAMA_FTYPE_MOSTLY_MXFP4_MOE
	}
	switch main {
	case gguf.TypeF32:
		return 0
	case gguf.TypeF16:
		return 1
	case gguf.TypeQ4_0:
		return 2
	case gguf.TypeQ8_0:
		return 7
	case gguf.TypeBF16:
		return 32
	}
	return 0
}

// llama3RopeFreqs computes Llama 3.1's rope_freqs (divisors per frequency):
// factor 8, low_freq_factor 1, high_freq_factor 4, original context 8192.
func llama3RopeFreqs(headDim int, base float64) []float32 {
	const factor, lowF, highF, old = 8.0, 1.0, 4.0, 8192.0
	lowWave, highWave := old/lowF, old/highF
	out := make([]float32, headDim/2)
	for i := range out {
		freq := 1 / math.Pow(base, float64(2*i)/float64(headDim))
		wave := 2 * math.Pi / freq
		switch {
		case wave < highWave:
			out[i] = 1
		case wave > lowWave:
			out[i] = factor
		default:
			smooth := (old/wave - lowF) / (highF - lowF)
			out[i] = float32(1 / ((1-smooth)/factor + smooth))
		}
	}
	return out
}
