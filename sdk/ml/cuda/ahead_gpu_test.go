//go:build gpu

package cuda

import (
	"fmt"
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// aheadModes: the read as orch_read_i32_host's kernel with PDL on and off,
// and as the memcpy (ORCH_CUDA_READ_KERNEL=0).
var aheadModes = []struct {
	name, env string
	pdl       bool
}{{"kernel", "", true}, {"kernel_nopdl", "", false}, {"memcpy", "0", true}}

func aheadMode(t *testing.T, env string, pdl bool) {
	require.True(t, gpu.StepAhead(), "step-ahead reads are off (library or ORCH_CUDA_STEP_AHEAD / ORCH_CUDA_OPTIME)")
	require.NotNil(t, gpu.l.readI32Host, "the library has no orch_read_i32_host (rebuild it)")
	t.Setenv("ORCH_CUDA_READ_KERNEL", env)
	t.Setenv("ORCH_CUDA_STEP_ADVANCE", "")
	was := gpu.setPDL(pdl)
	t.Cleanup(func() { gpu.setPDL(was) })
}

func allocI32(t *testing.T, v []int32) ml.Tensor {
	t.Helper()
	x, err := gpu.Alloc(ml.I32, len(v))
	require.NoError(t, err)
	t.Cleanup(func() { gpu.Free(x) })
	require.NoError(t, gpu.WriteI32(x, v))
	return x
}

// advanceRef is orch_step_advance on the host (ml.AheadBackend.AdvanceStep).
func advanceRef(buf []int32, seg int, inc uint32, src []int32, params []int32, n int) {
	copy(buf, src[:n])
	for s := 1; s < 32; s++ {
		if inc>>s&1 != 0 {
			for i := range n {
				buf[s*seg+i]++
			}
		}
	}
	if params == nil {
		return
	}
	ps := ml.UnpackSampleParams(params[:ml.SampleParamsWords*n])
	for i := range ps {
		if ps[i].Temperature >= ml.SampleMinTemperature {
			ps[i].Counter++
		}
	}
	ml.PackSampleParams(params, ps)
}

// TestGPUReadI32Async: decode steps queued as the runner queues them (argmax
// of planted logits, the tokens' read, step_advance, a read of its buffer),
// with no host wait between steps and up to 6 reads in flight, waited oldest
// first, newest first or dropped. Every read holds what the work queued
// before it left, never what later steps (argmax, step_advance) write into
// the same tensors; slots are reused (the pool grows by at most the reads in
// flight).
// Then one read of 70,000 values (many CTAs, a larger slot) with a
// step_advance queued after it that rewrites them.
func TestGPUReadI32Async(t *testing.T) {
	for _, m := range aheadModes {
		t.Run(m.name, func(t *testing.T) {
			aheadMode(t, m.env, m.pdl)
			r := newRNG(t)
			const v, n, seg, steps, depth = 201088, 5, 8, 40, 6
			const inc = 1<<1 | 1<<2
			// 4 logits tensors with planted maxima, uploaded before the steps
			var xs []ml.Tensor
			var toks [][]int32
			for range 4 {
				x := randF32(r, v*n, 1)
				tk := make([]int32, n)
				for i := range tk {
					tk[i] = int32(r.IntN(v))
					x[i*v+int(tk[i])] = 50
				}
				xt, err := gpu.Alloc(ml.F32, v, n)
				require.NoError(t, err)
				t.Cleanup(func() { gpu.Free(xt) })
				require.NoError(t, gpu.WriteF32(xt, x))
				xs, toks = append(xs, xt), append(toks, tk)
			}
			tok := allocI32(t, make([]int32, n))
			bufH := make([]int32, 3*seg)
			for i := range bufH {
				bufH[i] = int32(r.IntN(1000))
			}
			buf := allocI32(t, bufH)
			ps := make([]ml.SampleParams, n)
			for i := range ps {
				if i%2 == 1 {
					ps[i] = ml.SampleParams{Temperature: 0.8, Seed: uint64(i), Counter: uint64(3 * i)}
				}
			}
			parH := make([]int32, ml.SampleParamsWords*n)
			ml.PackSampleParams(parH, ps)
			par := allocI32(t, parH)
			require.NoError(t, gpu.Sync())
			slots0 := len(gpu.ah.all)

			type pending struct {
				rd   ml.PendingI32
				want []int32
				what string
			}
			var q []pending
			check := func(p pending) {
				got := make([]int32, len(p.want))
				require.NoError(t, p.rd.Wait(got), p.what)
				require.Equal(t, p.want, got, p.what)
			}
			for k := range steps {
				gpu.Argmax(tok, xs[k%4])
				rd, err := gpu.ReadI32Async(tok)
				require.NoError(t, err)
				q = append(q, pending{rd, toks[k%4], fmt.Sprintf("step %d tokens", k)})
				require.True(t, gpu.AdvanceStep(buf, seg, inc, tok, par, n))
				advanceRef(bufH, seg, inc, toks[k%4], parH, n)
				rd, err = gpu.ReadI32Async(buf)
				require.NoError(t, err)
				q = append(q, pending{rd, append([]int32(nil), bufH...), fmt.Sprintf("step %d buffer", k)})
				for len(q) > depth {
					switch r.IntN(4) {
					case 0: // newest first
						check(q[len(q)-1])
						q = q[:len(q)-1]
					case 1:
						q[0].rd.Drop()
						q = q[1:]
					default:
						check(q[0])
						q = q[1:]
					}
				}
				require.LessOrEqual(t, len(gpu.ah.all)-slots0, depth+2, "slots reused")
			}
			for _, p := range q {
				check(p)
			}
			require.NoError(t, gpu.Err())
			got := make([]int32, len(parH))
			require.NoError(t, gpu.ReadI32(par, got))
			require.Equal(t, parH, got, "params: counters of the drawing rows + %d", steps)

			// a large read, then a step_advance that rewrites what it read
			const big = 70000
			bigH, src := make([]int32, big), make([]int32, big/2)
			for i := range bigH {
				bigH[i] = r.Int32()
			}
			for i := range src {
				src[i] = r.Int32()
			}
			bt, st := allocI32(t, bigH), allocI32(t, src)
			rd, err := gpu.ReadI32Async(bt)
			require.NoError(t, err)
			require.True(t, gpu.AdvanceStep(bt, big/2, 1<<1, st, nil, big/2))
			got = make([]int32, big)
			require.NoError(t, rd.Wait(got))
			require.Equal(t, bigH, got, "read before the step_advance queued after it")
			advanceRef(bigH, big/2, 1<<1, src, nil, big/2)
			require.NoError(t, gpu.ReadI32(bt, got))
			require.Equal(t, bigH, got)
		})
	}
}

// TestGPUAdvanceStep: orch_step_advance (PDL on and off) against advanceRef:
// segments up to 31, rows over several CTAs, params with greedy, NaN and
// drawing rows and a counter that carries into its high word.
func TestGPUAdvanceStep(t *testing.T) {
	for _, pdl := range []bool{true, false} {
		for _, tc := range []struct {
			seg, n int
			inc    uint32
			params bool
		}{{8, 5, 1<<1 | 1<<2, true}, {8, 8, 1 << 3, false}, {300, 300, 1<<1 | 1<<5, true}, {4, 1, 1 << 31, true}, {1000, 129, 0, true}} {
			t.Run(fmt.Sprintf("pdl%t_seg%d_n%d_inc%#x", pdl, tc.seg, tc.n, tc.inc), func(t *testing.T) {
				aheadMode(t, "", pdl)
				r := newRNG(t)
				top := 0
				for s := 1; s < 32; s++ {
					if tc.inc>>s&1 != 0 {
						top = s
					}
				}
				bufH := make([]int32, (top+1)*tc.seg+3)
				for i := range bufH {
					bufH[i] = r.Int32N(1 << 20)
				}
				src := make([]int32, tc.n)
				for i := range src {
					src[i] = r.Int32N(201088)
				}
				var parH []int32
				var par ml.Tensor
				if tc.params {
					ps := make([]ml.SampleParams, tc.n)
					temps := []float32{0, 1e-6, float32(math.NaN()), ml.SampleMinTemperature, 0.7}
					for i := range ps {
						ps[i] = ml.SampleParams{Temperature: temps[i%len(temps)], TopK: int32(i), Seed: r.Uint64(), Counter: r.Uint64N(1 << 40)}
					}
					ps[0].Temperature, ps[0].Counter = 1, math.MaxUint32
					parH = make([]int32, ml.SampleParamsWords*tc.n)
					ml.PackSampleParams(parH, ps)
					par = allocI32(t, parH)
				}
				buf, st := allocI32(t, bufH), allocI32(t, src)
				for range 3 {
					require.True(t, gpu.AdvanceStep(buf, tc.seg, tc.inc, st, par, tc.n))
					advanceRef(bufH, tc.seg, tc.inc, src, parH, tc.n)
				}
				got := make([]int32, len(bufH))
				require.NoError(t, gpu.ReadI32(buf, got))
				require.Equal(t, bufH, got)
				if tc.params {
					got = make([]int32, len(parH))
					require.NoError(t, gpu.ReadI32(par, got))
					require.Equal(t, parH, got)
					require.Equal(t, uint64(math.MaxUint32)+3, ml.UnpackSampleParams(got)[0].Counter)
				}
			})
		}
	}
}
