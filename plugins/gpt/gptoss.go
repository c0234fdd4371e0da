package gpt

import (
	"fmt"
	"math"

	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/nn"
)

// ossLayer holds one gpt-oss block's weights.
type ossLayer struct {
	attnNorm, postNorm  ml.Tensor
	q, qb, k, kb, v, vb ml.Tensor
	o, ob, sinks        ml.Tensor
	moe                 ml.MoE
	window              int
}

// gptOSS is the gpt-oss forward pass:
//
//	x = embed(tokens)
//	per layer: h = rmsnorm(x); q,k,v = h·W + b; rope(q,k) (NeoX, YaRN);
//	           a = attention(q, K, V; sinks; window on even layers) ; x += a·Wo + bo
//	           h = rmsnorm(x); x += moe(h)
//	logits = rmsnorm(x)·Wout
type gptOSS struct {
	b                          ml.Backend
	comm                       ml.Comm // tensor-parallel group (nil: the whole model)
	w                          *nn.Weights
	s                          nn.Scratch
	d, nh, nkv, hd, vocab      int
	eps                        float32
	scale                      float32
	tokEmbd, outNorm, output   ml.Tensor
	layers                     []ossLayer
	rope                       ml.Rope
	x, h, q, k, v, att, o, moe ml.Tensor
}

func buildGPTOSS(f *gguf.File, o nn.Options) (*nn.Runner, error) {
	o, err := o.Normalize(nn.TrainedContext(f))
	if err != nil {
		return nil, err
	}
	hp := nn.Hparams{File: f, Arch: "gpt-oss"}
	w := nn.NewWeights(f, o.Backend)
	w.Shard = o.Shard
	if o.Progress != nil {
		w.Progress = func(done int64) { o.Progress(done, 0) }
	}
	m := &gptOSS{b: o.Backend, w: w, s: nn.Scratch{B: o.Backend}}
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

func (m *gptOSS) build(hp nn.Hparams, o nn.Options) (*nn.Runner, error) {
	w := m.w
	dd, err := nn.ReadDims(hp, w, false)
	if err != nil {
		return nil, err
	}
	layers := dd.Layers
	if err := nn.CheckHeads("gpt-oss", dd.Heads, dd.KVHeads, o.Shard); err != nil {
		return nil, err
	}
	// with tensor parallelism this rank's heads only (Weights.Part slices
	// the tensors given their full shapes)
	ranks := max(o.Shard.Size, 1)
	m.d, m.nh, m.nkv, m.hd, m.vocab = dd.Width, dd.Heads/ranks, dd.KVHeads/ranks, dd.HeadDim, dd.Vocab
	ne, err := hp.Int("expert_count")
	if err != nil {
		return nil, err
	}
	k, err := hp.Int("expert_used_count")
	if err != nil {
		return nil, err
	}
	if k > ne {
		return nil, fmt.Errorf("metadata key gpt-oss.expert_used_count %d exceeds expert_count %d", k, ne)
	}
	gShape, err := w.Shape("blk.0.ffn_gate_exps.weight")
	if err != nil {
		return nil, err
	}
	if len(gShape) != 3 {
		return nil, fmt.Errorf("tensor blk.0.ffn_gate_exps.weight has shape %v, want [%d, ff, %d]", gShape, m.d, ne)
	}
	ff := gShape[1]
	if v, err := hp.IntOr("expert_feed_forward_length", ff); err != nil || v != ff {
		return nil, fmt.Errorf("metadata key gpt-oss.expert_feed_forward_length = %d, tensors say %d (%v)", v, ff, err)
	}
	eps, err := hp.FloatOr("attention.layer_norm_rms_epsilon", 1e-5)
	if err != nil {
		return nil, err
	}
	m.eps = float32(eps)
	window, err := hp.IntOr("attention.sliding_window", 0)
	if err != nil {
		return nil, err
	}
	m.scale = float32(1 / math.Sqrt(float64(m.hd)))

	// RoPE: NeoX over the whole head, YaRN when the file says so.
	base, err := hp.FloatOr("rope.freq_base", 150000)
	if err != nil {
		return nil, err
	}
	dims, err := hp.IntOr("rope.dimension_count", m.hd)
	if err != nil {
		return nil, err
	}
	if dims > m.hd || dims%2 != 0 {
		return nil, fmt.Errorf("metadata key gpt-oss.rope.dimension_count = %d: must be even and <= head dim %d", dims, m.hd)
	}
	stype, err := hp.StringOr("rope.scaling.type", "none")
	if err != nil {
		return nil, err
	}
	var inv []float32
	scale := float32(1)
	switch stype {
	case "none", "":
		inv, err = ml.RopeInvFreq(base, dims, nil)
	case "yarn":
		var y ml.YaRN
		var fct, bf, bs float64
		var orig int
		if fct, err = hp.FloatOr("rope.scaling.factor", 0); err != nil {
			return nil, err
		}
		if orig, err = hp.IntOr("rope.scaling.original_context_length", 0); err != nil {
			return nil, err
		}
		if bf, err = hp.FloatOr("rope.scaling.yarn_beta_fast", 32); err != nil {
			return nil, err
		}
		if bs, err = hp.FloatOr("rope.scaling.yarn_beta_slow", 1); err != nil {
			return nil, err
		}
		y = ml.YaRN{Factor: fct, OrigContext: orig, BetaFast: bf, BetaSlow: bs, Truncate: false}
		inv, scale, err = ml.YaRNInvFreq(base, dims, y)
		if err != nil {
			err = fmt.Errorf("metadata keys gpt-oss.rope.scaling.*: %w", err)
		}
	default:
		return nil, fmt.Errorf("metadata key gpt-oss.rope.scaling.type = %q: unsupported (none, yarn)", stype)
	}
	if err != nil {
		return nil, err
	}
	invT, err := w.Upload(inv, dims/2)
	if err != nil {
		return nil, err
	}
	m.rope = ml.Rope{Mode: ml.RopeNeoX, Dims: dims, InvFreq: invT, Scale: scale}

	d, qd, kvd := m.d, m.nh*m.hd, m.nkv*m.hd
	gqd, gkvd := dd.Heads*m.hd, dd.KVHeads*m.hd // full shapes of the split tensors
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
	windows := ossWindows(layers, window)
	for i := range layers {
		p := fmt.Sprintf("blk.%d.", i)
		L := ossLayer{}
		get := func(dst *ml.Tensor, name string, vector bool, shape ...int) {
			if err != nil {
				return
			}
			// this rank's part (nn.SplitOf); the whole tensor unsplit
			*dst, err = w.Part(p+name, vector, shape...)
		}
		get(&L.attnNorm, "attn_norm.weight", true, d)
		get(&L.q, "attn_q.weight", false, d, gqd)
		get(&L.qb, "attn_q.bias", true, gqd)
		get(&L.k, "attn_k.weight", false, d, gkvd)
		get(&L.kb, "attn_k.bias", true, gkvd)
		get(&L.v, "attn_v.weight", false, d, gkvd)
		get(&L.vb, "attn_v.bias", true, gkvd)
		get(&L.o, "attn_output.weight", false, gqd, d)
		get(&L.ob, "attn_output.bias", true, d)
		get(&L.sinks, "attn_sinks.weight", true, dd.Heads)
		get(&L.postNorm, "post_attention_norm.weight", true, d)
		get(&L.moe.Router, "ffn_gate_inp.weight", false, d, ne)
		get(&L.moe.RouterBias, "ffn_gate_inp.bias", true, ne)
		get(&L.moe.Gate, "ffn_gate_exps.weight", false, d, ff, ne)
		get(&L.moe.GateBias, "ffn_gate_exps.bias", true, ff, ne)
		get(&L.moe.Up, "ffn_up_exps.weight", false, d, ff, ne)
		get(&L.moe.UpBias, "ffn_up_exps.bias", true, ff, ne)
		get(&L.moe.Down, "ffn_down_exps.weight", false, ff, d, ne)
		get(&L.moe.DownBias, "ffn_down_exps.bias", true, d, ne)
		if err != nil {
			return nil, err
		}
		L.moe.TopK, L.moe.Alpha, L.moe.Limit = k, 1.702, 7
		L.window = windows[i]
		m.layers = append(m.layers, L)
	}
	n := o.MaxTokens
	s := &m.s
	m.x, m.h, m.moe = s.Alloc(d, n), s.Alloc(d, n), s.Alloc(d, n)
	m.q, m.att = s.Alloc(qd, n), s.Alloc(qd, n)
	m.k, m.v = s.Alloc(kvd, n), s.Alloc(kvd, n)
	m.o = s.Alloc(d, n)
	if s.Err != nil {
		return nil, s.Err
	}
	return nn.Finish(o, w, m, nn.Model{Arch: "gpt-oss", Layers: layers, HeadDim: m.hd, KVHeads: m.nkv,
		Width: d, Vocab: m.vocab, SlidingWindow: window, LayerWindows: windows})
}

// ossWindows is each layer's attention window: gpt-oss alternates a
// sliding window (even layers) with full attention (odd layers). The
// window layers get their own KV pool (nn.KVGroups), bounded by the window.
func ossWindows(layers, window int) []int {
	w := make([]int, layers)
	for i := range w {
		if window > 0 && i%2 == 0 {
			w[i] = window
		}
	}
	return w
}

// Hidden runs the blocks (see nn.Net).
func (m *gptOSS) Hidden(st *nn.Staged) (ml.Tensor, error) {
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
	x, h, moe, o := view(m.x), view(m.h), view(m.moe), view(m.o)
	q, k, v := view(m.q, m.hd, m.nh, 0), view(m.k, m.hd, m.nkv, 0), view(m.v, m.hd, m.nkv, 0)
	q2, k2, v2 := view(m.q), view(m.k), view(m.v)
	att, att2 := view(m.att, m.hd, m.nh, 0), view(m.att)
	if err != nil {
		return nil, err
	}
	b.Embed(x, m.tokEmbd, st.Tokens, false)
	for i := range m.layers {
		L := &m.layers[i]
		if i == 0 {
			b.RMSNorm(h, x, L.attnNorm, m.eps)
		} else {
			b.AddRMSNorm(x, h, moe, L.attnNorm, m.eps)
		}
		b.MatMul(q2, h, L.q, L.qb)
		b.MatMul(k2, h, L.k, L.kb)
		b.MatMul(v2, h, L.v, L.vb)
		b.RoPE(q, st.Batch.Pos, &m.rope)
		b.RoPE(k, st.Batch.Pos, &m.rope)
		// each layer's KV group has its own slots and block tables
		lb := st.LayerBatch(i)
		b.KVWrite(st.KV.K[i], st.KV.V[i], k, v, lb)
		b.Attend(att, q, st.KV.K[i], st.KV.V[i], lb, &ml.Attention{Scale: m.scale, Window: L.window, Sinks: L.sinks})
		b.MatMul(o, att2, L.o, L.ob) // split: this rank's heads' part, the bias on rank 0
		if m.comm != nil {
			m.comm.AllReduce(b, o)
		}
		b.AddRMSNorm(x, h, o, L.postNorm, m.eps)
		b.MoE(moe, h, &L.moe) // split: every rank routes alike, its ff slice of each expert
		if m.comm != nil {
			m.comm.AllReduce(b, moe)
		}
	}
	// nothing reads the last layer's q, k or norm output: the CUDA backend need not rotate / write them
	nn.Discard(b, q2, k2, h)
	b.Add(x, x, moe)
	return x, b.Err()
}

// Head applies the output norm (in place on rows) and the LM head.
func (m *gptOSS) Head(dst, rows ml.Tensor) error {
	m.b.RMSNorm(rows, rows, m.outNorm, m.eps)
	m.b.MatMul(dst, rows, m.output, nil)
	return m.b.Err()
}

func (m *gptOSS) Close() error {
	m.s.Free()
	m.w.Close()
	return nil
}
