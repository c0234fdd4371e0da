package cuda

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// A hint named between the KV write and Attend (as the nets do) reaches the
// library right before the folded attention launch, once, and does not
// break the fold; off without ORCH_CUDA_L2_HINT=1.
func TestL2Hint(t *testing.T) {
	defer func(v, w bool) { fuseOps, foldAttnRoPE = v, w }(fuseOps, foldAttnRoPE)
	fuseOps, foldAttnRoPE = true, true
	b, f := newFakeBackend(t)
	b.l.attentionRope = func(ctx uintptr, a *attnArgs, r *attnRopeArgs) int32 {
		return f.add("attention_rope out=%x", a.out)
	}
	b.l.l2Hint = func(ctx, p uintptr, bytes int64) int32 { return f.add("l2_hint %x %d", p, bytes) }
	const d, hd, nh, nkv, bs = 64, 16, 4, 2, 16
	wo := fakeT(b, ml.Q8_0, hd*nh, d)
	step := func() []string {
		h := fakeT(b, ml.F32, d, 1)
		wq, wk, wv := fakeT(b, ml.Q8_0, d, hd*nh), fakeT(b, ml.Q8_0, d, hd*nkv), fakeT(b, ml.Q8_0, d, hd*nkv)
		q, k, v := fakeT(b, ml.F32, hd*nh, 1), fakeT(b, ml.F32, hd*nkv, 1), fakeT(b, ml.F32, hd*nkv, 1)
		view := func(t *tensor, heads int) *tensor {
			c := *t
			c.shape = []int{hd, heads, 1}
			return &c
		}
		pos, freq := fakeT(b, ml.I32, 1), fakeT(b, ml.F32, hd/2)
		rope := &ml.Rope{Mode: ml.RopeNeoX, Dims: hd, InvFreq: freq}
		kc, vc := fakeT(b, ml.F16, hd, nkv, bs, 4), fakeT(b, ml.F16, hd, nkv, bs, 4)
		bt := &ml.Batch{Pos: pos, Seq: fakeT(b, ml.I32, 1), Slots: fakeT(b, ml.I32, 1), Blocks: fakeT(b, ml.I32, 4, 1),
			BlockSize: bs}
		att := fakeT(b, ml.F32, hd, nh, 1)
		b.MatMul(q, h, wq, nil)
		b.MatMul(k, h, wk, nil)
		b.MatMul(v, h, wv, nil)
		b.RoPE(view(q, nh), pos, rope)
		b.RoPE(view(k, nkv), pos, rope)
		b.KVWrite(kc, vc, view(k, nkv), view(v, nkv), bt)
		b.PrefetchHint(wo)
		b.Attend(att, view(q, nh), kc, vc, bt, &ml.Attention{Scale: 0.25})
		require.NoError(t, b.Err())
		log := f.take()
		return log[1:] // after the merged q/k/v GEMV
	}
	t.Setenv("ORCH_CUDA_L2_HINT", "")
	log := step()
	require.Len(t, log, 1, "no hint: the folded attention only")
	require.Contains(t, log[0], "attention_rope")
	t.Setenv("ORCH_CUDA_L2_HINT", "1")
	log = step()
	require.Len(t, log, 2)
	require.Equal(t, fmt.Sprintf("l2_hint %x %d", wo.ptr, wo.bytes), log[0])
	require.Contains(t, log[1], "attention_rope", "still folded")
	require.Equal(t, uintptr(0), b.hint.ptr, "consumed")

}
