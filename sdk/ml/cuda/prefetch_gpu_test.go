//go:build gpu

package cuda

import (
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// GPU tests of the L2 prefetch nodes (prefetch.go, cuda/src/prefetch.cu).

// withL2PF sets the backend's prefetch configuration for the rest of the
// test (the library's state is created on first use) and restores it after.
func withL2PF(t *testing.T, cfg l2pfConfig) {
	was := gpu.pf.cfg
	require.NoError(t, gpu.initL2PF(cfg), "the library must have the orch_pf_* entry points")
	t.Cleanup(func() { gpu.pf.cfg = was })
}

// TestL2Prefetch: a decode-like chain (norm, q/k/v merged GEMV, RoPE + KV
// write, in-place add, o GEMV, norm, MoE; three layers), captured with the
// prefetch nodes at distances 1..3, evict_last and line prefetches, gives
// the same bits as eagerly without them over graph replays with poisoned
// outputs, and the captures really added prefetch nodes.
func TestL2Prefetch(t *testing.T) {
	r := newRNG(t)
	const d, hd, nh, nkv, ff, ne, topk, layers, n = 1024, 64, 16, 4, 512, 8, 2, 3, 1
	type layer struct {
		norm1, norm2, bq pair
		wq, wk, wv, wo   pair
		moe              *ml.MoE
	}
	var ls []layer
	for i := 0; i < layers; i++ {
		ls = append(ls, layer{norm1: f32Pair(t, randF32(r, d, 1), d), norm2: f32Pair(t, randF32(r, d, 1), d),
			bq: f32Pair(t, randF32(r, hd*nh, 1), hd*nh),
			wq: weightPair(t, "q", ml.Q8_0, []int{d, hd * nh}, randWeight(r, ml.Q8_0, d, hd*nh)),
			wk: weightPair(t, "k", ml.Q8_0, []int{d, hd * nkv}, randWeight(r, ml.Q8_0, d, hd*nkv)),
			wv: weightPair(t, "v", ml.Q8_0, []int{d, hd * nkv}, randWeight(r, ml.Q8_0, d, hd*nkv)),
			wo: weightPair(t, "o", ml.Q8_0, []int{hd * nh, d}, randWeight(r, ml.Q8_0, hd*nh, d)),
			moe: &ml.MoE{
				Router: weightPair(t, "router", ml.F32, []int{d, ne}, randWeight(r, ml.F32, d, ne)).g,
				Gate:   weightPair(t, "gate", ml.MXFP4, []int{d, ff, ne}, randWeight(r, ml.MXFP4, d, ff*ne)).g,
				Up:     weightPair(t, "up", ml.MXFP4, []int{d, ff, ne}, randWeight(r, ml.MXFP4, d, ff*ne)).g,
				Down:   weightPair(t, "down", ml.MXFP4, []int{ff, d, ne}, randWeight(r, ml.MXFP4, ff, d*ne)).g,
				TopK:   topk, Alpha: 1.702, Limit: 7,
			}})
	}
	inv, scale, err := ml.YaRNInvFreq(150000, hd, ml.YaRN{Factor: 32, OrigContext: 4096})
	require.NoError(t, err)
	f := f32Pair(t, inv, hd/2)
	rope := &ml.Rope{Mode: ml.RopeNeoX, Dims: hd, Scale: scale, InvFreq: f.g}
	pos := i32Pair(t, []int32{int32(r.IntN(4096))}, n)
	x0 := randF32(r, d*n, 1)
	x, h, o, moe := out(t, d, n), out(t, d, n), out(t, d, n), out(t, d, n)
	q, k, v := out(t, hd*nh, n), out(t, hd*nkv, n), out(t, hd*nkv, n)
	qh, err := gpu.Reshape(q.g, hd, nh, n)
	require.NoError(t, err)
	kh, err := gpu.Reshape(k.g, hd, nkv, n)
	require.NoError(t, err)
	vh, err := gpu.Reshape(v.g, hd, nkv, n)
	require.NoError(t, err)
	const cbs = 16
	kc, err := gpu.Alloc(ml.F16, hd, nkv, cbs, layers)
	require.NoError(t, err)
	defer gpu.Free(kc)
	vc, err := gpu.Alloc(ml.F16, hd, nkv, cbs, layers)
	require.NoError(t, err)
	defer gpu.Free(vc)
	bts := make([]*ml.Batch, layers)
	for i := range bts {
		bts[i] = newRandSrc(r).batch(t, []int32{int32(r.IntN(cbs))}, []int32{0}, []int32{int32(i)}, 1, cbs)
	}
	// The graph must not capture the input write: the step's first op reads
	// x, which each replay below writes before launching.
	record := func() {
		for i, l := range ls {
			if i == 0 {
				gpu.RMSNorm(h.g, x.g, l.norm1.g, 1e-5)
			} else {
				gpu.AddRMSNorm(x.g, h.g, moe.g, l.norm1.g, 1e-5)
			}
			gpu.MatMul(q.g, h.g, l.wq.g, l.bq.g)
			gpu.MatMul(k.g, h.g, l.wk.g, nil)
			gpu.MatMul(v.g, h.g, l.wv.g, nil)
			gpu.RoPE(qh, pos.g, rope)
			gpu.RoPE(kh, pos.g, rope)
			gpu.KVWrite(kc, vc, kh, vh, bts[i])
			gpu.Add(q.g, q.g, q.g)
			gpu.MatMul(o.g, q.g, l.wo.g, nil)
			gpu.AddRMSNorm(x.g, h.g, o.g, l.norm2.g, 1e-5)
			gpu.MoE(moe.g, h.g, l.moe)
		}
		gpu.Add(x.g, x.g, moe.g)
	}
	withL2PF(t, l2pfConfig{})
	require.NoError(t, gpu.WriteF32(x.g, x0))
	record() // eagerly: the reference
	wantX, wantH := readF32(t, x.g), readF32(t, h.g)
	require.False(t, slices.ContainsFunc(wantX, func(v float32) bool { return math.IsNaN(float64(v)) }), "NaN x")
	cfgs := []struct {
		name string
		cfg  l2pfConfig
	}{
		{"off", l2pfConfig{maxBytes: 32 << 20}},
		{"dist 1", l2pfConfig{dist: 1, maxBytes: 32 << 20}},
		{"dist 2", l2pfConfig{dist: 2, maxBytes: 32 << 20}},
		{"dist 3 evict_last", l2pfConfig{dist: 3, maxBytes: 32 << 20, flags: pfEvictLast}},
		{"dist 1 lines", l2pfConfig{dist: 1, maxBytes: 32 << 20, flags: pfLines}},
		{"dist 2 lines evict_last", l2pfConfig{dist: 2, maxBytes: 32 << 20, flags: pfLines | pfEvictLast}},
	}
	for _, c := range cfgs {
		withL2PF(t, c.cfg)
		nodes := gpu.pf.nodes
		key := "l2pf-" + c.name
		for rep := 0; rep < 10; rep++ {
			require.NoError(t, gpu.WriteF32(x.g, x0))
			gpu.Fill(h.g, float32(math.NaN()))
			gpu.Fill(o.g, float32(math.NaN()))
			gpu.Fill(moe.g, float32(math.NaN()))
			require.NoError(t, gpu.Run(key, record))
			sameBits(t, fmt.Sprintf("%s replay %d: x", c.name, rep), wantX, readF32(t, x.g))
			sameBits(t, fmt.Sprintf("%s replay %d: h", c.name, rep), wantH, readF32(t, h.g))
		}
		added := gpu.pf.nodes - nodes
		t.Logf("%s: %d prefetch nodes in the graph", c.name, added)
		if c.cfg.dist == 0 {
			require.Zero(t, added)
		} else {
			// q/k/v (one node a layer, but the first layer's when it has no anchor) and o (one a layer).
			require.GreaterOrEqual(t, added, 2*layers-1, c.name)
		}
	}
	gpu.ResetGraphs()
}

// TestPerfL2Prefetch times a captured chain "flush L2 (256 MiB memset) ->
// idle link (a one-warp spin of S µs, standing in for decode attention or a
// norm: no DRAM traffic) -> decode GEMV(s)" with and without a prefetch node
// for the GEMV weights anchored at the flush (so it overlaps the spin), with
// device events around spin + GEMV. Also: the spin alone (subtracted), the
// GEMV right after the flush (DRAM) and with its weight already in L2 (no
// flush: the ceiling). gpt-oss and Llama-8B attention shapes, Q8_0, n = 1.
//
//	ORCH_GPU_PERF=1 bin/cuda-gpu.test -test.run TestPerfL2Prefetch -test.v
//
// With ORCH_L2PF_STEP=1 it also times TestPerf's synthetic gpt-oss decode
// step (separate q/k/v, depth 128) under ORCH_CUDA_L2PF=0,1,2,3, 3 in
// stream mode, and 1, 2 with evict_last, each in a child process (the
// environment is read once).
func TestPerfL2Prefetch(t *testing.T) {
	if os.Getenv("ORCH_GPU_PERF") == "" {
		t.Skip("set ORCH_GPU_PERF=1 to time the L2 prefetch")
	}
	if os.Getenv("ORCH_L2PF_STEP_CHILD") != "" {
		r := newRandSrc(newRNG(t))
		ms, _ := r.decodeSteps(t, 128, 1, true, []stepCfg{{name: "default", fuse: fuseOps}})
		fmt.Printf("| ORCH_CUDA_L2PF=%s mode=%s policy=%s ctas=%s dry=%s | %.3f | %.0f | nodes %d |\n",
			os.Getenv("ORCH_CUDA_L2PF"), os.Getenv("ORCH_CUDA_L2PF_MODE"), os.Getenv("ORCH_CUDA_L2PF_POLICY"),
			os.Getenv("ORCH_CUDA_L2PF_CTAS"), os.Getenv("ORCH_CUDA_L2PF_DRY"), ms[0], 1e3/ms[0], gpu.pf.nodes)
		return
	}
	if gpu.l.spin == nil {
		t.Fatal("library without orch_spin")
	}
	r := newRandSrc(newRNG(t))
	const flushBytes = 256 << 20
	var flush uintptr
	require.NoError(t, gpu.l.status("malloc", gpu.l.malloc(gpu.ctx, flushBytes, &flush)))
	defer gpu.l.free(gpu.ctx, flush)
	type shape struct {
		name string
		k    int
		ms   []int // one GEMV launch (merged parts) of these row counts
	}
	shapes := []shape{
		{"gpt-oss attn out (Q8_0 4096 -> 2880, 12.5 MB)", 4096, []int{2880}},
		{"gpt-oss q/k/v (Q8_0 2880 -> 4096+512+512, 15.7 MB)", 2880, []int{4096, 512, 512}},
		{"Llama-8B attn out (Q8_0 4096 -> 4096, 17.8 MB)", 4096, []int{4096}},
		{"Llama-8B q/k/v (Q8_0 4096 -> 4096+1024+1024, 26.7 MB)", 4096, []int{4096, 1024, 1024}},
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "device: %s (cc %d)\n\n| chain: flush -> spin S -> GEMV, n=1, graph | S µs | spin alone | GEMV cold (no spin) | GEMV hot (in L2) | after spin, no prefetch | prefetch | prefetch evict_last | prefetch lines | prefetch 8 CTAs | early spin, no prefetch | early spin + prefetch |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
		gpu.DeviceName(), gpu.ComputeCapability())
	seq := 0
	for _, sh := range shapes {
		x := mustA(t, ml.F32, sh.k, 1)
		require.NoError(t, gpu.WriteF32(x, r.f32(sh.k)))
		var ws, ys []ml.Tensor
		for _, m := range sh.ms {
			ws = append(ws, mustW(t, r, "w", ml.Q8_0, sh.k, m))
			ys = append(ys, mustA(t, ml.F32, m, 1))
		}
		// chain returns the median µs between the events around spin + GEMVs.
		// early: the spin lets the GEMV start at once (PDL trigger), as the decode
		// kernels do: its CTAs load their first weights while the spin runs.
		chain := func(doFlush bool, spinNs int64, early, gemv bool, pf l2pfConfig) float64 {
			withL2PF(t, pf)
			var e0, e1 uintptr
			require.NoError(t, gpu.l.status("event", gpu.l.eventCreate(&e0)))
			require.NoError(t, gpu.l.status("event", gpu.l.eventCreate(&e1)))
			defer gpu.l.eventDestroy(e0)
			defer gpu.l.eventDestroy(e1)
			seq++
			key := fmt.Sprintf("l2pf-perf-%d", seq)
			nodes := gpu.pf.nodes
			rec := func() {
				if doFlush {
					gpu.call("memset", gpu.l.memset(gpu.ctx, flush, int32(seq&0xff), flushBytes))
				}
				gpu.call("event", gpu.l.eventRecord(gpu.ctx, e0))
				if spinNs > 0 {
					gpu.call("spin", gpu.l.spin(gpu.ctx, spinNs, b2i(early)))
				}
				if gemv {
					for i := range ws {
						gpu.MatMul(ys[i], x, ws[i], nil)
					}
					gpu.flush()
				}
				gpu.call("event", gpu.l.eventRecord(gpu.ctx, e1))
			}
			const reps = 60
			var ts []float64
			for i := 0; i < reps+5; i++ {
				require.NoError(t, gpu.Run(key, rec))
				var ms float32
				require.NoError(t, gpu.l.status("elapsed", gpu.l.eventElapsed(e0, e1, &ms)))
				if i >= 5 {
					ts = append(ts, 1e3*float64(ms))
				}
			}
			require.NoError(t, gpu.Sync())
			if pf.dist > 0 && spinNs > 0 && gemv {
				require.Equal(t, 1, gpu.pf.nodes-nodes, "one prefetch node (the GEMV's weights)")
			}
			gpu.l.graphDestroy(gpu.graphs[key])
			delete(gpu.graphs, key)
			slices.Sort(ts)
			return ts[len(ts)/2]
		}
		off := l2pfConfig{maxBytes: 64 << 20}
		// The event records go through call, so they are marks too: the GEMV's want sees the
		// marks memset (1), event (2), spin (3) and anchors at 3 - dist; dist 2 = after the memset.
		on := func(flags int32) l2pfConfig { return l2pfConfig{dist: 2, maxBytes: 64 << 20, flags: flags} }
		cold := chain(true, 0, false, true, off)
		hot := chain(false, 0, false, true, off)
		for _, spinUs := range []int64{3, 8, 14} {
			ns := spinUs * 1000
			alone := chain(true, ns, false, false, off)
			plain := chain(true, ns, false, true, off)
			pf := chain(true, ns, false, true, on(0))
			last := chain(true, ns, false, true, on(pfEvictLast))
			lines := chain(true, ns, false, true, on(pfLines))
			few := chain(true, ns, false, true, on(8<<pfCTAsShift))
			early := chain(true, ns, true, true, off)
			earlyPf := chain(true, ns, true, true, on(0))
			fmt.Fprintf(&sb, "| %s | %d | %.1f | %.1f | %.1f | %.1f (+%.1f) | %.1f (+%.1f) | %.1f (+%.1f) | %.1f (+%.1f) | %.1f (+%.1f) | %.1f (+%.1f) | %.1f (+%.1f) |\n",
				sh.name, spinUs, alone, cold, hot, plain, plain-alone, pf, pf-alone, last, last-alone, lines, lines-alone,
				few, few-alone, early, early-alone, earlyPf, earlyPf-alone)
		}
		for i := range ws {
			gpu.Free(ws[i])
			gpu.Free(ys[i])
		}
		gpu.Free(x)
	}
	sb.WriteString("\n(µs, median of 60 replays; \"(+g)\" = the part after the spin: GEMV time left)\n")
	fmt.Print(sb.String())
	if po := os.Getenv("ORCH_PERF_OUT"); po != "" {
		require.NoError(t, os.WriteFile(strings.TrimSuffix(po, ".md")+"-l2pf.md", []byte(sb.String()), 0o644))
	}
	if os.Getenv("ORCH_L2PF_STEP") != "" {
		perfChildren(t, "TestPerfL2Prefetch", "ORCH_L2PF_STEP_CHILD",
			[]string{"ORCH_CUDA_L2PF=0", "ORCH_CUDA_L2PF=1", "ORCH_CUDA_L2PF=2", "ORCH_CUDA_L2PF=3",
				"ORCH_CUDA_L2PF=3 ORCH_CUDA_L2PF_MODE=stream", "ORCH_CUDA_L2PF=1 ORCH_CUDA_L2PF_POLICY=last",
				"ORCH_CUDA_L2PF=2 ORCH_CUDA_L2PF_POLICY=last", "ORCH_CUDA_L2PF=1 ORCH_CUDA_L2PF_CTAS=8",
				"ORCH_CUDA_L2PF=1 ORCH_CUDA_L2PF_DRY=1"},
			[]string{"| synthetic gpt-oss decode step (separate q/k/v, depth 128), graph | ms | tok/s | |", "|---|---|---|---|"},
			"perf-l2pf-step.md")
	}
}
