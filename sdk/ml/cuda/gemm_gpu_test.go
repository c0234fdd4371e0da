//go:build gpu

// GPU tests of the tensor-core GEMM (orch_qgemm) and the grouped MoE FFN
// (orch_moe_ffn_grouped): against the CPU backend (dense) and a float64 Go
// reference from dequantized weights (MoE with chosen routings), every tile
// configuration, ragged shapes, outputs poisoned with NaN, every element
// checked. Tolerance: bf16 operands (as the n > 8 cuBLAS matmul test).

package cuda

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

const bf16Tol = 1e-2

func dptr(t *testing.T, x ml.Tensor) uintptr {
	t.Helper()
	if x == nil {
		return 0
	}
	ct, err := gpu.get(x)
	require.NoError(t, err)
	return ct.ptr
}

// TestQGemm calls orch_qgemm directly (every tile config and both
// schedules, accumulate on and off) and compares with the CPU backend's MatMul.
func TestQGemm(t *testing.T) {
	r := newRNG(t)
	type shape struct{ k, m int }
	for _, dt := range []ml.DType{ml.Q8_0, ml.MXFP4, ml.Q4_0} {
		for _, sh := range []shape{{352, 203}, {2880, 77}, {32, 40}} {
			ns := []int{1, 5, 9, 33, 130, 512}
			if sh.k != 352 {
				ns = []int{9, 130}
			}
			for _, n := range ns {
				// tiles 1..5 pipelined (0: chosen by n), 9..13 the same with the
				// two-barrier schedule (tile | 8)
				for _, tile := range []int32{0, 1, 2, 3, 4, 5, 9, 10, 11, 12, 13} {
					variants := []struct{ bias, acc bool }{{false, false}, {true, false}, {true, true}, {false, true}}
					if tile > 8 {
						variants = variants[1:3]
					}
					for _, c := range variants {
						name := fmt.Sprintf("%v/k=%d/m=%d/n=%d/tile=%d/bias=%v/acc=%v", dt, sh.k, sh.m, n, tile, c.bias, c.acc)
						t.Run(name, func(t *testing.T) {
							k, m := sh.k, sh.m
							w := weightPair(t, "w", dt, []int{k, m}, randWeight(r, dt, k, m))
							x := f32Pair(t, randF32(r, k*n, 1), k, n)
							var bias pair
							if c.bias {
								bias = f32Pair(t, randF32(r, m, 1), m)
							}
							y := f32Pair(t, randF32(r, m*n, 1), m, n)
							if !c.acc {
								gpu.Fill(y.g, float32(math.NaN()))
							}
							xbf := f32Pair(t, nil, n*k/2) // bf16 copy of x
							rc := gpu.l.qgemm(gpu.ctx, dptr(t, y.g), dptr(t, x.g), dptr(t, w.g), int32(dt), dptr(t, bias.g),
								int64(n), int64(k), int64(m), b2i(c.acc), dptr(t, xbf.g), tile)
							require.NoError(t, gpu.l.status("qgemm", rc))
							tmp := out(t, m, n)
							ref.MatMul(tmp.c, x.c, w.c, bias.c)
							if c.acc {
								ref.Add(y.c, y.c, tmp.c)
							} else {
								ref.Copy(y.c, tmp.c)
							}
							checkClose(t, name, y, bf16Tol)
						})
					}
				}
			}
		}
	}
}

// TestQGemmRoute goes through Backend.MatMul: qgemmMinN <= n <= qgemmMaxN
// with Q8_0 / Q4_0 / MXFP4 takes the GEMM, ORCH_CUDA_GEMM=v1 (gemmV1) the old
// paths; both must match the CPU backend. Outside that range both settings
// must be bit-identical (the same GEMV / cuBLAS path), inside they must
// differ (another kernel, another summation order), which shows the switch
// really switches. It runs with the session-5 border (denseV2From above
// qgemmMaxN) and with the default one (n >= denseV2From: dequantize +
// cuBLAS whatever gemmV1 says, so both settings are bit-identical there).
func TestQGemmRoute(t *testing.T) {
	r := newRNG(t)
	// the GEMV / qgemm routes: no bf16 copies (bf16Route would take 9..16)
	defer func(on bool, c, r int64) { gpu.SetBF16Cache(on, c, r) }(gpu.bc.on, gpu.bc.cap, gpu.bc.reserve)
	gpu.SetBF16Cache(false, 0, 0)
	defer func(v int) { denseV2From = v }(denseV2From)
	for _, from := range []int{qgemmMaxN + 1, 17} {
		denseV2From = from
		for _, dt := range []ml.DType{ml.Q8_0, ml.MXFP4} {
			for _, n := range []int{4, 8, 9, 64, 96, 97, 512} {
				name := fmt.Sprintf("%v/n=%d/v2from=%d", dt, n, from)
				t.Run(name, func(t *testing.T) {
					k, m := 2880, 130
					w := weightPair(t, "w", dt, []int{k, m}, randWeight(r, dt, k, m))
					x := f32Pair(t, randF32(r, k*n, 1), k, n)
					bias := f32Pair(t, randF32(r, m, 1), m)
					y := out(t, m, n)
					ref.MatMul(y.c, x.c, w.c, bias.c)
					tol := bf16Tol
					if n < qgemmMinN {
						tol = gemvTol(dt, n, true) // the GEMV (fp16 decode by default: gpu_test.go)
					}
					gpu.MatMul(y.g, x.g, w.g, bias.g)
					checkClose(t, name+"/default", y, tol)
					cur, _ := readBoth(t, y)

					defer func(v bool) { gemmV1 = v }(gemmV1)
					gemmV1 = true
					gpu.Fill(y.g, float32(math.NaN()))
					gpu.MatMul(y.g, x.g, w.g, bias.g)
					v1tol := gemvTol(dt, n, true)
					if n > 8 {
						v1tol = bf16Tol
					}
					checkClose(t, name+"/v1", y, v1tol)
					old, _ := readBoth(t, y)
					same := true
					for i := range cur {
						same = same && cur[i] == old[i]
					}
					if n < qgemmMinN || n > qgemmMaxN || n >= denseV2From {
						require.True(t, same, "n outside [%d, %d]: both settings run the same kernels", qgemmMinN, min(qgemmMaxN, denseV2From-1))
					} else {
						require.False(t, same, "n in [%d, %d]: the GEMM must differ from dequantize + cuBLAS", qgemmMinN, min(qgemmMaxN, denseV2From-1))
					}
				})
			}
		}
	}
}

// moeRef is the float64 reference of the expert FFN from dequantized weights.
type moeRef struct {
	dim, ff, ne       int
	gate, up, down    []float32 // [ne][rows][k]
	gb, ub, db        []float32 // nil or [ne][rows]
	alpha, limit      float64
	gateT, upT, downT ml.Tensor // device weights
	gbT, ubT, dbT     ml.Tensor // device biases (nil when none)
	gateDT, downDT    ml.DType
}

func dequantAll(t *testing.T, dt ml.DType, data []byte, k, rows int) []float32 {
	rb, err := dt.RowBytes(k)
	require.NoError(t, err)
	out := make([]float32, k*rows)
	for i := 0; i < rows; i++ {
		require.NoError(t, ml.DequantizeRow(dt, data[i*rb:(i+1)*rb], out[i*k:(i+1)*k]))
	}
	return out
}

func newMoERef(t *testing.T, r *rand.Rand, guDT, downDT ml.DType, dim, ff, ne int, withBias bool) *moeRef {
	m := &moeRef{dim: dim, ff: ff, ne: ne, alpha: 1.702, limit: 7, gateDT: guDT, downDT: downDT}
	mk := func(name string, dt ml.DType, k, rows int, shape []int) (ml.Tensor, []float32) {
		data := randWeight(r, dt, k, rows)
		w, err := gpu.Weight(name, dt, shape, data)
		require.NoError(t, err)
		t.Cleanup(func() { gpu.Free(w) })
		return w, dequantAll(t, dt, data, k, rows)
	}
	m.gateT, m.gate = mk("gate", guDT, dim, ff*ne, []int{dim, ff, ne})
	m.upT, m.up = mk("up", guDT, dim, ff*ne, []int{dim, ff, ne})
	m.downT, m.down = mk("down", downDT, ff, dim*ne, []int{ff, dim, ne})
	if withBias {
		bias := func(n int, shape ...int) (ml.Tensor, []float32) {
			v := randF32(r, n, 1)
			b, err := gpu.Alloc(ml.F32, shape...)
			require.NoError(t, err)
			require.NoError(t, gpu.WriteF32(b, v))
			t.Cleanup(func() { gpu.Free(b) })
			return b, v
		}
		m.gbT, m.gb = bias(ff*ne, ff, ne)
		m.ubT, m.ub = bias(ff*ne, ff, ne)
		m.dbT, m.db = bias(dim*ne, dim, ne)
	}
	return m
}

func dot64(a, b []float32) float64 {
	var s float64
	for i := range a {
		s += float64(a[i]) * float64(b[i])
	}
	return s
}

// forward: out[t] = sum_s w[p] * (swiglu(x[t].gate_e + gb, x[t].up_e + ub) . down_e + db), p = t*k+s.
func (m *moeRef) forward(x []float32, ids []int32, w []float32, n, k int) []float32 {
	d, ff := m.dim, m.ff
	res := make([]float32, n*d)
	act := make([]float32, ff)
	for tk := 0; tk < n; tk++ {
		xt := x[tk*d : (tk+1)*d]
		acc := make([]float64, d)
		for s := 0; s < k; s++ {
			p := tk*k + s
			e := int(ids[p])
			for f := 0; f < ff; f++ {
				row := (e*ff + f) * d
				g := dot64(xt, m.gate[row:row+d])
				u := dot64(xt, m.up[row:row+d])
				if m.gb != nil {
					g += float64(m.gb[e*ff+f])
					u += float64(m.ub[e*ff+f])
				}
				g = math.Min(g, m.limit)
				u = math.Max(math.Min(u, m.limit), -m.limit)
				act[f] = float32((u + 1) * g / (1 + math.Exp(-m.alpha*g)))
			}
			for o := 0; o < d; o++ {
				row := (e*d + o) * ff
				v := dot64(act, m.down[row:row+ff])
				if m.db != nil {
					v += float64(m.db[e*d+o])
				}
				acc[o] += float64(w[p]) * v
			}
		}
		for o := range acc {
			res[tk*d+o] = float32(acc[o])
		}
	}
	return res
}

// routing makes n*k expert ids: "uniform" (k distinct random experts per
// token), "skew" (slot 0 always expert 7, the rest among 0..15, so experts
// 16.. get no pairs), "one" (every token on experts 0..k-1: n pairs each).
func routing(r *rand.Rand, kind string, n, k, ne int) []int32 {
	ids := make([]int32, 0, n*k)
	for t := 0; t < n; t++ {
		switch kind {
		case "one":
			for s := 0; s < k; s++ {
				ids = append(ids, int32(s))
			}
		case "skew":
			ids = append(ids, 7)
			for _, e := range r.Perm(15)[:k-1] {
				if e >= 7 { // 0..14 -> 0..15 without 7
					e++
				}
				ids = append(ids, int32(e))
			}
		default:
			for _, e := range r.Perm(ne)[:k] {
				ids = append(ids, int32(e))
			}
		}
	}
	return ids
}

// moeGroupedCall runs orch_moe_ffn_grouped on device tensors (scratch sized
// by the caller's n*k).
type moeGroupedCall struct {
	out, x, ids, w, xg, act, ybuf, route ml.Tensor
	n, k                                 int
}

func newMoEGroupedCall(t *testing.T, m *moeRef, n, k int) *moeGroupedCall {
	c := &moeGroupedCall{n: n, k: k}
	alloc := func(dt ml.DType, shape ...int) ml.Tensor {
		x, err := gpu.Alloc(dt, shape...)
		require.NoError(t, err)
		t.Cleanup(func() { gpu.Free(x) })
		return x
	}
	p := n * k
	c.out, c.x = alloc(ml.F32, m.dim, n), alloc(ml.F32, m.dim, n)
	c.ids, c.w = alloc(ml.I32, p), alloc(ml.F32, p)
	c.xg, c.act = alloc(ml.F32, m.dim/2, p), alloc(ml.F32, m.ff/2, p) // bf16 rows
	c.ybuf = alloc(ml.F32, m.dim, p)
	c.route = alloc(ml.I32, int(gpu.l.moeRouteInts(int64(p), int32(m.ne))))
	return c
}

func (c *moeGroupedCall) run(t *testing.T, m *moeRef, tile int32) int32 {
	return gpu.l.moeFFNGrouped(gpu.ctx, dptr(t, c.out), dptr(t, c.x), dptr(t, c.ids), dptr(t, c.w),
		dptr(t, m.gateT), dptr(t, m.upT), int32(m.gateDT), dptr(t, m.gbT), dptr(t, m.ubT), dptr(t, m.downT),
		int32(m.downDT), dptr(t, m.dbT), int64(c.n), int32(c.k), int32(m.ne), int64(m.dim), int64(m.ff),
		float32(m.alpha), float32(m.limit), dptr(t, c.xg), dptr(t, c.act), dptr(t, c.ybuf), dptr(t, c.route), tile)
}

// poison fills the output and the intermediate buffers (gathered x, the
// bf16 activations: both halves of every word a NaN, and the per-pair down
// rows) with NaN, so a kernel that leaves any row unwritten fails the check
// instead of passing on an earlier tile's leftovers.
func (c *moeGroupedCall) poison() {
	nan2 := math.Float32frombits(0x7FC07FC0)
	gpu.Fill(c.out, float32(math.NaN()))
	gpu.Fill(c.xg, nan2)
	gpu.Fill(c.act, nan2)
	gpu.Fill(c.ybuf, float32(math.NaN()))
}

// checkVec: relative L2 error of g against want within tol; any NaN/Inf in g fails.
func checkVec(t *testing.T, what string, g, want []float32, tol float64) {
	t.Helper()
	var num, den float64
	for i := range g {
		if math.IsNaN(float64(g[i])) || math.IsInf(float64(g[i]), 0) {
			t.Fatalf("%s: element %d is %v (unwritten or overflow); reference %v", what, i, g[i], want[i])
		}
		d := float64(g[i]) - float64(want[i])
		num += d * d
		den += float64(want[i]) * float64(want[i])
	}
	rel := math.Sqrt(num / math.Max(den, 1e-30))
	if rel > tol {
		t.Fatalf("%s: relative error %.3g > %.3g", what, rel, tol)
	}
	t.Logf("%s: rel err %.3g (n=%d)", what, rel, len(g))
}

// TestMoEGrouped: 32 experts, top-4, ragged token counts, uniform / skewed /
// single-expert routings (experts with zero pairs, one expert with every
// token), biases nil and set, every tile config.
func TestMoEGrouped(t *testing.T) {
	r := newRNG(t)
	const dim, ff, ne, k = 160, 224, 32, 4 // 5 and 7 blocks: not multiples of any stage
	for _, dts := range [][2]ml.DType{{ml.MXFP4, ml.MXFP4}, {ml.Q8_0, ml.Q8_0}, {ml.MXFP4, ml.Q8_0}} {
		for _, withBias := range []bool{true, false} {
			m := newMoERef(t, r, dts[0], dts[1], dim, ff, ne, withBias)
			for _, n := range []int{1, 5, 9, 33, 130, 512} {
				c := newMoEGroupedCall(t, m, n, k)
				for _, kind := range []string{"uniform", "skew", "one"} {
					// 17, 19: v3 with 96 / 64 pairs a tile (moe_gemm.cuh; MXFP4
					// only, other types fall back to v1's tiles); 30: v4
					// (moe_wg.cuh, wgmma: 256 pairs a tile; sm_90a builds
					// only, skipped where the library reports it unsupported;
					// 32: the same with the activations loaded by TMA; 36:
					// hybrid, v4 for experts with >= 96 pairs and v3 for the
					// others)
					tiles := []int32{0, 1, 2, 3, 4, 5, 17, 19}
					if !withBias || dts[0] != dts[1] {
						tiles = []int32{0, 5, 17}
					}
					if moeV4Child() {
						tiles = []int32{30, 32, 36}
						if !withBias || dts[0] != dts[1] {
							tiles = []int32{30, 36}
						}
					}
					for _, tile := range tiles {
						name := fmt.Sprintf("%v+%v/bias=%v/n=%d/%s/tile=%d", dts[0], dts[1], withBias, n, kind, tile)
						t.Run(name, func(t *testing.T) {
							x := randF32(r, dim*n, 1)
							ids := routing(r, kind, n, k, ne)
							w := make([]float32, n*k)
							for i := range w {
								w[i] = r.Float32()
							}
							require.NoError(t, gpu.WriteF32(c.x, x))
							require.NoError(t, gpu.WriteI32(c.ids, ids))
							require.NoError(t, gpu.WriteF32(c.w, w))
							c.poison()
							if err := gpu.l.status("moe_ffn_grouped", c.run(t, m, tile)); tile >= 30 && errors.Is(err, ErrUnsupported) {
								t.Skipf("v4 not in this build: %v", err)
							} else {
								require.NoError(t, err)
							}
							got := make([]float32, dim*n)
							require.NoError(t, gpu.ReadF32(c.out, got))
							checkVec(t, name, got, m.forward(x, ids, w, n, k), bf16Tol)
						})
					}
				}
			}
		}
	}
}

// TestMoEGroupedGraph captures the grouped op once into a CUDA graph and
// replays it with different routings written into the same ids tensor:
// nothing of the routing may be baked in at capture time.
func TestMoEGroupedGraph(t *testing.T) {
	r := newRNG(t)
	const dim, ff, ne, k, n = 160, 224, 32, 4, 70
	m := newMoERef(t, r, ml.MXFP4, ml.MXFP4, dim, ff, ne, true)
	c := newMoEGroupedCall(t, m, n, k)
	for it, kind := range []string{"uniform", "one", "skew", "uniform", "one/v1", "uniform/v1", "skew/v3", "uniform/v3", "one/v3s", "uniform/v3s",
		"skew/v4", "one/v4", "skew/v4t", "uniform/v4t", "skew/v4h", "one/v4h"} {
		tile := int32(0)
		if k, ok := strings.CutSuffix(kind, "/v1"); ok {
			kind, tile = k, 5
		}
		if k, ok := strings.CutSuffix(kind, "/v3"); ok {
			kind, tile = k, 17
		}
		if k, ok := strings.CutSuffix(kind, "/v3s"); ok {
			kind, tile = k, 19
		}
		if k, ok := strings.CutSuffix(kind, "/v4"); ok {
			kind, tile = k, 30
		}
		if k, ok := strings.CutSuffix(kind, "/v4t"); ok {
			kind, tile = k, 32
		}
		if k, ok := strings.CutSuffix(kind, "/v4h"); ok {
			kind, tile = k, 36
		}
		if (tile >= 30) != moeV4Child() || tile >= 30 && !moeV4Built(t, m, c, tile) {
			continue
		}
		x := randF32(r, dim*n, 1)
		ids := routing(r, kind, n, k, ne)
		w := make([]float32, n*k)
		for i := range w {
			w[i] = r.Float32()
		}
		require.NoError(t, gpu.WriteF32(c.x, x))
		require.NoError(t, gpu.WriteI32(c.ids, ids))
		require.NoError(t, gpu.WriteF32(c.w, w))
		c.poison()
		require.NoError(t, gpu.Run(fmt.Sprintf("moe-grouped-%d", tile), func() { gpu.call("moe_ffn_grouped", c.run(t, m, tile)) }))
		got := make([]float32, dim*n)
		require.NoError(t, gpu.ReadF32(c.out, got))
		checkVec(t, fmt.Sprintf("replay %d (%s)", it, kind), got, m.forward(x, ids, w, n, k), bf16Tol)
	}
	gpu.ResetGraphs()
}

// moeV4Child: this process runs only the explicit v4 tiles (30, 32, 36) of
// TestMoEGrouped / TestMoEGroupedGraph: TestMoEGroupedV4 starts it, so that
// a fault of the new wgmma / TMA kernel (a sticky CUDA error) cannot take
// the rest of the suite's process down with it.
func moeV4Child() bool { return os.Getenv("ORCH_TEST_MOE_V4") == "only" }

// TestMoEGroupedV4 runs TestMoEGrouped and TestMoEGroupedGraph for the v4
// tiles (moe_wg.cuh) in a child process.
func TestMoEGroupedV4(t *testing.T) {
	if moeV4Child() {
		t.Skip("the child itself")
	}
	cmd := exec.Command(os.Args[0], "-test.run", "^(TestMoEGrouped|TestMoEGroupedGraph)$", "-test.v")
	cmd.Env = append(os.Environ(), "ORCH_TEST_MOE_V4=only")
	outp, err := cmd.CombinedOutput()
	require.NoError(t, err, "v4 child:\n%s", outp)
	require.Contains(t, string(outp), "--- PASS: TestMoEGroupedGraph", "v4 child:\n%s", outp)
	require.Contains(t, string(outp), "--- PASS: TestMoEGrouped ", "v4 child:\n%s", outp)
	for _, l := range strings.Split(string(outp), "\n") {
		if strings.Contains(l, "rel err") || strings.Contains(l, "not in this build") {
			t.Log(strings.TrimSpace(l))
		}
	}
}

// moeV4Built: whether the library runs the grouped GEMM v4 tile (30, 32,
// 36: an sm_90a build on an sm_90 device; 32 also the driver's tensor-map
// encoder), by one uncaptured call.
func moeV4Built(t *testing.T, m *moeRef, c *moeGroupedCall, tile int32) bool {
	err := gpu.l.status("moe_ffn_grouped", c.run(t, m, tile))
	if errors.Is(err, ErrUnsupported) {
		t.Logf("v4 not in this build: %v", err)
		return false
	}
	require.NoError(t, err)
	return true
}

// TestMoEGroupedRoute goes through Backend.MoE (router + top-k + grouped
// FFN) against the CPU backend: a random router, and a skewed one (zero
// router weights, separated biases: every token on the same 4 experts, the
// other 28 with no pairs).
func TestMoEGroupedRoute(t *testing.T) {
	r := newRNG(t)
	for _, dt := range []ml.DType{ml.MXFP4, ml.Q8_0} {
		for _, n := range []int{8, 16, 33, 256} {
			for _, skew := range []bool{false, true} {
				name := fmt.Sprintf("%v/n=%d/skew=%v", dt, n, skew)
				t.Run(name, func(t *testing.T) {
					d, ff, ne, topk := 128, 96, 32, 4
					m := &ml.MoE{TopK: topk, Alpha: 1.702, Limit: 7}
					mc := *m
					set := func(dst, dstc *ml.Tensor, p pair) { *dst, *dstc = p.g, p.c }
					rw := randWeight(r, ml.F32, d, ne)
					rb := randF32(r, ne, 1)
					if skew {
						clear(rw)
						for e := range rb {
							rb[e] = float32(-e)
						}
					}
					set(&m.Router, &mc.Router, weightPair(t, "router", ml.F32, []int{d, ne}, rw))
					set(&m.RouterBias, &mc.RouterBias, f32Pair(t, rb, ne))
					set(&m.Gate, &mc.Gate, weightPair(t, "gate", dt, []int{d, ff, ne}, randWeight(r, dt, d, ff*ne)))
					set(&m.Up, &mc.Up, weightPair(t, "up", dt, []int{d, ff, ne}, randWeight(r, dt, d, ff*ne)))
					set(&m.Down, &mc.Down, weightPair(t, "down", dt, []int{ff, d, ne}, randWeight(r, dt, ff, d*ne)))
					set(&m.GateBias, &mc.GateBias, f32Pair(t, randF32(r, ff*ne, 1), ff, ne))
					set(&m.UpBias, &mc.UpBias, f32Pair(t, randF32(r, ff*ne, 1), ff, ne))
					set(&m.DownBias, &mc.DownBias, f32Pair(t, randF32(r, d*ne, 1), d, ne))
					x := f32Pair(t, randF32(r, d*n, 1), d, n)
					y := out(t, d, n)
					gpu.MoE(y.g, x.g, m)
					ref.MoE(y.c, x.c, &mc)
					checkClose(t, name, y, bf16Tol)
					// in place (out aliases x), as model code calls it
					gpu.MoE(x.g, x.g, m)
					checkClose(t, name+"/in place", pair{x.g, y.c}, bf16Tol)
				})
			}
		}
	}
}

// TestMoEGEMMVersions reruns the by-shape grouped MoE tests (tile 0:
// TestMoEGroupedGraph, and TestMoEGroupedRoute through Backend.MoE) in a
// child process per ORCH_CUDA_MOEGEMM version, which the library reads once
// per process: v3 (the default) makes moe_gemm.cuh's kernel the by-shape
// choice for MXFP4, v4 moe_wg.cuh's (wgmma; v3 where not built), v1 keeps
// qgemm.cu's tiles (Q8_0 always does).
func TestMoEGEMMVersions(t *testing.T) {
	if v := os.Getenv("ORCH_CUDA_MOEGEMM"); v != "" {
		t.Skipf("ORCH_CUDA_MOEGEMM=%s pins this process; the version children run from an unpinned one", v)
	}
	for _, v := range []string{"v1", "v3", "v4"} {
		t.Run(v, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run", "^(TestMoEGroupedGraph|TestMoEGroupedRoute)$", "-test.v")
			cmd.Env = append(os.Environ(), "ORCH_CUDA_MOEGEMM="+v)
			outp, err := cmd.CombinedOutput()
			require.NoError(t, err, "ORCH_CUDA_MOEGEMM=%s child:\n%s", v, outp)
			require.Contains(t, string(outp), "--- PASS: TestMoEGroupedGraph", "ORCH_CUDA_MOEGEMM=%s child:\n%s", v, outp)
			require.Contains(t, string(outp), "--- PASS: TestMoEGroupedRoute", "ORCH_CUDA_MOEGEMM=%s child:\n%s", v, outp)
		})
	}
}

// TestBF16Cache: the large-n MatMul from a weight's bf16 copy (bf16cache.go,
// orch_bf16_cache) is bit-identical to the per-call dequantization of a
// second weight with the same bytes that is never cached: every cached type,
// with and without bias, a row view (Rows) of a cached weight (no copy of
// its own: the library finds its rows in the parent's), eagerly and in a
// captured graph (replayed with new x), and a first use inside a capture
// (the copy is then filled on a side stream). After the copy exists the
// quantized bytes are zeroed: the result must not change (the copy is what
// is read). Free drops the copy.
func TestBF16Cache(t *testing.T) {
	if gpu.l.bf16Cache == nil {
		t.Skip("library without orch_bf16_cache")
	}
	defer func(on bool, c, r int64) { gpu.SetBF16Cache(on, c, r) }(gpu.bc.on, gpu.bc.cap, gpu.bc.reserve)
	r := newRNG(t)
	bits := func(v []float32) []uint32 {
		u := make([]uint32, len(v))
		for i, f := range v {
			u[i] = math.Float32bits(f)
		}
		return u
	}
	// run: y = x.W^T (+ bias) through Backend.MatMul, eagerly or as the
	// graph key (captured the first time; a graph keeps its y: one per key,
	// freed after ResetGraphs), read back.
	ys := map[string]ml.Tensor{}
	defer func() {
		gpu.ResetGraphs()
		for _, y := range ys {
			gpu.Free(y)
		}
	}()
	run := func(t *testing.T, w, x, bias ml.Tensor, m, n int, key string) []float32 {
		y := ys[key]
		if y == nil || key == "" {
			var err error
			y, err = gpu.Alloc(ml.F32, m, n)
			require.NoError(t, err)
			if key == "" {
				defer gpu.Free(y)
			} else {
				ys[key] = y
			}
		}
		gpu.Fill(y, float32(math.NaN()))
		if key == "" {
			gpu.MatMul(y, x, w, bias)
		} else {
			require.NoError(t, gpu.Run(key, func() { gpu.MatMul(y, x, w, bias) }))
		}
		v := make([]float32, m*n)
		require.NoError(t, gpu.ReadF32(y, v))
		return v
	}
	graphs := 0
	for _, dt := range []ml.DType{ml.Q8_0, ml.Q4_0, ml.MXFP4, ml.F16, ml.Q4_K, ml.Q6_K} {
		for _, n := range []int{17, 64, 300} {
			for _, withBias := range []bool{false, true} {
				name := fmt.Sprintf("%v/n=%d/bias=%v", dt, n, withBias)
				t.Run(name, func(t *testing.T) {
					const k, m = 512, 200
					data := randWeight(r, dt, k, m)
					mk := func(tag string) ml.Tensor {
						w, err := gpu.Weight("bf16cache."+tag, dt, []int{k, m}, data)
						require.NoError(t, err)
						t.Cleanup(func() { gpu.Free(w) })
						return w
					}
					wRef, wC, wG := mk("ref"), mk("cached"), mk("graph-first")
					var bias ml.Tensor
					if withBias {
						bias = f32Pair(t, randF32(r, m, 1), m).g
					}
					xs := make([]ml.Tensor, 3)
					for i := range xs {
						xs[i] = f32Pair(t, randF32(r, k*n, 1), k, n).g
					}
					// references: per-call dequantization (cache off, wRef never cached)
					gpu.SetBF16Cache(false, 0, 0)
					want := make([][]float32, len(xs))
					for i, x := range xs {
						want[i] = run(t, wRef, x, bias, m, n, "")
					}
					// a row view of wRef, uncached
					vRef, err := gpu.Rows(wRef, 40, 120)
					require.NoError(t, err)
					wantView := run(t, vRef, xs[0], nil, 120, n, "")
					w0, b0 := gpu.BF16CacheStats()

					gpu.SetBF16Cache(true, 0, 0) // no cap, no reserve: the test device has room
					require.Equal(t, bits(want[0]), bits(run(t, wC, xs[0], bias, m, n, "")), "eager, first use (makes the copy)")
					w1, b1 := gpu.BF16CacheStats()
					require.Equal(t, w0+1, w1, "one copy made")
					require.Equal(t, b0+int64(m*k*2+255)/256*256, b1, "its bytes")
					// the copy is what is read from now on
					ct, err := gpu.get(wC)
					require.NoError(t, err)
					require.NoError(t, gpu.l.status("memset", gpu.l.memset(gpu.ctx, ct.ptr, 0, int64(ct.bytes))))
					require.Equal(t, bits(want[1]), bits(run(t, wC, xs[1], bias, m, n, "")), "eager, from the copy")
					vC, err := gpu.Rows(wC, 40, 120)
					require.NoError(t, err)
					require.Equal(t, bits(wantView), bits(run(t, vC, xs[0], nil, 120, n, "")), "row view inside the copy")
					w2, _ := gpu.BF16CacheStats()
					require.Equal(t, w1, w2, "a view makes no copy")
					// graph: captured with the copy, replayed with other x (same tensor)
					graphs++
					key := fmt.Sprintf("bf16cache-%d", graphs)
					x := xs[2]
					require.NoError(t, gpu.WriteF32(x, readF32(t, xs[0])))
					require.Equal(t, bits(want[0]), bits(run(t, wC, x, bias, m, n, key)), "graph, capture")
					require.NoError(t, gpu.WriteF32(x, readF32(t, xs[1])))
					require.Equal(t, bits(want[1]), bits(run(t, wC, x, bias, m, n, key)), "graph, replay")
					// first use inside a capture: the fill runs on a side stream
					graphs++
					key = fmt.Sprintf("bf16cache-%d", graphs)
					require.Equal(t, bits(want[1]), bits(run(t, wG, x, bias, m, n, key)), "graph, first use in the capture")
					w3, _ := gpu.BF16CacheStats()
					require.Equal(t, w1+1, w3, "copy made during the capture")
					ct, err = gpu.get(wG)
					require.NoError(t, err)
					require.NoError(t, gpu.l.status("memset", gpu.l.memset(gpu.ctx, ct.ptr, 0, int64(ct.bytes))))
					require.NoError(t, gpu.WriteF32(x, readF32(t, xs[0])))
					require.Equal(t, bits(want[0]), bits(run(t, wG, x, bias, m, n, key)), "graph, replay from the copy")
					gpu.Free(wC)
					gpu.Free(wG)
					w4, b4 := gpu.BF16CacheStats()
					require.Equal(t, w0, w4, "Free drops the copies")
					require.Equal(t, b0, b4)
				})
			}
		}
	}
}

// TestBF16CacheBudget: a weight over the cache's cap, or whose copy would
// leave less than the reserve free, gets no copy and is not retried; its
// MatMul runs the per-call dequantization (the same bits as with the cache
// off).
func TestBF16CacheBudget(t *testing.T) {
	if gpu.l.bf16Cache == nil {
		t.Skip("library without orch_bf16_cache")
	}
	defer func(on bool, c, r int64) { gpu.SetBF16Cache(on, c, r) }(gpu.bc.on, gpu.bc.cap, gpu.bc.reserve)
	r := newRNG(t)
	const k, m, n = 512, 200, 64
	for _, c := range []struct {
		name         string
		cap, reserve int64
	}{{"cap", 1, 0}, {"reserve", 0, 1 << 50}} { // cap 1 byte: any copy is over it
		t.Run(c.name, func(t *testing.T) {
			w := weightPair(t, "w", ml.Q8_0, []int{k, m}, randWeight(r, ml.Q8_0, k, m))
			x := f32Pair(t, randF32(r, k*n, 1), k, n)
			y := out(t, m, n)
			mul := func() []float32 {
				gpu.Fill(y.g, float32(math.NaN()))
				gpu.MatMul(y.g, x.g, w.g, nil)
				v := make([]float32, m*n)
				require.NoError(t, gpu.ReadF32(y.g, v))
				return v
			}
			gpu.SetBF16Cache(false, 0, 0)
			want := mul()
			gpu.SetBF16Cache(true, c.cap, c.reserve)
			n0, b0 := gpu.BF16CacheStats()
			for range 2 {
				require.Equal(t, want, mul())
			}
			n1, b1 := gpu.BF16CacheStats()
			require.Equal(t, n0, n1, "no copy")
			require.Equal(t, b0, b1)
			require.True(t, gpu.bc.declined[dptr(t, w.g)], "declined, not retried")
			ref.MatMul(y.c, x.c, w.c, nil)
			checkClose(t, c.name, y, bf16Tol)
		})
	}
}

// TestBF16CacheRoute: from bf16From (9) tokens a weight with a bf16 copy
// runs cuBLAS on it (not GEMV v9 / qgemm): after its quantized bytes are
// zeroed the result must not change; against the CPU at the bf16 tolerance.
func TestBF16CacheRoute(t *testing.T) {
	if gpu.l.bf16Cache == nil {
		t.Skip("library without orch_bf16_cache")
	}
	defer func(on bool, c, r int64) { gpu.SetBF16Cache(on, c, r) }(gpu.bc.on, gpu.bc.cap, gpu.bc.reserve)
	gpu.SetBF16Cache(true, 0, 0)
	r := newRNG(t)
	for _, dt := range []ml.DType{ml.Q8_0, ml.MXFP4} {
		for _, n := range []int{9, 12, 16} {
			t.Run(fmt.Sprintf("%v/n=%d", dt, n), func(t *testing.T) {
				const k, m = 512, 200
				w := weightPair(t, "w", dt, []int{k, m}, randWeight(r, dt, k, m))
				x := f32Pair(t, randF32(r, k*n, 1), k, n)
				y := out(t, m, n)
				gpu.MatMul(y.g, x.g, w.g, nil)
				ref.MatMul(y.c, x.c, w.c, nil)
				checkClose(t, "cached route", y, bf16Tol)
				first := readF32(t, y.g)
				ct, err := gpu.get(w.g)
				require.NoError(t, err)
				require.NoError(t, gpu.l.status("memset", gpu.l.memset(gpu.ctx, ct.ptr, 0, int64(ct.bytes))))
				gpu.Fill(y.g, float32(math.NaN()))
				gpu.MatMul(y.g, x.g, w.g, nil)
				require.Equal(t, first, readF32(t, y.g), "read from the bf16 copy")
			})
		}
	}
}
