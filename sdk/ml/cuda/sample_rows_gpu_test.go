//go:build gpu

package cuda

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// sampleRowsOp allocates the op's tensors for n rows of v logits.
type sampleRowsOp struct {
	x, dst, params ml.Tensor
	n, v           int
}

func newSampleRowsOp(t *testing.T, v, n int) *sampleRowsOp {
	t.Helper()
	require.True(t, gpu.SampleRowsAvailable(), "the library has no orch_sample_rows")
	o := &sampleRowsOp{n: n, v: v}
	var err error
	o.x, err = gpu.Alloc(ml.F32, v, n)
	require.NoError(t, err)
	o.dst, err = gpu.Alloc(ml.I32, n)
	require.NoError(t, err)
	o.params, err = gpu.Alloc(ml.I32, ml.SampleParamsWords*n)
	require.NoError(t, err)
	t.Cleanup(func() { gpu.Free(o.x); gpu.Free(o.dst); gpu.Free(o.params) })
	return o
}

// run writes ps, poisons dst, runs the op and returns the tokens.
func (o *sampleRowsOp) run(t *testing.T, ps []ml.SampleParams) []int32 {
	t.Helper()
	o.write(t, ps)
	gpu.SampleRows(o.dst, o.x, o.params, ml.SampleFilters(o.v, ps))
	return o.read(t)
}

func (o *sampleRowsOp) write(t *testing.T, ps []ml.SampleParams) {
	w := make([]int32, ml.SampleParamsWords*len(ps))
	ml.PackSampleParams(w, ps)
	require.NoError(t, gpu.WriteI32(o.params, w))
	poison := make([]int32, o.n)
	for i := range poison {
		poison[i] = -12345
	}
	require.NoError(t, gpu.WriteI32(o.dst, poison))
}

func (o *sampleRowsOp) read(t *testing.T) []int32 {
	got := make([]int32, o.n)
	require.NoError(t, gpu.ReadI32(o.dst, got))
	return got
}

// TestSampleRows: every row's token against the host reference
// ml.SampleRowRef (same noise, same kept set: equal but for last-bit logf
// differences in near ties), at gpt-oss's and Llama's vocabularies, mixed
// greedy / temperature / top-k / top-p / min-p rows in one op, edge rows
// (all -Inf, +Inf, NaN), 1..80 rows (more than one 64-row launch set).
func TestSampleRows(t *testing.T) {
	r := newRNG(t)
	settings := []ml.SampleParams{
		{}, {Temperature: 1}, {Temperature: 0.7, TopP: 0.9}, {Temperature: 1, TopK: 40},
		{Temperature: 1.2, TopK: 300, TopP: 0.8}, {Temperature: 1, MinP: 0.05},
		{Temperature: 0.9, TopK: 50, TopP: 0.95, MinP: 0.02}, {Temperature: 1, TopK: 1}, {Temperature: 2, TopP: 0.5},
	}
	for _, v := range []int{201088, 128256, 1000} {
		for _, n := range []int{1, 9, 80} {
			t.Run(fmt.Sprintf("v=%d/n=%d", v, n), func(t *testing.T) {
				o := newSampleRowsOp(t, v, n)
				logits := randF32(r, v*n, 2)
				for i := range n { // a head of likely tokens per row
					for range 20 {
						logits[i*v+r.IntN(v)] += 7
					}
				}
				if n >= 9 {
					for j := range v {
						logits[3*v+j] = float32(math.Inf(-1))
					}
					logits[4*v+v/2], logits[4*v+v/3] = float32(math.Inf(1)), float32(math.Inf(1))
					for range 50 {
						logits[5*v+r.IntN(v)] = float32(math.NaN())
					}
				}
				require.NoError(t, gpu.WriteF32(o.x, logits))
				ps := make([]ml.SampleParams, n)
				mismatch := 0
				for round := range 3 {
					for i := range ps {
						ps[i] = settings[(i+round)%len(settings)]
						ps[i].Seed, ps[i].Counter = r.Uint64(), uint64(r.IntN(1000))
					}
					got := o.run(t, ps)
					for i, tok := range got {
						row := logits[i*v : (i+1)*v]
						require.True(t, tok >= 0 && int(tok) < v, "row %d: token %d", i, tok)
						require.False(t, math.IsNaN(float64(row[tok])), "row %d: NaN drawn", i)
						want := ml.SampleRowRef(row, ps[i])
						if tok != want {
							mismatch++
							t.Logf("row %d %+v: token %d (logit %g), reference %d (logit %g)", i, ps[i], tok, row[tok], want, row[want])
						}
						if n >= 9 && i == 3 {
							require.Equal(t, int32(0), tok, "all -Inf: token 0")
						}
						if n >= 9 && i == 4 && ps[i].Temperature > 0 {
							require.Equal(t, int32(v/3), tok, "+Inf logits take the mass: the first")
						}
					}
				}
				require.LessOrEqual(t, mismatch, max(1, 3*n/50), "tokens differing from the host reference (near ties only)")
			})
		}
	}
}

// TestSampleRowsDistribution: the empirical distribution of many rows with
// identical logits and distinct counters matches the filtered softmax, and the same (seed, counter) gives the same token again.
func TestSampleRowsDistribution(t *testing.T) {
	r := newRNG(t)
	const v, n = 40, 8192
	logits := randF32(r, v, 1.5)
	rows := make([]float32, 0, v*n)
	for range n {
		rows = append(rows, logits...)
	}
	o := newSampleRowsOp(t, v, n)
	require.NoError(t, gpu.WriteF32(o.x, rows))
	type params struct {
		temp       float32
		topK       int
		topP, minP float32
	}
	for _, p := range []params{{1, 0, 1, 0}, {0.7, 5, 1, 0}, {1.3, 0, 0.8, 0}, {1, 0, 1, 0.2}, {0.9, 10, 0.9, 0.05}} {
		t.Run(fmt.Sprintf("T=%g/k=%d/p=%g/minp=%g", p.temp, p.topK, p.topP, p.minP), func(t *testing.T) {
			want := filteredProbs(logits, p.temp, p.topK, p.topP, p.minP)
			ps := make([]ml.SampleParams, n)
			s := r.Uint64()
			for i := range ps {
				ps[i] = ml.SampleParams{Temperature: p.temp, TopK: int32(p.topK), TopP: p.topP, MinP: p.minP, Seed: s, Counter: uint64(i)}
			}
			got := o.run(t, ps)
			cnt := make([]float64, v)
			for _, id := range got {
				require.True(t, id >= 0 && id < v, "token %d", id)
				require.Greater(t, want[id], 0.0, "token %d is filtered out", id)
				cnt[id]++
			}
			for i := range cnt {
				require.InDelta(t, want[i], cnt[i]/n, 0.02+3*math.Sqrt(want[i]*(1-want[i])/n), "token %d", i)
			}
			require.Equal(t, got, o.run(t, ps), "same seeds and counters: same tokens")
		})
	}
}

// TestSampleRowsGraphReplay: a captured op replays with the params written
// before each replay (new counters: new draws, equal to eager runs), and a
// row's token does not depend on the other rows (alone vs in a batch).
func TestSampleRowsGraphReplay(t *testing.T) {
	r := newRNG(t)
	const v, n = 201088, 8
	o := newSampleRowsOp(t, v, n)
	logits := randF32(r, v*n, 3)
	require.NoError(t, gpu.WriteF32(o.x, logits))
	ps := make([]ml.SampleParams, n)
	for i := range ps {
		ps[i] = ml.SampleParams{Temperature: 1, TopP: 0.9, TopK: int32(20 * (i % 3)), MinP: 0.01 * float32(i%2), Seed: r.Uint64()}
	}
	ps[0] = ml.SampleParams{} // a greedy row in the batch
	filters := ml.SampleFilters(v, ps)
	key := fmt.Sprintf("sample-rows-%d", r.Uint64())
	distinct := make([]map[int32]bool, n)
	for i := range distinct {
		distinct[i] = map[int32]bool{}
	}
	for step := range 6 {
		for i := range ps {
			ps[i].Counter = uint64(step)
		}
		o.write(t, ps)
		require.NoError(t, gpu.Run(key, func() { gpu.SampleRows(o.dst, o.x, o.params, filters) }))
		replayed := o.read(t)
		require.Equal(t, o.run(t, ps), replayed, "step %d: replay = eager", step)
		for i, tok := range replayed {
			distinct[i][tok] = true
		}
	}
	require.Len(t, distinct[0], 1, "the greedy row: the argmax every step")
	most := 0
	for _, d := range distinct[1:] {
		most = max(most, len(d))
	}
	require.Greater(t, most, 1, "new counters draw new tokens")
	all := o.run(t, ps)
	one := newSampleRowsOp(t, v, 1)
	for _, i := range []int{0, 1, 5} {
		require.NoError(t, gpu.WriteF32(one.x, logits[i*v:(i+1)*v]))
		require.Equal(t, all[i], one.run(t, ps[i:i+1])[0], "row %d alone = in the batch", i)
	}
}

// TestPerfSample times orch_sample_rows (graph-timed, as TestPerf's rows) at
// gpt-oss's and Llama's vocabularies for 1, 8 and 64 rows: temperature only
// (one launch), top_p 0.9 (max + 4 passes + draw), top_k 50 + top_p
// 0.9 (max + 8 passes + draw), min_p (max + draw), next to the argmax.
// (Run 1 also timed the deleted one-CTA-a-row orch_sample.) The floor is one read of the logits at the
// copy bandwidth. Written next to ORCH_PERF_OUT as perf-sample.md.
//
//	ORCH_GPU_PERF=1 bin/cuda-gpu.test -test.run PerfSample -test.v
func TestPerfSample(t *testing.T) {
	if os.Getenv("ORCH_GPU_PERF") == "" {
		t.Skip("set ORCH_GPU_PERF=1 to time sampling")
	}
	r := newRNG(t)
	peak := copyPeak(t)
	lines := []string{"| op | vocab | n | us | floor us (one read) |", "|---|---|---|---|---|"}
	for _, v := range []int{201088, 128256} {
		for _, n := range []int{1, 8, 64} {
			o := newSampleRowsOp(t, v, n)
			logits := randF32(r, v*n, 2)
			require.NoError(t, gpu.WriteF32(o.x, logits))
			floor := float64(v*n*4) / peak * 1e6
			row := func(name string, us float64) {
				lines = append(lines, fmt.Sprintf("| %s | %d | %d | %.1f | %.1f |", name, v, n, us, floor))
			}
			row("argmax", 1e3*timeKernel(t, 20, 8, func() { gpu.Argmax(o.dst, o.x) }))
			// every row with settings p (seed = row), timed on what o.x holds
			timeSettings := func(name string, p ml.SampleParams) {
				ps := make([]ml.SampleParams, n)
				for i := range ps {
					ps[i] = p
					ps[i].Seed = uint64(i)
				}
				o.write(t, ps)
				f := ml.SampleFilters(v, ps)
				row(name, 1e3*timeKernel(t, 20, 8, func() { gpu.SampleRows(o.dst, o.x, o.params, f) }))
			}
			timeSettings("sample_rows T=1", ml.SampleParams{Temperature: 1})
			timeSettings("sample_rows T=1 min_p=0.05", ml.SampleParams{Temperature: 1, MinP: 0.05})
			timeSettings("sample_rows T=1 top_p=0.9", ml.SampleParams{Temperature: 1, TopP: 0.9})
			timeSettings("sample_rows T=1 top_k=50 top_p=0.9", ml.SampleParams{Temperature: 1, TopK: 50, TopP: 0.9})
			// LM-like rows: a bulk well below a few dozen likely tokens (N(-4, 3), 30 tokens +18): once a CTA
			// has seen a likely token the draw skips the noise of the bulk; N(0, 2) rows above are the worst case.
			peaked := randF32(r, v*n, 3)
			for i := range peaked {
				peaked[i] -= 4
			}
			for i := range n {
				for range 30 {
					peaked[i*v+r.IntN(v)] += 18
				}
			}
			require.NoError(t, gpu.WriteF32(o.x, peaked))
			timeSettings("sample_rows T=1, LM-like row", ml.SampleParams{Temperature: 1})
			timeSettings("sample_rows T=1 top_p=0.9, LM-like row", ml.SampleParams{Temperature: 1, TopP: 0.9})
		}
	}
	table := strings.Join(lines, "\n") + "\n"
	fmt.Print(table)
	if po := os.Getenv("ORCH_PERF_OUT"); po != "" {
		require.NoError(t, os.WriteFile(filepath.Join(filepath.Dir(po), "perf-sample.md"), []byte(table), 0o644))
	}
}
