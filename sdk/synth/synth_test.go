package synth_test

import (
	"bytes"
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/synth"
	"github.com/llama-orch/orch/sdk/tokenizer"
)

func small(size string) bool { return strings.HasPrefix(size, "tiny") || size == "small" }

// TestRoundTrip writes every tiny and small preset and checks the file
// against the plan: tensor names, shapes, dtypes, key hyperparameters and
// the tokenizer.
func TestRoundTrip(t *testing.T) {
	for _, arch := range synth.Archs() {
		for _, size := range synth.Sizes(arch) {
			if !small(size) {
				continue
			}
			t.Run(arch+"/"+size, func(t *testing.T) {
				if size == "small" && testing.Short() {
					t.Skip("small presets in -short mode")
				}
				opts := synth.Options{Arch: arch, Size: size, Seed: 7}
				plan, err := synth.NewPlan(opts)
				require.NoError(t, err)
				if strings.HasPrefix(size, "tiny") {
					assert.Less(t, plan.Bytes, int64(3<<20), "tiny presets stay under 3 MB")
					assert.GreaterOrEqual(t, plan.Config.Layers, 2)
					assert.GreaterOrEqual(t, plan.Config.HeadDim, 16)
				}
				path := filepath.Join(t.TempDir(), "m.gguf")
				var last, total int64
				require.NoError(t, synth.Write(path, opts, func(d, tot int64) { last, total = d, tot }))
				assert.Equal(t, plan.Bytes, total)
				assert.Equal(t, total, last)
				st, err := os.Stat(path)
				require.NoError(t, err)
				assert.Equal(t, plan.Bytes, st.Size())

				f, err := gguf.Open(path)
				require.NoError(t, err)
				defer f.Close()
				assert.Equal(t, arch, f.Architecture())
				require.Len(t, f.Tensors, len(plan.Tensors))
				for i, s := range plan.Tensors {
					ti := f.Tensors[i]
					assert.Equal(t, s.Name, ti.Name)
					assert.Equal(t, s.Shape, ti.Shape, s.Name)
					assert.Equal(t, s.Type, ti.Type, s.Name)
				}
				c := plan.Config
				n, _ := f.ArchUint("block_count")
				assert.EqualValues(t, c.Layers, n)
				n, _ = f.ArchUint("embedding_length")
				assert.EqualValues(t, c.Embd, n)
				n, _ = f.ArchUint("attention.head_count")
				assert.EqualValues(t, c.Heads, n)
				n, _ = f.ArchUint("context_length")
				assert.EqualValues(t, c.Context, n)
				emb, ok := f.Tensor("token_embd.weight")
				require.True(t, ok)
				assert.EqualValues(t, c.VocabSize, emb.Shape[1])
				toks, ok := f.Strings("tokenizer.ggml.tokens")
				require.True(t, ok)
				assert.Len(t, toks, c.VocabSize)
				types, ok := f.Ints("tokenizer.ggml.token_type")
				require.True(t, ok)
				assert.Len(t, types, c.VocabSize)
				for _, k := range []string{"tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"} {
					_, ok := f.Get(k)
					assert.True(t, ok, k)
				}
				switch arch {
				case synth.ArchGPTOSS:
					for _, k := range []string{"expert_count", "expert_used_count", "attention.sliding_window", "expert_feed_forward_length", "attention.head_count_kv", "rope.freq_base", "rope.scaling.factor", "rope.scaling.original_context_length"} {
						_, ok := f.Get("gpt-oss." + k)
						assert.True(t, ok, k)
					}
					typ, _ := f.String("gpt-oss.rope.scaling.type")
					assert.Equal(t, "yarn", typ)
					w, _ := f.ArchUint("attention.sliding_window")
					if size == "tiny-swa" {
						assert.EqualValues(t, 8, w)
					}
					ex, _ := f.Tensor("blk.0.ffn_up_exps.weight")
					assert.Equal(t, gguf.TypeMXFP4, ex.Type)
					q, _ := f.Tensor("blk.1.attn_q.weight")
					assert.Equal(t, gguf.TypeQ8_0, q.Type)
					sinks, _ := f.Tensor("blk.1.attn_sinks.weight")
					assert.Equal(t, []int64{int64(c.Heads)}, sinks.Shape)
					assert.GreaterOrEqual(t, c.Experts, 4)
					assert.GreaterOrEqual(t, c.ExpertsUsed, 2)
				case synth.ArchLlama:
					n, _ := f.ArchUint("rope.dimension_count")
					assert.EqualValues(t, c.HeadDim, n)
				}
				// every F32 tensor is finite; norms are near 1
				for i := range f.Tensors {
					ti := &f.Tensors[i]
					if ti.Type != gguf.TypeF32 {
						continue
					}
					d, err := f.Data(ti)
					require.NoError(t, err)
					for k := 0; k < len(d); k += 4 {
						v := math.Float32frombits(binary.LittleEndian.Uint32(d[k:]))
						require.False(t, math.IsNaN(float64(v)) || math.IsInf(float64(v), 0), ti.Name)
						if strings.HasSuffix(ti.Name, "norm.weight") {
							require.InDelta(t, 1, v, 0.2, ti.Name)
						}
					}
				}
				if size == "small" {
					return // real vocabularies: sdk/tokenizer tests them against references
				}
				// the tokenizer of the file round-trips text
				tok, err := tokenizer.FromGGUF(f)
				require.NoError(t, err)
				text := "The river was high and fast, and 42 children swam near the bridge."
				ids := tok.Encode(text, tokenizer.EncodeOptions{})
				assert.Less(t, len(ids), len(text), "merges shorten the text")
				assert.Equal(t, text, strings.TrimPrefix(tok.Decode(ids), " "))
			})
		}
	}
}

func TestDeterministic(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, seed uint64, workers int) []byte {
		p := filepath.Join(dir, name)
		require.NoError(t, synth.Write(p, synth.Options{Arch: "gpt-oss", Size: "tiny", Seed: seed, Workers: workers}, nil))
		b, err := os.ReadFile(p)
		require.NoError(t, err)
		return b
	}
	a := write("a", 1, 1)
	b := write("b", 1, 4)
	c := write("c", 2, 0)
	assert.True(t, bytes.Equal(a, b), "same seed, different worker counts -> same bytes")
	assert.False(t, bytes.Equal(a, c), "different seeds -> different weights")
	assert.Equal(t, len(a), len(c))
}

// TestFullSizePlans checks the full-size presets' shapes and byte sizes
// without writing them.
func TestFullSizePlans(t *testing.T) {
	p, err := synth.NewPlan(synth.Options{Arch: "gpt-oss", Size: "20b"})
	require.NoError(t, err)
	c := p.Config
	assert.Equal(t, 24, c.Layers)
	assert.Equal(t, 2880, c.Embd)
	assert.Equal(t, 201088, c.VocabSize)
	// llama.cpp's gpt-oss-20b MXFP4 file is 11.27 GiB
	assert.InDelta(t, 11.27, float64(p.Bytes)/(1<<30), 0.01)
	byName := map[string]synth.TensorSpec{}
	for _, s := range p.Tensors {
		byName[s.Name] = s
	}
	e := byName["blk.23.ffn_down_exps.weight"]
	assert.Equal(t, []int64{2880, 2880, 32}, e.Shape)
	assert.Equal(t, gguf.TypeMXFP4, e.Type)
	assert.EqualValues(t, 2880*2880*32/32*17, e.Bytes())
	q := byName["blk.0.attn_q.weight"]
	assert.Equal(t, []int64{2880, 4096}, q.Shape)
	assert.Equal(t, gguf.TypeQ8_0, q.Type)
	k := byName["blk.0.attn_k.weight"]
	assert.Equal(t, []int64{2880, 512}, k.Shape)
	assert.Equal(t, gguf.TypeF32, byName["blk.0.attn_sinks.weight"].Type)
	assert.Equal(t, gguf.TypeQ8_0, byName["token_embd.weight"].Type)
	assert.Equal(t, []int64{2880, 201088}, byName["output.weight"].Shape)
	assert.Len(t, p.Tensors, 24*19+3)

	p, err = synth.NewPlan(synth.Options{Arch: "llama", Size: "llama3-8b"})
	require.NoError(t, err)
	assert.InDelta(t, 7.95, float64(p.Bytes)/(1<<30), 0.01)
	assert.InDelta(t, 8.03e9, float64(p.Params), 0.01e9)

	p, err = synth.NewPlan(synth.Options{Arch: "gpt2", Size: "124m"})
	require.NoError(t, err)
	assert.Equal(t, 50257, p.Config.VocabSize)
	// 124M parameters + the tied output copy llama.cpp's converter writes
	assert.InDelta(t, 124.4e6+50257*768, float64(p.Params), 0.2e6)
}

func TestVocabs(t *testing.T) {
	toks, types, merges, err := synth.VocabO200kHarmony()
	require.NoError(t, err)
	require.Len(t, toks, 201088)
	require.Len(t, types, 201088)
	assert.Equal(t, "<|start|>", toks[200006])
	assert.Equal(t, "<|message|>", toks[200008])
	assert.Equal(t, "<|return|>", toks[200002])
	assert.Equal(t, synth.TokenControl, types[200006])
	assert.Equal(t, synth.TokenNormal, types[1000])
	// nearly every multi-byte token yields one merge
	assert.Greater(t, len(merges), 199000)

	toks, _, merges, err = synth.VocabLlama3()
	require.NoError(t, err)
	require.Len(t, toks, 128256)
	assert.Equal(t, "<|begin_of_text|>", toks[128000])
	assert.Equal(t, "<|eot_id|>", toks[128009])
	assert.Equal(t, "<|reserved_special_token_0|>", toks[128002])
	assert.Equal(t, "<|reserved_special_token_247|>", toks[128255])
	assert.Greater(t, len(merges), 99000)

	toks, _, merges, err = synth.VocabR50k()
	require.NoError(t, err)
	assert.Len(t, toks, 50257)
	assert.Equal(t, "<|endoftext|>", toks[50256])
	assert.Equal(t, "Ġthe", toks[262])  // GPT-2's " the"
	assert.Equal(t, 50000, len(merges)) // GPT-2 has exactly 50000 merges
	assert.Equal(t, "Ġ t", merges[0])
}

func TestBadOptions(t *testing.T) {
	_, err := synth.NewPlan(synth.Options{Arch: "bert", Size: "tiny"})
	assert.ErrorContains(t, err, `unknown architecture "bert"`)
	_, err = synth.NewPlan(synth.Options{Arch: "gpt2", Size: "huge"})
	assert.ErrorContains(t, err, `unknown gpt2 size "huge"`)
	c, err := synth.Preset("llama", "tiny")
	require.NoError(t, err)
	c.Embd = 40 // not a multiple of the Q8_0 block
	_, err = synth.NewPlan(synth.Options{Config: &c})
	assert.ErrorContains(t, err, "block size")
	c.Embd, c.MatType = 64, gguf.TypeQ4_1
	err = synth.Write(filepath.Join(t.TempDir(), "x.gguf"), synth.Options{Config: &c}, nil)
	assert.ErrorContains(t, err, "cannot generate Q4_1")
}

func TestQ8NoMinus128(t *testing.T) {
	c, err := synth.Preset("llama", "tiny")
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "m.gguf")
	require.NoError(t, synth.Write(path, synth.Options{Config: &c, Seed: 5}, nil))
	f, err := gguf.Open(path)
	require.NoError(t, err)
	defer f.Close()
	ti, _ := f.Tensor("token_embd.weight")
	require.Equal(t, gguf.TypeQ8_0, ti.Type)
	d, err := f.Data(ti)
	require.NoError(t, err)
	hist := map[int8]int{}
	for o := 0; o < len(d); o += 34 {
		for _, q := range d[o+2 : o+34] {
			hist[int8(q)]++
		}
	}
	assert.Zero(t, hist[-128])
	assert.Greater(t, hist[-127], 0)
	assert.Greater(t, hist[127], 0)
	assert.Greater(t, hist[0], 0)
}

// TestWeightScales dequantizes one tensor of each generated type and checks
// that its standard deviation is the one Tensors asks for.
func TestWeightScales(t *testing.T) {
	dir := t.TempDir()
	check := func(arch, size, name string) {
		plan, err := synth.NewPlan(synth.Options{Arch: arch, Size: size, Seed: 9})
		require.NoError(t, err)
		var spec synth.TensorSpec
		for _, s := range plan.Tensors {
			if s.Name == name {
				spec = s
			}
		}
		require.Equal(t, name, spec.Name)
		path := filepath.Join(dir, arch+size+".gguf")
		require.NoError(t, synth.Write(path, synth.Options{Arch: arch, Size: size, Seed: 9}, nil))
		f, err := gguf.Open(path)
		require.NoError(t, err)
		defer f.Close()
		ti, _ := f.Tensor(name)
		d, err := f.Data(ti)
		require.NoError(t, err)
		var vals []float64
		le := binary.LittleEndian
		switch ti.Type {
		case gguf.TypeF32:
			for o := 0; o < len(d); o += 4 {
				vals = append(vals, float64(math.Float32frombits(le.Uint32(d[o:]))))
			}
		case gguf.TypeQ8_0:
			for o := 0; o < len(d); o += 34 {
				sc := halfToFloat(le.Uint16(d[o:]))
				for _, q := range d[o+2 : o+34] {
					vals = append(vals, sc*float64(int8(q)))
				}
			}
		case gguf.TypeMXFP4:
			e2m1 := []float64{0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6}
			for o := 0; o < len(d); o += 17 {
				sc := math.Ldexp(1, int(d[o])-127)
				for _, q := range d[o+1 : o+17] {
					vals = append(vals, sc*e2m1[q&15], sc*e2m1[q>>4])
				}
			}
		}
		require.EqualValues(t, spec.Elements(), len(vals))
		var sum, sq float64
		for _, v := range vals {
			sum += v
			sq += v * v
		}
		n := float64(len(vals))
		mean := sum / n
		std := math.Sqrt(sq/n - mean*mean)
		tol := 0.1 // MXFP4 rounds the scale to a power of two: up to ~41% off
		if ti.Type == gguf.TypeMXFP4 {
			tol = 0.45
		}
		assert.InEpsilon(t, spec.Std, std, tol, "%s %s", name, ti.Type)
		assert.InDelta(t, 0, mean, 4*spec.Std/math.Sqrt(n)+1e-3, name)
	}
	check("gpt2", "tiny", "blk.0.attn_qkv.weight")
	check("llama", "tiny", "blk.1.ffn_down.weight")
	check("gpt-oss", "tiny", "blk.0.ffn_up_exps.weight")
}

func halfToFloat(h uint16) float64 {
	e := int(h>>10) & 0x1f
	m := float64(h & 0x3ff)
	var v float64
	switch e {
	case 0:
		v = math.Ldexp(m, -24)
	default:
		v = math.Ldexp(1+m/1024, e-15)
	}
	if h&0x8000 != 0 {
		v = -v
	}
	return v
}

func TestRopeFreqs(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l.gguf")
	require.NoError(t, synth.Write(path, synth.Options{Arch: "llama", Size: "tiny"}, nil))
	f, err := gguf.Open(path)
	require.NoError(t, err)
	defer f.Close()
	ti, ok := f.Tensor("rope_freqs.weight")
	require.True(t, ok)
	assert.Equal(t, []int64{8}, ti.Shape) // head_dim 16 / 2
	d, err := f.Data(ti)
	require.NoError(t, err)
	var fr []float32
	for o := 0; o < len(d); o += 4 {
		fr = append(fr, math.Float32frombits(binary.LittleEndian.Uint32(d[o:])))
	}
	assert.Equal(t, float32(1), fr[0], "high frequencies are not scaled")
	assert.Equal(t, float32(8), fr[len(fr)-1], "low frequencies are divided by the factor 8")
	for i := 1; i < len(fr); i++ {
		assert.GreaterOrEqual(t, fr[i], fr[i-1])
	}
	_, ok = func() (*gguf.TensorInfo, bool) {
		p := filepath.Join(t.TempDir(), "l2.gguf")
		require.NoError(t, synth.Write(p, synth.Options{Arch: "llama", Size: "tiny-llama2"}, nil))
		g, err := gguf.Open(p)
		require.NoError(t, err)
		defer g.Close()
		m, _ := g.String("tokenizer.ggml.model")
		assert.Equal(t, "llama", m)
		sc, ok := g.Floats("tokenizer.ggml.scores")
		assert.True(t, ok)
		assert.NotEmpty(t, sc)
		return g.Tensor("rope_freqs.weight")
	}()
	assert.False(t, ok, "Llama 2 has no rope_freqs")
}
