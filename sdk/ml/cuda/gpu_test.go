//go:build gpu

// GPU test suite: every op of the CUDA backend against the CPU backend (the
// reference) on fresh random inputs each run, with CUDA outputs poisoned
// (NaN) first and every element checked. Built here with
//   go test -c -tags gpu -o bin/cuda-gpu.test ./sdk/ml/cuda
// and run on the GPU machine by cuda/scripts/gpu-check.sh.

package cuda

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
)

var (
	gpu  *Backend
	ref  *cpu.Backend
	seed uint64
)

func TestMain(m *testing.M) {
	var err error
	gpu, err = New(0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "cuda gpu tests: no CUDA backend:", err)
		os.Exit(1)
	}
	ref = cpu.New(0)
	seed = uint64(time.Now().UnixNano())
	fmt.Fprintf(os.Stderr, "cuda gpu tests on %s (cc %d, %s), seed %d\n", gpu.DeviceName(), gpu.ComputeCapability(), gpu.LibraryPath(), seed)
	code := m.Run()
	gpu.Close()
	os.Exit(code)
}

func newRNG(t *testing.T) *rand.Rand {
	t.Logf("seed %d", seed)
	return rand.New(rand.NewPCG(seed, uint64(len(t.Name()))))
}

func randF32(r *rand.Rand, n int, scale float32) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(r.NormFloat64()) * scale
	}
	return v
}

func f32bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, f := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(f))
	}
	return b
}

func putHalf(b []byte, f float32) { binary.LittleEndian.PutUint16(b, ml.FloatToHalf(f)) }

// randWeight returns rows rows of k random elements of dt in GGUF layout,
// with scales that keep values O(1).
func randWeight(r *rand.Rand, dt ml.DType, k, rows int) []byte {
	rb, err := dt.RowBytes(k)
	if err != nil {
		panic(err)
	}
	b := make([]byte, rb*rows)
	switch dt {
	case ml.F32:
		copy(b, f32bytes(randF32(r, k*rows, 1)))
		return b
	case ml.F16:
		for i := 0; i < k*rows; i++ {
			putHalf(b[2*i:], float32(r.NormFloat64()))
		}
		return b
	case ml.BF16:
		for i := 0; i < k*rows; i++ {
			binary.LittleEndian.PutUint16(b[2*i:], uint16(math.Float32bits(float32(r.NormFloat64()))>>16))
		}
		return b
	}
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	for i := len(b) &^ 7; i < len(b); i++ {
		b[i] = byte(r.IntN(256))
	}
	bb := dt.BlockBytes()
	for off := 0; off < len(b); off += bb {
		blk := b[off : off+bb]
		switch dt {
		case ml.Q8_0:
			putHalf(blk, 0.01+0.02*r.Float32())
		case ml.Q4_0:
			putHalf(blk, 0.05+0.2*r.Float32())
		case ml.MXFP4:
			blk[0] = byte(124 + r.IntN(5)) // 2^-3 .. 2^1
		case ml.Q4_K:
			putHalf(blk, 0.002+0.01*r.Float32())
			putHalf(blk[2:], 0.002+0.01*r.Float32())
		case ml.Q6_K:
			for j := 0; j < 16; j++ { // int8 scales
				blk[192+j] = byte(int8(r.IntN(64) - 32))
			}
			putHalf(blk[208:], 0.0005+0.002*r.Float32())
		}
	}
	return b
}

// pair makes the same tensor on both backends.
type pair struct{ g, c ml.Tensor }

func weightPair(t *testing.T, name string, dt ml.DType, shape []int, data []byte) pair {
	g, err := gpu.Weight(name, dt, shape, data)
	require.NoError(t, err)
	c, err := ref.Weight(name, dt, shape, data)
	require.NoError(t, err)
	t.Cleanup(func() { gpu.Free(g) })
	return pair{g, c}
}

func f32Pair(t *testing.T, v []float32, shape ...int) pair {
	g, err := gpu.Alloc(ml.F32, shape...)
	require.NoError(t, err)
	c, err := ref.Alloc(ml.F32, shape...)
	require.NoError(t, err)
	if v != nil {
		require.NoError(t, gpu.WriteF32(g, v))
		require.NoError(t, ref.WriteF32(c, v))
	}
	t.Cleanup(func() { gpu.Free(g) })
	return pair{g, c}
}

// randMoE returns a random MoE (router, experts, biases; gpt-oss's alpha and
// limit) on the GPU and its CPU twin with the same values.
func randMoE(t *testing.T, r *rand.Rand, dt ml.DType, d, ff, ne, topk int) (m, mc *ml.MoE) {
	m = &ml.MoE{TopK: topk, Alpha: 1.702, Limit: 7}
	c := *m
	mc = &c
	set := func(dst, dstc *ml.Tensor, p pair) { *dst, *dstc = p.g, p.c }
	set(&m.Router, &mc.Router, weightPair(t, "router", ml.F32, []int{d, ne}, randWeight(r, ml.F32, d, ne)))
	set(&m.RouterBias, &mc.RouterBias, f32Pair(t, randF32(r, ne, 1), ne))
	set(&m.Gate, &mc.Gate, weightPair(t, "gate", dt, []int{d, ff, ne}, randWeight(r, dt, d, ff*ne)))
	set(&m.Up, &mc.Up, weightPair(t, "up", dt, []int{d, ff, ne}, randWeight(r, dt, d, ff*ne)))
	set(&m.Down, &mc.Down, weightPair(t, "down", dt, []int{ff, d, ne}, randWeight(r, dt, ff, d*ne)))
	set(&m.GateBias, &mc.GateBias, f32Pair(t, randF32(r, ff*ne, 1), ff, ne))
	set(&m.UpBias, &mc.UpBias, f32Pair(t, randF32(r, ff*ne, 1), ff, ne))
	set(&m.DownBias, &mc.DownBias, f32Pair(t, randF32(r, d*ne, 1), d, ne))
	return m, mc
}

func i32Pair(t *testing.T, v []int32, shape ...int) pair {
	g, err := gpu.Alloc(ml.I32, shape...)
	require.NoError(t, err)
	c, err := ref.Alloc(ml.I32, shape...)
	require.NoError(t, err)
	require.NoError(t, gpu.WriteI32(g, v))
	require.NoError(t, ref.WriteI32(c, v))
	t.Cleanup(func() { gpu.Free(g) })
	return pair{g, c}
}

// out makes an output pair; the GPU side is poisoned with NaN.
func out(t *testing.T, shape ...int) pair {
	p := f32Pair(t, nil, shape...)
	gpu.Fill(p.g, float32(math.NaN()))
	return p
}

func readBoth(t *testing.T, p pair) (g, c []float32) {
	g = make([]float32, p.g.Len())
	c = make([]float32, p.c.Len())
	require.NoError(t, gpu.ReadF32(p.g, g))
	require.NoError(t, ref.ReadF32(p.c, c))
	require.NoError(t, gpu.Sync())
	require.NoError(t, ref.Sync())
	return
}

// Tolerances of the fp16-activation decode paths (GEMV v5/v6, MoE v3-v5), from the
// error analysis in cuda/src/dec16.cuh and its host test
// (cuda/test/dec16_test.cu): x is rounded to fp16 (relative rms ~2e-4 per
// element, unit roundoff u = 2^-11) and each half accumulates 8 products in
// fp16 (rms ~u*sqrt(8/6)); the host emulation of the kernels' exact
// arithmetic measures a relative L2 error of 4.4e-4 (MXFP4), 4.5e-4 (Q8_0)
// and 5.2e-4 (Q4_0) for one GEMV of k = 2880. One GEMV: 1.5e-3 (3x that).
// The MoE chains two GEMVs through the clamped SwiGLU: with these random
// weights the gate/up pre-activations are ~10-180 (k = 128..3200) but only
// values inside the clamp (|u| < 7) or near the sigmoid knee reach the
// output, and their absolute error is that of a typical pre-activation, so
// the relative error grows ~3-6x over one GEMV. The host emulation of MoE v3
// on TestMoE's shapes gives 1.3e-3 mean, 2.4e-3 worst over 25 draws per case
// (d=128, n=1, top-2), and 3.0e-3 on TestMoEWide's (d=ff=3200): 6e-3
// allowed (cuda/test/dec16_test.cu, `long` mode). The fp32 paths
// (ORCH_CUDA_GEMV=v1..v4, ORCH_CUDA_MOE=v1/v2) keep 1e-4.
const (
	tolF16GEMV = 1.5e-3
	tolF16MoE  = 6e-3
)

// kernelVersion is the N of ORCH_CUDA_<what>=vN, or def.
func kernelVersion(what string, def int) int {
	v := os.Getenv("ORCH_CUDA_" + what)
	if len(v) == 2 && v[0] == 'v' && v[1] >= '1' && v[1] <= '9' {
		return int(v[1] - '0')
	}
	return def
}

// gemvTol is the bound for a MatMul of n tokens with a weight of type dt
// whose row-major bytes are word multiples (wordAligned): the fp16 GEMV v5
// runs for Q8_0/Q4_0/MXFP4 at n <= 8 (as the library's dispatch; every k
// of these tests fits its shared-memory limit).
func gemvTol(dt ml.DType, n int, wordAligned bool) float64 {
	if n <= 8 && wordAligned && kernelVersion("GEMV", 5) >= 5 && (dt == ml.Q8_0 || dt == ml.Q4_0 || dt == ml.MXFP4) {
		return tolF16GEMV
	}
	return 1e-4
}

// moeTol: the fused fp16 MoE (v3 and up; v4 is the default) or the fp32
// kernels (ORCH_CUDA_MOE=v1/v2).
func moeTol() float64 {
	if kernelVersion("MOE", 4) >= 3 {
		return tolF16MoE
	}
	return 1e-4
}

// relErr is ||g-c|| / ||c||; any NaN/Inf in g fails.
func checkClose(t *testing.T, what string, p pair, tol float64) {
	t.Helper()
	g, c := readBoth(t, p)
	checkVec(t, what, g, c, tol)
}

func TestMatMul(t *testing.T) {
	r := newRNG(t)
	for _, dt := range ml.WeightDTypes {
		// 17, 33, 64: GEMV v9's token tiles (2, 5 and 8 of 8) by default, the GEMM with a GEMV pinned.
		for _, n := range []int{1, 2, 3, 8, 17, 33, 64} {
			for _, withBias := range []bool{false, true} {
				k := 512
				if withBias {
					k = 4096 // several k-tiles in the staged GEMV
				}
				name := fmt.Sprintf("%v/n=%d/bias=%v/k=%d", dt, n, withBias, k)
				t.Run(name, func(t *testing.T) {
					m := 72 + r.IntN(3)*8 + 1
					w := weightPair(t, "w", dt, []int{k, m}, randWeight(r, dt, k, m))
					x := f32Pair(t, randF32(r, k*n, 1), k, n)
					var bias pair
					if withBias {
						bias = f32Pair(t, randF32(r, m, 1), m)
					}
					y := out(t, m, n)
					gpu.MatMul(y.g, x.g, w.g, bias.g)
					ref.MatMul(y.c, x.c, w.c, bias.c)
					rb, err := dt.RowBytes(k)
					require.NoError(t, err)
					tol := gemvTol(dt, n, rb*m%4 == 0)
					if n > 8 && dt != ml.F32 {
						tol = 1e-2 // bf16 operands on the cuBLAS path (v9's GEMV: ~2e-4)
					}
					checkClose(t, name, y, tol)
				})
			}
		}
	}
}

func TestEmbed(t *testing.T) {
	r := newRNG(t)
	for _, dt := range ml.WeightDTypes {
		t.Run(dt.String(), func(t *testing.T) {
			d, vocab, n := 256, 300, 7
			tb := weightPair(t, "tok", dt, []int{d, vocab}, randWeight(r, dt, d, vocab))
			ids := make([]int32, n)
			for i := range ids {
				ids[i] = int32(r.IntN(vocab))
			}
			ids[0] = int32(vocab - 1)
			id := i32Pair(t, ids, n)
			y := out(t, d, n)
			gpu.Embed(y.g, tb.g, id.g, false)
			ref.Embed(y.c, tb.c, id.c, false)
			checkClose(t, "embed", y, 1e-6)
			gpu.Embed(y.g, tb.g, id.g, true)
			ref.Embed(y.c, tb.c, id.c, true)
			checkClose(t, "embed add", y, 1e-6)
		})
	}
}

func TestNorms(t *testing.T) {
	r := newRNG(t)
	d, n := 2880, 5
	x := f32Pair(t, randF32(r, d*n, 2), d, n)
	w := f32Pair(t, randF32(r, d, 1), d)
	bb := f32Pair(t, randF32(r, d, 1), d)
	y := out(t, d, n)
	gpu.RMSNorm(y.g, x.g, w.g, 1e-5)
	ref.RMSNorm(y.c, x.c, w.c, 1e-5)
	checkClose(t, "rmsnorm", y, 1e-5)
	gpu.LayerNorm(y.g, x.g, w.g, bb.g, 1e-5)
	ref.LayerNorm(y.c, x.c, w.c, bb.c, 1e-5)
	checkClose(t, "layernorm", y, 1e-5)
	gpu.LayerNorm(y.g, x.g, w.g, nil, 1e-5)
	ref.LayerNorm(y.c, x.c, w.c, nil, 1e-5)
	checkClose(t, "layernorm no bias", y, 1e-5)

	res := f32Pair(t, randF32(r, d*n, 1), d, n)
	gpu.AddRMSNorm(res.g, y.g, x.g, w.g, 1e-5)
	ref.AddRMSNorm(res.c, y.c, x.c, w.c, 1e-5)
	checkClose(t, "add_rmsnorm out", y, 1e-5)
	checkClose(t, "add_rmsnorm residual", res, 1e-6)
	gpu.AddLayerNorm(res.g, y.g, x.g, w.g, bb.g, 1e-5)
	ref.AddLayerNorm(res.c, y.c, x.c, w.c, bb.c, 1e-5)
	checkClose(t, "add_layernorm out", y, 1e-5)
	checkClose(t, "add_layernorm residual", res, 1e-6)
	// in place
	gpu.RMSNorm(x.g, x.g, w.g, 1e-5)
	ref.RMSNorm(x.c, x.c, w.c, 1e-5)
	checkClose(t, "rmsnorm in place", x, 1e-5)
}

func TestElementwise(t *testing.T) {
	r := newRNG(t)
	n := 10007
	a := f32Pair(t, randF32(r, n, 5), n)
	b := f32Pair(t, randF32(r, n, 5), n)
	y := out(t, n)
	gpu.Add(y.g, a.g, b.g)
	ref.Add(y.c, a.c, b.c)
	checkClose(t, "add", y, 1e-7)
	gpu.GELU(y.g, a.g)
	ref.GELU(y.c, a.c)
	checkClose(t, "gelu", y, 1e-5)
	gpu.SwiGLU(y.g, a.g, b.g)
	ref.SwiGLU(y.c, a.c, b.c)
	checkClose(t, "swiglu", y, 1e-5)
	gpu.SwiGLUOAI(y.g, a.g, b.g, 1.702, 7)
	ref.SwiGLUOAI(y.c, a.c, b.c, 1.702, 7)
	checkClose(t, "swiglu_oai", y, 1e-5)
	y2 := out(t, n)
	gpu.Copy(y2.g, a.g)
	ref.Copy(y2.c, a.c)
	checkClose(t, "copy", y2, 0)
}

func TestRoPE(t *testing.T) {
	r := newRNG(t)
	for _, mode := range []ml.RopeMode{ml.RopeNeoX, ml.RopeNormal} {
		for _, dims := range []int{64, 32} {
			name := fmt.Sprintf("mode=%d/dims=%d", mode, dims)
			t.Run(name, func(t *testing.T) {
				hd, heads, n := 64, 6, 9
				inv, scale, err := ml.YaRNInvFreq(150000, dims, ml.YaRN{Factor: 32, OrigContext: 4096})
				require.NoError(t, err)
				f := f32Pair(t, inv, dims/2)
				pos := make([]int32, n)
				for i := range pos {
					pos[i] = int32(r.IntN(131072))
				}
				p := i32Pair(t, pos, n)
				x := f32Pair(t, randF32(r, hd*heads*n, 1), hd, heads, n)
				rp := &ml.Rope{Mode: mode, Dims: dims, Scale: scale}
				rc := *rp
				rp.InvFreq, rc.InvFreq = f.g, f.c
				gpu.RoPE(x.g, p.g, rp)
				ref.RoPE(x.c, p.c, &rc)
				checkClose(t, name, x, 1e-5)
			})
		}
	}
}

// attnCase runs KVWrite + Attend on both backends over a paged cache with
// shuffled block tables, sequences mixing a prefill chunk and decodes.
func TestAttention(t *testing.T) {
	r := newRNG(t)
	type tc struct {
		hd, nh, nkv, window int
		sinks               bool
		kv                  ml.DType
		long                bool
	}
	cases := []tc{
		{64, 8, 2, 0, false, ml.F32, false}, {64, 8, 2, 0, true, ml.F32, false}, {64, 8, 1, 7, true, ml.F32, false},
		{128, 4, 4, 0, false, ml.F32, false}, {64, 8, 8, 5, false, ml.F32, false}, {256, 2, 1, 0, true, ml.F32, false},
		{64, 8, 2, 0, true, ml.F16, false}, {128, 8, 2, 6, false, ml.F16, false},
		{64, 8, 2, 0, true, ml.F32, true}, {64, 8, 2, 128, true, ml.F16, true}, {128, 4, 2, 0, false, ml.F16, true},
	}
	for _, c := range cases {
		name := fmt.Sprintf("hd=%d/h=%d/kv=%d/win=%d/sinks=%v/%v/long=%v", c.hd, c.nh, c.nkv, c.window, c.sinks, c.kv, c.long)
		t.Run(name, func(t *testing.T) {
			// Three sequences: history already cached, then new tokens (a
			// prefill chunk and decodes) that attend over it.
			hist, newT := []int{0, 9, 13}, []int{11, 1, 3}
			bs := 4
			if c.long {
				hist, newT, bs = []int{0, 700, 1500 + r.IntN(100)}, []int{3, 1, 2}, 16
			}
			maxLen := 0
			for s := range hist {
				maxLen = max(maxLen, hist[s]+newT[s])
			}
			maxBlocks := (maxLen + bs - 1) / bs
			nb := maxBlocks*len(hist) + 3
			perm := r.Perm(nb)
			blocks := make([]int32, maxBlocks*len(hist))
			for i := range blocks {
				blocks[i] = int32(perm[i])
			}
			hd, nkv, nh := c.hd, c.nkv, c.nh
			var pos, seq, slots []int32    // every position: KV write
			var qpos, qseq, qslots []int32 // new tokens: queries
			for s := range hist {
				for p := 0; p < hist[s]+newT[s]; p++ {
					sl := blocks[s*maxBlocks+p/bs]*int32(bs) + int32(p%bs)
					pos, seq, slots = append(pos, int32(p)), append(seq, int32(s)), append(slots, sl)
					if p >= hist[s] {
						qpos, qseq, qslots = append(qpos, int32(p)), append(qseq, int32(s)), append(qslots, sl)
					}
				}
			}
			n, nq := len(pos), len(qpos)
			bp := i32Pair(t, blocks, maxBlocks, len(hist))
			mkBatch := func(pos, seq, slots []int32) (*ml.Batch, *ml.Batch) {
				pp, sp, slp := i32Pair(t, pos, len(pos)), i32Pair(t, seq, len(pos)), i32Pair(t, slots, len(pos))
				return &ml.Batch{Pos: pp.g, Seq: sp.g, Slots: slp.g, Blocks: bp.g, BlockSize: bs, MaxPos: maxLen + r.IntN(3000)},
					&ml.Batch{Pos: pp.c, Seq: sp.c, Slots: slp.c, Blocks: bp.c, BlockSize: bs, MaxPos: maxLen}
			}
			bg, bc := mkBatch(pos, seq, slots)
			qbg, qbc := mkBatch(qpos, qseq, qslots)
			kc := f32Pair(t, nil, hd, nkv, bs, nb)
			vc := f32Pair(t, nil, hd, nkv, bs, nb)
			kg, vg := kc.g, vc.g
			if c.kv == ml.F16 {
				var err error
				kg, err = gpu.Alloc(ml.F16, hd, nkv, bs, nb)
				require.NoError(t, err)
				vg, err = gpu.Alloc(ml.F16, hd, nkv, bs, nb)
				require.NoError(t, err)
				t.Cleanup(func() { gpu.Free(kg); gpu.Free(vg) })
			}
			k := f32Pair(t, randF32(r, hd*nkv*n, 1), hd, nkv, n)
			v := f32Pair(t, randF32(r, hd*nkv*n, 1), hd, nkv, n)
			q := f32Pair(t, randF32(r, hd*nh*nq, 1), hd, nh, nq)
			gpu.KVWrite(kg, vg, k.g, v.g, bg)
			ref.KVWrite(kc.c, vc.c, k.c, v.c, bc)
			if c.kv == ml.F32 {
				checkClose(t, "k cache", kc, 0)
				checkClose(t, "v cache", vc, 0)
			}
			a := &ml.Attention{Scale: float32(1 / math.Sqrt(float64(hd))), Window: c.window}
			ac := *a
			if c.sinks {
				s := f32Pair(t, randF32(r, nh, 2), nh)
				a.Sinks, ac.Sinks = s.g, s.c
			}
			y := out(t, hd, nh, nq)
			gpu.Attend(y.g, q.g, kg, vg, qbg, a)
			ref.Attend(y.c, q.c, kc.c, vc.c, qbc, &ac)
			tol := 1e-5
			if c.kv == ml.F16 {
				tol = 2e-3
			}
			checkClose(t, "attend", y, tol)
		})
	}
}

func TestMoE(t *testing.T) {
	r := newRNG(t)
	for _, dt := range []ml.DType{ml.MXFP4, ml.Q8_0} {
		for _, n := range []int{1, 3, 12, 64} { // 64: MoE v13's largest step (2 passes of 16 tokens per expert)
			for _, topk := range []int{4, 2} {
				name := fmt.Sprintf("%v/n=%d/k=%d", dt, n, topk)
				t.Run(name, func(t *testing.T) {
					d, ff, ne := 128, 96, 8
					m, mc := randMoE(t, r, dt, d, ff, ne, topk)
					x := f32Pair(t, randF32(r, d*n, 1), d, n)
					y := out(t, d, n)
					gpu.MoE(y.g, x.g, m)
					ref.MoE(y.c, x.c, mc)
					checkClose(t, name, y, moeRouteTol(dt, n, topk)) // n = 64: the grouped GEMM's bf16 bound where it runs
				})
			}
		}
	}
}

// TestMoEWide runs the MoE op at widths where the fused kernels (and the
// unfused ones under ORCH_CUDA_MOE=v1) need several rounds of blocks per lane.
func TestMoEWide(t *testing.T) {
	r := newRNG(t)
	for _, n := range []int{1, 2, 24} { // 24: MoE v13 with 100-block rows (71 KB of shared gate / up tiles)
		name := fmt.Sprintf("MXFP4/n=%d", n)
		t.Run(name, func(t *testing.T) {
			d, ff, ne, topk := 3200, 3200, 3, 2
			m := &ml.MoE{TopK: topk, Alpha: 1.702, Limit: 7}
			mc := *m
			set := func(dst, dstc *ml.Tensor, p pair) { *dst, *dstc = p.g, p.c }
			set(&m.Router, &mc.Router, weightPair(t, "router", ml.F32, []int{d, ne}, randWeight(r, ml.F32, d, ne)))
			set(&m.Gate, &mc.Gate, weightPair(t, "gate", ml.MXFP4, []int{d, ff, ne}, randWeight(r, ml.MXFP4, d, ff*ne)))
			set(&m.Up, &mc.Up, weightPair(t, "up", ml.MXFP4, []int{d, ff, ne}, randWeight(r, ml.MXFP4, d, ff*ne)))
			set(&m.Down, &mc.Down, weightPair(t, "down", ml.MXFP4, []int{ff, d, ne}, randWeight(r, ml.MXFP4, ff, d*ne)))
			set(&m.DownBias, &mc.DownBias, f32Pair(t, randF32(r, d*ne, 1), d, ne))
			x := f32Pair(t, randF32(r, d*n, 1), d, n)
			y := out(t, d, n)
			gpu.MoE(y.g, x.g, m)
			ref.MoE(y.c, x.c, &mc)
			checkClose(t, name, y, moeTol())
		})
	}
}

// TestMatMulTall covers the GEMV path for very tall weights (LM head shape:
// GEMV v4 gives each warp several rows there), with a ragged last CTA.
func TestMatMulTall(t *testing.T) {
	r := newRNG(t)
	for _, dt := range []ml.DType{ml.Q8_0, ml.MXFP4, ml.Q4_0} {
		for _, c := range []struct{ n, m int }{{1, 32772}, {3, 32772}, {1, 32771}} {
			n, m := c.n, c.m // m*row bytes % 4 != 0 (32771) falls back to GEMV v3
			name := fmt.Sprintf("%v/n=%d/m=%d", dt, n, m)
			t.Run(name, func(t *testing.T) {
				k := 96
				w := weightPair(t, "w", dt, []int{k, m}, randWeight(r, dt, k, m))
				x := f32Pair(t, randF32(r, k*n, 1), k, n)
				bias := f32Pair(t, randF32(r, m, 1), m)
				y := out(t, m, n)
				gpu.MatMul(y.g, x.g, w.g, bias.g)
				ref.MatMul(y.c, x.c, w.c, bias.c)
				rb, err := dt.RowBytes(k)
				require.NoError(t, err)
				checkClose(t, name, y, gemvTol(dt, n, rb*m%4 == 0))
			})
		}
	}
}

// TestArgmax covers the split kernel (rows <= 64 of a large vocabulary: 64 slices a row, a last-CTA pick) and the
// one-CTA kernel (more rows, small vocabularies): planted maxima, ties across slices (lowest index), a row of NaN
// (0, as the CPU backend), a row of -Inf, and repeated calls (the split kernel's per-row tickets wrap).
func TestArgmax(t *testing.T) {
	nan, inf := float32(math.NaN()), float32(math.Inf(-1))
	for _, tc := range []struct{ v, n int }{{201088, 4}, {128256, 1}, {201088, 64}, {50000, 70}, {1000, 3}, {4099, 5}} {
		t.Run(fmt.Sprintf("v%d_n%d", tc.v, tc.n), func(t *testing.T) {
			r := newRNG(t)
			v, n := tc.v, tc.n
			x := randF32(r, v*n, 3)
			if n > 1 {
				x[1*v+77] = 100 // planted max
			}
			if n > 2 {
				x[2*v+v/3], x[2*v+v-1], x[2*v+v/2] = 200, 200, 200 // ties in different slices
			}
			if n > 3 {
				for i := 0; i < v; i++ {
					x[3*v+i] = nan
				}
			}
			if n > 4 {
				for i := 0; i < v; i++ {
					x[4*v+i] = inf
				}
			}
			xp := f32Pair(t, x, v, n)
			for rep := 0; rep < 3; rep++ {
				init := make([]int32, n)
				for i := range init {
					init[i] = -1
				}
				ids := i32Pair(t, init, n)
				gpu.Argmax(ids.g, xp.g)
				ref.Argmax(ids.c, xp.c)
				g, c := make([]int32, n), make([]int32, n)
				require.NoError(t, gpu.ReadI32(ids.g, g))
				require.NoError(t, ref.ReadI32(ids.c, c))
				require.Equal(t, c, g, "repeat %d", rep)
				if n > 1 {
					require.Equal(t, int32(77), g[1])
				}
				if n > 2 {
					require.Equal(t, int32(v/3), g[2], "ties: lowest index")
				}
				if n > 4 {
					require.Equal(t, int32(0), g[4], "a row of -Inf: index 0")
				}
			}
		})
	}
}

// filteredProbs: softmax(l/T), top-k, then top-p (smallest prefix by
// descending p with mass >= topP of the top-k mass), then min-p.
func filteredProbs(l []float32, temp float32, topK int, topP, minP float32) []float64 {
	v := len(l)
	mx := math.Inf(-1)
	for _, x := range l {
		mx = math.Max(mx, float64(x))
	}
	p := make([]float64, v)
	for i, x := range l {
		p[i] = math.Exp((float64(x) - mx) / float64(temp))
	}
	idx := make([]int, v)
	for i := range idx {
		idx[i] = i
	}
	for i := 1; i < v; i++ { // insertion sort by p desc
		for j := i; j > 0 && p[idx[j]] > p[idx[j-1]]; j-- {
			idx[j], idx[j-1] = idx[j-1], idx[j]
		}
	}
	keep := v
	if topK > 0 && topK < v {
		keep = topK
	}
	if topP < 1 {
		var tot, cum float64
		for _, i := range idx[:keep] {
			tot += p[i]
		}
		for j, i := range idx[:keep] {
			cum += p[i]
			if cum >= float64(topP)*tot {
				keep = j + 1
				break
			}
		}
	}
	out := make([]float64, v)
	var z float64
	for _, i := range idx[:keep] {
		if p[i] >= float64(minP) {
			out[i] = p[i]
			z += p[i]
		}
	}
	for i := range out {
		out[i] /= z
	}
	return out
}

// A step captured with Run and replayed with new inputs must equal eager
// execution of the same ops.
func TestGraphReplay(t *testing.T) {
	r := newRNG(t)
	d, vocab, n := 256, 1000, 4
	tok := weightPair(t, "tok", ml.Q8_0, []int{d, vocab}, randWeight(r, ml.Q8_0, d, vocab))
	head := weightPair(t, "head", ml.Q8_0, []int{d, vocab}, randWeight(r, ml.Q8_0, d, vocab))
	w := f32Pair(t, randF32(r, d, 1), d)
	ids := i32Pair(t, make([]int32, n), n)
	h := out(t, d, n)
	logits := out(t, vocab, n)
	am, err := gpu.Alloc(ml.I32, n)
	require.NoError(t, err)
	step := func() {
		gpu.Embed(h.g, tok.g, ids.g, false)
		gpu.RMSNorm(h.g, h.g, w.g, 1e-5)
		gpu.MatMul(logits.g, h.g, head.g, nil)
		gpu.Argmax(am, logits.g)
	}
	graphs := len(gpu.graphs) // other tests' captured graphs stay cached in the shared backend
	for it := 0; it < 3; it++ {
		in := make([]int32, n)
		for i := range in {
			in[i] = int32(r.IntN(vocab))
		}
		require.NoError(t, gpu.WriteI32(ids.g, in))
		require.NoError(t, ref.WriteI32(ids.c, in))
		gpu.Fill(logits.g, float32(math.NaN()))
		require.NoError(t, gpu.Run("graph-replay-step", step))
		ref.Embed(h.c, tok.c, ids.c, false)
		ref.RMSNorm(h.c, h.c, w.c, 1e-5)
		ref.MatMul(logits.c, h.c, head.c, nil)
		checkClose(t, fmt.Sprintf("replay %d logits", it), logits, gemvTol(ml.Q8_0, n, true))
	}
	require.Len(t, gpu.graphs, graphs+1, "one graph captured, then replayed")
}

func TestCopyBlock(t *testing.T) {
	r := newRNG(t)
	c := f32Pair(t, randF32(r, 64*2*4*6, 1), 64, 2, 4, 6)
	gpu.CopyBlock(c.g, 1, 4)
	ref.CopyBlock(c.c, 1, 4)
	checkClose(t, "copy_block", c, 0)
}

// Bad input is an error, never a crash.
func TestErrors(t *testing.T) {
	x, err := gpu.Alloc(ml.F32, 48, 2)
	require.NoError(t, err)
	w, err := gpu.Weight("w", ml.F32, []int{48, 8}, make([]byte, 48*8*4))
	require.NoError(t, err)
	y, err := gpu.Alloc(ml.F32, 8, 2)
	require.NoError(t, err)
	gpu.MatMul(y, x, w, nil) // k=48 is not a multiple of 32
	err = gpu.Sync()
	require.ErrorIs(t, err, ErrUnsupported)
	gpu.MatMul(y, y, w, nil) // shape mismatch
	require.Error(t, gpu.Sync())
	require.NoError(t, gpu.Sync(), "errors are cleared by Sync")
	_, err = gpu.Alloc(ml.F32, 1<<40)
	require.ErrorIs(t, err, ErrOutOfMemory)
}
