//go:build gpu

package cuda

import (
	"fmt"
	"math"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// TestDiscard: the last layer's work of a decode step captured into a graph
// with and without Discard (discard.go) of what nothing reads afterwards:
// the capture makes one launch fewer (Backend.launches) where a fold left
// something to repair, and every output read afterwards is bit-identical
// (the MoE's within the MoE bound of the other route), over the capture's
// launch and two replays.
//
// "rope": q/k/v GEMVs, RoPE pair, KV write, Attend (folded into
// orch_attention_rope), Discard(q, k): no rope pair at the graph's end;
// attention output and K/V caches bit-identical. "norm": Llama's out
// projection -> AddRMSNorm -> gate/up + SwiGLU -> down, Discard(h), the
// residual add: no norm materialising h; residual, SwiGLU and down outputs
// bit-identical. "moe": gpt-oss's out projection -> AddRMSNorm -> MoE,
// Discard(h), the residual add: one orch_moe_decode_oproj call instead of
// the GEMV and orch_moe_decode_norm; the projection bit-identical, the MoE
// output and the residual within the MoE bound.
//
//	bin/cuda-gpu.test -test.run 'TestDiscard$' -test.v
func TestDiscard(t *testing.T) {
	defer func(v, d, dp bool) { fuseOps, discardOn, discardOProj = v, d, dp }(fuseOps, discardOn, discardOProj)
	fuseOps, discardOn, discardOProj = true, true, true
	r := newRNG(t)
	// capture runs record under a fresh key (discarding or not) and returns the launches it made; replays
	// then reruns it twice, check (with reset before each run) comparing the outputs each time
	capture := func(t *testing.T, record func(), reset func()) uint64 {
		gpu.ResetGraphs()
		reset()
		require.NoError(t, gpu.Sync())
		gpu.rotateUnrotated() // (state an earlier test left: not this capture's launches)
		gpu.materializeXT()
		graphSeq++
		key := fmt.Sprintf("discard-%d", graphSeq)
		l0 := gpu.launches
		require.NoError(t, gpu.Run(key, record))
		n := gpu.launches - l0
		require.NoError(t, gpu.Sync())
		return n
	}
	replay := func(t *testing.T, reset func(), check func(what string)) {
		for rep := 0; rep < 2; rep++ {
			reset()
			l0 := gpu.launches
			require.NoError(t, gpu.Run(fmt.Sprintf("discard-%d", graphSeq), nil))
			require.Equal(t, l0, gpu.launches, "a replay: nothing launched around it")
			check(fmt.Sprintf("replay %d", rep))
		}
	}
	// readReplayed reads the captured run's outputs, then checks that two replays give the same bits
	readReplayed := func(t *testing.T, reset func(), read func() [][]float32, names []string) [][]float32 {
		got := read()
		replay(t, reset, func(what string) {
			for i, v := range read() {
				sameBits(t, what+" "+names[i], got[i], v)
			}
		})
		return got
	}

	t.Run("rope", func(t *testing.T) {
		if gpu.l.attentionRope == nil || os.Getenv("ORCH_CUDA_ATTN_ROPE") == "0" {
			t.Skip("no attention fold (library without orch_attention_rope, or ORCH_CUDA_ATTN_ROPE=0)")
		}
		defer func(w bool) { foldAttnRoPE = w }(foldAttnRoPE)
		foldAttnRoPE = true
		for _, n := range []int{1, 3} {
			t.Run(fmt.Sprintf("n=%d", n), func(t *testing.T) {
				const k, hd, nh, nkv, bs, nb, hist = 512, 64, 8, 2, 16, 4, 37
				x := f32Pair(t, randF32(r, k*n, 1), k, n)
				wq := weightPair(t, "q", ml.Q8_0, []int{k, hd * nh}, randWeight(r, ml.Q8_0, k, hd*nh))
				wk := weightPair(t, "k", ml.Q8_0, []int{k, hd * nkv}, randWeight(r, ml.Q8_0, k, hd*nkv))
				wv := weightPair(t, "v", ml.Q8_0, []int{k, hd * nkv}, randWeight(r, ml.Q8_0, k, hd*nkv))
				inv, scale, err := ml.YaRNInvFreq(150000, hd, ml.YaRN{Factor: 32, OrigContext: 4096})
				require.NoError(t, err)
				fr := f32Pair(t, inv, hd/2)
				rope := &ml.Rope{Mode: ml.RopeNeoX, Dims: hd, Scale: scale, InvFreq: fr.g}
				blocks := []int32{2, 0, 3, 1}
				slot := func(p int) int32 { return blocks[p/bs]*bs + int32(p%bs) }
				mkBatch := func(from, cnt int) *ml.Batch {
					pos, seq, slots := make([]int32, cnt), make([]int32, cnt), make([]int32, cnt)
					for i := range pos {
						pos[i], slots[i] = int32(from+i), slot(from+i)
					}
					return &ml.Batch{Pos: i32Pair(t, pos, cnt).g, Seq: i32Pair(t, seq, cnt).g,
						Slots: i32Pair(t, slots, cnt).g, Blocks: i32Pair(t, blocks, nb, 1).g, BlockSize: bs,
						MaxPos: nb * bs}
				}
				hb, bt := mkBatch(0, hist), mkBatch(hist, n)
				kh, vh := f32Pair(t, randF32(r, hd*nkv*hist, 1), hd, nkv, hist), f32Pair(t, randF32(r, hd*nkv*hist, 1), hd, nkv, hist)
				q, kk, v, att := out(t, hd*nh, n), out(t, hd*nkv, n), out(t, hd*nkv, n), out(t, hd, nh, n)
				heads := func(p pair, h int) ml.Tensor {
					v, err := gpu.Reshape(p.g, hd, h, n)
					require.NoError(t, err)
					return v
				}
				qh, kh2, vh2 := heads(q, nh), heads(kk, nkv), heads(v, nkv)
				a := &ml.Attention{Scale: 0.125, Sinks: f32Pair(t, randF32(r, nh, 1), nh).g}
				type result struct {
					launches uint64
					att      []float32
					kc, vc   []float32
				}
				variant := func(discard bool) result {
					kc, err := gpu.Alloc(ml.F32, hd, nkv, bs, nb) // F32: read back below (the fold takes both types)
					require.NoError(t, err)
					vc, err := gpu.Alloc(ml.F32, hd, nkv, bs, nb)
					require.NoError(t, err)
					t.Cleanup(func() { gpu.Free(kc); gpu.Free(vc) })
					gpu.KVWrite(kc, vc, kh.g, vh.g, hb) // the history (no RoPE held: a plain write)
					folded := false
					record := func() {
						gpu.MatMul(q.g, x.g, wq.g, nil)
						gpu.MatMul(kk.g, x.g, wk.g, nil)
						gpu.MatMul(v.g, x.g, wv.g, nil)
						gpu.RoPE(qh, bt.Pos, rope)
						gpu.RoPE(kh2, bt.Pos, rope)
						gpu.KVWrite(kc, vc, kh2, vh2, bt)
						gpu.Attend(att.g, qh, kc, vc, bt, a)
						folded = gpu.pend.unrot.on
						if discard {
							gpu.Discard(q.g, kk.g)
						}
					}
					reset := func() { gpu.Fill(att.g, float32(math.NaN())) }
					var res result
					res.launches = capture(t, record, reset)
					require.True(t, folded, "the attention fold ran (q / k left unrotated)")
					require.False(t, gpu.pend.unrot.on)
					res.att, res.kc, res.vc = readF32(t, att.g), readF32(t, kc), readF32(t, vc)
					replay(t, reset, func(what string) {
						sameBits(t, what+" attention", res.att, readF32(t, att.g))
						sameBits(t, what+" K cache", res.kc, readF32(t, kc))
					})
					return res
				}
				plain, disc := variant(false), variant(true)
				require.Equal(t, plain.launches-1, disc.launches, "the rope pair at the graph's end gone")
				sameBits(t, "attention discard vs not", plain.att, disc.att)
				sameBits(t, "K cache discard vs not", plain.kc, disc.kc)
				sameBits(t, "V cache discard vs not", plain.vc, disc.vc)
				for i, f := range disc.att {
					require.False(t, math.IsNaN(float64(f)) || math.IsInf(float64(f), 0), "attention %d: %v", i, f)
				}
			})
		}
	})

	t.Run("norm", func(t *testing.T) {
		if gpu.l.matmulAddNorm == nil || os.Getenv("ORCH_CUDA_NORM_FOLD") == "0" || os.Getenv("ORCH_CUDA_GEMV") != "" {
			t.Skip("no norm fold (library without orch_matmul_addnorm, ORCH_CUDA_NORM_FOLD=0 or a pinned GEMV)")
		}
		defer func(nf bool) { fuseNormFold = nf }(fuseNormFold)
		fuseNormFold = true
		for _, n := range []int{1, 2} {
			t.Run(fmt.Sprintf("n=%d", n), func(t *testing.T) {
				const d, ff, eps = 1024, 2048, 1e-5
				dt := ml.Q8_0
				att := f32Pair(t, randF32(r, d*n, 1), d, n)
				res0 := randF32(r, d*n, 4)
				res := f32Pair(t, res0, d, n)
				n2 := f32Pair(t, randF32(r, d, 1), d)
				wo := weightPair(t, "o", dt, []int{d, d}, randWeight(r, dt, d, d))
				wg := weightPair(t, "gate", dt, []int{d, ff}, randWeight(r, dt, d, ff))
				wu := weightPair(t, "up", dt, []int{d, ff}, randWeight(r, dt, d, ff))
				wd := weightPair(t, "down", dt, []int{ff, d}, randWeight(r, dt, ff, d))
				o, h, g, u, f := out(t, d, n), out(t, d, n), out(t, ff, n), out(t, ff, n), out(t, d, n)
				outs := []pair{o, g, f, res}
				names := []string{"o", "swiglu", "down", "res"}
				reset := func() {
					poisonPairs(o, h, g, u, f)
					require.NoError(t, gpu.WriteF32(res.g, res0))
				}
				read := func() [][]float32 { return readPairs(t, outs) }
				variant := func(discard bool) (uint64, [][]float32) {
					folded := false
					record := func() {
						gpu.MatMul(o.g, att.g, wo.g, nil)
						gpu.AddRMSNorm(res.g, h.g, o.g, n2.g, eps)
						gpu.MatMul(g.g, h.g, wg.g, nil)
						gpu.MatMul(u.g, h.g, wu.g, nil)
						gpu.SwiGLU(g.g, g.g, u.g)
						gpu.MatMul(f.g, g.g, wd.g, nil)
						folded = gpu.xt.on
						if discard {
							gpu.Discard(h.g)
						}
						gpu.Add(res.g, res.g, f.g)
					}
					launches := capture(t, record, reset)
					require.True(t, folded, "the norm fold ran (h holds xt)")
					require.False(t, gpu.xt.on)
					got := readReplayed(t, reset, read, names)
					return launches, got
				}
				lp, plain := variant(false)
				ld, disc := variant(true)
				require.Equal(t, lp-1, ld, "the norm materialising h gone")
				for i := range plain {
					sameBits(t, names[i]+" discard vs not", plain[i], disc[i])
				}
			})
		}
	})

	t.Run("moe", func(t *testing.T) {
		if gpu.l.moeDecodeOProj == nil || gpu.l.moeDecodeAddNorm == nil || gpu.l.matmulMultiNF == nil {
			t.Skip("library without orch_moe_decode_oproj_args / orch_moe_decode_addnorm / orch_matmul_multi_nf")
		}
		ver := os.Getenv("ORCH_CUDA_MOE")
		if (ver != "" && ver != "v10") || os.Getenv("ORCH_CUDA_GEMV") != "" || os.Getenv("ORCH_CUDA_MOE_ONLY") != "" {
			t.Skip("a pinned MoE / GEMV version: the library may not take the oproj call")
		}
		defer func(nf, mn, an, op bool, mx int64) {
			fuseNormFold, fuseMoENorm, fuseMoEAddNorm, fuseMoEOProj, moeAddNormMaxN = nf, mn, an, op, mx
		}(fuseNormFold, fuseMoENorm, fuseMoEAddNorm, fuseMoEOProj, moeAddNormMaxN)
		fuseNormFold, fuseMoENorm, fuseMoEAddNorm, fuseMoEOProj, moeAddNormMaxN = true, true, true, true, 1
		calls := countOProjCalls(t)
		// gpt-oss-20b's shapes (as TestMoEOProjFold)
		const d, ok, ff, ne, topk, eps = 2880, 4096, 2880, 32, 4, 1e-5
		m, _ := randMoE(t, r, ml.MXFP4, d, ff, ne, topk)
		wo := weightPair(t, "o", ml.Q8_0, []int{ok, d}, randWeight(r, ml.Q8_0, ok, d))
		bo, n1 := f32Pair(t, randF32(r, d, 1), d), f32Pair(t, randF32(r, d, 1), d)
		res0 := randF32(r, d, 4)
		res, att := f32Pair(t, res0, d, 1), f32Pair(t, randF32(r, ok, 1), ok, 1)
		o, h, y := out(t, d, 1), out(t, d, 1), out(t, d, 1)
		outs := []pair{o, y, res}
		names := []string{"o", "y", "res"}
		reset := func() {
			poisonPairs(o, h, y)
			require.NoError(t, gpu.WriteF32(res.g, res0))
		}
		read := func() [][]float32 { return readPairs(t, outs) }
		variant := func(discard bool) (uint64, [][]float32) {
			held := false
			record := func() {
				gpu.MatMul(o.g, att.g, wo.g, bo.g)
				gpu.AddRMSNorm(res.g, h.g, o.g, n1.g, eps)
				gpu.MoE(y.g, h.g, m)
				held = gpu.pend.moe.on && gpu.pend.moe.c.pj.on
				if discard {
					gpu.Discard(h.g)
				}
				gpu.Add(res.g, res.g, y.g)
			}
			c0 := *calls
			launches := capture(t, record, reset)
			require.True(t, held, "the MoE held with its out projection")
			want := 0
			if discard {
				want = 1
			}
			require.Equal(t, c0+want, *calls, "orch_moe_decode_oproj calls")
			require.False(t, gpu.xt.on)
			got := readReplayed(t, reset, read, names)
			return launches, got
		}
		lp, plain := variant(false)
		ld, disc := variant(true)
		require.Equal(t, lp-1, ld, "the GEMV and orch_moe_decode_norm as one call")
		sameBits(t, "o discard vs not", plain[0], disc[0])
		tol := moeTol() + 4*gemvTol(ml.Q8_0, 1, true)
		checkVec(t, "y discard vs not", disc[1], plain[1], tol)
		checkVec(t, "res discard vs not", disc[2], plain[2], tol)
	})
}
