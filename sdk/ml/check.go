package ml

import (
	"errors"
	"fmt"
)

// This file holds the argument checks of ops that both backends make the
// same way, so that the CPU reference and the CUDA backend accept and refuse
// the same calls. Backends prefix the errors with their name and the op.

func numelOf(shape []int) int {
	n := 1
	for _, d := range shape {
		n *= d
	}
	return n
}

// RopeShape checks RoPE's x shape [head_dim, heads, n] against nPos positions
// and r's Dims against the freqs frequencies of r.InvFreq (r is not nil). It
// returns the head dimension and the heads per token.
func RopeShape(x []int, nPos int, r *Rope, freqs int) (headDim, heads int, err error) {
	if len(x) < 2 {
		return 0, 0, fmt.Errorf("x %v: want [head_dim, heads, n]", x)
	}
	headDim = x[0]
	heads = numelOf(x) / headDim
	if heads%nPos != 0 {
		return 0, 0, fmt.Errorf("x %v does not hold %d tokens", x, nPos)
	}
	if r.Dims <= 0 || r.Dims%2 != 0 || r.Dims > headDim || freqs != r.Dims/2 {
		return 0, 0, fmt.Errorf("dims %d, head dim %d, %d frequencies", r.Dims, headDim, freqs)
	}
	return headDim, heads / nPos, nil
}

// MoEDims are the sizes of a mixture-of-experts call (see MoE).
type MoEDims struct {
	Dim, N      int // model width, tokens
	Experts, FF int // experts, expert width
}

// MoEShapes checks the shapes of a MoE call: dst and x [d, n], the router
// [d, E], gate and up [d, ff, E], down [ff, d, E], and 0 < topK <= E.
func MoEShapes(dst, x, router, gate, up, down []int, topK int) (MoEDims, error) {
	if len(x) == 0 || len(dst) == 0 {
		return MoEDims{}, errors.New("empty shape")
	}
	dim := x[0]
	m := MoEDims{Dim: dim, N: numelOf(x) / dim}
	if numelOf(dst) != numelOf(x) || dst[0] != dim {
		return m, fmt.Errorf("dst %v for x %v", dst, x)
	}
	if len(router) != 2 || router[0] != dim {
		return m, fmt.Errorf("router %v for width %d", router, dim)
	}
	ne := router[1]
	if len(gate) != 3 || gate[0] != dim || gate[2] != ne {
		return m, fmt.Errorf("gate %v: want [%d, ff, %d]", gate, dim, ne)
	}
	ff := gate[1]
	if len(up) != 3 || up[0] != dim || up[1] != ff || up[2] != ne {
		return m, fmt.Errorf("up %v: want [%d, %d, %d]", up, dim, ff, ne)
	}
	if len(down) != 3 || down[0] != ff || down[1] != dim || down[2] != ne {
		return m, fmt.Errorf("down %v: want [%d, %d, %d]", down, ff, dim, ne)
	}
	if topK <= 0 || topK > ne {
		return m, fmt.Errorf("top-k %d of %d experts", topK, ne)
	}
	m.Experts, m.FF = ne, ff
	return m, nil
}

// KVRows checks KVWrite's k and v [head_dim, kv_heads, n] against cache rows
// of headDim x kvHeads and returns the tokens n.
func KVRows(k, v []int, headDim, kvHeads int) (n int, err error) {
	row := headDim * kvHeads
	if nk := numelOf(k); nk%row != 0 || nk != numelOf(v) || k[0] != headDim {
		return 0, fmt.Errorf("k %v, v %v for cache rows of %d x %d", k, v, headDim, kvHeads)
	}
	return numelOf(k) / row, nil
}

// AttendShape checks Attend's q [head_dim, heads, n] and dst (as many
// elements) against a cache of headDim x kvHeads (heads a multiple of
// kvHeads) and returns the query heads and tokens.
func AttendShape(q, dst []int, headDim, kvHeads int) (heads, n int, err error) {
	nq := numelOf(q)
	if len(q) < 2 || q[0] != headDim || numelOf(dst) != nq {
		return 0, 0, fmt.Errorf("q %v, dst %v for head dim %d", q, dst, headDim)
	}
	heads = q[1]
	if heads%kvHeads != 0 || nq%(headDim*heads) != 0 {
		return 0, 0, fmt.Errorf("q %v: %d query heads for %d kv heads", q, heads, kvHeads)
	}
	return heads, nq / (headDim * heads), nil
}
