package cpu

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// randWeight returns random GGUF bytes of type dt for rows of `in` elements,
// with the block scales set to sane values, plus the decoded float64 values.
func randWeight(t *testing.T, rng *rand.Rand, dt ml.DType, in, rows int) ([]byte, []float64) {
	t.Helper()
	rb, err := dt.RowBytes(in)
	require.NoError(t, err)
	data := make([]byte, rb*rows)
	for i := range data {
		data[i] = byte(rng.IntN(256))
	}
	half := func(b []byte, f float32) { binary.LittleEndian.PutUint16(b, ml.FloatToHalf(f)) }
	bs, bb := dt.BlockSize(), dt.BlockBytes()
	nblk := len(data) / bb
	for k := 0; k < nblk; k++ {
		blk := data[k*bb : (k+1)*bb]
		switch dt {
		case ml.F32:
			binary.LittleEndian.PutUint32(blk, math.Float32bits(float32(rng.NormFloat64())))
		case ml.F16:
			half(blk, float32(rng.NormFloat64()))
		case ml.BF16:
			binary.LittleEndian.PutUint16(blk, uint16(math.Float32bits(float32(rng.NormFloat64()))>>16))
		case ml.Q8_0:
			half(blk, 0.01)
		case ml.Q4_0:
			half(blk, 0.1)
		case ml.MXFP4:
			blk[0] = byte(124 + rng.IntN(4))
		case ml.Q4_K:
			half(blk[0:], 0.02)
			half(blk[2:], 0.01)
		case ml.Q6_K:
			half(blk[208:], 0.002)
		}
	}
	_ = bs
	ref := make([]float64, in*rows)
	tmp := make([]float32, in)
	for r := 0; r < rows; r++ {
		require.NoError(t, ml.DequantizeRow(dt, data[r*rb:(r+1)*rb], tmp))
		for i, v := range tmp {
			ref[r*in+i] = float64(v)
		}
	}
	return data, ref
}

func randF32(rng *rand.Rand, n int, scale float64) []float32 {
	out := make([]float32, n)
	for i := range out {
		out[i] = float32(rng.NormFloat64() * scale)
	}
	return out
}

func tensorF32(t testing.TB, b *Backend, data []float32, shape ...int) ml.Tensor {
	t.Helper()
	x, err := b.Alloc(ml.F32, shape...)
	require.NoError(t, err)
	require.NoError(t, b.WriteF32(x, data))
	return x
}

func tensorI32(t *testing.T, b *Backend, data []int32, shape ...int) ml.Tensor {
	t.Helper()
	x, err := b.Alloc(ml.I32, shape...)
	require.NoError(t, err)
	require.NoError(t, b.WriteI32(x, data))
	return x
}

func read(t *testing.T, b *Backend, x ml.Tensor) []float32 {
	t.Helper()
	out := make([]float32, x.Len())
	require.NoError(t, b.ReadF32(x, out))
	return out
}

// relErr is ||got-want|| / ||want||.
func relErr(got []float32, want []float64) float64 {
	var num, den float64
	for i, w := range want {
		d := float64(got[i]) - w
		num += d * d
		den += w * w
	}
	if den == 0 {
		return math.Sqrt(num)
	}
	return math.Sqrt(num / den)
}

func TestMatMulAllTypes(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	b := New(3)
	for _, dt := range ml.WeightDTypes {
		t.Run(dt.String(), func(t *testing.T) {
			in, out, n := 512, 37, 5
			wb, wref := randWeight(t, rng, dt, in, out)
			w, err := b.Weight("w", dt, []int{in, out}, wb)
			require.NoError(t, err)
			xs := randF32(rng, in*n, 1)
			bias := randF32(rng, out, 1)
			x := tensorF32(t, b, xs, in, n)
			bt := tensorF32(t, b, bias, out)
			dst, err := b.Alloc(ml.F32, out, n)
			require.NoError(t, err)
			b.MatMul(dst, x, w, bt)
			require.NoError(t, b.Sync())
			want := make([]float64, out*n)
			for r := 0; r < n; r++ {
				for o := 0; o < out; o++ {
					s := float64(bias[o])
					for i := 0; i < in; i++ {
						s += wref[o*in+i] * float64(xs[r*in+i])
					}
					want[r*out+o] = s
				}
			}
			assert.Less(t, relErr(read(t, b, dst), want), 1e-6)

			// the weight read back decodes to the reference values
			got := make([]float32, in*out)
			require.NoError(t, b.ReadF32(w, got))
			assert.Zero(t, relErr(got, wref))
		})
	}
}

func TestMatMulErrors(t *testing.T) {
	b := New(2)
	x, _ := b.Alloc(ml.F32, 32, 2)
	w, _ := b.Alloc(ml.F32, 16, 4)
	dst, _ := b.Alloc(ml.F32, 4, 2)
	b.MatMul(dst, x, w, nil)
	err := b.Sync()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "matmul")
	// sticky error: a later valid op is skipped and the first error kept
	w2, _ := b.Alloc(ml.F32, 32, 4)
	b.MatMul(dst, x, w, nil)
	b.MatMul(dst, x, w2, nil)
	require.Error(t, b.Sync())
	b.MatMul(dst, x, w2, nil)
	require.NoError(t, b.Sync())

	_, err = b.Weight("bad", ml.Q8_0, []int{30, 2}, make([]byte, 68))
	assert.ErrorContains(t, err, "bad")
	_, err = b.Weight("short", ml.Q8_0, []int{32, 2}, make([]byte, 67))
	assert.ErrorContains(t, err, "short")
	_, err = b.Alloc(ml.F32, 0, 3)
	assert.Error(t, err)
}

func TestEmbed(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	b := New(2)
	d, vocab := 64, 10
	tb, ref := randWeight(t, rng, ml.Q8_0, d, vocab)
	table, err := b.Weight("tok", ml.Q8_0, []int{d, vocab}, tb)
	require.NoError(t, err)
	ids := tensorI32(t, b, []int32{3, 0, 9}, 3)
	dst, _ := b.Alloc(ml.F32, d, 3)
	b.Embed(dst, table, ids, false)
	b.Embed(dst, table, ids, true) // doubles
	require.NoError(t, b.Sync())
	got := read(t, b, dst)
	want := make([]float64, 0, 3*d)
	for _, id := range []int{3, 0, 9} {
		for i := 0; i < d; i++ {
			want = append(want, 2*ref[id*d+i])
		}
	}
	assert.Zero(t, relErr(got, want))

	bad := tensorI32(t, b, []int32{10}, 1)
	dst1, _ := b.Alloc(ml.F32, d, 1)
	b.Embed(dst1, table, bad, false)
	assert.ErrorContains(t, b.Sync(), "out of range")
}

func TestNorms(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	b := New(2)
	d, n := 48, 4
	xs, rs := randF32(rng, d*n, 2), randF32(rng, d*n, 1)
	ws, bs := randF32(rng, d, 1), randF32(rng, d, 1)
	const eps = 1e-5
	refRMS := func(x []float64) []float64 {
		out := make([]float64, len(x))
		for r := 0; r < n; r++ {
			var ss float64
			for i := 0; i < d; i++ {
				ss += x[r*d+i] * x[r*d+i]
			}
			s := 1 / math.Sqrt(ss/float64(d)+eps)
			for i := 0; i < d; i++ {
				out[r*d+i] = x[r*d+i] * s * float64(ws[i])
			}
		}
		return out
	}
	refLN := func(x []float64) []float64 {
		out := make([]float64, len(x))
		for r := 0; r < n; r++ {
			var m, v float64
			for i := 0; i < d; i++ {
				m += x[r*d+i]
			}
			m /= float64(d)
			for i := 0; i < d; i++ {
				v += (x[r*d+i] - m) * (x[r*d+i] - m)
			}
			v /= float64(d)
			for i := 0; i < d; i++ {
				out[r*d+i] = (x[r*d+i]-m)/math.Sqrt(v+eps)*float64(ws[i]) + float64(bs[i])
			}
		}
		return out
	}
	x64 := make([]float64, d*n)
	sum64 := make([]float64, d*n)
	for i := range x64 {
		x64[i] = float64(xs[i])
		sum64[i] = float64(xs[i]) + float64(rs[i])
	}
	x := tensorF32(t, b, xs, d, n)
	w := tensorF32(t, b, ws, d)
	bias := tensorF32(t, b, bs, d)
	dst, _ := b.Alloc(ml.F32, d, n)

	b.RMSNorm(dst, x, w, eps)
	require.NoError(t, b.Sync())
	assert.Less(t, relErr(read(t, b, dst), refRMS(x64)), 1e-6)

	b.LayerNorm(dst, x, w, bias, eps)
	require.NoError(t, b.Sync())
	assert.Less(t, relErr(read(t, b, dst), refLN(x64)), 1e-6)

	res := tensorF32(t, b, rs, d, n)
	b.AddRMSNorm(res, dst, x, w, eps)
	require.NoError(t, b.Sync())
	assert.Less(t, relErr(read(t, b, dst), refRMS(sum64)), 1e-6)
	assert.Less(t, relErr(read(t, b, res), sum64), 1e-7)

	res2 := tensorF32(t, b, rs, d, n)
	b.AddLayerNorm(res2, dst, x, w, bias, eps)
	require.NoError(t, b.Sync())
	assert.Less(t, relErr(read(t, b, dst), refLN(sum64)), 1e-6)

	// in place
	b.RMSNorm(x, x, w, eps)
	require.NoError(t, b.Sync())
	assert.Less(t, relErr(read(t, b, x), refRMS(x64)), 1e-6)
}

func TestActivations(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	b := New(2)
	n := 1000
	gs, us := randF32(rng, n, 4), randF32(rng, n, 4)
	g, u := tensorF32(t, b, gs, n), tensorF32(t, b, us, n)
	dst, _ := b.Alloc(ml.F32, n)
	sig := func(x float64) float64 { return 1 / (1 + math.Exp(-x)) }

	want := make([]float64, n)
	b.GELU(dst, g)
	require.NoError(t, b.Sync())
	for i, x := range gs {
		v := float64(x)
		want[i] = 0.5 * v * (1 + math.Tanh(math.Sqrt(2/math.Pi)*(v+0.044715*v*v*v)))
	}
	assert.Less(t, relErr(read(t, b, dst), want), 1e-7)

	b.SwiGLU(dst, g, u)
	require.NoError(t, b.Sync())
	for i := range gs {
		gv := float64(gs[i])
		want[i] = gv * sig(gv) * float64(us[i])
	}
	assert.Less(t, relErr(read(t, b, dst), want), 1e-6)

	b.SwiGLUOAI(dst, g, u, 1.702, 7)
	require.NoError(t, b.Sync())
	for i := range gs {
		gv := math.Min(float64(gs[i]), 7)
		uv := math.Max(math.Min(float64(us[i]), 7), -7)
		want[i] = (uv + 1) * gv * sig(1.702*gv)
	}
	assert.Less(t, relErr(read(t, b, dst), want), 1e-6)
	// the clamps matter for these inputs
	assert.Equal(t, float32(8*7*float32(sig(1.702*7))), swigluOAI(10, 9, 1.702, 7))

	b.Add(dst, g, u)
	require.NoError(t, b.Sync())
	for i := range gs {
		want[i] = float64(gs[i]) + float64(us[i])
	}
	assert.Less(t, relErr(read(t, b, dst), want), 1e-7)

	logits := tensorF32(t, b, []float32{1, 5, 5, 2, -1, -3, -0.5, -2}, 4, 2)
	am, _ := b.Alloc(ml.I32, 2)
	b.Argmax(am, logits)
	ids := make([]int32, 2)
	require.NoError(t, b.ReadI32(am, ids))
	assert.Equal(t, []int32{1, 2}, ids)
}

func TestRoPE(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	b := New(2)
	hd, heads, n, dims := 16, 3, 4, 12 // partial rotation: last 4 dims untouched
	pos := []int32{0, 5, 17, 1000}
	freqs, err := ml.RopeInvFreq(10000, dims, nil)
	require.NoError(t, err)
	ft := tensorF32(t, b, freqs, dims/2)
	pt := tensorI32(t, b, pos, n)
	for _, mode := range []ml.RopeMode{ml.RopeNormal, ml.RopeNeoX} {
		xs := randF32(rng, hd*heads*n, 1)
		x := tensorF32(t, b, xs, hd, heads, n)
		r := &ml.Rope{Mode: mode, Dims: dims, InvFreq: ft, Scale: 1.25}
		b.RoPE(x, pt, r)
		require.NoError(t, b.Sync())
		want := make([]float64, len(xs))
		for i := range xs {
			want[i] = float64(xs[i])
		}
		for tk := 0; tk < n; tk++ {
			for h := 0; h < heads; h++ {
				base := (tk*heads + h) * hd
				for i := 0; i < dims/2; i++ {
					ang := float64(pos[tk]) * float64(freqs[i])
					c, s := math.Cos(ang)*1.25, math.Sin(ang)*1.25
					ia, ib := 2*i, 2*i+1
					if mode == ml.RopeNeoX {
						ia, ib = i, i+dims/2
					}
					a0, a1 := float64(xs[base+ia]), float64(xs[base+ib])
					want[base+ia] = a0*c - a1*s
					want[base+ib] = a0*s + a1*c
				}
			}
		}
		assert.Less(t, relErr(read(t, b, x), want), 1e-6, "mode %d", mode)
	}
}

// attnRef is a naive attention over contiguous per-sequence K/V.
func attnRef(q []float32, keys, vals [][]float32, hd, nh, nkv int, pos []int, seq []int, scale float64, window int, sinks []float32) []float64 {
	n := len(pos)
	out := make([]float64, n*nh*hd)
	for t := 0; t < n; t++ {
		for h := 0; h < nh; h++ {
			g := h / (nh / nkv)
			qv := q[(t*nh+h)*hd:]
			lo := 0
			if window > 0 {
				lo = max(0, pos[t]-window+1)
			}
			var sc []float64
			m := math.Inf(-1)
			for p := lo; p <= pos[t]; p++ {
				kv := keys[seq[t]][(p*nkv+g)*hd:]
				var s float64
				for i := 0; i < hd; i++ {
					s += float64(qv[i]) * float64(kv[i])
				}
				s *= scale
				sc = append(sc, s)
				m = math.Max(m, s)
			}
			if sinks != nil {
				m = math.Max(m, float64(sinks[h]))
			}
			var den float64
			for i := range sc {
				sc[i] = math.Exp(sc[i] - m)
				den += sc[i]
			}
			if sinks != nil {
				den += math.Exp(float64(sinks[h]) - m)
			}
			for i, w := range sc {
				vv := vals[seq[t]][((lo+i)*nkv+g)*hd:]
				for j := 0; j < hd; j++ {
					out[(t*nh+h)*hd+j] += w / den * float64(vv[j])
				}
			}
		}
	}
	return out
}

func TestAttention(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	b := New(3)
	hd, nkv, bs, nb := 16, 2, 4, 16
	for _, tc := range []struct {
		name   string
		nh     int
		window int
		sinks  bool
	}{{"mha", 2, 0, false}, {"gqa", 8, 0, false}, {"gqa-window-sinks", 8, 5, true}, {"window", 4, 3, false}} {
		t.Run(tc.name, func(t *testing.T) {
			nh := tc.nh
			// two sequences: seq 0 of 11 positions, seq 1 of 6, on shuffled blocks
			lens := []int{11, 6}
			perm := rng.Perm(nb)
			blocks := [][]int32{{int32(perm[0]), int32(perm[1]), int32(perm[2])}, {int32(perm[3]), int32(perm[4]), 0}}
			keys := [][]float32{randF32(rng, 11*nkv*hd, 1), randF32(rng, 6*nkv*hd, 1)}
			vals := [][]float32{randF32(rng, 11*nkv*hd, 1), randF32(rng, 6*nkv*hd, 1)}
			// write all positions of both sequences through KVWrite
			var kAll, vAll []float32
			var posAll, seqAll, slots []int32
			for s, l := range lens {
				for p := 0; p < l; p++ {
					kAll = append(kAll, keys[s][p*nkv*hd:(p+1)*nkv*hd]...)
					vAll = append(vAll, vals[s][p*nkv*hd:(p+1)*nkv*hd]...)
					posAll = append(posAll, int32(p))
					seqAll = append(seqAll, int32(s))
					slots = append(slots, blocks[s][p/bs]*int32(bs)+int32(p%bs))
				}
			}
			ntok := len(posAll)
			kc, _ := b.Alloc(ml.F32, hd, nkv, bs, nb)
			vc, _ := b.Alloc(ml.F32, hd, nkv, bs, nb)
			tbl := append(append([]int32{}, blocks[0]...), blocks[1]...)
			batch := &ml.Batch{
				Pos: tensorI32(t, b, posAll, ntok), Seq: tensorI32(t, b, seqAll, ntok),
				Slots: tensorI32(t, b, slots, ntok), Blocks: tensorI32(t, b, tbl, 3, 2), BlockSize: bs, MaxPos: 11,
			}
			b.KVWrite(kc, vc, tensorF32(t, b, kAll, hd, nkv, ntok), tensorF32(t, b, vAll, hd, nkv, ntok), batch)
			require.NoError(t, b.Sync())

			qs := randF32(rng, ntok*nh*hd, 1)
			q := tensorF32(t, b, qs, hd, nh, ntok)
			dst, _ := b.Alloc(ml.F32, hd, nh, ntok)
			a := &ml.Attention{Scale: float32(1 / math.Sqrt(float64(hd))), Window: tc.window}
			var sinks []float32
			if tc.sinks {
				sinks = randF32(rng, nh, 1)
				a.Sinks = tensorF32(t, b, sinks, nh)
			}
			b.Attend(dst, q, kc, vc, batch, a)
			require.NoError(t, b.Sync())
			pi, si := make([]int, ntok), make([]int, ntok)
			for i := range posAll {
				pi[i], si[i] = int(posAll[i]), int(seqAll[i])
			}
			want := attnRef(qs, keys, vals, hd, nh, nkv, pi, si, 1/math.Sqrt(float64(hd)), tc.window, sinks)
			assert.Less(t, relErr(read(t, b, dst), want), 1e-6)

			// CopyBlock: copying a block onto another duplicates its contents
			b.CopyBlock(kc, perm[10], perm[0])
			require.NoError(t, b.Sync())
			all := read(t, b, kc)
			sz := hd * nkv * bs
			assert.Equal(t, all[perm[0]*sz:(perm[0]+1)*sz], all[perm[10]*sz:(perm[10]+1)*sz])

			// a position outside the block table is an error, not a panic
			badBatch := *batch
			badBatch.Pos = tensorI32(t, b, []int32{12}, 1)
			q1, _ := b.Rows(q, 0, 1)
			d1, _ := b.Rows(dst, 0, 1)
			b.Attend(d1, q1, kc, vc, &badBatch, a)
			assert.ErrorContains(t, b.Sync(), "block table")
		})
	}
}

func TestMoE(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	b := New(3)
	d, ff, ne, k, n := 64, 32, 6, 3, 5
	rw, rref := randWeight(t, rng, ml.F32, d, ne)
	gw, gref := randWeight(t, rng, ml.MXFP4, d, ff*ne)
	uw, uref := randWeight(t, rng, ml.MXFP4, d, ff*ne)
	dw, dref := randWeight(t, rng, ml.MXFP4, ff, d*ne)
	rbias, gbias, ubias, dbias := randF32(rng, ne, 1), randF32(rng, ff*ne, 1), randF32(rng, ff*ne, 1), randF32(rng, d*ne, 1)
	wt := func(name string, dt ml.DType, data []byte, shape ...int) ml.Tensor {
		x, err := b.Weight(name, dt, shape, data)
		require.NoError(t, err)
		return x
	}
	m := &ml.MoE{
		Router: wt("r", ml.F32, rw, d, ne), RouterBias: tensorF32(t, b, rbias, ne),
		Gate: wt("g", ml.MXFP4, gw, d, ff, ne), GateBias: tensorF32(t, b, gbias, ff, ne),
		Up: wt("u", ml.MXFP4, uw, d, ff, ne), UpBias: tensorF32(t, b, ubias, ff, ne),
		Down: wt("d", ml.MXFP4, dw, ff, d, ne), DownBias: tensorF32(t, b, dbias, d, ne),
		TopK: k, Alpha: 1.702, Limit: 7,
	}
	xs := randF32(rng, d*n, 0.3)
	x := tensorF32(t, b, xs, d, n)
	dst, _ := b.Alloc(ml.F32, d, n)
	b.MoE(dst, x, m)
	require.NoError(t, b.Sync())

	sig := func(v float64) float64 { return 1 / (1 + math.Exp(-v)) }
	want := make([]float64, d*n)
	for tk := 0; tk < n; tk++ {
		xv := xs[tk*d : (tk+1)*d]
		lg := make([]float64, ne)
		for e := 0; e < ne; e++ {
			s := float64(rbias[e])
			for i := 0; i < d; i++ {
				s += rref[e*d+i] * float64(xv[i])
			}
			lg[e] = s
		}
		used := map[int]bool{}
		var sel []int
		for j := 0; j < k; j++ {
			best := -1
			for e := 0; e < ne; e++ {
				if !used[e] && (best < 0 || lg[e] > lg[best]) {
					best = e
				}
			}
			used[best] = true
			sel = append(sel, best)
		}
		var den float64
		for _, e := range sel {
			den += math.Exp(lg[e] - lg[sel[0]])
		}
		for _, e := range sel {
			w := math.Exp(lg[e]-lg[sel[0]]) / den
			act := make([]float64, ff)
			for f := 0; f < ff; f++ {
				g, u := float64(gbias[e*ff+f]), float64(ubias[e*ff+f])
				for i := 0; i < d; i++ {
					g += gref[(e*ff+f)*d+i] * float64(xv[i])
					u += uref[(e*ff+f)*d+i] * float64(xv[i])
				}
				g = math.Min(g, 7)
				u = math.Max(math.Min(u, 7), -7)
				act[f] = (u + 1) * g * sig(1.702*g)
			}
			for o := 0; o < d; o++ {
				s := float64(dbias[e*d+o])
				for f := 0; f < ff; f++ {
					s += dref[(e*d+o)*ff+f] * act[f]
				}
				want[tk*d+o] += w * s
			}
		}
	}
	assert.Less(t, relErr(read(t, b, dst), want), 1e-5)

	// batch invariance: each token alone gives bit-identical rows
	all := read(t, b, dst)
	for tk := 0; tk < n; tk++ {
		x1 := tensorF32(t, b, xs[tk*d:(tk+1)*d], d, 1)
		d1, _ := b.Alloc(ml.F32, d, 1)
		b.MoE(d1, x1, m)
		require.NoError(t, b.Sync())
		assert.Equal(t, all[tk*d:(tk+1)*d], read(t, b, d1))
	}

	m.TopK = ne + 1
	b.MoE(dst, x, m)
	assert.ErrorContains(t, b.Sync(), "top-k")
}

func TestViews(t *testing.T) {
	b := New(1)
	x := tensorF32(t, b, []float32{0, 1, 2, 3, 4, 5}, 2, 3)
	r, err := b.Rows(x, 1, 2)
	require.NoError(t, err)
	assert.Equal(t, []int{2, 2}, r.Shape())
	assert.Equal(t, []float32{2, 3, 4, 5}, read(t, b, r))
	_, err = b.Rows(x, 2, 2)
	assert.Error(t, err)
	rs, err := b.Reshape(x, 3, 2)
	require.NoError(t, err)
	assert.Equal(t, []int{3, 2}, rs.Shape())
	_, err = b.Reshape(x, 4, 2)
	assert.Error(t, err)
	other := New(1)
	y, _ := other.Alloc(ml.F32, 2, 3)
	b.Add(x, x, y)
	assert.ErrorContains(t, b.Sync(), "not from this backend")
}

// The fused decode kernels equal dequantize-then-dot bit for bit.
func TestFusedDotBitIdentical(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	for _, dt := range ml.WeightDTypes {
		if !hasFusedDot(dt) {
			continue
		}
		for _, in := range []int{32, 96, 1024} {
			raw, _ := randWeight(t, rng, dt, in, 1)
			x := randF32(rng, in, 1)
			w := make([]float32, in)
			require.NoError(t, ml.DequantizeRow(dt, raw, w))
			assert.Equal(t, math.Float32bits(dot(w, x)), math.Float32bits(dotQuant(dt, raw, x)), "%s in=%d", dt, in)
		}
	}
	// odd lengths for the plain 16-bit types
	for _, dt := range []ml.DType{ml.F16, ml.BF16} {
		raw, _ := randWeight(t, rng, dt, 13, 1)
		x := randF32(rng, 13, 1)
		w := make([]float32, 13)
		require.NoError(t, ml.DequantizeRow(dt, raw, w))
		assert.Equal(t, dot(w, x), dotQuant(dt, raw, x))
	}
}

// A single-token MatMul (fused path) equals the same row inside a batch.
func TestMatMulBatchInvariant(t *testing.T) {
	rng := rand.New(rand.NewPCG(23, 24))
	b := New(2)
	for _, dt := range ml.WeightDTypes {
		in, out, n := 256, 9, 3
		wb, _ := randWeight(t, rng, dt, in, out)
		w, err := b.Weight("w", dt, []int{in, out}, wb)
		require.NoError(t, err)
		xs := randF32(rng, in*n, 1)
		x := tensorF32(t, b, xs, in, n)
		all, _ := b.Alloc(ml.F32, out, n)
		b.MatMul(all, x, w, nil)
		got := read(t, b, all)
		for r := 0; r < n; r++ {
			x1 := tensorF32(t, b, xs[r*in:(r+1)*in], in, 1)
			one, _ := b.Alloc(ml.F32, out, 1)
			b.MatMul(one, x1, w, nil)
			assert.Equal(t, got[r*out:(r+1)*out], read(t, b, one), "%s row %d", dt, r)
		}
		require.NoError(t, b.Sync())
	}
}
