package cpu

import (
	"math"
	"unsafe"

	"github.com/llama-orch/orch/sdk/ml"
)

func f32view(b []byte) []float32 {
	if len(b) == 0 {
		return nil
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), len(b)/4)
}

// MoE computes the mixture of experts (see ml.MoE). Work is grouped by
// expert so each expert row is decoded once per step for all tokens routed
// to it; each token's k expert outputs are summed in top-k order, so the
// result does not depend on the other tokens of the batch.
func (b *Backend) MoE(dst, x ml.Tensor, m *ml.MoE) {
	const op = "moe"
	d, xx := b.arg(op, "dst", dst, ml.F32), b.arg(op, "x", x, ml.F32)
	if d == nil || xx == nil {
		return
	}
	if m == nil {
		b.fail(op, "nil weights")
		return
	}
	router := b.arg(op, "router", m.Router, anyType)
	gate := b.arg(op, "gate", m.Gate, anyType)
	up := b.arg(op, "up", m.Up, anyType)
	down := b.arg(op, "down", m.Down, anyType)
	if router == nil || gate == nil || up == nil || down == nil {
		return
	}
	md, err := ml.MoEShapes(d.shape, xx.shape, router.shape, gate.shape, up.shape, down.shape, m.TopK)
	if err != nil {
		b.fail(op, "%v", err)
		return
	}
	dim, n, ne, ff := md.Dim, md.N, md.Experts, md.FF
	bias := func(name string, t ml.Tensor, want int) ([]float32, bool) {
		if t == nil {
			return nil, true
		}
		bt := b.arg(op, name, t, ml.F32)
		if bt == nil {
			return nil, false
		}
		if bt.n != want {
			b.fail(op, "%s %v: want %d values", name, bt.shape, want)
			return nil, false
		}
		return bt.f32, true
	}
	rb, ok1 := bias("router_bias", m.RouterBias, ne)
	gb, ok2 := bias("gate_bias", m.GateBias, ff*ne)
	ub, ok3 := bias("up_bias", m.UpBias, ff*ne)
	db, ok4 := bias("down_bias", m.DownBias, dim*ne)
	if !ok1 || !ok2 || !ok3 || !ok4 {
		return
	}
	k := m.TopK

	// 1. router logits [ne, n]
	logits := make([]float32, ne*n)
	b.matRows(router.dt, router.data, dim, 0, ne, xx.f32, n, rb, logits, ne)

	// 2. top-k per token, softmax over the k
	sel := make([]int, n*k)
	wts := make([]float32, n*k)
	for t := 0; t < n; t++ {
		row := logits[t*ne : (t+1)*ne]
		s := sel[t*k : (t+1)*k]
		for j := range k {
			best := -1
			for e, v := range row {
				taken := false
				for _, p := range s[:j] {
					if p == e {
						taken = true
						break
					}
				}
				if taken {
					continue
				}
				if best < 0 || v > row[best] {
					best = e
				}
			}
			s[j] = best
		}
		mx := row[s[0]]
		var sum float64
		for j := range k {
			e := math.Exp(float64(row[s[j]] - mx))
			wts[t*k+j] = float32(e)
			sum += e
		}
		for j := range k {
			wts[t*k+j] = float32(float64(wts[t*k+j]) / sum)
		}
	}

	// 3. group (token, slot) pairs by expert
	byExpert := make([][]int, ne) // entries t*k+j
	for i, e := range sel {
		byExpert[e] = append(byExpert[e], i)
	}
	outs := make([]float32, n*k*dim) // expert output per (token, slot)
	gRb, _ := gate.dt.RowBytes(dim)
	uRb, _ := up.dt.RowBytes(dim)
	dRb, _ := down.dt.RowBytes(ff)
	for e, pairs := range byExpert {
		if len(pairs) == 0 {
			continue
		}
		np := len(pairs)
		xs := make([]float32, np*dim)
		for i, p := range pairs {
			t := p / k
			copy(xs[i*dim:(i+1)*dim], xx.f32[t*dim:(t+1)*dim])
		}
		g := make([]float32, np*ff)
		u := make([]float32, np*ff)
		var geb, ueb, deb []float32
		if gb != nil {
			geb = gb[e*ff : (e+1)*ff]
		}
		if ub != nil {
			ueb = ub[e*ff : (e+1)*ff]
		}
		if db != nil {
			deb = db[e*dim : (e+1)*dim]
		}
		b.matRows(gate.dt, gate.data[e*ff*gRb:(e+1)*ff*gRb], dim, 0, ff, xs, np, geb, g, ff)
		b.matRows(up.dt, up.data[e*ff*uRb:(e+1)*ff*uRb], dim, 0, ff, xs, np, ueb, u, ff)
		for i := range g {
			g[i] = swigluOAI(g[i], u[i], m.Alpha, m.Limit)
		}
		o := make([]float32, np*dim)
		b.matRows(down.dt, down.data[e*dim*dRb:(e+1)*dim*dRb], ff, 0, dim, g, np, deb, o, dim)
		for i, p := range pairs {
			copy(outs[p*dim:(p+1)*dim], o[i*dim:(i+1)*dim])
		}
	}

	// 4. weighted sum in top-k order
	for t := 0; t < n; t++ {
		out := d.f32[t*dim : (t+1)*dim]
		clear(out)
		for j := range k {
			axpy(wts[t*k+j], outs[(t*k+j)*dim:(t*k+j+1)*dim], out)
		}
	}
}
