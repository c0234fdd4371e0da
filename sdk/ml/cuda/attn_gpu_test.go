//go:build gpu

// Attention kernels vs the CPU backend over every supported head dim
// (multiples of 16 up to 256): decode batches at depths 1..5000, prefill
// chunks of 7, 64 and 300 tokens after a cached history (mixed with decode
// tokens of other sequences), windows, sinks, GQA and MHA, F32 and F16 KV,
// shuffled (ragged) block tables of odd block sizes. Uses gpu_test.go's
// helpers (pair, i32Pair, f32Pair, out, checkClose, newRNG).

package cuda

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// attnSpec is one Attend call: sequence s holds hist[s] cached tokens and
// queries newT[s] new ones (written to the cache first, as a model does).
type attnSpec struct {
	hd, nh, nkv int
	window      int
	sinks       bool
	kv          ml.DType
	bs          int
	hist, newT  []int
	maxPosSlack int // Batch.MaxPos = longest sequence + slack (a graph may pass more)
	// replays > 0: the GPU call is captured in a CUDA graph and replayed this
	// many times, the output poisoned (NaN) before each replay and compared
	// after it (state a kernel keeps between launches, e.g. v8's tickets,
	// must be back where it started).
	replays int
}

func (c attnSpec) String() string {
	return fmt.Sprintf("hd=%d/h=%d/kv=%d/win=%d/sinks=%v/%v/bs=%d/hist=%v/new=%v", c.hd, c.nh, c.nkv, c.window, c.sinks,
		c.kv, c.bs, c.hist, c.newT)
}

// roundHalf rounds v to float16 precision, so the CPU reference (F32 cache)
// sees exactly the values an F16 cache holds.
func roundHalf(v []float32) []float32 {
	for i, f := range v {
		v[i] = ml.HalfToFloat(ml.FloatToHalf(f))
	}
	return v
}

// runAttn writes K/V of every position of every sequence through KVWrite on
// both backends, runs Attend for the new tokens and compares.
func runAttn(t *testing.T, r *rand.Rand, c attnSpec) {
	t.Helper()
	bs := c.bs
	maxLen := 0
	for s := range c.hist {
		maxLen = max(maxLen, c.hist[s]+c.newT[s])
	}
	maxBlocks := (maxLen + bs - 1) / bs
	nb := maxBlocks*len(c.hist) + 3
	perm := r.Perm(nb)
	blocks := make([]int32, maxBlocks*len(c.hist))
	for i := range blocks {
		blocks[i] = int32(perm[i])
	}
	hd, nkv, nh := c.hd, c.nkv, c.nh
	var pos, seq, slots []int32    // every position: KV write
	var qpos, qseq, qslots []int32 // new tokens: queries
	for s := range c.hist {
		for p := 0; p < c.hist[s]+c.newT[s]; p++ {
			sl := blocks[s*maxBlocks+p/bs]*int32(bs) + int32(p%bs)
			pos, seq, slots = append(pos, int32(p)), append(seq, int32(s)), append(slots, sl)
			if p >= c.hist[s] {
				qpos, qseq, qslots = append(qpos, int32(p)), append(qseq, int32(s)), append(qslots, sl)
			}
		}
	}
	n, nq := len(pos), len(qpos)
	bp := i32Pair(t, blocks, maxBlocks, len(c.hist))
	mkBatch := func(pos, seq, slots []int32) (*ml.Batch, *ml.Batch) {
		pp, sp, slp := i32Pair(t, pos, len(pos)), i32Pair(t, seq, len(pos)), i32Pair(t, slots, len(pos))
		return &ml.Batch{Pos: pp.g, Seq: sp.g, Slots: slp.g, Blocks: bp.g, BlockSize: bs, MaxPos: maxLen + c.maxPosSlack},
			&ml.Batch{Pos: pp.c, Seq: sp.c, Slots: slp.c, Blocks: bp.c, BlockSize: bs, MaxPos: maxLen}
	}
	bg, bc := mkBatch(pos, seq, slots)
	qbg, qbc := mkBatch(qpos, qseq, qslots)
	kc := f32Pair(t, nil, hd, nkv, bs, nb)
	vc := f32Pair(t, nil, hd, nkv, bs, nb)
	kg, vg := kc.g, vc.g
	kd, vd := randF32(r, hd*nkv*n, 1), randF32(r, hd*nkv*n, 1)
	if c.kv == ml.F16 {
		var err error
		kg, err = gpu.Alloc(ml.F16, hd, nkv, bs, nb)
		require.NoError(t, err)
		vg, err = gpu.Alloc(ml.F16, hd, nkv, bs, nb)
		require.NoError(t, err)
		t.Cleanup(func() { gpu.Free(kg); gpu.Free(vg) })
		kd, vd = roundHalf(kd), roundHalf(vd)
	}
	k := f32Pair(t, kd, hd, nkv, n)
	v := f32Pair(t, vd, hd, nkv, n)
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
	ref.Attend(y.c, q.c, kc.c, vc.c, qbc, &ac)
	if c.replays == 0 {
		gpu.Attend(y.g, q.g, kg, vg, qbg, a)
		require.NoError(t, gpu.Err(), "attend")
		checkAttnRows(t, y, qseq, qpos, hd, nh)
		return
	}
	graphSeq++
	key := fmt.Sprintf("attn-replay-%d", graphSeq)
	for i := 0; i < c.replays; i++ {
		gpu.Fill(y.g, float32(math.NaN()))
		require.NoError(t, gpu.Run(key, func() { gpu.Attend(y.g, q.g, kg, vg, qbg, a) }), "graph run %d", i)
		require.NoError(t, gpu.Err(), "attend, graph run %d", i)
		checkAttnRows(t, y, qseq, qpos, hd, nh)
	}
}

// attnTCOn mirrors the library's choice of the tensor-core prefill kernel
// (attention.cu launch_attn): head dim <= 128, at least attnTCMinRun query
// rows in the call.
func attnTCOn(hd, nq int) bool {
	return hd%16 == 0 && hd <= 128 && nq >= attnTCMinRun
}

const (
	attnTCRows   = 64 // ATTN_TC_ROWS
	attnTCMinRun = 16 // ATTN_TC_MIN_RUN
)

// attnTCTakes mirrors attn_tc_takes (cuda/src/attention_index.cuh): row t is
// the tensor-core kernel's if the run of same-sequence consecutive-position
// rows at the start of its 64-row tile has >= 16 rows and t is inside it.
func attnTCTakes(seq, pos []int32, t int) bool {
	t0 := t - t%attnTCRows
	run := 0
	for run < attnTCRows && t0+run < len(seq) && seq[t0+run] == seq[t0] && pos[t0+run] == pos[t0]+int32(run) {
		run++
	}
	return run >= attnTCMinRun && t-t0 < run
}

// checkAttnRows compares attention rows: the float32 kernels' rows within
// 2e-5 (F16 inputs are pre-rounded, so both sides see the same values; what
// differs is summation order and __expf), the tensor-core kernel's rows
// (fp16 q, K, V, P; fp32 accumulation and softmax) within 3e-3 overall and
// 1e-2 per row. Every element must have been written (outputs are NaN-poisoned).
func checkAttnRows(t *testing.T, y pair, seq, pos []int32, hd, nh int) {
	t.Helper()
	g, c := readBoth(t, y)
	tc := attnTCOn(hd, len(seq))
	var num, den [2]float64
	var worst [2]float64
	var rows [2]int
	for r := range seq {
		k := 0
		if tc && attnTCTakes(seq, pos, r) {
			k = 1
		}
		rows[k]++
		for h := 0; h < nh; h++ {
			var rn, rd float64
			for d := 0; d < hd; d++ {
				i := (r*nh+h)*hd + d
				if math.IsNaN(float64(g[i])) || math.IsInf(float64(g[i]), 0) {
					t.Fatalf("attend: row %d head %d dim %d is %v (unwritten?); reference %v", r, h, d, g[i], c[i])
				}
				e := float64(g[i]) - float64(c[i])
				rn += e * e
				rd += float64(c[i]) * float64(c[i])
			}
			num[k] += rn
			den[k] += rd
			worst[k] = math.Max(worst[k], math.Sqrt(rn/math.Max(rd, 1e-30)))
		}
	}
	tol := [2]float64{2e-5, 3e-3}
	rowTol := [2]float64{1e-4, 1e-2}
	for k, name := range []string{"fp32 kernels", "tensor-core kernel"} {
		if rows[k] == 0 {
			continue
		}
		rel := math.Sqrt(num[k] / math.Max(den[k], 1e-30))
		t.Logf("attend, %s: %d rows, rel err %.3g, worst row %.3g", name, rows[k], rel, worst[k])
		if rel > tol[k] || worst[k] > rowTol[k] {
			t.Fatalf("attend, %s: rel err %.3g (tol %.3g), worst row %.3g (tol %.3g)", name, rel, tol[k], worst[k], rowTol[k])
		}
	}
}

// The head dims the task and the model zoo need get every scenario; the other
// multiples of 16 get a decode and a prefill case each.
var (
	attnMainDims  = []int{16, 32, 64, 80, 96, 128, 256}
	attnOtherDims = []int{48, 112, 144, 160, 176, 192, 208, 224, 240}
)

func TestAttentionHeadDims(t *testing.T) {
	r := newRNG(t)
	var cases []attnSpec
	for _, hd := range attnMainDims {
		for _, kv := range []ml.DType{ml.F32, ml.F16} {
			for _, ws := range []struct {
				window int
				sinks  bool
			}{{0, false}, {128, true}, {5, false}} {
				// Decode: one token of each of six sequences at depths 1..5000.
				cases = append(cases, attnSpec{hd: hd, nh: 8, nkv: 2, window: ws.window, sinks: ws.sinks, kv: kv, bs: 16,
					hist: []int{0, 1, 4, 99, 999, 4999}, newT: []int{1, 1, 1, 1, 1, 1}, maxPosSlack: r.IntN(3000)})
				// Decode of a single token (n_tok 1) at a random depth up to 5000, MHA.
				cases = append(cases, attnSpec{hd: hd, nh: 4, nkv: 4, window: ws.window, sinks: ws.sinks, kv: kv, bs: 16,
					hist: []int{r.IntN(5000)}, newT: []int{1}})
				// Prefill chunks of 7, 64 and 300 after a history, next to a
				// decode token of another sequence; odd block size.
				for _, chunk := range []int{7, 64, 300} {
					cases = append(cases, attnSpec{hd: hd, nh: 8, nkv: 2, window: ws.window, sinks: ws.sinks, kv: kv, bs: 7,
						hist: []int{r.IntN(40), 57}, newT: []int{chunk, 1}, maxPosSlack: r.IntN(100)})
				}
			}
		}
	}
	for _, hd := range attnOtherDims {
		kv := []ml.DType{ml.F32, ml.F16}[hd/16%2]
		cases = append(cases,
			attnSpec{hd: hd, nh: 6, nkv: 3, sinks: true, kv: kv, bs: 16, hist: []int{0, 2000}, newT: []int{1, 1}},
			attnSpec{hd: hd, nh: 4, nkv: 1, window: 9, kv: kv, bs: 5, hist: []int{3, 0}, newT: []int{64, 7}})
	}
	// Decode steps as a captured graph runs them (Batch.MaxPos = the context
	// length, far past the rows' depths: the grid is sized for it, the
	// kernels size the work from the actual depths): gpt-oss's shape (64 q /
	// 8 kv heads of 64, sinks; full and window 128) and MHA, sequences of
	// very different depths in one batch, around the 128-key split sizes.
	for _, hd := range []int{64, 128, 80} {
		for _, kv := range []ml.DType{ml.F16, ml.F32} {
			for _, window := range []int{0, 128} {
				cases = append(cases,
					attnSpec{hd: hd, nh: 64, nkv: 8, window: window, sinks: true, kv: kv, bs: 16,
						hist: []int{0, 5, 127, 128, 129, 1000, 8191}, newT: []int{1, 1, 1, 1, 1, 1, 1}, maxPosSlack: 131072 - 8192,
						replays: 3},
					attnSpec{hd: hd, nh: 64, nkv: 8, window: window, sinks: true, kv: kv, bs: 16,
						hist: []int{r.IntN(300)}, newT: []int{1}, maxPosSlack: 8320},
					// One token at depths 512 / 3000 in a depth-8192 graph (v8: heads spread, several splits).
					attnSpec{hd: hd, nh: 64, nkv: 8, window: window, sinks: true, kv: kv, bs: 16,
						hist: []int{511 + r.IntN(2500)}, newT: []int{1}, maxPosSlack: 8320, replays: 3},
					attnSpec{hd: hd, nh: 8, nkv: 8, window: window, kv: kv, bs: 16,
						hist: []int{3, 255, 256, 2047}, newT: []int{1, 1, 1, 1}, maxPosSlack: 60000})
			}
		}
	}
	// gpt-oss-20b's attention shape (64 q / 8 kv heads of 64, window 128,
	// sinks), one 512-token prefill chunk.
	cases = append(cases, attnSpec{hd: 64, nh: 64, nkv: 8, window: 128, sinks: true, kv: ml.F16, bs: 16,
		hist: []int{0}, newT: []int{512}})
	for _, c := range cases {
		t.Run(c.String(), func(t *testing.T) { runAttn(t, r, c) })
	}
}

// TestPerfAttentionPrefill times Attend for prefill chunks of gpt-oss-20b (64
// q / 8 kv heads of 64; full and window-128 layers) and Llama-3-8B (32 / 8
// heads of 128), one sequence from position 0, eager (events around one
// call) and in a graph (4 calls per graph, per call), and decode rows of 1
// and 64 sequences at depths 128 .. 8192, eager and in a graph
// (attnDecodeSpeed). (The per-version children were dropped in session 7
// with the opt-in versions.)
//
//	ORCH_GPU_PERF=1 bin/cuda-gpu.test -test.run PerfAttentionPrefill -test.v
//
// (gpu-check --perf runs it with TestPerf: the name matches its -test.run.)
// The table also goes next to ORCH_PERF_OUT as perf-attention.md.
func TestPerfAttentionPrefill(t *testing.T) {
	if os.Getenv("ORCH_GPU_PERF") == "" {
		t.Skip("set ORCH_GPU_PERF=1 to time prefill attention")
	}
	var table []string
	logRow := func(format string, args ...any) {
		line := fmt.Sprintf(format, args...)
		t.Log(line)
		table = append(table, line)
	}
	defer func() {
		if po := os.Getenv("ORCH_PERF_OUT"); po != "" && len(table) > 0 {
			f := filepath.Join(filepath.Dir(po), "perf-attention.md")
			require.NoError(t, os.WriteFile(f, []byte(strings.Join(table, "\n")+"\n"), 0o644))
		}
	}()
	const nh, nkv, hd, bs = 64, 8, 64, 16
	r := newRNG(t)
	alloc := func(dt ml.DType, shape ...int) ml.Tensor {
		x, err := gpu.Alloc(dt, shape...)
		require.NoError(t, err)
		t.Cleanup(func() { gpu.Free(x) })
		return x
	}
	logRow("| attention on %s | time | FLOP/s (4*hd*heads per visible pair) |", gpu.DeviceName())
	attnDecodeSpeed(t, r, alloc, logRow)
	// Prefill: gpt-oss (64 q / 8 kv heads of 64, sinks; full and window-128
	// layers) and Llama-3-8B (32 / 8 heads of 128, full), one sequence from 0.
	for _, sh := range []struct {
		name        string
		nh, nkv, hd int
		sinks       bool
		windows     []int
		kvs         []ml.DType
	}{{"gpt-oss", nh, nkv, hd, true, []int{0, 128}, []ml.DType{ml.F16, ml.F32}},
		{"llama-8b", 32, 8, 128, false, []int{0}, []ml.DType{ml.F16}}} {
		for _, n := range []int{512, 2048} {
			nb := n / bs
			bt, _ := oneSeqBatch(t, r, alloc, n, bs)
			k, v, q := alloc(ml.F32, sh.hd, sh.nkv, n), alloc(ml.F32, sh.hd, sh.nkv, n), alloc(ml.F32, sh.hd, sh.nh, n)
			require.NoError(t, gpu.WriteF32(k, randF32(r, sh.hd*sh.nkv*n, 1)))
			require.NoError(t, gpu.WriteF32(v, randF32(r, sh.hd*sh.nkv*n, 1)))
			require.NoError(t, gpu.WriteF32(q, randF32(r, sh.hd*sh.nh*n, 1)))
			var sinks ml.Tensor
			if sh.sinks {
				sinks = alloc(ml.F32, sh.nh)
				require.NoError(t, gpu.WriteF32(sinks, randF32(r, sh.nh, 1)))
			}
			y := alloc(ml.F32, sh.hd, sh.nh, n)
			for _, kv := range sh.kvs {
				kc, vc := alloc(kv, sh.hd, sh.nkv, bs, nb), alloc(kv, sh.hd, sh.nkv, bs, nb)
				gpu.KVWrite(kc, vc, k, v, bt)
				for _, window := range sh.windows {
					a := &ml.Attention{Scale: float32(1 / math.Sqrt(float64(sh.hd))), Window: window, Sinks: sinks}
					fn := func() { gpu.Attend(y, q, kc, vc, bt, a) }
					ms := attnTimeMs(t, 10, fn)
					graph := timeKernel(t, 10, 4, fn)
					pairs := 0
					for p := 0; p < n; p++ {
						if window > 0 {
							pairs += min(p+1, window)
						} else {
							pairs += p + 1
						}
					}
					flop := 4 * float64(sh.hd) * float64(sh.nh) * float64(pairs)
					logRow("| prefill %s n=%d, %v KV, window %d | %.4f ms | graph %.4f ms | %.1f TFLOP/s in graph |",
						sh.name, n, kv, window, ms, graph, flop/graph/1e9)
				}
			}
		}
	}
}

// oneSeqBatch is the batch of one sequence's positions 0..n-1 over nb = n/bs
// shuffled KV blocks (MaxPos n), for the timing tests, and each position's
// cache slot.
func oneSeqBatch(t *testing.T, r *rand.Rand, alloc func(dt ml.DType, shape ...int) ml.Tensor, n, bs int) (*ml.Batch, []int32) {
	nb := n / bs
	perm := r.Perm(nb)
	blocks, pos, seq, slots := make([]int32, nb), make([]int32, n), make([]int32, n), make([]int32, n)
	for i := range blocks {
		blocks[i] = int32(perm[i])
	}
	for p := range pos {
		pos[p], slots[p] = int32(p), blocks[p/bs]*int32(bs)+int32(p%bs)
	}
	i32 := func(v []int32, shape ...int) ml.Tensor {
		x := alloc(ml.I32, shape...)
		require.NoError(t, gpu.WriteI32(x, v))
		return x
	}
	return &ml.Batch{Pos: i32(pos, n), Seq: i32(seq, n), Slots: i32(slots, n), Blocks: i32(blocks, nb, 1),
		BlockSize: bs, MaxPos: n}, slots
}

// attnDecodeSpeed times decode rows of the gpt-oss shape (F16 KV, full and
// window 128): one sequence and 64 sequences (one token each) at depths 128,
// 512, 4096 and 8192, with Batch.MaxPos as a captured decode graph of
// `orch-host bench --depth 8192` passes it (the context length: 8192 + 128
// generated + slack), whatever the depth. Two times per row: "eager" (events
// around one call: includes the host launch path, ~10 us) and "graph" (16
// back-to-back calls captured in one CUDA graph, per call: the cost inside a
// decode step's graph, launch gaps and PDL included), against the bytes
// floor (K and V of every visible key read once). The 64-sequence caches
// are zero-filled (distinct, shuffled blocks; timing does not depend on the
// values).
func attnDecodeSpeed(t *testing.T, r *rand.Rand, alloc func(dt ml.DType, shape ...int) ml.Tensor,
	logRow func(format string, args ...any)) {
	const nh, nkv, hd, bs, depth, maxPos = 64, 8, 64, 16, 8192, 8192 + 128 + 64
	nb := depth / bs
	bw, slots := oneSeqBatch(t, r, alloc, depth, bs)
	i32 := func(v []int32, shape ...int) ml.Tensor {
		x := alloc(ml.I32, shape...)
		require.NoError(t, gpu.WriteI32(x, v))
		return x
	}
	k, v := alloc(ml.F32, hd, nkv, depth), alloc(ml.F32, hd, nkv, depth)
	require.NoError(t, gpu.WriteF32(k, randF32(r, hd*nkv*depth, 1)))
	require.NoError(t, gpu.WriteF32(v, randF32(r, hd*nkv*depth, 1)))
	kc, vc := alloc(ml.F16, hd, nkv, bs, nb), alloc(ml.F16, hd, nkv, bs, nb)
	gpu.KVWrite(kc, vc, k, v, bw)
	sinks := alloc(ml.F32, nh)
	require.NoError(t, gpu.WriteF32(sinks, randF32(r, nh, 1)))
	// 64 sequences of `depth` positions each over shuffled distinct blocks.
	const nseq = 64
	kc64, vc64 := alloc(ml.F16, hd, nkv, bs, nb*nseq), alloc(ml.F16, hd, nkv, bs, nb*nseq)
	for _, c := range []ml.Tensor{kc64, vc64} {
		require.NoError(t, gpu.l.status("memset", gpu.l.memset(gpu.ctx, c.(*tensor).ptr, 0, int64(c.(*tensor).bytes))))
	}
	perm := r.Perm(nb * nseq)
	bt64 := make([]int32, nb*nseq)
	for i := range bt64 {
		bt64[i] = int32(perm[i])
	}
	blocks64 := i32(bt64, nb, nseq)
	for _, ns := range []int{1, nseq} {
		q := alloc(ml.F32, hd, nh, ns)
		require.NoError(t, gpu.WriteF32(q, randF32(r, hd*nh*ns, 1)))
		y := alloc(ml.F32, hd, nh, ns)
		for _, d := range []int{128, 512, 4096, depth} {
			pos, seq, sl := make([]int32, ns), make([]int32, ns), make([]int32, ns)
			bq := &ml.Batch{BlockSize: bs, MaxPos: maxPos}
			kcc, vcc := kc, vc
			if ns == 1 {
				pos[0], sl[0] = int32(d-1), slots[d-1]
				bq.Blocks = bw.Blocks
			} else {
				for i := range pos {
					pos[i], seq[i] = int32(d-1), int32(i)
					sl[i] = bt64[i*nb+(d-1)/bs]*bs + int32((d-1)%bs)
				}
				bq.Blocks, kcc, vcc = blocks64, kc64, vc64
			}
			bq.Pos, bq.Seq, bq.Slots = i32(pos, ns), i32(seq, ns), i32(sl, ns)
			for _, window := range []int{0, 128} {
				a := &ml.Attention{Scale: 0.125, Window: window, Sinks: sinks}
				fn := func() { gpu.Attend(y, q, kcc, vcc, bq, a) }
				eager := attnTimeMs(t, 20, fn)
				graph := timeKernel(t, 10, 16, fn)
				keys := d
				if window > 0 {
					keys = min(d, window)
				}
				bytes := float64(ns) * float64(keys) * nkv * hd * 2 * 2
				logRow("| decode %d seq x 1 token at depth %d (MaxPos %d), F16 KV, window %d | eager %.4f ms | graph %.4f ms | %.0f GB/s in graph (floor %.4f ms at 3 TB/s) |",
					ns, d, maxPos, window, eager, graph, bytes/graph/1e6, bytes/3e12*1e3)
			}
		}
	}
}

// attnTimeMs is the median over reps of fn's device time (events around an
// eager call), after 3 warm-up calls.
func attnTimeMs(t *testing.T, reps int, fn func()) float64 {
	var e0, e1 uintptr
	require.NoError(t, gpu.l.status("event", gpu.l.eventCreate(&e0)))
	require.NoError(t, gpu.l.status("event", gpu.l.eventCreate(&e1)))
	defer gpu.l.eventDestroy(e0)
	defer gpu.l.eventDestroy(e1)
	for i := 0; i < 3; i++ {
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

// Head dims the kernels do not take fail with a clear error (and no launch).
func TestAttentionUnsupportedHeadDim(t *testing.T) {
	for _, hd := range []int{8, 24, 272} {
		t.Run(fmt.Sprint(hd), func(t *testing.T) {
			bs, nkv, nh := 4, 1, 2
			blocks := i32Pair(t, []int32{0}, 1, 1)
			p := i32Pair(t, []int32{0}, 1)
			bt := &ml.Batch{Pos: p.g, Seq: p.g, Slots: p.g, Blocks: blocks.g, BlockSize: bs, MaxPos: 1}
			kc, err := gpu.Alloc(ml.F32, hd, nkv, bs, 1)
			require.NoError(t, err)
			vc, err := gpu.Alloc(ml.F32, hd, nkv, bs, 1)
			require.NoError(t, err)
			t.Cleanup(func() { gpu.Free(kc); gpu.Free(vc) })
			q := f32Pair(t, make([]float32, hd*nh), hd, nh, 1)
			y := out(t, hd, nh, 1)
			gpu.Attend(y.g, q.g, kc, vc, bt, &ml.Attention{Scale: 1})
			err = gpu.Sync()
			require.ErrorIs(t, err, ErrUnsupported)
			require.True(t, strings.Contains(err.Error(), "head_dim"), "error %q names the head dim", err)
			require.NoError(t, gpu.Sync(), "the error is not sticky after Sync")
		})
	}
}

// ropeFoldSpec is one RoPE(q), RoPE(k), KVWrite, Attend sequence of a decode
// step (foldAttnRoPE): sequence s has hist[s] cached positions and newT[s]
// new tokens (<= 8 in all).
type ropeFoldSpec struct {
	hd, nh, nkv, rot int
	mode             ml.RopeMode
	yarn             bool
	window           int
	sinks            bool
	kv               ml.DType
	hist, newT       []int
	maxPosSlack      int
	replays          int // > 0: the four ops captured in a graph and replayed (inputs rewritten, output poisoned)
}

// TestAttentionRoPEFold checks the RoPE + KV write folded into the decode
// attention launch (the default; ORCH_CUDA_ATTN_ROPE=0 off; fuse.go foldAttend,
// orch_attention_rope) against the same ops unfolded on the GPU (orch_rope_kv
// + orch_attention: output, F32 caches and q / k read back afterwards
// bit-identical; F16 caches through a second, plain Attend over them,
// bit-identical) and against the CPU backend (2e-5): gpt-oss's shape (NeoX,
// YaRN factor, sinks, full and window-128 layers, F16 KV), Llama's (GPT-J
// pairs, F16 and F32 KV), partial rotary, multi-token rows of one sequence,
// a graph-sized grid (MaxPos far past the rows), eager and graph replays.
func TestAttentionRoPEFold(t *testing.T) {
	if gpu.l.attentionRope == nil {
		t.Skip("library without orch_attention_rope")
	}
	defer func(v, w bool) { fuseOps, foldAttnRoPE = v, w }(fuseOps, foldAttnRoPE)
	fuseOps = true
	r := newRNG(t)
	var cases []ropeFoldSpec
	for _, kv := range []ml.DType{ml.F16, ml.F32} {
		for _, window := range []int{0, 128} {
			cases = append(cases,
				ropeFoldSpec{hd: 64, nh: 64, nkv: 8, rot: 64, mode: ml.RopeNeoX, yarn: true, window: window, sinks: true,
					kv: kv, hist: []int{r.IntN(3000)}, newT: []int{1}, maxPosSlack: 8320, replays: 2},
				ropeFoldSpec{hd: 64, nh: 64, nkv: 8, rot: 64, mode: ml.RopeNeoX, yarn: true, window: window, sinks: true,
					kv: kv, hist: []int{0, 5, 127, 1000}, newT: []int{1, 1, 1, 1}, maxPosSlack: 131072 - 1024})
		}
		cases = append(cases,
			ropeFoldSpec{hd: 128, nh: 32, nkv: 8, rot: 128, mode: ml.RopeNormal, kv: kv, hist: []int{r.IntN(5000)},
				newT: []int{1}, maxPosSlack: 8320, replays: 2},
			ropeFoldSpec{hd: 128, nh: 32, nkv: 8, rot: 128, mode: ml.RopeNormal, kv: kv, hist: []int{126, 7},
				newT: []int{4, 2}, maxPosSlack: 300},
			ropeFoldSpec{hd: 64, nh: 8, nkv: 2, rot: 32, mode: ml.RopeNeoX, window: 5, sinks: true, kv: kv,
				hist: []int{20, 0, 300}, newT: []int{5, 1, 2}})
	}
	for i, c := range cases {
		name := fmt.Sprintf("%d/hd=%d/h=%d/kv=%d/rot=%d/mode=%d/win=%d/%v/hist=%v/new=%v/replays=%d", i, c.hd, c.nh,
			c.nkv, c.rot, c.mode, c.window, c.kv, c.hist, c.newT, c.replays)
		t.Run(name, func(t *testing.T) { runRoPEFold(t, r, c) })
	}
}

func runRoPEFold(t *testing.T, r *rand.Rand, c ropeFoldSpec) {
	const bs = 16
	hd, nh, nkv := c.hd, c.nh, c.nkv
	maxLen := 0
	for s := range c.hist {
		maxLen = max(maxLen, c.hist[s]+c.newT[s])
	}
	maxBlocks := (maxLen + bs - 1) / bs
	nb := maxBlocks*len(c.hist) + 3
	perm := r.Perm(nb)
	blocks := make([]int32, maxBlocks*len(c.hist))
	for i := range blocks {
		blocks[i] = int32(perm[i])
	}
	var hpos, hseq, hslots, qpos, qseq, qslots []int32
	for s := range c.hist {
		for p := 0; p < c.hist[s]+c.newT[s]; p++ {
			sl := blocks[s*maxBlocks+p/bs]*bs + int32(p%bs)
			if p < c.hist[s] {
				hpos, hseq, hslots = append(hpos, int32(p)), append(hseq, int32(s)), append(hslots, sl)
			} else {
				qpos, qseq, qslots = append(qpos, int32(p)), append(qseq, int32(s)), append(qslots, sl)
			}
		}
	}
	n := len(qpos)
	bp := i32Pair(t, blocks, maxBlocks, len(c.hist))
	mkBatch := func(pos, seq, slots []int32, slack int) (*ml.Batch, *ml.Batch) {
		pp, sp, slp := i32Pair(t, pos, len(pos)), i32Pair(t, seq, len(pos)), i32Pair(t, slots, len(pos))
		return &ml.Batch{Pos: pp.g, Seq: sp.g, Slots: slp.g, Blocks: bp.g, BlockSize: bs, MaxPos: maxLen + slack},
			&ml.Batch{Pos: pp.c, Seq: sp.c, Slots: slp.c, Blocks: bp.c, BlockSize: bs, MaxPos: maxLen}
	}
	qbg, qbc := mkBatch(qpos, qseq, qslots, c.maxPosSlack)
	// Caches: [0] folded, [1] unfolded (GPU), and the CPU's (F32; F16 values pre-rounded).
	var kcg, vcg [2]ml.Tensor
	for i := range kcg {
		for _, p := range []*ml.Tensor{&kcg[i], &vcg[i]} {
			x, err := gpu.Alloc(c.kv, hd, nkv, bs, nb)
			require.NoError(t, err)
			t.Cleanup(func() { gpu.Free(x) })
			*p = x
		}
	}
	kcc, err := ref.Alloc(ml.F32, hd, nkv, bs, nb)
	require.NoError(t, err)
	vcc, err := ref.Alloc(ml.F32, hd, nkv, bs, nb)
	require.NoError(t, err)
	round := func(v []float32) []float32 {
		if c.kv == ml.F16 {
			return roundHalf(v)
		}
		return v
	}
	if len(hpos) > 0 { // the history, already rotated keys
		hbg, hbc := mkBatch(hpos, hseq, hslots, 0)
		kh := f32Pair(t, round(randF32(r, hd*nkv*len(hpos), 1)), hd, nkv, len(hpos))
		vh := f32Pair(t, round(randF32(r, hd*nkv*len(hpos), 1)), hd, nkv, len(hpos))
		for i := range kcg {
			gpu.KVWrite(kcg[i], vcg[i], kh.g, vh.g, hbg)
		}
		ref.KVWrite(kcc, vcc, kh.c, vh.c, hbc)
	}
	// RoPE parameters.
	var inv []float32
	scale := float32(1)
	if c.yarn {
		inv, scale, err = ml.YaRNInvFreq(150000, c.rot, ml.YaRN{Factor: 32, OrigContext: 4096})
	} else {
		inv, err = ml.RopeInvFreq(500000, c.rot, nil)
	}
	require.NoError(t, err)
	fr := f32Pair(t, inv, c.rot/2)
	rg := &ml.Rope{Mode: c.mode, Dims: c.rot, Scale: scale, InvFreq: fr.g}
	rcpu := *rg
	rcpu.InvFreq = fr.c
	a := &ml.Attention{Scale: float32(1 / math.Sqrt(float64(hd))), Window: c.window}
	acpu := *a
	if c.sinks {
		s := f32Pair(t, randF32(r, nh, 2), nh)
		a.Sinks, acpu.Sinks = s.g, s.c
	}
	// Inputs: raw q, k, v.
	qd, kd, vd := randF32(r, hd*nh*n, 1), randF32(r, hd*nkv*n, 1), randF32(r, hd*nkv*n, 1)
	var qg, kg, vg, yg [2]ml.Tensor
	for i := range qg {
		for _, p := range []struct {
			t     *ml.Tensor
			heads int
		}{{&qg[i], nh}, {&kg[i], nkv}, {&vg[i], nkv}, {&yg[i], nh}} {
			x, err := gpu.Alloc(ml.F32, hd, p.heads, n)
			require.NoError(t, err)
			t.Cleanup(func() { gpu.Free(x) })
			*p.t = x
		}
	}
	write := func(i int) {
		require.NoError(t, gpu.WriteF32(qg[i], qd))
		require.NoError(t, gpu.WriteF32(kg[i], kd))
		require.NoError(t, gpu.WriteF32(vg[i], vd))
		gpu.Fill(yg[i], float32(math.NaN()))
	}
	step := func(i int) {
		gpu.RoPE(qg[i], qbg.Pos, rg)
		gpu.RoPE(kg[i], qbg.Pos, rg)
		gpu.KVWrite(kcg[i], vcg[i], kg[i], vg[i], qbg)
		gpu.Attend(yg[i], qg[i], kcg[i], vcg[i], qbg, a)
	}
	for i, fold := range []bool{true, false} {
		foldAttnRoPE = fold
		write(i)
		if c.replays == 0 {
			step(i)
			require.NoError(t, gpu.Err())
			continue
		}
		graphSeq++
		key := fmt.Sprintf("rope-fold-%d", graphSeq)
		for rep := 0; rep < c.replays; rep++ {
			if rep > 0 {
				write(i) // RoPE works in place (unfolded) / q, k were rotated by a read (folded): fresh inputs
			}
			require.NoError(t, gpu.Run(key, func() { step(i) }), "graph run %d", rep)
			require.NoError(t, gpu.Err(), "graph run %d", rep)
		}
	}
	foldAttnRoPE = false
	// CPU reference.
	qc, kc, vc := f32Pair(t, qd, hd, nh, n), f32Pair(t, kd, hd, nkv, n), f32Pair(t, vd, hd, nkv, n)
	yc := out(t, hd, nh, n)
	ref.RoPE(qc.c, qbc.Pos, &rcpu)
	ref.RoPE(kc.c, qbc.Pos, &rcpu)
	ref.KVWrite(kcc, vcc, kc.c, vc.c, qbc)
	ref.Attend(yc.c, qc.c, kcc, vcc, qbc, &acpu)
	read := func(x ml.Tensor) []float32 {
		v := make([]float32, x.Len())
		require.NoError(t, gpu.ReadF32(x, v))
		return v
	}
	y0, y1 := read(yg[0]), read(yg[1])
	require.Equal(t, y1, y0, "output: folded vs rope_kv + attention (bits)")
	for _, v := range y0 {
		require.False(t, math.IsNaN(float64(v)) || math.IsInf(float64(v), 0), "output not finite")
	}
	require.Equal(t, read(qg[1]), read(qg[0]), "q read back after the fold (rotated on demand)")
	require.Equal(t, read(kg[1]), read(kg[0]), "k read back after the fold")
	if c.kv == ml.F32 {
		require.Equal(t, read(kcg[1]), read(kcg[0]), "k cache")
		require.Equal(t, read(vcg[1]), read(vcg[0]), "v cache")
	} else { // the caches through a plain Attend of fresh queries at the same positions
		q2 := f32Pair(t, randF32(r, hd*nh*n, 1), hd, nh, n)
		var z [2]ml.Tensor
		for i := range z {
			z[i] = out(t, hd, nh, n).g
			gpu.Attend(z[i], q2.g, kcg[i], vcg[i], qbg, a)
		}
		require.Equal(t, read(z[1]), read(z[0]), "F16 caches (through a second attention)")
	}
	// Against the CPU: the decode kernels' fp32 tolerance (all rows are < 16, so no tensor-core rows). F32
	// caches only: with F16 caches the GPU rounds its own rotated k, and a rotation one float ulp apart can
	// round to another half (the unfolded path, bit-identical above, is checked against the CPU elsewhere).
	if c.kv == ml.F32 {
		yc.g = yg[0]
		checkAttnRows(t, yc, qseq, qpos, hd, nh)
	}
}

// TestPerfAttentionRoPEFold times a layer's RoPE(q), RoPE(k), KVWrite,
// Attend for one decode token, folded (the default: one
// orch_attention_rope launch + the combine) and not (orch_rope_kv +
// attention + combine), in a graph of 16 back-to-back layers (per layer; the
// next layer's q / k GEMVs, which overwrite q and k, are not timed: their
// effect on the fold's bookkeeping is applied by hand), at depths 128 and
// 8192 with MaxPos of a depth-8192 context, for gpt-oss's attention (64 q /
// 8 kv heads of 64, NeoX + YaRN factor, sinks; full and window-128 layers,
// F16 KV) and Llama-3-8B's (32 / 8 heads of 128, GPT-J pairs, F16 KV):
//
//	ORCH_GPU_PERF=1 bin/cuda-gpu.test -test.run PerfAttentionRoPEFold -test.v
func TestPerfAttentionRoPEFold(t *testing.T) {
	if os.Getenv("ORCH_GPU_PERF") == "" {
		t.Skip("set ORCH_GPU_PERF=1 to time the folded RoPE + KV write")
	}
	if gpu.l.attentionRope == nil {
		t.Skip("library without orch_attention_rope")
	}
	defer func(v, w bool) { fuseOps, foldAttnRoPE = v, w }(fuseOps, foldAttnRoPE)
	fuseOps = true
	r := newRNG(t)
	const bs, depth, maxPos = 16, 8192, 8192 + 128 + 64
	alloc := func(dt ml.DType, shape ...int) ml.Tensor {
		x, err := gpu.Alloc(dt, shape...)
		require.NoError(t, err)
		t.Cleanup(func() { gpu.Free(x) })
		return x
	}
	i32 := func(v []int32, shape ...int) ml.Tensor {
		x := alloc(ml.I32, shape...)
		require.NoError(t, gpu.WriteI32(x, v))
		return x
	}
	t.Logf("| RoPE + KV write + attention, 1 token, on %s | unfolded (rope_kv + attention) | folded | saved |",
		gpu.DeviceName())
	for _, sh := range []struct {
		name        string
		nh, nkv, hd int
		mode        ml.RopeMode
		yarn, sinks bool
		windows     []int
	}{{"gpt-oss", 64, 8, 64, ml.RopeNeoX, true, true, []int{0, 128}},
		{"llama-8b", 32, 8, 128, ml.RopeNormal, false, false, []int{0}}} {
		nb := depth/bs + 1
		perm := r.Perm(nb)
		blocks := make([]int32, nb)
		for i := range blocks {
			blocks[i] = int32(perm[i])
		}
		bt := i32(blocks, nb, 1)
		kc, vc := alloc(ml.F16, sh.hd, sh.nkv, bs, nb), alloc(ml.F16, sh.hd, sh.nkv, bs, nb)
		for _, c := range []ml.Tensor{kc, vc} {
			require.NoError(t, gpu.l.status("memset", gpu.l.memset(gpu.ctx, c.(*tensor).ptr, 0, int64(c.(*tensor).bytes))))
		}
		q, k, v := alloc(ml.F32, sh.hd, sh.nh, 1), alloc(ml.F32, sh.hd, sh.nkv, 1), alloc(ml.F32, sh.hd, sh.nkv, 1)
		require.NoError(t, gpu.WriteF32(q, randF32(r, sh.hd*sh.nh, 1)))
		require.NoError(t, gpu.WriteF32(k, randF32(r, sh.hd*sh.nkv, 1)))
		require.NoError(t, gpu.WriteF32(v, randF32(r, sh.hd*sh.nkv, 1)))
		y := alloc(ml.F32, sh.hd, sh.nh, 1)
		var inv []float32
		scale := float32(1)
		var err error
		if sh.yarn {
			inv, scale, err = ml.YaRNInvFreq(150000, sh.hd, ml.YaRN{Factor: 32, OrigContext: 4096})
		} else {
			inv, err = ml.RopeInvFreq(500000, sh.hd, nil)
		}
		require.NoError(t, err)
		fr := alloc(ml.F32, sh.hd/2)
		require.NoError(t, gpu.WriteF32(fr, inv))
		rope := &ml.Rope{Mode: sh.mode, Dims: sh.hd, Scale: scale, InvFreq: fr}
		var sinks ml.Tensor
		if sh.sinks {
			sinks = alloc(ml.F32, sh.nh)
			require.NoError(t, gpu.WriteF32(sinks, randF32(r, sh.nh, 1)))
		}
		for _, d := range []int{128, depth} {
			p := int32(d - 1)
			b := &ml.Batch{Pos: i32([]int32{p}, 1), Seq: i32([]int32{0}, 1),
				Slots: i32([]int32{blocks[p/bs]*bs + p%bs}, 1), Blocks: bt, BlockSize: bs, MaxPos: maxPos}
			for _, window := range sh.windows {
				a := &ml.Attention{Scale: float32(1 / math.Sqrt(float64(sh.hd))), Window: window, Sinks: sinks}
				fn := func() {
					gpu.RoPE(q, b.Pos, rope)
					gpu.RoPE(k, b.Pos, rope)
					gpu.KVWrite(kc, vc, k, v, b)
					gpu.Attend(y, q, kc, vc, b, a)
					gpu.pend.unrot = unrotated{} // the next layer's GEMVs overwrite q and k whole
				}
				var ms [2]float64
				for i, fold := range []bool{false, true} {
					foldAttnRoPE = fold
					ms[i] = timeKernel(t, 10, 16, fn)
				}
				foldAttnRoPE = false
				t.Logf("| %s depth %d (MaxPos %d), window %d, F16 KV | graph %.4f ms | graph %.4f ms | %.1f us |", sh.name,
					d, maxPos, window, ms[0], ms[1], (ms[0]-ms[1])*1e3)
			}
		}
	}
}
