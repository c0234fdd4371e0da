//go:build gpu

package cuda

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// TestPerf times the kernels at gpt-oss-20b shapes with device events and a
// synthetic decode step (24 layers, captured into a CUDA graph and replayed).
// Weights are random (valid blocks), never zeros. It runs only with
// ORCH_GPU_PERF=1 and prints a markdown table (also to $ORCH_PERF_OUT).

type perfRow struct {
	name      string
	bytes     float64 // minimum device bytes moved
	flops     float64
	ms        float64
	peakBytes float64 // measured copy bandwidth, bytes/s
	// peakFlops > 0 (GEMM rows): the floor is max(bytes floor, flops floor)
	// at this rate (dense bf16 tensor rate of the card, from its data sheet).
	peakFlops float64
}

// h100BF16 is the H100 SXM dense bf16 tensor-core rate (989 TFLOP/s, data
// sheet; the WMMA / mma.sync path of qgemm cannot reach it, wgmma can).
const h100BF16 = 989e12

func (p perfRow) String() string {
	floor := p.bytes / p.peakBytes * 1e3
	if p.peakFlops > 0 {
		floor = max(floor, p.flops/p.peakFlops*1e3)
	}
	bw := p.bytes / (p.ms * 1e-3) / 1e9
	return fmt.Sprintf("| %s | %.2f MB | %.3g | %.4f ms | %.4f ms | %.0f GB/s | %.0f%% |",
		p.name, p.bytes/1e6, p.flops, p.ms, floor, bw, 100*floor/p.ms)
}

// timeMs returns the median over reps of fn's device time (events around it).
func timeMs(t *testing.T, reps int, fn func()) float64 {
	var e0, e1 uintptr
	require.NoError(t, gpu.l.status("event", gpu.l.eventCreate(&e0)))
	require.NoError(t, gpu.l.status("event", gpu.l.eventCreate(&e1)))
	defer gpu.l.eventDestroy(e0)
	defer gpu.l.eventDestroy(e1)
	for i := 0; i < 3; i++ { // warm-up
		fn()
	}
	require.NoError(t, gpu.Sync())
	ts := make([]float64, reps)
	for i := range ts {
		gpu.l.eventRecord(gpu.ctx, e0)
		fn()
		gpu.l.eventRecord(gpu.ctx, e1)
		var ms float32
		require.NoError(t, gpu.l.status("elapsed", gpu.l.eventElapsed(e0, e1, &ms)))
		ts[i] = float64(ms)
	}
	require.NoError(t, gpu.Sync())
	slices.Sort(ts)
	return ts[len(ts)/2]
}

var graphSeq int

// timeKernel measures fn's GPU time without host launch overhead: inner
// back-to-back calls are captured into one CUDA graph, the graph is replayed
// reps times, and the median replay time / inner is returned. (Timing one
// eager call with events also counts the host-side launch path: v1 of this
// table did that and over-stated small kernels by ~10-15 us each.)
func timeKernel(t *testing.T, reps, inner int, fn func()) float64 {
	graphSeq++
	key := fmt.Sprintf("perf-%d", graphSeq)
	run := func() {
		require.NoError(t, gpu.Run(key, func() {
			for i := 0; i < inner; i++ {
				fn()
			}
		}))
	}
	return timeMs(t, reps, run) / float64(inner)
}

func mustW(t *testing.T, r randSrc, name string, dt ml.DType, shape ...int) ml.Tensor {
	rows := 1
	for _, d := range shape[1:] {
		rows *= d
	}
	w, err := gpu.Weight(name, dt, shape, r.weight(dt, shape[0], rows))
	require.NoError(t, err)
	return w
}

func mustA(t *testing.T, dt ml.DType, shape ...int) ml.Tensor {
	x, err := gpu.Alloc(dt, shape...)
	require.NoError(t, err)
	return x
}

func TestPerf(t *testing.T) {
	if os.Getenv("ORCH_GPU_PERF") == "" {
		t.Skip("set ORCH_GPU_PERF=1 to run the timing table")
	}
	r := newRandSrc(newRNG(t))
	var rows []perfRow
	var notes []string

	// Copy bandwidth ceiling: 1 GiB device-to-device, bytes read + written.
	peak := copyPeak(t)
	notes = append(notes, fmt.Sprintf("device-to-device copy: %.0f GB/s (read+write)", peak/1e9))

	const d, nh, nkv, hd, ff, ne, topk, vocab = 2880, 64, 8, 64, 2880, 32, 4, 201088
	qkvOut := (nh + 2*nkv) * hd
	rowB := func(dt ml.DType, k int) float64 { b, _ := dt.RowBytes(k); return float64(b) }

	// GEMV (n=1) at decode shapes; weights rotated over copies to defeat L2 (50 MB).
	gemv := func(name string, dt ml.DType, k, m, n, copies int) {
		ws := make([]ml.Tensor, copies)
		for i := range ws {
			ws[i] = mustW(t, r, name, dt, k, m)
		}
		x := mustA(t, ml.F32, k, n)
		require.NoError(t, gpu.WriteF32(x, r.f32(k*n)))
		y := mustA(t, ml.F32, m, n)
		i := 0
		ms := timeKernel(t, 20, 16, func() { gpu.MatMul(y, x, ws[i%copies], nil); i++ })
		eager := timeMs(t, 20, func() { gpu.MatMul(y, x, ws[i%copies], nil); i++ })
		notes = append(notes, fmt.Sprintf("%s %v n=%d: eager single call (event-timed, includes host launch path) %.4f ms", name, dt, n, eager))
		require.NoError(t, gpu.Sync())
		rows = append(rows, perfRow{fmt.Sprintf("matmul %v %dx%d n=%d", dt, k, m, n),
			rowB(dt, k)*float64(m) + 4*float64(k*n+m*n), 2 * float64(k*m*n), ms, peak, 0})
		for _, w := range ws {
			gpu.Free(w)
		}
		gpu.Free(x)
		gpu.Free(y)
	}
	gemv("attn_qkv", ml.Q8_0, d, qkvOut, 1, 8)
	gemv("attn_out", ml.Q8_0, nh*hd, d, 1, 8)
	gemv("output", ml.Q8_0, d, vocab, 1, 1)
	gemv("expert", ml.MXFP4, d, ff, 1, 16)
	gemv("attn_qkv", ml.Q8_0, d, qkvOut, 8, 8)
	gemv("f16", ml.F16, 4096, 4096, 1, 4)
	gemv("q4k", ml.Q4_K, 4096, 4096, 1, 8)
	gemv("q6k", ml.Q6_K, 4096, 4096, 1, 8)
	gemv("attn_qkv", ml.Q8_0, d, qkvOut, 512, 1)

	// Round 3: tensor-core GEMM (orch_qgemm) at prefill / multi-stream
	// shapes: the routed MatMul, every tile config forced, and the v1 path
	// (ORCH_CUDA_GEMM=v1). The floor column is max(bytes, FLOPs at 989 TF).
	gemm := func(name string, dt ml.DType, k, m, n, copies int) {
		ws := make([]ml.Tensor, copies)
		for i := range ws {
			ws[i] = mustW(t, r, name, dt, k, m)
		}
		x := mustA(t, ml.F32, k, n)
		require.NoError(t, gpu.WriteF32(x, r.f32(k*n)))
		y := mustA(t, ml.F32, m, n)
		bytes := rowB(dt, k)*float64(m) + 4*float64(k*n+m*n)
		flops := 2 * float64(k) * float64(m) * float64(n)
		i := 0
		run := func(label string, v1 bool, tile int32, minN int) {
			defer func(a bool, b int32, c, d int) { gemmV1, gemmTile, qgemmMinN, qgemmMaxN = a, b, c, d }(gemmV1, gemmTile, qgemmMinN, qgemmMaxN)
			gemmV1, gemmTile, qgemmMinN = v1, tile, minN
			if minN == 1 { // forced: the GEMM at every n
				qgemmMaxN = 1 << 30
			}
			ms := timeKernel(t, 20, 8, func() { gpu.MatMul(y, x, ws[i%copies], nil); i++ })
			require.NoError(t, gpu.Sync())
			rows = append(rows, perfRow{fmt.Sprintf("matmul %v %dx%d n=%d %s", dt, k, m, n, label), bytes, flops, ms, peak, h100BF16})
		}
		run("(routed)", false, 0, qgemmMinN)
		for tile := int32(1); tile <= 5; tile++ {
			run(fmt.Sprintf("(qgemm tile %d)", tile), false, tile, 1)
			run(fmt.Sprintf("(qgemm tile %d, two-barrier schedule)", tile), false, tile|8, 1)
		}
		run("(v1: GEMV / dequant + cuBLAS)", true, 0, qgemmMinN)
		for _, w := range ws {
			gpu.Free(w)
		}
		gpu.Free(x)
		gpu.Free(y)
	}
	for _, n := range []int{8, 16, 64, 512} {
		copies := 8 // 15.7 MB: rotate to keep it out of the 50 MB L2 where memory-bound
		if n >= 512 {
			copies = 1
		}
		gemm("attn_qkv", ml.Q8_0, d, qkvOut, n, copies)
	}
	gemm("llama_ffn", ml.Q8_0, 4096, 14336, 512, 1)

	// Round 3: grouped MoE (router + top-4 + grouped expert GEMMs + combine)
	// at gpt-oss shape over 8, 64, 512 tokens, against the fused GEMV path.
	// Bytes: the experts a random routing touches on average,
	// ne * (1 - (1 - k/ne)^n) of them, each read once.
	for _, n := range []int{8, 64, 512} {
		mo := r.moe(t, d, ff, ne, topk)
		x := mustA(t, ml.F32, d, n)
		require.NoError(t, gpu.WriteF32(x, r.f32(d*n)))
		y := mustA(t, ml.F32, d, n)
		used := float64(ne) * (1 - math.Pow(1-float64(topk)/float64(ne), float64(n)))
		bytes := used*3*rowB(ml.MXFP4, d)*ff + rowB(ml.F32, d)*ne + 8*float64(d*n)
		flops := float64(n*topk) * 6 * d * ff
		run := func(label string, v1 bool, tile int32, minPairs, reps, inner int) {
			defer func(a bool, b int32, c int) { gemmV1, gemmTile, moeGroupedPairs = a, b, c }(gemmV1, gemmTile, moeGroupedPairs)
			gemmV1, gemmTile, moeGroupedPairs = v1, tile, minPairs
			ms := timeKernel(t, reps, inner, func() { gpu.MoE(y, x, mo) })
			require.NoError(t, gpu.Sync())
			rows = append(rows, perfRow{fmt.Sprintf("moe gpt-oss n=%d (%.1f experts) %s", n, used, label), bytes, flops, ms, peak, h100BF16})
		}
		run("(routed)", false, 0, moeGroupedPairs, 20, 8)
		for tile := int32(1); tile <= 5; tile++ {
			run(fmt.Sprintf("(grouped tile %d)", tile), false, tile, 1, 20, 8)
		}
		if n <= 64 {
			run("(v1: fused GEMV)", true, 0, moeGroupedPairs, 20, 8)
		} else {
			run("(v1: fused GEMV)", true, 0, moeGroupedPairs, 5, 1)
		}
		for _, w := range []ml.Tensor{mo.Router, mo.RouterBias, mo.Gate, mo.GateBias, mo.Up, mo.UpBias, mo.Down, mo.DownBias} {
			gpu.Free(w)
		}
		gpu.Free(x)
		gpu.Free(y)
	}

	// Attention decode over a paged F32/F16 cache at depth 4096.
	for _, kvdt := range []ml.DType{ml.F32, ml.F16} {
		const bs, depth = 16, 4096
		nb := depth / bs
		kc, vc := mustA(t, kvdt, hd, nkv, bs, nb), mustA(t, kvdt, hd, nkv, bs, nb)
		q := mustA(t, ml.F32, hd, nh, 1)
		require.NoError(t, gpu.WriteF32(q, r.f32(hd*nh)))
		o := mustA(t, ml.F32, hd, nh, 1)
		blocks := make([]int32, nb)
		for i := range blocks {
			blocks[i] = int32(i)
		}
		bt := r.batch(t, []int32{depth - 1}, []int32{0}, blocks, nb, bs)
		ms := timeKernel(t, 20, 16, func() { gpu.Attend(o, q, kc, vc, bt, &ml.Attention{Scale: 0.125}) })
		eb := 4.0
		if kvdt == ml.F16 {
			eb = 2
		}
		rows = append(rows, perfRow{fmt.Sprintf("attend decode %v depth %d", kvdt, depth),
			float64(depth*nkv*hd*2) * eb, float64(4 * depth * nh * hd), ms, peak, 0})
	}

	// The fused MoE op at decode (router + top-4 + 3 expert GEMVs + act + combine).
	{
		mo := r.moe(t, d, ff, ne, topk)
		x := mustA(t, ml.F32, d, 1)
		require.NoError(t, gpu.WriteF32(x, r.f32(d)))
		y := mustA(t, ml.F32, d, 1)
		ms := timeKernel(t, 20, 16, func() { gpu.MoE(y, x, mo) })
		rows = append(rows, perfRow{"moe decode (4 of 32 experts)", float64(topk)*3*rowB(ml.MXFP4, d)*ff + rowB(ml.F32, d)*ne,
			float64(topk) * 6 * d * ff, ms, peak, 0})
	}

	// Synthetic gpt-oss-20b decode step, graph-captured.
	for _, depth := range []int{128, 4096} {
		for _, n := range []int{1} {
			ms, bytes := r.decodeStep(t, depth, n, peak)
			rows = append(rows, perfRow{fmt.Sprintf("gpt-oss-20b shape decode step, %d seq at depth %d (graph)", n, depth),
				bytes, 0, ms, peak, 0})
			notes = append(notes, fmt.Sprintf("decode step depth %d: %.3f ms -> %.0f tok/s", depth, ms, 1e3/ms))
		}
	}
	require.NoError(t, gpu.Sync())

	var sb strings.Builder
	fmt.Fprintf(&sb, "device: %s (cc %d)\n\n", gpu.DeviceName(), gpu.ComputeCapability())
	sb.WriteString("| kernel | min bytes | FLOPs | measured (median) | bytes floor | achieved | of floor |\n|---|---|---|---|---|---|---|\n")
	for _, row := range rows {
		sb.WriteString(row.String() + "\n")
	}
	sb.WriteString("\n")
	for _, n := range notes {
		sb.WriteString("- " + n + "\n")
	}
	fmt.Print(sb.String())
	if p := os.Getenv("ORCH_PERF_OUT"); p != "" {
		require.NoError(t, os.WriteFile(p, []byte(sb.String()), 0o644))
	}
}

// randSrc caches one random pattern per dtype so multi-GB weight sets are
// cheap to make (distinct device copies of the same valid random blocks).
type randSrc struct {
	r   interface{ Uint64() uint64 }
	pat map[ml.DType][]byte
}

func newRandSrc(rr interface {
	Uint64() uint64
}) randSrc {
	rs := randSrc{r: rr, pat: map[ml.DType][]byte{}}
	return rs
}

func (s randSrc) f32(n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		// uniform in [-1, 1)
		v[i] = float32(int64(s.r.Uint64()>>11))/float32(1<<52) - 1
	}
	return v
}

// weight returns rows*RowBytes(k) bytes of valid random blocks.
func (s randSrc) weight(dt ml.DType, k, rows int) []byte {
	rb, err := dt.RowBytes(k)
	if err != nil {
		panic(err)
	}
	need := rb * rows
	const patRows = 4096
	p, ok := s.pat[dt]
	if !ok || len(p) < rb {
		p = randWeight(pcgFrom(s.r.Uint64()), dt, k, patRows)
		s.pat[dt] = p
	}
	out := make([]byte, need)
	for off := 0; off < need; off += copy(out[off:], p[:len(p)/rb*rb]) {
	}
	return out
}

func (s randSrc) batch(t *testing.T, pos, seq, blocks []int32, maxBlocks, bs int) *ml.Batch {
	n := len(pos)
	slots := make([]int32, n)
	for i, p := range pos {
		slots[i] = blocks[int(seq[i])*maxBlocks+int(p)/bs]*int32(bs) + p%int32(bs)
	}
	mk := func(v []int32, shape ...int) ml.Tensor {
		x := mustA(t, ml.I32, shape...)
		require.NoError(t, gpu.WriteI32(x, v))
		return x
	}
	return &ml.Batch{Pos: mk(pos, n), Seq: mk(seq, n), Slots: mk(slots, n),
		Blocks: mk(blocks, maxBlocks, len(blocks)/maxBlocks), BlockSize: bs, MaxPos: int(slices.Max(pos)) + 1}
}

func (s randSrc) moe(t *testing.T, d, ff, ne, topk int) *ml.MoE {
	f := func(n int, shape ...int) ml.Tensor {
		x := mustA(t, ml.F32, shape...)
		require.NoError(t, gpu.WriteF32(x, s.f32(n)))
		return x
	}
	return &ml.MoE{
		Router: mustW(t, s, "router", ml.F32, d, ne), RouterBias: f(ne, ne),
		Gate: mustW(t, s, "gate", ml.MXFP4, d, ff, ne), GateBias: f(ff*ne, ff, ne),
		Up: mustW(t, s, "up", ml.MXFP4, d, ff, ne), UpBias: f(ff*ne, ff, ne),
		Down: mustW(t, s, "down", ml.MXFP4, ff, d, ne), DownBias: f(d*ne, d, ne),
		TopK: topk, Alpha: 1.702, Limit: 7,
	}
}

// decodeStep builds a 24-layer gpt-oss-20b-shaped stack (Q8_0 attention and
// embeddings, MXFP4 experts, F32 norms/biases/sinks, F16 KV) and times one
// graph-replayed decode step of n sequences at depth. Returns ms and the
// minimum bytes a step reads.
func (s randSrc) decodeStep(t *testing.T, depth, n int, peak float64) (float64, float64) {
	ms, bytes := s.decodeSteps(t, depth, n, false, []stepCfg{{name: "default", fuse: fuseOps}})
	return ms[0], bytes
}

// stepCfg is one timed configuration of decodeSteps: launch merging
// (fuseOps) and programmatic dependent launch on or off.
type stepCfg struct {
	name      string
	fuse, pdl bool
}

// decodeSteps is decodeStep for several configurations of the same stack
// (one graph each). sep: q, k and v as three weights, outputs and bias adds
// in the order plugins/gpt's gpt-oss issues them (MatMul q, k, v, RoPE q, k),
// instead of one fused qkv weight.
func (s randSrc) decodeSteps(t *testing.T, depth, n int, sep bool, cfgs []stepCfg) ([]float64, float64) {
	const d, nh, nkv, hd, ff, ne, topk, vocab, layers, bs = 2880, 64, 8, 64, 2880, 32, 4, 201088, 24, 16
	qkvOut := (nh + 2*nkv) * hd
	f := func(v int, shape ...int) ml.Tensor {
		x := mustA(t, ml.F32, shape...)
		require.NoError(t, gpu.WriteF32(x, s.f32(v)))
		return x
	}
	type layer struct {
		norm1, norm2, qkvB, oB, sinks ml.Tensor
		qkv, o                        ml.Tensor
		wq, wk, wv, bq, bk, bv        ml.Tensor // sep
		moe                           *ml.MoE
		kc, vc                        ml.Tensor
	}
	nb := (depth+bs)/bs*n + 1
	maxBlocks := (depth + bs) / bs
	var ls []layer
	var freed []ml.Tensor
	for i := 0; i < layers; i++ {
		l := layer{norm1: f(d, d), norm2: f(d, d), qkvB: f(qkvOut, qkvOut), oB: f(d, d), sinks: f(nh, nh),
			qkv: mustW(t, s, "qkv", ml.Q8_0, d, qkvOut), o: mustW(t, s, "o", ml.Q8_0, nh*hd, d),
			moe: s.moe(t, d, ff, ne, topk),
			kc:  mustA(t, ml.F16, hd, nkv, bs, nb), vc: mustA(t, ml.F16, hd, nkv, bs, nb)}
		if sep {
			l.wq, l.wk, l.wv = mustW(t, s, "q", ml.Q8_0, d, nh*hd), mustW(t, s, "k", ml.Q8_0, d, nkv*hd), mustW(t, s, "v", ml.Q8_0, d, nkv*hd)
			l.bq, l.bk, l.bv = f(nh*hd, nh*hd), f(nkv*hd, nkv*hd), f(nkv*hd, nkv*hd)
			freed = append(freed, l.wq, l.wk, l.wv, l.bq, l.bk, l.bv)
		}
		ls = append(ls, l)
		freed = append(freed, l.norm1, l.norm2, l.qkvB, l.oB, l.sinks, l.qkv, l.o, l.kc, l.vc, l.moe.Router, l.moe.RouterBias,
			l.moe.Gate, l.moe.GateBias, l.moe.Up, l.moe.UpBias, l.moe.Down, l.moe.DownBias)
	}
	tokEmb := mustW(t, s, "tok", ml.Q8_0, d, vocab)
	head := mustW(t, s, "head", ml.Q8_0, d, vocab)
	normF := f(d, d)
	inv, scale, err := ml.YaRNInvFreq(150000, hd, ml.YaRN{Factor: 32, OrigContext: 4096})
	require.NoError(t, err)
	invT := mustA(t, ml.F32, hd/2)
	require.NoError(t, gpu.WriteF32(invT, inv))
	rope := &ml.Rope{Mode: ml.RopeNeoX, Dims: hd, InvFreq: invT, Scale: scale}

	pos, seq := make([]int32, n), make([]int32, n)
	blocks := make([]int32, maxBlocks*n)
	for i := range blocks {
		blocks[i] = int32(i % nb)
	}
	for i := 0; i < n; i++ {
		pos[i], seq[i] = int32(depth), int32(i)
	}
	bt := s.batch(t, pos, seq, blocks, maxBlocks, bs)
	ids := mustA(t, ml.I32, n)
	require.NoError(t, gpu.WriteI32(ids, make([]int32, n)))
	x, h := mustA(t, ml.F32, d, n), mustA(t, ml.F32, d, n)
	qkv := mustA(t, ml.F32, qkvOut, n)
	att := mustA(t, ml.F32, hd, nh, n)
	logits := mustA(t, ml.F32, vocab, n)
	next := mustA(t, ml.I32, n)
	require.Equal(t, 1, n, "the synthetic step slices q/k/v as contiguous views (n=1)")
	qkvHeads := mustReshape(t, qkv, hd, nh+2*nkv) // [hd, heads] for n=1
	qT, _ := gpu.Rows(qkvHeads, 0, nh)
	kT, _ := gpu.Rows(qkvHeads, nh, nkv)
	vT, _ := gpu.Rows(qkvHeads, nh+nkv, nkv)
	qT = mustReshape(t, qT, hd, nh, 1)
	kT = mustReshape(t, kT, hd, nkv, 1)
	vT = mustReshape(t, vT, hd, nkv, 1)
	attFlat := mustReshape(t, att, hd*nh, n)
	var q2, k2, v2 ml.Tensor
	if sep {
		q2, k2, v2 = mustA(t, ml.F32, nh*hd, n), mustA(t, ml.F32, nkv*hd, n), mustA(t, ml.F32, nkv*hd, n)
		qT, kT, vT = mustReshape(t, q2, hd, nh, n), mustReshape(t, k2, hd, nkv, n), mustReshape(t, v2, hd, nkv, n)
		freed = append(freed, q2, k2, v2)
	}

	step := func() {
		gpu.Embed(x, tokEmb, ids, false)
		for i, l := range ls {
			gpu.RMSNorm(h, x, l.norm1, 1e-5)
			if sep {
				gpu.MatMul(q2, h, l.wq, l.bq)
				gpu.MatMul(k2, h, l.wk, l.bk)
				gpu.MatMul(v2, h, l.wv, l.bv)
			} else {
				gpu.MatMul(qkv, h, l.qkv, l.qkvB)
			}
			gpu.RoPE(qT, bt.Pos, rope)
			gpu.RoPE(kT, bt.Pos, rope)
			gpu.KVWrite(l.kc, l.vc, kT, vT, bt)
			win := 0
			if i%2 == 0 {
				win = 128
			}
			gpu.Attend(att, qT, l.kc, l.vc, bt, &ml.Attention{Scale: 0.125, Window: win, Sinks: l.sinks})
			gpu.MatMul(h, attFlat, l.o, l.oB)
			gpu.AddRMSNorm(x, h, h, l.norm2, 1e-5)
			gpu.MoE(h, h, l.moe)
			gpu.Add(x, x, h)
		}
		gpu.RMSNorm(h, x, normF, 1e-5)
		gpu.MatMul(logits, h, head, nil)
		gpu.Argmax(next, logits)
	}
	var mss []float64
	for i, c := range cfgs {
		func() {
			defer func(v bool) { fuseOps = v }(fuseOps)
			fuseOps = c.fuse
			if c.name != "default" { // default: as the environment set it (ORCH_CUDA_PDL)
				was := gpu.setPDL(c.pdl)
				defer gpu.setPDL(was)
			}
			key := fmt.Sprintf("decode-%d-%d-%v-%s", depth, n, sep, c.name)
			ms := timeMs(t, 20, func() { require.NoError(t, gpu.Run(key, step)) })
			mss = append(mss, ms)
			if i == 0 {
				eager := timeMs(t, 5, step)
				t.Logf("decode depth %d (%s): graph %.3f ms, eager %.3f ms", depth, c.name, ms, eager)
			}
			require.NoError(t, gpu.Sync())
		}()
	}
	// Check the step computed finite logits.
	lg := make([]float32, vocab)
	require.NoError(t, gpu.ReadF32(logits, lg))
	for i, v := range lg {
		require.False(t, math.IsNaN(float64(v)) || math.IsInf(float64(v), 0), "logit %d = %v", i, v)
	}
	rb := func(dt ml.DType, k int) float64 { b, _ := dt.RowBytes(k); return float64(b) }
	perLayer := rb(ml.Q8_0, d)*float64(qkvOut) + rb(ml.Q8_0, nh*hd)*d + float64(topk)*3*rb(ml.MXFP4, d)*ff + 4*d*ne
	kv := 0.0
	for i := 0; i < layers; i++ {
		span := depth + 1
		if i%2 == 0 {
			span = min(span, 128)
		}
		kv += float64(span * nkv * hd * 2 * 2)
	}
	bytes := perLayer*layers + kv + rb(ml.Q8_0, d)*vocab
	gpu.ResetGraphs()
	for _, x := range freed {
		gpu.Free(x)
	}
	gpu.Free(tokEmb)
	gpu.Free(head)
	return mss, bytes
}

// TestPerfDecodeLaunches times the session-3 launch changes on a gpt-oss-20b
// decode step laid out as plugins/gpt issues it (separate q/k/v GEMVs and
// RoPEs), graph-replayed at depth 128: merged launches (fuse.go) and
// programmatic dependent launch, each on and off, on the same stack and card
// (TestPerf's decode rows use one fused qkv weight).
//
//	ORCH_GPU_PERF=1 bin/cuda-gpu.test -test.run TestPerfDecodeLaunches -test.v
func TestPerfDecodeLaunches(t *testing.T) {
	if os.Getenv("ORCH_GPU_PERF") == "" {
		t.Skip("set ORCH_GPU_PERF=1 to time the decode launch variants")
	}
	r := newRandSrc(newRNG(t))
	cfgs := []stepCfg{
		{"merged + PDL (defaults)", true, true}, {"merged, PDL off", true, false}, {"PDL, merging off", false, true},
		{"neither", false, false},
	}
	ms, _ := r.decodeSteps(t, 128, 1, true, cfgs)
	var sb strings.Builder
	fmt.Fprintf(&sb, "device: %s (cc %d)\n\n| gpt-oss-20b shape decode step, separate q/k/v (as plugins/gpt), depth 128, graph | ms | tok/s |\n|---|---|---|\n",
		gpu.DeviceName(), gpu.ComputeCapability())
	for i, c := range cfgs {
		fmt.Fprintf(&sb, "| %s | %.3f | %.0f |\n", c.name, ms[i], 1e3/ms[i])
	}

	// The merged pieces alone (16 back-to-back copies per graph, as TestPerf's
	// kernel rows): q/k/v GEMVs of one layer, and RoPE q, k + KV write.
	const d, nh, nkv, hd, bs = 2880, 64, 8, 64, 16
	const copies = 8
	type qkvW struct{ q, k, v, bq, bk, bv ml.Tensor }
	ws := make([]qkvW, copies)
	f := func(n int) ml.Tensor {
		x := mustA(t, ml.F32, n)
		require.NoError(t, gpu.WriteF32(x, r.f32(n)))
		return x
	}
	for i := range ws {
		ws[i] = qkvW{mustW(t, r, "q", ml.Q8_0, d, nh*hd), mustW(t, r, "k", ml.Q8_0, d, nkv*hd), mustW(t, r, "v", ml.Q8_0, d, nkv*hd),
			f(nh * hd), f(nkv * hd), f(nkv * hd)}
	}
	x := mustA(t, ml.F32, d, 1)
	require.NoError(t, gpu.WriteF32(x, r.f32(d)))
	q, k, v := mustA(t, ml.F32, hd, nh, 1), mustA(t, ml.F32, hd, nkv, 1), mustA(t, ml.F32, hd, nkv, 1)
	q2, k2, v2 := mustReshape(t, q, nh*hd, 1), mustReshape(t, k, nkv*hd, 1), mustReshape(t, v, nkv*hd, 1)
	kc, vc := mustA(t, ml.F16, hd, nkv, bs, 16), mustA(t, ml.F16, hd, nkv, bs, 16)
	bt := r.batch(t, []int32{100}, []int32{0}, []int32{3, 1, 4, 0, 5, 9, 2, 6, 7, 8, 10, 11, 12, 13, 14, 15}, 16, bs)
	inv, scale, err := ml.YaRNInvFreq(150000, hd, ml.YaRN{Factor: 32, OrigContext: 4096})
	require.NoError(t, err)
	invT := mustA(t, ml.F32, hd/2)
	require.NoError(t, gpu.WriteF32(invT, inv))
	rope := &ml.Rope{Mode: ml.RopeNeoX, Dims: hd, InvFreq: invT, Scale: scale}
	fmt.Fprintf(&sb, "\n| one layer's pieces, gpt-oss-20b shape, n=1 (graph of 16) | merged + PDL | merged | PDL | neither |\n|---|---|---|---|---|\n")
	pieces := []struct {
		name string
		fn   func(i int)
	}{
		{"MatMul q, k, v (+ bias; Q8_0 2880 -> 4096, 512, 512)", func(i int) {
			w := ws[i%copies]
			gpu.MatMul(q2, x, w.q, w.bq)
			gpu.MatMul(k2, x, w.k, w.bk)
			gpu.MatMul(v2, x, w.v, w.bv)
		}},
		{"RoPE q, RoPE k, KVWrite (F16 cache)", func(int) {
			gpu.RoPE(q, bt.Pos, rope)
			gpu.RoPE(k, bt.Pos, rope)
			gpu.KVWrite(kc, vc, k, v, bt)
		}},
	}
	for _, pc := range pieces {
		fmt.Fprintf(&sb, "| %s |", pc.name)
		for _, c := range cfgs {
			func() {
				defer func(v bool) { fuseOps = v }(fuseOps)
				fuseOps = c.fuse
				was := gpu.setPDL(c.pdl)
				defer gpu.setPDL(was)
				i := 0
				us := 1e3 * timeKernel(t, 20, 16, func() { pc.fn(i); i++ })
				fmt.Fprintf(&sb, " %.1f µs |", us)
			}()
		}
		sb.WriteString("\n")
	}
	require.NoError(t, gpu.Sync())
	fmt.Print(sb.String())
	if po := os.Getenv("ORCH_PERF_OUT"); po != "" {
		f := filepath.Join(filepath.Dir(po), "perf-launches.md")
		require.NoError(t, os.WriteFile(f, []byte(sb.String()), 0o644))
	}
}

// perfChildren runs test (this binary, -test.run ^test$) once per setting
// ("VAR=value") in a child process with childVar=1 set: the library reads its
// kernel switches once per process. It logs the table rows ("| ...") the
// children print and, with ORCH_PERF_OUT set, writes header and rows to
// outName next to it.
func perfChildren(t *testing.T, test, childVar string, settings, header []string, outName string) {
	table := append([]string(nil), header...)
	for _, v := range settings {
		cmd := exec.Command(os.Args[0], "-test.run", "^"+test+"$", "-test.v")
		cmd.Env = append(append(os.Environ(), childVar+"=1"), strings.Fields(v)...) // v: one or more VAR=value
		outp, err := cmd.CombinedOutput()
		for _, line := range strings.Split(string(outp), "\n") {
			if i := strings.Index(line, "|"); i >= 0 {
				t.Log(line[i:])
				table = append(table, line[i:])
			}
		}
		require.NoError(t, err, "%s child:\n%s", v, outp)
	}
	if po := os.Getenv("ORCH_PERF_OUT"); po != "" {
		f := filepath.Join(filepath.Dir(po), outName)
		require.NoError(t, os.WriteFile(f, []byte(strings.Join(table, "\n")+"\n"), 0o644))
	}
}

// TestPerfGEMVVersions times the one-token decode GEMVs (n = 1, 2; the Q8_0
// shapes and the two LM heads) under v5 pinned and the default route
// (session 5); with ORCH_GEMV_PERF_WIDE=1 as in session 4: n = 1, 2, 4, 8,
// 16, 32, 64
// and the MoE decode (n = 1, 8) under GEMV v5, v7 and v9 pinned and the
// default routing (session 4: v9 for n <= 64 but the LM head's n <= 2) —
// the library reads ORCH_CUDA_GEMV / ORCH_CUDA_MOE once per process, so each
// runs in a child process on the same card. Under v5 / v7 pinned, n > 8 is
// the bf16 GEMM (qgemm, n = 9..96: the pre-v9 route), so the table has the
// old and the new path of every (shape, n) side by side; the path column
// says which kernel ran. ORCH_CUDA_GEMV9_STAGE_KB=6: v9 with half-size stages (less shared memory
// per CTA, more stages); ORCH_CUDA_GEMV9_RG=1 (not in the list; run 7: RG 2
// faster at n = 32) pins one 16-row group per CTA.
//
//	ORCH_GPU_PERF=1 bin/cuda-gpu.test -test.run TestPerfGEMVVersions -test.v
func TestPerfGEMVVersions(t *testing.T) {
	if os.Getenv("ORCH_GPU_PERF") == "" {
		t.Skip("set ORCH_GPU_PERF=1 to time the GEMV versions")
	}
	if os.Getenv("ORCH_GEMV_SPEED_CHILD") == "" {
		if v := os.Getenv("ORCH_CUDA_GEMV") + os.Getenv("ORCH_CUDA_MOE"); v != "" {
			t.Skipf("ORCH_CUDA_GEMV / ORCH_CUDA_MOE pin this process; the timing runs from an unpinned one")
		}
		// Session 5: the one-token GEMVs only (n = 1, 2), v5 against the default
		// route; ORCH_GEMV_PERF_WIDE=1 restores session 4's table (n up to 64,
		// v7 / v9 / 5-CTA / small-stage children).
		// Session 6: the default (v5 at n <= 2, so the v5-pinned child is the same kernels and
		// is left out; x staged per round from k = 8192), x staged once (XR=0) and per round
		// (XR=1) for every k. (2 rows per warp lost in run 2: Llama down 37.6 vs 30.3 us; batched
		// cp.async staging of the float x lost end to end in run 3: deleted in session 7.)
		// Session 13: the default (16 / 32 warps per CTA by k on the repacked Q8_0 rows) against 8 (session 12's
		// kernels), 16 and 32 everywhere (ORCH_CUDA_GEMV5_W), instead of the XR children.
		settings := []string{"ORCH_CUDA_GEMV=", "ORCH_CUDA_GEMV5_W=8", "ORCH_CUDA_GEMV5_W=16", "ORCH_CUDA_GEMV5_W=32"}
		if os.Getenv("ORCH_GEMV_PERF_WIDE") != "" {
			settings = []string{"ORCH_CUDA_GEMV=v5", "ORCH_CUDA_GEMV=v7", "ORCH_CUDA_GEMV=v9", "ORCH_CUDA_GEMV=",
				"ORCH_CUDA_GEMV=v9 ORCH_CUDA_GEMV9_STAGE_KB=6"}
		}
		perfChildren(t, "TestPerfGEMVVersions", "ORCH_GEMV_SPEED_CHILD", settings,
			[]string{"| setting | shape | path | median | floor | of floor |", "|---|---|---|---|---|---|"}, "perf-gemv.md")
		return
	}
	label := "ORCH_CUDA_GEMV=" + os.Getenv("ORCH_CUDA_GEMV") + " ORCH_CUDA_MOE=" + os.Getenv("ORCH_CUDA_MOE")
	for _, v := range []string{"ORCH_CUDA_GEMV9_RG", "ORCH_CUDA_GEMV9_STAGE_KB", "ORCH_CUDA_GEMV5_XR", "ORCH_CUDA_GEMV5_W"} {
		if e := os.Getenv(v); e != "" {
			// v9's row groups per CTA (default: 2 from n = 17) / stage size (13 KB); v5's x staging
			label += " " + v + "=" + e
		}
	}
	r := newRandSrc(newRNG(t))
	peak := copyPeak(t)
	for _, sh := range []struct {
		name string
		dt   ml.DType
		k, m int
	}{{"attn qkv", ml.Q8_0, 2880, 5120}, {"attn out", ml.Q8_0, 4096, 2880}, {"expert", ml.MXFP4, 2880, 2880},
		{"expert gate_up", ml.MXFP4, 2880, 5760}, {"llama qkv", ml.Q8_0, 4096, 6144},
		{"llama gate/up", ml.Q8_0, 4096, 14336}, {"llama down", ml.Q8_0, 14336, 4096},
		{"llama head", ml.Q8_0, 4096, 128256}, {"gpt-oss head", ml.Q8_0, 2880, 201088}} {
		if only := os.Getenv("ORCH_GEMV_PERF_SHAPE"); only != "" && only != strings.ReplaceAll(sh.name, " ", "_") {
			continue // one shape, spaces as _ (e2e-gpu.sh step ncu profiles its kernels alone)
		}
		copies := 8 // > the L2 (50-60 MB) for every shape but the small ones
		if sh.m > 100000 {
			copies = 2 // the LM heads: 0.56 / 0.62 GB each
		}
		ws := make([]ml.Tensor, copies)
		for i := range ws {
			ws[i] = mustW(t, r, sh.name, sh.dt, sh.k, sh.m)
		}
		ns := []int{1, 2}
		if os.Getenv("ORCH_GEMV_PERF_WIDE") != "" {
			ns = []int{1, 2, 4, 8, 16, 32, 64}
		}
		for _, n := range ns {
			x := mustA(t, ml.F32, sh.k, n)
			require.NoError(t, gpu.WriteF32(x, r.f32(sh.k*n)))
			y := mustA(t, ml.F32, sh.m, n)
			i := 0
			ms := timeKernel(t, 20, 16, func() { gpu.MatMul(y, x, ws[i%copies], nil); i++ })
			rb, _ := sh.dt.RowBytes(sh.k)
			bytes := float64(rb*sh.m) + 4*float64(sh.k*n+sh.m*n)
			path := "GEMV"
			if n > 8 && !gemvWideFor(n, sh.k, sh.m) && n >= qgemmMinN && n <= qgemmMaxN {
				path = "qgemm (bf16 GEMM)"
			} else if n > 8 && !gemvWideFor(n, sh.k, sh.m) {
				path = "dequant + cuBLAS"
			}
			floor := bytes / peak * 1e3
			t.Logf("| %s | %s %v %dx%d n=%d | %s | %.1f us | %.1f us | %.0f%% |", label, sh.name, sh.dt, sh.k, sh.m, n, path,
				ms*1e3, floor*1e3, 100*floor/ms)
			gpu.Free(x)
			gpu.Free(y)
		}
		for _, w := range ws {
			gpu.Free(w)
		}
	}
	// Llama's feed-forward gate/up (Q8_0 4096 -> 2 x 14336) at n = 1, 2 (session 6): the merged
	// GEMV alone (one launch), merged GEMV + SwiGLU (two launches), and the folded
	// orch_matmul_swiglu (one launch; ORCH_CUDA_GLU=0 in the process makes it the two).
	func() {
		defer func(v bool) { fuseGLU = v }(fuseGLU)
		const k, m, copies = 4096, 14336, 2 // 2 x 2 x 117 MB: more than the L2
		wg, wu := make([]ml.Tensor, copies), make([]ml.Tensor, copies)
		for i := range wg {
			wg[i], wu[i] = mustW(t, r, "gate", ml.Q8_0, k, m), mustW(t, r, "up", ml.Q8_0, k, m)
		}
		rb, _ := ml.Q8_0.RowBytes(k)
		for _, n := range []int{1, 2} {
			x := mustA(t, ml.F32, k, n)
			require.NoError(t, gpu.WriteF32(x, r.f32(k*n)))
			g, u := mustA(t, ml.F32, m, n), mustA(t, ml.F32, m, n)
			floor := (2*float64(rb*m) + 4*float64(k*n+2*m*n)) / peak * 1e3
			for _, c := range []struct {
				path     string
				glu, act bool
			}{{"gate+up merged", false, false}, {"gate+up merged, SwiGLU", false, true}, {"gate+up+SwiGLU folded", true, true}} {
				fuseGLU = c.glu
				i := 0
				ms := timeKernel(t, 20, 16, func() {
					gpu.MatMul(g, x, wg[i%copies], nil)
					gpu.MatMul(u, x, wu[i%copies], nil)
					if c.act {
						gpu.SwiGLU(g, g, u)
					}
					i++
				})
				t.Logf("| %s | llama ffn Q8_0 %dx2x%d n=%d | %s | %.1f us | %.1f us | %.0f%% |", label, k, m, n, c.path,
					ms*1e3, floor*1e3, 100*floor/ms)
			}
			gpu.Free(x)
			gpu.Free(g)
			gpu.Free(u)
		}
		for i := range wg {
			gpu.Free(wg[i])
			gpu.Free(wu[i])
		}
	}()
	gemvFoldTable(t, r, label, peak)
	gemvTraceTable(t, r, label, peak)
	// MoE decode at gpt-oss shape (router + top-4 + fused expert FFN), 1 and 8 tokens.
	const d, ff, ne, topk = 2880, 2880, 32, 4
	mo := r.moe(t, d, ff, ne, topk)
	for _, n := range []int{1, 8} {
		x := mustA(t, ml.F32, d, n)
		require.NoError(t, gpu.WriteF32(x, r.f32(d*n)))
		y := mustA(t, ml.F32, d, n)
		ms := timeKernel(t, 20, 16, func() { gpu.MoE(y, x, mo) })
		t.Logf("| %s | moe decode gpt-oss n=%d | MoE | %.1f us | | |", label, n, ms*1e3)
		gpu.Free(x)
		gpu.Free(y)
	}
	for _, w := range []ml.Tensor{mo.Router, mo.RouterBias, mo.Gate, mo.GateBias, mo.Up, mo.UpBias, mo.Down, mo.DownBias} {
		gpu.Free(w)
	}
	require.NoError(t, gpu.Sync())
}

func mustReshape(t *testing.T, x ml.Tensor, shape ...int) ml.Tensor {
	y, err := gpu.Reshape(x, shape...)
	require.NoError(t, err)
	return y
}

func pcgFrom(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, 1)) }

// copyPeak times a 1 GiB device-to-device copy and returns the bytes read +
// written per second: the bandwidth ceiling the timing tables divide by.
func copyPeak(t *testing.T) float64 {
	const cb = 1 << 30
	var src, dst uintptr
	require.NoError(t, gpu.l.status("malloc", gpu.l.malloc(gpu.ctx, cb, &src)))
	require.NoError(t, gpu.l.status("malloc", gpu.l.malloc(gpu.ctx, cb, &dst)))
	defer gpu.l.free(gpu.ctx, src)
	defer gpu.l.free(gpu.ctx, dst)
	gpu.l.memset(gpu.ctx, src, 7, cb)
	copyMs := timeMs(t, 10, func() { gpu.call("copy", gpu.l.memcpyD2D(gpu.ctx, dst, src, cb)) })
	return 2 * cb / (copyMs * 1e-3)
}

// gemvFoldTable (session 8, normfold.go): Llama's GEMV -> AddRMSNorm -> GEMV(s) pairs as in the decode step
// (attention out -> FFN norm -> gate/up + SwiGLU; down -> attention norm -> q/k/v), 16 per graph, with the
// norm as its own kernel and folded into the two GEMVs (ORCH_CUDA_NORM_FOLD). Every 16th pair also runs a plain
// RMSNorm of the residual into h in both rows (the fold's h is otherwise materialised at the graph's end).
func gemvFoldTable(t *testing.T, r randSrc, label string, peak float64) {
	if gpu.l.matmulAddNorm == nil {
		t.Logf("| %s | norm fold | library without orch_matmul_addnorm | | | |", label)
		return
	}
	defer func(v bool) { fuseNormFold = v }(fuseNormFold)
	const d = 4096
	for _, sh := range []struct {
		name string
		kp   int   // the producer's k (its m is d)
		ms   []int // the consumers
		glu  bool
	}{{"llama out -> norm -> gate/up+SwiGLU", 4096, []int{14336, 14336}, true},
		{"llama down -> norm -> q/k/v", 14336, []int{4096, 1024, 1024}, false}} {
		const copies = 2
		wp, wc := make([]ml.Tensor, copies), make([][]ml.Tensor, copies)
		bytes := 0.0
		for i := 0; i < copies; i++ {
			wp[i] = mustW(t, r, "prod", ml.Q8_0, sh.kp, d)
			for _, m := range sh.ms {
				wc[i] = append(wc[i], mustW(t, r, "cons", ml.Q8_0, d, m))
			}
		}
		rb, _ := ml.Q8_0.RowBytes(sh.kp)
		bytes += float64(rb * d)
		for _, m := range sh.ms {
			rb, _ := ml.Q8_0.RowBytes(d)
			bytes += float64(rb * m)
		}
		nw := mustA(t, ml.F32, d)
		require.NoError(t, gpu.WriteF32(nw, r.f32(d)))
		for _, n := range []int{1, 2, 8} { // 8: GEMV v7 (gate/up then SwiGLU: two launches)
			x, y, res, h := mustA(t, ml.F32, sh.kp, n), mustA(t, ml.F32, d, n), mustA(t, ml.F32, d, n), mustA(t, ml.F32, d, n)
			require.NoError(t, gpu.WriteF32(x, r.f32(sh.kp*n)))
			ys := make([]ml.Tensor, len(sh.ms))
			for j, m := range sh.ms {
				ys[j] = mustA(t, ml.F32, m, n)
			}
			floor := bytes / peak * 1e3
			var base float64
			for _, fold := range []bool{false, true} {
				fuseNormFold = fold
				require.NoError(t, gpu.WriteF32(res, r.f32(d*n)))
				i := 0
				ms := timeKernel(t, 20, 16, func() {
					gpu.MatMul(y, x, wp[i%copies], nil)
					gpu.AddRMSNorm(res, h, y, nw, 1e-5)
					for j := range sh.ms {
						gpu.MatMul(ys[j], h, wc[i%copies][j], nil)
					}
					if sh.glu {
						gpu.SwiGLU(ys[0], ys[0], ys[1])
					}
					if i%16 == 15 {
						gpu.RMSNorm(h, res, nw, 1e-5)
					}
					i++
				})
				path := "GEMV -> norm -> GEMV"
				if fold {
					path = fmt.Sprintf("norm folded (%+.1f us)", (ms-base)*1e3)
				} else {
					base = ms
				}
				t.Logf("| %s | %s Q8_0 n=%d | %s | %.1f us | %.1f us | %.0f%% |", label, sh.name, n, path, ms*1e3,
					floor*1e3, 100*floor/ms)
			}
			for _, v := range append(ys, x, y, res, h) {
				gpu.Free(v)
			}
		}
		gpu.Free(nw)
		for i := range wp {
			gpu.Free(wp[i])
			for _, w := range wc[i] {
				gpu.Free(w)
			}
		}
	}
}

// gemvTraceTable (session 6, goal: where the ~3-4 us between two dependent
// one-token GEMVs go): a graph of 16 back-to-back Q8_0 GEMVs of each shape
// (as TestPerfGEMVVersions times them, PDL on) replayed once with the
// per-CTA trace on (orch_gemv_trace: %globaltimer at CTA start, after the
// PDL wait, after x is staged, at the end). Per launch L >= 1, medians over
// the 15: period = end(L) - end(L-1) (the chain time per GEMV); early = how
// long before end(L-1) the first CTA of L started (its pre-wait weight
// loads); lag = first wait return of L - end(L-1); staged = median CTA's
// staging done - end(L-1) (when the median CTA can issue its first FMA);
// stage = median (t2 - t1); tail = end(L) - 90th percentile of L's CTA ends;
// resident = CTAs of L started before end(L-1). tick = smallest nonzero
// timestamp difference seen (the timer's resolution).
func gemvTraceTable(t *testing.T, r randSrc, label string, peak float64) {
	const inner = 16
	recs := make([]gemvTraceRec, 1<<16)
	t.Logf("| %s | trace shape | CTAs | period | floor | early | lag | staged | stage | tail p90 | resident | tick |", label)
	for _, sh := range []struct {
		name string
		k, m int
		// session 7: 1 = RMSNorm -> GEMV pairs; the norm is not traced (its time is in period, lag and
		// staged)
		norm int
	}{{"attn qkv", 2880, 5120, 0}, {"attn out", 4096, 2880, 0}, {"llama qkv", 4096, 6144, 0},
		{"llama gate/up", 4096, 14336, 0}, {"llama down", 14336, 4096, 0},
		{"attn qkv, norm -> GEMV", 2880, 5120, 1}, {"llama qkv, norm -> GEMV", 4096, 6144, 1},
		{"llama gate/up, norm -> GEMV", 4096, 14336, 1}} {
		const copies = 4 // >= 100 MB: more than the L2 (and the table's time budget)
		ws := make([]ml.Tensor, copies)
		for i := range ws {
			ws[i] = mustW(t, r, sh.name, ml.Q8_0, sh.k, sh.m)
		}
		x, y := mustA(t, ml.F32, sh.k, 1), mustA(t, ml.F32, sh.m, 1)
		require.NoError(t, gpu.WriteF32(x, r.f32(sh.k)))
		h, nw := mustA(t, ml.F32, sh.k, 1), mustA(t, ml.F32, sh.k)
		require.NoError(t, gpu.WriteF32(nw, r.f32(sh.k)))
		var cnt int64
		trace := func(on int32) {
			require.NoError(t, gpu.l.status("gemv_trace", gpu.l.gemvTrace(gpu.ctx, on, &recs[0], int64(len(recs)), &cnt)))
		}
		graphSeq++
		key := fmt.Sprintf("trace-%d", graphSeq)
		i := 0
		body := func() {
			for j := 0; j < inner; j++ {
				if sh.norm > 0 {
					gpu.RMSNorm(h, x, nw, 1e-5)
					gpu.MatMul(y, h, ws[i%copies], nil)
				} else {
					gpu.MatMul(y, x, ws[i%copies], nil)
				}
				i++
			}
		}
		trace(1) // the traced kernels from the capture on
		require.NoError(t, gpu.Run(key, body))
		require.NoError(t, gpu.Run(key, body))
		trace(1) // reset
		require.NoError(t, gpu.Run(key, body))
		trace(0)
		n := int(min(cnt, int64(len(recs))))
		rs := slices.Clone(recs[:n])
		for _, w := range ws {
			gpu.Free(w)
		}
		for _, v := range []ml.Tensor{x, y, h, nw} {
			gpu.Free(v)
		}
		rb, _ := ml.Q8_0.RowBytes(sh.k)
		floor := (float64(rb*sh.m) + 4*float64(sh.k+sh.m)) / peak * 1e6 // us
		if n == 0 || n%inner != 0 || cnt > int64(len(recs)) {
			t.Logf("| %s | trace %s | %d records (want a multiple of %d): no table |", label, sh.name, cnt, inner)
			continue
		}
		slices.SortFunc(rs, func(a, b gemvTraceRec) int {
			switch {
			case a.t0 < b.t0:
				return -1
			case a.t0 > b.t0:
				return 1
			}
			return 0
		})
		// Relative to the first start: %globaltimer is ~1e18 ns, beyond float64's exact integers.
		base := rs[0].t0
		for i := range rs {
			for _, p := range []*uint64{&rs[i].t0, &rs[i].t1, &rs[i].t2, &rs[i].t3} {
				*p -= min(base, *p)
			}
		}
		// Launch of each record: its block's occurrence count in start order
		// (block b of launch L+1 cannot start before block b of launch L).
		seen := map[uint32]int{}
		byL := make([][]gemvTraceRec, inner)
		for _, c := range rs {
			l := seen[c.blk]
			seen[c.blk]++
			if l < inner {
				byL[l] = append(byL[l], c)
			}
		}
		var tick uint64 = math.MaxUint64
		for _, c := range rs {
			for _, d := range []uint64{c.t1 - c.t0, c.t2 - c.t1, c.t3 - c.t2} {
				if d > 0 && d < tick && d < 1<<40 {
					tick = d
				}
			}
		}
		end := make([]float64, inner)
		for l, cs := range byL {
			for _, c := range cs {
				end[l] = math.Max(end[l], float64(c.t3))
			}
		}
		med := func(v []float64) float64 {
			if len(v) == 0 {
				return math.NaN()
			}
			slices.Sort(v)
			return v[len(v)/2]
		}
		var period, early, lag, staged, stage, tail, resident []float64
		for l := 1; l < inner; l++ {
			cs := byL[l]
			if len(cs) == 0 {
				continue
			}
			start, w0 := math.Inf(1), math.Inf(1)
			var t2s, st, t3s []float64
			res := 0
			for _, c := range cs {
				start = math.Min(start, float64(c.t0))
				w0 = math.Min(w0, float64(c.t1))
				t2s = append(t2s, float64(c.t2))
				st = append(st, float64(c.t2)-float64(c.t1))
				t3s = append(t3s, float64(c.t3))
				if float64(c.t0) < end[l-1] {
					res++
				}
			}
			slices.Sort(t3s)
			period = append(period, end[l]-end[l-1])
			early = append(early, end[l-1]-start)
			lag = append(lag, w0-end[l-1])
			staged = append(staged, med(t2s)-end[l-1])
			stage = append(stage, med(st))
			tail = append(tail, end[l]-t3s[len(t3s)*9/10])
			resident = append(resident, float64(res))
		}
		us := func(v []float64) float64 { return med(v) / 1e3 }
		t.Logf("| %s | trace %s Q8_0 %dx%d n=1 | %d | %.2f us | %.1f us | %.2f us | %.2f us | %.2f us | %.2f us | %.2f us | %.0f | %d ns |",
			label, sh.name, sh.k, sh.m, len(byL[1]), us(period), floor, us(early), us(lag), us(staged), us(stage), us(tail),
			med(resident), tick)
	}
}
