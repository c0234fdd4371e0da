package gpt

import (
	"fmt"
	"math"

	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/nn"
)

type gpt2Layer struct {
	attnNorm, attnNormB, ffnNorm, ffnNormB ml.Tensor
	q, qb, k, kb, v, vb                    ml.Tensor // row views of attn_qkv
	o, ob, up, upb, down, downb            ml.Tensor
}

// gpt2 is the GPT-2 forward pass:
//
//	x = wte[tokens] + wpe[pos]
//	per layer: h = ln_1(x); q,k,v = h·Wqkv + b; x += attn(q,k,v)·Wo + bo
//	           h = ln_2(x); x += gelu(h·Wup + bup)·Wdown + bdown
//	logits = ln_f(x)·Wout
type gpt2 struct {
	b                              ml.Backend
	comm                           ml.Comm // tensor-parallel group (nil: the whole model)
	w                              *nn.Weights
	s                              nn.Scratch
	d, nh, hd, ff, vocab           int
	eps, scale                     float32
	tokEmbd, posEmbd               ml.Tensor
	outNorm, outNormB, output      ml.Tensor
	layers                         []gpt2Layer
	x, h, q, k, v, att, o, up, ffo ml.Tensor
}

func buildGPT2(f *gguf.File, o nn.Options) (*nn.Runner, error) {
	w := nn.NewWeights(f, o.Backend)
	hp := nn.Hparams{File: f, Arch: "gpt2"}
	// the learned position table bounds the context
	trained := nn.TrainedContext(f)
	if ps, err := w.Shape("position_embd.weight"); err == nil && len(ps) == 2 && (trained == 0 || ps[1] < trained) {
		trained = ps[1]
	}
	o, err := o.Normalize(trained)
	if err != nil {
		return nil, err
	}
	w.Shard = o.Shard
	if o.Progress != nil {
		w.Progress = func(done int64) { o.Progress(done, 0) }
	}
	m := &gpt2{b: o.Backend, w: w, s: nn.Scratch{B: o.Backend}}
	if o.Shard.Split() {
		m.comm = o.Shard.Comm
	}
	r, err := m.build(hp, o)
	if err != nil {
		m.Close()
		return nil, err
	}
	return r, nil
}

func (m *gpt2) build(hp nn.Hparams, o nn.Options) (*nn.Runner, error) {
	w := m.w
	layers, err := hp.Int("block_count")
	if err != nil {
		return nil, err
	}
	if m.d, err = hp.Int("embedding_length"); err != nil {
		return nil, err
	}
	if m.nh, err = hp.Int("attention.head_count"); err != nil {
		return nil, err
	}
	if m.d%m.nh != 0 {
		return nil, fmt.Errorf("metadata: gpt2.embedding_length %d is not a multiple of gpt2.attention.head_count %d", m.d, m.nh)
	}
	if kv, err := hp.IntOr("attention.head_count_kv", m.nh); err != nil || kv != m.nh {
		return nil, fmt.Errorf("metadata key gpt2.attention.head_count_kv = %d: GPT-2 needs %d (MHA) (%v)", kv, m.nh, err)
	}
	m.hd = m.d / m.nh
	if err := nn.CheckHeads("gpt2", m.nh, m.nh, o.Shard); err != nil {
		return nil, err
	}
	m.nh /= max(o.Shard.Size, 1) // this rank's heads
	eps, err := hp.FloatOr("attention.layer_norm_epsilon", 1e-5)
	if err != nil {
		return nil, err
	}
	m.eps, m.scale = float32(eps), float32(1/math.Sqrt(float64(m.hd)))
	es, err := w.Shape("token_embd.weight")
	if err != nil {
		return nil, err
	}
	if len(es) != 2 || es[0] != m.d {
		return nil, fmt.Errorf("tensor token_embd.weight has shape %v, want [%d, vocab]", es, m.d)
	}
	m.vocab = es[1]
	ps, err := w.Shape("position_embd.weight")
	if err != nil {
		return nil, err
	}
	if len(ps) != 2 || ps[0] != m.d {
		return nil, fmt.Errorf("tensor position_embd.weight has shape %v, want [%d, n_positions]", ps, m.d)
	}
	us, err := w.Shape("blk.0.ffn_up.weight")
	if err != nil {
		return nil, err
	}
	if len(us) != 2 {
		return nil, fmt.Errorf("tensor blk.0.ffn_up.weight has shape %v, want [%d, ff]", us, m.d)
	}
	m.ff = us[1]
	d, ff := m.d, m.ff
	ad := m.nh * m.hd // this rank's attention width (d unsplit)
	if m.tokEmbd, err = w.Tensor("token_embd.weight", d, m.vocab); err != nil {
		return nil, err
	}
	if m.posEmbd, err = w.Tensor("position_embd.weight", d, ps[1]); err != nil {
		return nil, err
	}
	if m.outNorm, err = w.Vector("output_norm.weight", d); err != nil {
		return nil, err
	}
	if m.outNormB, err = w.Vector("output_norm.bias", d); err != nil {
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
		var L gpt2Layer
		var qkv, qkvb ml.Tensor
		get := func(dst *ml.Tensor, name string, vector bool, shape ...int) {
			if err != nil {
				return
			}
			// this rank's part (nn.SplitOf: q, k and v by heads); the whole tensor unsplit
			*dst, err = w.Part(p+name, vector, shape...)
		}
		get(&L.attnNorm, "attn_norm.weight", true, d)
		get(&L.attnNormB, "attn_norm.bias", true, d)
		get(&qkv, "attn_qkv.weight", false, d, 3*d)
		get(&qkvb, "attn_qkv.bias", true, 3*d)
		get(&L.o, "attn_output.weight", false, d, d)
		get(&L.ob, "attn_output.bias", true, d)
		get(&L.ffnNorm, "ffn_norm.weight", true, d)
		get(&L.ffnNormB, "ffn_norm.bias", true, d)
		get(&L.up, "ffn_up.weight", false, d, ff)
		get(&L.upb, "ffn_up.bias", true, ff)
		get(&L.down, "ffn_down.weight", false, ff, d)
		get(&L.downb, "ffn_down.bias", true, d)
		if err != nil {
			return nil, err
		}
		// q, k and v are row ranges of the fused qkv weight and bias
		for j, dst := range []*ml.Tensor{&L.q, &L.k, &L.v} {
			if *dst, err = m.b.Rows(qkv, j*ad, ad); err != nil {
				return nil, fmt.Errorf("tensor %sattn_qkv.weight: %w", p, err)
			}
		}
		for j, dst := range []*ml.Tensor{&L.qb, &L.kb, &L.vb} {
			if *dst, err = m.b.Rows(qkvb, j*ad, ad); err != nil {
				return nil, fmt.Errorf("tensor %sattn_qkv.bias: %w", p, err)
			}
		}
		m.layers = append(m.layers, L)
	}
	n := o.MaxTokens
	s := &m.s
	m.x, m.h, m.o = s.Alloc(d, n), s.Alloc(d, n), s.Alloc(d, n)
	m.q, m.k, m.v, m.att = s.Alloc(ad, n), s.Alloc(ad, n), s.Alloc(ad, n), s.Alloc(ad, n)
	m.up, m.ffo = s.Alloc(ff/max(o.Shard.Size, 1), n), s.Alloc(d, n)
	if s.Err != nil {
		return nil, s.Err
	}
	return nn.Finish(o, w, m, nn.Model{Arch: "gpt2", Layers: layers, HeadDim: m.hd, KVHeads: m.nh, Width: d, Vocab: m.vocab})
}

// Hidden runs the blocks (see nn.Net).
func (m *gpt2) Hidden(st *nn.Staged) (ml.Tensor, error) {
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
	x, h, o, up, ffo := view(m.x), view(m.h), view(m.o), view(m.up), view(m.ffo)
	q2, k2, v2, att2 := view(m.q), view(m.k), view(m.v), view(m.att)
	q, k, v, att := view(m.q, m.hd, m.nh, 0), view(m.k, m.hd, m.nh, 0), view(m.v, m.hd, m.nh, 0), view(m.att, m.hd, m.nh, 0)
	if err != nil {
		return nil, err
	}
	b.Embed(x, m.tokEmbd, st.Tokens, false)
	b.Embed(x, m.posEmbd, st.Batch.Pos, true)
	attn := &ml.Attention{Scale: m.scale}
	for i := range m.layers {
		L := &m.layers[i]
		if i == 0 {
			b.LayerNorm(h, x, L.attnNorm, L.attnNormB, m.eps)
		} else {
			b.AddLayerNorm(x, h, ffo, L.attnNorm, L.attnNormB, m.eps)
		}
		b.MatMul(q2, h, L.q, L.qb)
		b.MatMul(k2, h, L.k, L.kb)
		b.MatMul(v2, h, L.v, L.vb)
		b.KVWrite(st.KV.K[i], st.KV.V[i], k, v, &st.Batch)
		b.Attend(att, q, st.KV.K[i], st.KV.V[i], &st.Batch, attn)
		b.MatMul(o, att2, L.o, L.ob) // split: this rank's heads' part, the bias on rank 0
		if m.comm != nil {
			m.comm.AllReduce(b, o)
		}
		b.AddLayerNorm(x, h, o, L.ffnNorm, L.ffnNormB, m.eps)
		b.MatMul(up, h, L.up, L.upb)
		b.GELU(up, up)
		b.MatMul(ffo, up, L.down, L.downb)
		if m.comm != nil {
			m.comm.AllReduce(b, ffo)
		}
	}
	b.Add(x, x, ffo)
	return x, b.Err()
}

// Head applies ln_f (in place on rows) and the LM head.
func (m *gpt2) Head(dst, rows ml.Tensor) error {
	m.b.LayerNorm(rows, rows, m.outNorm, m.outNormB, m.eps)
	m.b.MatMul(dst, rows, m.output, nil)
	return m.b.Err()
}

func (m *gpt2) Close() error {
	m.s.Free()
	m.w.Close()
	return nil
}
