package cpu

import (
	"fmt"
	"math"
	"slices"

	"github.com/llama-orch/orch/sdk/ml"
)

// arg fetches an op argument as a CPU tensor of type dt (any type when dt < 0)
// and records an error when it is missing, foreign or of the wrong type.
func (b *Backend) arg(op, name string, t ml.Tensor, dt ml.DType) *tensor {
	if b.err != nil {
		return nil
	}
	ct, err := b.get(t)
	if err != nil {
		b.fail(op, "%s: %v", name, err)
		return nil
	}
	if dt != anyType && ct.dt != dt {
		b.fail(op, "%s: dtype %s, want %s", name, ct.dt, dt)
		return nil
	}
	return ct
}

const anyType = ml.DType(1 << 31)

// rows2 interprets t as [inner, rows] (all dims above the first folded).
func rows2(t *tensor) (inner, rows int) { return t.shape[0], t.n / t.shape[0] }

func (b *Backend) sameLen(op string, ts ...*tensor) bool {
	for _, t := range ts[1:] {
		if t.n != ts[0].n || t.shape[0] != ts[0].shape[0] {
			b.fail(op, "shape mismatch %v vs %v", ts[0].shape, t.shape)
			return false
		}
	}
	return true
}

// dot is the float32 inner product used by every matrix op, with a fixed
// summation order (8 partial sums) so results are reproducible.
func dot(a, x []float32) float32 {
	if useAVX && len(a) > 0 {
		return dotAVX(a, x)
	}
	x = x[:len(a)]
	var s0, s1, s2, s3, s4, s5, s6, s7 float32
	i := 0
	for ; i+8 <= len(a); i += 8 {
		s0 += a[i] * x[i]
		s1 += a[i+1] * x[i+1]
		s2 += a[i+2] * x[i+2]
		s3 += a[i+3] * x[i+3]
		s4 += a[i+4] * x[i+4]
		s5 += a[i+5] * x[i+5]
		s6 += a[i+6] * x[i+6]
		s7 += a[i+7] * x[i+7]
	}
	for ; i < len(a); i++ {
		s0 += a[i] * x[i]
	}
	return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
}

// axpy: y += a*x.
func axpy(a float32, x, y []float32) {
	y = y[:len(x)]
	for i, v := range x {
		y[i] += a * v
	}
}

func (b *Backend) Embed(dst, table, ids ml.Tensor, add bool) {
	const op = "embed"
	d := b.arg(op, "dst", dst, ml.F32)
	tb := b.arg(op, "table", table, anyType)
	id := b.arg(op, "ids", ids, ml.I32)
	if d == nil || tb == nil || id == nil {
		return
	}
	dim, vocab := rows2(tb)
	if d.shape[0] != dim || d.n != dim*id.n {
		b.fail(op, "dst %v, table %v, %d ids", d.shape, tb.shape, id.n)
		return
	}
	for _, v := range id.i32 {
		if v < 0 || int(v) >= vocab {
			b.fail(op, "id %d out of range [0,%d)", v, vocab)
			return
		}
	}
	rb, _ := tb.dt.RowBytes(dim)
	var bufs [][]float32
	if add {
		bufs = b.scratchFor(scratchEmbed, dim)
	}
	b.parallel(id.n, func(w, lo, hi int) {
		var tmp []float32
		if add {
			tmp = bufs[w]
		}
		for i := lo; i < hi; i++ {
			row := int(id.i32[i])
			out := d.f32[i*dim : (i+1)*dim]
			if add {
				ml.DequantizeRowUnchecked(tb.dt, tb.data[row*rb:(row+1)*rb], tmp)
				for j, v := range tmp {
					out[j] += v
				}
			} else {
				ml.DequantizeRowUnchecked(tb.dt, tb.data[row*rb:(row+1)*rb], out)
			}
		}
	})
}

func (b *Backend) Copy(dst, src ml.Tensor) {
	d := b.arg("copy", "dst", dst, anyType)
	s := b.arg("copy", "src", src, anyType)
	if d == nil || s == nil {
		return
	}
	if d.dt != s.dt || len(d.data) != len(s.data) {
		b.fail("copy", "%s %v into %s %v", s.dt, s.shape, d.dt, d.shape)
		return
	}
	copy(d.data, s.data)
}

func (b *Backend) Add(dst, x, y ml.Tensor) {
	const op = "add"
	d, a, c := b.arg(op, "dst", dst, ml.F32), b.arg(op, "a", x, ml.F32), b.arg(op, "b", y, ml.F32)
	if d == nil || a == nil || c == nil || !b.sameLen(op, d, a, c) {
		return
	}
	for i := range d.f32 {
		d.f32[i] = a.f32[i] + c.f32[i]
	}
}

func (b *Backend) norm(op string, res, dst, x, w, bias ml.Tensor, eps float32, layer bool) {
	d, xx, ww := b.arg(op, "dst", dst, ml.F32), b.arg(op, "x", x, ml.F32), b.arg(op, "w", w, ml.F32)
	if d == nil || xx == nil || ww == nil || !b.sameLen(op, d, xx) {
		return
	}
	var r, bb *tensor
	if res != nil {
		if r = b.arg(op, "res", res, ml.F32); r == nil || !b.sameLen(op, d, r) {
			return
		}
	}
	if bias != nil {
		if bb = b.arg(op, "b", bias, ml.F32); bb == nil {
			return
		}
	}
	dim, rows := rows2(xx)
	if ww.n != dim || (bb != nil && bb.n != dim) {
		b.fail(op, "weight %v for rows of %d", ww.shape, dim)
		return
	}
	b.parallel(rows, func(_, lo, hi int) {
		for i := lo; i < hi; i++ {
			in := xx.f32[i*dim : (i+1)*dim]
			out := d.f32[i*dim : (i+1)*dim]
			if r != nil {
				rr := r.f32[i*dim : (i+1)*dim]
				for j := range rr {
					rr[j] += in[j]
				}
				in = rr
			}
			if layer {
				layerNormRow(out, in, ww.f32, bb, eps)
			} else {
				rmsNormRow(out, in, ww.f32, eps)
			}
		}
	})
}

func rmsNormRow(out, in, w []float32, eps float32) {
	var ss float64
	for _, v := range in {
		ss += float64(v) * float64(v)
	}
	scale := float32(1 / math.Sqrt(ss/float64(len(in))+float64(eps)))
	for j, v := range in {
		out[j] = v * scale * w[j]
	}
}

func layerNormRow(out, in, w []float32, bias *tensor, eps float32) {
	var s float64
	for _, v := range in {
		s += float64(v)
	}
	mean := s / float64(len(in))
	var ss float64
	for _, v := range in {
		dv := float64(v) - mean
		ss += dv * dv
	}
	inv := 1 / math.Sqrt(ss/float64(len(in))+float64(eps))
	m32, i32 := float32(mean), float32(inv)
	for j, v := range in {
		y := (v - m32) * i32 * w[j]
		if bias != nil {
			y += bias.f32[j]
		}
		out[j] = y
	}
}

func (b *Backend) RMSNorm(dst, x, w ml.Tensor, eps float32) {
	b.norm("rms_norm", nil, dst, x, w, nil, eps, false)
}

func (b *Backend) AddRMSNorm(res, dst, x, w ml.Tensor, eps float32) {
	b.norm("add_rms_norm", res, dst, x, w, nil, eps, false)
}

func (b *Backend) LayerNorm(dst, x, w, bias ml.Tensor, eps float32) {
	b.norm("layer_norm", nil, dst, x, w, bias, eps, true)
}

func (b *Backend) AddLayerNorm(res, dst, x, w, bias ml.Tensor, eps float32) {
	b.norm("add_layer_norm", res, dst, x, w, bias, eps, true)
}

// matRows computes out[r*outStride + o - oLo] = dot(W row o, x row r) + bias[o]
// for o in [oLo, oHi) of weight w (rows of `in` elements, raw bytes wdata),
// splitting output rows over workers. x is [in, n] float32.
func (b *Backend) matRows(wdt ml.DType, wdata []byte, in, oLo, oHi int, x []float32, n int, bias []float32, out []float32, outStride int) {
	if useAVX {
		b.matRowsAVX(wdt, wdata, in, oLo, oHi, x, n, bias, out, outStride)
		return
	}
	rb, _ := wdt.RowBytes(in)
	rowsOut := oHi - oLo
	if n == 1 && hasFusedDot(wdt) {
		// decode: decode and multiply in one pass (bit-identical to the path below)
		b.parallel(rowsOut, func(_, lo, hi int) {
			xr := x[:in]
			for o := oLo + lo; o < oLo+hi; o++ {
				var bo float32
				if bias != nil {
					bo = bias[o]
				}
				out[o-oLo] = dotQuant(wdt, wdata[o*rb:(o+1)*rb], xr) + bo
			}
		})
		return
	}
	var bufs [][]float32
	if wdt != ml.F32 {
		bufs = b.scratchFor(scratchMatRows, in)
	}
	b.parallel(rowsOut, func(w, lo, hi int) {
		var buf []float32
		if bufs != nil {
			buf = bufs[w]
		}
		for o := oLo + lo; o < oLo+hi; o++ {
			raw := wdata[o*rb : (o+1)*rb]
			var wr []float32
			if wdt == ml.F32 {
				wr = f32view(raw)
			} else {
				ml.DequantizeRowUnchecked(wdt, raw, buf)
				wr = buf
			}
			var bo float32
			if bias != nil {
				bo = bias[o]
			}
			for r := 0; r < n; r++ {
				out[r*outStride+o-oLo] = dot(wr, x[r*in:(r+1)*in]) + bo
			}
		}
	})
}

func (b *Backend) MatMul(dst, x, w, bias ml.Tensor) {
	const op = "matmul"
	d, xx, ww := b.arg(op, "dst", dst, ml.F32), b.arg(op, "x", x, ml.F32), b.arg(op, "w", w, anyType)
	if d == nil || xx == nil || ww == nil {
		return
	}
	in, n := rows2(xx)
	win, out := rows2(ww)
	if win != in || d.shape[0] != out || d.n != out*n {
		b.fail(op, "x %v · w %v -> dst %v", xx.shape, ww.shape, d.shape)
		return
	}
	var bs []float32
	if bias != nil {
		bb := b.arg(op, "bias", bias, ml.F32)
		if bb == nil {
			return
		}
		if bb.n != out {
			b.fail(op, "bias %v for %d outputs", bb.shape, out)
			return
		}
		bs = bb.f32
	}
	b.matRows(ww.dt, ww.data, in, 0, out, xx.f32, n, bs, d.f32, out)
}

func (b *Backend) GELU(dst, x ml.Tensor) {
	d, xx := b.arg("gelu", "dst", dst, ml.F32), b.arg("gelu", "x", x, ml.F32)
	if d == nil || xx == nil || !b.sameLen("gelu", d, xx) {
		return
	}
	const c = 0.7978845608028654 // sqrt(2/pi)
	b.parallel(len(d.f32), func(_, lo, hi int) {
		for i := lo; i < hi; i++ {
			// 0.5·v·(1+tanh(u)) = v / (1 + exp(-2u)): one exp instead of
			// math.Tanh (GELU was a quarter of a GPT-2 prefill)
			v := float64(xx.f32[i])
			d.f32[i] = float32(v / (1 + math.Exp(-2*c*(v+0.044715*v*v*v))))
		}
	})
}

func sigmoid(x float64) float64 { return 1 / (1 + math.Exp(-x)) }

func (b *Backend) SwiGLU(dst, gate, up ml.Tensor) {
	const op = "swiglu"
	d, g, u := b.arg(op, "dst", dst, ml.F32), b.arg(op, "gate", gate, ml.F32), b.arg(op, "up", up, ml.F32)
	if d == nil || g == nil || u == nil || !b.sameLen(op, d, g, u) {
		return
	}
	for i := range d.f32 {
		gv := float64(g.f32[i])
		d.f32[i] = float32(gv*sigmoid(gv)) * u.f32[i]
	}
}

func swigluOAI(g, u, alpha, limit float32) float32 {
	g = min(g, limit)
	u = min(max(u, -limit), limit)
	glu := g * float32(sigmoid(float64(g*alpha)))
	return (u + 1) * glu
}

func (b *Backend) SwiGLUOAI(dst, gate, up ml.Tensor, alpha, limit float32) {
	const op = "swiglu_oai"
	d, g, u := b.arg(op, "dst", dst, ml.F32), b.arg(op, "gate", gate, ml.F32), b.arg(op, "up", up, ml.F32)
	if d == nil || g == nil || u == nil || !b.sameLen(op, d, g, u) {
		return
	}
	for i := range d.f32 {
		d.f32[i] = swigluOAI(g.f32[i], u.f32[i], alpha, limit)
	}
}

func (b *Backend) RoPE(x, pos ml.Tensor, r *ml.Rope) {
	const op = "rope"
	xx, p := b.arg(op, "x", x, ml.F32), b.arg(op, "pos", pos, ml.I32)
	if xx == nil || p == nil {
		return
	}
	if r == nil {
		b.fail(op, "nil parameters")
		return
	}
	f := b.arg(op, "inv_freq", r.InvFreq, ml.F32)
	if f == nil {
		return
	}
	n := p.n
	hd, heads, err := ml.RopeShape(xx.shape, n, r, f.n)
	if err != nil {
		b.fail(op, "%v", err)
		return
	}
	dims := r.Dims
	scale := r.Scale
	if scale == 0 {
		scale = 1
	}
	half := dims / 2
	bufs := b.scratchFor(scratchRoPE, 2*half)
	b.parallel(n, func(w, lo, hi int) {
		cs := bufs[w]
		for t := lo; t < hi; t++ {
			pp := float32(p.i32[t])
			for i := 0; i < half; i++ {
				ang := float64(pp * f.f32[i]) // float32 product, as transformers
				cs[2*i] = float32(math.Cos(ang)) * scale
				cs[2*i+1] = float32(math.Sin(ang)) * scale
			}
			for h := 0; h < heads; h++ {
				v := xx.f32[(t*heads+h)*hd : (t*heads+h+1)*hd]
				for i := 0; i < half; i++ {
					c, s := cs[2*i], cs[2*i+1]
					var ia, ib int
					if r.Mode == ml.RopeNeoX {
						ia, ib = i, i+half
					} else {
						ia, ib = 2*i, 2*i+1
					}
					a0, a1 := v[ia], v[ib]
					v[ia] = a0*c - a1*s
					v[ib] = a0*s + a1*c
				}
			}
		}
	})
}

// checkBatch validates the batch tensors against n tokens and a cache with
// nb blocks of bs slots, and returns them.
func (b *Backend) checkBatch(op string, bt *ml.Batch, n, nb, bs int) (pos, seq, slots, blocks *tensor, ok bool) {
	if bt == nil {
		b.fail(op, "nil batch")
		return
	}
	pos, seq = b.arg(op, "pos", bt.Pos, ml.I32), b.arg(op, "seq", bt.Seq, ml.I32)
	slots, blocks = b.arg(op, "slots", bt.Slots, ml.I32), b.arg(op, "blocks", bt.Blocks, ml.I32)
	if pos == nil || seq == nil || slots == nil || blocks == nil {
		return
	}
	if pos.n < n || seq.n < n || slots.n < n {
		b.fail(op, "batch tensors shorter than %d tokens", n)
		return
	}
	if bt.BlockSize != bs {
		b.fail(op, "batch block size %d, cache block size %d", bt.BlockSize, bs)
		return
	}
	maxBlocks, nSeq := rows2(blocks)
	for t := 0; t < n; t++ {
		p, s := int(pos.i32[t]), int(seq.i32[t])
		if p < 0 || s < 0 || s >= nSeq || p/bs >= maxBlocks {
			b.fail(op, "token %d: position %d of sequence %d outside the block table %v", t, p, s, blocks.shape)
			return
		}
		if sl := int(slots.i32[t]); sl < 0 || sl >= nb*bs {
			b.fail(op, "token %d: slot %d outside the cache of %d slots", t, sl, nb*bs)
			return
		}
	}
	for _, blk := range blocks.i32 {
		if blk < 0 || int(blk) >= nb {
			b.fail(op, "block id %d outside [0,%d)", blk, nb)
			return
		}
	}
	ok = true
	return
}

func cacheDims(c *tensor) (hd, nkv, bs, nb int, ok bool) {
	if len(c.shape) != 4 {
		return 0, 0, 0, 0, false
	}
	return c.shape[0], c.shape[1], c.shape[2], c.shape[3], true
}

func (b *Backend) KVWrite(kCache, vCache, k, v ml.Tensor, bt *ml.Batch) {
	const op = "kv_write"
	kc, vc := b.arg(op, "k_cache", kCache, ml.F32), b.arg(op, "v_cache", vCache, ml.F32)
	kk, vv := b.arg(op, "k", k, ml.F32), b.arg(op, "v", v, ml.F32)
	if kc == nil || vc == nil || kk == nil || vv == nil {
		return
	}
	hd, nkv, bs, nb, ok := cacheDims(kc)
	if !ok || !slices.Equal(kc.shape, vc.shape) {
		b.fail(op, "caches %v, %v: want equal [head_dim, kv_heads, block_size, blocks]", kc.shape, vc.shape)
		return
	}
	row := hd * nkv
	n, err := ml.KVRows(kk.shape, vv.shape, hd, nkv)
	if err != nil {
		b.fail(op, "%v", err)
		return
	}
	_, _, slots, _, ok := b.checkBatch(op, bt, n, nb, bs)
	if !ok {
		return
	}
	for t := 0; t < n; t++ {
		s := int(slots.i32[t])
		copy(kc.f32[s*row:(s+1)*row], kk.f32[t*row:(t+1)*row])
		copy(vc.f32[s*row:(s+1)*row], vv.f32[t*row:(t+1)*row])
	}
}

func (b *Backend) Attend(dst, q, kCache, vCache ml.Tensor, bt *ml.Batch, a *ml.Attention) {
	const op = "attend"
	d, qq := b.arg(op, "dst", dst, ml.F32), b.arg(op, "q", q, ml.F32)
	kc, vc := b.arg(op, "k_cache", kCache, ml.F32), b.arg(op, "v_cache", vCache, ml.F32)
	if d == nil || qq == nil || kc == nil || vc == nil {
		return
	}
	if a == nil {
		b.fail(op, "nil parameters")
		return
	}
	hd, nkv, bs, nb, ok := cacheDims(kc)
	if !ok || !slices.Equal(kc.shape, vc.shape) {
		b.fail(op, "caches %v, %v: want equal [head_dim, kv_heads, block_size, blocks]", kc.shape, vc.shape)
		return
	}
	nh, n, err := ml.AttendShape(qq.shape, d.shape, hd, nkv)
	if err != nil {
		b.fail(op, "%v", err)
		return
	}
	pos, seq, _, blocks, ok := b.checkBatch(op, bt, n, nb, bs)
	if !ok {
		return
	}
	var sinks []float32
	if a.Sinks != nil {
		st := b.arg(op, "sinks", a.Sinks, ml.F32)
		if st == nil {
			return
		}
		if st.n != nh {
			b.fail(op, "sinks %v for %d heads", st.shape, nh)
			return
		}
		sinks = st.f32
	}
	maxBlocks := blocks.shape[0]
	maxPos := 0
	for t := 0; t < n; t++ {
		maxPos = max(maxPos, int(pos.i32[t])+1)
	}
	bufs := b.scratchFor(scratchAttend, maxPos+hd)
	group := nh / nkv
	row := hd * nkv
	b.parallel(n*nh, func(w, lo, hi int) {
		buf := bufs[w]
		for th := lo; th < hi; th++ {
			t, h := th/nh, th%nh
			g := h / group
			p := int(pos.i32[t])
			tbl := blocks.i32[int(seq.i32[t])*maxBlocks:]
			first := 0
			if a.Window > 0 {
				first = max(0, p-a.Window+1)
			}
			qv := qq.f32[(t*nh+h)*hd : (t*nh+h+1)*hd]
			scores := buf[:p+1-first]
			acc := buf[maxPos : maxPos+hd]
			m := float32(math.Inf(-1))
			if sinks != nil {
				m = sinks[h]
			}
			for kp := first; kp <= p; kp++ {
				slot := int(tbl[kp/bs])*bs + kp%bs
				kv := kc.f32[slot*row+g*hd : slot*row+(g+1)*hd]
				s := dot(qv, kv) * a.Scale
				scores[kp-first] = s
				m = max(m, s)
			}
			var sum float64
			if sinks != nil {
				sum = math.Exp(float64(sinks[h] - m))
			}
			for i, s := range scores {
				e := float32(math.Exp(float64(s - m)))
				scores[i] = e
				sum += float64(e)
			}
			clear(acc)
			for kp := first; kp <= p; kp++ {
				slot := int(tbl[kp/bs])*bs + kp%bs
				axpy(scores[kp-first], vc.f32[slot*row+g*hd:slot*row+(g+1)*hd], acc)
			}
			inv := float32(1 / sum)
			out := d.f32[(t*nh+h)*hd : (t*nh+h+1)*hd]
			for i, v := range acc {
				out[i] = v * inv
			}
		}
	})
}

func (b *Backend) Argmax(dst, x ml.Tensor) {
	d, xx := b.arg("argmax", "dst", dst, ml.I32), b.arg("argmax", "x", x, ml.F32)
	if d == nil || xx == nil {
		return
	}
	v, n := rows2(xx)
	if d.n < n {
		b.fail("argmax", "dst of %d for %d rows", d.n, n)
		return
	}
	for r := 0; r < n; r++ {
		row := xx.f32[r*v : (r+1)*v]
		best := 0
		for i, val := range row {
			if val > row[best] {
				best = i
			}
		}
		d.i32[r] = int32(best)
	}
}

func (b *Backend) CopyBlock(cache ml.Tensor, dst, src int) {
	c := b.arg("copy_block", "cache", cache, anyType)
	if c == nil {
		return
	}
	nb := c.shape[len(c.shape)-1]
	if dst < 0 || src < 0 || dst >= nb || src >= nb {
		b.fail("copy_block", "blocks %d <- %d outside [0,%d)", dst, src, nb)
		return
	}
	sz := len(c.data) / nb
	copy(c.data[dst*sz:(dst+1)*sz], c.data[src*sz:(src+1)*sz])
}

// String helps debugging.
func (t *tensor) String() string { return fmt.Sprintf("cpu.Tensor(%s %v)", t.dt, t.shape) }
