package nntest

import (
	"fmt"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
)

// ReplayBackend wraps a backend (the CPU one in tests) and emulates CUDA
// graph capture for ml.GraphBackend: Run records the ops record issues (with
// their tensor arguments, i.e. fixed addresses) the first time a key is seen
// and, on later calls, re-executes the recorded ops without calling record —
// so model code that relies on replay is tested without a GPU: per-step
// inputs must live in the same tensors, written before Run. Host transfers
// or syncs inside a capture are recorded as violations.
//
// With Ahead set it also implements ml.AheadBackend: ReadI32Async reads at
// once (the wrapped CPU backend has run every op queued before it), so a
// runner launches decode steps ahead as on a GPU. With Sample set it draws
// tokens "on the device" (ml.SamplingBackend) with ml.SampleRowRef, the
// engine's host sampler.
type ReplayBackend struct {
	ml.Backend
	graphs     map[string][]func()
	rec        *[]func()
	Captures   int
	Replays    int
	Violations []string
	Ahead      bool
	AheadReads int
	Sample     bool
	NoAdvance  bool // AdvanceStep declines (the runner uploads the next step's inputs)
	// Discards counts Discard calls (ml.Discarder, forwarded where the
	// wrapped backend has it); with PoisonDiscards each discarded F32
	// tensor is filled with NaN, so a model reading one afterwards fails.
	Discards       int
	PoisonDiscards bool
}

var (
	_ ml.GraphBackend    = (*ReplayBackend)(nil)
	_ ml.AheadBackend    = (*ReplayBackend)(nil)
	_ ml.SamplingBackend = (*ReplayBackend)(nil)
	_ ml.Discarder       = (*ReplayBackend)(nil)
)

// Discard implements ml.Discarder: recorded, forwarded to the wrapped
// backend where it has it, and the tensors poisoned with PoisonDiscards.
func (g *ReplayBackend) Discard(ts ...ml.Tensor) {
	g.Discards++
	ts = append([]ml.Tensor(nil), ts...)
	g.do(func() {
		if d, ok := g.Backend.(ml.Discarder); ok {
			d.Discard(ts...)
		}
		if !g.PoisonDiscards {
			return
		}
		for _, t := range ts {
			if t != nil && t.DType() == ml.F32 {
				nan := make([]float32, t.Len())
				for i := range nan {
					nan[i] = float32(math.NaN())
				}
				g.Backend.WriteF32(t, nan) //nolint:errcheck // the wrapped backend's error is sticky
			}
		}
	})
}

// SampleRowsAvailable implements ml.SamplingBackend (Sample).
func (g *ReplayBackend) SampleRowsAvailable() bool { return g.Sample }

// SampleRows implements ml.SamplingBackend: each row's SampleRowRef token.
func (g *ReplayBackend) SampleRows(dst, x, params ml.Tensor, filters int) {
	g.do(func() {
		n := dst.Len()
		v := x.Len() / n
		logits := make([]float32, x.Len())
		w := make([]int32, params.Len())
		if g.Backend.ReadF32(x, logits) != nil || g.Backend.ReadI32(params, w) != nil {
			return // the wrapped backend's error is sticky
		}
		toks := make([]int32, n)
		for i, p := range ml.UnpackSampleParams(w)[:n] {
			toks[i] = ml.SampleRowRef(logits[i*v:(i+1)*v], p)
		}
		g.Backend.WriteI32(dst, toks) //nolint:errcheck // as above
	})
}

// StepAhead implements ml.AheadBackend (Ahead).
func (g *ReplayBackend) StepAhead() bool { return g.Ahead }

// ReadI32Async implements ml.AheadBackend.
func (g *ReplayBackend) ReadI32Async(t ml.Tensor) (ml.PendingI32, error) {
	if !g.Ahead {
		return nil, fmt.Errorf("replay: step-ahead reads are off")
	}
	g.violation("ReadI32Async")
	v := make([]int32, t.Len())
	if err := g.Backend.ReadI32(t, v); err != nil {
		return nil, err
	}
	g.AheadReads++
	return &doneRead{v: v}, nil
}

// AdvanceStep implements ml.AheadBackend on the host.
func (g *ReplayBackend) AdvanceStep(buf ml.Tensor, seg int, inc uint32, src, params ml.Tensor, n int) bool {
	if g.NoAdvance {
		return false
	}
	g.do(func() {
		b, t := make([]int32, buf.Len()), make([]int32, n)
		if g.Backend.ReadI32(buf, b) != nil || g.Backend.ReadI32(src, t) != nil {
			return // the wrapped backend's error is sticky
		}
		copy(b, t)
		for s := 1; s < 32; s++ {
			if inc>>s&1 != 0 {
				for i := range n {
					b[s*seg+i]++
				}
			}
		}
		g.Backend.WriteI32(buf, b) //nolint:errcheck // as above
		if params == nil {
			return
		}
		w := make([]int32, ml.SampleParamsWords*n)
		if g.Backend.ReadI32(params, w) != nil {
			return
		}
		ps := ml.UnpackSampleParams(w)
		for i := range ps {
			if ps[i].Temperature >= ml.SampleMinTemperature {
				ps[i].Counter++
			}
		}
		ml.PackSampleParams(w, ps)
		g.Backend.WriteI32(params, w) //nolint:errcheck // as above
	})
	return true
}

// doneRead is a read that has completed.
type doneRead struct {
	v    []int32
	done bool
}

func (d *doneRead) Wait(dst []int32) error {
	if d.done {
		return fmt.Errorf("replay: read waited for twice")
	}
	if len(dst) > len(d.v) {
		return fmt.Errorf("replay: %d values from a read of %d", len(dst), len(d.v))
	}
	d.done = true
	copy(dst, d.v)
	return nil
}

func (d *doneRead) Drop() { d.done = true }

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

// CheckDiscardsUnread loads the tiny model of arch twice — on a plain CPU
// backend, and on a ReplayBackend over one that poisons every tensor the
// model discards (ml.Discarder) — and compares them (CompareModels: prefill,
// decode captured and replayed, a mixed batch): nothing reads a discarded
// tensor. load(b) loads the model with b as its backend (nil: the default).
func CheckDiscardsUnread(t *testing.T, arch string, load func(c Config, b ml.Backend) engine.Model) {
	rb := NewReplay(cpu.New(2))
	rb.PoisonDiscards = true
	c := Tiny(arch)
	ref := load(c, nil)
	m := load(c, rb)
	CompareModels(t, ref, m, 21, 1e-6)
	assert.Positive(t, rb.Discards)
	assert.Positive(t, rb.Replays)
}
