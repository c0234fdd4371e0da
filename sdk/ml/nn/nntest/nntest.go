// Package nntest writes small random-weight GGUF models (gpt-oss, gpt2,
// llama) for the tests of model code. The product's generator is sdk/synth;
// this one is deliberately minimal and independent of it so the compute
// tests need no other package, can pick odd shapes (partial RoPE, GQA
// ratios, tied outputs, tiny sliding windows) and break files on purpose.
// Tensor names and metadata keys follow llama.cpp. It also holds the
// checks model packages share: consistency, goldens, memory plans, and
// tensor parallelism in one process (tp.go: an in-process Comm, SplitModel,
// CompareSplit) and across processes (tprank.go: RunSplitRanks).
package nntest

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
)

// Config describes a tiny model.
type Config struct {
	Arch           string // "gpt-oss", "gpt2", "llama"
	Layers, Width  int
	Heads, KVHeads int
	HeadDim        int // 0 = Width/Heads
	FF             int
	Vocab          int
	Context        int
	Experts, TopK  int      // gpt-oss
	Window         int      // gpt-oss sliding window (0 = none)
	Yarn           bool     // gpt-oss: YaRN factor 32, original context Context/32... (see Write)
	RopeDims       int      // llama: rope.dimension_count (0 = head dim)
	RopeFreqs      bool     // llama: write rope_freqs.weight
	Tied           bool     // no output.weight
	Biases         bool     // llama: q/k/v/o biases (optional in the architecture)
	MatType        ml.DType // attention/FFN/embedding matrices (default F32)
	ExpertType     ml.DType // gpt-oss experts (default MXFP4)
	Seed           uint64
	Skip           string // tensor name to leave out (error tests)
	Extra          map[string]any
}

// Tiny returns a small config for arch.
func Tiny(arch string) Config {
	c := Config{Arch: arch, Layers: 2, Width: 64, Heads: 4, KVHeads: 4, FF: 96, Vocab: 300, Context: 256, Seed: 1}
	switch arch {
	case "gpt-oss":
		c.Heads, c.KVHeads, c.HeadDim, c.FF = 8, 2, 16, 64
		c.Experts, c.TopK, c.Window, c.Yarn = 4, 2, 8, true
		c.MatType, c.ExpertType = ml.Q8_0, ml.MXFP4
	case "llama":
		c.Heads, c.KVHeads, c.RopeFreqs = 8, 2, true
		c.MatType = ml.Q8_0
	}
	return c
}

type writer struct {
	w   *gguf.Writer
	rng *rand.Rand
	c   Config
	err error
}

func (g *writer) set(k string, v any) { g.w.Set(g.c.Arch+"."+k, v) }

// tensor adds a tensor of dtype dt filled with random values of std `std`
// (F32 values are normal; quantized blocks get a matching scale).
func (g *writer) tensor(name string, dt ml.DType, std float64, shape ...int) {
	if g.err != nil || name == g.c.Skip {
		return
	}
	n := 1
	s64 := make([]int64, len(shape))
	for i, v := range shape {
		n *= v
		s64[i] = int64(v)
	}
	rb, err := dt.RowBytes(n)
	if err != nil {
		g.err = fmt.Errorf("%s: %w", name, err)
		return
	}
	data := make([]byte, rb)
	put16 := func(b []byte, f float32) { binary.LittleEndian.PutUint16(b, ml.FloatToHalf(f)) }
	switch dt {
	case ml.F32:
		for i := 0; i < n; i++ {
			binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(float32(g.rng.NormFloat64()*std)))
		}
	case ml.F16:
		for i := 0; i < n; i++ {
			put16(data[2*i:], float32(g.rng.NormFloat64()*std))
		}
	case ml.Q8_0:
		for b := 0; b < n/32; b++ {
			blk := data[b*34 : b*34+34]
			put16(blk, float32(std/73)) // uniform int8 has std ~73
			for j := 0; j < 32; j++ {
				blk[2+j] = byte(g.rng.IntN(256))
			}
		}
	case ml.MXFP4:
		e := 127 + int(math.Round(math.Log2(std/2.9))) // random E2M1 codes have std ~2.9
		for b := 0; b < n/32; b++ {
			blk := data[b*17 : b*17+17]
			blk[0] = byte(max(1, min(254, e)))
			for j := 1; j < 17; j++ {
				blk[j] = byte(g.rng.IntN(256))
			}
		}
	default:
		g.err = fmt.Errorf("%s: nntest cannot write %s", name, dt)
		return
	}
	g.err = g.w.AddTensor(name, gguf.Type(dt), s64, func(w io.Writer) error { _, err := w.Write(data); return err })
}

// ones adds an F32 tensor of values near 1 (norm weights).
func (g *writer) ones(name string, n int) {
	if g.err != nil || name == g.c.Skip {
		return
	}
	data := make([]byte, 4*n)
	for i := 0; i < n; i++ {
		binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(float32(1+0.1*g.rng.NormFloat64())))
	}
	g.err = g.w.AddTensor(name, gguf.TypeF32, []int64{int64(n)}, func(w io.Writer) error { _, err := w.Write(data); return err })
}

// Write writes the model into dir and returns its path.
func Write(dir string, c Config) (string, error) {
	if c.MatType == 0 && c.Arch != "gpt2" {
		c.MatType = ml.F32
	}
	if c.ExpertType == 0 {
		c.ExpertType = ml.MXFP4
	}
	if c.HeadDim == 0 {
		c.HeadDim = c.Width / c.Heads
	}
	if c.KVHeads == 0 {
		c.KVHeads = c.Heads
	}
	g := &writer{w: gguf.NewWriter(), rng: rand.New(rand.NewPCG(c.Seed, 7)), c: c}
	w := g.w
	w.Set("general.architecture", c.Arch)
	w.Set("general.name", "nntest-"+c.Arch)
	g.set("block_count", uint32(c.Layers))
	g.set("context_length", uint32(c.Context))
	g.set("embedding_length", uint32(c.Width))
	g.set("feed_forward_length", uint32(c.FF))
	g.set("attention.head_count", uint32(c.Heads))
	g.set("attention.head_count_kv", uint32(c.KVHeads))
	d, hd, V := c.Width, c.HeadDim, c.Vocab
	qd, kvd := c.Heads*hd, c.KVHeads*hd
	mt := c.MatType
	is := func(in int) float64 { return 1 / math.Sqrt(float64(in)) }
	switch c.Arch {
	case "gpt-oss":
		g.set("attention.key_length", uint32(hd))
		g.set("attention.value_length", uint32(hd))
		g.set("attention.layer_norm_rms_epsilon", float32(1e-5))
		g.set("expert_count", uint32(c.Experts))
		g.set("expert_used_count", uint32(c.TopK))
		g.set("expert_feed_forward_length", uint32(c.FF))
		g.set("rope.freq_base", float32(150000))
		if c.Window > 0 {
			g.set("attention.sliding_window", uint32(c.Window))
		}
		if c.Yarn {
			g.set("rope.scaling.type", "yarn")
			g.set("rope.scaling.factor", float32(32))
			g.set("rope.scaling.original_context_length", uint32(max(1, c.Context/32)))
		}
		g.tensor("token_embd.weight", mt, 1, d, V)
		for i := 0; i < c.Layers; i++ {
			p := fmt.Sprintf("blk.%d.", i)
			g.ones(p+"attn_norm.weight", d)
			g.tensor(p+"attn_q.weight", mt, is(d), d, qd)
			g.tensor(p+"attn_q.bias", ml.F32, 0.1, qd)
			g.tensor(p+"attn_k.weight", mt, is(d), d, kvd)
			g.tensor(p+"attn_k.bias", ml.F32, 0.1, kvd)
			g.tensor(p+"attn_v.weight", mt, is(d), d, kvd)
			g.tensor(p+"attn_v.bias", ml.F32, 0.1, kvd)
			g.tensor(p+"attn_output.weight", mt, is(qd), qd, d)
			g.tensor(p+"attn_output.bias", ml.F32, 0.1, d)
			g.tensor(p+"attn_sinks.weight", ml.F32, 1, c.Heads)
			g.ones(p+"post_attention_norm.weight", d)
			g.tensor(p+"ffn_gate_inp.weight", ml.F32, is(d), d, c.Experts)
			g.tensor(p+"ffn_gate_inp.bias", ml.F32, 0.1, c.Experts)
			g.tensor(p+"ffn_gate_exps.weight", c.ExpertType, is(d), d, c.FF, c.Experts)
			g.tensor(p+"ffn_gate_exps.bias", ml.F32, 0.1, c.FF, c.Experts)
			g.tensor(p+"ffn_up_exps.weight", c.ExpertType, is(d), d, c.FF, c.Experts)
			g.tensor(p+"ffn_up_exps.bias", ml.F32, 0.1, c.FF, c.Experts)
			g.tensor(p+"ffn_down_exps.weight", c.ExpertType, is(c.FF), c.FF, d, c.Experts)
			g.tensor(p+"ffn_down_exps.bias", ml.F32, 0.1, d, c.Experts)
		}
		g.ones("output_norm.weight", d)
	case "gpt2":
		if mt == 0 {
			mt = ml.F32
		}
		g.set("attention.layer_norm_epsilon", float32(1e-5))
		g.tensor("token_embd.weight", mt, 1, d, V)
		g.tensor("position_embd.weight", ml.F32, 0.5, d, c.Context)
		for i := 0; i < c.Layers; i++ {
			p := fmt.Sprintf("blk.%d.", i)
			g.ones(p+"attn_norm.weight", d)
			g.tensor(p+"attn_norm.bias", ml.F32, 0.1, d)
			g.tensor(p+"attn_qkv.weight", mt, is(d), d, 3*d)
			g.tensor(p+"attn_qkv.bias", ml.F32, 0.1, 3*d)
			g.tensor(p+"attn_output.weight", mt, is(d), d, d)
			g.tensor(p+"attn_output.bias", ml.F32, 0.1, d)
			g.ones(p+"ffn_norm.weight", d)
			g.tensor(p+"ffn_norm.bias", ml.F32, 0.1, d)
			g.tensor(p+"ffn_up.weight", mt, is(d), d, c.FF)
			g.tensor(p+"ffn_up.bias", ml.F32, 0.1, c.FF)
			g.tensor(p+"ffn_down.weight", mt, is(c.FF), c.FF, d)
			g.tensor(p+"ffn_down.bias", ml.F32, 0.1, d)
		}
		g.ones("output_norm.weight", d)
		g.tensor("output_norm.bias", ml.F32, 0.1, d)
	case "llama":
		g.set("attention.layer_norm_rms_epsilon", float32(1e-5))
		g.set("rope.freq_base", float32(10000))
		rd := hd
		if c.RopeDims > 0 {
			rd = c.RopeDims
			g.set("rope.dimension_count", uint32(rd))
		}
		g.tensor("token_embd.weight", mt, 1, d, V)
		if c.RopeFreqs {
			if g.err == nil {
				data := make([]byte, 4*(rd/2))
				for i := 0; i < rd/2; i++ {
					binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(1+float32(i)*0.5))
				}
				g.err = w.AddTensor("rope_freqs.weight", gguf.TypeF32, []int64{int64(rd / 2)},
					func(w io.Writer) error { _, err := w.Write(data); return err })
			}
		}
		for i := 0; i < c.Layers; i++ {
			p := fmt.Sprintf("blk.%d.", i)
			g.ones(p+"attn_norm.weight", d)
			g.tensor(p+"attn_q.weight", mt, is(d), d, qd)
			g.tensor(p+"attn_k.weight", mt, is(d), d, kvd)
			g.tensor(p+"attn_v.weight", mt, is(d), d, kvd)
			g.tensor(p+"attn_output.weight", mt, is(qd), qd, d)
			if c.Biases {
				g.tensor(p+"attn_q.bias", ml.F32, 0.1, qd)
				g.tensor(p+"attn_k.bias", ml.F32, 0.1, kvd)
				g.tensor(p+"attn_v.bias", ml.F32, 0.1, kvd)
				g.tensor(p+"attn_output.bias", ml.F32, 0.1, d)
			}
			g.ones(p+"ffn_norm.weight", d)
			g.tensor(p+"ffn_gate.weight", mt, is(d), d, c.FF)
			g.tensor(p+"ffn_up.weight", mt, is(d), d, c.FF)
			g.tensor(p+"ffn_down.weight", mt, is(c.FF), c.FF, d)
		}
		g.ones("output_norm.weight", d)
	default:
		return "", fmt.Errorf("nntest: unknown arch %q", c.Arch)
	}
	if !c.Tied {
		g.tensor("output.weight", mt, is(d), d, V)
	}
	for k, v := range c.Extra { // after the defaults: overrides them
		w.Set(k, v)
	}
	if g.err != nil {
		return "", g.err
	}
	path := filepath.Join(dir, fmt.Sprintf("%s-%d.gguf", c.Arch, c.Seed))
	if err := w.WriteFile(path, nil); err != nil {
		return "", err
	}
	return path, nil
}

// MustWrite is Write for tests (into t.TempDir()).
func MustWrite(t testing.TB, c Config) string {
	t.Helper()
	p, err := Write(t.TempDir(), c)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TinyGPU is Tiny with head dimension 64 (the smallest the CUDA attention
// kernels take).
func TinyGPU(arch string) Config {
	c := Tiny(arch)
	switch arch {
	case "gpt-oss":
		c.HeadDim = 64
	case "gpt2":
		c.Width, c.Heads, c.KVHeads, c.FF = 128, 2, 2, 256
	case "llama":
		c.Width, c.Heads, c.KVHeads, c.FF = 128, 2, 1, 192
	}
	return c
}

// HeadDim reads the attention head size of a GGUF model (0 if unknown).
func HeadDim(path string) int {
	f, err := gguf.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	arch := f.Architecture()
	if v, ok := f.Uint(arch + ".attention.key_length"); ok {
		return int(v)
	}
	heads, ok := f.Uint(arch + ".attention.head_count")
	if !ok || heads == 0 {
		return 0
	}
	if v, ok := f.Uint(arch + ".embedding_length"); ok && arch == "gpt2" {
		return int(v / heads)
	}
	if t, ok := f.Tensor("blk.0.attn_q.weight"); ok && len(t.Shape) == 2 {
		return int(uint64(t.Shape[1]) / heads)
	}
	return 0
}
