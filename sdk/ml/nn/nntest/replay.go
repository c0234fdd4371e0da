package nntest

import (
	"fmt"

	"github.com/llama-orch/orch/sdk/ml"
)

// ReplayBackend wraps a backend (the CPU one in tests) and emulates CUDA
// graph capture for ml.GraphBackend: Run records the ops record issues (with
// their tensor arguments, i.e. fixed addresses) the first time a key is seen
// and, on later calls, re-executes the recorded ops without calling record —
// so model code that relies on replay is tested without a GPU: per-step
// inputs must live in the same tensors, written before Run. Host transfers
// or syncs inside a capture are recorded as violations.
type ReplayBackend struct {
	ml.Backend
	graphs     map[string][]func()
	rec        *[]func()
	Captures   int
	Replays    int
	Violations []string
}

var _ ml.GraphBackend = (*ReplayBackend)(nil)

// NewReplay wraps b.
func NewReplay(b ml.Backend) *ReplayBackend {
	return &ReplayBackend{Backend: b, graphs: map[string][]func(){}}
}

// Run implements ml.GraphBackend.
func (g *ReplayBackend) Run(key string, record func()) error {
	if ops, ok := g.graphs[key]; ok {
		g.Replays++
		for _, op := range ops {
			op()
		}
		return g.Backend.Err()
	}
	if g.rec != nil {
		return fmt.Errorf("replay: nested capture of %q", key)
	}
	var ops []func()
	g.rec = &ops
	record()
	g.rec = nil
	if err := g.Backend.Err(); err != nil {
		return err // a failed capture is not kept
	}
	g.graphs[key] = ops
	g.Captures++
	return nil
}

// ResetGraphs forgets every recording.
func (g *ReplayBackend) ResetGraphs() { g.graphs = map[string][]func(){} }

func (g *ReplayBackend) do(f func()) {
	if g.rec != nil {
		*g.rec = append(*g.rec, f)
	}
	f()
}

func (g *ReplayBackend) violation(what string) {
	if g.rec != nil {
		g.Violations = append(g.Violations, what+" during capture")
	}
}

func (g *ReplayBackend) WriteF32(t ml.Tensor, src []float32) error {
	g.violation("WriteF32")
	return g.Backend.WriteF32(t, src)
}

func (g *ReplayBackend) WriteI32(t ml.Tensor, src []int32) error {
	g.violation("WriteI32")
	return g.Backend.WriteI32(t, src)
}

func (g *ReplayBackend) ReadF32(t ml.Tensor, dst []float32) error {
	g.violation("ReadF32")
	return g.Backend.ReadF32(t, dst)
}

func (g *ReplayBackend) ReadI32(t ml.Tensor, dst []int32) error {
	g.violation("ReadI32")
	return g.Backend.ReadI32(t, dst)
}

func (g *ReplayBackend) Sync() error {
	g.violation("Sync")
	return g.Backend.Sync()
}

func (g *ReplayBackend) Alloc(dt ml.DType, shape ...int) (ml.Tensor, error) {
	g.violation("Alloc")
	return g.Backend.Alloc(dt, shape...)
}

func (g *ReplayBackend) Embed(dst, table, ids ml.Tensor, add bool) {
	g.do(func() { g.Backend.Embed(dst, table, ids, add) })
}
func (g *ReplayBackend) Copy(dst, src ml.Tensor) { g.do(func() { g.Backend.Copy(dst, src) }) }
func (g *ReplayBackend) Add(dst, a, b ml.Tensor) { g.do(func() { g.Backend.Add(dst, a, b) }) }
func (g *ReplayBackend) RMSNorm(dst, x, w ml.Tensor, eps float32) {
	g.do(func() { g.Backend.RMSNorm(dst, x, w, eps) })
}
func (g *ReplayBackend) AddRMSNorm(res, dst, x, w ml.Tensor, eps float32) {
	g.do(func() { g.Backend.AddRMSNorm(res, dst, x, w, eps) })
}
func (g *ReplayBackend) LayerNorm(dst, x, w, b ml.Tensor, eps float32) {
	g.do(func() { g.Backend.LayerNorm(dst, x, w, b, eps) })
}
func (g *ReplayBackend) AddLayerNorm(res, dst, x, w, b ml.Tensor, eps float32) {
	g.do(func() { g.Backend.AddLayerNorm(res, dst, x, w, b, eps) })
}
func (g *ReplayBackend) MatMul(dst, x, w, bias ml.Tensor) {
	g.do(func() { g.Backend.MatMul(dst, x, w, bias) })
}
func (g *ReplayBackend) GELU(dst, x ml.Tensor) { g.do(func() { g.Backend.GELU(dst, x) }) }
func (g *ReplayBackend) SwiGLU(dst, gate, up ml.Tensor) {
	g.do(func() { g.Backend.SwiGLU(dst, gate, up) })
}
func (g *ReplayBackend) SwiGLUOAI(dst, gate, up ml.Tensor, alpha, limit float32) {
	g.do(func() { g.Backend.SwiGLUOAI(dst, gate, up, alpha, limit) })
}
func (g *ReplayBackend) RoPE(x, pos ml.Tensor, r *ml.Rope) {
	rc := *r
	g.do(func() { g.Backend.RoPE(x, pos, &rc) })
}
func (g *ReplayBackend) KVWrite(kc, vc, k, v ml.Tensor, b *ml.Batch) {
	bc := *b
	g.do(func() { g.Backend.KVWrite(kc, vc, k, v, &bc) })
}
func (g *ReplayBackend) Attend(dst, q, kc, vc ml.Tensor, b *ml.Batch, a *ml.Attention) {
	bc, ac := *b, *a
	g.do(func() { g.Backend.Attend(dst, q, kc, vc, &bc, &ac) })
}
func (g *ReplayBackend) MoE(dst, x ml.Tensor, m *ml.MoE) {
	mc := *m
	g.do(func() { g.Backend.MoE(dst, x, &mc) })
}
func (g *ReplayBackend) Argmax(dst, x ml.Tensor) { g.do(func() { g.Backend.Argmax(dst, x) }) }
func (g *ReplayBackend) CopyBlock(cache ml.Tensor, dst, src int) {
	g.do(func() { g.Backend.CopyBlock(cache, dst, src) })
}
